//! The runtime behind the shim's Task service: containers in the lifecycle
//! registry, each in a sandbox, driven through the agent.
//!
//! The ttrpc layer ([`super::task`]) only converts; every rule lives here
//! and in the rooms beside it: `pool` (sandboxes, booted and
//! stopped without holding a lock), `exits` (how exits are
//! learned: WaitProcess, the guest's death, the relister),
//! `teardown` (Delete) and [`super::error`] (wire codes). What a
//! container owns (its rootfs mount, its processes' stdio copiers and exec
//! specs) lives in its registry entry and ends with it. What the registry
//! guarantees (State during teardown answers STOPPED with the real exit)
//! holds because a container leaves the registry only after its teardown
//! finished.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kestrel_hypervisor::backend::RootfsDelivery;
use kestrel_protocols::agent::{
    CreateContainerRequest, ExecProcessRequest, UpdateContainerRequest,
};
use kestrel_protocols::oci;
use kestrel_protocols::ttrpc::Code;

use super::error::{Result, ShimError};
use super::mount::{MountedRootfs, RootfsMount};
use super::pool::SandboxPool;
use super::stdio::{OpenedStdio, ProcessRef, StdioError};
use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::hooks::Phase as HookPhase;
use crate::lifecycle::events::{Event, EventStream};
use crate::lifecycle::registry::{Container, Lookup, Process, Registry, Stdio, TombstoneLimits};
use crate::lifecycle::state::{Exit, Phase, ProcessState, Transition};
use crate::oci::{load_bundle, process_from_json, resources_from_json, sandbox_id, BundleConfig};
use crate::rootfs;
use crate::sandbox::Sandbox;

/// The exit status of every process whose sandbox died.
pub const SANDBOX_DIED_STATUS: u32 = 255;
/// The status of a process the agent killed on removal (SIGKILL), also
/// recorded for a container deleted before it ever started.
pub(super) const KILLED_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// A request to create a container (the fields of containerd's
/// CreateTaskRequest the runtime uses).
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    /// The runtime options' `ConfigPath`: the configuration of the
    /// sandbox this container starts, if it is the first.
    pub config_path: Option<PathBuf>,
    pub id: String,
    pub bundle: PathBuf,
    /// Mounts that make up the rootfs, mounted at `<bundle>/rootfs`.
    pub rootfs: Vec<RootfsMount>,
    pub stdio: Stdio,
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

pub struct Runtime {
    pub(super) config: Config,
    /// containerd's namespace (`-namespace`), told to logging binaries.
    pub(super) namespace: String,
    pub(super) registry: Registry,
    pub(super) events: EventStream,
    pub(super) sandboxes: SandboxPool,
}

impl Runtime {
    pub fn new(config: Config, namespace: &str, events: EventStream) -> Arc<Runtime> {
        let limits = TombstoneLimits {
            max_entries: config.lifecycle.tombstone_max_entries,
            max_age: config.lifecycle.tombstone_max_age(),
        };
        Arc::new(Runtime {
            config,
            namespace: namespace.into(),
            registry: Registry::new(limits),
            events,
            sandboxes: SandboxPool::default(),
        })
    }

    fn live(&self, id: &str) -> Result<Arc<Container>> {
        self.registry
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    pub(super) fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>)> {
        let container = self.live(id)?;
        let process = container.process(exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("exec {exec_id} not found in container {id}"))
        })?;
        Ok((container, process))
    }

    fn sandbox_of(&self, container: &Container) -> Result<Arc<Sandbox>> {
        self.sandboxes
            .get(&container.sandbox_id)
            .map(|running| Arc::clone(&running.sandbox))
            .ok_or_else(|| ShimError::SandboxNotRunning {
                id: container.sandbox_id.clone(),
            })
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
        let BundleConfig { mut spec, hooks } = load_bundle(&params.bundle)?;
        let sandbox_id = sandbox_id(&spec, &params.id).to_string();
        validate_id("sandbox id", &sandbox_id)?;
        if spec.Process.is_none() {
            return Err(ShimError::InvalidArgument(
                "the OCI spec has no process".into(),
            ));
        }
        let container = self.registry.insert(
            Container::new(
                &params.id,
                params.bundle.clone(),
                &sandbox_id,
                params.stdio.clone(),
            )
            .with_hooks(hooks),
        )?;
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
                container.release_rootfs();
                self.registry.discard(&params.id);
                // As runc destroys a container whose create failed: the
                // poststop hooks run, their failures only logged.
                self.run_poststop_hooks(&container, 0).await;
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
        // For the delete action, before a sandbox can exist: the
        // configuration this container asks its sandbox to run with.
        record_config_path(&params.bundle, params.config_path.as_deref())?;
        let root = resolve_root(&params.bundle, spec);
        if !params.rootfs.is_empty() {
            let mounted = MountedRootfs::mount(&params.rootfs, &params.bundle.join("rootfs"))
                .map_err(Box::new)?;
            spec.Root.mut_or_insert_default().Path = mounted.target().display().to_string();
            container.set_rootfs(mounted);
        } else {
            spec.Root.mut_or_insert_default().Path = root.display().to_string();
        }
        let sandbox = self
            .ensure_sandbox(&container.sandbox_id, params.config_path.as_deref(), spec)
            .await?;
        if sandbox.config_path() != params.config_path.as_deref() {
            // A later container of the pod: its sandbox runs with what its
            // first container asked for, and that is where delete must look.
            record_config_path(&params.bundle, sandbox.config_path())?;
        }
        // The runtime environment exists (the VM, the rootfs at the
        // bundle); nothing of the container is in the guest yet. Here,
        // rather than after CreateContainer, so that the order of the
        // runtime spec holds (the guest's createContainer hooks run during
        // CreateContainer, after these) and what a hook changes in the
        // rootfs reaches the guest, copied or shared.
        for phase in [HookPhase::Prestart, HookPhase::CreateRuntime] {
            self.run_hooks(container, phase, sandbox.pid()).await?;
        }
        let agent = sandbox.agent();
        match sandbox.rootfs_delivery() {
            RootfsDelivery::CopyIntoGuest => copy_into_vm(agent, id, spec).await?,
            RootfsDelivery::SharedFs => share_into_vm(container, &sandbox, spec)?,
            RootfsDelivery::HostPath => {}
        }
        // Before the guest has the container: a destination that does not
        // open, or a logger that does not start, leaves nothing there.
        let stdio = self
            .open_stdio(id, "", &container.init.stdio)
            .await
            .map_err(|source| ShimError::Stdio {
                id: id.clone(),
                process: "its init".into(),
                source,
            })?;
        let created = agent
            .create_container(CreateContainerRequest {
                container_id: id.clone(),
                exec_id: id.clone(),
                OCI: Some(spec.clone()).into(),
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            stdio.discard(id, "").await;
            return Err(ShimError::agent(id, "creating it")(e));
        }
        container.init.set_io(stdio.start(agent, id, ""));
        Ok((sandbox.pid(), sandbox))
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let (container, process) = self.process(id, exec_id)?;
        let _op = container.op.lock().await;
        let sandbox = self.sandbox_of(&container)?;
        if process.state().phase() != Phase::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot start {}: it is {}",
                describe(id, exec_id),
                process.state().phase()
            )));
        }
        let pid = sandbox.pid();
        if exec_id.is_empty() {
            sandbox
                .agent()
                .start_container(id)
                .await
                .map_err(ShimError::agent(id, "starting it"))?;
            if let Err(e) = self.run_hooks(&container, HookPhase::Poststart, pid).await {
                // As runc: a failed poststart hook kills the container and
                // fails the start; its exit is recorded as any other.
                if let Err(kill) = sandbox
                    .agent()
                    .signal_process(id, id, libc::SIGKILL as u32)
                    .await
                {
                    tracing::warn!(container_id = id, error = %kill, "killing the container after its poststart hook failed");
                }
                return Err(e);
            }
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
            let spec = process.spec().ok_or_else(|| {
                ShimError::NotFound(format!("exec {exec_id} has no process spec"))
            })?;
            // Before the exec runs, as for an init.
            let stdio = self
                .open_stdio(id, exec_id, &process.stdio)
                .await
                .map_err(|source| ShimError::Stdio {
                    id: id.into(),
                    process: format!("exec {exec_id}"),
                    source,
                })?;
            let started = sandbox
                .agent()
                .exec_process(ExecProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    process: Some(spec).into(),
                    ..Default::default()
                })
                .await;
            if let Err(e) = started {
                stdio.discard(id, exec_id).await;
                return Err(ShimError::agent(id, "starting an exec in it")(e));
            }
            process.set_io(stdio.start(sandbox.agent(), id, exec_id));
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

    /// Opens (or starts) where a process's streams go.
    async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: &Stdio,
    ) -> std::result::Result<OpenedStdio, StdioError> {
        let process = ProcessRef {
            container_id,
            exec_id,
            namespace: &self.namespace,
        };
        OpenedStdio::open(process, stdio).await
    }

    /// Runs the container's hooks of `phase` on the host.
    async fn run_hooks(&self, container: &Container, phase: HookPhase, pid: u32) -> Result<()> {
        container
            .hooks
            .run(phase, &container.id, &container.bundle, pid)
            .await
            .map_err(|source| ShimError::Hook {
                id: container.id.clone(),
                source,
            })
    }

    /// Runs the container's poststop hooks; as the runtime spec asks, a
    /// failure is a warning and the deletion goes on.
    pub(super) async fn run_poststop_hooks(&self, container: &Container, pid: u32) {
        if let Err(e) = self.run_hooks(container, HookPhase::Poststop, pid).await {
            tracing::warn!(container_id = %container.id, error = e.chain(), "poststop hook failed; the container is deleted regardless");
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
        let sandbox = self.sandbox_of(&container)?;
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
            other => other.map_err(ShimError::agent(id, "signalling it")),
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
        container.add_exec(exec_id, stdio)?.set_spec(spec);
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
        self.sandbox_of(&container)?
            .agent()
            .pause_container(id)
            .await
            .map_err(ShimError::agent(id, "pausing it"))?;
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
        self.sandbox_of(&container)?
            .agent()
            .resume_container(id)
            .await
            .map_err(ShimError::agent(id, "resuming it"))?;
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
        let sandbox = self.sandbox_of(&container)?;
        sandbox
            .agent()
            .tty_win_resize(id, exec_id, height, width)
            .await
            .map_err(ShimError::agent(id, "resizing a terminal"))
    }

    pub fn close_io(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?.1.close_stdin();
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.live(id)?;
        let resources = resources_from_json(resources_json, "the resources of Update")?;
        let sandbox = self.sandbox_of(&container)?;
        sandbox
            .agent()
            .update_container(UpdateContainerRequest {
                container_id: id.into(),
                resources: Some(resources).into(),
                ..Default::default()
            })
            .await
            .map_err(ShimError::agent(id, "updating its resources"))
    }

    pub async fn stats(
        &self,
        id: &str,
    ) -> Result<kestrel_protocols::agent::StatsContainerResponse> {
        let container = self.live(id)?;
        let sandbox = self.sandbox_of(&container)?;
        sandbox
            .agent()
            .stats_container(id)
            .await
            .map_err(ShimError::agent(id, "reading its stats"))
    }

    /// The pids of a container as the host sees them: every process runs
    /// behind the guest's one pid, as with Kata (none before Start).
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let pid = self.live(id)?.init.state().pid();
        Ok(if pid == 0 { Vec::new() } else { vec![pid] })
    }

    /// True when no container is left; the shim may then exit.
    pub fn is_empty(&self) -> bool {
        self.registry.live().is_empty()
    }

    /// Stops every sandbox (the shim is exiting).
    pub async fn stop_all(&self) {
        self.sandboxes.stop_all().await;
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

pub(super) fn describe(id: &str, exec_id: &str) -> String {
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
        .map_err(|source| ShimError::CopyIntoVm {
            id: id.into(),
            what: "rootfs",
            source: Box::new(source),
        })?;
    tracing::info!(container_id = id, files = stats.files, bytes = stats.bytes, elapsed = ?started.elapsed(), "rootfs copied into the VM");
    spec.Root.mut_or_insert_default().Path = guest_root;
    let mounts = rootfs::copy_bind_mounts(agent, rootfs::GUEST_SHARED_DIR, id, &spec.Mounts)
        .await
        .map_err(|source| ShimError::CopyIntoVm {
            id: id.into(),
            what: "bind mounts",
            source: Box::new(source),
        })?;
    spec.Mounts = mounts;
    Ok(())
}

/// Kata's shared filesystem: the container's rootfs and the files and
/// directories its spec bind-mounts are bind-mounted below the sandbox's
/// shared directory, and the spec is pointed at their guest paths. The
/// container keeps the binds until its teardown (or a failed create)
/// releases them.
fn share_into_vm(container: &Container, sandbox: &Sandbox, spec: &mut oci::Spec) -> Result<()> {
    let dir = sandbox.shared_dir().ok_or_else(|| {
        ShimError::Internal(format!("sandbox {} has no shared directory", sandbox.id))
    })?;
    let shared =
        crate::shared_fs::SharedContainer::share(dir, &container.id, spec).map_err(|source| {
            ShimError::ShareIntoVm {
                id: container.id.clone(),
                source: Box::new(source),
            }
        })?;
    container.set_shared(shared);
    Ok(())
}

/// Records in `bundle` the configuration file (`None`: the default one)
/// the container's sandbox runs with, for the shim's delete action.
fn record_config_path(bundle: &Path, path: Option<&Path>) -> Result<()> {
    let file = bundle.join(super::CONFIG_PATH_FILE);
    let written = match path {
        Some(path) => std::fs::write(&file, path.as_os_str().as_encoded_bytes()),
        None => match std::fs::remove_file(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    written.map_err(|e| ShimError::Internal(format!("recording {}: {e}", file.display())))
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
    fn a_relative_root_resolves_against_the_bundle() {
        let mut spec = oci::Spec::new();
        spec.Root.mut_or_insert_default().Path = "rootfs".into();
        assert_eq!(resolve_root(Path::new("/b"), &spec), Path::new("/b/rootfs"));
        spec.Root.mut_or_insert_default().Path = "/abs".into();
        assert_eq!(resolve_root(Path::new("/b"), &spec), Path::new("/abs"));
    }
}
