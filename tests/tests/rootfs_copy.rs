//! Copying a host tree into the guest through CopyFile
//! (`kestrel_host::rootfs`), against the agent in host mode, whose shared
//! directory is a host path the test can inspect.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kestrel_host::agent_client::AgentClient;
use kestrel_host::rootfs::{
    copy_bind_mounts, copy_into_guest, guest_rootfs_path, CopyStats, RootfsError,
};
use kestrel_protocols::oci::Mount;
use kestrel_protocols::ttrpc::r#async::Client;
use kestrel_tests::{pseudo_random, skip, Agent};

/// Returns false, printing why, when not root: the copy sets owners.
fn require_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skip(test, "needs root (the agent sets owners with lchown)");
    }
    root
}

macro_rules! require_root {
    ($name:literal) => {
        if !require_root($name) {
            return;
        }
    };
}

async fn connect(agent: &Agent) -> AgentClient {
    let client = Client::connect(&format!("unix://{}", agent.socket.display()))
        .await
        .expect("connecting to the agent");
    AgentClient::from_client(client, Duration::from_secs(10))
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of entry the copy has to handle; returns its path.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for d in ["etc", "usr/lib/deep", "tmp"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    set_mode(&src, 0o755);
    for d in ["usr", "usr/lib", "usr/lib/deep", "etc"] {
        set_mode(&src.join(d), 0o750);
    }
    set_mode(&src.join("tmp"), 0o1777);
    std::fs::write(
        src.join("usr/lib/deep/big.bin"),
        pseudo_random(3 * 1024 * 1024 + 512 * 1024),
    )
    .unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("usr/su"), b"#!/bin/sh\n").unwrap();
    set_mode(&src.join("usr/su"), 0o4755);
    std::fs::write(src.join("etc/owned"), b"mine\n").unwrap();
    set_mode(&src.join("etc/owned"), 0o640);
    std::os::unix::fs::chown(src.join("etc/owned"), Some(1234), Some(5678)).unwrap();
    symlink("../empty", src.join("etc/relative")).unwrap();
    std::os::unix::fs::lchown(src.join("etc/relative"), Some(1234), Some(5678)).unwrap();
    symlink("/nowhere/at/all", src.join("dangling")).unwrap();
    std::fs::hard_link(src.join("etc/owned"), src.join("hardlink")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    src
}

/// Every path below `root`, relative to it, sorted.
fn relative_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                pending.push(path.clone());
            }
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_tree_arrives_with_contents_modes_owners_and_symlinks_and_without_its_fifo() {
    require_root!("a_tree_arrives_with_contents_modes_owners_and_symlinks_and_without_its_fifo");
    let agent = Agent::start();
    let client = connect(&agent).await;
    let src = source_tree(agent.dir.path());
    let dest = guest_rootfs_path(&agent.shared_dir.to_string_lossy(), "c1");

    let calls = AtomicU64::new(0);
    let last_bytes = AtomicU64::new(0);
    let progress = |s: &CopyStats| {
        calls.fetch_add(1, Ordering::Relaxed);
        last_bytes.store(s.bytes, Ordering::Relaxed);
    };
    let stats = copy_into_guest(&client, &src, &dest, Some(&progress))
        .await
        .expect("copy_into_guest");

    let big = 3 * 1024 * 1024 + 512 * 1024;
    let small = b"#!/bin/sh\n".len() + 2 * b"mine\n".len();
    assert_eq!(
        stats,
        CopyStats {
            files: 5,
            dirs: 6,
            symlinks: 2,
            skipped: 1,
            bytes: (big + small) as u64,
        }
    );
    // Entries plus the big file's first three chunks.
    assert_eq!(calls.load(Ordering::Relaxed), 14 + 3);
    assert_eq!(last_bytes.load(Ordering::Relaxed), stats.bytes);

    let dest = PathBuf::from(dest);
    assert_eq!(agent.shared_dir.join("c1/rootfs"), dest);
    let mut expected = relative_paths(&src);
    expected.retain(|p| p != Path::new("fifo"));
    assert_eq!(relative_paths(&dest), expected, "no FIFO, no partial files");
    for rel in std::iter::once(PathBuf::new()).chain(expected) {
        let (from, to) = (src.join(&rel), dest.join(&rel));
        let (a, b) = (
            std::fs::symlink_metadata(&from).unwrap(),
            std::fs::symlink_metadata(&to).unwrap(),
        );
        let shown = rel.display();
        assert_eq!(a.file_type(), b.file_type(), "{shown}");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{shown}");
        if a.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&from).unwrap(),
                std::fs::read_link(&to).unwrap(),
                "{shown}"
            );
            continue;
        }
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{shown}");
        if a.is_file() {
            assert!(
                std::fs::read(&from).unwrap() == std::fs::read(&to).unwrap(),
                "{shown}: contents differ"
            );
        }
    }
    let mode = |p: &str| std::fs::metadata(dest.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("usr/su"), 0o4755);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("usr/lib/deep"), 0o750);
    let owned = std::fs::metadata(dest.join("etc/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    let hard = std::fs::metadata(dest.join("hardlink")).unwrap();
    assert_ne!(
        owned.ino(),
        hard.ino(),
        "hard links arrive as separate files"
    );
    assert_eq!(
        std::fs::read_link(dest.join("dangling")).unwrap(),
        Path::new("/nowhere/at/all")
    );
}

#[tokio::test]
async fn copying_outside_the_shared_dir_fails_naming_the_path_and_writes_nothing() {
    require_root!("copying_outside_the_shared_dir_fails_naming_the_path_and_writes_nothing");
    let agent = Agent::start();
    let client = connect(&agent).await;
    let src = agent.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let outside = agent.dir.path().join("outside/rootfs");

    let err = copy_into_guest(&client, &src, &outside.to_string_lossy(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, RootfsError::Agent { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&*outside.to_string_lossy()), "{message}");
    assert!(message.contains(&*src.to_string_lossy()), "{message}");
    assert!(
        message.contains("outside the shared directory"),
        "{message}"
    );
    assert!(!agent.dir.path().join("outside").exists());
}

#[tokio::test]
async fn bind_mounts_point_at_their_guest_copies_and_other_mounts_stay() {
    require_root!("bind_mounts_point_at_their_guest_copies_and_other_mounts_stay");
    let agent = Agent::start();
    let client = connect(&agent).await;
    let host = agent.dir.path().join("sandbox");
    std::fs::create_dir_all(host.join("volume/sub")).unwrap();
    std::fs::write(host.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(host.join("volume/sub/data"), b"volume data").unwrap();
    // resolv.conf is often a symlink: the copy is of its target.
    symlink(host.join("hosts"), host.join("resolv.conf")).unwrap();

    let mount = |dest: &str, ty: &str, source: &Path, opts: &[&str]| Mount {
        destination: dest.into(),
        type_: ty.into(),
        source: source.to_string_lossy().into_owned(),
        options: opts.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    let mounts = vec![
        mount("/proc", "proc", Path::new("proc"), &["nosuid"]),
        mount("/tmp", "tmpfs", Path::new("tmpfs"), &["mode=1777"]),
        mount("/etc/hosts", "bind", &host.join("hosts"), &["rbind", "ro"]),
        mount("/etc/resolv.conf", "", &host.join("resolv.conf"), &["bind"]),
        mount("/data", "none", &host.join("volume"), &["rbind", "rw"]),
    ];
    let shared = agent.shared_dir.to_string_lossy().into_owned();
    let out = copy_bind_mounts(&client, &shared, "c1", &mounts)
        .await
        .expect("copy_bind_mounts");

    assert_eq!(out.len(), mounts.len());
    assert_eq!(out[0], mounts[0]);
    assert_eq!(out[1], mounts[1]);
    let guest = agent.shared_dir.join("c1/mounts");
    let expected_sources = [
        guest.join("2-hosts"),
        guest.join("3-hosts"),
        guest.join("4-volume"),
    ];
    for (m, (orig, source)) in out[2..]
        .iter()
        .zip(mounts[2..].iter().zip(&expected_sources))
    {
        assert_eq!(Path::new(&m.source), source);
        assert_eq!(m.destination, orig.destination);
        assert_eq!(m.type_, orig.type_);
        assert_eq!(m.options, orig.options);
    }
    assert_eq!(
        std::fs::read(guest.join("2-hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert!(!std::fs::symlink_metadata(guest.join("3-hosts"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(guest.join("4-volume/sub/data")).unwrap(),
        b"volume data"
    );
}
