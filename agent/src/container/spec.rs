//! Turns an OCI spec, as the Kata API carries it, into the validated
//! [`SetupConfig`] that the setup helper (`setup.rs`) applies inside the new
//! container. Every check on outside input happens here, in the agent, so a
//! bad spec fails CreateContainer with INVALID_ARGUMENT before any process,
//! cgroup or mount exists.

use std::path::{Component, Path, PathBuf};

use kestrel_protocols::oci;
use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use super::capabilities::Capabilities;
use super::hooks::GuestHooks;
use super::seccomp::Filter;
use crate::error::{Error, Result};

/// PATH used to find the executable when the spec's env has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything the setup helper needs; sent to it as JSON over its socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetupConfig {
    pub role: Role,
    pub process: ProcessConfig,
    /// The container's createContainer and startContainer hooks (none for
    /// an exec).
    pub hooks: GuestHooks,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Role {
    /// The container's first process: builds the rootfs, then waits for
    /// StartContainer before it executes the user's program.
    Init(RootfsConfig),
    /// A process executed in the namespaces of the running process `pid`.
    Exec { pid: i32 },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub rlimits: Vec<Rlimit>,
    pub terminal: bool,
    /// Rows and columns of the terminal, set before the program runs.
    pub console_size: Option<(u16, u16)>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i64>,
    /// None: the process keeps what its user gets from the kernel.
    pub capabilities: Option<Capabilities>,
    /// The container's `linux.seccomp`, compiled; exec'd processes get it too.
    pub seccomp: Option<Filter>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RootfsConfig {
    pub root: PathBuf,
    pub readonly: bool,
    pub hostname: Option<String>,
    pub mounts: Vec<MountConfig>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    /// For a `cgroup` mount on cgroup v1: each controller's directory of
    /// this container, bound read-only under the mount's destination.
    pub cgroup_v1_dirs: Vec<(String, PathBuf)>,
    pub cgroup_namespace: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MountConfig {
    pub destination: String,
    pub source: String,
    pub fstype: String,
    pub flags: u64,
    pub propagation: u64,
    pub data: String,
}

impl MountConfig {
    pub fn ms_flags(&self) -> MsFlags {
        MsFlags::from_bits_truncate(self.flags)
    }

    pub fn is_bind(&self) -> bool {
        self.ms_flags().contains(MsFlags::MS_BIND)
    }
}

/// Whether the spec asks for a new cgroup namespace. The helper creates it
/// after joining the container's cgroup: cloned earlier, the namespace would
/// be rooted at the agent's cgroup.
pub fn wants_cgroup_namespace(spec: &oci::Spec) -> bool {
    spec.Linux.Namespaces.iter().any(|ns| ns.Type == "cgroup")
}

/// Validates the spec's process (or an exec's process).
pub fn process_config(process: Option<&oci::Process>, what: &str) -> Result<ProcessConfig> {
    let p = process.ok_or_else(|| Error::invalid(format!("{what} has no process")))?;
    if p.Args.is_empty() || p.Args[0].is_empty() {
        return Err(Error::invalid(format!("{what}: process.args is empty")));
    }
    if let Some(bad) = p.Env.iter().find(|e| !e.contains('=')) {
        return Err(Error::invalid(format!(
            "{what}: env entry {bad:?} is not KEY=VALUE"
        )));
    }
    let cwd = if p.Cwd.is_empty() {
        "/".to_string()
    } else {
        p.Cwd.clone()
    };
    if !cwd.starts_with('/') {
        return Err(Error::invalid(format!(
            "{what}: process.cwd {cwd:?} must be an absolute path"
        )));
    }
    let user = p.User.as_ref();
    let rlimits = p
        .Rlimits
        .iter()
        .map(|r| {
            Ok(Rlimit {
                resource: rlimit_resource(&r.Type).ok_or_else(|| {
                    Error::invalid(format!("{what}: unknown rlimit type {:?}", r.Type))
                })?,
                soft: r.Soft,
                hard: r.Hard,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(r) = p.Rlimits.iter().find(|r| r.Soft > r.Hard) {
        return Err(Error::invalid(format!(
            "{what}: rlimit {} has soft limit {} above hard limit {}",
            r.Type, r.Soft, r.Hard
        )));
    }
    Ok(ProcessConfig {
        args: p.Args.to_vec(),
        env: p.Env.to_vec(),
        cwd,
        uid: user.map_or(0, |u| u.UID),
        gid: user.map_or(0, |u| u.GID),
        additional_gids: user.map(|u| u.AdditionalGids.clone()).unwrap_or_default(),
        rlimits,
        terminal: p.Terminal,
        console_size: console_size(p, what)?,
        no_new_privileges: p.NoNewPrivileges,
        oom_score_adj: (p.OOMScoreAdj != 0).then_some(p.OOMScoreAdj),
        capabilities: Capabilities::from_spec(p)?,
        seccomp: None,
    })
}

/// The spec's console size, if it names one; a zero dimension means none,
/// as in runc.
fn console_size(p: &oci::Process, what: &str) -> Result<Option<(u16, u16)>> {
    let Some(b) = p.ConsoleSize.as_ref() else {
        return Ok(None);
    };
    if b.Height == 0 || b.Width == 0 {
        return Ok(None);
    }
    let dimension = |v: u32, name: &str| {
        u16::try_from(v).map_err(|_| {
            Error::invalid(format!(
                "{what}: process.consoleSize.{name} {v} is larger than a terminal can be"
            ))
        })
    };
    Ok(Some((
        dimension(b.Height, "height")?,
        dimension(b.Width, "width")?,
    )))
}

fn rlimit_resource(name: &str) -> Option<i32> {
    let r = match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    };
    Some(r as i32)
}

/// Validates the spec's root and mounts. A relative `root.path` is taken
/// below `bundle_dir` (the container's directory in the shared directory).
pub fn rootfs_config(spec: &oci::Spec, bundle_dir: &Path) -> Result<RootfsConfig> {
    let root = spec
        .Root
        .as_ref()
        .filter(|r| !r.Path.is_empty())
        .ok_or_else(|| Error::invalid("OCI spec has no root.path"))?;
    let path = Path::new(&root.Path);
    if has_parent_component(path) {
        return Err(Error::invalid(format!(
            "root.path {:?} must not contain \"..\"",
            root.Path
        )));
    }
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        bundle_dir.join(path)
    };
    if !path.is_dir() {
        return Err(Error::invalid(format!(
            "rootfs {} does not exist or is not a directory",
            path.display()
        )));
    }
    let mounts = spec
        .Mounts
        .iter()
        .map(mount_config)
        .collect::<Result<Vec<_>>>()?;
    let linux = spec.Linux.as_ref();
    for p in linux
        .iter()
        .flat_map(|l| l.MaskedPaths.iter().chain(l.ReadonlyPaths.iter()))
    {
        container_path(p, "masked/readonly path")?;
    }
    let mut sysctl: Vec<(String, String)> = linux
        .map(|l| {
            l.Sysctl
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (k, _) in &sysctl {
        if k.is_empty()
            || k.contains('/')
            || k.split('.').any(|part| part.is_empty() || part == "..")
        {
            return Err(Error::invalid(format!("sysctl key {k:?} is not valid")));
        }
    }
    sysctl.sort();
    Ok(RootfsConfig {
        root: path,
        readonly: root.Readonly,
        hostname: (!spec.Hostname.is_empty()).then(|| spec.Hostname.clone()),
        mounts,
        masked_paths: linux.map(|l| l.MaskedPaths.to_vec()).unwrap_or_default(),
        readonly_paths: linux.map(|l| l.ReadonlyPaths.to_vec()).unwrap_or_default(),
        sysctl,
        cgroup_v1_dirs: Vec::new(),
        cgroup_namespace: wants_cgroup_namespace(spec),
    })
}

fn has_parent_component(p: &Path) -> bool {
    p.components().any(|c| matches!(c, Component::ParentDir))
}

/// Checks a path inside the container: absolute and without `..`.
pub fn container_path(p: &str, what: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() || has_parent_component(path) {
        return Err(Error::invalid(format!(
            "{what} {p:?} must be absolute and must not contain \"..\""
        )));
    }
    Ok(())
}

fn mount_config(m: &oci::Mount) -> Result<MountConfig> {
    container_path(&m.destination, "mount destination")?;
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for opt in m.options.iter() {
        match mount_option(opt) {
            Some(MountOption::Set(f)) => flags |= f,
            Some(MountOption::Clear(f)) => flags &= !f,
            Some(MountOption::Propagation(f)) => propagation |= f,
            None => data.push(opt.as_str()),
        }
    }
    if m.type_ == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    if flags.contains(MsFlags::MS_BIND) && m.source.is_empty() {
        return Err(Error::invalid(format!(
            "bind mount to {} has no source",
            m.destination
        )));
    }
    if !flags.contains(MsFlags::MS_BIND) && m.type_.is_empty() {
        return Err(Error::invalid(format!(
            "mount to {} has neither a type nor the bind option",
            m.destination
        )));
    }
    Ok(MountConfig {
        destination: m.destination.clone(),
        source: m.source.clone(),
        fstype: m.type_.clone(),
        flags: flags.bits(),
        propagation: propagation.bits(),
        data: data.join(","),
    })
}

pub(crate) enum MountOption {
    Set(MsFlags),
    Clear(MsFlags),
    Propagation(MsFlags),
}

pub(crate) fn mount_option(opt: &str) -> Option<MountOption> {
    use MountOption::*;
    use MsFlags as F;
    Some(match opt {
        "defaults" => Set(F::empty()),
        "ro" => Set(F::MS_RDONLY),
        "rw" => Clear(F::MS_RDONLY),
        "nosuid" => Set(F::MS_NOSUID),
        "suid" => Clear(F::MS_NOSUID),
        "nodev" => Set(F::MS_NODEV),
        "dev" => Clear(F::MS_NODEV),
        "noexec" => Set(F::MS_NOEXEC),
        "exec" => Clear(F::MS_NOEXEC),
        "sync" => Set(F::MS_SYNCHRONOUS),
        "async" => Clear(F::MS_SYNCHRONOUS),
        "dirsync" => Set(F::MS_DIRSYNC),
        "mand" => Set(F::MS_MANDLOCK),
        "nomand" => Clear(F::MS_MANDLOCK),
        "noatime" => Set(F::MS_NOATIME),
        "atime" => Clear(F::MS_NOATIME),
        "nodiratime" => Set(F::MS_NODIRATIME),
        "diratime" => Clear(F::MS_NODIRATIME),
        "relatime" => Set(F::MS_RELATIME),
        "norelatime" => Clear(F::MS_RELATIME),
        "strictatime" => Set(F::MS_STRICTATIME),
        "nostrictatime" => Clear(F::MS_STRICTATIME),
        "bind" => Set(F::MS_BIND),
        "rbind" => Set(F::MS_BIND | F::MS_REC),
        "private" => Propagation(F::MS_PRIVATE),
        "rprivate" => Propagation(F::MS_PRIVATE | F::MS_REC),
        "shared" => Propagation(F::MS_SHARED),
        "rshared" => Propagation(F::MS_SHARED | F::MS_REC),
        "slave" => Propagation(F::MS_SLAVE),
        "rslave" => Propagation(F::MS_SLAVE | F::MS_REC),
        "unbindable" => Propagation(F::MS_UNBINDABLE),
        "runbindable" => Propagation(F::MS_UNBINDABLE | F::MS_REC),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(dest: &str, ty: &str, source: &str, opts: &[&str]) -> oci::Mount {
        let mut m = oci::Mount::new();
        m.destination = dest.into();
        m.type_ = ty.into();
        m.source = source.into();
        m.options = opts.iter().map(|s| s.to_string()).collect();
        m
    }

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let m = mount_config(&mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &[
                "nosuid",
                "strictatime",
                "mode=755",
                "size=65536k",
                "rprivate",
            ],
        ))
        .unwrap();
        assert_eq!(m.ms_flags(), MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(
            m.propagation,
            (MsFlags::MS_PRIVATE | MsFlags::MS_REC).bits()
        );
        assert_eq!(m.data, "mode=755,size=65536k");
    }

    #[test]
    fn relative_or_escaping_mount_destinations_are_rejected() {
        for dest in ["proc", "/a/../../etc"] {
            let err = mount_config(&mount(dest, "proc", "proc", &[])).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{dest}");
        }
    }

    #[test]
    fn process_without_args_is_rejected() {
        let p = oci::Process::new();
        assert!(matches!(
            process_config(Some(&p), "spec"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            process_config(None, "spec"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn unknown_rlimit_is_rejected() {
        let mut p = oci::Process::new();
        p.Args = vec!["true".into()];
        let mut r = oci::POSIXRlimit::new();
        r.Type = "RLIMIT_BOGUS".into();
        p.Rlimits.push(r);
        let err = process_config(Some(&p), "spec").unwrap_err();
        assert!(err.to_string().contains("RLIMIT_BOGUS"));
    }

    #[test]
    fn console_size_is_rows_and_columns_and_an_oversized_one_is_rejected() {
        let mut p = oci::Process::new();
        p.Args = vec!["sh".into()];
        assert_eq!(process_config(Some(&p), "spec").unwrap().console_size, None);
        let size = p.ConsoleSize.mut_or_insert_default();
        size.Height = 40;
        size.Width = 120;
        let config = process_config(Some(&p), "spec").unwrap();
        assert_eq!(config.console_size, Some((40, 120)));
        p.ConsoleSize.mut_or_insert_default().Width = 0;
        assert_eq!(process_config(Some(&p), "spec").unwrap().console_size, None);
        p.ConsoleSize.mut_or_insert_default().Width = 70_000;
        let err = process_config(Some(&p), "spec").unwrap_err();
        assert!(err.to_string().contains("consoleSize.width 70000"), "{err}");
    }
}
