//! Delete: an exec's, or a container's whole teardown. The container stays
//! in the registry, answering State with STOPPED and its real exit, until
//! the agent removed it, its rootfs is unmounted and TaskDelete is
//! published; then it becomes a tombstone, and its sandbox stops when no
//! container uses it any more.

use std::sync::Arc;

use kestrel_protocols::ttrpc::Code;

use super::error::{Result, ShimError};
use super::exits::{dies_soon, OUTPUT_DRAIN};
use super::service::{Runtime, KILLED_STATUS, SANDBOX_DIED_STATUS};
use crate::lifecycle::events::Event;
use crate::lifecycle::registry::{Container, Lookup};
use crate::lifecycle::state::{Exit, Phase, Transition};

impl Runtime {
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
        // An init that never started still has its copiers, and perhaps a
        // logging binary: they end with the delete, not some time after.
        if let Some(mut io) = container.init.take_io() {
            io.drain(OUTPUT_DRAIN).await;
        }
        // RemoveContainer killed whatever outlived the init (execs in a
        // shared PID namespace): their exits come before the TaskDelete.
        for exec in container.execs_snapshot() {
            if matches!(exec.state().phase(), Phase::Running | Phase::Paused) {
                self.record_exit(&container, &exec, Exit::now(KILLED_STATUS));
            }
        }
        // The container is gone from the guest and its rootfs unmounted;
        // the delete returns, and TaskDelete is published, after these.
        self.run_poststop_hooks(&container, container.init.state().pid())
            .await;
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
            .get(&container.sandbox_id)
            .map(|running| Arc::clone(&running.sandbox));
        if let Some(sandbox) = sandbox.filter(|s| !s.is_dead()) {
            match sandbox
                .agent()
                .remove_container(id, sandbox.stop_grace())
                .await
            {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NOT_FOUND) => {}
                // A lost connection: if the guest is dying, there is nothing left to remove.
                Err(e) if e.code().is_some() || !dies_soon(&sandbox).await => {
                    return Err(ShimError::agent(id, "removing it")(e))
                }
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "sandbox died during removal")
                }
            }
        }
        container.release_rootfs();
        Ok(())
    }

    /// Stops a sandbox no container uses any more.
    pub(super) async fn stop_sandbox_if_unused(&self, sandbox_id: &str) {
        let unused = || {
            !self
                .registry
                .live()
                .iter()
                .any(|c| c.sandbox_id == sandbox_id)
        };
        self.sandboxes.stop_if(sandbox_id, unused).await;
    }
}
