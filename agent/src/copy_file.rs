//! CopyFile: the runtime writes files, directories and symlinks into the
//! agent's shared directory, in chunks for large files. This is how a rootfs
//! reaches the guest when there is no shared filesystem.
//!
//! A regular file is written to a `.kestrel-partial` sibling and renamed
//! into place when its last chunk arrives, so a reader never sees half a
//! file. Paths are checked to stay inside the shared directory, including
//! through symlinks that earlier CopyFile calls may have created.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{lchown, symlink, DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use kestrel_protocols::agent::CopyFileRequest;

use crate::error::{Error, Result};

const PARTIAL_SUFFIX: &str = ".kestrel-partial";

/// Applies one CopyFile request below `shared_dir`.
pub fn copy(shared_dir: &Path, req: &CopyFileRequest) -> Result<()> {
    let path = checked_path(shared_dir, &req.path)?;
    if req.offset < 0 || req.file_size < 0 {
        return Err(Error::invalid(format!(
            "CopyFile {}: negative offset {} or file_size {}",
            req.path, req.offset, req.file_size
        )));
    }
    let file_type = req.file_mode & libc::S_IFMT;
    let perm = req.file_mode & 0o7777;
    make_parents(shared_dir, &path, req.dir_mode & 0o7777)?;
    match file_type {
        libc::S_IFDIR => {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::invalid(format!(
                        "CopyFile {}: exists and is not a directory",
                        req.path
                    )))
                }
                Err(_) => fs::create_dir(&path).map_err(|e| io_err(&req.path, e))?,
            }
            chown(&path, req)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(perm))
                .map_err(|e| io_err(&req.path, e))
        }
        libc::S_IFLNK => {
            let target = std::str::from_utf8(&req.data).map_err(|_| {
                Error::invalid(format!(
                    "CopyFile {}: symlink target is not UTF-8",
                    req.path
                ))
            })?;
            if target.is_empty() {
                return Err(Error::invalid(format!(
                    "CopyFile {}: empty symlink target",
                    req.path
                )));
            }
            remove_non_dir(&path, &req.path)?;
            symlink(target, &path).map_err(|e| io_err(&req.path, e))?;
            chown(&path, req)
        }
        0 | libc::S_IFREG => write_chunk(&path, perm, req),
        other => Err(Error::invalid(format!(
            "CopyFile {}: file type {other:#o} is not a directory, symlink or regular file",
            req.path
        ))),
    }
}

fn write_chunk(path: &Path, perm: u32, req: &CopyFileRequest) -> Result<()> {
    let end = (req.offset as u64)
        .checked_add(req.data.len() as u64)
        .filter(|end| *end <= req.file_size as u64)
        .ok_or_else(|| {
            Error::invalid(format!(
                "CopyFile {}: {} bytes at offset {} run past file_size {}",
                req.path,
                req.data.len(),
                req.offset,
                req.file_size
            ))
        })?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(req.offset == 0)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)
        .map_err(|e| io_err(&req.path, e))?;
    file.write_all_at(&req.data, req.offset as u64)
        .map_err(|e| io_err(&req.path, e))?;
    if end == req.file_size as u64 {
        file.set_len(end).map_err(|e| io_err(&req.path, e))?;
        // Owner first: chown clears the setuid and setgid bits of a file,
        // even when root calls it, so the mode must come after.
        chown(&partial, req)?;
        file.set_permissions(fs::Permissions::from_mode(perm))
            .map_err(|e| io_err(&req.path, e))?;
        remove_non_dir(path, &req.path)?;
        fs::rename(&partial, path).map_err(|e| io_err(&req.path, e))?;
    }
    Ok(())
}

fn chown(path: &Path, req: &CopyFileRequest) -> Result<()> {
    let id = |v: i32| u32::try_from(v).ok();
    lchown(path, id(req.uid), id(req.gid)).map_err(|e| io_err(&req.path, e))
}

fn remove_non_dir(path: &Path, shown: &str) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::invalid(format!(
            "CopyFile {shown}: a directory is in the way"
        ))),
        Ok(_) => fs::remove_file(path).map_err(|e| io_err(shown, e)),
        Err(_) => Ok(()),
    }
}

fn io_err(path: &str, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::StorageFull => {
            Error::Internal(format!("CopyFile {path}: no space left on device"))
        }
        _ => Error::internal(format!("CopyFile {path}"), e),
    }
}

/// An absolute, `..`-free path strictly below `shared_dir`.
fn checked_path(shared_dir: &Path, raw: &str) -> Result<PathBuf> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "CopyFile path {raw:?} is not absolute"
        )));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Error::invalid(format!(
            "CopyFile path {raw:?} must not contain \"..\" or \".\""
        )));
    }
    match path.strip_prefix(shared_dir) {
        Ok(rest) if rest.components().next().is_some() => Ok(path.to_path_buf()),
        _ => Err(Error::invalid(format!(
            "CopyFile path {raw:?} is outside the shared directory {}",
            shared_dir.display()
        ))),
    }
}

/// Creates missing directories between `shared_dir` and `path`, refusing
/// to pass through a symlink (it could lead out of the shared directory).
fn make_parents(shared_dir: &Path, path: &Path, dir_mode: u32) -> Result<()> {
    let mode = if dir_mode == 0 { 0o755 } else { dir_mode };
    let rel = path.strip_prefix(shared_dir).unwrap_or(path);
    let mut cur = shared_dir.to_path_buf();
    fs::create_dir_all(&cur).map_err(|e| io_err(&shared_dir.display().to_string(), e))?;
    let parents: Vec<_> = rel.components().collect();
    for c in parents.iter().take(parents.len().saturating_sub(1)) {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::invalid(format!(
                    "CopyFile {}: {} is a symlink",
                    path.display(),
                    cur.display()
                )))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid(format!(
                    "CopyFile {}: {} is not a directory",
                    path.display(),
                    cur.display()
                )))
            }
            Err(_) => fs::DirBuilder::new()
                .mode(mode)
                .create(&cur)
                .map_err(|e| io_err(&path.display().to_string(), e))?,
        }
    }
    // The final component itself may be a symlink only if we replace it.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &Path, mode: u32, data: &[u8], offset: i64, size: i64) -> CopyFileRequest {
        let mut r = CopyFileRequest::new();
        r.path = path.to_string_lossy().into_owned();
        r.file_mode = mode;
        r.dir_mode = 0o755;
        r.data = data.to_vec();
        r.offset = offset;
        r.file_size = size;
        r.uid = -1;
        r.gid = -1;
        r
    }

    #[test]
    fn chunks_appear_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c1/rootfs/etc/motd");
        copy(
            dir.path(),
            &req(&f, libc::S_IFREG | 0o640, b"hello ", 0, 11),
        )
        .unwrap();
        assert!(!f.exists());
        copy(dir.path(), &req(&f, libc::S_IFREG | 0o640, b"world", 6, 11)).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"hello world");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn directories_and_symlinks_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c1/rootfs/bin");
        copy(dir.path(), &req(&d, libc::S_IFDIR | 0o750, b"", 0, 0)).unwrap();
        assert!(d.is_dir());
        let l = d.join("sh");
        copy(
            dir.path(),
            &req(&l, libc::S_IFLNK | 0o777, b"busybox", 0, 0),
        )
        .unwrap();
        assert_eq!(fs::read_link(&l).unwrap(), Path::new("busybox"));
    }

    #[test]
    fn paths_outside_the_shared_directory_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        for bad in ["relative/file", "/etc/passwd"] {
            let err = copy(
                &shared,
                &req(Path::new(bad), libc::S_IFREG | 0o644, b"x", 0, 1),
            )
            .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
        }
        let dotdot = format!("{}/../escape", shared.display());
        let err = copy(
            &shared,
            &req(Path::new(&dotdot), libc::S_IFREG | 0o644, b"x", 0, 1),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn a_symlink_cannot_carry_writes_outside() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let link = shared.join("link");
        copy(
            &shared,
            &req(
                &link,
                libc::S_IFLNK | 0o777,
                outside.to_str().unwrap().as_bytes(),
                0,
                0,
            ),
        )
        .unwrap();
        let err = copy(
            &shared,
            &req(&link.join("f"), libc::S_IFREG | 0o644, b"x", 0, 1),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(!outside.join("f").exists());
    }

    #[test]
    fn setuid_and_setgid_bits_survive_the_owner_change() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c1/rootfs/bin/su");
        copy(dir.path(), &req(&f, libc::S_IFREG | 0o6755, b"x", 0, 1)).unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o6755
        );
    }

    #[test]
    fn chunk_past_file_size_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let err = copy(
            dir.path(),
            &req(&f, libc::S_IFREG | 0o644, b"toolong", 0, 3),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
    }
}
