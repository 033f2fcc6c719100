//! Storages made for real, as root, each test in a thread with its own
//! private mount namespace: nothing it mounts reaches the machine, and
//! whatever a failed test leaves mounted goes with the thread.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kestrel_protocols::agent::Storage;
use kestrel_protocols::types::FSGroupChangePolicy;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::request::FsGroup;
use super::roots::Roots;
use super::{fs_group, Storages};
use crate::error::Error;

/// Runs `test` as root in a private mount namespace, or says why not.
fn as_root_in_private_mounts(name: &str, test: impl FnOnce() + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {name}: needs root (mounts)");
        return;
    }
    let ran = std::thread::spawn(move || {
        // A thread may leave its process's mount namespace on its own.
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        let none: Option<&str> = None;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
            .expect("making mounts private");
        test()
    })
    .join();
    if let Err(panic) = ran {
        std::panic::resume_unwind(panic);
    }
}

/// The fstype and super-block options of the mount at `path`, as this
/// thread's namespace shows it.
fn mounted(path: &Path) -> Option<(String, String)> {
    let table = fs::read_to_string("/proc/thread-self/mountinfo").expect("mountinfo");
    table.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        if Path::new(point) != path {
            return None;
        }
        let mut right = right.split(' ');
        let fstype = right.next()?.to_string();
        let _source = right.next();
        let mount_opts = left.split(' ').nth(5).unwrap_or_default();
        Some((
            fstype,
            format!("{mount_opts},{}", right.next().unwrap_or_default()),
        ))
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    shared: PathBuf,
    storages: Arc<Storages>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().canonicalize().unwrap().join("shared");
    fs::create_dir_all(&shared).unwrap();
    let storages = Arc::new(Storages::new(Roots::new(vec![shared.clone()]), false));
    Fixture {
        _dir: dir,
        shared,
        storages,
    }
}

fn storage(driver: &str, source: &str, mount_point: &Path, opts: &[&str]) -> Storage {
    Storage {
        driver: driver.into(),
        source: source.into(),
        mount_point: mount_point.display().to_string(),
        options: opts.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn ephemeral_storage_is_a_tmpfs_with_its_options_until_its_last_user_goes() {
    as_root_in_private_mounts(
        "ephemeral_storage_is_a_tmpfs_with_its_options_until_its_last_user_goes",
        || {
            let f = fixture();
            let shm = f.shared.join("sandbox/shm");
            let s = storage(
                "ephemeral",
                "shm",
                &shm,
                &["nosuid", "nodev", "mode=1777", "size=1m", "fsgid=4321"],
            );
            let sandbox = f
                .storages
                .acquire("CreateSandbox", std::slice::from_ref(&s))
                .unwrap();
            let (fstype, opts) = mounted(&shm).expect("shm mounted");
            assert_eq!(fstype, "tmpfs");
            assert!(
                opts.contains("nosuid") && opts.contains("size=1024k"),
                "{opts}"
            );
            let meta = fs::metadata(&shm).unwrap();
            assert_eq!(meta.gid(), 4321);
            assert_eq!(meta.permissions().mode() & 0o7777, 0o3777);

            let container = f.storages.acquire("CreateContainer", &[s]).unwrap();
            assert_eq!(f.storages.users(&shm), Some(2));
            drop(sandbox);
            assert!(mounted(&shm).is_some(), "the container still uses it");
            drop(container);
            assert_eq!(mounted(&shm), None);
            assert_eq!(f.storages.users(&shm), None);
        },
    );
}

#[test]
fn a_failed_storage_unmounts_what_the_same_call_mounted_before_it() {
    as_root_in_private_mounts(
        "a_failed_storage_unmounts_what_the_same_call_mounted_before_it",
        || {
            let f = fixture();
            let good = f.shared.join("good");
            let bad = f.shared.join("bad");
            let kept = f.shared.join("kept");
            let earlier = f
                .storages
                .acquire("CreateSandbox", &[storage("ephemeral", "", &kept, &[])])
                .unwrap();
            let err = f
                .storages
                .acquire(
                    "CreateContainer",
                    &[
                        storage("ephemeral", "", &good, &[]),
                        storage("ephemeral", "", &kept, &[]),
                        storage("ephemeral", "", &bad, &["no_such_tmpfs_option=1"]),
                    ],
                )
                .unwrap_err();
            assert!(matches!(err, Error::Internal(_)), "{err:?}");
            assert!(
                err.to_string().starts_with("CreateContainer: storages[2]"),
                "{err}"
            );
            assert_eq!(mounted(&good), None);
            assert_eq!(mounted(&bad), None);
            assert_eq!(f.storages.users(&good), None);
            assert_eq!(
                f.storages.users(&kept),
                Some(1),
                "only the earlier call's use is left"
            );
            assert!(mounted(&kept).is_some());
            drop(earlier);
            assert_eq!(mounted(&kept), None);
        },
    );
}

#[test]
fn a_shared_storage_stays_mounted_until_the_sandbox_goes() {
    as_root_in_private_mounts(
        "a_shared_storage_stays_mounted_until_the_sandbox_goes",
        || {
            let f = fixture();
            let vol = f.shared.join("volumes/cache");
            let mut s = storage("ephemeral", "", &vol, &[]);
            s.shared = true;
            drop(
                f.storages
                    .acquire("CreateContainer", std::slice::from_ref(&s))
                    .unwrap(),
            );
            assert!(mounted(&vol).is_some());
            let again = f.storages.acquire("CreateContainer", &[s]).unwrap();
            assert_eq!(f.storages.users(&vol), Some(1));
            f.storages.release_all();
            assert_eq!(mounted(&vol), None);
            drop(again);
            assert_eq!(f.storages.users(&vol), None);
        },
    );
}

#[test]
fn bind_storage_shows_its_source_read_only() {
    as_root_in_private_mounts("bind_storage_shows_its_source_read_only", || {
        let f = fixture();
        let src = f.shared.join("c1/data");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("hello"), "hi").unwrap();
        fs::write(f.shared.join("c1/config"), "k=v").unwrap();
        let view = f.shared.join("c1/view");
        let file_view = f.shared.join("c1/config-view");
        let lease = f
            .storages
            .acquire(
                "CreateContainer",
                &[
                    storage("bind", src.to_str().unwrap(), &view, &["ro"]),
                    storage(
                        "bind",
                        f.shared.join("c1/config").to_str().unwrap(),
                        &file_view,
                        &[],
                    ),
                ],
            )
            .unwrap();
        assert_eq!(fs::read_to_string(view.join("hello")).unwrap(), "hi");
        let err = fs::write(view.join("new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        assert_eq!(fs::read_to_string(&file_view).unwrap(), "k=v");
        assert!(mounted(&file_view).is_some());
        drop(lease);
        assert_eq!(mounted(&view), None);
        assert_eq!(mounted(&file_view), None);
        assert!(src.join("hello").exists(), "the source is untouched");
    });
}

#[test]
fn mount_points_behind_a_symlink_are_refused_and_nothing_is_mounted() {
    as_root_in_private_mounts(
        "mount_points_behind_a_symlink_are_refused_and_nothing_is_mounted",
        || {
            let f = fixture();
            let outside = f.shared.parent().unwrap().join("outside");
            fs::create_dir_all(&outside).unwrap();
            std::os::unix::fs::symlink(&outside, f.shared.join("escape")).unwrap();
            let target = f.shared.join("escape/x");
            let err = f
                .storages
                .acquire("CreateSandbox", &[storage("ephemeral", "", &target, &[])])
                .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert!(err.to_string().contains("storages[0].mount_point"), "{err}");
            assert!(!outside.join("x").exists());
            assert_eq!(mounted(&outside.join("x")), None);
            let source = storage(
                "bind",
                f.shared.join("escape").to_str().unwrap(),
                &f.shared.join("v"),
                &[],
            );
            let err = f.storages.acquire("CreateSandbox", &[source]).unwrap_err();
            assert!(err.to_string().contains("storages[0].source"), "{err}");
            assert_eq!(mounted(&f.shared.join("v")), None);
        },
    );
}

#[test]
fn a_mount_point_in_use_must_be_asked_for_alike_and_never_hidden() {
    as_root_in_private_mounts(
        "a_mount_point_in_use_must_be_asked_for_alike_and_never_hidden",
        || {
            let f = fixture();
            let vol = f.shared.join("pod/vol");
            let lease = f
                .storages
                .acquire("CreateSandbox", &[storage("ephemeral", "", &vol, &[])])
                .unwrap();
            let src = f.shared.join("src");
            fs::create_dir_all(&src).unwrap();
            let other = storage("bind", src.to_str().unwrap(), &vol, &[]);
            let err = f.storages.acquire("CreateContainer", &[other]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            let above = storage("ephemeral", "", &f.shared.join("pod"), &[]);
            let err = f.storages.acquire("CreateContainer", &[above]).unwrap_err();
            assert!(err.to_string().contains("would hide"), "{err}");
            assert_eq!(mounted(&f.shared.join("pod")), None);
            assert_eq!(f.storages.users(&vol), Some(1));
            drop(lease);
        },
    );
}

#[test]
fn local_storage_is_a_directory_with_its_mode_and_group() {
    as_root_in_private_mounts(
        "local_storage_is_a_directory_with_its_mode_and_group",
        || {
            let f = fixture();
            let dir = f.shared.join("sb/rootfs/local/cache");
            let s = storage("local", "local", &dir, &["mode=0770", "fsgid=2000"]);
            let lease = f.storages.acquire("CreateContainer", &[s]).unwrap();
            let meta = fs::metadata(&dir).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.gid(), 2000);
            assert_eq!(meta.permissions().mode() & 0o7777, 0o2770);
            assert_eq!(mounted(&dir), None, "a local storage is no mount");
            drop(lease);
            assert!(dir.is_dir(), "the volume's data stays with the pod");
        },
    );
}

#[test]
fn fs_group_gives_files_the_group_and_directories_setgid_but_skips_symlinks() {
    as_root_in_private_mounts(
        "fs_group_gives_files_the_group_and_directories_setgid_but_skips_symlinks",
        || {
            let f = fixture();
            let src = f.shared.join("vol");
            fs::create_dir_all(src.join("sub")).unwrap();
            fs::write(src.join("sub/file"), "x").unwrap();
            fs::set_permissions(src.join("sub/file"), fs::Permissions::from_mode(0o600)).unwrap();
            let victim = f.shared.parent().unwrap().join("victim");
            fs::write(&victim, "keep").unwrap();
            std::os::unix::fs::symlink(&victim, src.join("link")).unwrap();
            let mut s = storage("bind", src.to_str().unwrap(), &f.shared.join("view"), &[]);
            let g = s.fs_group.mut_or_insert_default();
            g.group_id = 3000;
            g.group_change_policy = FSGroupChangePolicy::Always.into();
            let lease = f.storages.acquire("CreateContainer", &[s]).unwrap();
            let file = fs::metadata(src.join("sub/file")).unwrap();
            assert_eq!(file.gid(), 3000);
            assert_eq!(file.permissions().mode() & 0o7777, 0o660);
            let dir = fs::metadata(src.join("sub")).unwrap();
            assert_eq!(dir.gid(), 3000);
            assert_eq!(dir.permissions().mode() & 0o2070, 0o2070);
            assert_eq!(
                fs::metadata(&victim).unwrap().gid(),
                0,
                "a symlink's target is left alone"
            );
            drop(lease);

            // OnRootMismatch: the root matches, so nothing below it changes.
            fs::set_permissions(src.join("sub/file"), fs::Permissions::from_mode(0o600)).unwrap();
            let g = FsGroup {
                gid: 3000,
                only_on_root_mismatch: true,
            };
            fs_group::apply(&src, g, false).unwrap();
            let mode = fs::metadata(src.join("sub/file"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            // Always: it does.
            fs_group::apply(
                &src,
                FsGroup {
                    only_on_root_mismatch: false,
                    ..g
                },
                true,
            )
            .unwrap();
            let mode = fs::metadata(src.join("sub/file"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o640);
        },
    );
}
