//! What the relister sees of a sandbox: the agent's answer, per container,
//! to "is it running, or how did it end?".

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::service::Runtime;
use crate::agent_client::Probe;
use crate::lifecycle::registry::Container;
use crate::lifecycle::relist::{Inspection, Listed, ObservedState, SandboxView, ViewError};
use crate::lifecycle::state::Phase;
use crate::sandbox::Sandbox;

/// How long a liveness probe lets the agent answer.
const PROBE_DEADLINE: Duration = Duration::from_millis(20);
/// How long the agent has to answer the health check each relist opens with.
const HEALTH_DEADLINE: Duration = Duration::from_secs(2);

/// The relister's view of a sandbox: the containers the registry placed in
/// it, each probed through the agent.
pub struct AgentView {
    runtime: Weak<Runtime>,
    sandbox: Arc<Sandbox>,
}

impl AgentView {
    pub fn new(runtime: Weak<Runtime>, sandbox: Arc<Sandbox>) -> AgentView {
        AgentView { runtime, sandbox }
    }

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
        // A probe reads "still running" from a deadline, which a wedged
        // agent also produces: the agent first proves it answers at all.
        match tokio::time::timeout(HEALTH_DEADLINE, self.sandbox.agent().health()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ViewError(format!("agent health check: {e}"))),
            Err(_) => {
                return Err(ViewError(format!(
                    "the agent did not answer a health check within {HEALTH_DEADLINE:?}"
                )))
            }
        }
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
