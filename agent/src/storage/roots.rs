//! The directories a storage may be mounted below, or bound from: the
//! agent's shared directory, and in a guest Kata's `/run/kata-containers`.
//! A path from a request is first checked as text (absolute, no `..`,
//! strictly below a root), then walked from the real root one component
//! at a time: no symbolic link is followed below a root, and the opened
//! result must read back, through `/proc/self/fd`, as the path walked.
//! Mounting onto that opened file, not onto the path, leaves no window in
//! which a swapped component could steer the mount elsewhere.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Kata's guest directory: its runtime puts the shared filesystem under
/// `shared/containers/` and sandbox storages (shm, ephemeral volumes)
/// under `sandbox/`. Only a guest's agent owns it; on a host it may belong
/// to a real Kata installation.
pub const KATA_GUEST_DIR: &str = "/run/kata-containers";

/// The allowed roots, as absolute paths without `.` or `..`.
#[derive(Debug, Clone)]
pub struct Roots {
    dirs: Vec<PathBuf>,
}

/// What a pinned path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
    /// A bind source: a directory or a regular file, never created.
    Existing,
}

/// An input path that passed the textual checks.
#[derive(Debug, Clone)]
pub struct Located {
    /// The request's field, for error messages (`storages[0].mount_point`).
    pub field: String,
    /// The path, normalised: the key storages are counted by.
    pub path: PathBuf,
    root: PathBuf,
}

/// An opened (`O_PATH`) file whose real path was checked.
#[derive(Debug)]
pub struct Pinned {
    file: File,
    pub real: PathBuf,
    pub is_dir: bool,
}

impl Pinned {
    /// A path that names exactly the opened file, whatever happens to the
    /// directories above it meanwhile.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

impl Roots {
    /// The agent's roots: its shared directory, plus Kata's guest
    /// directory when the agent is the guest's init.
    pub fn for_agent(shared_dir: &Path, is_init: bool) -> Roots {
        let mut dirs = vec![shared_dir.to_path_buf()];
        if is_init {
            dirs.push(PathBuf::from(KATA_GUEST_DIR));
        }
        Roots::new(dirs)
    }

    pub fn new(dirs: Vec<PathBuf>) -> Roots {
        let dirs = dirs
            .into_iter()
            .map(|d| d.components().collect::<PathBuf>())
            .collect();
        Roots { dirs }
    }

    /// Checks `raw` as text: absolute, no NUL, no `..`, strictly below one
    /// of the roots (the deepest one that holds it).
    pub fn locate(&self, field: &str, raw: &str) -> Result<Located> {
        let path = lexical(field, raw)?;
        let root = self
            .dirs
            .iter()
            .filter(|r| path.starts_with(r) && path != **r)
            .max_by_key(|r| r.components().count())
            .ok_or_else(|| {
                Error::invalid(format!("{field} {raw:?} is not below {}", self.describe()))
            })?;
        Ok(Located {
            field: field.to_string(),
            path,
            root: root.clone(),
        })
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .dirs
            .iter()
            .map(|d| format!("{}/", d.display()))
            .collect();
        names.join(" or ")
    }
}

/// An absolute path without NUL bytes or `..`, with `.` and repeated or
/// trailing slashes dropped.
pub fn lexical(field: &str, raw: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::invalid(format!("{field} is empty")));
    }
    if raw.contains('\0') {
        return Err(Error::invalid(format!(
            "{field} {raw:?} contains a NUL byte"
        )));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "{field} {raw:?} is not an absolute path"
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid(format!(
            "{field} {raw:?} must not contain \"..\""
        )));
    }
    Ok(path.components().collect())
}

impl Located {
    /// Walks from the real root to this path without following a symbolic
    /// link, creating what is missing as `kind` asks, and opens the result.
    pub fn pin(&self, kind: Kind) -> Result<Pinned> {
        let shown = self.path.display();
        let field = &self.field;
        fs::create_dir_all(&self.root)
            .map_err(|e| Error::internal(format!("creating {}", self.root.display()), e))?;
        let mut cur = self
            .root
            .canonicalize()
            .map_err(|e| Error::internal(format!("resolving {}", self.root.display()), e))?;
        let rel = self
            .path
            .strip_prefix(&self.root)
            .map_err(|_| Error::Internal(format!("{shown} is not below its root")))?;
        let parts: Vec<Component> = rel.components().collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::invalid(format!(
                        "{field} {shown}: {} is a symbolic link",
                        cur.display()
                    )))
                }
                Ok(m) if !last && !m.is_dir() => {
                    return Err(Error::invalid(format!(
                        "{field} {shown}: {} is not a directory",
                        cur.display()
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => create(&cur, last, kind, field)?,
                Err(e) => return Err(Error::internal(format!("{field} {shown}"), e)),
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&cur)
            .map_err(|e| Error::internal(format!("{field}: opening {}", cur.display()), e))?;
        let pinned = Pinned {
            is_dir: false,
            real: cur,
            file,
        };
        let real = fs::read_link(pinned.proc_path())
            .map_err(|e| Error::internal(format!("{field}: reading back {shown}"), e))?;
        if real != pinned.real {
            return Err(Error::invalid(format!(
                "{field} {shown} moved to {} while it was opened",
                real.display()
            )));
        }
        let meta = pinned
            .file
            .metadata()
            .map_err(|e| Error::internal(format!("{field}: {shown}"), e))?;
        let fits = match kind {
            Kind::Directory => meta.is_dir(),
            Kind::File => meta.is_file(),
            Kind::Existing => meta.is_dir() || meta.is_file(),
        };
        if !fits {
            let want = match kind {
                Kind::Directory => "a directory",
                Kind::File => "a regular file",
                Kind::Existing => "a directory or a regular file",
            };
            return Err(Error::invalid(format!("{field} {shown} is not {want}")));
        }
        Ok(Pinned {
            is_dir: meta.is_dir(),
            ..pinned
        })
    }
}

fn create(path: &Path, last: bool, kind: Kind, field: &str) -> Result<()> {
    let made = match kind {
        Kind::Existing => {
            return Err(Error::invalid(format!(
                "{field}: {} does not exist",
                path.display()
            )))
        }
        Kind::File if last => OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(path)
            .map(drop),
        _ => DirBuilder::new().mode(0o755).create(path),
    };
    match made {
        // Created meanwhile by someone else: the final checks judge it.
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(Error::internal(
            format!("{field}: creating {}", path.display()),
            e,
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Roots {
        Roots::new(vec!["/run/kestrel/shared".into(), KATA_GUEST_DIR.into()])
    }

    #[test]
    fn mount_points_below_a_root_are_normalised() {
        let l = roots()
            .locate("m", "/run/kata-containers/shared/containers/")
            .unwrap();
        assert_eq!(l.path, Path::new("/run/kata-containers/shared/containers"));
        let l = roots().locate("m", "/run/kestrel//shared/./c1/x").unwrap();
        assert_eq!(l.path, Path::new("/run/kestrel/shared/c1/x"));
    }

    #[test]
    fn paths_outside_the_roots_or_escaping_them_are_refused_naming_the_field() {
        for raw in [
            "",
            "/",
            "/etc",
            "/run/kata-containers",
            "/run/kata-containers/",
            "/run/kata-containers/../../etc",
            "/run/kata-containers-evil/x",
            "run/kata-containers/x",
            "/run/kestrel/shared/a\0b",
        ] {
            match roots().locate("storages[2].mount_point", raw) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.starts_with("storages[2].mount_point"), "{raw:?}: {m}")
                }
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_a_guest_agent_owns_kata_s_directory() {
        let host = Roots::for_agent(Path::new("/tmp/s"), false);
        assert!(host
            .locate("m", "/run/kata-containers/sandbox/shm")
            .is_err());
        assert!(host.locate("m", "/tmp/s/x").is_ok());
        let guest = Roots::for_agent(Path::new("/tmp/s"), true);
        assert!(guest
            .locate("m", "/run/kata-containers/sandbox/shm")
            .is_ok());
    }

    #[test]
    fn pinning_creates_missing_directories_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let roots = Roots::new(vec![root.clone()]);
        let raw = root.join("a/b/c");
        let pinned = roots
            .locate("m", raw.to_str().unwrap())
            .unwrap()
            .pin(Kind::Directory)
            .unwrap();
        assert!(pinned.is_dir);
        assert_eq!(pinned.real, root.canonicalize().unwrap().join("a/b/c"));

        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let raw = root.join("link/x");
        let err = roots
            .locate("storages[0].mount_point", raw.to_str().unwrap())
            .unwrap()
            .pin(Kind::Directory)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!outside.join("x").exists());

        let raw = root.join("missing");
        let err = roots
            .locate("storages[0].source", raw.to_str().unwrap())
            .unwrap()
            .pin(Kind::Existing)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
}
