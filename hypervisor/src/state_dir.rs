//! A sandbox's state directory: made by the backend that prepares the
//! sandbox, removed when it stops or when `delete` cleans up an orphan.
//!
//! The directory is named after an id that came from outside (a request,
//! an annotation, a flag). Ids are validated before they get here, but the
//! removal does not rely on that alone: [`create`] leaves a marker in the
//! directory and [`remove`] deletes only a directory that carries it, so a
//! path that reaches it by any other route is refused, not wiped.
//!
//! The sockets a sandbox needs (the agent's, the hybrid vsock, QEMU's
//! vhost-user backends, Cloud Hypervisor's API) live in that directory, and a
//! unix socket's path holds at most [`MAX_SOCKET_PATH_LEN`] bytes. CRI's ids
//! are 64 characters and ours may be 128, so the directory is not named by
//! the id alone: [`dir_name`] keeps it at most [`MAX_DIR_NAME_LEN`] bytes,
//! socket names stay within [`MAX_SOCKET_NAME_LEN`], and a state root of at
//! most [`max_root_len`] bytes (checked when the configuration loads) then
//! fits every socket of every sandbox.
//!
//! The runtime bind-mounts containers' root filesystems and volumes below a
//! sandbox's directory (its shared directory) and unmounts them before the
//! directory goes. [`remove`] does not trust that either: it refuses a
//! directory with anything mounted at or below it, since deleting through a
//! bind mount deletes the files it shows (a container's rootfs, a volume).

use std::path::{Path, PathBuf};

use crate::Error;

/// The file [`create`] writes and [`remove`] looks for.
pub const MARKER: &str = ".kestrel-sandbox";

/// The most a unix socket's path may hold (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// The longest name [`dir_name`] gives a sandbox's directory.
pub const MAX_DIR_NAME_LEN: usize = 32;
/// The longest file name of a socket in a sandbox's directory, a hybrid
/// vsock's `<socket>_<port>` included.
pub const MAX_SOCKET_NAME_LEN: usize = 16;
/// How many of the id's characters a shortened directory name keeps.
const KEPT_PREFIX: usize = MAX_DIR_NAME_LEN - 17;

/// The longest state root (the directory holding every sandbox's
/// directory) whose sockets all fit a unix socket address.
pub const fn max_root_len() -> usize {
    MAX_SOCKET_PATH_LEN - 1 - MAX_DIR_NAME_LEN - 1 - MAX_SOCKET_NAME_LEN
}

/// The name of the directory of sandbox `id`: the id itself when it is at
/// most [`MAX_DIR_NAME_LEN`] bytes, else its first characters, `~` and the
/// first 16 hex digits of the id's SHA-256, so it stays recognisable. `~` is
/// outside the id alphabet: no id names another id's shortened directory.
/// The id must already have passed the shared id rule (ASCII).
pub fn dir_name(id: &str) -> String {
    use sha2::{Digest, Sha256};
    if id.len() <= MAX_DIR_NAME_LEN {
        return id.to_string();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = id.chars().take(KEPT_PREFIX).collect();
    format!("{prefix}~{hash}")
}

/// Creates `dir` (and its parents) and marks it as ours. An existing
/// directory is reused only if it carries the marker already.
pub fn create(dir: &Path) -> Result<(), Error> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !is_ours(dir) {
                return Err(Error::NotOurs(dir.to_path_buf()));
            }
        }
        Err(e) => return Err(io("creating", dir)(e)),
    }
    let marker = dir.join(MARKER);
    std::fs::write(&marker, b"").map_err(io("writing", &marker))
}

/// Removes `dir` and everything in it if [`create`] made it; a directory
/// that is already gone is fine, one without the marker is refused, and so
/// is one with a mount point at or below it ([`mounts_below`]): nothing is
/// then removed.
pub fn remove(dir: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                what: "inspecting",
                path: dir.to_path_buf(),
                source,
            })
        }
        Ok(meta) if !meta.is_dir() || !is_ours(dir) => {
            return Err(Error::NotOurs(dir.to_path_buf()))
        }
        Ok(_) => {}
    }
    let mounted = mounts_below(dir);
    if !mounted.is_empty() {
        return Err(Error::StillMounted {
            dir: dir.to_path_buf(),
            mounts: mounted,
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: "removing",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether `dir` is a directory [`create`] made.
pub fn is_ours(dir: &Path) -> bool {
    let marker = dir.join(MARKER);
    std::fs::symlink_metadata(marker).is_ok_and(|m| m.is_file())
}

/// The mount points at or below `dir` in this process's mount table
/// (`/proc/self/mountinfo`), deepest first, so that unmounting them in
/// order never meets one still covered by another. A point mounted over
/// several times is listed that many times. `dir` is compared as given:
/// pass the path the mounts were made under.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|raw| PathBuf::from(unescape_mount_point(raw)))
        .filter(|point| point.starts_with(dir))
        .collect();
    // Later lines were mounted later: reversed first, a stable sort by depth
    // keeps the newest of a stack first.
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\012` for a
/// newline, `\134` for a backslash).
fn unescape_mount_point(raw: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_name_their_directory_and_long_ones_are_shortened_distinctly() {
        assert_eq!(dir_name("web-1"), "web-1");
        let cri = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f";
        let other = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e50";
        let (a, b) = (dir_name(cri), dir_name(other));
        assert_eq!(a.len(), MAX_DIR_NAME_LEN);
        assert!(a.starts_with("4e5f6a7b8c9d0e1~"), "{a}");
        assert!(
            kestrel_protocols::id::validate("id", &a).is_err(),
            "not an id: {a}"
        );
        assert_ne!(a, b);
        assert_eq!(a, dir_name(cri), "the name is a function of the id");
        assert_eq!(dir_name(&"x".repeat(128)).len(), MAX_DIR_NAME_LEN);
    }

    #[test]
    fn a_directory_we_made_is_removed_with_its_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("states/sb1");
        create(&dir).unwrap();
        std::fs::write(dir.join("vmm.log"), b"x").unwrap();
        create(&dir).unwrap();
        remove(&dir).unwrap();
        assert!(!dir.exists());
        remove(&dir).unwrap();
    }

    #[test]
    fn a_directory_without_the_marker_survives() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("precious"), b"x").unwrap();
        assert!(matches!(remove(&victim), Err(Error::NotOurs(_))));
        assert!(matches!(create(&victim), Err(Error::NotOurs(_))));
        assert!(victim.join("precious").exists());
        assert!(!victim.join(MARKER).exists());
    }

    #[test]
    fn mount_point_escapes_are_undone() {
        assert_eq!(unescape_mount_point("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_point("/x\\134y\\012"), "/x\\y\n");
        assert_eq!(unescape_mount_point("/plain\\9"), "/plain\\9");
    }

    #[test]
    fn a_directory_with_a_mount_below_it_is_refused_and_keeps_everything() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to bind-mount");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sb");
        create(&dir).unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::write(volume.join("precious"), b"x").unwrap();
        let target = dir.join("shared/c1");
        std::fs::create_dir_all(&target).unwrap();
        nix::mount::mount(
            Some(&volume),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert_eq!(mounts_below(&dir), std::slice::from_ref(&target));
        let refused = remove(&dir);
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(
            matches!(&refused, Err(Error::StillMounted { mounts, .. }) if mounts.as_slice() == std::slice::from_ref(&target)),
            "{refused:?}"
        );
        assert!(volume.join("precious").exists());
        assert!(dir.join(MARKER).exists());
        remove(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_symlink_to_a_marked_directory_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        create(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(remove(&link), Err(Error::NotOurs(_))));
        assert!(real.join(MARKER).exists());
    }
}
