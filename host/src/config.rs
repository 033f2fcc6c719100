//! The runtime's configuration: TOML at `/etc/kestrel/config.toml`, or the
//! file `$KESTREL_CONFIG` names. `host/config.example.toml` documents every
//! key with its default; a test keeps the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kestrel_guest_image::shape::{ShapeError, VmShape};
use kestrel_hypervisor::backend::{select, Backend, Programs};

use crate::lifecycle::registry::TombstoneLimits;
use crate::lifecycle::relist::RelistConfig;
use serde::Deserialize;

/// Where the configuration is read from unless `KESTREL_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/kestrel/config.toml";
/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "KESTREL_CONFIG";
/// The environment variable that, when set and non-empty, overrides
/// `[sandbox] hypervisor` (`kestrel run --hypervisor` sets it for its shim).
pub const HYPERVISOR_ENV: &str = "KESTREL_HYPERVISOR";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub sandbox: SandboxConfig,
    pub agent: AgentConfig,
    pub lifecycle: LifecycleConfig,
    pub vm: VmConfig,
    pub network: NetworkConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    pub hypervisor: String,
    pub agent_path: PathBuf,
    pub state_dir: PathBuf,
    pub agent_log_level: String,
    pub stop_grace_ms: u64,
    /// How a VM sandbox's containers get their rootfs and volumes.
    pub shared_fs: SharedFsMode,
}

/// `[sandbox] shared_fs`: how the VM backends give a guest the host's
/// files. The process backend's agent opens host paths itself and ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SharedFsMode {
    /// A virtiofsd per sandbox; rootfs and volumes are bind-mounted below
    /// its shared directory, nothing is copied.
    #[default]
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// No shared filesystem: rootfs and bind-mounted files are copied in
    /// through CopyFile when a container is created.
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub dial_timeout_ms: u64,
    pub dial_first_backoff_ms: u64,
    pub dial_max_backoff_ms: u64,
    pub handshake_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    pub tombstone_max_entries: usize,
    pub tombstone_max_age_s: u64,
    pub relist_period_ms: u64,
    pub relist_unhealthy_after_s: u64,
}

/// `[vm]`: the guest VM the VM backends (`builtin`, `qemu`,
/// `cloud-hypervisor`) boot, and the programs they run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// The guest kernel (`vmlinux`); empty means the one in [`guest_image_dir`].
    pub kernel: PathBuf,
    /// The initramfs; empty means the one in [`guest_image_dir`].
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The most memory a pod's VM may get, its limits included.
    pub max_memory_mib: u32,
    /// The most vCPUs a pod's VM may get.
    pub max_vcpus: u8,
    /// Appended to the backend's own kernel command line.
    pub kernel_params: String,
    /// Whether the guest's network cards offer checksum and segmentation
    /// (TSO/UFO) offloads, passed through the tap to the host's stack.
    pub net_offload: bool,
    /// The QEMU binary: a path, or a name looked up on `PATH`.
    pub qemu: PathBuf,
    /// The Cloud Hypervisor binary: a path, or a name looked up on `PATH`.
    pub cloud_hypervisor: PathBuf,
    /// The `kestrel-vmm` binary; empty means the one next to the running
    /// executable, else the one on `PATH`.
    pub vmm: PathBuf,
    /// QEMU's accelerator: `auto`, `kvm` or `tcg`.
    pub accel: String,
}

/// `[network]`: the CNI networks `kestrel run --network NAME` attaches
/// containers to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Where network NAME's configuration list is looked for.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked for, in order (`CNI_PATH`).
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        use crate::network::cni;
        NetworkConfig {
            cni_conf_dir: cni::DEFAULT_CONF_DIR.into(),
            cni_bin_dirs: cni::DEFAULT_BIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            hypervisor: select::AUTO.into(),
            agent_path: "/usr/local/bin/kestrel-agent".into(),
            state_dir: "/run/kestrel/sandboxes".into(),
            agent_log_level: "info".into(),
            stop_grace_ms: 5000,
            shared_fs: SharedFsMode::default(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        // Kata's defaults: first retry after 10 ms, give up after 10 s.
        AgentConfig {
            dial_timeout_ms: 10_000,
            dial_first_backoff_ms: 10,
            dial_max_backoff_ms: 500,
            handshake_timeout_ms: 1000,
            request_timeout_ms: 30_000,
        }
    }
}

impl Default for LifecycleConfig {
    /// The registry's and the relister's own defaults, in the file's units.
    fn default() -> Self {
        let tombstones = TombstoneLimits::default();
        let relist = RelistConfig::default();
        LifecycleConfig {
            tombstone_max_entries: tombstones.max_entries,
            tombstone_max_age_s: tombstones.max_age.as_secs(),
            relist_period_ms: relist.period.as_millis() as u64,
            relist_unhealthy_after_s: relist.unhealthy_after.as_secs(),
        }
    }
}

impl VmConfig {
    /// `memory_mib` and `vcpus` as the one shape type the launchers take.
    pub fn shape(&self) -> VmShape {
        VmShape {
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            memory_mib: VmShape::default().memory_mib,
            vcpus: VmShape::default().vcpus,
            max_memory_mib: 8192,
            max_vcpus: 8,
            kernel_params: String::new(),
            net_offload: true,
            qemu: "qemu-system-x86_64".into(),
            cloud_hypervisor: "cloud-hypervisor".into(),
            vmm: PathBuf::new(),
            accel: "auto".into(),
        }
    }
}

/// Where `kestrel image build` puts the guest image by default, and where
/// an empty `[vm] kernel` / `initrd` point.
pub fn guest_image_dir() -> PathBuf {
    kestrel_guest_image::default_cache().join("image")
}

/// The name of the builtin VMM's binary.
pub const VMM_BINARY: &str = "kestrel-vmm";

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

impl Config {
    /// Reads the configuration from `$KESTREL_CONFIG`, else from
    /// [`DEFAULT_PATH`] when it exists, else returns the defaults. A file
    /// named by the variable must exist.
    /// [`HYPERVISOR_ENV`], when set, replaces `[sandbox] hypervisor`.
    pub fn load() -> Result<Config, ConfigError> {
        let config = match Config::source() {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        match std::env::var(HYPERVISOR_ENV) {
            Ok(hypervisor) if !hypervisor.is_empty() => config.with_hypervisor(&hypervisor),
            _ => Ok(config),
        }
    }

    /// This configuration with `[sandbox] hypervisor` set to `hypervisor`,
    /// validated like the file's value.
    pub fn with_hypervisor(mut self, hypervisor: &str) -> Result<Config, ConfigError> {
        self.sandbox.hypervisor = hypervisor.to_string();
        self.validate(Path::new(HYPERVISOR_ENV))?;
        Ok(self)
    }

    /// The file [`Config::load`] reads, or `None` when it uses the defaults.
    pub fn source() -> Option<PathBuf> {
        match std::env::var_os(PATH_ENV) {
            Some(path) if !path.is_empty() => Some(path.into()),
            _ if Path::new(DEFAULT_PATH).exists() => Some(DEFAULT_PATH.into()),
            _ => None,
        }
    }

    /// The programs the VM backends run; an unset `[vm] vmm` is found next
    /// to this executable or on `PATH`.
    pub fn programs(&self) -> Programs {
        Programs {
            qemu: self.vm.qemu.clone(),
            vmm: self
                .vm
                .vmm_binary()
                .unwrap_or_else(|| PathBuf::from(VMM_BINARY)),
            cloud_hypervisor: self.vm.cloud_hypervisor.clone(),
            accel: self.vm.accel.clone(),
            virtiofsd: kestrel_hypervisor::backend::virtiofsd::DEFAULT_BINARY.into(),
        }
    }

    /// The guest VM to boot, with the empty defaults resolved.
    pub fn vm_spec(&self) -> kestrel_hypervisor::VmSpec {
        let image = guest_image_dir();
        let or_image = |path: &Path, file: &str| {
            if path.as_os_str().is_empty() {
                image.join(file)
            } else {
                path.to_path_buf()
            }
        };
        kestrel_hypervisor::VmSpec {
            kernel: or_image(&self.vm.kernel, "vmlinux"),
            initrd: or_image(&self.vm.initrd, "initrd.img"),
            shape: self.vm.shape(),
            kernel_params: self.vm.kernel_params.clone(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })
        };
        let hypervisor = self.sandbox.hypervisor.as_str();
        if hypervisor != select::AUTO && Backend::from_name(hypervisor).is_none() {
            return invalid(
                "sandbox.hypervisor",
                format!(
                    "{hypervisor:?} is not a backend this build has (have: {}, {})",
                    select::AUTO,
                    Backend::names()
                ),
            );
        }
        if !self.sandbox.agent_path.is_absolute() {
            return invalid("sandbox.agent_path", "must be an absolute path".into());
        }
        if !self.sandbox.state_dir.is_absolute() {
            return invalid("sandbox.state_dir", "must be an absolute path".into());
        }
        let root_len = self.sandbox.state_dir.as_os_str().len();
        let max_root = kestrel_hypervisor::state_dir::max_root_len();
        if root_len > max_root {
            return invalid(
                "sandbox.state_dir",
                format!(
                    "{} is {root_len} bytes long; a sandbox's sockets below it would be longer than a unix socket path may be ({} bytes): use a directory of at most {max_root} bytes",
                    self.sandbox.state_dir.display(),
                    kestrel_hypervisor::state_dir::MAX_SOCKET_PATH_LEN,
                ),
            );
        }
        if !LOG_LEVELS.contains(&self.sandbox.agent_log_level.as_str()) {
            return invalid(
                "sandbox.agent_log_level",
                format!("must be one of {}", LOG_LEVELS.join(", ")),
            );
        }
        let positive = [
            ("agent.dial_timeout_ms", self.agent.dial_timeout_ms),
            (
                "agent.dial_first_backoff_ms",
                self.agent.dial_first_backoff_ms,
            ),
            ("agent.dial_max_backoff_ms", self.agent.dial_max_backoff_ms),
            (
                "agent.handshake_timeout_ms",
                self.agent.handshake_timeout_ms,
            ),
            ("agent.request_timeout_ms", self.agent.request_timeout_ms),
            (
                "lifecycle.relist_period_ms",
                self.lifecycle.relist_period_ms,
            ),
            (
                "lifecycle.relist_unhealthy_after_s",
                self.lifecycle.relist_unhealthy_after_s,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if self.agent.dial_max_backoff_ms < self.agent.dial_first_backoff_ms {
            return invalid(
                "agent.dial_max_backoff_ms",
                "must not be smaller than agent.dial_first_backoff_ms".into(),
            );
        }
        self.validate_vm(path)?;
        self.validate_network(path)
    }

    fn validate_network(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })
        };
        let network = &self.network;
        if !network.cni_conf_dir.is_absolute() {
            return invalid("network.cni_conf_dir", "must be an absolute path".into());
        }
        if network.cni_bin_dirs.is_empty() {
            return invalid("network.cni_bin_dirs", "must name a directory".into());
        }
        for dir in &network.cni_bin_dirs {
            // CNI_PATH is ':'-separated: a ':' in a directory cannot pass.
            if !dir.is_absolute() || dir.as_os_str().as_encoded_bytes().contains(&b':') {
                return invalid(
                    "network.cni_bin_dirs",
                    format!("{} must be an absolute path without ':'", dir.display()),
                );
            }
        }
        Ok(())
    }

    fn validate_vm(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })
        };
        let vm = &self.vm;
        for (key, file) in [("vm.kernel", &vm.kernel), ("vm.initrd", &vm.initrd)] {
            if !file.as_os_str().is_empty() && !file.is_absolute() {
                return invalid(
                    key,
                    format!(
                        "{} must be an absolute path, or empty for the guest image's",
                        file.display()
                    ),
                );
            }
        }
        match vm.shape().check() {
            Ok(()) => {}
            Err(e @ ShapeError::MemoryTooSmall(_)) => {
                return invalid("vm.memory_mib", e.to_string())
            }
            Err(e @ ShapeError::Vcpus(_)) => return invalid("vm.vcpus", e.to_string()),
        }
        let most = VmShape {
            memory_mib: vm.max_memory_mib,
            vcpus: vm.max_vcpus,
        };
        match most.check() {
            Err(e @ ShapeError::Vcpus(_)) => return invalid("vm.max_vcpus", e.to_string()),
            _ if vm.max_vcpus < vm.vcpus => {
                return invalid("vm.max_vcpus", "must not be smaller than vm.vcpus".into())
            }
            _ if vm.max_memory_mib < vm.memory_mib => {
                return invalid(
                    "vm.max_memory_mib",
                    "must not be smaller than vm.memory_mib".into(),
                )
            }
            _ => {}
        }
        for (key, program) in [
            ("vm.qemu", &vm.qemu),
            ("vm.cloud_hypervisor", &vm.cloud_hypervisor),
        ] {
            if program.as_os_str().is_empty() {
                return invalid(key, "must name a program or a path".into());
            }
        }
        if !select::ACCELS.contains(&vm.accel.as_str()) {
            return invalid(
                "vm.accel",
                format!("{:?} is not one of {}", vm.accel, select::ACCELS.join(", ")),
            );
        }
        Ok(())
    }
}

impl VmConfig {
    /// The `kestrel-vmm` binary this configuration means: `vmm` as a path
    /// or a name on `PATH`; when empty, the one next to the running
    /// executable, else the one on `PATH`. `None` when there is none.
    pub fn vmm_binary(&self) -> Option<PathBuf> {
        if !self.vmm.as_os_str().is_empty() {
            return select::find_program(&self.vmm);
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(VMM_BINARY)))
            .and_then(|beside| select::find_program(&beside))
            .or_else(|| select::find_program(Path::new(VMM_BINARY)))
    }
}

impl AgentConfig {
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }
    pub fn dial_first_backoff(&self) -> Duration {
        Duration::from_millis(self.dial_first_backoff_ms)
    }
    pub fn dial_max_backoff(&self) -> Duration {
        Duration::from_millis(self.dial_max_backoff_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl LifecycleConfig {
    pub fn tombstone_max_age(&self) -> Duration {
        Duration::from_secs(self.tombstone_max_age_s)
    }
    pub fn relist_period(&self) -> Duration {
        Duration::from_millis(self.relist_period_ms)
    }
    pub fn relist_unhealthy_after(&self) -> Duration {
        Duration::from_secs(self.relist_unhealthy_after_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn the_documented_example_is_exactly_the_defaults() {
        let example = include_str!("../config.example.toml");
        assert_eq!(parse(example).unwrap(), Config::default());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn a_partial_file_overrides_only_its_keys() {
        let config = parse(
            "[sandbox]\nagent_path = \"/opt/agent\"\n[lifecycle]\ntombstone_max_entries = 8\n",
        )
        .unwrap();
        assert_eq!(config.sandbox.agent_path, Path::new("/opt/agent"));
        assert_eq!(config.lifecycle.tombstone_max_entries, 8);
        assert_eq!(config.agent, AgentConfig::default());
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let err = parse("[sandbox]\nhypervsior = \"process\"\n").unwrap_err();
        assert!(err.to_string().contains("hypervsior"), "{err}");
    }

    #[test]
    fn an_unknown_backend_is_refused_naming_those_available() {
        let err = parse("[sandbox]\nhypervisor = \"xen\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sandbox.hypervisor") && text.contains("xen"),
            "{text}"
        );
        for name in ["auto", "process", "builtin", "qemu", "cloud-hypervisor"] {
            assert!(text.contains(name), "{text} lacks {name}");
        }
    }

    #[test]
    fn shared_fs_is_virtio_fs_unless_set_to_none_and_nothing_else_goes() {
        assert_eq!(Config::default().sandbox.shared_fs, SharedFsMode::VirtioFs);
        let none = parse("[sandbox]\nshared_fs = \"none\"\n").unwrap();
        assert_eq!(none.sandbox.shared_fs, SharedFsMode::None);
        let err = parse("[sandbox]\nshared_fs = \"9p\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("9p") && text.contains("virtio-fs") && text.contains("none"),
            "{text}"
        );
    }

    #[test]
    fn every_backend_and_auto_is_accepted() {
        for name in ["auto", "process", "builtin", "qemu", "cloud-hypervisor"] {
            let config = parse(&format!("[sandbox]\nhypervisor = \"{name}\"\n")).unwrap();
            assert_eq!(config.sandbox.hypervisor, name);
        }
    }

    #[test]
    fn bad_vm_settings_are_refused_naming_the_key() {
        for (text, key, says) in [
            ("[vm]\nmemory_mib = 32\n", "vm.memory_mib", "at least 64"),
            ("[vm]\nvcpus = 0\n", "vm.vcpus", "between 1 and 32"),
            ("[vm]\nvcpus = 33\n", "vm.vcpus", "between 1 and 32"),
            ("[vm]\naccel = \"hvf\"\n", "vm.accel", "auto, kvm, tcg"),
            ("[vm]\nkernel = \"vmlinux\"\n", "vm.kernel", "absolute"),
            ("[vm]\ninitrd = \"initrd.img\"\n", "vm.initrd", "absolute"),
            ("[vm]\nqemu = \"\"\n", "vm.qemu", "program"),
            (
                "[network]\ncni_conf_dir = \"cni\"\n",
                "network.cni_conf_dir",
                "absolute",
            ),
            (
                "[network]\ncni_bin_dirs = []\n",
                "network.cni_bin_dirs",
                "a directory",
            ),
            (
                "[network]\ncni_bin_dirs = [\"/a:b\"]\n",
                "network.cni_bin_dirs",
                "without ':'",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn vm_spec_defaults_to_the_built_guest_image() {
        let spec = Config::default().vm_spec();
        assert_eq!(spec.kernel, guest_image_dir().join("vmlinux"));
        assert_eq!(spec.initrd, guest_image_dir().join("initrd.img"));
        assert_eq!((spec.shape.memory_mib, spec.shape.vcpus), (256, 1));
        assert_eq!(spec.kernel_params, "");
    }

    #[test]
    fn vm_spec_uses_configured_files_and_shape() {
        let config = parse(
            "[vm]\nkernel = \"/k/vmlinux\"\ninitrd = \"/k/initrd\"\nmemory_mib = 512\nvcpus = 4\nkernel_params = \"agent.debug\"\n",
        )
        .unwrap();
        assert_eq!(
            config.vm_spec(),
            kestrel_hypervisor::VmSpec {
                kernel: "/k/vmlinux".into(),
                initrd: "/k/initrd".into(),
                shape: VmShape {
                    memory_mib: 512,
                    vcpus: 4
                },
                kernel_params: "agent.debug".into(),
            }
        );
    }

    #[test]
    fn a_configured_vmm_that_does_not_exist_is_not_found() {
        let config = parse("[vm]\nvmm = \"/nonexistent/kestrel-vmm\"\n").unwrap();
        assert_eq!(config.vm.vmm_binary(), None);
    }

    #[test]
    fn a_state_dir_too_long_for_socket_paths_is_refused_naming_its_length() {
        let max = kestrel_hypervisor::state_dir::max_root_len();
        let fits = format!("/{}", "s".repeat(max - 1));
        parse(&format!("[sandbox]\nstate_dir = \"{fits}\"\n")).unwrap();
        let long = format!("/{}", "s".repeat(max));
        let err = parse(&format!("[sandbox]\nstate_dir = \"{long}\"\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sandbox.state_dir"), "{text}");
        assert!(text.contains(&format!("{} bytes long", max + 1)), "{text}");
        assert!(text.contains(&format!("at most {max} bytes")), "{text}");
    }

    #[test]
    fn zero_timeouts_and_relative_paths_are_refused() {
        for (text, key) in [
            (
                "[agent]\nrequest_timeout_ms = 0\n",
                "agent.request_timeout_ms",
            ),
            (
                "[lifecycle]\nrelist_period_ms = 0\n",
                "lifecycle.relist_period_ms",
            ),
            (
                "[sandbox]\nagent_path = \"kestrel-agent\"\n",
                "sandbox.agent_path",
            ),
            (
                "[sandbox]\nagent_log_level = \"loud\"\n",
                "sandbox.agent_log_level",
            ),
            (
                "[agent]\ndial_first_backoff_ms = 100\ndial_max_backoff_ms = 10\n",
                "agent.dial_max_backoff_ms",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_wrong_type_is_a_parse_error_naming_the_file() {
        let err = parse("[agent]\nrequest_timeout_ms = \"soon\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().starts_with("test.toml:"), "{err}");
    }

    #[test]
    fn a_missing_named_file_is_an_error_naming_it() {
        let err = Config::from_file(Path::new("/nonexistent/kestrel.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/kestrel.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_named_file_says_why_only_through_its_source() {
        let err = Config::from_file(Path::new("/nonexistent/kestrel.toml")).unwrap_err();
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            source.is_some_and(|s| s.contains("No such file or directory")),
            "{err}"
        );
        assert!(
            !err.to_string().contains("No such file or directory"),
            "{err}"
        );
    }
}
