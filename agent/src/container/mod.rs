//! A container in the guest: its cgroup, its init process and the
//! processes exec'd into it. Creation is all-or-nothing: a failure leaves no
//! cgroup, mount or process behind.

pub mod capabilities;
pub mod cgroup;
pub mod console;
pub mod hooks;
pub mod lsm;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod setup;
pub mod spec;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kestrel_protocols::oci;
use nix::sched::CloneFlags;

use crate::error::{validate_id, Error, Result};
use crate::reaper::Reaper;
use cgroup::{Cgroup, Hierarchy};
use namespaces::{Plan, PodNamespaces};
use process::{launch, Control, Launch, Process};
use spec::{Role, SetupConfig};

/// What a new container shares with its pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pod<'a> {
    /// The pod's namespaces; `None` while the pod has no container yet.
    pub namespaces: Option<&'a PodNamespaces>,
    /// CreateContainer's `sandbox_pidns`: the pod's PID namespace, whatever
    /// the spec says.
    pub sandbox_pidns: bool,
}

/// Where a container is between creation and removal. Stopped is not a
/// phase: it is whenever the init process has an exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
}

pub struct Container {
    pub id: String,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    phase: Mutex<Phase>,
    control: tokio::sync::Mutex<Option<Control>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// The compiled `linux.seccomp`, for every process of the container.
    seccomp: Option<seccomp::Filter>,
    /// Serialises exec creation so duplicate ids are caught reliably.
    exec_lock: tokio::sync::Mutex<()>,
}

impl Container {
    /// Builds the container and leaves its init process waiting for
    /// [`Container::start`].
    pub async fn create(
        reaper: &Reaper,
        hierarchy: &Hierarchy,
        id: &str,
        exec_id: &str,
        spec: &oci::Spec,
        bundle_dir: &Path,
        pod: Pod<'_>,
    ) -> Result<Container> {
        let plan = Plan::from_spec(spec, pod.sandbox_pidns)?;
        let mut process = spec::process_config(spec.Process.as_ref(), "OCI spec")?;
        let seccomp = spec
            .Linux
            .as_ref()
            .and_then(|l| l.Seccomp.as_ref())
            .map(seccomp::compile)
            .transpose()?;
        process.seccomp = seccomp.clone();
        lsm::warn_unenforced(id, spec);
        let mut rootfs = spec::rootfs_config(spec, bundle_dir)?;
        if let (Some(name), false) = (&rootfs.hostname, plan.private_uts) {
            return Err(Error::invalid(format!(
                "hostname {name:?} needs a private UTS namespace: linux.namespaces has no uts entry"
            )));
        }
        let (flags, join) = plan.resolve(pod.namespaces);
        let hooks = hooks::from_spec(spec, id, bundle_dir)?;
        let cgroup_path = match spec.Linux.CgroupsPath.as_str() {
            // systemd-style "slice:prefix:name" paths need systemd; use ours.
            "" => format!("kestrel/{id}"),
            p if p.contains(':') => format!("kestrel/{id}"),
            p => p.to_string(),
        };
        let cgroup = Cgroup::create(hierarchy, &cgroup_path, spec.Linux.Resources.as_ref())?;
        rootfs.cgroup_v1_dirs = cgroup.v1_dirs();
        let config = SetupConfig {
            role: Role::Init(rootfs),
            process,
            hooks,
        };
        let launched = launch(
            reaper,
            Launch {
                exec_id,
                config: &config,
                flags,
                join: &join,
                cgroup: &cgroup,
            },
        )
        .await;
        let (init, control) = match launched {
            Ok(ok) => ok,
            Err(e) => {
                // The helper is dead (launch kills it on failure), and with
                // it its mount namespace; only the cgroup is left to remove.
                let _ = cgroup.destroy();
                return Err(e);
            }
        };
        Ok(Container {
            id: id.to_string(),
            cgroup,
            init: Arc::new(init),
            phase: Mutex::new(Phase::Created),
            control: tokio::sync::Mutex::new(control),
            execs: Mutex::new(HashMap::new()),
            seccomp,
            exec_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    fn require_live(&self, what: &str) -> Result<()> {
        match self.init.exit_status() {
            Some(status) => Err(Error::FailedPrecondition(format!(
                "cannot {what} container {}: it has exited with status {status}",
                self.id
            ))),
            None => Ok(()),
        }
    }

    pub async fn start(&self) -> Result<()> {
        self.require_live("start")?;
        let control = self.control.lock().await.take().ok_or_else(|| {
            Error::FailedPrecondition(format!("container {} has already been started", self.id))
        })?;
        control.start().await?;
        self.set_phase(Phase::Running);
        Ok(())
    }

    /// The init process for an empty exec id or the init's own exec id,
    /// otherwise the exec'd process with that id.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.init.exec_id {
            return Ok(Arc::clone(&self.init));
        }
        validate_id("exec id", exec_id)?;
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("container {} has no process {exec_id}", self.id))
            })
    }

    pub async fn exec(
        &self,
        reaper: &Reaper,
        exec_id: &str,
        p: Option<&oci::Process>,
    ) -> Result<()> {
        validate_id("exec id", exec_id)?;
        let mut process = spec::process_config(p, "exec process")?;
        process.seccomp = self.seccomp.clone();
        let _serial = self.exec_lock.lock().await;
        if exec_id == self.init.exec_id || self.process(exec_id).is_ok() {
            return Err(Error::AlreadyExists(format!(
                "container {} already has a process {exec_id}",
                self.id
            )));
        }
        self.require_live("exec into")?;
        if self.phase() != Phase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        let config = SetupConfig {
            role: Role::Exec {
                pid: self.init.pid.as_raw(),
            },
            process,
            hooks: hooks::GuestHooks::default(),
        };
        let (process, _) = launch(
            reaper,
            Launch {
                exec_id,
                config: &config,
                flags: CloneFlags::empty(),
                join: &[],
                cgroup: &self.cgroup,
            },
        )
        .await?;
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(exec_id.to_string(), Arc::new(process));
        Ok(())
    }

    /// Signals one process, or with an empty exec id every process of the
    /// container.
    pub fn signal(&self, exec_id: &str, signal: i32) -> Result<()> {
        if !exec_id.is_empty() {
            return self.process(exec_id)?.signal(signal);
        }
        let sent = self.cgroup.signal_all(signal)?;
        if sent == 0 && self.init.exit_status().is_some() {
            return Err(Error::NotFound(format!(
                "container {} has no running processes",
                self.id
            )));
        }
        Ok(())
    }

    pub async fn pause(&self) -> Result<()> {
        self.require_live("pause")?;
        if self.phase() != Phase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        self.cgroup.freeze().await?;
        self.set_phase(Phase::Paused);
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        self.require_live("resume")?;
        if self.phase() != Phase::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not paused",
                self.id
            )));
        }
        self.cgroup.thaw().await?;
        self.set_phase(Phase::Running);
        Ok(())
    }

    /// Kills every process, waits for them (at most `timeout`, if given) and
    /// removes the cgroup. Mounts live in the container's mount namespace
    /// and vanish with its last process.
    pub async fn destroy(&self, timeout: Option<Duration>) -> Result<()> {
        let all_exited = async {
            loop {
                self.cgroup.kill_all().await?;
                self.init.wait().await;
                let execs: Vec<_> = self
                    .execs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for p in execs {
                    p.wait().await;
                }
                if self.cgroup.procs()?.is_empty() {
                    return Ok::<(), Error>(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, all_exited).await.map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "processes of container {} did not exit within {t:?}",
                    self.id
                ))
            })??,
            None => all_exited.await?,
        }
        self.cgroup.destroy()
    }
}

/// Signal numbers a caller may send.
pub fn checked_signal(signal: u32) -> Result<i32> {
    match i32::try_from(signal) {
        Ok(s) if (1..=libc::SIGRTMAX()).contains(&s) => Ok(s),
        _ => Err(Error::invalid(format!(
            "{signal} is not a valid signal number"
        ))),
    }
}
