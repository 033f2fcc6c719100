//! How the runtime learns that processes ended, and records each exit once:
//! the agent's WaitProcess for every started process, the guest's death
//! for everything in it, and the relister for any death those two missed
//! (a WaitProcess lost with a dropped vsock connection, say).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::error::Result;
use super::pool::Running;
use super::relist_view::AgentView;
use super::service::{Runtime, SANDBOX_DIED_STATUS};
use crate::config::Config;
use crate::lifecycle::events::{Event, EventStream};
use crate::lifecycle::registry::{Container, Process};
use crate::lifecycle::relist::{self, LifecycleEvent, RelistConfig, Relister};
use crate::lifecycle::state::{Exit, Phase, Transition};
use crate::pod;
use crate::sandbox::{Sandbox, SandboxRequest};
use kestrel_protocols::oci;

/// How long a process's outputs may stay open after it exited.
pub(super) const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// How long an init's exit waits for its execs' exits to be recorded first.
const EXEC_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long a relister-detected death waits for the exit watcher to record
/// it (after draining the output and its execs' exits) before recording it
/// itself.
const RELIST_EXIT_GRACE: Duration = Duration::from_secs(12);
/// How long a lost agent connection waits for the guest's death to show.
const DEATH_NOTICE: Duration = Duration::from_secs(2);

impl Runtime {
    /// The sandbox `id`, booted for its first container with its watchers
    /// (the guest's death, OOM events, the relister). That container's
    /// `spec` says what the sandbox should be (see `pod.rs`) and its runtime
    /// options may name the configuration file (`config_path`) it runs with;
    /// later containers join the sandbox as it is.
    pub(super) async fn ensure_sandbox(
        self: &Arc<Self>,
        id: &str,
        config_path: Option<&Path>,
        spec: &oci::Spec,
    ) -> Result<Arc<Sandbox>> {
        let running = self
            .sandboxes
            .get_or_start(id, || async {
                let config = match config_path {
                    Some(path) => &Config::from_file(path)?,
                    None => &self.config,
                };
                let request = SandboxRequest {
                    shape: Some(pod::vm_shape(spec, &config.vm)?),
                    netns: pod::network_namespace(spec),
                    config_path: config_path.map(Path::to_path_buf),
                };
                let sandbox = Sandbox::start(id, config, &request).await?;
                let relister = Arc::new(Relister::new(
                    AgentView::new(Arc::downgrade(self), Arc::clone(&sandbox)),
                    RelistConfig {
                        period: config.lifecycle.relist_period(),
                        unhealthy_after: config.lifecycle.relist_unhealthy_after(),
                    },
                    self.relist_events(),
                ));
                let watchers = vec![
                    tokio::spawn(Arc::clone(self).watch_sandbox_death(Arc::clone(&sandbox))),
                    tokio::spawn(watch_oom(Arc::clone(&sandbox), self.events.clone())),
                    Arc::clone(&relister).spawn(),
                    tokio::spawn(publish_health(
                        Arc::clone(&relister),
                        sandbox.state_dir().join(relist::HEALTH_FILE),
                        config.lifecycle.relist_period(),
                    )),
                ];
                Ok(Running::new(sandbox, relister, watchers))
            })
            .await?;
        Ok(Arc::clone(&running.sandbox))
    }

    /// Whether the relister of `sandbox_id` is healthy; `Err` says why not.
    pub async fn relister_health(
        &self,
        sandbox_id: &str,
    ) -> Option<std::result::Result<(), relist::Unhealthy>> {
        self.sandboxes
            .get(sandbox_id)
            .map(|running| running.relister.healthy())
    }

    /// The relister's last known record of a container.
    pub async fn relist_record(&self, sandbox_id: &str, id: &str) -> Option<relist::Record> {
        self.sandboxes
            .get(sandbox_id)
            .and_then(|running| running.relister.record(id))
    }

    /// A channel whose receiver acts on the deaths the relister saw: one
    /// the exit watcher has not recorded within a grace period is recorded
    /// here, with the agent's status, or with the guest-death status for a
    /// running container the agent no longer knows.
    fn relist_events(self: &Arc<Self>) -> tokio::sync::mpsc::UnboundedSender<LifecycleEvent> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(LifecycleEvent::ContainerDied { id, exit_status }) = rx.recv().await {
                tracing::debug!(container_id = %id, ?exit_status, "relist saw a death");
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
                    let Some(container) = same else { return };
                    // A container being deleted leaves the listing too; its
                    // exit is recorded already.
                    if container.init.state().has_exited() {
                        return;
                    }
                    let status = exit_status.unwrap_or(SANDBOX_DIED_STATUS);
                    tracing::warn!(container_id = %id, status, agent_status = ?exit_status, "relist found a death the exit watcher missed");
                    let _op = container.op.lock().await;
                    runtime.record_exit(&container, &container.init, Exit::now(status));
                });
            }
        });
        tx
    }

    /// Waits for a started process to exit, lets its output drain, and
    /// records the exit (an init's only after its execs').
    pub(super) async fn watch_exit(
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
        if let Some(mut io) = process.take_io() {
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
    pub(super) fn record_guest_death(&self, container: &Container, exec_id: &str) {
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
    pub(super) fn record_exit(&self, container: &Container, process: &Process, exit: Exit) {
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
}

/// Whether the guest has died or does within a moment: a dropped agent
/// connection is usually the first sign of a dying guest.
pub(super) async fn dies_soon(sandbox: &Sandbox) -> bool {
    let death = kestrel_hypervisor::wait_exit(sandbox.exit_watch());
    tokio::time::timeout(DEATH_NOTICE, death).await.is_ok()
}

/// Keeps the relister's health report in the sandbox's state directory,
/// where `kestrel ps` and `kestrel doctor` read it: rewritten every period,
/// by a task of its own so that a relist that hangs leaves the report
/// going stale rather than unwritten.
async fn publish_health(relister: Arc<Relister<AgentView>>, path: PathBuf, period: Duration) {
    loop {
        let report = relister.health_report();
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&report)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "writing the relister's health");
        }
        tokio::time::sleep(period).await;
    }
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
