//! A volume's group, as Kubernetes' `fsGroup` asks and Kata's agent does
//! it: every file gets the group and group read/write (read for a
//! read-only volume), directories also group search and the setgid bit,
//! so files created later inherit the group. Symbolic links are skipped
//! (changing one would change what it points at) and the walk stays on
//! the volume's filesystem.

use std::fs::{self, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::Path;

use super::request::FsGroup;
use crate::error::{Error, Result};

const READ_WRITE: u32 = 0o660;
const READ_ONLY: u32 = 0o440;
const SEARCH: u32 = 0o110;
const SETGID: u32 = 0o2000;

/// Gives the volume at `root` the group `g`.
pub fn apply(root: &Path, g: FsGroup, read_only: bool) -> Result<()> {
    let meta = fs::symlink_metadata(root)
        .map_err(|e| Error::internal(format!("fsGroup: {}", root.display()), e))?;
    let files = if read_only { READ_ONLY } else { READ_WRITE };
    let dir_bits = files | SEARCH | SETGID;
    if g.only_on_root_mismatch && meta.gid() == g.gid && meta.mode() & dir_bits == dir_bits {
        tracing::debug!(path = %root.display(), gid = g.gid, "fsGroup: the volume's root already matches");
        return Ok(());
    }
    walk(root, meta.dev(), g.gid, files)
}

/// Sets the volume root's group and its setgid bit only: Kata's `fsgid=`
/// option of `local` and `ephemeral` volumes.
pub fn set_root_group(root: &Path, gid: u32) -> Result<()> {
    let err = |e| Error::internal(format!("fsgid={gid} on {}", root.display()), e);
    std::os::unix::fs::chown(root, None, Some(gid)).map_err(err)?;
    let mode = fs::metadata(root).map_err(err)?.mode();
    fs::set_permissions(root, Permissions::from_mode((mode | SETGID) & 0o7777)).map_err(err)
}

fn walk(path: &Path, dev: u64, gid: u32, files: u32) -> Result<()> {
    let err = |e| Error::internal(format!("fsGroup on {}", path.display()), e);
    let meta = match fs::symlink_metadata(path) {
        // Deleted by the container meanwhile: nothing to change.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        other => other.map_err(err)?,
    };
    if meta.file_type().is_symlink() || meta.dev() != dev {
        return Ok(());
    }
    let mut bits = files;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(err)? {
            walk(&entry.map_err(err)?.path(), dev, gid, files)?;
        }
        bits |= SEARCH | SETGID;
    }
    lchown(path, None, Some(gid)).map_err(err)?;
    // After chown, which clears a file's setgid bit: read the mode again.
    let mode = fs::symlink_metadata(path).map_err(err)?.mode();
    fs::set_permissions(path, Permissions::from_mode((mode | bits) & 0o7777)).map_err(err)
}
