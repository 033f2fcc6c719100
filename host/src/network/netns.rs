//! Named, persistent network namespaces, made the way `ip netns add` makes
//! them: a new namespace held open by a bind mount of its `/proc` file on
//! an empty file, here under [`DEFAULT_DIR`]. CNI plugins and the sandbox
//! (the `process` backend's agent, a VM backend's tap device) open that
//! file; the namespace lives until [`remove`] unmounts it and no process
//! is left in it.
//!
//! Hand-written rather than shelling out to `ip netns`: it is a dozen
//! system calls, and `ip` would put the namespace under `/run/netns`, where
//! other tools list and remove what they find. The namespace is made on a
//! thread of its own that ends afterwards, so no thread of the caller ever
//! changes namespace (unshare(2) of `CLONE_NEWNET` affects only the calling
//! thread).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where kestrel keeps its network namespaces.
pub const DEFAULT_DIR: &str = "/run/kestrel/netns";

/// How a namespace's file name starts; [`name_for`] adds a hash.
const NAME_PREFIX: &str = "kestrel-";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {}: already exists", .0.display())]
    Exists(PathBuf),
    #[error("{0:?} is not a network namespace name (letters, digits, '-', '_' and '.' only)")]
    BadName(String),
    #[error("the thread making network namespace {} panicked", .0.display())]
    ThreadPanicked(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetnsError {
    let path = path.to_path_buf();
    move |source| NetnsError::Io { what, path, source }
}

fn errno(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> NetnsError {
    let path = path.to_path_buf();
    move |e| NetnsError::Io {
        what,
        path,
        source: e.into(),
    }
}

/// The name of the namespace of whatever `key` names uniquely (for the
/// CLI, a container's directory): `kestrel-` and 16 hex digits of the key's
/// SHA-256. The key never reaches the path itself, so no id, however it
/// is spelt, names a file outside the namespace directory, and two CLI
/// roots holding the same container id get different namespaces.
pub fn name_for(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{NAME_PREFIX}{hash}")
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_string()))
    }
}

/// Makes network namespace `name` in `dir`, with its loopback up, and
/// returns its path. Nothing is left behind when it fails.
pub fn create(dir: &Path, name: &str) -> Result<PathBuf, NetnsError> {
    check_name(name)?;
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    make_shared(dir)?;
    let path = dir.join(name);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists(path))
        }
        Err(e) => return Err(io("creating", &path)(e)),
    }
    let made = {
        let pinned = path.clone();
        std::thread::Builder::new()
            .name("kestrel-netns".into())
            .spawn(move || unshare_and_pin(&pinned))
            .map_err(io("starting a thread for", &path))
            .and_then(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err(NetnsError::ThreadPanicked(path.clone())))
            })
    };
    if let Err(e) = made {
        let _ = remove(&path);
        return Err(e);
    }
    Ok(path)
}

/// As `ip netns` does, the directory is a shared mount point: a namespace
/// mounted later shows in mount namespaces copied before (a container's),
/// and its unmount reaches them too, so none keeps it alive by accident.
fn make_shared(dir: &Path) -> Result<(), NetnsError> {
    let shared = |dir: &Path| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared(dir) {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one.
        Err(nix::Error::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(errno("bind-mounting on itself", dir))?;
            shared(dir).map_err(errno("making a shared mount of", dir))
        }
        Err(e) => Err(errno("making a shared mount of", dir)(e)),
    }
}

/// Runs on a thread that ends right after: moves it into a new network
/// namespace, pins the namespace on `path` and brings its loopback up.
fn unshare_and_pin(path: &Path) -> Result<(), NetnsError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(errno("making a network namespace for", path))?;
    mount(
        Some("/proc/thread-self/ns/net"),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(errno("bind-mounting the network namespace on", path))?;
    loopback_up().map_err(io("bringing up lo in", path))
}

/// Sets `IFF_UP` on `lo` in the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags member of
    // the ifreq it is given, which lives across the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the flags member of the union above.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags of the ifreq it is given.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts and deletes the namespace file at `path`. Removing one that
/// is already gone, or a file that was never mounted, succeeds.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(errno("unmounting", path)(e)),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_a_prefix_and_a_hash_whatever_the_key() {
        let a = name_for("/run/kestrel/cli/web");
        assert_eq!(a.len(), NAME_PREFIX.len() + 16, "{a}");
        assert!(a.starts_with(NAME_PREFIX), "{a}");
        assert_eq!(a, name_for("/run/kestrel/cli/web"));
        assert_ne!(a, name_for("/tmp/other-root/web"));
        check_name(&name_for("../../etc/passwd")).unwrap();
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(
                matches!(check_name(bad), Err(NetnsError::BadName(_))),
                "{bad:?}"
            );
        }
        check_name("kestrel-0123abcd").unwrap();
    }

    #[test]
    fn removing_what_is_not_there_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        remove(&dir.path().join("nothing")).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        remove(&plain).unwrap();
        assert!(!plain.exists());
    }

    #[test]
    fn a_namespace_is_made_with_lo_up_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let name = name_for(&dir.path().display().to_string());
        let path = create(dir.path(), &name).unwrap();
        let ns = std::fs::File::open(&path).unwrap();
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let (devices, lo_answers) = std::thread::spawn(move || {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let devices = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            // A datagram to itself on 127.0.0.1 arrives only with lo up.
            let sent = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.send_to(b"x", s.local_addr()?))
                .is_ok();
            (devices, sent)
        })
        .join()
        .unwrap();
        // Only lo: the namespace is new.
        let interfaces: Vec<&str> = devices
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"]);
        assert!(lo_answers, "lo is not up");
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            before,
            "the caller's namespace must not change"
        );
        assert!(matches!(
            create(dir.path(), &name),
            Err(NetnsError::Exists(_))
        ));
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
        let _ = umount2(dir.path(), MntFlags::MNT_DETACH);
    }
}
