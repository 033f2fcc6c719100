//! A sandbox's state directory: made by the backend that prepares the
//! sandbox, removed when it stops or when `delete` cleans up an orphan.
//!
//! The directory is named after an id that came from outside (a request,
//! an annotation, a flag). Ids are validated before they get here, but the
//! removal does not rely on that alone: [`create`] leaves a marker in the
//! directory and [`remove`] deletes only a directory that carries it, so a
//! path that reaches it by any other route is refused, not wiped.

use std::path::Path;

use crate::Error;

/// The file [`create`] writes and [`remove`] looks for.
pub const MARKER: &str = ".kestrel-sandbox";

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
/// that is already gone is fine, one without the marker is refused.
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

#[cfg(test)]
mod tests {
    use super::*;

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
