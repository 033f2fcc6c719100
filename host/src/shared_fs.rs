//! A VM sandbox's shared directory on the host: what the guest mounts over
//! virtio-fs, and how each container's rootfs and bind-mounted files get
//! into it without being copied (Kata's shared filesystem).
//!
//! Layout, below the sandbox's state directory (so nothing outlives the
//! sandbox, and the state directory's removal never crosses a mount:
//! [`kestrel_hypervisor::state_dir::remove`] refuses one):
//!
//! ```text
//! <state_dir>/shared/                       virtiofsd serves this, tag `kataShared`
//!   <container id>/rootfs                   recursive bind of the container's rootfs
//!   <container id>/mounts/<n>-<basename>    bind of the n-th spec mount's source
//! ```
//!
//! The guest sees `<state_dir>/shared` at [`GUEST_DIR`]; the container's
//! spec is rewritten to name those guest paths (`root.path`, each shared
//! mount's `source`). Each container owns one directory, so no id, index
//! or basename of one container can name another's file.
//!
//! The guest can write the shared directory itself (virtio-fs has no
//! per-path read-only), so the host never resolves a path through it by
//! name: every directory the host makes is created exclusively and opened
//! without following symlinks, and later steps (the next directory, the
//! mount, the unmount, the removal) go through that open descriptor
//! (`/proc/self/fd/N/<name>`), as the agent pins its storages. A guest that
//! renames or swaps a directory meanwhile can at worst make a step fail; it
//! cannot steer a mount or a removal outside the shared directory.
//!
//! Binds are private (no propagation to or from the source's peers), and
//! read-only on the host when the spec mount says `ro`, so the guest cannot
//! write a read-only volume even by remounting it. A [`SharedContainer`]
//! undoes what it made when dropped: the container's teardown, or a create
//! that failed midway. Whatever is still mounted when the sandbox stops, or
//! when `delete` cleans up after a crashed shim, goes with [`unmount_all`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kestrel_hypervisor::{FsCache, SharedFs};
use kestrel_protocols::agent::Storage;
use kestrel_protocols::oci;
use nix::mount::{MntFlags, MsFlags};

use crate::rootfs::is_bind;

/// The virtio-fs tag the guest mounts the shared directory by (Kata's).
pub const TAG: &str = "kataShared";
/// Where the guest mounts the shared directory (Kata's), which the agent
/// accepts as the root of a `root.path` and of bind sources.
pub const GUEST_DIR: &str = "/run/kata-containers/shared/containers";
/// The shared directory's name in the sandbox's state directory.
const DIR_NAME: &str = "shared";
/// The longest file name Linux takes; a mount's name is cut to fit.
const NAME_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum SharedFsError {
    #[error(transparent)]
    InvalidContainerId(#[from] kestrel_protocols::id::IdError),
    /// runc would resolve a relative source against the bundle, which
    /// sharing does not know.
    #[error("bind mount of {source_path:?} on {destination}: the source must be an absolute path")]
    RelativeBindSource {
        source_path: String,
        destination: String,
    },
    #[error("bind mount of {} on {destination}: its name is not UTF-8, which the OCI spec cannot carry", path.display())]
    NotUtf8 { path: PathBuf, destination: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The shared directory of the sandbox whose state directory is `state_dir`.
pub fn host_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR_NAME)
}

/// What the backend shares for the sandbox in `state_dir`.
///
/// Cache `auto`: the guest keeps file data only while a file stays open
/// and attributes and names for a second, and writes go straight through
/// (no writeback cache). A rootfs, read over and over as a container
/// starts, is then served mostly from the guest's cache, while a volume's
/// changes still cross at once: the guest's writes are on the host when
/// `write` returns, and a file the host changed is read afresh when the
/// guest next opens it (a name or size the guest already looked up may
/// lag by up to that second).
pub fn spec(state_dir: &Path) -> SharedFs {
    SharedFs {
        dir: host_dir(state_dir),
        tag: TAG.into(),
        cache: FsCache::Auto,
    }
}

/// The storage CreateSandbox asks the agent to mount: the shared
/// directory at [`GUEST_DIR`], as Kata's runtime sends it.
pub fn storage() -> Storage {
    Storage {
        driver: "virtio-fs".into(),
        source: TAG.into(),
        fstype: "virtiofs".into(),
        mount_point: format!("{GUEST_DIR}/"),
        ..Default::default()
    }
}

/// Creates the shared directory (the backend's virtiofsd needs it before
/// the sandbox is prepared); only root may enter it. An empty one left by
/// an earlier sandbox of the same id is reused; anything else there is
/// refused.
pub fn create_dir(state_dir: &Path) -> Result<PathBuf, SharedFsError> {
    let dir = host_dir(state_dir);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let empty = open_dir(&dir)
                .and_then(|_| std::fs::read_dir(&dir))
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(io_err("creating", &dir)(e));
            }
        }
        created => created.map_err(io_err("creating", &dir))?,
    }
    Ok(dir)
}

/// Unmounts everything mounted at or below `dir`, deepest first, never
/// following a symlink in the last component; a mount another one covered
/// goes in a later round. Returns what is still mounted afterwards (empty
/// when all went).
pub fn unmount_all(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..4 {
        let points = kestrel_hypervisor::state_dir::mounts_below(dir);
        if points.is_empty() {
            return points;
        }
        for point in points {
            let flags = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
            if let Err(e) = nix::mount::umount2(&point, flags) {
                tracing::debug!(mount_point = %point.display(), error = %e, "unmounting below the shared directory");
            }
        }
    }
    kestrel_hypervisor::state_dir::mounts_below(dir)
}

/// What one container has in the shared directory; unmounted and removed
/// when dropped.
#[derive(Debug)]
pub struct SharedContainer {
    id: String,
    /// The shared directory, the container's directory in it, and its
    /// `mounts` directory once made: every later step goes through these.
    shared: File,
    own: Option<File>,
    mounts_dir: Option<File>,
    /// What was made below `own`, in order: each name relative to `own`,
    /// and whether something is mounted on it.
    made: Vec<Made>,
}

#[derive(Debug)]
struct Made {
    /// `rootfs`, `mounts` or `mounts/<n>-<basename>`.
    name: String,
    is_dir: bool,
    mounted: bool,
}

/// A path that names `name` in the directory `dir` is open on, whatever
/// has become of the path `dir` was opened by.
fn at(dir: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SharedFsError {
    let path = path.to_path_buf();
    move |source| SharedFsError::Io { what, path, source }
}

/// Opens the directory `path` without following a symlink at its end.
fn open_dir(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The `ro`/`rw` option that comes last decides, as for mount(8).
fn read_only(options: &[String]) -> bool {
    options
        .iter()
        .rev()
        .find_map(|o| match o.as_str() {
            "ro" => Some(true),
            "rw" => Some(false),
            _ => None,
        })
        .unwrap_or(false)
}

/// `<n>-<basename>`, cut (at a character boundary) to a file name's limit.
fn mount_name(index: usize, basename: &str) -> String {
    let mut name = format!("{index}-{basename}");
    if name.len() > NAME_MAX {
        let mut end = NAME_MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

impl SharedContainer {
    /// Shares container `id`'s rootfs (`spec.root.path`, an absolute host
    /// path) and the sources of its bind mounts of files and directories
    /// through `shared` (the sandbox's shared directory), and points the
    /// spec at their guest paths. Other mounts (proc, tmpfs, binds of
    /// device nodes, which the guest has its own of) stay as they are. On
    /// failure, nothing it made is left.
    pub fn share(
        shared: &Path,
        id: &str,
        spec: &mut oci::Spec,
    ) -> Result<SharedContainer, SharedFsError> {
        kestrel_protocols::id::validate("container id", id)?;
        let mut made = SharedContainer {
            id: id.into(),
            shared: open_dir(shared).map_err(io_err("opening", shared))?,
            own: None,
            mounts_dir: None,
            made: Vec::new(),
        };
        made.make_own_dir()?;
        let host_root = PathBuf::from(&spec.Root.mut_or_insert_default().Path);
        made.bind("rootfs", &host_root, true, true, false)?;
        spec.Root.mut_or_insert_default().Path = format!("{GUEST_DIR}/{id}/rootfs");
        for (index, mount) in spec.Mounts.iter_mut().enumerate() {
            if is_bind(mount) {
                made.share_mount(index, mount)?;
            }
        }
        tracing::info!(
            container_id = id,
            mounts = made.made.iter().filter(|m| m.mounted).count(),
            "rootfs and volumes shared with the VM"
        );
        Ok(made)
    }

    fn own(&self) -> &File {
        self.own.as_ref().expect("made first")
    }

    fn make_own_dir(&mut self) -> Result<(), SharedFsError> {
        let path = at(&self.shared, &self.id);
        // Exclusive: a directory already there (a leftover, or one the
        // guest made) is never adopted.
        std::fs::DirBuilder::new()
            .mode(0o750)
            .create(&path)
            .map_err(io_err("creating", &path))?;
        self.own = Some(open_dir(&path).map_err(io_err("opening", &path))?);
        Ok(())
    }

    fn share_mount(&mut self, index: usize, mount: &mut oci::Mount) -> Result<(), SharedFsError> {
        let source = Path::new(&mount.source);
        if !source.is_absolute() {
            return Err(SharedFsError::RelativeBindSource {
                source_path: mount.source.clone(),
                destination: mount.destination.clone(),
            });
        }
        // mount(2) follows symlinks (resolv.conf often is one): share what
        // the bind would have shown, named after it.
        let real = std::fs::canonicalize(source).map_err(io_err("resolving", source))?;
        let meta = std::fs::metadata(&real).map_err(io_err("inspecting", &real))?;
        if !meta.is_dir() && !meta.is_file() {
            tracing::warn!(
                container_id = %self.id,
                source = %mount.source,
                destination = %mount.destination,
                "bind mount of neither a file nor a directory: left to the guest's own"
            );
            return Ok(());
        }
        let basename = match real.file_name() {
            Some(name) => name.to_str().ok_or_else(|| SharedFsError::NotUtf8 {
                path: real.clone(),
                destination: mount.destination.clone(),
            })?,
            None => "root",
        };
        let name = mount_name(index, basename);
        if self.mounts_dir.is_none() {
            let path = at(self.own(), "mounts");
            std::fs::DirBuilder::new()
                .mode(0o750)
                .create(&path)
                .map_err(io_err("creating", &path))?;
            self.made.push(Made {
                name: "mounts".into(),
                is_dir: true,
                mounted: false,
            });
            self.mounts_dir = Some(open_dir(&path).map_err(io_err("opening", &path))?);
        }
        let recursive = mount.options.iter().any(|o| o == "rbind");
        self.bind(
            &format!("mounts/{name}"),
            &real,
            meta.is_dir(),
            recursive,
            read_only(&mount.options),
        )?;
        mount.source = format!("{GUEST_DIR}/{}/mounts/{name}", self.id);
        Ok(())
    }

    /// Makes the mount point `name` below the container's directory (a
    /// directory, or an empty file for a file) and binds `source` on it.
    fn bind(
        &mut self,
        name: &str,
        source: &Path,
        is_dir: bool,
        recursive: bool,
        read_only: bool,
    ) -> Result<(), SharedFsError> {
        let (dir, leaf) = match name.split_once('/') {
            Some((_, leaf)) => (self.mounts_dir.as_ref().expect("made first"), leaf),
            None => (self.own(), name),
        };
        let target = at(dir, leaf);
        let created = if is_dir {
            std::fs::DirBuilder::new().mode(0o755).create(&target)
        } else {
            // O_EXCL: never a file that was there, nor a symlink's target.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&target)
                .map(drop)
        };
        created.map_err(io_err("creating the mount point", &target))?;
        self.made.push(Made {
            name: name.into(),
            is_dir,
            mounted: false,
        });
        let mut flags = MsFlags::MS_BIND;
        if recursive {
            flags |= MsFlags::MS_REC;
        }
        nix::mount::mount(Some(source), &target, None::<&str>, flags, None::<&str>)
            .map_err(|e| io_err("bind-mounting", source)(e.into()))?;
        self.made.last_mut().expect("pushed above").mounted = true;
        // The mount now covers the mount point: a fresh open of the name
        // reaches the mount's root, which is what the changes below apply
        // to (the covered directory's descriptor would reach its parent's).
        let mounted = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&target)
            .map_err(io_err("opening the mount", &target))?;
        let root = PathBuf::from(format!("/proc/self/fd/{}", mounted.as_raw_fd()));
        let private = if recursive {
            MsFlags::MS_PRIVATE | MsFlags::MS_REC
        } else {
            MsFlags::MS_PRIVATE
        };
        nix::mount::mount(None::<&str>, &root, None::<&str>, private, None::<&str>)
            .map_err(|e| io_err("making private", &target)(e.into()))?;
        if read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            nix::mount::mount(None::<&str>, &root, None::<&str>, flags, None::<&str>)
                .map_err(|e| io_err("making read-only", &target)(e.into()))?;
        }
        Ok(())
    }
}

impl Drop for SharedContainer {
    fn drop(&mut self) {
        let Some(own) = &self.own else { return };
        let mut kept = false;
        for made in self.made.iter().rev() {
            let (dir, leaf) = match made.name.split_once('/') {
                Some((_, leaf)) => match &self.mounts_dir {
                    Some(dir) => (dir, leaf),
                    None => continue,
                },
                None => (own, made.name.as_str()),
            };
            let path = at(dir, leaf);
            if made.mounted {
                let flags = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
                if let Err(e) = nix::mount::umount2(&path, flags) {
                    // The sandbox's stop unmounts whatever is left.
                    tracing::warn!(container_id = %self.id, mount = %made.name, error = %e, "unmounting a shared mount");
                    kept = true;
                    continue;
                }
            }
            let removed = if made.is_dir {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(container_id = %self.id, path = %made.name, error = %e, "removing a shared mount point");
                    kept = true;
                }
            }
        }
        if kept {
            return;
        }
        if let Err(e) = std::fs::remove_dir(at(&self.shared, &self.id)) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(container_id = %self.id, error = %e, "removing the container's shared directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_of_ro_and_rw_decides() {
        let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(read_only(&opts(&["rbind", "ro"])));
        assert!(!read_only(&opts(&["ro", "rw"])));
        assert!(read_only(&opts(&["rw", "nosuid", "ro"])));
        assert!(!read_only(&opts(&["rbind"])));
    }

    #[test]
    fn mount_names_fit_a_file_name_and_keep_whole_characters() {
        assert_eq!(mount_name(3, "hosts"), "3-hosts");
        let long = "é".repeat(200);
        let name = mount_name(12, &long);
        assert!(name.len() <= NAME_MAX);
        assert!(name.starts_with("12-é"));
        assert!(name.is_char_boundary(name.len()));
    }

    #[test]
    fn the_storage_is_the_one_kata_sends() {
        let s = storage();
        assert_eq!(
            (
                s.driver.as_str(),
                s.source.as_str(),
                s.fstype.as_str(),
                s.mount_point.as_str()
            ),
            (
                "virtio-fs",
                "kataShared",
                "virtiofs",
                "/run/kata-containers/shared/containers/"
            )
        );
        assert!(s.options.is_empty());
        assert!(spec(Path::new("/s/sb")).tag_is_valid());
        assert_eq!(spec(Path::new("/s/sb")).dir, Path::new("/s/sb/shared"));
    }

    fn is_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipping: needs root to bind-mount");
        }
        root
    }

    fn bind(dest: &str, source: &Path, options: &[&str]) -> oci::Mount {
        oci::Mount {
            destination: dest.into(),
            type_: "bind".into(),
            source: source.to_string_lossy().into_owned(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rootfs_and_volumes_are_bound_rewritten_and_undone_on_drop() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("sb/shared");
        std::fs::create_dir_all(&shared).unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::write(volume.join("data"), b"v").unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
        std::os::unix::fs::symlink(&hosts, tmp.path().join("resolv.conf")).unwrap();

        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = rootfs.display().to_string();
        spec.Mounts = vec![
            oci::Mount {
                destination: "/proc".into(),
                type_: "proc".into(),
                source: "proc".into(),
                ..Default::default()
            },
            bind("/data", &volume, &["rbind", "rw"]),
            bind("/etc/hosts", &hosts, &["rbind", "ro"]),
            bind(
                "/etc/resolv.conf",
                &tmp.path().join("resolv.conf"),
                &["bind"],
            ),
        ];
        let shared_c = SharedContainer::share(&shared, "c1", &mut spec).unwrap();

        assert_eq!(
            spec.Root.Path,
            "/run/kata-containers/shared/containers/c1/rootfs"
        );
        let sources: Vec<&str> = spec.Mounts.iter().map(|m| m.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/kata-containers/shared/containers/c1/mounts/1-volume",
                "/run/kata-containers/shared/containers/c1/mounts/2-hosts",
                "/run/kata-containers/shared/containers/c1/mounts/3-hosts",
            ]
        );
        assert!(shared.join("c1/rootfs/bin").is_dir());
        std::fs::write(shared.join("c1/mounts/1-volume/new"), b"n").unwrap();
        assert_eq!(std::fs::read(volume.join("new")).unwrap(), b"n");
        let ro = std::fs::write(shared.join("c1/mounts/2-hosts"), b"x").unwrap_err();
        assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");
        assert_eq!(
            std::fs::read(shared.join("c1/mounts/3-hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        assert_eq!(
            kestrel_hypervisor::state_dir::mounts_below(&shared).len(),
            4
        );

        drop(shared_c);
        assert!(kestrel_hypervisor::state_dir::mounts_below(&shared).is_empty());
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
        assert!(rootfs.join("bin").is_dir());
        assert_eq!(std::fs::read(volume.join("data")).unwrap(), b"v");
        assert_eq!(
            std::fs::read(&hosts).unwrap(),
            b"127.0.0.1 localhost\n",
            "the source is untouched"
        );
    }

    #[test]
    fn a_failure_midway_leaves_nothing_and_a_taken_id_is_never_adopted() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = rootfs.display().to_string();
        spec.Mounts = vec![
            bind("/data", &volume, &["rbind"]),
            bind("/missing", &tmp.path().join("nowhere"), &["rbind"]),
        ];
        let err = SharedContainer::share(&shared, "c1", &mut spec).unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
        assert!(kestrel_hypervisor::state_dir::mounts_below(&shared).is_empty());
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);

        // Something the guest could have put there: a symlink out.
        std::os::unix::fs::symlink(tmp.path(), shared.join("c2")).unwrap();
        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = rootfs.display().to_string();
        let err = SharedContainer::share(&shared, "c2", &mut spec).unwrap_err();
        assert!(
            matches!(&err, SharedFsError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert!(!tmp.path().join("rootfs/rootfs").exists());
        assert!(kestrel_hypervisor::state_dir::mounts_below(tmp.path()).is_empty());

        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = rootfs.display().to_string();
        spec.Mounts = vec![bind("/x", Path::new("relative/dir"), &["bind"])];
        let err = SharedContainer::share(&shared, "c3", &mut spec).unwrap_err();
        assert!(
            matches!(err, SharedFsError::RelativeBindSource { .. }),
            "{err}"
        );
        assert!(!shared.join("c3").exists());
        assert!(SharedContainer::share(&shared, "../c4", &mut spec).is_err());
    }

    #[test]
    fn unmount_all_takes_every_mount_below_deepest_first() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        let source = tmp.path().join("src");
        std::fs::create_dir_all(shared.join("a")).unwrap();
        std::fs::create_dir_all(source.join("inner")).unwrap();
        let bind = |src: &Path, dst: &Path| {
            nix::mount::mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap()
        };
        bind(&source, &shared.join("a"));
        bind(&source, &shared.join("a/inner"));
        bind(&source, &shared.join("a"));
        assert_eq!(
            kestrel_hypervisor::state_dir::mounts_below(&shared).len(),
            3
        );
        assert!(unmount_all(&shared).is_empty());
        assert!(source.join("inner").is_dir());
    }
}
