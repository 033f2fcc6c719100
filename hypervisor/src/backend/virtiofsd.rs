//! virtiofsd, the FUSE server behind a sandbox's shared directory: one per
//! sandbox whose spec has [`SharedFs`], started before the VMM (which
//! connects to its socket as it starts) and stopped after it.
//!
//! Its command line, from the state directory and the spec:
//!
//! ```text
//! virtiofsd --socket-path <state_dir>/virtiofsd.sock --shared-dir <dir>
//!           --cache never|auto --sandbox chroot --announce-submounts
//!           --log-level info
//! ```
//!
//! `--sandbox chroot`: virtiofsd chroots into the shared directory and
//! stays in the host's mount namespace, so the bind mounts the runtime adds
//! under the directory after the guest booted (each container's rootfs)
//! are visible to it at once. `namespace` (virtiofsd's default) would copy
//! the mount table when it starts and see later mounts only where the
//! directory sits on a shared mount, which it does not here (mounts are
//! private, as in most container hosts); `none` would leave virtiofsd, which
//! runs as root, the whole host file system. `--announce-submounts` gives
//! each of those bind mounts its own device number in the guest, so inode
//! numbers of two mounts never collide. virtiofsd keeps its own seccomp
//! filter (its default, kill).
//!
//! virtiofsd leaves by itself when the VMM hangs up. Its death while the
//! VMM runs is the guest's file system gone: [`super::child::watch_helper`]
//! then kills the VMM, and the sandbox's exit watch fires.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::child::{find_binary, io_err, missing, Child};
use crate::{Error, SandboxSpec, SharedFs};

/// The binary when the configuration names none: found on `PATH`, where
/// `scripts/install-virtiofsd.sh` puts it (`/usr/local/bin`).
pub const DEFAULT_BINARY: &str = "virtiofsd";
/// How long virtiofsd may take to listen on its socket.
const READY: Duration = Duration::from_secs(5);

/// virtiofsd's vhost-user socket in a sandbox's state directory.
pub(crate) fn socket(state_dir: &Path) -> PathBuf {
    state_dir.join("virtiofsd.sock")
}

/// Checks `spec`'s shared directory, if it has one, and finds `binary`.
/// Returns the binary to run, or `None` when nothing is shared.
pub(crate) fn check(spec: &SandboxSpec, binary: &Path) -> Result<Option<PathBuf>, Error> {
    let Some(fs) = &spec.shared_fs else {
        return Ok(None);
    };
    if !fs.tag_is_valid() {
        return Err(Error::Config(format!(
            "the shared directory's tag `{}` must be 1 to {} bytes without spaces, commas or control characters",
            fs.tag,
            SharedFs::MAX_TAG_LEN
        )));
    }
    if !fs.dir.is_dir() {
        return Err(missing(
            "the shared directory",
            &fs.dir,
            "is not a directory; the runtime creates it before prepare",
        ));
    }
    find_binary(
        "virtiofsd (it serves the shared directory)",
        binary,
        "is not installed (scripts/install-virtiofsd.sh installs it)",
    )
    .map(Some)
}

/// virtiofsd's command line (program first) for `fs` in `state_dir`.
pub(crate) fn command(binary: &Path, state_dir: &Path, fs: &SharedFs) -> Vec<OsString> {
    vec![
        binary.into(),
        "--socket-path".into(),
        socket(state_dir).into(),
        "--shared-dir".into(),
        fs.dir.clone().into(),
        "--cache".into(),
        fs.cache.name().into(),
        "--sandbox".into(),
        "chroot".into(),
        "--announce-submounts".into(),
        "--log-level".into(),
        "info".into(),
    ]
}

/// Starts virtiofsd as `child` (output in `virtiofsd.log`) and waits until
/// its socket exists, so the VMM started next finds it listening.
pub(crate) async fn start(
    child: &Child,
    binary: &Path,
    spec: &SandboxSpec,
    fs: &SharedFs,
) -> Result<(), Error> {
    let dir = &spec.state_dir;
    child.spawn(
        &spec.id,
        &command(binary, dir, fs),
        &dir.join("virtiofsd.log"),
    )?;
    let socket = socket(dir);
    let ready_by = Instant::now() + READY;
    while !socket.exists() {
        if let Some(exit) = *child.exit_watch().borrow() {
            return Err(Error::HelperExit {
                helper: "virtiofsd",
                exit,
                log: dir.join("virtiofsd.log"),
            });
        }
        if Instant::now() > ready_by {
            child.kill("its socket did not appear in time");
            return Err(io_err("waiting for virtiofsd's socket", &socket)(
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsCache;

    fn spec(dir: &Path, fs: Option<SharedFs>) -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: "/unused".into(),
            agent_log_level: "info".into(),
            vm: None,
            netns: None,
            nics: Vec::new(),
            shared_fs: fs,
        }
    }

    fn shared(dir: &Path, tag: &str) -> SharedFs {
        SharedFs {
            dir: dir.to_path_buf(),
            tag: tag.into(),
            cache: FsCache::Never,
        }
    }

    #[test]
    fn virtiofsd_serves_the_shared_dir_chrooted_on_a_socket_in_the_state_dir() {
        let fs = shared(Path::new("/run/x/sb/shared"), "kestrel");
        assert_eq!(
            command(
                Path::new("/usr/local/bin/virtiofsd"),
                Path::new("/run/x/sb"),
                &fs
            ),
            [
                "/usr/local/bin/virtiofsd",
                "--socket-path",
                "/run/x/sb/virtiofsd.sock",
                "--shared-dir",
                "/run/x/sb/shared",
                "--cache",
                "never",
                "--sandbox",
                "chroot",
                "--announce-submounts",
                "--log-level",
                "info",
            ]
            .map(OsString::from)
        );
        let auto = SharedFs {
            cache: FsCache::Auto,
            ..fs
        };
        let argv = command(Path::new("virtiofsd"), Path::new("/s"), &auto);
        assert!(argv.windows(2).any(|w| w[0] == "--cache" && w[1] == "auto"));
    }

    #[test]
    fn nothing_shared_needs_no_virtiofsd() {
        let spec = spec(Path::new("/s"), None);
        assert_eq!(check(&spec, Path::new("/nonexistent")).unwrap(), None);
    }

    #[test]
    fn check_names_a_bad_tag_a_missing_dir_and_a_missing_virtiofsd() {
        let dir = tempfile::tempdir().unwrap();
        let bad_tags = ["", "a b", "a,b", &"t".repeat(37)];
        for tag in bad_tags {
            let spec = spec(dir.path(), Some(shared(dir.path(), tag)));
            let err = check(&spec, Path::new("/bin/true"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("tag"), "{tag:?}: {err}");
        }
        let gone = dir.path().join("gone");
        let err = check(
            &spec(dir.path(), Some(shared(&gone, "t"))),
            Path::new("/bin/true"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shared directory"), "{err}");
        let err = check(
            &spec(dir.path(), Some(shared(dir.path(), "t"))),
            &dir.path().join("no-virtiofsd"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("scripts/install-virtiofsd.sh"), "{err}");
        assert_eq!(
            check(
                &spec(dir.path(), Some(shared(dir.path(), "t"))),
                Path::new("/bin/true")
            )
            .unwrap(),
            Some(PathBuf::from("/bin/true"))
        );
    }
}
