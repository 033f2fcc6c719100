//! A bundle's `config.json` as the Kata agent API carries it: reads the OCI
//! runtime spec that containerd hands the shim and converts it into the
//! `oci::Spec` message that CreateContainer sends to the guest.
//!
//! oci-spec parses the file. The mapping onto `oci.proto` is written out
//! field by field because the proto is Kata's wire format, not something a
//! crate generates: its integers are sometimes narrower than the runtime
//! spec's (and never silently truncated here), and enum values travel as
//! the strings `config.json` uses ("network", "CAP_CHOWN", "SCMP_ACT_ERRNO"),
//! which is what the agent matches on. oci-spec's `Display` spells some of
//! them differently ("net", "CHOWN"), so names are taken from its serde form.
//!
//! Parts of the runtime spec that `oci.proto` has no field for (the
//! createRuntime/createContainer/startContainer hooks, `process.user.umask`,
//! `linux.resources.unified`, ...) cannot reach the agent; they are dropped
//! with a warning that names them.

use std::io;
use std::path::{Path, PathBuf};

use kestrel_protocols::oci;
use kestrel_protocols::protobuf::MessageField;
use oci_spec::runtime as rt;
use serde::Serialize;

/// The annotation containerd's CRI plugin sets on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

const CONFIG_FILE: &str = "config.json";

/// How much of the text before a parse error is quoted in the message.
/// containerd writes `config.json` on a single line, so the line number
/// alone does not say which field is wrong; the key just before it does.
const ERROR_CONTEXT_BYTES: usize = 48;

/// Errors reading or converting a bundle's config.json.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The file is not an OCI runtime spec: bad JSON, a value of the wrong
    /// type, a required field missing.
    #[error("{path} is not a valid OCI runtime spec: {message}")]
    Parse { path: PathBuf, message: String },
    /// A well-formed value that the agent API cannot carry.
    #[error("invalid OCI runtime spec: {0}")]
    Invalid(String),
}

/// Reads `<bundle>/config.json` and converts it.
pub fn load_bundle_spec(bundle: &Path) -> Result<oci::Spec, SpecError> {
    let path = bundle.join(CONFIG_FILE);
    let json = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&json, &path)
}

/// Converts an OCI runtime spec in JSON form.
pub fn spec_from_json(json: &[u8]) -> Result<oci::Spec, SpecError> {
    parse(json, Path::new(CONFIG_FILE))
}

/// Converts an exec's OCI `Process` in JSON form (containerd's
/// ExecProcessRequest carries one); `what` names it in errors.
pub fn process_from_json(json: &[u8], what: &str) -> Result<oci::Process, SpecError> {
    let p: rt::Process = serde_json::from_slice(json).map_err(|e| SpecError::Parse {
        path: PathBuf::from(what),
        message: describe_json_error(&e, json),
    })?;
    process(&p)
}

/// Converts OCI `LinuxResources` in JSON form (containerd's Update carries
/// them); `what` names them in errors.
pub fn resources_from_json(json: &[u8], what: &str) -> Result<oci::LinuxResources, SpecError> {
    let r: rt::LinuxResources = serde_json::from_slice(json).map_err(|e| SpecError::Parse {
        path: PathBuf::from(what),
        message: describe_json_error(&e, json),
    })?;
    resources(&r)
}

/// The sandbox a container belongs to: the [`SANDBOX_ID_ANNOTATION`] value,
/// else the container's own id.
pub fn sandbox_id<'a>(spec: &'a oci::Spec, container_id: &'a str) -> &'a str {
    spec.Annotations
        .get(SANDBOX_ID_ANNOTATION)
        .map(String::as_str)
        .filter(|id| !id.is_empty())
        .unwrap_or(container_id)
}

fn parse(json: &[u8], path: &Path) -> Result<oci::Spec, SpecError> {
    let parse_error = |message: String| SpecError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let spec: rt::Spec =
        serde_json::from_slice(json).map_err(|e| parse_error(describe_json_error(&e, json)))?;
    // oci-spec defaults a missing ociVersion to "", which would let any JSON
    // object (`{}` included) pass for an empty container.
    if spec.version().is_empty() {
        return Err(parse_error("ociVersion is missing or empty".into()));
    }
    let dropped = fields_without_counterpart(&spec);
    if !dropped.is_empty() {
        tracing::warn!(
            path = %path.display(),
            fields = ?dropped,
            "the OCI spec sets fields the Kata agent API cannot carry; they are ignored"
        );
    }
    convert(&spec)
}

fn describe_json_error(err: &serde_json::Error, json: &[u8]) -> String {
    let context = err.line().checked_sub(1).and_then(|line| {
        let text = json.split(|&b| b == b'\n').nth(line)?;
        let end = err.column().min(text.len());
        // The cut may split a multi-byte character; the lossy conversion
        // turns that edge into U+FFFD, which is fine for a message.
        let quoted = String::from_utf8_lossy(&text[end.saturating_sub(ERROR_CONTEXT_BYTES)..end]);
        let quoted = quoted.trim();
        (!quoted.is_empty()).then(|| quoted.to_string())
    });
    match context {
        Some(quoted) => format!("{err} (near `{quoted}`)"),
        None => err.to_string(),
    }
}

/// The runtime-spec fields this spec sets that `oci.proto` has no place
/// for, named as in `config.json`.
fn fields_without_counterpart(spec: &rt::Spec) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut note = |set: bool, name: &'static str| {
        if set {
            found.push(name);
        }
    };
    note(spec.domainname().is_some(), "domainname");
    if let Some(p) = spec.process() {
        note(p.user().umask().is_some(), "process.user.umask");
        note(p.io_priority().is_some(), "process.ioPriority");
        note(p.scheduler().is_some(), "process.scheduler");
        note(p.exec_cpu_affinity().is_some(), "process.execCPUAffinity");
    }
    if let Some(h) = spec.hooks() {
        note(h.create_runtime().is_some(), "hooks.createRuntime");
        note(h.create_container().is_some(), "hooks.createContainer");
        note(h.start_container().is_some(), "hooks.startContainer");
    }
    note(
        spec.mounts()
            .iter()
            .flatten()
            .any(|m| m.uid_mappings().is_some() || m.gid_mappings().is_some()),
        "mounts[].uidMappings/gidMappings",
    );
    if let Some(l) = spec.linux() {
        note(l.net_devices().is_some(), "linux.netDevices");
        note(l.memory_policy().is_some(), "linux.memoryPolicy");
        note(l.personality().is_some(), "linux.personality");
        note(l.time_offsets().is_some(), "linux.timeOffsets");
        if let Some(r) = l.resources() {
            note(r.rdma().is_some(), "linux.resources.rdma");
            note(r.unified().is_some(), "linux.resources.unified");
            if let Some(m) = r.memory() {
                note(
                    m.use_hierarchy().is_some(),
                    "linux.resources.memory.useHierarchy",
                );
                note(
                    m.check_before_update().is_some(),
                    "linux.resources.memory.checkBeforeUpdate",
                );
            }
            if let Some(c) = r.cpu() {
                note(c.idle().is_some(), "linux.resources.cpu.idle");
                note(c.burst().is_some(), "linux.resources.cpu.burst");
            }
        }
        if let Some(s) = l.seccomp() {
            // The agent answers SCMP_ACT_ERRNO without an errno with EPERM,
            // as runc does: docker's defaultErrnoRet of EPERM loses nothing.
            note(
                s.default_errno_ret()
                    .is_some_and(|e| e != libc::EPERM as u32),
                "linux.seccomp.defaultErrnoRet",
            );
            note(s.listener_path().is_some(), "linux.seccomp.listenerPath");
            note(
                s.listener_metadata().is_some(),
                "linux.seccomp.listenerMetadata",
            );
        }
        if let Some(rdt) = l.intel_rdt() {
            note(rdt.clos_id().is_some(), "linux.intelRdt.closID");
            note(rdt.schemata().is_some(), "linux.intelRdt.schemata");
            note(rdt.mem_bw_schema().is_some(), "linux.intelRdt.memBwSchema");
            note(
                rdt.enable_monitoring().is_some(),
                "linux.intelRdt.enableMonitoring",
            );
        }
    }
    found
}

fn convert(spec: &rt::Spec) -> Result<oci::Spec, SpecError> {
    Ok(oci::Spec {
        Version: spec.version().clone(),
        Process: spec.process().as_ref().map(process).transpose()?.into(),
        Root: spec
            .root()
            .as_ref()
            .map(|r| oci::Root {
                Path: path_string(r.path()),
                Readonly: r.readonly().unwrap_or_default(),
                ..Default::default()
            })
            .into(),
        Hostname: opt_string(spec.hostname()),
        Mounts: spec.mounts().iter().flatten().map(mount).collect(),
        Hooks: spec.hooks().as_ref().map(hooks).into(),
        Annotations: spec.annotations().clone().unwrap_or_default(),
        Linux: spec.linux().as_ref().map(linux).transpose()?.into(),
        ..Default::default()
    })
}

fn process(p: &rt::Process) -> Result<oci::Process, SpecError> {
    let console_size = p
        .console_size()
        .map(|b| {
            Ok::<_, SpecError>(oci::Box {
                Height: narrow_u32(b.height(), "process.consoleSize.height")?,
                Width: narrow_u32(b.width(), "process.consoleSize.width")?,
                ..Default::default()
            })
        })
        .transpose()?;
    let user = p.user();
    Ok(oci::Process {
        Terminal: p.terminal().unwrap_or_default(),
        ConsoleSize: console_size.into(),
        User: MessageField::some(oci::User {
            UID: user.uid(),
            GID: user.gid(),
            AdditionalGids: opt_vec(user.additional_gids()),
            Username: opt_string(user.username()),
            ..Default::default()
        }),
        Args: opt_vec(p.args()),
        Env: opt_vec(p.env()),
        Cwd: path_string(p.cwd()),
        Capabilities: p
            .capabilities()
            .as_ref()
            .map(capabilities)
            .transpose()?
            .into(),
        Rlimits: p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| {
                Ok(oci::POSIXRlimit {
                    Type: oci_name(&r.typ(), "process.rlimits[].type")?,
                    Hard: r.hard(),
                    Soft: r.soft(),
                    ..Default::default()
                })
            })
            .collect::<Result<_, SpecError>>()?,
        NoNewPrivileges: p.no_new_privileges().unwrap_or_default(),
        ApparmorProfile: opt_string(p.apparmor_profile()),
        OOMScoreAdj: p.oom_score_adj().map_or(0, i64::from),
        SelinuxLabel: opt_string(p.selinux_label()),
        ..Default::default()
    })
}

fn capabilities(c: &rt::LinuxCapabilities) -> Result<oci::LinuxCapabilities, SpecError> {
    Ok(oci::LinuxCapabilities {
        Bounding: capability_names(c.bounding(), "process.capabilities.bounding")?,
        Effective: capability_names(c.effective(), "process.capabilities.effective")?,
        Inheritable: capability_names(c.inheritable(), "process.capabilities.inheritable")?,
        Permitted: capability_names(c.permitted(), "process.capabilities.permitted")?,
        Ambient: capability_names(c.ambient(), "process.capabilities.ambient")?,
        ..Default::default()
    })
}

fn capability_names(
    set: &Option<rt::Capabilities>,
    field: &'static str,
) -> Result<Vec<String>, SpecError> {
    let mut names = set
        .iter()
        .flatten()
        .map(|c| oci_name(c, field))
        .collect::<Result<Vec<_>, _>>()?;
    // oci-spec keeps capabilities in a HashSet, whose order differs from run
    // to run; sorted, the same file always gives the same message.
    names.sort();
    Ok(names)
}

fn mount(m: &rt::Mount) -> oci::Mount {
    oci::Mount {
        destination: path_string(m.destination()),
        source: m.source().as_deref().map(path_string).unwrap_or_default(),
        type_: opt_string(m.typ()),
        options: opt_vec(m.options()),
        ..Default::default()
    }
}

fn hooks(h: &rt::Hooks) -> oci::Hooks {
    let list = |hooks: &Option<Vec<rt::Hook>>| -> Vec<oci::Hook> {
        hooks
            .iter()
            .flatten()
            .map(|hook| oci::Hook {
                Path: path_string(hook.path()),
                Args: opt_vec(hook.args()),
                Env: opt_vec(hook.env()),
                Timeout: hook.timeout().unwrap_or_default(),
                ..Default::default()
            })
            .collect()
    };
    oci::Hooks {
        // The runtime spec deprecates prestart in favour of createRuntime and
        // friends, but prestart is the one oci.proto carries, and Docker and
        // containerd still write it.
        Prestart: list(h.prestart()),
        Poststart: list(h.poststart()),
        Poststop: list(h.poststop()),
        ..Default::default()
    }
}

fn linux(l: &rt::Linux) -> Result<oci::Linux, SpecError> {
    let id_mappings = |maps: &Option<Vec<rt::LinuxIdMapping>>| -> Vec<oci::LinuxIDMapping> {
        maps.iter()
            .flatten()
            .map(|m| oci::LinuxIDMapping {
                HostID: m.host_id(),
                ContainerID: m.container_id(),
                Size: m.size(),
                ..Default::default()
            })
            .collect()
    };
    Ok(oci::Linux {
        UIDMappings: id_mappings(l.uid_mappings()),
        GIDMappings: id_mappings(l.gid_mappings()),
        Sysctl: l.sysctl().clone().unwrap_or_default(),
        Resources: l.resources().as_ref().map(resources).transpose()?.into(),
        CgroupsPath: l
            .cgroups_path()
            .as_deref()
            .map(path_string)
            .unwrap_or_default(),
        Namespaces: l
            .namespaces()
            .iter()
            .flatten()
            .map(|ns| {
                Ok(oci::LinuxNamespace {
                    Type: oci_name(&ns.typ(), "linux.namespaces[].type")?,
                    Path: ns.path().as_deref().map(path_string).unwrap_or_default(),
                    ..Default::default()
                })
            })
            .collect::<Result<_, SpecError>>()?,
        Devices: l
            .devices()
            .iter()
            .flatten()
            .map(|d| oci::LinuxDevice {
                Path: path_string(d.path()),
                Type: d.typ().as_str().to_string(),
                Major: d.major(),
                Minor: d.minor(),
                FileMode: d.file_mode().unwrap_or_default(),
                UID: d.uid().unwrap_or_default(),
                GID: d.gid().unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        Seccomp: l.seccomp().as_ref().map(seccomp).transpose()?.into(),
        RootfsPropagation: opt_string(l.rootfs_propagation()),
        MaskedPaths: opt_vec(l.masked_paths()),
        ReadonlyPaths: opt_vec(l.readonly_paths()),
        MountLabel: opt_string(l.mount_label()),
        IntelRdt: l
            .intel_rdt()
            .as_ref()
            .map(|rdt| oci::LinuxIntelRdt {
                L3CacheSchema: opt_string(rdt.l3_cache_schema()),
                ..Default::default()
            })
            .into(),
        ..Default::default()
    })
}

fn resources(r: &rt::LinuxResources) -> Result<oci::LinuxResources, SpecError> {
    Ok(oci::LinuxResources {
        Devices: r
            .devices()
            .iter()
            .flatten()
            .map(|d| oci::LinuxDeviceCgroup {
                Allow: d.allow(),
                Type: d.typ().map(|t| t.as_str().to_string()).unwrap_or_default(),
                // oci.proto cannot tell an absent major or minor (the `*`
                // wildcard) from 0. Kata sends 0 and reads anything not
                // positive back as the wildcard; this does the same.
                Major: d.major().unwrap_or_default(),
                Minor: d.minor().unwrap_or_default(),
                Access: opt_string(d.access()),
                ..Default::default()
            })
            .collect(),
        Memory: r
            .memory()
            .as_ref()
            .map(|m| oci::LinuxMemory {
                Limit: m.limit().unwrap_or_default(),
                Reservation: m.reservation().unwrap_or_default(),
                Swap: m.swap().unwrap_or_default(),
                // Deprecated in the runtime spec and ignored by kernels since
                // 5.16, but a Kata agent on an older guest kernel applies it.
                Kernel: m.kernel().unwrap_or_default(),
                KernelTCP: m.kernel_tcp().unwrap_or_default(),
                Swappiness: m.swappiness().unwrap_or_default(),
                DisableOOMKiller: m.disable_oom_killer().unwrap_or_default(),
                ..Default::default()
            })
            .into(),
        CPU: r
            .cpu()
            .as_ref()
            .map(|c| oci::LinuxCPU {
                Shares: c.shares().unwrap_or_default(),
                Quota: c.quota().unwrap_or_default(),
                Period: c.period().unwrap_or_default(),
                RealtimeRuntime: c.realtime_runtime().unwrap_or_default(),
                RealtimePeriod: c.realtime_period().unwrap_or_default(),
                Cpus: opt_string(c.cpus()),
                Mems: opt_string(c.mems()),
                ..Default::default()
            })
            .into(),
        Pids: r
            .pids()
            .as_ref()
            .map(|p| oci::LinuxPids {
                Limit: p.limit(),
                ..Default::default()
            })
            .into(),
        BlockIO: r.block_io().as_ref().map(block_io).into(),
        HugepageLimits: r
            .hugepage_limits()
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, h)| {
                let limit = u64::try_from(h.limit()).map_err(|_| {
                    SpecError::Invalid(format!(
                        "linux.resources.hugepageLimits[{i}].limit is {}; it must not be negative",
                        h.limit()
                    ))
                })?;
                Ok(oci::LinuxHugepageLimit {
                    Pagesize: h.page_size().clone(),
                    Limit: limit,
                    ..Default::default()
                })
            })
            .collect::<Result<_, SpecError>>()?,
        Network: r
            .network()
            .as_ref()
            .map(|n| oci::LinuxNetwork {
                ClassID: n.class_id().unwrap_or_default(),
                Priorities: n
                    .priorities()
                    .iter()
                    .flatten()
                    .map(|p| oci::LinuxInterfacePriority {
                        Name: p.name().clone(),
                        Priority: p.priority(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .into(),
        ..Default::default()
    })
}

fn block_io(b: &rt::LinuxBlockIo) -> oci::LinuxBlockIO {
    let throttles =
        |devices: &Option<Vec<rt::LinuxThrottleDevice>>| -> Vec<oci::LinuxThrottleDevice> {
            devices
                .iter()
                .flatten()
                .map(|d| oci::LinuxThrottleDevice {
                    Major: d.major(),
                    Minor: d.minor(),
                    Rate: d.rate(),
                    ..Default::default()
                })
                .collect()
        };
    oci::LinuxBlockIO {
        Weight: b.weight().map_or(0, u32::from),
        LeafWeight: b.leaf_weight().map_or(0, u32::from),
        WeightDevice: b
            .weight_device()
            .iter()
            .flatten()
            .map(|d| oci::LinuxWeightDevice {
                Major: d.major(),
                Minor: d.minor(),
                Weight: d.weight().map_or(0, u32::from),
                LeafWeight: d.leaf_weight().map_or(0, u32::from),
                ..Default::default()
            })
            .collect(),
        ThrottleReadBpsDevice: throttles(b.throttle_read_bps_device()),
        ThrottleWriteBpsDevice: throttles(b.throttle_write_bps_device()),
        ThrottleReadIOPSDevice: throttles(b.throttle_read_iops_device()),
        ThrottleWriteIOPSDevice: throttles(b.throttle_write_iops_device()),
        ..Default::default()
    }
}

fn seccomp(s: &rt::LinuxSeccomp) -> Result<oci::LinuxSeccomp, SpecError> {
    Ok(oci::LinuxSeccomp {
        DefaultAction: oci_name(&s.default_action(), "linux.seccomp.defaultAction")?,
        Architectures: s
            .architectures()
            .iter()
            .flatten()
            .map(|a| oci_name(a, "linux.seccomp.architectures"))
            .collect::<Result<_, _>>()?,
        Flags: s
            .flags()
            .iter()
            .flatten()
            .map(|f| oci_name(f, "linux.seccomp.flags"))
            .collect::<Result<_, _>>()?,
        Syscalls: s
            .syscalls()
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, sc)| syscall(i, sc))
            .collect::<Result<_, _>>()?,
        ..Default::default()
    })
}

fn syscall(i: usize, sc: &rt::LinuxSyscall) -> Result<oci::LinuxSyscall, SpecError> {
    Ok(oci::LinuxSyscall {
        Names: sc.names().clone(),
        Action: oci_name(&sc.action(), "linux.seccomp.syscalls[].action")?,
        // The oneof keeps "no errnoRet" apart from errno 0, so the agent's
        // default (EPERM) applies only where the spec sets none.
        ErrnoRet: sc.errno_ret().map(oci::linux_syscall::ErrnoRet::Errnoret),
        Args: sc
            .args()
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, a)| {
                Ok(oci::LinuxSeccompArg {
                    Index: u64::try_from(a.index()).map_err(|_| {
                        SpecError::Invalid(format!(
                            "linux.seccomp.syscalls[{i}].args[{j}].index {} does not fit in 64 bits",
                            a.index()
                        ))
                    })?,
                    Value: a.value(),
                    ValueTwo: a.value_two().unwrap_or_default(),
                    Op: oci_name(&a.op(), "linux.seccomp.syscalls[].args[].op")?,
                    ..Default::default()
                })
            })
            .collect::<Result<_, SpecError>>()?,
        ..Default::default()
    })
}

/// The `config.json` spelling of an oci-spec enum value. Its serde form is
/// exactly what was parsed; its `Display` is not always (namespace "net",
/// capability "CHOWN").
fn oci_name<T: Serialize>(value: &T, field: &'static str) -> Result<String, SpecError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => Ok(name),
        _ => Err(SpecError::Invalid(format!("{field} has no OCI name"))),
    }
}

fn narrow_u32(value: u64, field: &'static str) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| {
        SpecError::Invalid(format!(
            "{field} is {value}, more than the agent API can carry ({})",
            u32::MAX
        ))
    })
}

/// Paths in the spec came from JSON strings, so they are UTF-8 and the
/// lossy conversion loses nothing.
fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn opt_string(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn opt_vec<T: Clone>(value: &Option<Vec<T>>) -> Vec<T> {
    value.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_protocols::protobuf::Message;

    /// What `ctr run --rootfs /tmp/alpine-rootfs --hostname demo demo sh -c
    /// 'echo hello'` writes (containerd 1.7, laid out for reading).
    const CTR_RUN_ROOTFS: &str = r#"{
  "ociVersion": "1.1.0",
  "process": {
    "user": { "uid": 0, "gid": 0, "additionalGids": [0, 10] },
    "args": ["sh", "-c", "echo hello"],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
    "capabilities": {
      "bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
        "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP",
        "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
        "CAP_AUDIT_WRITE"],
      "effective": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
        "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP",
        "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
        "CAP_AUDIT_WRITE"],
      "permitted": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
        "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP",
        "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
        "CAP_AUDIT_WRITE"]
    },
    "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
    "noNewPrivileges": true
  },
  "root": { "path": "/tmp/alpine-rootfs" },
  "hostname": "demo",
  "mounts": [
    { "destination": "/proc", "type": "proc", "source": "proc",
      "options": ["nosuid", "noexec", "nodev"] },
    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
      "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
    { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
      "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
    { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
      "options": ["nosuid", "noexec", "nodev"] },
    { "destination": "/sys", "type": "sysfs", "source": "sysfs",
      "options": ["nosuid", "noexec", "nodev", "ro"] },
    { "destination": "/run", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }
  ],
  "linux": {
    "resources": {
      "devices": [
        { "allow": false, "access": "rwm" },
        { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm" },
        { "allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm" },
        { "allow": true, "type": "c", "major": 136, "access": "rwm" }
      ]
    },
    "cgroupsPath": "/default/demo",
    "namespaces": [
      { "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
      { "type": "mount" }, { "type": "network" }
    ],
    "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
      "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
      "/proc/sched_debug", "/sys/firmware", "/sys/devices/virtual/powercap",
      "/proc/scsi"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
      "/proc/sysrq-trigger"]
  }
}"#;

    /// A minimal spec with `linux` set to the given JSON object body.
    fn with_linux(linux: &str) -> String {
        format!(r#"{{"ociVersion": "1.1.0", "linux": {linux}}}"#)
    }

    fn convert_ok(json: &str) -> oci::Spec {
        spec_from_json(json.as_bytes()).expect("spec converts")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ctr_run_rootfs_spec_converts_with_every_field() {
        let spec = convert_ok(CTR_RUN_ROOTFS);

        assert_eq!(spec.Version, "1.1.0");
        assert_eq!(spec.Hostname, "demo");
        assert!(spec.Annotations.is_empty());
        assert!(spec.Hooks.is_none());
        assert_eq!(spec.Root.Path, "/tmp/alpine-rootfs");
        assert!(!spec.Root.Readonly);

        let p = &spec.Process;
        assert!(!p.Terminal);
        assert!(p.ConsoleSize.is_none());
        assert_eq!((p.User.UID, p.User.GID), (0, 0));
        assert_eq!(p.User.AdditionalGids, vec![0, 10]);
        assert_eq!(p.User.Username, "");
        assert_eq!(p.Args, strings(&["sh", "-c", "echo hello"]));
        assert_eq!(
            p.Env,
            strings(&["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        );
        assert_eq!(p.Cwd, "/");
        let mut caps = strings(&[
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FSETID",
            "CAP_FOWNER",
            "CAP_MKNOD",
            "CAP_NET_RAW",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETFCAP",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_KILL",
            "CAP_AUDIT_WRITE",
        ]);
        caps.sort();
        assert_eq!(p.Capabilities.Bounding, caps);
        assert_eq!(p.Capabilities.Effective, caps);
        assert_eq!(p.Capabilities.Permitted, caps);
        assert!(p.Capabilities.Inheritable.is_empty());
        assert!(p.Capabilities.Ambient.is_empty());
        assert_eq!(p.Rlimits.len(), 1);
        assert_eq!(p.Rlimits[0].Type, "RLIMIT_NOFILE");
        assert_eq!((p.Rlimits[0].Soft, p.Rlimits[0].Hard), (1024, 1024));
        assert!(p.NoNewPrivileges);
        assert_eq!(p.ApparmorProfile, "");
        assert_eq!(p.OOMScoreAdj, 0);
        assert_eq!(p.SelinuxLabel, "");

        let mounts: Vec<(&str, &str, &str, Vec<&str>)> = spec
            .Mounts
            .iter()
            .map(|m| {
                (
                    m.destination.as_str(),
                    m.type_.as_str(),
                    m.source.as_str(),
                    m.options.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            mounts,
            vec![
                ("/proc", "proc", "proc", vec!["nosuid", "noexec", "nodev"]),
                (
                    "/dev",
                    "tmpfs",
                    "tmpfs",
                    vec!["nosuid", "strictatime", "mode=755", "size=65536k"]
                ),
                (
                    "/dev/pts",
                    "devpts",
                    "devpts",
                    vec![
                        "nosuid",
                        "noexec",
                        "newinstance",
                        "ptmxmode=0666",
                        "mode=0620",
                        "gid=5"
                    ]
                ),
                (
                    "/dev/shm",
                    "tmpfs",
                    "shm",
                    vec!["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                ),
                (
                    "/dev/mqueue",
                    "mqueue",
                    "mqueue",
                    vec!["nosuid", "noexec", "nodev"]
                ),
                (
                    "/sys",
                    "sysfs",
                    "sysfs",
                    vec!["nosuid", "noexec", "nodev", "ro"]
                ),
                (
                    "/run",
                    "tmpfs",
                    "tmpfs",
                    vec!["nosuid", "strictatime", "mode=755", "size=65536k"]
                ),
            ]
        );

        let l = &spec.Linux;
        assert_eq!(l.CgroupsPath, "/default/demo");
        let namespaces: Vec<(&str, &str)> = l
            .Namespaces
            .iter()
            .map(|ns| (ns.Type.as_str(), ns.Path.as_str()))
            .collect();
        assert_eq!(
            namespaces,
            vec![
                ("pid", ""),
                ("ipc", ""),
                ("uts", ""),
                ("mount", ""),
                ("network", "")
            ]
        );
        let rules: Vec<(bool, &str, i64, i64, &str)> = l
            .Resources
            .Devices
            .iter()
            .map(|d| {
                (
                    d.Allow,
                    d.Type.as_str(),
                    d.Major,
                    d.Minor,
                    d.Access.as_str(),
                )
            })
            .collect();
        assert_eq!(
            rules,
            vec![
                (false, "", 0, 0, "rwm"),
                (true, "c", 1, 3, "rwm"),
                (true, "c", 5, 0, "rwm"),
                (true, "c", 136, 0, "rwm"),
            ]
        );
        assert!(l.Resources.Memory.is_none());
        assert!(l.Resources.CPU.is_none());
        assert!(l.Resources.Pids.is_none());
        assert!(l.Resources.BlockIO.is_none());
        assert!(l.Resources.HugepageLimits.is_empty());
        assert!(l.Resources.Network.is_none());
        assert_eq!(l.MaskedPaths.len(), 11);
        assert_eq!(l.MaskedPaths[0], "/proc/acpi");
        assert_eq!(l.MaskedPaths[10], "/proc/scsi");
        assert_eq!(
            l.ReadonlyPaths,
            strings(&[
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ])
        );
        assert!(l.UIDMappings.is_empty());
        assert!(l.GIDMappings.is_empty());
        assert!(l.Sysctl.is_empty());
        assert!(l.Devices.is_empty());
        assert!(l.Seccomp.is_none());
        assert_eq!(l.RootfsPropagation, "");
        assert_eq!(l.MountLabel, "");
        assert!(l.IntelRdt.is_none());
        assert!(spec.Solaris.is_none());
        assert!(spec.Windows.is_none());
    }

    #[test]
    fn ctr_run_rootfs_spec_survives_the_wire() {
        let spec = convert_ok(CTR_RUN_ROOTFS);
        let bytes = spec.write_to_bytes().expect("encodes");
        assert_eq!(oci::Spec::parse_from_bytes(&bytes).expect("decodes"), spec);
    }

    #[test]
    fn memory_cpu_and_pids_limits_are_carried() {
        let spec = convert_ok(&with_linux(
            r#"{"resources": {
                "memory": {"limit": 536870912, "reservation": 268435456,
                           "swap": 1073741824, "kernel": -1, "kernelTCP": 1048576,
                           "swappiness": 60, "disableOOMKiller": true},
                "cpu": {"shares": 512, "quota": 50000, "period": 100000,
                        "realtimeRuntime": 950000, "realtimePeriod": 1000000,
                        "cpus": "0-1", "mems": "0"},
                "pids": {"limit": 64}
            }}"#,
        ));
        let r = &spec.Linux.Resources;
        let m = &r.Memory;
        assert_eq!(m.Limit, 512 << 20);
        assert_eq!(m.Reservation, 256 << 20);
        assert_eq!(m.Swap, 1 << 30);
        assert_eq!(m.Kernel, -1);
        assert_eq!(m.KernelTCP, 1 << 20);
        assert_eq!(m.Swappiness, 60);
        assert!(m.DisableOOMKiller);
        let c = &r.CPU;
        assert_eq!((c.Shares, c.Quota, c.Period), (512, 50_000, 100_000));
        assert_eq!((c.RealtimeRuntime, c.RealtimePeriod), (950_000, 1_000_000));
        assert_eq!((c.Cpus.as_str(), c.Mems.as_str()), ("0-1", "0"));
        assert_eq!(r.Pids.Limit, 64);
    }

    #[test]
    fn unlimited_memory_and_cpu_quota_stay_negative() {
        let spec = convert_ok(&with_linux(
            r#"{"resources": {"memory": {"limit": -1, "swap": -1},
                              "cpu": {"quota": -1}, "pids": {"limit": -1}}}"#,
        ));
        let r = &spec.Linux.Resources;
        assert_eq!((r.Memory.Limit, r.Memory.Swap), (-1, -1));
        assert_eq!(r.CPU.Quota, -1);
        assert_eq!(r.Pids.Limit, -1);
    }

    #[test]
    fn block_io_hugepage_and_network_resources_are_carried() {
        let spec = convert_ok(&with_linux(
            r#"{"resources": {
                "blockIO": {
                    "weight": 500, "leafWeight": 300,
                    "weightDevice": [{"major": 8, "minor": 0, "weight": 700, "leafWeight": 100}],
                    "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
                    "throttleWriteBpsDevice": [{"major": 8, "minor": 16, "rate": 2097152}],
                    "throttleReadIOPSDevice": [{"major": 8, "minor": 32, "rate": 100}],
                    "throttleWriteIOPSDevice": [{"major": 8, "minor": 48, "rate": 200}]
                },
                "hugepageLimits": [{"pageSize": "2MB", "limit": 209715200}],
                "network": {"classID": 1048577,
                            "priorities": [{"name": "eth0", "priority": 500}]}
            }}"#,
        ));
        let r = &spec.Linux.Resources;
        let b = &r.BlockIO;
        assert_eq!((b.Weight, b.LeafWeight), (500, 300));
        let wd = &b.WeightDevice[0];
        assert_eq!(
            (wd.Major, wd.Minor, wd.Weight, wd.LeafWeight),
            (8, 0, 700, 100)
        );
        let t = |d: &[oci::LinuxThrottleDevice]| -> Vec<(i64, i64, u64)> {
            d.iter().map(|d| (d.Major, d.Minor, d.Rate)).collect()
        };
        assert_eq!(t(&b.ThrottleReadBpsDevice), vec![(8, 0, 1 << 20)]);
        assert_eq!(t(&b.ThrottleWriteBpsDevice), vec![(8, 16, 2 << 20)]);
        assert_eq!(t(&b.ThrottleReadIOPSDevice), vec![(8, 32, 100)]);
        assert_eq!(t(&b.ThrottleWriteIOPSDevice), vec![(8, 48, 200)]);
        assert_eq!(r.HugepageLimits.len(), 1);
        assert_eq!(r.HugepageLimits[0].Pagesize, "2MB");
        assert_eq!(r.HugepageLimits[0].Limit, 200 << 20);
        assert_eq!(r.Network.ClassID, 0x0010_0001);
        assert_eq!(r.Network.Priorities[0].Name, "eth0");
        assert_eq!(r.Network.Priorities[0].Priority, 500);
    }

    #[test]
    fn process_details_beyond_ctr_defaults_are_carried() {
        let spec = convert_ok(
            r#"{"ociVersion": "1.1.0", "process": {
                "terminal": true, "consoleSize": {"height": 40, "width": 120},
                "user": {"uid": 1000, "gid": 1000, "username": "app"},
                "cwd": "/srv", "args": ["app"],
                "capabilities": {"inheritable": ["CAP_NET_ADMIN"], "ambient": ["NET_ADMIN"]},
                "apparmorProfile": "docker-default", "oomScoreAdj": -500,
                "selinuxLabel": "system_u:system_r:container_t:s0"
            }}"#,
        );
        let p = &spec.Process;
        assert!(p.Terminal);
        assert_eq!((p.ConsoleSize.Height, p.ConsoleSize.Width), (40, 120));
        assert_eq!((p.User.UID, p.User.GID), (1000, 1000));
        assert_eq!(p.User.Username, "app");
        assert!(p.User.AdditionalGids.is_empty());
        assert_eq!(p.Cwd, "/srv");
        assert!(p.Env.is_empty());
        // oci-spec accepts a capability without its CAP_ prefix; the agent
        // gets the runtime spec's spelling either way.
        assert_eq!(p.Capabilities.Inheritable, strings(&["CAP_NET_ADMIN"]));
        assert_eq!(p.Capabilities.Ambient, strings(&["CAP_NET_ADMIN"]));
        assert_eq!(p.ApparmorProfile, "docker-default");
        assert_eq!(p.OOMScoreAdj, -500);
        assert_eq!(p.SelinuxLabel, "system_u:system_r:container_t:s0");
    }

    #[test]
    fn hooks_and_annotations_are_carried() {
        let spec = convert_ok(
            r#"{"ociVersion": "1.1.0",
                "annotations": {"io.kubernetes.cri.container-type": "container"},
                "hooks": {
                    "prestart": [{"path": "/usr/bin/setup-net", "args": ["setup-net", "up"],
                                  "env": ["DEBUG=1"], "timeout": 5}],
                    "poststart": [{"path": "/usr/bin/notify"}],
                    "poststop": [{"path": "/usr/bin/cleanup", "timeout": 10}]
                }}"#,
        );
        assert_eq!(
            spec.Annotations.get("io.kubernetes.cri.container-type"),
            Some(&"container".to_string())
        );
        let pre = &spec.Hooks.Prestart[0];
        assert_eq!(pre.Path, "/usr/bin/setup-net");
        assert_eq!(pre.Args, strings(&["setup-net", "up"]));
        assert_eq!(pre.Env, strings(&["DEBUG=1"]));
        assert_eq!(pre.Timeout, 5);
        let post = &spec.Hooks.Poststart[0];
        assert_eq!(post.Path, "/usr/bin/notify");
        assert!(post.Args.is_empty());
        assert_eq!(post.Timeout, 0);
        assert_eq!(spec.Hooks.Poststop[0].Path, "/usr/bin/cleanup");
        assert_eq!(spec.Hooks.Poststop[0].Timeout, 10);
    }

    #[test]
    fn linux_ids_sysctl_devices_and_labels_are_carried() {
        let spec = convert_ok(&with_linux(
            r#"{"uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
                "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 1000}],
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "namespaces": [{"type": "user"}, {"type": "cgroup"},
                               {"type": "network", "path": "/var/run/netns/cni-1"}],
                "devices": [
                    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                     "fileMode": 438, "uid": 0, "gid": 0},
                    {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0,
                     "uid": 1000, "gid": 6},
                    {"path": "/dev/pipe", "type": "p"},
                    {"path": "/dev/ttyX", "type": "u", "major": 4, "minor": 64}
                ],
                "rootfsPropagation": "rslave",
                "mountLabel": "system_u:object_r:container_file_t:s0",
                "intelRdt": {"l3CacheSchema": "L3:0=ff"}}"#,
        ));
        let l = &spec.Linux;
        let id = &l.UIDMappings[0];
        assert_eq!((id.ContainerID, id.HostID, id.Size), (0, 100_000, 65_536));
        let gd = &l.GIDMappings[0];
        assert_eq!((gd.ContainerID, gd.HostID, gd.Size), (0, 200_000, 1000));
        assert_eq!(
            l.Sysctl.get("net.ipv4.ip_forward").map(String::as_str),
            Some("1")
        );
        let namespaces: Vec<(&str, &str)> = l
            .Namespaces
            .iter()
            .map(|ns| (ns.Type.as_str(), ns.Path.as_str()))
            .collect();
        assert_eq!(
            namespaces,
            vec![
                ("user", ""),
                ("cgroup", ""),
                ("network", "/var/run/netns/cni-1")
            ]
        );
        let devices: Vec<(&str, &str, i64, i64, u32, u32, u32)> = l
            .Devices
            .iter()
            .map(|d| {
                (
                    d.Path.as_str(),
                    d.Type.as_str(),
                    d.Major,
                    d.Minor,
                    d.FileMode,
                    d.UID,
                    d.GID,
                )
            })
            .collect();
        assert_eq!(
            devices,
            vec![
                ("/dev/fuse", "c", 10, 229, 0o666, 0, 0),
                ("/dev/sda", "b", 8, 0, 0, 1000, 6),
                ("/dev/pipe", "p", 0, 0, 0, 0, 0),
                ("/dev/ttyX", "u", 4, 64, 0, 0, 0),
            ]
        );
        assert_eq!(l.RootfsPropagation, "rslave");
        assert_eq!(l.MountLabel, "system_u:object_r:container_file_t:s0");
        assert_eq!(l.IntelRdt.L3CacheSchema, "L3:0=ff");
    }

    #[test]
    fn seccomp_profile_keeps_oci_names_and_errno_presence() {
        let spec = convert_ok(&with_linux(
            r#"{"seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "flags": ["SECCOMP_FILTER_FLAG_LOG"],
                "syscalls": [
                    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": 131072, "op": "SCMP_CMP_EQ"},
                              {"index": 1, "value": 4294967295, "valueTwo": 8,
                               "op": "SCMP_CMP_MASKED_EQ"}]},
                    {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                    {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0}
                ]
            }}"#,
        ));
        let s = &spec.Linux.Seccomp;
        assert_eq!(s.DefaultAction, "SCMP_ACT_ERRNO");
        assert_eq!(
            s.Architectures,
            strings(&["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        assert_eq!(s.Flags, strings(&["SECCOMP_FILTER_FLAG_LOG"]));
        assert_eq!(s.Syscalls.len(), 4);
        assert_eq!(s.Syscalls[0].Names, strings(&["read", "write"]));
        assert_eq!(s.Syscalls[0].Action, "SCMP_ACT_ALLOW");
        assert!(!s.Syscalls[0].has_errnoret());
        let args: Vec<(u64, u64, u64, &str)> = s.Syscalls[1]
            .Args
            .iter()
            .map(|a| (a.Index, a.Value, a.ValueTwo, a.Op.as_str()))
            .collect();
        assert_eq!(
            args,
            vec![
                (0, 0x20000, 0, "SCMP_CMP_EQ"),
                (1, 0xffff_ffff, 8, "SCMP_CMP_MASKED_EQ")
            ]
        );
        assert_eq!(s.Syscalls[2].Action, "SCMP_ACT_ERRNO");
        assert_eq!(s.Syscalls[2].errnoret(), 1);
        assert!(s.Syscalls[3].has_errnoret());
        assert_eq!(s.Syscalls[3].errnoret(), 0);
    }

    #[test]
    fn absent_sections_become_empty_messages_and_defaults() {
        let spec = convert_ok(r#"{"ociVersion": "1.0.2"}"#);
        assert_eq!(spec.Version, "1.0.2");
        assert!(spec.Process.is_none());
        assert!(spec.Root.is_none());
        assert!(spec.Linux.is_none());
        assert!(spec.Hooks.is_none());
        assert!(spec.Mounts.is_empty());
        assert_eq!(spec.Hostname, "");
    }

    #[test]
    fn readonly_root_is_carried() {
        let spec =
            convert_ok(r#"{"ociVersion": "1.1.0", "root": {"path": "rootfs", "readonly": true}}"#);
        assert_eq!(spec.Root.Path, "rootfs");
        assert!(spec.Root.Readonly);
    }

    #[test]
    fn load_bundle_spec_reads_config_json_in_the_bundle() {
        let bundle = tempfile::tempdir().expect("tempdir");
        std::fs::write(bundle.path().join("config.json"), CTR_RUN_ROOTFS).expect("write");
        let spec = load_bundle_spec(bundle.path()).expect("loads");
        assert_eq!(spec.Linux.CgroupsPath, "/default/demo");
    }

    #[test]
    fn missing_config_json_is_a_read_error_naming_the_path() {
        let bundle = tempfile::tempdir().expect("tempdir");
        let err = load_bundle_spec(bundle.path()).unwrap_err();
        let expected = bundle.path().join("config.json");
        match &err {
            SpecError::Read { path, source } => {
                assert_eq!(path, &expected);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Read, got {other:?}"),
        }
        assert!(err.to_string().contains(&expected.display().to_string()));
    }

    #[test]
    fn malformed_json_in_a_bundle_is_a_parse_error_naming_the_file() {
        let bundle = tempfile::tempdir().expect("tempdir");
        let file = bundle.path().join("config.json");
        std::fs::write(&file, r#"{"ociVersion": "1.1.0", "process": "#).expect("write");
        match load_bundle_spec(bundle.path()).unwrap_err() {
            SpecError::Parse { path, message } => {
                assert_eq!(path, file);
                assert!(message.contains("EOF"), "{message}");
            }
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn malformed_json_is_a_parse_error() {
        let err = spec_from_json(b"{\"ociVersion\": \"1.1.0\",, }").unwrap_err();
        assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
        let err = spec_from_json(b"not json").unwrap_err();
        assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn spec_without_oci_version_is_a_parse_error() {
        let err = spec_from_json(br#"{"process": {"cwd": "/", "user": {"uid": 0, "gid": 0}}}"#)
            .unwrap_err();
        match &err {
            SpecError::Parse { message, .. } => {
                assert!(message.contains("ociVersion"), "{message}")
            }
            other => panic!("expected Parse, got {other:?}"),
        }
        assert!(err
            .to_string()
            .starts_with("config.json is not a valid OCI runtime spec"));
    }

    #[test]
    fn wrong_value_type_is_a_parse_error_quoting_the_field() {
        // containerd writes config.json on one line, so the message must
        // show the key, not just a column number.
        let json = r#"{"ociVersion":"1.1.0","process":{"terminal":"yes","cwd":"/","user":{"uid":0,"gid":0}}}"#;
        match spec_from_json(json.as_bytes()).unwrap_err() {
            SpecError::Parse { message, .. } => {
                assert!(message.contains("expected a boolean"), "{message}");
                assert!(message.contains(r#""terminal":"yes""#), "{message}");
            }
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn oci_version_of_the_wrong_type_is_a_parse_error() {
        match spec_from_json(br#"{"ociVersion": 1}"#).unwrap_err() {
            SpecError::Parse { message, .. } => {
                assert!(message.contains("expected a string"), "{message}");
                assert!(message.contains("ociVersion"), "{message}");
            }
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn negative_uid_is_a_parse_error_quoting_the_field() {
        let json = r#"{"ociVersion":"1.1.0","process":{"cwd":"/","user":{"uid":-1,"gid":0}}}"#;
        match spec_from_json(json.as_bytes()).unwrap_err() {
            SpecError::Parse { message, .. } => {
                assert!(message.contains("-1"), "{message}");
                assert!(message.contains(r#""uid":-1"#), "{message}");
            }
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn console_size_beyond_u32_is_invalid_naming_the_field() {
        let json = r#"{"ociVersion": "1.1.0", "process": {"cwd": "/", "user": {"uid": 0, "gid": 0},
                       "consoleSize": {"height": 4294967296, "width": 80}}}"#;
        match spec_from_json(json.as_bytes()).unwrap_err() {
            SpecError::Invalid(message) => {
                assert!(message.contains("process.consoleSize.height"), "{message}");
                assert!(message.contains("4294967296"), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn negative_hugepage_limit_is_invalid_naming_the_field() {
        let json = with_linux(
            r#"{"resources": {"hugepageLimits": [{"pageSize": "2MB", "limit": 1},
                                                {"pageSize": "1GB", "limit": -1}]}}"#,
        );
        match spec_from_json(json.as_bytes()).unwrap_err() {
            SpecError::Invalid(message) => {
                assert!(
                    message.contains("linux.resources.hugepageLimits[1].limit"),
                    "{message}"
                );
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn unknown_namespace_type_is_a_parse_error() {
        let err = spec_from_json(with_linux(r#"{"namespaces": [{"type": "net"}]}"#).as_bytes())
            .unwrap_err();
        assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn fields_the_proto_cannot_carry_are_reported() {
        let json = r#"{"ociVersion": "1.1.0",
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0, "umask": 18}},
            "hooks": {"createRuntime": [{"path": "/usr/bin/nvidia-ctk"}],
                      "poststop": [{"path": "/bin/true"}]},
            "linux": {"resources": {"unified": {"memory.high": "1G"}},
                      "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38}}}"#;
        let parsed: rt::Spec = serde_json::from_str(json).expect("parses");
        assert_eq!(
            fields_without_counterpart(&parsed),
            vec![
                "process.user.umask",
                "hooks.createRuntime",
                "linux.resources.unified",
                "linux.seccomp.defaultErrnoRet"
            ]
        );
        // They are dropped, not fatal: the rest still converts.
        let spec = convert_ok(json);
        assert_eq!(spec.Hooks.Poststop[0].Path, "/bin/true");
        assert_eq!(spec.Linux.Seccomp.DefaultAction, "SCMP_ACT_ERRNO");
    }

    #[test]
    fn ctr_run_rootfs_spec_sets_nothing_the_proto_cannot_carry() {
        let parsed: rt::Spec = serde_json::from_str(CTR_RUN_ROOTFS).expect("parses");
        assert!(fields_without_counterpart(&parsed).is_empty());
    }

    #[test]
    fn sandbox_id_comes_from_the_cri_annotation() {
        let mut spec = oci::Spec::new();
        spec.Annotations
            .insert(SANDBOX_ID_ANNOTATION.into(), "pod-sandbox-1".into());
        assert_eq!(sandbox_id(&spec, "app-container-2"), "pod-sandbox-1");
    }

    #[test]
    fn sandbox_id_without_the_annotation_is_the_container_id() {
        let spec = convert_ok(CTR_RUN_ROOTFS);
        assert_eq!(sandbox_id(&spec, "demo"), "demo");
    }

    #[test]
    fn sandbox_id_with_an_empty_annotation_is_the_container_id() {
        let mut spec = oci::Spec::new();
        spec.Annotations
            .insert(SANDBOX_ID_ANNOTATION.into(), String::new());
        assert_eq!(sandbox_id(&spec, "demo"), "demo");
    }

    #[test]
    fn an_exec_process_converts_and_a_bad_one_is_a_parse_error() {
        let p = process_from_json(
            br#"{"args":["sh","-c","true"],"cwd":"/","user":{"uid":0,"gid":0},"env":["A=1"]}"#,
            "exec e1",
        )
        .unwrap();
        assert_eq!(p.Args, ["sh", "-c", "true"]);
        assert_eq!(p.Env, ["A=1"]);
        let err = process_from_json(br#"{"args":"sh"}"#, "exec e1").unwrap_err();
        assert!(err.to_string().contains("exec e1"), "{err}");
    }

    #[test]
    fn update_resources_convert() {
        let r = resources_from_json(
            br#"{"memory":{"limit":1048576},"pids":{"limit":5}}"#,
            "update",
        )
        .unwrap();
        assert_eq!(r.Memory.Limit, 1048576);
        assert_eq!(r.Pids.Limit, 5);
    }
}
