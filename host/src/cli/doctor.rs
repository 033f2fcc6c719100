//! `kestrel doctor`: which hypervisor `auto` picks on this host and why, and
//! whether everything the selected one needs is present.
//!
//! Probing ([`Facts::probe`]) is kept apart from judging ([`report`]) so the
//! verdict can be tested with made-up hosts.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kestrel_guest_image::preflight::{self, Missing};
use kestrel_guest_image::Manifest;
use kestrel_host::config::{self, Config};
use kestrel_host::sandbox::{self, Health};
use kestrel_hypervisor::backend::select::{self, find_program, KvmSupport};
use kestrel_hypervisor::backend::Backend;
use serde::Serialize;

/// `kestrel doctor`'s options.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The containerd shim's binary name; containerd looks for it on `PATH`.
const SHIM: &str = "containerd-shim-kestrel-v2";
/// How long a `--version` may take before the program counts as broken.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes this host, prints the report and exits 1 when the selected
/// hypervisor lacks something.
pub fn run(args: DoctorArgs) -> Result<ExitCode> {
    let report = report(&Facts::probe());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
        if !report.ready {
            println!(
                "not ready: {} needs {}",
                report.hypervisor.selected,
                report.missing.join("; ")
            );
        }
    }
    Ok(if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A program found on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub path: PathBuf,
    /// The first line of its `--version`, when it gave one.
    pub version: Option<String>,
}

/// The guest image the configuration points at.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_present: bool,
    pub initrd_present: bool,
    /// From the `manifest.json` beside the kernel, when there is one.
    pub manifest: Option<Manifest>,
}

/// Everything `kestrel doctor` learns about the host, before judging it.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The configuration in force (the defaults when it failed to load).
    pub config: Config,
    /// The file it came from; `None` for the defaults.
    pub config_source: Option<PathBuf>,
    /// Why the configuration file could not be used.
    pub config_error: Option<String>,
    pub kvm: KvmSupport,
    pub qemu: Option<Program>,
    pub cloud_hypervisor: Option<Program>,
    pub vmm: Option<PathBuf>,
    pub containerd: Option<Program>,
    /// The shim on `PATH`.
    pub shim: Option<PathBuf>,
    /// Whether `[sandbox] agent_path` is an executable file.
    pub agent: bool,
    pub image: GuestImage,
    /// What building the guest image would need and this host lacks.
    pub kernel_build_missing: Vec<Missing>,
    /// The sandboxes under the state directory, with their health.
    pub sandboxes: Vec<(String, Health)>,
}

impl Facts {
    /// Looks at this host.
    pub fn probe() -> Facts {
        let config_source = Config::source();
        let (config, config_error) = match Config::load() {
            Ok(config) => (config, None),
            // The whole chain: a file that cannot be read says why only in its source.
            Err(e) => (
                Config::default(),
                Some(format!("{:#}", anyhow::Error::new(e))),
            ),
        };
        let program = |name: &Path| {
            find_program(name).map(|path| Program {
                version: version_of(&path),
                path,
            })
        };
        let spec = config.vm_spec();
        let manifest = spec
            .kernel
            .parent()
            .and_then(|dir| std::fs::read(dir.join("manifest.json")).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        Facts {
            config_source,
            config_error,
            kvm: select::kvm_support(),
            qemu: program(&config.vm.qemu),
            cloud_hypervisor: program(&config.vm.cloud_hypervisor),
            vmm: config.vm.vmm_binary(),
            containerd: program(Path::new("containerd")),
            shim: find_program(Path::new(SHIM)),
            agent: find_program(&config.sandbox.agent_path).is_some(),
            image: GuestImage {
                kernel_present: spec.kernel.is_file(),
                initrd_present: spec.initrd.is_file(),
                kernel: spec.kernel,
                initrd: spec.initrd,
                manifest,
            },
            kernel_build_missing: preflight::Host::current().missing(),
            sandboxes: sandbox::all_health(&config),
            config,
        }
    }
}

/// The first line `program --version` prints, without a trailing
/// parenthesis (QEMU's distribution build tag); `None` when it fails or
/// hangs.
fn version_of(program: &Path) -> Option<String> {
    let child = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(VERSION_TIMEOUT) else {
        // The waiting thread still holds the child unreaped, so the pid is
        // still this program's.
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        return None;
    };
    let output = output.ok().filter(|o| o.status.success())?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(|line| line.split(" (").next().unwrap_or(line).to_string())
}

/// The backend `[sandbox] hypervisor` means here, or the QEMU accelerator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub configured: String,
    pub selected: String,
    pub why: String,
}

/// What KVM can do here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kvm {
    /// `missing`, `emulated` or `native`.
    pub state: &'static str,
    pub why: String,
    /// What the state means for running a guest.
    pub consequence: &'static str,
    /// Whether the selected hypervisor needs native KVM.
    pub needed: bool,
}

/// One part of the stack: found or not, and whether the selected
/// hypervisor needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub present: bool,
    pub needed: bool,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    /// What was found, or what to do about its absence.
    pub detail: String,
}

impl Check {
    fn found(path: &Path, version: Option<String>, detail: impl Into<String>) -> Check {
        Check {
            present: true,
            needed: false,
            path: Some(path.to_path_buf()),
            version,
            detail: detail.into(),
        }
    }

    fn missing(detail: impl Into<String>) -> Check {
        Check {
            present: false,
            needed: false,
            path: None,
            version: None,
            detail: detail.into(),
        }
    }

    fn program(program: &Option<Program>, hint: &str) -> Check {
        match program {
            Some(p) => Check::found(&p.path, p.version.clone(), ""),
            None => Check::missing(hint),
        }
    }

    fn line(&self, selected: &str) -> String {
        if !self.present {
            let needed = if self.needed {
                format!(" (needed by {selected})")
            } else {
                String::new()
            };
            return format!("missing{needed}: {}", self.detail);
        }
        let mut line = self
            .path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let notes: Vec<&str> = [self.version.as_deref(), Some(self.detail.as_str())]
            .into_iter()
            .flatten()
            .filter(|note| !note.is_empty())
            .collect();
        if !notes.is_empty() {
            line.push_str(&format!(" ({})", notes.join("; ")));
        }
        line
    }
}

/// One running sandbox and its health (`healthy`, `unhealthy: why`,
/// `unknown`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxHealth {
    pub id: String,
    pub health: String,
}

/// `kestrel doctor`'s findings; `--json` prints exactly this.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `[sandbox] hypervisor` and the backend it means here.
    pub hypervisor: Choice,
    /// What `auto` means here, whatever is configured.
    pub auto: Choice,
    pub kvm: Kvm,
    pub qemu: Check,
    /// QEMU's accelerator (only the qemu backend uses it).
    pub accel: Choice,
    /// `kestrel-vmm`: the builtin VMM, and the qemu backend's vhost-user
    /// vsock device.
    pub vmm: Check,
    pub cloud_hypervisor: Check,
    pub containerd: Check,
    pub shim: Check,
    /// `[sandbox] agent_path`, which the process backend runs.
    pub agent: Check,
    pub guest_image: Check,
    /// What `kestrel image build` needs (tools, headers, kernel source);
    /// needed when a VM backend is selected and there is no image yet.
    pub image_build: Check,
    pub config: Check,
    /// The sandboxes running here, and whether their shims' relisters
    /// keep relisting.
    pub sandboxes: Vec<SandboxHealth>,
    /// What the selected hypervisor needs and this host lacks.
    pub missing: Vec<String>,
    /// True when nothing is missing.
    pub ready: bool,
}

/// Judges `facts`: what the configured hypervisor resolves to, and which of
/// the parts it needs are absent.
pub fn report(facts: &Facts) -> Report {
    let config = &facts.config;
    // An unknown name (possible only with a config that failed to load)
    // selects nothing and says why.
    let choose = |configured: &str| match select::resolve(configured, &facts.kvm) {
        Ok((backend, why)) => Choice {
            configured: configured.into(),
            selected: backend.name().into(),
            why,
        },
        Err(e) => Choice {
            configured: configured.into(),
            selected: String::new(),
            why: e.to_string(),
        },
    };
    let hypervisor = choose(&config.sandbox.hypervisor);
    let auto = choose(select::AUTO);
    let selected = hypervisor.selected.clone();
    let (accel, accel_why) = select::qemu_accel(&config.vm.accel, &facts.kvm);
    let backend = Backend::from_name(&selected);
    let uses_kvm = backend.is_some_and(|b| b.needs_kvm(accel));
    let is_vm = backend.is_some_and(Backend::is_vm);

    let mut qemu = Check::program(
        &facts.qemu,
        &format!(
            "{} is not installed (apt-get install qemu-system-x86)",
            config.vm.qemu.display()
        ),
    );
    qemu.needed = backend == Some(Backend::Qemu);

    let mut vmm = match &facts.vmm {
        Some(path) => Check::found(path, None, "builtin VMM; vhost-user-vsock for qemu"),
        None if config.vm.vmm.as_os_str().is_empty() => Check::missing(format!(
            "{} is neither next to this program nor on PATH (build it with cargo build -p kestrel-vmm, or set [vm] vmm)",
            config::VMM_BINARY
        )),
        None => Check::missing(format!(
            "[vm] vmm {} is not an executable file",
            config.vm.vmm.display()
        )),
    };
    vmm.needed = matches!(backend, Some(Backend::Builtin | Backend::Qemu));

    let mut cloud_hypervisor = Check::program(
        &facts.cloud_hypervisor,
        &format!("{} is not installed", config.vm.cloud_hypervisor.display()),
    );
    cloud_hypervisor.needed = backend == Some(Backend::CloudHypervisor);

    let containerd = Check::program(
        &facts.containerd,
        "containerd is not installed (apt-get install containerd); only needed to run containers through containerd",
    );
    let containerd = Check {
        version: containerd.version.as_deref().map(containerd_version),
        ..containerd
    };

    let shim = match &facts.shim {
        Some(path) => Check::found(path, None, ""),
        None => Check::missing(format!(
            "{SHIM} is not on PATH, where containerd looks for io.containerd.kestrel.v2"
        )),
    };

    let mut agent = if facts.agent {
        Check::found(&config.sandbox.agent_path, None, "")
    } else {
        Check::missing(format!(
            "[sandbox] agent_path {} is not an executable file",
            config.sandbox.agent_path.display()
        ))
    };
    agent.needed = backend == Some(Backend::Process);

    let mut guest_image = guest_image_check(&facts.image);
    guest_image.needed = is_vm;
    let mut image_build = if facts.kernel_build_missing.is_empty() {
        Check {
            present: true,
            ..Check::missing("tools, headers and kernel source present")
        }
    } else {
        Check::missing(format!(
            "{}; apt-get install {}",
            facts
                .kernel_build_missing
                .iter()
                .map(|m| m.what.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            preflight::packages(&facts.kernel_build_missing).join(" ")
        ))
    };
    image_build.needed = is_vm && !guest_image.present;

    let config_check = match (&facts.config_source, &facts.config_error) {
        (_, Some(error)) => Check {
            needed: true,
            ..Check::missing(format!("{error}; judged with the defaults"))
        },
        (Some(path), None) => Check::found(path, None, ""),
        (None, None) => Check {
            present: true,
            ..Check::missing(format!(
                "defaults (no {}, ${} unset)",
                config::DEFAULT_PATH,
                config::PATH_ENV
            ))
        },
    };

    let kvm = Kvm {
        state: facts.kvm.state(),
        why: facts.kvm.why().to_string(),
        consequence: facts.kvm.consequence(),
        needed: uses_kvm,
    };

    let mut missing = Vec::new();
    if selected.is_empty() {
        missing.push(format!("a known hypervisor: {}", hypervisor.why));
    }
    if kvm.needed && !matches!(facts.kvm, KvmSupport::Native(_)) {
        missing.push(format!(
            "KVM backed by hardware virtualization (here it is {}: {})",
            kvm.state, kvm.why
        ));
    }
    for (name, check) in [
        ("config", &config_check),
        ("qemu", &qemu),
        ("kestrel-vmm", &vmm),
        ("cloud-hypervisor", &cloud_hypervisor),
        ("the agent", &agent),
        ("the guest image", &guest_image),
        ("the guest image build", &image_build),
    ] {
        if check.needed && !check.present {
            missing.push(format!("{name} ({})", check.detail));
        }
    }

    Report {
        hypervisor,
        auto,
        kvm,
        qemu,
        accel: Choice {
            configured: config.vm.accel.clone(),
            selected: accel.to_string(),
            why: accel_why,
        },
        vmm,
        cloud_hypervisor,
        containerd,
        shim,
        agent,
        guest_image,
        image_build,
        config: config_check,
        sandboxes: facts
            .sandboxes
            .iter()
            .map(|(id, health)| SandboxHealth {
                id: id.clone(),
                health: health.to_string(),
            })
            .collect(),
        ready: missing.is_empty(),
        missing,
    }
}

/// `containerd github.com/containerd/containerd 1.6.20 …` -> `1.6.20`.
fn containerd_version(line: &str) -> String {
    line.split_whitespace()
        .nth(2)
        .filter(|_| line.starts_with("containerd "))
        .unwrap_or(line)
        .to_string()
}

fn guest_image_check(image: &GuestImage) -> Check {
    if !image.kernel_present || !image.initrd_present {
        let absent: Vec<String> = [
            (image.kernel_present, &image.kernel),
            (image.initrd_present, &image.initrd),
        ]
        .into_iter()
        .filter(|(present, _)| !present)
        .map(|(_, path)| path.display().to_string())
        .collect();
        return Check::missing(format!(
            "no {}; run kestrel image build",
            absent.join(" or ")
        ));
    }
    let same_dir = image.kernel.parent() == image.initrd.parent();
    let path = match image.kernel.parent() {
        Some(dir) if same_dir => dir.to_path_buf(),
        _ => image.kernel.clone(),
    };
    let detail = match &image.manifest {
        Some(m) => format!("kernel {}, agent {}", m.kernel_version, m.agent_version),
        None if same_dir => "no manifest.json".into(),
        None => format!("initrd {}", image.initrd.display()),
    };
    Check {
        version: image.manifest.as_ref().map(|m| m.kernel_version.clone()),
        ..Check::found(&path, None, detail)
    }
}

impl Report {
    /// How many sandboxes run, naming each that is not healthy.
    fn sandboxes_line(&self) -> String {
        if self.sandboxes.is_empty() {
            return "none running".into();
        }
        let troubled: Vec<String> = self
            .sandboxes
            .iter()
            .filter(|s| s.health != "healthy")
            .map(|s| format!("{} ({})", s.id, s.health))
            .collect();
        if troubled.is_empty() {
            format!("{} running, all healthy", self.sandboxes.len())
        } else {
            format!("{} running; {}", self.sandboxes.len(), troubled.join(", "))
        }
    }

    /// One line per part, for people.
    pub fn text(&self) -> String {
        let hypervisor = if self.hypervisor.selected.is_empty() {
            format!("{}: {}", self.hypervisor.configured, self.hypervisor.why)
        } else if self.hypervisor.configured == select::AUTO {
            format!(
                "{} -> {}: {}",
                self.hypervisor.configured, self.hypervisor.selected, self.hypervisor.why
            )
        } else {
            format!(
                "{} (configured; auto would pick {}: {})",
                self.hypervisor.selected, self.auto.selected, self.auto.why
            )
        };
        let kvm = format!(
            "{} ({}): {}{}",
            self.kvm.state,
            self.kvm.why,
            self.kvm.consequence,
            if self.kvm.needed {
                format!("; {} needs native KVM", self.hypervisor.selected)
            } else {
                String::new()
            }
        );
        let accel = format!("{}: {}", self.accel.selected, self.accel.why);
        let selected = self.hypervisor.selected.as_str();
        let config = match (&self.config.path, self.config.present) {
            (None, true) => self.config.detail.clone(),
            _ => self.config.line(selected),
        };
        // The guest image's kernel version is already in its detail.
        let guest_image = Check {
            version: None,
            ..self.guest_image.clone()
        }
        .line(selected);
        let image_build = match (&self.image_build.path, self.image_build.present) {
            (None, true) => self.image_build.detail.clone(),
            _ => self.image_build.line(selected),
        };
        let lines = [
            ("hypervisor", hypervisor),
            ("kvm", kvm),
            ("qemu", self.qemu.line(selected)),
            ("accel", accel),
            ("vmm", self.vmm.line(selected)),
            ("cloud-hypervisor", self.cloud_hypervisor.line(selected)),
            ("containerd", self.containerd.line(selected)),
            ("shim", self.shim.line(selected)),
            ("agent", self.agent.line(selected)),
            ("guest image", guest_image),
            ("image build", image_build),
            ("config", config),
            ("sandboxes", self.sandboxes_line()),
        ];
        lines
            .iter()
            .map(|(name, text)| format!("{name:<17} {text}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_guest_image::FileInfo;

    fn file(name: &str) -> FileInfo {
        FileInfo {
            file: name.into(),
            size: 1,
            sha256: "00".into(),
        }
    }

    /// A host with everything installed and emulated KVM, configured with
    /// `hypervisor`.
    fn host(hypervisor: &str) -> Facts {
        let mut config = Config::default();
        config.sandbox.hypervisor = hypervisor.into();
        let program = |path: &str, version: &str| {
            Some(Program {
                path: path.into(),
                version: Some(version.into()),
            })
        };
        Facts {
            config,
            config_source: None,
            config_error: None,
            kvm: KvmSupport::Emulated("kvm_pvm loaded".into()),
            qemu: program(
                "/usr/bin/qemu-system-x86_64",
                "QEMU emulator version 7.2.22",
            ),
            cloud_hypervisor: program("/usr/bin/cloud-hypervisor", "cloud-hypervisor v38.0"),
            vmm: Some("/opt/kestrel/kestrel-vmm".into()),
            containerd: program(
                "/usr/bin/containerd",
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1",
            ),
            shim: Some("/usr/local/bin/containerd-shim-kestrel-v2".into()),
            agent: true,
            image: GuestImage {
                kernel: "/img/vmlinux".into(),
                initrd: "/img/initrd.img".into(),
                kernel_present: true,
                initrd_present: true,
                manifest: Some(Manifest {
                    kernel_version: "6.1.158".into(),
                    kernel_source: "1-2".into(),
                    fragments_sha256: "00".into(),
                    agent_version: "0.1.0".into(),
                    agent_sha256: "00".into(),
                    vmlinux: file("vmlinux"),
                    bzimage: file("bzImage"),
                    initrd: file("initrd.img"),
                }),
            },
            kernel_build_missing: Vec::new(),
            sandboxes: Vec::new(),
        }
    }

    #[test]
    fn auto_on_emulated_kvm_picks_qemu_and_is_ready_when_all_is_there() {
        let report = report(&host("auto"));
        assert_eq!(report.hypervisor.selected, "qemu");
        assert!(report.hypervisor.why.contains("kvm_pvm"));
        assert_eq!(report.accel.selected, "tcg");
        assert!(!report.kvm.needed);
        assert!(report.ready, "{:?}", report.missing);
        let text = report.text();
        assert!(
            text.starts_with("hypervisor        auto -> qemu: KVM is emulated"),
            "{text}"
        );
    }

    #[test]
    fn qemu_without_qemu_or_the_image_is_not_ready_and_names_both() {
        let mut facts = host("qemu");
        facts.qemu = None;
        facts.image.kernel_present = false;
        let report = report(&facts);
        assert!(!report.ready);
        assert_eq!(report.missing.len(), 2, "{:?}", report.missing);
        assert!(report.missing[0].contains("apt-get install qemu-system-x86"));
        assert!(
            report.missing[1].contains("/img/vmlinux")
                && report.missing[1].contains("kestrel image build"),
            "{:?}",
            report.missing
        );
        assert!(report
            .text()
            .contains("\nqemu              missing (needed by qemu): "));
    }

    #[test]
    fn qemu_needs_the_vmm_for_its_vhost_user_vsock_device() {
        let mut facts = host("qemu");
        facts.vmm = None;
        let report = report(&facts);
        assert!(!report.ready);
        assert!(
            report.missing[0].contains("kestrel-vmm")
                && report.missing[0].contains("cargo build -p kestrel-vmm"),
            "{:?}",
            report.missing
        );
    }

    #[test]
    fn builtin_on_emulated_kvm_is_not_ready_because_guest_user_space_cannot_run() {
        let report = report(&host("builtin"));
        assert!(report.kvm.needed);
        assert!(!report.ready);
        assert!(
            report.missing[0].contains("hardware virtualization")
                && report.missing[0].contains("kvm_pvm"),
            "{:?}",
            report.missing
        );
    }

    #[test]
    fn auto_on_native_kvm_picks_builtin_and_needs_no_qemu() {
        let mut facts = host("auto");
        facts.kvm = KvmSupport::Native("kvm_intel".into());
        facts.qemu = None;
        facts.cloud_hypervisor = None;
        let report = report(&facts);
        assert_eq!(report.hypervisor.selected, "builtin");
        assert!(report.ready, "{:?}", report.missing);
        assert!(!report.qemu.present && !report.qemu.needed);
    }

    #[test]
    fn a_configured_backend_is_shown_with_what_auto_would_pick() {
        let text = report(&host("process")).text();
        assert!(
            text.starts_with(
                "hypervisor        process (configured; auto would pick qemu: KVM is emulated (kvm_pvm loaded)"
            ),
            "{text}"
        );
    }

    #[test]
    fn process_needs_only_the_agent() {
        let mut facts = host("process");
        facts.kvm = KvmSupport::Missing("/dev/kvm does not exist".into());
        facts.qemu = None;
        facts.vmm = None;
        facts.image.initrd_present = false;
        assert!(report(&facts).ready);
        facts.agent = false;
        let report = report(&facts);
        assert!(!report.ready);
        assert!(
            report.missing[0].contains("agent_path"),
            "{:?}",
            report.missing
        );
    }

    #[test]
    fn a_host_without_the_image_or_libelf_dev_names_the_package() {
        let mut facts = host("qemu");
        facts.image.kernel_present = false;
        facts.kernel_build_missing = vec![Missing {
            what: "the C header gelf.h".into(),
            package: "libelf-dev",
        }];
        let report = report(&facts);
        assert!(!report.ready);
        assert!(
            report
                .missing
                .iter()
                .any(|m| m.contains("gelf.h") && m.contains("apt-get install libelf-dev")),
            "{:?}",
            report.missing
        );
        assert!(report.text().contains(
            "image build       missing (needed by qemu): the C header gelf.h; apt-get install libelf-dev\n"
        ));
    }

    #[test]
    fn an_unhealthy_sandbox_is_named() {
        let mut facts = host("qemu");
        facts.sandboxes = vec![
            ("ok1".into(), Health::Healthy),
            (
                "stuck".into(),
                Health::Unhealthy("relister was last active 200s ago".into()),
            ),
        ];
        let text = report(&facts).text();
        assert!(
            text.contains("sandboxes         2 running; stuck (unhealthy: relister was last active 200s ago)\n"),
            "{text}"
        );
        facts.sandboxes.truncate(1);
        assert!(report(&facts).text().contains("1 running, all healthy"));
    }

    #[test]
    fn a_broken_config_file_is_reported_and_not_ready() {
        let mut facts = host("process");
        facts.config_source = Some("/etc/kestrel/config.toml".into());
        facts.config_error =
            Some("/etc/kestrel/config.toml: vm.vcpus: 0 is not between 1 and 32".into());
        let report = report(&facts);
        assert!(!report.ready);
        assert!(report.text().contains("vm.vcpus"));
    }

    #[test]
    fn json_has_one_object_per_part_and_the_verdict() {
        let json = serde_json::to_value(report(&host("auto"))).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // serde_json's map is sorted by key.
        assert_eq!(
            keys,
            [
                "accel",
                "agent",
                "auto",
                "cloud_hypervisor",
                "config",
                "containerd",
                "guest_image",
                "hypervisor",
                "image_build",
                "kvm",
                "missing",
                "qemu",
                "ready",
                "sandboxes",
                "shim",
                "vmm"
            ]
        );
        assert_eq!(json["hypervisor"]["selected"], "qemu");
        assert_eq!(json["kvm"]["state"], "emulated");
        assert_eq!(json["qemu"]["path"], "/usr/bin/qemu-system-x86_64");
        assert_eq!(json["qemu"]["needed"], true);
        assert_eq!(json["containerd"]["version"], "1.6.20~ds1");
        assert_eq!(json["guest_image"]["path"], "/img");
        assert_eq!(json["guest_image"]["version"], "6.1.158");
        assert_eq!(json["ready"], true);
    }

    #[test]
    fn text_has_one_line_per_part() {
        let text = report(&host("auto")).text();
        let names: Vec<&str> = text.lines().map(|l| l[..17].trim_end()).collect();
        assert_eq!(
            names,
            [
                "hypervisor",
                "kvm",
                "qemu",
                "accel",
                "vmm",
                "cloud-hypervisor",
                "containerd",
                "shim",
                "agent",
                "guest image",
                "image build",
                "config",
                "sandboxes"
            ]
        );
        assert!(
            text.contains("guest image       /img (kernel 6.1.158, agent 0.1.0)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "qemu              /usr/bin/qemu-system-x86_64 (QEMU emulator version 7.2.22)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_real_probe_runs_on_this_host() {
        let report = report(&Facts::probe());
        assert!(!report.kvm.why.is_empty());
        serde_json::to_string(&report).unwrap();
        assert_eq!(report.text().lines().count(), 13);
    }
}
