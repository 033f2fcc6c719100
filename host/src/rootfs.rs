//! Copying a container's rootfs, and the files its spec bind-mounts, into
//! a VM sandbox's guest through the agent's CopyFile RPC.
//!
//! With `[sandbox] shared_fs = "none"` a VM guest cannot see the host's
//! files (Kata's "no shared filesystem" mode; the default shares them over
//! virtio-fs instead, see `shared_fs`), so before CreateContainer the shim walks the rootfs
//! on the host and recreates it below the agent's shared directory:
//! directories first, parents before children, then regular files in
//! [`CHUNK`]-sized pieces and symlinks with their targets unchanged. Modes
//! (setuid, setgid and sticky bits included) and owners are kept. Names are
//! sorted, so two copies of one tree send the same requests in the same order.
//!
//! What does not fit CopyFile:
//! - hard links arrive as separate files with the same contents;
//! - device nodes, FIFOs and sockets are skipped with a warning, as Kata
//!   skips them (the container's `/dev` comes from its spec's mounts);
//! - a file that changes size during the copy arrives as it was read: at
//!   most its size when it was opened, less if it shrank.
//!
//! A failed copy stops at the first error. The agent renames a file into
//! place only once its last chunk has arrived, so no file is ever seen half
//! written, but the files that did arrive (and a `.kestrel-partial`
//! leftover) stay in the guest's shared directory until the sandbox stops.
//! No container exists yet at that point, because the shim calls
//! CreateContainer only after a complete copy, and a single-container
//! sandbox is stopped when its create fails. The agent deletes
//! `<shared>/<container_id>` on RemoveContainer, so a pod's removed
//! container leaves nothing in the guest either.
//!
//! Bind-mounted files are copied once, when the container is created: later
//! changes on the host do not reach the guest, and writes in the guest do
//! not come back.
//!
//! The tree is read with `std::fs` on tokio's blocking pool, so that a big
//! rootfs on a slow disk does not stall the runtime's other tasks.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kestrel_protocols::agent::CopyFileRequest;
use kestrel_protocols::oci::Mount;

use crate::agent_client::{AgentClient, AgentError};

pub use kestrel_protocols::GUEST_SHARED_DIR;

/// Bytes of file data per CopyFile request. ttrpc 0.10 refuses messages
/// over 4 MiB (`MESSAGE_LENGTH_MAX`); 1 MiB leaves room for the path and
/// the framing, and keeps one request short next to the agent's timeout.
pub const CHUNK: usize = 1 << 20;

/// Mode of the directories the agent creates above the copied tree
/// (`<shared>/<container_id>`, `.../mounts`); Kata uses 0750 too.
const PARENT_DIR_MODE: u32 = 0o750;

/// Where a container's rootfs lives in the guest, below the agent's shared
/// dir: `<shared>/<container_id>/rootfs`. The agent takes a relative
/// `root.path` below `<shared>/<container_id>`, so a spec may also say
/// `rootfs`.
pub fn guest_rootfs_path(guest_shared_dir: &str, container_id: &str) -> String {
    format!(
        "{}/{container_id}/rootfs",
        guest_shared_dir.trim_end_matches('/')
    )
}

/// Where the `index`-th mount of a container, a bind mount of a file or
/// directory named `basename`, is copied to in the guest.
fn guest_mount_path(
    guest_shared_dir: &str,
    container_id: &str,
    index: usize,
    basename: &str,
) -> String {
    format!(
        "{}/{container_id}/mounts/{index}-{basename}",
        guest_shared_dir.trim_end_matches('/')
    )
}

/// What a copy has sent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files completed (each name of a hard-linked file counts).
    pub files: u64,
    /// Directories created, the copied tree's top included.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Device nodes, FIFOs and sockets left out.
    pub skipped: u64,
    /// Bytes of file data sent.
    pub bytes: u64,
}

/// Why a copy into the guest stopped.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The tree to copy is not a directory.
    #[error("{}: not a directory, cannot copy it as a rootfs", path.display())]
    NotADirectory { path: PathBuf },
    /// Reading the host's tree failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// CopyFile carries paths and symlink targets as protobuf strings.
    #[error("{}: its name or symlink target is not UTF-8, which CopyFile cannot carry", path.display())]
    NotUtf8 { path: PathBuf },
    /// CopyFile carries owners as int32.
    #[error("{}: owner id {id} does not fit CopyFile's int32 uid/gid", path.display())]
    IdOutOfRange { path: PathBuf, id: u32 },
    /// The id would not make a single directory below the shared dir.
    #[error(transparent)]
    InvalidContainerId(#[from] kestrel_protocols::id::IdError),
    /// A bind mount's source must be absolute: runc would resolve a
    /// relative one against the bundle, which this module does not know.
    #[error("bind mount of {path:?} on {destination}: the source must be an absolute path")]
    RelativeBindSource { path: String, destination: String },
    /// The agent refused a request, or did not answer it.
    #[error("copying {} to {guest} in the guest: {source}", path.display())]
    Agent {
        path: PathBuf,
        guest: String,
        #[source]
        source: AgentError,
    },
    /// A blocking read on tokio's pool panicked or was cancelled.
    #[error("reading {}: the blocking task failed: {source}", path.display())]
    Blocking {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A progress callback; `Sync` so that a copy can run in a spawned task.
pub type Progress<'a> = &'a (dyn Fn(&CopyStats) + Sync);

/// What one host path becomes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink(String),
    /// A device node, FIFO or socket: named for the warning.
    Special(&'static str),
}

/// One host path and where it goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    host: PathBuf,
    guest: String,
    kind: Kind,
    /// `st_mode`: file type and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Entry {
    fn new(host: PathBuf, guest: String, meta: &std::fs::Metadata) -> Result<Entry, RootfsError> {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&host).map_err(|source| RootfsError::Read {
                path: host.clone(),
                source,
            })?;
            let target = target
                .into_os_string()
                .into_string()
                .map_err(|_| RootfsError::NotUtf8 { path: host.clone() })?;
            Kind::Symlink(target)
        } else {
            Kind::Special(if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else {
                "character device"
            })
        };
        Ok(Entry {
            host,
            guest,
            kind,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

/// Lists `source` and everything below it, without following symlinks:
/// every directory (each after its parent) and then everything else, names
/// sorted within each directory.
fn walk(source: &Path, dest: &str) -> Result<Vec<Entry>, RootfsError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Read { path, source }
    };
    let meta = std::fs::symlink_metadata(source).map_err(read_err(source))?;
    if !meta.is_dir() {
        return Err(RootfsError::NotADirectory {
            path: source.to_path_buf(),
        });
    }
    let dest = dest.trim_end_matches('/').to_string();
    let mut dirs = vec![Entry::new(source.to_path_buf(), dest.clone(), &meta)?];
    let mut others = Vec::new();
    // An explicit stack: a deep tree must not overflow a pool thread's stack.
    let mut pending = vec![(source.to_path_buf(), dest)];
    while let Some((host_dir, guest_dir)) = pending.pop() {
        let mut names = std::fs::read_dir(&host_dir)
            .and_then(|it| {
                it.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(read_err(&host_dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let host = host_dir.join(&name);
            let name = name
                .to_str()
                .ok_or_else(|| RootfsError::NotUtf8 { path: host.clone() })?;
            let guest = format!("{guest_dir}/{name}");
            let meta = std::fs::symlink_metadata(&host).map_err(read_err(&host))?;
            let entry = Entry::new(host, guest, &meta)?;
            if entry.kind == Kind::Dir {
                subdirs.push((entry.host.clone(), entry.guest.clone()));
                dirs.push(entry);
            } else {
                others.push(entry);
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    dirs.append(&mut others);
    Ok(dirs)
}

/// Copies `source` (a directory) to `dest` in the guest, which must lie
/// below the agent's shared directory (see [`guest_rootfs_path`]), calling
/// `progress` after every request. Stops at the first error.
pub async fn copy_into_guest(
    agent: &AgentClient,
    source: &Path,
    dest: &str,
    progress: Option<Progress<'_>>,
) -> Result<CopyStats, RootfsError> {
    let entries = blocking(source, {
        let (source, dest) = (source.to_path_buf(), dest.to_string());
        move || walk(&source, &dest)
    })
    .await??;
    let mut stats = CopyStats::default();
    for entry in &entries {
        copy_entry(agent, entry, &mut stats, progress).await?;
    }
    Ok(stats)
}

/// Copies the sources of a spec's bind mounts of regular files and
/// directories (CRI's `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`,
/// volumes) to `<shared>/<container_id>/mounts/<index>-<basename>` in the
/// guest, and returns the mounts with those guest paths as their sources.
/// Other mounts (proc, tmpfs, sysfs, devpts, mqueue, cgroup, and binds of
/// device nodes, which the guest has its own of) pass unchanged. Sources
/// must be absolute (containerd and CRI give absolute ones).
pub async fn copy_bind_mounts(
    agent: &AgentClient,
    guest_shared_dir: &str,
    container_id: &str,
    mounts: &[Mount],
) -> Result<Vec<Mount>, RootfsError> {
    kestrel_protocols::id::validate("container id", container_id)?;
    let mut out = Vec::with_capacity(mounts.len());
    for (index, mount) in mounts.iter().enumerate() {
        if !is_bind(mount) {
            out.push(mount.clone());
            continue;
        }
        let source = Path::new(&mount.source);
        if !source.is_absolute() {
            return Err(RootfsError::RelativeBindSource {
                path: mount.source.clone(),
                destination: mount.destination.clone(),
            });
        }
        // mount(2) follows symlinks (resolv.conf often is one): copy what
        // the bind would have shown.
        let (real, meta) = blocking(source, {
            let source = source.to_path_buf();
            move || {
                let real = std::fs::canonicalize(&source)?;
                let meta = std::fs::metadata(&real)?;
                Ok::<_, io::Error>((real, meta))
            }
        })
        .await?
        .map_err(|e| RootfsError::Read {
            path: source.to_path_buf(),
            source: e,
        })?;
        if !meta.is_dir() && !meta.is_file() {
            tracing::warn!(
                container_id,
                source = %mount.source,
                destination = %mount.destination,
                "bind mount of neither a file nor a directory: left to the guest's own"
            );
            out.push(mount.clone());
            continue;
        }
        let basename = match real.file_name() {
            Some(name) => name
                .to_str()
                .ok_or_else(|| RootfsError::NotUtf8 { path: real.clone() })?,
            None => "root",
        };
        let guest = guest_mount_path(guest_shared_dir, container_id, index, basename);
        if meta.is_dir() {
            copy_into_guest(agent, &real, &guest, None).await?;
        } else {
            let entry = Entry::new(real, guest.clone(), &meta)?;
            copy_entry(agent, &entry, &mut CopyStats::default(), None).await?;
        }
        let mut rewritten = mount.clone();
        rewritten.source = guest;
        out.push(rewritten);
    }
    Ok(out)
}

/// A bind mount as runc reads one: the type says so, or an option does.
pub(crate) fn is_bind(mount: &Mount) -> bool {
    mount.type_ == "bind" || mount.options.iter().any(|o| o == "bind" || o == "rbind")
}

async fn copy_entry(
    agent: &AgentClient,
    entry: &Entry,
    stats: &mut CopyStats,
    progress: Option<Progress<'_>>,
) -> Result<(), RootfsError> {
    let report = |stats: &CopyStats| {
        if let Some(progress) = progress {
            progress(stats);
        }
    };
    match &entry.kind {
        Kind::Dir => {
            send(agent, entry, request(entry, 0, 0, Vec::new())?).await?;
            stats.dirs += 1;
        }
        Kind::Symlink(target) => {
            let data = target.as_bytes().to_vec();
            let size = data.len() as i64;
            send(agent, entry, request(entry, size, 0, data)?).await?;
            stats.symlinks += 1;
        }
        Kind::Special(what) => {
            tracing::warn!(path = %entry.host.display(), kind = what, "skipping a {what}: CopyFile cannot create one in the guest");
            stats.skipped += 1;
        }
        Kind::File => {
            copy_regular_file(agent, entry, stats, &report).await?;
            stats.files += 1;
        }
    }
    report(stats);
    Ok(())
}

/// Sends a regular file in chunks, reporting each chunk but the last (the
/// caller reports the finished file).
async fn copy_regular_file(
    agent: &AgentClient,
    entry: &Entry,
    stats: &mut CopyStats,
    report: &(dyn Fn(&CopyStats) + Sync),
) -> Result<(), RootfsError> {
    let (file, size) = blocking(&entry.host, {
        let path = entry.host.clone();
        move || {
            // NONBLOCK: should a FIFO have replaced the file since the walk,
            // opening it must not wait for a writer.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::other(
                    "no longer a regular file: it changed during the copy",
                ));
            }
            Ok((Arc::new(file), meta.len()))
        }
    })
    .await?
    .map_err(|source| RootfsError::Read {
        path: entry.host.clone(),
        source,
    })?;
    let mut offset = 0u64;
    loop {
        let want = CHUNK.min(usize::try_from(size - offset).unwrap_or(CHUNK));
        let data = blocking(&entry.host, {
            let file = Arc::clone(&file);
            move || read_at(&file, offset, want)
        })
        .await?
        .map_err(|source| RootfsError::Read {
            path: entry.host.clone(),
            source,
        })?;
        let len = data.len() as u64;
        // A file that shrank ends here: the agent completes a file when a
        // chunk reaches file_size, so the last request names the real size.
        let file_size = if data.len() < want {
            offset + len
        } else {
            size
        };
        send(
            agent,
            entry,
            request(entry, file_size as i64, offset as i64, data)?,
        )
        .await?;
        offset += len;
        stats.bytes += len;
        if offset >= file_size {
            return Ok(());
        }
        report(stats);
    }
}

/// Up to `len` bytes at `offset`; fewer only at the end of the file.
fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn request(
    entry: &Entry,
    file_size: i64,
    offset: i64,
    data: Vec<u8>,
) -> Result<CopyFileRequest, RootfsError> {
    let id = |id: u32| {
        i32::try_from(id).map_err(|_| RootfsError::IdOutOfRange {
            path: entry.host.clone(),
            id,
        })
    };
    Ok(CopyFileRequest {
        path: entry.guest.clone(),
        file_size,
        file_mode: entry.mode,
        dir_mode: PARENT_DIR_MODE,
        uid: id(entry.uid)?,
        gid: id(entry.gid)?,
        offset,
        data,
        ..Default::default()
    })
}

async fn send(agent: &AgentClient, entry: &Entry, req: CopyFileRequest) -> Result<(), RootfsError> {
    agent
        .copy_file(req)
        .await
        .map_err(|source| RootfsError::Agent {
            path: entry.host.clone(),
            guest: entry.guest.clone(),
            source,
        })
}

/// Runs blocking file-system work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RootfsError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| RootfsError::Blocking {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn guest_paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.guest.as_str()).collect()
    }

    #[test]
    fn guest_rootfs_path_is_below_the_containers_shared_directory() {
        assert_eq!(
            guest_rootfs_path(GUEST_SHARED_DIR, "c1"),
            "/run/kestrel/shared/c1/rootfs"
        );
        assert_eq!(guest_rootfs_path("/shared/", "c1"), "/shared/c1/rootfs");
    }

    #[test]
    fn bind_mount_copies_are_named_by_index_and_basename() {
        assert_eq!(
            guest_mount_path(GUEST_SHARED_DIR, "c1", 3, "hosts"),
            "/run/kestrel/shared/c1/mounts/3-hosts"
        );
    }

    #[test]
    fn walk_lists_directories_parents_first_then_the_rest_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        for d in ["b/inner", "a"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        for f in ["z", "b/inner/f", "b/e", "a/x"] {
            std::fs::write(src.join(f), f).unwrap();
        }
        symlink("z", src.join("link")).unwrap();
        let entries = walk(src, "/g/").unwrap();
        assert_eq!(
            guest_paths(&entries),
            [
                "/g",
                "/g/a",
                "/g/b",
                "/g/b/inner",
                "/g/link",
                "/g/z",
                "/g/a/x",
                "/g/b/e",
                "/g/b/inner/f",
            ]
        );
        assert_eq!(entries[4].kind, Kind::Symlink("z".into()));
        assert_eq!(entries[5].kind, Kind::File);
        assert_eq!(entries[5].mode & libc::S_IFMT, libc::S_IFREG);
    }

    #[test]
    fn walk_never_follows_a_symlink_to_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("elsewhere/secret"), "x").unwrap();
        std::fs::create_dir(&src).unwrap();
        symlink(dir.path().join("elsewhere"), src.join("out")).unwrap();
        let entries = walk(&src, "/g").unwrap();
        assert_eq!(guest_paths(&entries), ["/g", "/g/out"]);
        assert!(matches!(entries[1].kind, Kind::Symlink(_)));
    }

    #[test]
    fn walk_names_fifos_and_sockets_for_skipping() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let entries = walk(dir.path(), "/g").unwrap();
        let kinds: Vec<_> = entries.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            [Kind::Dir, Kind::Special("FIFO"), Kind::Special("socket")]
        );
    }

    #[test]
    fn walk_of_a_file_says_it_is_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let err = walk(&file, "/g").unwrap_err();
        assert!(matches!(err, RootfsError::NotADirectory { .. }), "{err}");
        assert!(err.to_string().contains(&*file.to_string_lossy()), "{err}");
    }

    #[test]
    fn read_at_returns_fewer_bytes_only_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_at(&file, 2, 4).unwrap(), b"2345");
        assert_eq!(read_at(&file, 8, 4).unwrap(), b"89");
        assert_eq!(read_at(&file, 10, 4).unwrap(), b"");
    }

    #[test]
    fn bind_mounts_are_recognised_by_type_or_option() {
        let mount = |ty: &str, opts: &[&str]| Mount {
            type_: ty.into(),
            options: opts.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        };
        assert!(is_bind(&mount("bind", &[])));
        assert!(is_bind(&mount("none", &["rbind", "ro"])));
        assert!(is_bind(&mount("", &["bind"])));
        assert!(!is_bind(&mount("proc", &["nosuid"])));
        assert!(!is_bind(&mount("tmpfs", &["mode=755"])));
    }

    #[test]
    fn copy_futures_can_run_in_a_spawned_task() {
        fn assert_send<T: Send>(_: T) {}
        let _ = |agent: &AgentClient, progress: Progress<'_>| {
            assert_send(copy_into_guest(agent, Path::new("/"), "/g", Some(progress)));
            assert_send(copy_bind_mounts(agent, "/g", "c1", &[]));
        };
    }
}
