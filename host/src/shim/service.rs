//! The runtime behind the shim's Task service: containers in the lifecycle
//! registry, each in a sandbox, driven through the agent.
//!
//! The ttrpc layer ([`super::task`]) only converts; every rule lives here.
//! What the registry guarantees (State during teardown answers STOPPED with
//! the real exit) holds because a container leaves the registry only after
//! [`Runtime::delete`] finished tearing it down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use kestrel_protocols::agent::{
    CreateContainerRequest, ExecProcessRequest, UpdateContainerRequest,
};
use kestrel_protocols::id::IdError;
use kestrel_protocols::oci;
use kestrel_protocols::ttrpc::Code;

use crate::agent_client::{AgentClient, AgentError, Probe};
use crate::config::Config;
use crate::lifecycle::events::{Event, EventStream};
use crate::lifecycle::registry::{
    Container, Lookup, Process, Registry, RegistryError, Stdio, TombstoneLimits,
};
use crate::lifecycle::relist::{
    self, Inspection, LifecycleEvent, Listed, ObservedState, RelistConfig, Relister, SandboxView,
    ViewError,
};
use crate::lifecycle::state::{Exit, IllegalTransition, Phase, ProcessState, Transition};
use crate::oci::{load_bundle_spec, process_from_json, resources_from_json, sandbox_id, SpecError};
use crate::rootfs;
use crate::sandbox::{Sandbox, SandboxError};

use super::stdio::ProcessIo;

/// How long a process's outputs may stay open after it exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// How long an init's exit waits for its execs' exits to be recorded first.
const EXEC_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long a relister-detected death waits for the exit watcher to record
/// it (after draining the output and its execs' exits) before recording it
/// itself.
const RELIST_EXIT_GRACE: Duration = Duration::from_secs(12);
/// How long a lost agent connection waits for the guest's death to show.
const DEATH_NOTICE: Duration = Duration::from_secs(2);
/// How long a liveness probe lets the agent answer.
const PROBE_DEADLINE: Duration = Duration::from_millis(20);
/// The exit status of every process whose sandbox died.
pub const SANDBOX_DIED_STATUS: u32 = 255;
/// The status of a process the agent killed on removal (SIGKILL), also
/// recorded for a container deleted before it ever started.
const KILLED_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// Every way a task request can fail; [`ShimError::code`] is the one place
/// that decides the wire code.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Agent(Box<AgentError>),
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) | ShimError::InvalidId(_) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            // The agent's own verdict carries through (NOT_FOUND stays NOT_FOUND).
            ShimError::Agent(e) => e.code().unwrap_or(Code::UNAVAILABLE),
            ShimError::Sandbox(_) => Code::UNAVAILABLE,
            ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ShimError {
    fn from(e: AgentError) -> Self {
        ShimError::Agent(Box::new(e))
    }
}

impl From<SandboxError> for ShimError {
    fn from(e: SandboxError) -> Self {
        ShimError::Sandbox(Box::new(e))
    }
}

impl From<RegistryError> for ShimError {
    fn from(e: RegistryError) -> Self {
        ShimError::AlreadyExists(e.to_string())
    }
}

impl From<IllegalTransition> for ShimError {
    fn from(e: IllegalTransition) -> Self {
        ShimError::FailedPrecondition(e.to_string())
    }
}

impl From<SpecError> for ShimError {
    fn from(e: SpecError) -> Self {
        // A bundle containerd handed over that cannot be read is a bad request.
        ShimError::InvalidArgument(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ShimError>;

/// A request to create a container (the fields of containerd's
/// CreateTaskRequest the runtime uses).
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    pub id: String,
    pub bundle: PathBuf,
    /// Mounts that make up the rootfs, mounted at `<bundle>/rootfs`.
    pub rootfs: Vec<RootfsMount>,
    pub stdio: Stdio,
}

#[derive(Debug, Clone, Default)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What State answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    pub id: String,
    pub exec_id: String,
    pub bundle: String,
    pub pid: u32,
    /// Created, Running, Paused or Stopped (teardown phases read Stopped).
    pub phase: Phase,
    pub exit: Option<Exit>,
    pub stdio: Stdio,
}

/// A sandbox in use, with what watches it.
struct SandboxEntry {
    sandbox: Arc<Sandbox>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    relister: Arc<Relister<AgentView>>,
}

impl Drop for SandboxEntry {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

/// Per-container bits the registry does not track.
#[derive(Default)]
struct Extras {
    rootfs_mounted: Option<PathBuf>,
    exec_specs: HashMap<String, oci::Process>,
    io: HashMap<String, ProcessIo>,
}

pub struct Runtime {
    config: Config,
    registry: Registry,
    events: EventStream,
    sandboxes: tokio::sync::Mutex<HashMap<String, SandboxEntry>>,
    extras: Mutex<HashMap<String, Extras>>,
}

impl Runtime {
    pub fn new(config: Config, events: EventStream) -> Arc<Runtime> {
        let limits = TombstoneLimits {
            max_entries: config.lifecycle.tombstone_max_entries,
            max_age: config.lifecycle.tombstone_max_age(),
        };
        Arc::new(Runtime {
            config,
            registry: Registry::new(limits),
            events,
            sandboxes: tokio::sync::Mutex::new(HashMap::new()),
            extras: Mutex::new(HashMap::new()),
        })
    }

    fn extras(&self) -> MutexGuard<'_, HashMap<String, Extras>> {
        self.extras.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, id: &str) -> Result<Arc<Container>> {
        self.registry
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let container = self.live(id)?;
        let process = container.process(exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("exec {exec_id} not found in container {id}"))
        })?;
        Ok((container, process))
    }

    async fn sandbox_of(&self, container: &Container) -> Result<Arc<Sandbox>> {
        self.sandboxes
            .lock()
            .await
            .get(&container.sandbox_id)
            .map(|e| Arc::clone(&e.sandbox))
            .ok_or_else(|| {
                ShimError::FailedPrecondition(format!(
                    "sandbox {} is not running",
                    container.sandbox_id
                ))
            })
    }

    /// The sandbox `id`, started on first use.
    async fn ensure_sandbox(self: &Arc<Self>, id: &str) -> Result<Arc<Sandbox>> {
        let mut sandboxes = self.sandboxes.lock().await;
        if let Some(entry) = sandboxes.get(id) {
            if !entry.sandbox.is_dead() {
                return Ok(Arc::clone(&entry.sandbox));
            }
            return Err(ShimError::FailedPrecondition(format!(
                "sandbox {id} has died; its containers are stopped"
            )));
        }
        let sandbox = Sandbox::start(id, &self.config).await?;
        let relister = Arc::new(Relister::new(
            AgentView {
                runtime: Arc::downgrade(self),
                sandbox: Arc::clone(&sandbox),
            },
            RelistConfig {
                period: self.config.lifecycle.relist_period(),
                unhealthy_after: self.config.lifecycle.relist_unhealthy_after(),
            },
            self.relist_events(),
        ));
        let watchers = vec![
            tokio::spawn(Arc::clone(self).watch_sandbox_death(Arc::clone(&sandbox))),
            tokio::spawn(watch_oom(Arc::clone(&sandbox), self.events.clone())),
            Arc::clone(&relister).spawn(),
        ];
        sandboxes.insert(
            id.into(),
            SandboxEntry {
                sandbox: Arc::clone(&sandbox),
                watchers,
                relister,
            },
        );
        Ok(sandbox)
    }

    /// Whether the relister of `sandbox_id` is healthy; `Err` says why not.
    pub async fn relister_health(
        &self,
        sandbox_id: &str,
    ) -> Option<std::result::Result<(), relist::Unhealthy>> {
        let sandboxes = self.sandboxes.lock().await;
        sandboxes.get(sandbox_id).map(|e| e.relister.healthy())
    }

    /// The relister's last known record of a container.
    pub async fn relist_record(&self, sandbox_id: &str, id: &str) -> Option<relist::Record> {
        let sandboxes = self.sandboxes.lock().await;
        sandboxes
            .get(sandbox_id)
            .and_then(|e| e.relister.record(id))
    }

    /// A channel whose receiver acts on what the relister saw: a death the
    /// exit watcher missed is recorded after a grace period.
    fn relist_events(self: &Arc<Self>) -> tokio::sync::mpsc::UnboundedSender<LifecycleEvent> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                tracing::debug!(?event, "relist");
                // Only an exit the agent reported: a container that merely
                // left the list is being deleted.
                let LifecycleEvent::ContainerDied {
                    id,
                    exit_status: Some(status),
                } = event
                else {
                    continue;
                };
                let Some(runtime) = runtime.upgrade() else {
                    return;
                };
                let Some(seen) = runtime.registry.get(&id) else {
                    continue;
                };
                tokio::spawn(async move {
                    tokio::time::sleep(RELIST_EXIT_GRACE).await;
                    // The same container, not a new one under its id.
                    let same = runtime
                        .registry
                        .get(&id)
                        .filter(|now| Arc::ptr_eq(now, &seen));
                    if let Some(container) = same {
                        if !container.init.state().has_exited() {
                            tracing::warn!(container_id = %id, status, "relist found a death the exit watcher missed");
                            let _op = container.op.lock().await;
                            runtime.record_exit(&container, &container.init, Exit::now(status));
                        }
                    }
                });
            }
        });
        tx
    }

    // ---- Task operations -------------------------------------------------

    pub async fn create(self: &Arc<Self>, params: CreateParams) -> Result<u32> {
        validate_id("container id", &params.id)?;
        if !params.bundle.is_absolute() {
            return Err(ShimError::InvalidArgument(format!(
                "bundle {} is not an absolute path",
                params.bundle.display()
            )));
        }
        let mut spec = load_bundle_spec(&params.bundle)?;
        let sandbox_id = sandbox_id(&spec, &params.id).to_string();
        validate_id("sandbox id", &sandbox_id)?;
        if spec.Process.is_none() {
            return Err(ShimError::InvalidArgument(
                "the OCI spec has no process".into(),
            ));
        }
        let container = self.registry.insert(Container::new(
            &params.id,
            params.bundle.clone(),
            &sandbox_id,
            params.stdio.clone(),
        ))?;
        let _op = container.op.lock().await;
        match self.create_in_sandbox(&container, &params, &mut spec).await {
            Ok((pid, sandbox)) => {
                self.events.emit(Event::Create {
                    container_id: params.id.clone(),
                    bundle: params.bundle.display().to_string(),
                    pid,
                });
                // Watched from creation: an init killed before Start still
                // exits, and Wait must return for it.
                let init = Arc::clone(&container.init);
                tokio::spawn(Arc::clone(self).watch_exit(Arc::clone(&container), init, sandbox));
                Ok(pid)
            }
            Err(e) => {
                // Nothing half-created: no rootfs mount, no registry entry.
                if let Some(extras) = self.extras().remove(&params.id) {
                    if let Some(target) = extras.rootfs_mounted {
                        unmount(&target);
                    }
                }
                self.registry.discard(&params.id);
                self.stop_sandbox_if_unused(&sandbox_id).await;
                Err(e)
            }
        }
    }

    async fn create_in_sandbox(
        self: &Arc<Self>,
        container: &Container,
        params: &CreateParams,
        spec: &mut oci::Spec,
    ) -> Result<(u32, Arc<Sandbox>)> {
        let id = &container.id;
        self.extras().insert(id.clone(), Extras::default());
        let root = resolve_root(&params.bundle, spec);
        if !params.rootfs.is_empty() {
            let target = params.bundle.join("rootfs");
            mount_rootfs(&params.rootfs, &target)?;
            if let Some(extras) = self.extras().get_mut(id) {
                extras.rootfs_mounted = Some(target.clone());
            }
            spec.Root.mut_or_insert_default().Path = target.display().to_string();
        } else {
            spec.Root.mut_or_insert_default().Path = root.display().to_string();
        }
        let sandbox = self.ensure_sandbox(&container.sandbox_id).await?;
        let agent = sandbox.agent();
        if !sandbox.shares_host_files() {
            copy_into_vm(agent, id, spec).await?;
        }
        agent
            .create_container(CreateContainerRequest {
                container_id: id.clone(),
                exec_id: id.clone(),
                OCI: Some(spec.clone()).into(),
                ..Default::default()
            })
            .await?;
        match ProcessIo::start(agent, id, "", &container.init.stdio) {
            Ok(io) => {
                if let Some(extras) = self.extras().get_mut(id) {
                    extras.io.insert(String::new(), io);
                }
            }
            Err(e) => {
                let _ = agent.remove_container(id, Duration::from_secs(1)).await;
                return Err(ShimError::InvalidArgument(format!(
                    "opening the stdio FIFOs of {id}: {e}"
                )));
            }
        }
        Ok((sandbox.pid(), sandbox))
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let (container, process) = self.process(id, exec_id)?;
        let _op = container.op.lock().await;
        let sandbox = self.sandbox_of(&container).await?;
        if process.state().phase() != Phase::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot start {}: it is {}",
                describe(id, exec_id),
                process.state().phase()
            )));
        }
        let pid = sandbox.pid();
        if exec_id.is_empty() {
            sandbox.agent().start_container(id).await?;
            process.apply(Transition::Start { pid })?;
            self.events.emit(Event::Start {
                container_id: id.into(),
                pid,
            });
        } else {
            if container.init.state().has_exited() {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {id} has exited; cannot start exec {exec_id}"
                )));
            }
            let spec = self
                .extras()
                .get(id)
                .and_then(|x| x.exec_specs.get(exec_id).cloned())
                .ok_or_else(|| {
                    ShimError::NotFound(format!("exec {exec_id} has no process spec"))
                })?;
            sandbox
                .agent()
                .exec_process(ExecProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    process: Some(spec).into(),
                    ..Default::default()
                })
                .await?;
            match ProcessIo::start(sandbox.agent(), id, exec_id, &process.stdio) {
                Ok(io) => {
                    if let Some(extras) = self.extras().get_mut(id) {
                        extras.io.insert(exec_id.into(), io);
                    }
                }
                Err(e) => {
                    let _ = sandbox
                        .agent()
                        .signal_process(id, exec_id, libc::SIGKILL as u32)
                        .await;
                    return Err(ShimError::InvalidArgument(format!(
                        "opening the stdio FIFOs of exec {exec_id}: {e}"
                    )));
                }
            }
            process.apply(Transition::Start { pid })?;
            self.events.emit(Event::ExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid,
            });
            tokio::spawn(Arc::clone(self).watch_exit(Arc::clone(&container), process, sandbox));
        }
        Ok(pid)
    }

    /// Waits for a started process to exit, lets its output drain, and
    /// records the exit (an init's only after its execs').
    async fn watch_exit(
        self: Arc<Self>,
        container: Arc<Container>,
        process: Arc<Process>,
        sandbox: Arc<Sandbox>,
    ) {
        let id = container.id.as_str();
        let exec_id = process.exec_id.as_str();
        let status = match sandbox.agent().wait_process(id, exec_id).await {
            Ok(status) => status,
            Err(e) => {
                if e.code().is_none() && dies_soon(&sandbox).await {
                    // The guest died; record it the way its death watcher
                    // does (whichever runs first wins), execs first.
                    self.record_guest_death(&container, exec_id);
                    return;
                }
                tracing::error!(container_id = id, exec_id, error = %e, "WaitProcess failed; recording the process as dead");
                SANDBOX_DIED_STATUS
            }
        };
        let at = SystemTime::now();
        let io = self.extras().get_mut(id).and_then(|x| x.io.remove(exec_id));
        if let Some(mut io) = io {
            io.drain(OUTPUT_DRAIN).await;
        }
        if exec_id.is_empty() {
            for exec in container.execs_snapshot() {
                if matches!(exec.state().phase(), Phase::Running | Phase::Paused) {
                    let _ = tokio::time::timeout(EXEC_EXIT_WAIT, exec.wait()).await;
                }
            }
        }
        // An init's exit waits for its Start to be published: the
        // operation holding the lock emits it before letting go.
        let _op = if exec_id.is_empty() {
            Some(container.op.lock().await)
        } else {
            None
        };
        self.record_exit(&container, &process, Exit { status, at });
    }

    /// Stops the started processes of `container` with the guest-death
    /// status: only `exec_id`, or (for an empty one) every exec, then the init.
    fn record_guest_death(&self, container: &Container, exec_id: &str) {
        let died = || Exit::now(SANDBOX_DIED_STATUS);
        if !exec_id.is_empty() {
            if let Some(exec) = container.process(exec_id) {
                self.record_exit(container, &exec, died());
            }
            return;
        }
        for exec in container.execs_snapshot() {
            if exec.state().phase() != Phase::Created {
                self.record_exit(container, &exec, died());
            }
        }
        self.record_exit(container, &container.init, died());
    }

    /// Records an exit once and publishes it; a second report is ignored.
    fn record_exit(&self, container: &Container, process: &Process, exit: Exit) {
        match process.apply(Transition::Exit(exit)) {
            Ok(state) => {
                tracing::info!(container_id = %container.id, exec_id = %process.exec_id, status = exit.status, "process exited");
                self.events.emit(Event::Exit {
                    container_id: container.id.clone(),
                    exec_id: process.exec_id.clone(),
                    pid: state.pid(),
                    exit,
                });
            }
            Err(e) => {
                tracing::debug!(container_id = %container.id, exec_id = %process.exec_id, error = %e, "exit already recorded")
            }
        }
    }

    /// When the guest dies, every process in it is stopped with status 255.
    async fn watch_sandbox_death(self: Arc<Self>, sandbox: Arc<Sandbox>) {
        let exit = kestrel_hypervisor::wait_exit(sandbox.exit_watch()).await;
        let dying: Vec<_> = self
            .registry
            .live()
            .into_iter()
            .filter(|c| c.sandbox_id == sandbox.id)
            .collect();
        if dying.iter().any(|c| !c.init.state().has_exited()) {
            tracing::error!(sandbox_id = %sandbox.id, ?exit, "sandbox died; stopping its containers with status {SANDBOX_DIED_STATUS}");
        }
        for container in dying {
            self.record_guest_death(&container, "");
        }
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessStatus> {
        match self.registry.lookup(id) {
            Lookup::Live(container) => {
                let process = container.process(exec_id).ok_or_else(|| {
                    ShimError::NotFound(format!("exec {exec_id} not found in container {id}"))
                })?;
                Ok(status_of(&container, &process, process.state()))
            }
            Lookup::Tombstone(t) if exec_id.is_empty() => Ok(ProcessStatus {
                id: id.into(),
                exec_id: String::new(),
                bundle: t.bundle.display().to_string(),
                pid: t.pid,
                phase: Phase::Stopped,
                exit: Some(t.exit),
                stdio: Stdio::default(),
            }),
            Lookup::Tombstone(_) => Err(ShimError::NotFound(format!(
                "exec {exec_id} not found: container {id} was deleted"
            ))),
            Lookup::Unknown => Err(ShimError::NotFound(format!("container {id} not found"))),
        }
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        match self.registry.lookup(id) {
            Lookup::Live(container) => {
                let process = container.process(exec_id).ok_or_else(|| {
                    ShimError::NotFound(format!("exec {exec_id} not found in container {id}"))
                })?;
                Ok(process.wait().await)
            }
            Lookup::Tombstone(t) if exec_id.is_empty() => Ok(t.exit),
            Lookup::Tombstone(_) | Lookup::Unknown => Err(ShimError::NotFound(format!(
                "{} not found",
                describe(id, exec_id)
            ))),
        }
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if signal == 0 || signal > 64 {
            return Err(ShimError::InvalidArgument(format!(
                "signal {signal} is not a signal number"
            )));
        }
        let (container, process) = match self.process(id, exec_id) {
            Ok(found) => found,
            Err(_) if matches!(self.registry.lookup(id), Lookup::Tombstone(_)) => {
                return Err(ShimError::NotFound(format!(
                    "{}: process already finished",
                    describe(id, exec_id)
                )))
            }
            Err(e) => return Err(e),
        };
        if process.state().has_exited() {
            return Err(ShimError::NotFound(format!(
                "{}: process already finished",
                describe(id, exec_id)
            )));
        }
        let sandbox = self.sandbox_of(&container).await?;
        // The agent knows the init by the container id; an empty id reaches
        // every process of the container, which only `all` asks for.
        let target = match (all, exec_id) {
            (true, _) => "",
            (false, "") => id,
            (false, exec) => exec,
        };
        match sandbox.agent().signal_process(id, target, signal).await {
            Err(e) if e.code() == Some(Code::NOT_FOUND) => Err(ShimError::NotFound(format!(
                "{}: process already finished",
                describe(id, exec_id)
            ))),
            other => other.map_err(ShimError::from),
        }
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: Stdio,
        spec_json: &[u8],
    ) -> Result<()> {
        validate_id("exec id", exec_id)?;
        let container = self.live(id)?;
        let _op = container.op.lock().await;
        let init = container.init.state();
        if init.has_exited() {
            return Err(ShimError::FailedPrecondition(format!(
                "container {id} has exited; cannot exec {exec_id}"
            )));
        }
        let spec = process_from_json(spec_json, &format!("the process of exec {exec_id}"))?;
        if spec.Args.is_empty() {
            return Err(ShimError::InvalidArgument(format!(
                "exec {exec_id}: the process has no args"
            )));
        }
        container.add_exec(exec_id, stdio)?;
        if let Some(extras) = self.extras().get_mut(id) {
            extras.exec_specs.insert(exec_id.into(), spec);
        }
        self.events.emit(Event::ExecAdded {
            container_id: id.into(),
            exec_id: exec_id.into(),
        });
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        let container = self.live(id)?;
        let _op = container.op.lock().await;
        require_phase(&container, Phase::Running, "pause")?;
        self.sandbox_of(&container)
            .await?
            .agent()
            .pause_container(id)
            .await?;
        container.init.apply(Transition::Pause)?;
        self.events.emit(Event::Paused {
            container_id: id.into(),
        });
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        let container = self.live(id)?;
        let _op = container.op.lock().await;
        require_phase(&container, Phase::Paused, "resume")?;
        self.sandbox_of(&container)
            .await?
            .agent()
            .resume_container(id)
            .await?;
        container.init.apply(Transition::Resume)?;
        self.events.emit(Event::Resumed {
            container_id: id.into(),
        });
        Ok(())
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let (container, process) = self.process(id, exec_id)?;
        if !process.stdio.terminal {
            return Err(ShimError::FailedPrecondition(format!(
                "{} has no terminal",
                describe(id, exec_id)
            )));
        }
        let sandbox = self.sandbox_of(&container).await?;
        Ok(sandbox
            .agent()
            .tty_win_resize(id, exec_id, height, width)
            .await?)
    }

    pub fn close_io(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?;
        if let Some(io) = self.extras().get(id).and_then(|x| x.io.get(exec_id)) {
            io.close_stdin();
        }
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.live(id)?;
        let resources = resources_from_json(resources_json, "the resources of Update")?;
        let sandbox = self.sandbox_of(&container).await?;
        Ok(sandbox
            .agent()
            .update_container(UpdateContainerRequest {
                container_id: id.into(),
                resources: Some(resources).into(),
                ..Default::default()
            })
            .await?)
    }

    pub async fn stats(
        &self,
        id: &str,
    ) -> Result<kestrel_protocols::agent::StatsContainerResponse> {
        let container = self.live(id)?;
        let sandbox = self.sandbox_of(&container).await?;
        Ok(sandbox.agent().stats_container(id).await?)
    }

    /// The pids of a container as the host sees them: every process runs
    /// behind the guest's one pid, as with Kata (none before Start).
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let pid = self.live(id)?.init.state().pid();
        Ok(if pid == 0 { Vec::new() } else { vec![pid] })
    }

    /// Deletes an exec, or tears a container down. Idempotent for a
    /// container (a second delete answers from the tombstone), and the
    /// teardown runs to its end even if the caller goes away.
    pub async fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        if !exec_id.is_empty() {
            return self.delete_exec(id, exec_id);
        }
        let runtime = Arc::clone(self);
        let id = id.to_string();
        tokio::spawn(async move { runtime.tear_down(&id).await })
            .await
            .map_err(|e| ShimError::Internal(format!("teardown task failed: {e}")))?
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let (container, process) = self.process(id, exec_id)?;
        let state = process.state();
        if state.phase() == Phase::Created {
            // Never started: nothing ran, nothing to wait for.
            process.apply(Transition::Exit(Exit::now(0)))?;
        } else if !state.has_exited() {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {exec_id} in container {id} is still running"
            )));
        }
        process.apply(Transition::BeginDelete)?;
        process.apply(Transition::FinishDelete)?;
        container.remove_exec(exec_id);
        if let Some(extras) = self.extras().get_mut(id) {
            extras.exec_specs.remove(exec_id);
            extras.io.remove(exec_id);
        }
        let state = process.state();
        Ok((state.pid(), state.exit().unwrap_or_else(|| Exit::now(0))))
    }

    async fn tear_down(self: &Arc<Self>, id: &str) -> Result<(u32, Exit)> {
        let container = match self.registry.lookup(id) {
            Lookup::Live(c) => c,
            Lookup::Tombstone(t) => return Ok((t.pid, t.exit)),
            Lookup::Unknown => {
                return Err(ShimError::NotFound(format!("container {id} not found")))
            }
        };
        let _op = container.op.lock().await;
        // A delete that waited on the lock may find the work done.
        if let Lookup::Tombstone(t) = self.registry.lookup(id) {
            return Ok((t.pid, t.exit));
        }
        let state = container.init.state();
        match state.phase() {
            Phase::Created => {
                self.record_exit(&container, &container.init, Exit::now(KILLED_STATUS))
            }
            Phase::Running | Phase::Paused => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {id} is {}; kill it first",
                    state.phase()
                )))
            }
            _ => {}
        }
        container.init.apply(Transition::BeginDelete)?;
        if let Err(e) = self.remove_from_sandbox(&container).await {
            container.init.apply(Transition::DeleteFailed)?;
            return Err(e);
        }
        // RemoveContainer killed whatever outlived the init (execs in a
        // shared PID namespace): their exits come before the TaskDelete.
        for exec in container.execs_snapshot() {
            if matches!(exec.state().phase(), Phase::Running | Phase::Paused) {
                self.record_exit(&container, &exec, Exit::now(KILLED_STATUS));
            }
        }
        let state = container.init.apply(Transition::FinishDelete)?;
        let exit = state
            .exit()
            .unwrap_or_else(|| Exit::now(SANDBOX_DIED_STATUS));
        self.events.emit(Event::Delete {
            container_id: id.into(),
            pid: state.pid(),
            exit,
        });
        self.registry.bury(id);
        tracing::info!(container_id = id, status = exit.status, "container deleted");
        self.stop_sandbox_if_unused(&container.sandbox_id).await;
        Ok((state.pid(), exit))
    }

    async fn remove_from_sandbox(&self, container: &Container) -> Result<()> {
        let id = &container.id;
        let sandbox = self
            .sandboxes
            .lock()
            .await
            .get(&container.sandbox_id)
            .map(|e| Arc::clone(&e.sandbox));
        if let Some(sandbox) = sandbox.filter(|s| !s.is_dead()) {
            let grace = Duration::from_millis(self.config.sandbox.stop_grace_ms);
            match sandbox.agent().remove_container(id, grace).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NOT_FOUND) => {}
                // A lost connection: if the guest is dying, there is nothing left to remove.
                Err(e) if e.code().is_some() || !dies_soon(&sandbox).await => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "sandbox died during removal")
                }
            }
        }
        if let Some(extras) = self.extras().remove(id) {
            if let Some(target) = extras.rootfs_mounted {
                unmount(&target);
            }
        }
        Ok(())
    }

    /// Stops a sandbox no container uses any more.
    async fn stop_sandbox_if_unused(&self, sandbox_id: &str) {
        let mut sandboxes = self.sandboxes.lock().await;
        if self
            .registry
            .live()
            .iter()
            .any(|c| c.sandbox_id == sandbox_id)
        {
            return;
        }
        if let Some(entry) = sandboxes.remove(sandbox_id) {
            if let Err(e) = entry.sandbox.stop().await {
                tracing::warn!(sandbox_id, error = %e, "stopping an unused sandbox");
            }
        }
    }

    /// True when no container is left; the shim may then exit.
    pub fn is_empty(&self) -> bool {
        self.registry.live().is_empty()
    }

    /// Stops every sandbox (the shim is exiting).
    pub async fn stop_all(&self) {
        let entries: Vec<_> = self.sandboxes.lock().await.drain().collect();
        for (id, entry) in entries {
            if let Err(e) = entry.sandbox.stop().await {
                tracing::warn!(sandbox_id = %id, error = %e, "stopping sandbox");
            }
        }
    }
}

/// Whether the guest has died or does within a moment: a dropped agent
/// connection is usually the first sign of a dying guest.
async fn dies_soon(sandbox: &Sandbox) -> bool {
    let death = kestrel_hypervisor::wait_exit(sandbox.exit_watch());
    tokio::time::timeout(DEATH_NOTICE, death).await.is_ok()
}

/// Relays OOM kills the agent reports as TaskOOM events.
async fn watch_oom(sandbox: Arc<Sandbox>, events: EventStream) {
    loop {
        match sandbox.agent().get_oom_event().await {
            Ok(container_id) => events.emit(Event::Oom {
                container_id,
                at: SystemTime::now(),
            }),
            Err(e) => {
                if !sandbox.is_dead() {
                    tracing::debug!(sandbox_id = %sandbox.id, error = %e, "GetOOMEvent ended");
                }
                return;
            }
        }
    }
}

/// The relister's view of a sandbox: the containers the registry placed in
/// it, each probed through the agent.
struct AgentView {
    runtime: std::sync::Weak<Runtime>,
    sandbox: Arc<Sandbox>,
}

impl AgentView {
    fn containers(&self) -> Vec<Arc<Container>> {
        let Some(runtime) = self.runtime.upgrade() else {
            return Vec::new();
        };
        runtime
            .registry
            .live()
            .into_iter()
            .filter(|c| c.sandbox_id == self.sandbox.id)
            .collect()
    }

    async fn probe(&self, id: &str) -> std::result::Result<Probe, ViewError> {
        if self.sandbox.is_dead() {
            return Err(ViewError(format!("sandbox {} is dead", self.sandbox.id)));
        }
        self.sandbox
            .agent()
            .probe_process(id, "", PROBE_DEADLINE)
            .await
            .map_err(|e| ViewError(e.to_string()))
    }
}

#[async_trait::async_trait]
impl SandboxView for AgentView {
    async fn list(&self) -> std::result::Result<Vec<Listed>, ViewError> {
        let mut listed = Vec::new();
        for container in self.containers() {
            let state = match container.init.state().phase() {
                // The agent API has no "created" state to ask about.
                Phase::Created => ObservedState::Created,
                // Being torn down: the agent may already have let go of it.
                Phase::Deleting | Phase::Deleted => continue,
                _ => match self.probe(&container.id).await? {
                    Probe::Running => ObservedState::Running,
                    Probe::Exited(_) => ObservedState::Exited,
                    Probe::Gone => continue,
                },
            };
            listed.push(Listed {
                id: container.id.clone(),
                state,
            });
        }
        Ok(listed)
    }

    async fn inspect(&self, id: &str) -> std::result::Result<Inspection, ViewError> {
        let pid = self.sandbox.pid();
        let exit_status = match self.probe(id).await? {
            Probe::Exited(status) => Some(status),
            Probe::Running => None,
            Probe::Gone => return Err(ViewError(format!("container {id} is gone from the agent"))),
        };
        Ok(Inspection {
            pid: Some(pid),
            exit_status,
            ips: Vec::new(),
        })
    }
}

fn status_of(container: &Container, process: &Process, state: ProcessState) -> ProcessStatus {
    let phase = match state.phase() {
        Phase::Deleting | Phase::Deleted => Phase::Stopped,
        other => other,
    };
    ProcessStatus {
        id: container.id.clone(),
        exec_id: process.exec_id.clone(),
        bundle: container.bundle.display().to_string(),
        pid: state.pid(),
        phase,
        exit: state.exit(),
        stdio: process.stdio.clone(),
    }
}

fn require_phase(container: &Container, phase: Phase, verb: &str) -> Result<()> {
    let now = container.init.state().phase();
    if now != phase {
        return Err(ShimError::FailedPrecondition(format!(
            "cannot {verb} container {}: it is {now}",
            container.id
        )));
    }
    Ok(())
}

fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

/// Ids become paths and agent keys: the rule host and guest share.
fn validate_id(what: &'static str, id: &str) -> Result<()> {
    Ok(kestrel_protocols::id::validate(what, id)?)
}

/// The spec's root, made absolute against the bundle as runc does.
fn resolve_root(bundle: &Path, spec: &oci::Spec) -> PathBuf {
    let path = spec
        .Root
        .as_ref()
        .map(|r| r.Path.as_str())
        .unwrap_or("rootfs");
    let path = if path.is_empty() { "rootfs" } else { path };
    if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        bundle.join(path)
    }
}

/// Kata's "no shared filesystem" mode: the container's rootfs and the
/// files its spec bind-mounts are copied into the guest, and the spec is
/// pointed at the copies. The container is created only after a complete
/// copy.
async fn copy_into_vm(agent: &AgentClient, id: &str, spec: &mut oci::Spec) -> Result<()> {
    let host_root = PathBuf::from(&spec.Root.Path);
    let guest_root = rootfs::guest_rootfs_path(rootfs::GUEST_SHARED_DIR, id);
    let started = std::time::Instant::now();
    let stats = rootfs::copy_into_guest(agent, &host_root, &guest_root, None)
        .await
        .map_err(|e| ShimError::Internal(format!("copying the rootfs of {id} into the VM: {e}")))?;
    tracing::info!(container_id = id, files = stats.files, bytes = stats.bytes, elapsed = ?started.elapsed(), "rootfs copied into the VM");
    spec.Root.mut_or_insert_default().Path = guest_root;
    let mounts = rootfs::copy_bind_mounts(agent, rootfs::GUEST_SHARED_DIR, id, &spec.Mounts)
        .await
        .map_err(|e| {
            ShimError::Internal(format!("copying the bind mounts of {id} into the VM: {e}"))
        })?;
    spec.Mounts = mounts;
    Ok(())
}

fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(|e| ShimError::Internal(format!("creating {}: {e}", target.display())))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::mount::mount_rootfs(
            Some(m.fs_type.as_str()),
            Some(m.source.as_str()),
            &m.options,
            target,
        ) {
            // Undo the layers mounted so far.
            for _ in 0..i {
                unmount(target);
            }
            return Err(ShimError::InvalidArgument(format!(
                "mounting the rootfs ({} {}) at {}: {e}",
                m.fs_type,
                m.source,
                target.display()
            )));
        }
    }
    Ok(())
}

fn unmount(target: &Path) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(target = %target.display(), error = %e, "unmounting the rootfs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_table_of_ids_gets_the_same_verdicts_here() {
        for (id, ok) in kestrel_protocols::id::VERDICTS {
            match validate_id("container id", id) {
                Ok(()) => assert!(ok, "{id:?} accepted"),
                Err(e) => {
                    assert!(!ok, "{id:?} refused: {e}");
                    assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{id:?}");
                }
            }
        }
    }

    #[test]
    fn agent_codes_carry_through_and_lost_agents_are_unavailable() {
        let not_found = ShimError::from(AgentError::Rpc {
            method: "grpc.AgentService/SignalProcess",
            code: Code::NOT_FOUND,
            message: "no such process".into(),
        });
        assert_eq!(not_found.code(), Code::NOT_FOUND);
        let lost = ShimError::from(AgentError::Transport {
            method: "grpc.AgentService/WaitProcess",
            message: "connection reset".into(),
        });
        assert_eq!(lost.code(), Code::UNAVAILABLE);
    }

    #[test]
    fn a_relative_root_resolves_against_the_bundle() {
        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = "rootfs".into();
        assert_eq!(resolve_root(Path::new("/b"), &spec), Path::new("/b/rootfs"));
        spec.Root.mut_or_insert_default().Path = "/abs".into();
        assert_eq!(resolve_root(Path::new("/b"), &spec), Path::new("/abs"));
    }
}
