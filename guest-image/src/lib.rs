//! Kestrel's guest image: our kernel, built from Debian's `linux-source-6.1`
//! with `make tinyconfig` plus the fragments in `configs/`, and an
//! initramfs whose `/init` is the static kestrel-agent, described by a
//! `manifest.json` and cached so an unchanged rebuild takes no time.
//!
//! [`build`] is the whole pipeline; `kestrel image build` drives it.

pub mod fragments;
pub mod initramfs;
pub mod kernel;
pub mod preflight;
pub mod shape;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use kernel::Progress;
pub use shape::VmShape;

/// The kernel command line our guest kernel boots with, whatever runs it:
/// the console on the 8250 (`ttyS0`), an i8042 reset as the way out
/// (`reboot=k`, which kestrel-vmm treats as the guest's end), reboot on
/// panic, no PCI probing (devices are virtio-mmio), and a quiet console.
/// No `nomodule`: the kernel has no modules, and would hand the unknown
/// option to /init. Add `loglevel=7` (or `debug`) to see the boot messages.
pub const KERNEL_PARAMS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the kernel source {path} is missing: apt-get install {package}")]
    SourceMissing {
        path: PathBuf,
        package: &'static str,
    },
    #[error(
        "the kernel build needs what this host lacks:\n  {}\ninstall it with: apt-get install {}",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "),
        preflight::packages(.0).join(" ")
    )]
    Prerequisites(Vec<preflight::Missing>),
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("Kconfig dropped options the fragments set:\n  {}", .0.join("\n  "))]
    OptionsDropped(Vec<String>),
    #[error("{what}:\n{detail}")]
    Build { what: String, detail: String },
    #[error("the agent {path}: {problem}")]
    Agent { path: PathBuf, problem: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
        if source.raw_os_error() == Some(libc_enospc()) {
            return Error::DiskFull(format!("{what} {}", path.display()));
        }
        Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// ENOSPC, without a libc dependency for one number.
const fn libc_enospc() -> i32 {
    28
}

/// An exclusive lock on a file in the cache, held until dropped: two
/// builds (two `kestrel image build`s, or a build and a test) must not
/// extract or compile into the same directory at once.
pub(crate) struct CacheLock {
    _held: std::fs::File,
}

impl CacheLock {
    pub(crate) fn take(path: &Path) -> Result<CacheLock, Error> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("opening", path, e))?;
        file.lock().map_err(|e| Error::io("locking", path, e))?;
        Ok(CacheLock { _held: file })
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// Whether `bytes` are a 64-bit ELF without a program interpreter (static).
pub fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum as usize).all(|i| u32_at(phoff as usize + i * phentsize as usize) != Some(PT_INTERP))
}

/// One output file in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json`: what the image is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub kernel_version: String,
    /// The kernel source tarball (size-mtime), part of the cache key.
    pub kernel_source: String,
    pub fragments_sha256: String,
    pub agent_version: String,
    pub agent_sha256: String,
    pub vmlinux: FileInfo,
    pub bzimage: FileInfo,
    pub initrd: FileInfo,
}

/// Where the outputs are.
#[derive(Debug, Clone, Serialize)]
pub struct Outputs {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    pub manifest: PathBuf,
}

impl Outputs {
    pub fn in_dir(dir: &Path) -> Outputs {
        Outputs {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initrd: dir.join("initrd.img"),
            manifest: dir.join("manifest.json"),
        }
    }
}

/// What to build with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The static agent that becomes `/init`.
    pub agent: PathBuf,
    /// Where the image goes.
    pub out: PathBuf,
    /// The cache for the extracted source and kernel builds.
    pub cache: PathBuf,
    pub tarball: PathBuf,
    pub jobs: usize,
}

/// The user's cache directory for Kestrel: `$XDG_CACHE_HOME/kestrel` or
/// `~/.cache/kestrel`.
pub fn default_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("kestrel")
}

/// What [`build`] did.
#[derive(Debug, Clone)]
pub struct Built {
    pub outputs: Outputs,
    pub manifest: Manifest,
    /// True when everything came from the cache.
    pub reused: bool,
}

/// The hostname written into the image.
const HOSTNAME: &str = "kestrel";
/// Directories the agent mounts on as PID 1.
const MOUNT_POINTS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "sys/fs/cgroup",
    "etc",
    "root",
];

/// Builds (or reuses) the kernel and the initramfs and writes the manifest.
pub fn build(opts: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Built, Error> {
    let agent_bytes = std::fs::read(&opts.agent).map_err(|e| Error::Agent {
        path: opts.agent.clone(),
        problem: e.to_string(),
    })?;
    if !is_static_elf(&agent_bytes) {
        return Err(Error::Agent {
            path: opts.agent.clone(),
            problem: "not a static x86_64 ELF; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" \
                      cargo build --release --target x86_64-unknown-linux-gnu -p kestrel-agent"
                .into(),
        });
    }
    // Before anything is read or extracted: everything the build needs.
    let missing = preflight::Host::with_tarball(&opts.tarball).missing();
    if !missing.is_empty() {
        return Err(Error::Prerequisites(missing));
    }
    let agent_sha256 = hex(&Sha256::digest(&agent_bytes));
    let fragments_sha256 = fragments::hash(fragments::FRAGMENTS);
    let kernel_source = kernel::source_id(&opts.tarball)?;
    let outputs = Outputs::in_dir(&opts.out);

    // The fast path: the same inputs built this output before.
    if let Some(manifest) =
        cached_manifest(&outputs, &kernel_source, &fragments_sha256, &agent_sha256)
    {
        return Ok(Built {
            outputs,
            manifest,
            reused: true,
        });
    }

    let source = kernel::source(&opts.tarball, &opts.cache, progress)?;
    let version = kernel::version(&source)?;
    let build_dir = opts
        .cache
        .join(format!("kernel-{version}-{}", &fragments_sha256[..16]));
    let kernel = kernel::build(
        &source,
        &build_dir,
        fragments::FRAGMENTS,
        opts.jobs.max(1),
        progress,
    )?;

    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io("creating", &opts.out, e))?;
    copy(&kernel.vmlinux, &outputs.vmlinux)?;
    copy(&kernel.bzimage, &outputs.bzimage)?;
    let initrd = initrd(agent_bytes).map_err(|e| Error::Build {
        what: "writing the initramfs".into(),
        detail: e.to_string(),
    })?;
    write(&outputs.initrd, &initrd)?;

    let manifest = Manifest {
        kernel_version: version,
        kernel_source,
        fragments_sha256,
        agent_version: agent_version(&opts.agent)?,
        agent_sha256,
        vmlinux: file_info(&outputs.vmlinux)?,
        bzimage: file_info(&outputs.bzimage)?,
        initrd: file_info(&outputs.initrd)?,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Build {
        what: "writing the manifest".into(),
        detail: e.to_string(),
    })?;
    write(&outputs.manifest, &json)?;
    Ok(Built {
        outputs,
        manifest,
        reused: false,
    })
}

/// The initramfs bytes for an agent binary.
pub fn initrd(agent: Vec<u8>) -> Result<Vec<u8>, initramfs::CpioError> {
    use initramfs::Node;
    let mut archive = initramfs::Archive::new();
    for dir in MOUNT_POINTS {
        archive.insert(dir, Node::Dir { mode: 0o755 })?;
    }
    archive.insert(
        "dev/console",
        Node::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    archive.insert(
        "etc/hostname",
        Node::File {
            mode: 0o644,
            data: format!("{HOSTNAME}\n").into_bytes(),
        },
    )?;
    archive.insert(
        "sbin/init",
        Node::Symlink {
            target: "../init".into(),
        },
    )?;
    archive.insert(
        "init",
        Node::File {
            mode: 0o755,
            data: agent,
        },
    )?;
    Ok(archive.to_bytes())
}

/// The manifest of a previous build of the same inputs whose files are
/// still what it says; None otherwise.
fn cached_manifest(
    outputs: &Outputs,
    kernel_source: &str,
    fragments_sha256: &str,
    agent_sha256: &str,
) -> Option<Manifest> {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&outputs.manifest).ok()?).ok()?;
    let same_inputs = manifest.kernel_source == kernel_source
        && manifest.fragments_sha256 == fragments_sha256
        && manifest.agent_sha256 == agent_sha256;
    let intact = [
        (&outputs.vmlinux, &manifest.vmlinux),
        (&outputs.bzimage, &manifest.bzimage),
        (&outputs.initrd, &manifest.initrd),
    ]
    .iter()
    .all(|(path, info)| sha256_file(path).ok().as_deref() == Some(info.sha256.as_str()));
    (same_inputs && intact).then_some(manifest)
}

fn file_info(path: &Path) -> Result<FileInfo, Error> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io("reading", path, e))?
        .len();
    Ok(FileInfo {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size,
        sha256: sha256_file(path)?,
    })
}

fn agent_version(agent: &Path) -> Result<String, Error> {
    let out = std::process::Command::new(agent)
        .arg("--version")
        .output()
        .map_err(|e| Error::Agent {
            path: agent.into(),
            problem: format!("running --version: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .map(str::to_string)
        .filter(|_| out.status.success())
        .ok_or_else(|| Error::Agent {
            path: agent.into(),
            problem: "--version printed no version".into(),
        })
}

/// Writes through a temporary name so a reader never sees half a file.
fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("kestrel-partial");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming", &tmp, e))
}

fn copy(from: &Path, to: &Path) -> Result<(), Error> {
    let bytes = std::fs::read(from).map_err(|e| Error::io("reading", from, e))?;
    write(to, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initrd_has_the_agent_as_init_and_the_mount_points() {
        let agent = b"\x7fELF\x02fake".to_vec();
        let entries = initramfs::read(&initrd(agent.clone()).unwrap()).unwrap();
        assert_eq!(
            entries["init"],
            initramfs::Node::File {
                mode: 0o755,
                data: agent
            }
        );
        assert_eq!(
            entries["sbin/init"],
            initramfs::Node::Symlink {
                target: "../init".into()
            }
        );
        for dir in ["dev", "proc", "sys", "run", "tmp", "sys/fs/cgroup"] {
            assert_eq!(entries[dir], initramfs::Node::Dir { mode: 0o755 }, "{dir}");
        }
        assert_eq!(
            entries["etc/hostname"],
            initramfs::Node::File {
                mode: 0o644,
                data: b"kestrel\n".to_vec()
            }
        );
    }

    #[test]
    fn a_full_disk_is_reported_as_such() {
        let err = Error::io(
            "writing",
            Path::new("/x/initrd.img"),
            std::io::Error::from_raw_os_error(28),
        );
        assert!(matches!(err, Error::DiskFull(_)), "{err}");
        assert!(err.to_string().starts_with("the disk is full"), "{err}");
    }

    #[test]
    fn a_dynamic_or_non_elf_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"#!/bin/sh\n").unwrap();
        let opts = Options {
            agent: agent.clone(),
            out: dir.path().join("out"),
            cache: dir.path().join("cache"),
            tarball: dir.path().join("none.tar.xz"),
            jobs: 1,
        };
        let err = build(&opts, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("not a static"), "{err}");
        // /bin/sh is dynamic on Debian.
        assert!(!is_static_elf(&std::fs::read("/bin/sh").unwrap()));
    }
}
