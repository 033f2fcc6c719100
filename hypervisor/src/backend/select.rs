//! What this host's KVM can do, and which backend `auto` therefore means.
//!
//! On hosts with hardware virtualization (`kvm_intel` / `kvm_amd`) the
//! builtin VMM runs the guest. Where KVM is nested and emulated in software
//! (the `kvm_pvm` module) a guest kernel starts but its user space cannot
//! run, so the agent never serves: there `auto` picks QEMU, whose TCG
//! emulation runs the whole guest. Every choice carries a sentence saying
//! why, for logs and `kestrel doctor`.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::Backend;

/// The backend name that lets the host pick ([`resolve`]).
pub const AUTO: &str = "auto";

/// The QEMU accelerator settings `[vm] accel` accepts.
pub const ACCELS: &[&str] = &["auto", "kvm", "tcg"];

/// Why a configured backend name cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// The name is neither [`AUTO`] nor a [`Backend`]'s.
    #[error(
        "{name:?} is not a hypervisor backend (known: {AUTO}, {})",
        Backend::names()
    )]
    UnknownBackend { name: String },
}

/// How far KVM goes on this host. Each variant carries a short reason
/// (`kvm_pvm loaded`, `/dev/kvm does not exist`) or, for `Native`, the
/// module that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// No usable `/dev/kvm`.
    Missing(String),
    /// `/dev/kvm` works but is not backed by hardware virtualization: guest
    /// kernels start, guest user space cannot run.
    Emulated(String),
    /// Hardware virtualization through the named module (`kvm_intel`,
    /// `kvm_amd`).
    Native(String),
}

impl KvmSupport {
    /// `missing`, `emulated` or `native`.
    pub fn state(&self) -> &'static str {
        match self {
            KvmSupport::Missing(_) => "missing",
            KvmSupport::Emulated(_) => "emulated",
            KvmSupport::Native(_) => "native",
        }
    }

    /// Why KVM is in this state, in a few words.
    pub fn why(&self) -> &str {
        match self {
            KvmSupport::Missing(why) | KvmSupport::Emulated(why) | KvmSupport::Native(why) => why,
        }
    }

    /// What this state means for running a guest.
    pub fn consequence(&self) -> &'static str {
        match self {
            KvmSupport::Missing(_) => "no KVM: only QEMU with TCG can run a guest",
            KvmSupport::Emulated(_) => "guest kernels start, but guest user space cannot run",
            KvmSupport::Native(_) => "hardware virtualization: every backend can run a guest",
        }
    }
}

/// Probes `/dev/kvm` and the loaded KVM modules in `/sys/module`.
pub fn kvm_support() -> KvmSupport {
    kvm_support_in(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// [`kvm_support`] against another device node and module directory, so
/// tests can lay out each case.
fn kvm_support_in(dev: &Path, modules: &Path) -> KvmSupport {
    if !dev.exists() {
        return KvmSupport::Missing(format!("{} does not exist", dev.display()));
    }
    // Opening is what every VMM does first; it fails on permissions (not in
    // the kvm group) where a mere existence check would pass.
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return KvmSupport::Missing(format!(
            "{} cannot be opened read-write: {e}",
            dev.display()
        ));
    }
    // kvm_pvm emulates virtualization in software (nested KVM without
    // hardware support) and may sit beside kvm_intel, so it decides first.
    if modules.join("kvm_pvm").exists() {
        return KvmSupport::Emulated("kvm_pvm loaded".into());
    }
    for module in ["kvm_intel", "kvm_amd"] {
        if modules.join(module).exists() {
            return KvmSupport::Native(module.into());
        }
    }
    KvmSupport::Emulated("neither kvm_intel nor kvm_amd loaded".into())
}

/// The backend a configured name means here, and why. `auto` becomes
/// `builtin` on native KVM and `qemu` anywhere else; other known names pass
/// through unchanged.
pub fn resolve(name: &str, kvm: &KvmSupport) -> Result<(Backend, String), SelectError> {
    if name == AUTO {
        return Ok(match kvm {
            KvmSupport::Native(why) => (
                Backend::Builtin,
                format!("KVM is native ({why}): the builtin VMM runs the guest"),
            ),
            KvmSupport::Emulated(why) => (
                Backend::Qemu,
                format!(
                    "KVM is emulated ({why}): the builtin VMM cannot run guest user space here; QEMU with TCG can"
                ),
            ),
            KvmSupport::Missing(why) => (
                Backend::Qemu,
                format!("KVM is missing ({why}): QEMU with TCG runs without it"),
            ),
        });
    }
    Backend::from_name(name)
        .map(|known| (known, "configured".to_string()))
        .ok_or_else(|| SelectError::UnknownBackend { name: name.into() })
}

/// The QEMU accelerator for an `[vm] accel` setting, and why: `auto` is
/// `kvm` only on native KVM, because TCG beats emulated KVM and runs guest
/// user space where emulated KVM cannot. Settings outside [`ACCELS`] are
/// refused by the configuration's validation; here they count as `auto`.
pub fn qemu_accel(setting: &str, kvm: &KvmSupport) -> (&'static str, String) {
    match (setting, kvm) {
        ("kvm", KvmSupport::Native(_)) => ("kvm", "configured".into()),
        ("kvm", _) => (
            "kvm",
            format!(
                "configured, although KVM is {} ({})",
                kvm.state(),
                kvm.why()
            ),
        ),
        ("tcg", _) => ("tcg", "configured".into()),
        (_, KvmSupport::Native(why)) => ("kvm", format!("KVM is native ({why})")),
        (_, KvmSupport::Emulated(why)) => (
            "tcg",
            format!("KVM is emulated ({why}): TCG is faster and runs guest user space"),
        ),
        (_, KvmSupport::Missing(why)) => ("tcg", format!("KVM is missing ({why})")),
    }
}

/// Where `program` is: itself when it names a path (contains a `/`), else
/// the first executable file of that name on `PATH`.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.as_os_str().is_empty() {
        return None;
    }
    if program.components().count() > 1 || program.is_absolute() {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    find_in(program.as_os_str(), &path)
}

fn find_in(program: &OsStr, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/dev/kvm` (a plain file opens read-write like the device)
    /// and a `/sys/module` holding `modules`.
    fn host(modules: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, "").unwrap();
        let sys = dir.path().join("module");
        for module in modules {
            std::fs::create_dir_all(sys.join(module)).unwrap();
        }
        (dir, dev, sys)
    }

    fn native() -> KvmSupport {
        KvmSupport::Native("kvm_intel".into())
    }

    fn emulated() -> KvmSupport {
        KvmSupport::Emulated("kvm_pvm loaded".into())
    }

    #[test]
    fn kvm_without_a_device_node_is_missing_and_says_so() {
        let (dir, _, sys) = host(&["kvm", "kvm_intel"]);
        let support = kvm_support_in(&dir.path().join("nokvm"), &sys);
        assert!(
            matches!(&support, KvmSupport::Missing(why) if why.contains("nokvm") && why.contains("does not exist")),
            "{support:?}"
        );
    }

    #[test]
    fn kvm_that_cannot_be_opened_read_write_is_missing_and_says_so() {
        // A directory refuses a read-write open even for root.
        let (dir, _, sys) = host(&["kvm", "kvm_intel"]);
        let support = kvm_support_in(dir.path(), &sys);
        assert!(
            matches!(&support, KvmSupport::Missing(why) if why.contains("cannot be opened read-write")),
            "{support:?}"
        );
    }

    #[test]
    fn kvm_pvm_means_emulated_even_beside_kvm_intel() {
        let (_dir, dev, sys) = host(&["kvm", "kvm_intel", "kvm_pvm"]);
        let support = kvm_support_in(&dev, &sys);
        assert!(
            matches!(&support, KvmSupport::Emulated(why) if why == "kvm_pvm loaded"),
            "{support:?}"
        );
    }

    #[test]
    fn kvm_without_a_hardware_module_is_emulated() {
        let (_dir, dev, sys) = host(&["kvm"]);
        let support = kvm_support_in(&dev, &sys);
        assert!(
            matches!(&support, KvmSupport::Emulated(why) if why == "neither kvm_intel nor kvm_amd loaded"),
            "{support:?}"
        );
    }

    #[test]
    fn kvm_intel_or_kvm_amd_means_native_and_is_named() {
        for module in ["kvm_intel", "kvm_amd"] {
            let (_dir, dev, sys) = host(&["kvm", module]);
            let support = kvm_support_in(&dev, &sys);
            assert!(
                matches!(&support, KvmSupport::Native(why) if why == module),
                "{support:?}"
            );
        }
    }

    #[test]
    fn the_real_probe_answers_something() {
        let support = kvm_support();
        assert!(!support.why().is_empty());
    }

    #[test]
    fn auto_picks_builtin_on_native_kvm() {
        let (backend, why) = resolve("auto", &native()).unwrap();
        assert_eq!(backend, Backend::Builtin);
        assert!(why.contains("native"), "{why}");
    }

    #[test]
    fn auto_picks_qemu_on_emulated_kvm_and_explains_why() {
        let (backend, why) = resolve("auto", &emulated()).unwrap();
        assert_eq!(backend, Backend::Qemu);
        assert!(
            why.contains("kvm_pvm") && why.contains("builtin VMM cannot run guest user space"),
            "{why}"
        );
    }

    #[test]
    fn auto_picks_qemu_without_kvm() {
        let (backend, why) = resolve("auto", &KvmSupport::Missing("no /dev/kvm".into())).unwrap();
        assert_eq!(backend, Backend::Qemu);
        assert!(why.contains("no /dev/kvm"), "{why}");
    }

    #[test]
    fn a_named_backend_passes_through_whatever_kvm_can_do() {
        for backend in Backend::ALL {
            assert_eq!(resolve(backend.name(), &emulated()).unwrap().0, backend);
            assert_eq!(resolve(backend.name(), &native()).unwrap().0, backend);
        }
    }

    #[test]
    fn an_unknown_backend_is_refused_listing_the_known_ones() {
        let err = resolve("xen", &native()).unwrap_err().to_string();
        assert!(err.contains("\"xen\""), "{err}");
        for name in Backend::ALL.map(Backend::name).iter().chain([&AUTO]) {
            assert!(err.contains(name), "{err} lacks {name}");
        }
    }

    #[test]
    fn auto_accel_is_kvm_only_on_native_kvm() {
        assert_eq!(qemu_accel("auto", &native()).0, "kvm");
        let (accel, why) = qemu_accel("auto", &emulated());
        assert_eq!(accel, "tcg");
        assert!(why.contains("kvm_pvm"), "{why}");
        assert_eq!(
            qemu_accel("auto", &KvmSupport::Missing("gone".into())).0,
            "tcg"
        );
    }

    #[test]
    fn a_configured_accel_is_kept_and_a_doubtful_kvm_is_flagged() {
        assert_eq!(qemu_accel("tcg", &native()), ("tcg", "configured".into()));
        assert_eq!(qemu_accel("kvm", &native()), ("kvm", "configured".into()));
        let (accel, why) = qemu_accel("kvm", &emulated());
        assert_eq!(accel, "kvm");
        assert!(why.contains("emulated"), "{why}");
    }

    #[test]
    fn find_program_searches_path_for_bare_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = std::env::join_paths(["/nonexistent", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(find_in(OsStr::new("tool"), &path), Some(tool.clone()));
        assert_eq!(find_in(OsStr::new("plain"), &path), None);
        assert_eq!(find_program(&tool), Some(tool));
        assert_eq!(find_program(&plain), None);
        assert_eq!(find_program(Path::new("")), None);
    }
}
