//! Building the guest kernel from Debian's `linux-source-6.1` tarball:
//! extract it once into the cache, `make tinyconfig`, merge our fragments,
//! `olddefconfig`, check nothing was dropped, build `vmlinux` and `bzImage`
//! out of tree (`O=`) so the extracted source stays pristine.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::fragments;
use crate::Error;

/// The Debian package and the tarball it installs.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// What the kernel build reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Extracting,
    Configuring,
    /// `objects` files compiled or linked so far; `last` the latest one.
    Compiling {
        objects: usize,
        last: String,
    },
}

/// The built kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
}

/// Names a tarball by its size and mtime: cheap, and it changes when the
/// package is upgraded.
pub fn source_id(tarball: &Path) -> Result<String, Error> {
    let meta = std::fs::metadata(tarball).map_err(|_| Error::SourceMissing {
        path: tarball.into(),
        package: SOURCE_PACKAGE,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(format!("{}-{mtime}", meta.len()))
}

/// The extracted source for `tarball`, extracting it first if needed. The
/// directory is named by the tarball's size and mtime, so an upgraded
/// package gets a fresh tree.
pub fn source(
    tarball: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf, Error> {
    let dir = cache.join(format!("linux-source-{}", source_id(tarball)?));
    std::fs::create_dir_all(cache).map_err(|e| Error::io("creating", cache, e))?;
    // Another build may be extracting the same tree right now.
    let _lock = crate::CacheLock::take(&dir.with_extension("lock"))?;
    let stamp = dir.join(".kestrel-extracted");
    if stamp.exists() {
        return Ok(dir.join(SOURCE_PACKAGE));
    }
    progress(Progress::Extracting);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    run(
        Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&dir),
        "extracting the kernel source",
    )?;
    std::fs::write(&stamp, b"").map_err(|e| Error::io("writing", &stamp, e))?;
    Ok(dir.join(SOURCE_PACKAGE))
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from the source's Makefile.
pub fn version(source: &Path) -> Result<String, Error> {
    let makefile = source.join("Makefile");
    let text =
        std::fs::read_to_string(&makefile).map_err(|e| Error::io("reading", &makefile, e))?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim_start()
                .strip_prefix('=')
                .map(|v| v.trim().to_string())
        })
    };
    match (field("VERSION"), field("PATCHLEVEL"), field("SUBLEVEL")) {
        (Some(v), Some(p), Some(s)) => Ok(format!("{v}.{p}.{s}")),
        _ => Err(Error::Build {
            what: "reading the kernel version".into(),
            detail: format!("{} has no VERSION/PATCHLEVEL/SUBLEVEL", makefile.display()),
        }),
    }
}

/// Configures and builds in `build_dir`; returns the kernel once
/// `vmlinux` and `bzImage` exist. A build dir that finished before is
/// reused as it is.
pub fn build(
    source: &Path,
    build_dir: &Path,
    fragments: &[(&str, &str)],
    jobs: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<Kernel, Error> {
    let version = version(source)?;
    let kernel = Kernel {
        version,
        vmlinux: build_dir.join("vmlinux"),
        bzimage: build_dir.join("arch/x86/boot/bzImage"),
    };
    if let Some(parent) = build_dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    // One build per build dir at a time; a second waits and then reuses it.
    let _lock = crate::CacheLock::take(&build_dir.with_extension("lock"))?;
    let stamp = build_dir.join(".kestrel-built");
    if stamp.exists() && kernel.vmlinux.exists() && kernel.bzimage.exists() {
        return Ok(kernel);
    }
    progress(Progress::Configuring);
    std::fs::create_dir_all(build_dir).map_err(|e| Error::io("creating", build_dir, e))?;
    let make = || {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(source)
            .arg(format!("O={}", build_dir.display()))
            .arg("ARCH=x86_64")
            // Fixed build stamps: the banner must not depend on when or
            // where the kernel was built.
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01 00:00:00 UTC")
            .env("KBUILD_BUILD_USER", "kestrel")
            .env("KBUILD_BUILD_HOST", "kestrel");
        cmd
    };
    run(make().arg("tinyconfig"), "make tinyconfig")?;
    let mut fragment_paths = Vec::new();
    for (name, text) in fragments {
        let path = build_dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
        fragment_paths.push(path);
    }
    run(
        Command::new(source.join("scripts/kconfig/merge_config.sh"))
            .arg("-m")
            .arg("-O")
            .arg(build_dir)
            .arg(build_dir.join(".config"))
            .args(&fragment_paths),
        "merging the config fragments",
    )?;
    run(make().arg("olddefconfig"), "make olddefconfig")?;
    let config_path = build_dir.join(".config");
    let config =
        std::fs::read_to_string(&config_path).map_err(|e| Error::io("reading", &config_path, e))?;
    let dropped = fragments::dropped(fragments, &config);
    if !dropped.is_empty() {
        let list: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        return Err(Error::OptionsDropped(list));
    }
    compile(
        make()
            .arg(format!("-j{jobs}"))
            .arg("vmlinux")
            .arg("bzImage"),
        progress,
    )?;
    std::fs::write(&stamp, b"").map_err(|e| Error::io("writing", &stamp, e))?;
    Ok(kernel)
}

/// Runs the compile, counting the objects it reports for `progress` and
/// keeping the output's tail for an error.
fn compile(cmd: &mut Command, progress: &mut dyn FnMut(Progress)) -> Result<(), Error> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Build {
            what: "starting make".into(),
            detail: e.to_string(),
        })?;
    // stderr on a thread so neither pipe fills while the other is read.
    let stderr = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        })
    });
    let mut tail = std::collections::VecDeque::new();
    let mut objects = 0;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let step = line.split_whitespace().next().unwrap_or("");
            if matches!(step, "CC" | "AS" | "LD" | "AR" | "OBJCOPY") {
                objects += 1;
                let last = line.split_whitespace().last().unwrap_or("").to_string();
                progress(Progress::Compiling { objects, last });
            }
            tail.push_back(line);
            if tail.len() > 20 {
                tail.pop_front();
            }
        }
    }
    let status = child.wait().map_err(|e| Error::Build {
        what: "waiting for make".into(),
        detail: e.to_string(),
    })?;
    let errors = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let all = errors.join("\n");
    if all.contains("No space left on device") {
        return Err(Error::DiskFull(
            all.lines()
                .find(|l| l.contains("No space"))
                .unwrap_or("")
                .to_string(),
        ));
    }
    let detail: Vec<String> = tail
        .into_iter()
        .chain(
            errors
                .into_iter()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev(),
        )
        .collect();
    Err(Error::Build {
        what: format!("building the kernel ({status})"),
        detail: detail.join("\n"),
    })
}

/// Runs a short step; its output only matters when it fails.
fn run(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Build {
            what: what.into(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("No space left on device") {
        return Err(Error::DiskFull(what.into()));
    }
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(Error::Build {
        what: format!("{what} ({})", out.status),
        detail: tail.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tarball_names_the_package_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let err = source(&dir.path().join("linux.tar.xz"), dir.path(), &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install linux-source-6.1"),
            "{err}"
        );
    }

    #[test]
    fn the_version_comes_from_the_makefile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Makefile"),
            "# x\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n",
        )
        .unwrap();
        assert_eq!(version(dir.path()).unwrap(), "6.1.192");
        std::fs::write(dir.path().join("Makefile"), "all:\n").unwrap();
        assert!(version(dir.path()).is_err());
    }
}
