//! A sandbox: one guest (a [`Hypervisor`] backend) and a client for the
//! agent inside it. Containers of one pod share a sandbox; a container
//! without a pod gets its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kestrel_hypervisor::backend::{select, Backend, RootfsDelivery};
use kestrel_hypervisor::{wait_exit, GuestExit, Hypervisor, SandboxSpec};
use kestrel_protocols::agent::CreateSandboxRequest;
use tokio::sync::watch;

use crate::agent_client::{AgentClient, AgentError};
use crate::config::{Config, SharedFsMode};
use crate::dial::Address;
use crate::lifecycle::relist::{HealthReport, HEALTH_FILE};

/// The file in a sandbox's state directory that lets `delete` (run when
/// containerd cannot reach the shim) find what to clean up.
const RECORD: &str = "sandbox.json";

/// The file naming the pod network namespace whose interfaces the guest's
/// cards mirror: written before the VM starts, so `delete` can undo the
/// mirroring whenever the shim died.
const NETNS_RECORD: &str = "netns";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {id}")]
    Hypervisor {
        id: String,
        #[source]
        source: kestrel_hypervisor::Error,
    },
    #[error("sandbox {id}: backend {backend} gave no agent address")]
    NoAddress { id: String, backend: &'static str },
    #[error("sandbox {id}: its agent address")]
    Address {
        id: String,
        #[source]
        source: crate::dial::DialError,
    },
    #[error("sandbox {id}: agent")]
    Agent {
        id: String,
        #[source]
        source: Box<AgentError>,
    },
    #[error("sandbox {id}: the guest {exit} before its agent answered")]
    DiedEarly { id: String, exit: GuestExit },
    #[error("sandbox {id}: {message}")]
    Record { id: String, message: String },
    #[error("sandbox {id}: {source}")]
    Network {
        id: String,
        #[source]
        source: crate::network::tcfilter::NetworkError,
    },
    #[error(transparent)]
    InvalidId(#[from] kestrel_protocols::id::IdError),
}

/// What `delete` needs to find a sandbox's leftovers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub backend: String,
    pub pid: u32,
    pub agent_address: String,
}

pub struct Sandbox {
    pub id: String,
    state_dir: PathBuf,
    hypervisor: Box<dyn Hypervisor>,
    agent: AgentClient,
    stop_grace: Duration,
    config_path: Option<PathBuf>,
    /// The pod network namespace the guest's cards are mirrored into.
    netns: Option<PathBuf>,
    /// The directory the guest mounts over virtio-fs, when it has one.
    shared_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("backend", &self.hypervisor.name())
            .field("pid", &self.hypervisor.pid())
            .finish()
    }
}

/// The backend the configuration names, with `auto` resolved by what KVM
/// can do here.
fn backend(id: &str, config: &Config) -> Result<Box<dyn Hypervisor>, SandboxError> {
    let kvm = select::kvm_support();
    let (backend, why) = select::resolve(&config.sandbox.hypervisor, &kvm).map_err(|e| {
        SandboxError::Hypervisor {
            id: id.into(),
            source: kestrel_hypervisor::Error::Config(e.to_string()),
        }
    })?;
    if config.sandbox.hypervisor == select::AUTO {
        tracing::info!(sandbox_id = id, %backend, why, "hypervisor chosen");
    }
    Ok(backend.launcher(&config.programs()))
}

/// Where a sandbox keeps its files: one directory below the configured
/// state directory, named after the id (shortened when long, so its
/// sockets fit a unix address), so the id must pass the shared id rule
/// first.
pub fn state_dir(config: &Config, id: &str) -> Result<PathBuf, SandboxError> {
    kestrel_protocols::id::validate("sandbox id", id)?;
    Ok(config
        .sandbox
        .state_dir
        .join(kestrel_hypervisor::state_dir::dir_name(id)))
}

/// What a sandbox's first container asks of the sandbox (see `pod.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxRequest {
    /// The VM's size; `None`: the configured `[vm]` shape.
    pub shape: Option<kestrel_hypervisor::VmShape>,
    /// The pod's network namespace on the host.
    pub netns: Option<PathBuf>,
    /// The configuration file the sandbox runs with (the runtime options'
    /// `ConfigPath`), if not the default one.
    pub config_path: Option<PathBuf>,
}

impl Sandbox {
    /// Starts the guest and connects to its agent. On any failure the guest
    /// is stopped and its state directory removed: nothing is left behind.
    pub async fn start(
        id: &str,
        config: &Config,
        request: &SandboxRequest,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let state_dir = state_dir(config, id)?;
        let mut hypervisor = backend(id, config)?;
        let mut vm = config.vm_spec();
        if let Some(shape) = request.shape {
            vm.shape = shape;
        }
        // A VM reaches the pod's network through taps mirrored to the CNI's
        // interfaces; the process backend's agent lives in the namespace.
        let netns = request
            .netns
            .clone()
            .filter(|_| hypervisor.backend().is_vm());
        let network = match &netns {
            Some(netns) => Some(attach_network(id, netns).await?),
            None => None,
        };
        // A VM gets the host's files through a shared directory unless the
        // configuration says to copy them; the process backend's agent
        // opens host paths itself.
        let shared_dir = (config.sandbox.shared_fs == SharedFsMode::VirtioFs
            && hypervisor.backend().is_vm())
        .then(|| crate::shared_fs::host_dir(&state_dir));
        let mut spec = SandboxSpec {
            id: id.into(),
            state_dir: state_dir.clone(),
            agent_path: config.sandbox.agent_path.clone(),
            agent_log_level: config.sandbox.agent_log_level.clone(),
            vm: Some(vm),
            netns: request.netns.clone(),
            nics: Vec::new(),
            shared_fs: shared_dir
                .as_ref()
                .map(|_| crate::shared_fs::spec(&state_dir)),
        };
        if let Some(network) = &network {
            spec.nics = network.nics.clone();
            for nic in &mut spec.nics {
                nic.offload = config.vm.net_offload;
            }
        }
        let grace = Duration::from_millis(config.sandbox.stop_grace_ms);
        let hv_err = |source| SandboxError::Hypervisor {
            id: id.into(),
            source,
        };
        let connected = async {
            if shared_dir.is_some() {
                // virtiofsd serves it from the start: it must exist before
                // prepare, and the state directory with it.
                kestrel_hypervisor::state_dir::create(&state_dir).map_err(hv_err)?;
                crate::shared_fs::create_dir(&state_dir).map_err(|e| SandboxError::Record {
                    id: id.into(),
                    message: crate::error_chain(&e),
                })?;
            }
            hypervisor.prepare(&spec).await.map_err(hv_err)?;
            if let Some(netns) = &netns {
                write_file(
                    id,
                    &state_dir,
                    NETNS_RECORD,
                    netns.as_os_str().as_encoded_bytes(),
                )?;
            }
            hypervisor.start().await.map_err(hv_err)?;
            let agent = connect_agent(id, hypervisor.as_ref(), config).await?;
            let agent_err = |source| SandboxError::Agent {
                id: id.into(),
                source: Box::new(source),
            };
            agent
                .create_sandbox(CreateSandboxRequest {
                    sandbox_id: id.into(),
                    hostname: id.chars().take(63).collect(),
                    storages: shared_dir
                        .iter()
                        .map(|_| crate::shared_fs::storage())
                        .collect(),
                    ..Default::default()
                })
                .await
                .map_err(agent_err)?;
            if let Some(network) = network {
                configure_guest_network(&agent, network)
                    .await
                    .map_err(agent_err)?;
            }
            let record = SandboxRecord {
                id: id.into(),
                backend: hypervisor.name().into(),
                pid: hypervisor.pid().unwrap_or(0),
                agent_address: hypervisor.agent_address().unwrap_or_default(),
            };
            write_record(&spec.state_dir, &record)?;
            Ok(agent)
        }
        .await;
        match connected {
            Ok(agent) => {
                tracing::info!(sandbox_id = id, backend = hypervisor.name(), pid = ?hypervisor.pid(), "sandbox started");
                Ok(Arc::new(Sandbox {
                    id: id.into(),
                    state_dir,
                    hypervisor,
                    agent,
                    stop_grace: grace,
                    config_path: request.config_path.clone(),
                    netns,
                    shared_dir,
                }))
            }
            Err(e) => {
                if let Some(dir) = &shared_dir {
                    release_shared_dir(id, dir);
                }
                if let Err(stop) = hypervisor.stop(grace).await {
                    tracing::warn!(
                        sandbox_id = id,
                        error = crate::error_chain(&stop),
                        "cleaning up after a failed start"
                    );
                }
                if shared_dir.is_some() {
                    // Made before prepare, which may not have been reached.
                    if let Err(e) = kestrel_hypervisor::state_dir::remove(&state_dir) {
                        tracing::warn!(
                            sandbox_id = id,
                            error = crate::error_chain(&e),
                            "cleaning up after a failed start"
                        );
                    }
                }
                if let Some(netns) = &netns {
                    detach_network(id, netns).await;
                }
                Err(e)
            }
        }
    }

    /// The configuration file this sandbox runs with, if not the default.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// How long a container or the guest gets to stop before it is killed.
    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }

    /// The directory this sandbox keeps its files in (removed when it stops).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Which backend runs the guest.
    pub fn backend(&self) -> Backend {
        self.hypervisor.backend()
    }

    /// How a container's rootfs reaches this sandbox's agent.
    pub fn rootfs_delivery(&self) -> RootfsDelivery {
        self.backend().rootfs_delivery(self.shared_dir.is_some())
    }

    /// The host directory the guest mounts over virtio-fs, if it has one.
    pub fn shared_dir(&self) -> Option<&Path> {
        self.shared_dir.as_deref()
    }

    /// The pid of the process that embodies the guest.
    pub fn pid(&self) -> u32 {
        self.hypervisor.pid().unwrap_or(0)
    }

    /// `Some(exit)` once the guest ended.
    pub fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.hypervisor.exit_watch()
    }

    pub fn is_dead(&self) -> bool {
        self.exit_watch().borrow().is_some()
    }

    /// After DestroySandbox the agent ends the guest itself (a power-off, or
    /// a reboot the VMM takes as the end), so the VMM exits with status 0
    /// and needs no signal; waits up to the stop grace for that.
    async fn await_own_end(&self) {
        let mut exit = self.exit_watch();
        let ended = tokio::time::timeout(self.stop_grace, exit.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(exit)) => {
                tracing::info!(sandbox_id = %self.id, exit = ?*exit, "the guest ended by itself")
            }
            _ => tracing::warn!(
                sandbox_id = %self.id,
                grace_ms = self.stop_grace.as_millis() as u64,
                "the guest did not end by itself after DestroySandbox; stopping it"
            ),
        }
    }

    /// Asks the agent to tear everything down, then stops the guest.
    pub async fn stop(&self) -> Result<Option<GuestExit>, SandboxError> {
        if !self.is_dead() {
            let destroy = tokio::time::timeout(self.stop_grace, self.agent.destroy_sandbox()).await;
            if matches!(destroy, Ok(Ok(()))) {
                self.await_own_end().await;
            } else {
                tracing::warn!(sandbox_id = %self.id, "DestroySandbox did not complete; stopping the guest anyway");
            }
        }
        // The backend's stop removes the state directory: what containers
        // still have mounted in the shared directory goes first.
        if let Some(dir) = &self.shared_dir {
            release_shared_dir(&self.id, dir);
        }
        let exit = self
            .hypervisor
            .stop(self.stop_grace)
            .await
            .map_err(|source| SandboxError::Hypervisor {
                id: self.id.clone(),
                source,
            })?;
        if let Some(netns) = &self.netns {
            detach_network(&self.id, netns).await;
        }
        tracing::info!(sandbox_id = %self.id, ?exit, "sandbox stopped");
        Ok(exit)
    }
}

/// Unmounts whatever is still mounted in a sandbox's shared directory
/// (containers normally unmount their own when deleted).
fn release_shared_dir(id: &str, dir: &Path) {
    let left = crate::shared_fs::unmount_all(dir);
    if !left.is_empty() {
        tracing::error!(sandbox_id = id, still_mounted = ?left, "mounts left in the shared directory; its state directory will not be removed");
    }
}

/// Dials the agent, giving up early if the guest dies meanwhile.
async fn connect_agent(
    id: &str,
    hypervisor: &dyn Hypervisor,
    config: &Config,
) -> Result<AgentClient, SandboxError> {
    let address = hypervisor.agent_address().ok_or(SandboxError::NoAddress {
        id: id.into(),
        backend: hypervisor.name(),
    })?;
    let address: Address = address.parse().map_err(|source| SandboxError::Address {
        id: id.into(),
        source,
    })?;
    tokio::select! {
        agent = AgentClient::connect(&address, &config.agent) => {
            agent.map_err(|source| SandboxError::Agent { id: id.into(), source: Box::new(source) })
        }
        exit = wait_exit(hypervisor.exit_watch()) => Err(SandboxError::DiedEarly {
            id: id.into(),
            exit: exit.unwrap_or(GuestExit::Exited(255)),
        }),
    }
}

/// Mirrors the pod's interfaces in `netns` to taps for the guest.
async fn attach_network(
    id: &str,
    netns: &Path,
) -> Result<crate::network::tcfilter::PodNetwork, SandboxError> {
    let path = netns.to_path_buf();
    let attached = tokio::task::spawn_blocking(move || crate::network::tcfilter::attach(&path))
        .await
        .unwrap_or_else(|e| Err(join_failed(e)));
    let network = attached.map_err(|source| SandboxError::Network {
        id: id.into(),
        source,
    })?;
    tracing::info!(sandbox_id = id, netns = %netns.display(), cards = network.nics.len(), "pod network mirrored");
    Ok(network)
}

fn join_failed(e: tokio::task::JoinError) -> crate::network::tcfilter::NetworkError {
    crate::network::tcfilter::NetworkError::Namespace {
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Undoes [`attach_network`]; a failure is logged, not returned: the
/// sandbox is going away whatever it says.
async fn detach_network(id: &str, netns: &Path) {
    let path = netns.to_path_buf();
    let detached = tokio::task::spawn_blocking(move || crate::network::tcfilter::detach(&path))
        .await
        .unwrap_or_else(|e| Err(join_failed(e)));
    if let Err(e) = detached {
        tracing::warn!(
            sandbox_id = id,
            error = crate::error_chain(&e),
            "undoing the pod network"
        );
    }
}

/// Tells the agent what the guest's cards stand for, in Kata's order:
/// interfaces, then routes, then pinned neighbours.
async fn configure_guest_network(
    agent: &AgentClient,
    network: crate::network::tcfilter::PodNetwork,
) -> Result<(), AgentError> {
    for interface in network.interfaces {
        agent.update_interface(interface).await?;
    }
    if !network.routes.is_empty() {
        agent.update_routes(network.routes).await?;
    }
    if !network.neighbors.is_empty() {
        agent.add_arp_neighbors(network.neighbors).await?;
    }
    Ok(())
}

fn write_record(dir: &Path, record: &SandboxRecord) -> Result<(), SandboxError> {
    let json = serde_json::to_vec(record).map_err(|e| SandboxError::Record {
        id: record.id.clone(),
        message: e.to_string(),
    })?;
    write_file(&record.id, dir, RECORD, &json)
}

/// Writes `name` in `dir` whole or not at all.
fn write_file(id: &str, dir: &Path, name: &str, contents: &[u8]) -> Result<(), SandboxError> {
    let fail = |message: String| SandboxError::Record {
        id: id.into(),
        message,
    };
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, contents).map_err(|e| fail(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, dir.join(name))
        .map_err(|e| fail(format!("renaming {}: {e}", tmp.display())))
}

/// The record in a sandbox's directory, if it has a readable one.
fn read_record(dir: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(dir.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Cleans up a sandbox whose runtime is gone: kills its guest process if
/// it is still the one recorded, unmounts what the dead runtime left bound
/// in its shared directory, and removes its state directory (only if the
/// runtime made it, and never through a mount). Returns what was found, `None` if there was no
/// sandbox.
pub fn clean_up_orphan(config: &Config, id: &str) -> Result<Option<SandboxRecord>, SandboxError> {
    let dir = state_dir(config, id)?;
    if dir.exists() && !kestrel_hypervisor::state_dir::is_ours(&dir) {
        return Err(SandboxError::Hypervisor {
            id: id.into(),
            source: kestrel_hypervisor::Error::NotOurs(dir),
        });
    }
    let fail = |message: String| SandboxError::Record {
        id: id.into(),
        message,
    };
    let record: Option<SandboxRecord> = match std::fs::read(dir.join(RECORD)) {
        Ok(bytes) => {
            Some(serde_json::from_slice(&bytes).map_err(|e| fail(format!("{RECORD}: {e}")))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(fail(format!("reading {RECORD}: {e}"))),
    };
    if let Some(record) = &record {
        if record.id != id {
            return Err(fail(format!(
                "{} holds sandbox {:?}, not this one: leaving it alone",
                dir.display(),
                record.id
            )));
        }
        kill_if_ours(record.pid, &dir);
    }
    // With its VMM gone, the taps are ours to remove; the network namespace
    // may be gone already, and then there is nothing left in it.
    if let Ok(netns) = std::fs::read(dir.join(NETNS_RECORD)) {
        use std::os::unix::ffi::OsStrExt;
        let netns = Path::new(std::ffi::OsStr::from_bytes(&netns));
        if let Err(e) = crate::network::tcfilter::detach(netns) {
            tracing::warn!(
                sandbox_id = id,
                error = crate::error_chain(&e),
                "undoing the pod network"
            );
        }
    }
    // The crashed shim's binds of rootfs and volumes: removing the state
    // directory through them would delete the files they show.
    release_shared_dir(id, &crate::shared_fs::host_dir(&dir));
    kestrel_hypervisor::state_dir::remove(&dir).map_err(|source| SandboxError::Hypervisor {
        id: id.into(),
        source,
    })?;
    Ok(record)
}

/// SIGKILLs `pid` only if its command line names `dir`: after a crash the
/// pid may belong to someone else by now.
fn kill_if_ours(pid: u32, dir: &Path) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    if cmdline.windows(needle.len()).any(|w| w == needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Let the kernel tear the process down before its directory goes.
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A sandbox's health as its shim last reported it: whether its relister
/// keeps relisting (`kestrel ps`, `kestrel doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
    /// No sandbox of that id runs, or its shim has not reported yet.
    Unknown,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Healthy => f.write_str("healthy"),
            Health::Unhealthy(why) => write!(f, "unhealthy: {why}"),
            Health::Unknown => f.write_str("unknown"),
        }
    }
}

/// The health of the sandbox `id` under the configured state directory.
pub fn health(config: &Config, id: &str) -> Health {
    match state_dir(config, id) {
        Ok(dir) => health_in(&dir),
        Err(_) => Health::Unknown,
    }
}

fn health_in(dir: &Path) -> Health {
    let report: Option<HealthReport> = std::fs::read(dir.join(HEALTH_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match report.map(|r| r.verdict(std::time::SystemTime::now())) {
        None => Health::Unknown,
        Some(Ok(())) => Health::Healthy,
        Some(Err(why)) => Health::Unhealthy(why.to_string()),
    }
}

/// Every sandbox under the configured state directory, by id, with its
/// health.
pub fn all_health(config: &Config) -> Vec<(String, Health)> {
    let Ok(entries) = std::fs::read_dir(&config.sandbox.state_dir) else {
        return Vec::new();
    };
    let mut all: Vec<(String, Health)> = entries
        .filter_map(Result::ok)
        .filter(|e| kestrel_hypervisor::state_dir::is_ours(&e.path()))
        .filter_map(|e| {
            // A long id's directory has a shortened name; its record has
            // the id.
            let id = read_record(&e.path())
                .map(|r| r.id)
                .or_else(|| e.file_name().into_string().ok())?;
            Some((id, health_in(&e.path())))
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn health_comes_from_the_report_and_turns_stale_by_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.sandbox.state_dir = tmp.path().to_path_buf();
        for id in ["fresh", "stale", "silent"] {
            kestrel_hypervisor::state_dir::create(&tmp.path().join(id)).unwrap();
        }
        let write = |id: &str, last: u64| {
            let report = HealthReport {
                started_unix_ms: now_ms() - 600_000,
                last_relist_unix_ms: Some(last),
                unhealthy_after_ms: 180_000,
            };
            std::fs::write(
                tmp.path().join(id).join(HEALTH_FILE),
                serde_json::to_vec(&report).unwrap(),
            )
            .unwrap();
        };
        write("fresh", now_ms());
        write("stale", now_ms() - 200_000);
        assert_eq!(health(&config, "fresh"), Health::Healthy);
        assert!(
            matches!(health(&config, "stale"), Health::Unhealthy(why) if why.contains("last active")),
        );
        assert_eq!(health(&config, "silent"), Health::Unknown);
        assert_eq!(health(&config, "../x"), Health::Unknown);
        let all = all_health(&config);
        let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["fresh", "silent", "stale"]);
    }
}
