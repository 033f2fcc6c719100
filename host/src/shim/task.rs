//! containerd's Task service: a thin layer that converts between the wire
//! messages and [`Runtime`]. Every method is implemented here, because the
//! generated default answers NOT_FOUND, which containerd would take for a
//! missing container.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim_protos::api::*;
use containerd_shim_protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo, Status};

use super::error::ShimError;
use super::mount::RootfsMount;
use super::runtime_options;
use super::service::{CreateParams, ProcessStatus, Runtime};
use crate::lifecycle::registry::Stdio;
use crate::lifecycle::state::{Exit, Phase};

/// The version `Connect` reports.
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct TaskService {
    runtime: Arc<Runtime>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(runtime: Arc<Runtime>, exit: Arc<ExitSignal>) -> Self {
        TaskService { runtime, exit }
    }
}

/// The one place a runtime error becomes a wire status.
fn status(method: &'static str, e: ShimError) -> ttrpc::Error {
    let code = e.code();
    let message = e.chain();
    match code {
        ttrpc::Code::NOT_FOUND | ttrpc::Code::FAILED_PRECONDITION | ttrpc::Code::ALREADY_EXISTS => {
            tracing::debug!(method, error = message, "request refused")
        }
        _ => tracing::warn!(method, error = message, "request failed"),
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn exited_at(exit: Option<Exit>) -> MessageField<Timestamp> {
    exit.map(|e| timestamp(e.at)).into()
}

fn wire_status(phase: Phase) -> Status {
    match phase {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Paused => Status::PAUSED,
        Phase::Stopped | Phase::Deleting | Phase::Deleted => Status::STOPPED,
    }
}

fn state_response(s: ProcessStatus) -> StateResponse {
    StateResponse {
        id: s.id,
        bundle: s.bundle,
        pid: s.pid,
        status: wire_status(s.phase).into(),
        stdin: s.stdio.stdin,
        stdout: s.stdio.stdout,
        stderr: s.stdio.stderr,
        terminal: s.stdio.terminal,
        exit_status: s.exit.map(|e| e.status).unwrap_or(0),
        exited_at: exited_at(s.exit),
        exec_id: s.exec_id,
        ..Default::default()
    }
}

/// containerd's cgroup v1 metrics from the agent's container stats.
fn metrics(stats: &kestrel_protocols::agent::StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    let Some(cg) = stats.cgroup_stats.as_ref() else {
        return m;
    };
    if let Some(cpu) = cg.cpu_stats.as_ref().and_then(|c| c.cpu_usage.as_ref()) {
        m.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: cpu.total_usage,
                kernel: cpu.usage_in_kernelmode,
                user: cpu.usage_in_usermode,
                per_cpu: cpu.percpu_usage.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(mem) = cg.memory_stats.as_ref() {
        let entry = |d: Option<&kestrel_protocols::agent::MemoryData>| {
            d.map(|d| MemoryEntry {
                limit: d.limit,
                usage: d.usage,
                max: d.max_usage,
                failcnt: d.failcnt,
                ..Default::default()
            })
            .into()
        };
        m.memory = MessageField::some(MemoryStat {
            cache: mem.cache,
            usage: entry(mem.usage.as_ref()),
            swap: entry(mem.swap_usage.as_ref()),
            kernel: entry(mem.kernel_usage.as_ref()),
            ..Default::default()
        });
    }
    if let Some(pids) = cg.pids_stats.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    m
}

fn any_of(
    type_url: &str,
    message: &dyn containerd_shim_protos::protobuf::MessageDyn,
) -> Result<Any, ShimError> {
    Ok(Any {
        type_url: type_url.into(),
        value: message
            .write_to_bytes_dyn()
            .map_err(|e| ShimError::Internal(format!("encoding {type_url}: {e}")))?,
        ..Default::default()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let s = self
            .runtime
            .state(&req.id, &req.exec_id)
            .map_err(|e| status("State", e))?;
        Ok(state_response(s))
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                "Create",
                ShimError::Unimplemented("restoring from a checkpoint is not supported".into()),
            ));
        }
        let config_path = runtime_options::config_path(req.options.as_ref())
            .map_err(|e| status("Create", ShimError::InvalidArgument(e.to_string())))?;
        let params = CreateParams {
            config_path,
            id: req.id,
            bundle: PathBuf::from(req.bundle),
            rootfs: req
                .rootfs
                .into_iter()
                .map(|m| RootfsMount {
                    fs_type: m.type_,
                    source: m.source,
                    options: m.options,
                })
                .collect(),
            stdio: Stdio {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            },
        };
        let pid = self
            .runtime
            .create(params)
            .await
            .map_err(|e| status("Create", e))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pid = self
            .runtime
            .start(&req.id, &req.exec_id)
            .await
            .map_err(|e| status("Start", e))?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let (pid, exit) = self
            .runtime
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(|e| status("Delete", e))?;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pids = self
            .runtime
            .pids(&req.id)
            .await
            .map_err(|e| status("Pids", e))?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.runtime
            .pause(&req.id)
            .await
            .map_err(|e| status("Pause", e))?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.runtime
            .resume(&req.id)
            .await
            .map_err(|e| status("Resume", e))?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        let e = ShimError::Unimplemented(format!(
            "checkpointing {} is not supported: the container runs inside a VM",
            req.id
        ));
        Err(status("Checkpoint", e))
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.runtime
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(|e| status("Kill", e))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        let stdio = Stdio {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        if spec.is_empty() {
            let e = ShimError::InvalidArgument(format!("exec {}: no process spec", req.exec_id));
            return Err(status("Exec", e));
        }
        self.runtime
            .exec(&req.id, &req.exec_id, stdio, &spec)
            .await
            .map_err(|e| status("Exec", e))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.runtime
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await
            .map_err(|e| status("ResizePty", e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.runtime
            .close_io(&req.id, &req.exec_id)
            .map_err(|e| status("CloseIO", e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        if resources.is_empty() {
            let e = ShimError::InvalidArgument(format!("update of {}: no resources", req.id));
            return Err(status("Update", e));
        }
        self.runtime
            .update(&req.id, &resources)
            .await
            .map_err(|e| status("Update", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let exit = self
            .runtime
            .wait(&req.id, &req.exec_id)
            .await
            .map_err(|e| status("Wait", e))?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let stats = self
            .runtime
            .stats(&req.id)
            .await
            .map_err(|e| status("Stats", e))?;
        let any = any_of("io.containerd.cgroups.v1.Metrics", &metrics(&stats))
            .map_err(|e| status("Stats", e))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self
            .runtime
            .pids(&req.id)
            .await
            .ok()
            .and_then(|p| p.first().copied())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: VERSION.into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        // As runc's shim: stay while any container is left.
        if self.runtime.is_empty() {
            self.runtime.stop_all().await;
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teardown_phases_read_stopped_on_the_wire() {
        assert_eq!(wire_status(Phase::Deleting), Status::STOPPED);
        assert_eq!(wire_status(Phase::Deleted), Status::STOPPED);
        assert_eq!(wire_status(Phase::Created), Status::CREATED);
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let at = UNIX_EPOCH + std::time::Duration::new(5, 7);
        let ts = timestamp(at);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }
}
