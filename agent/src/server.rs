//! The ttrpc services: `grpc.AgentService` and `grpc.Health`. Each method
//! validates nothing itself; it forwards to the [`Sandbox`] and maps the
//! result's [`Error`] to a ttrpc code here, in one place.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kestrel_protocols::agent::*;
use kestrel_protocols::csi::VolumeStatsResponse;
use kestrel_protocols::health::health_check_response::ServingStatus;
use kestrel_protocols::health::{CheckRequest, HealthCheckResponse, VersionCheckResponse};
use kestrel_protocols::protobuf::well_known_types::empty::Empty;
use kestrel_protocols::ttrpc::error::get_rpc_status;
use kestrel_protocols::ttrpc::r#async::transport::Listener;
use kestrel_protocols::ttrpc::r#async::{Server, TtrpcContext};
use kestrel_protocols::ttrpc::{self, Code};
use kestrel_protocols::{agent_ttrpc, health_ttrpc, types};

use crate::error::Error;
use crate::sandbox::Sandbox;
use crate::unknown_service;

/// Largest chunk one ReadStdout/ReadStderr returns.
const MAX_READ: usize = 1 << 20;

fn status(method: &str, e: Error) -> ttrpc::Error {
    let code = match &e {
        Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
        Error::NotFound(_) => Code::NOT_FOUND,
        Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        Error::Unimplemented(_) => Code::UNIMPLEMENTED,
        Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
        Error::EndOfStream(_) => Code::OUT_OF_RANGE,
        Error::Internal(_) => Code::INTERNAL,
    };
    match code {
        Code::INTERNAL => tracing::error!(method, error = %e, "request failed"),
        Code::OUT_OF_RANGE => {}
        _ => tracing::debug!(method, error = %e, "request refused"),
    }
    get_rpc_status(code, e.to_string())
}

fn empty<T>(method: &str, r: Result<T, Error>) -> ttrpc::Result<Empty> {
    r.map(|_| Empty::new()).map_err(|e| status(method, e))
}

pub struct AgentService {
    sandbox: Arc<Sandbox>,
}

impl AgentService {
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        AgentService { sandbox }
    }
}

/// Implements `grpc.AgentService` from the methods written out in the
/// first block, plus one for each method in the second that answers
/// UNIMPLEMENTED with its wire name, the one a runtime's logs show (ttrpc's
/// generated default says NOT_FOUND, which a runtime would take for a
/// missing container). The whole impl is generated so that `async_trait`
/// sees every method.
macro_rules! agent_service {
    ({ $($implemented:tt)* } unimplemented { $($method:ident $wire:literal ($req:ty) -> $resp:ty;)* }) => {
        #[async_trait]
        impl agent_ttrpc::AgentService for AgentService {
            $($implemented)*
            $(
                async fn $method(&self, _: &TtrpcContext, _: $req) -> ttrpc::Result<$resp> {
                    Err(get_rpc_status(
                        Code::UNIMPLEMENTED,
                        concat!("grpc.AgentService/", $wire, " is not implemented by the Kestrel agent"),
                    ))
                }
            )*
        }
    };
}

/// Kata's passfd I/O: the runtime pre-connects vsock streams for a
/// process's stdio and names their ports. The Kestrel agent serves stdio
/// only through Read/WriteStream, so a request that asks for streams is
/// refused rather than started with output nobody reads.
fn agent_stdio_only(method: &str, ports: [u32; 3]) -> ttrpc::Result<()> {
    if ports == [0; 3] {
        return Ok(());
    }
    Err(status(
        method,
        Error::Unimplemented(format!(
            "{method}: passfd stdio (stdin/stdout/stderr ports {ports:?}) is not supported; leave the ports 0"
        )),
    ))
}

agent_service! {{
    async fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        agent_stdio_only("CreateContainer", [req.stdin_port, req.stdout_port, req.stderr_port])?;
        empty("CreateContainer", self.sandbox.create_container(&req).await)
    }

    async fn start_container(&self, _: &TtrpcContext, req: StartContainerRequest) -> ttrpc::Result<Empty> {
        empty("StartContainer", self.sandbox.start_container(&req.container_id).await)
    }

    async fn remove_container(&self, _: &TtrpcContext, req: RemoveContainerRequest) -> ttrpc::Result<Empty> {
        let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout.into()));
        empty("RemoveContainer", self.sandbox.remove_container(&req.container_id, timeout).await)
    }

    async fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        agent_stdio_only("ExecProcess", [req.stdin_port, req.stdout_port, req.stderr_port])?;
        let r = self.sandbox.exec_process(&req.container_id, &req.exec_id, req.process.as_ref()).await;
        empty("ExecProcess", r)
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        empty("SignalProcess", self.sandbox.signal_process(&req.container_id, &req.exec_id, req.signal))
    }

    async fn wait_process(&self, _: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let status = self
            .sandbox
            .wait_process(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| status("WaitProcess", e))?;
        let mut resp = WaitProcessResponse::new();
        resp.status = status;
        Ok(resp)
    }

    async fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        empty("UpdateContainer", self.sandbox.update_container(&req.container_id, req.resources.as_ref()))
    }

    async fn stats_container(&self, _: &TtrpcContext, req: StatsContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        self.sandbox.stats_container(&req.container_id).map_err(|e| status("StatsContainer", e))
    }

    async fn pause_container(&self, _: &TtrpcContext, req: PauseContainerRequest) -> ttrpc::Result<Empty> {
        empty("PauseContainer", self.sandbox.pause_container(&req.container_id).await)
    }

    async fn resume_container(&self, _: &TtrpcContext, req: ResumeContainerRequest) -> ttrpc::Result<Empty> {
        empty("ResumeContainer", self.sandbox.resume_container(&req.container_id).await)
    }

    async fn write_stdin(&self, _: &TtrpcContext, req: WriteStreamRequest) -> ttrpc::Result<WriteStreamResponse> {
        let process = self.sandbox.process(&req.container_id, &req.exec_id).map_err(|e| status("WriteStdin", e))?;
        let len = process.io.write_stdin(&req.data).await.map_err(|e| status("WriteStdin", e))?;
        let mut resp = WriteStreamResponse::new();
        resp.len = len as u32;
        Ok(resp)
    }

    async fn read_stdout(&self, _: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.sandbox.process(&req.container_id, &req.exec_id).map_err(|e| status("ReadStdout", e))?;
        let data = process.io.read_stdout(read_len(req.len)).await.map_err(|e| status("ReadStdout", e))?;
        let mut resp = ReadStreamResponse::new();
        resp.data = data;
        Ok(resp)
    }

    async fn read_stderr(&self, _: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.sandbox.process(&req.container_id, &req.exec_id).map_err(|e| status("ReadStderr", e))?;
        let data = process.io.read_stderr(read_len(req.len)).await.map_err(|e| status("ReadStderr", e))?;
        let mut resp = ReadStreamResponse::new();
        resp.data = data;
        Ok(resp)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        let process = self.sandbox.process(&req.container_id, &req.exec_id).map_err(|e| status("CloseStdin", e))?;
        empty("CloseStdin", process.io.close_stdin().await)
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let r = self.sandbox.process(&req.container_id, &req.exec_id).and_then(|p| {
            let rows = u16::try_from(req.row).map_err(|_| Error::invalid(format!("{} rows is too many", req.row)))?;
            let cols = u16::try_from(req.column).map_err(|_| Error::invalid(format!("{} columns is too many", req.column)))?;
            p.io.resize(rows, cols)
        });
        empty("TtyWinResize", r)
    }

    async fn create_sandbox(&self, _: &TtrpcContext, req: CreateSandboxRequest) -> ttrpc::Result<Empty> {
        empty("CreateSandbox", self.sandbox.create_sandbox(&req))
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: DestroySandboxRequest) -> ttrpc::Result<Empty> {
        empty("DestroySandbox", self.sandbox.destroy_sandbox().await)
    }

    async fn get_guest_details(&self, _: &TtrpcContext, req: GuestDetailsRequest) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(self.sandbox.guest_details(req.mem_block_size, req.mem_hotplug_probe))
    }

    async fn set_guest_date_time(&self, _: &TtrpcContext, req: SetGuestDateTimeRequest) -> ttrpc::Result<Empty> {
        empty("SetGuestDateTime", self.sandbox.set_guest_date_time(req.Sec, req.Usec))
    }

    async fn copy_file(&self, _: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        empty("CopyFile", self.sandbox.copy_file(&req))
    }

    async fn update_interface(&self, _: &TtrpcContext, req: UpdateInterfaceRequest) -> ttrpc::Result<types::Interface> {
        self.sandbox.network().update_interface(req.interface.as_ref()).await.map_err(|e| status("UpdateInterface", e))
    }

    async fn update_routes(&self, _: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<Routes> {
        let given = req.routes.as_ref().map(|r| r.Routes.as_slice()).unwrap_or_default();
        let routes = self.sandbox.network().update_routes(given).await.map_err(|e| status("UpdateRoutes", e))?;
        let mut resp = Routes::new();
        resp.Routes = routes;
        Ok(resp)
    }

    async fn list_interfaces(&self, _: &TtrpcContext, _: ListInterfacesRequest) -> ttrpc::Result<Interfaces> {
        let interfaces = self.sandbox.network().list_interfaces().await.map_err(|e| status("ListInterfaces", e))?;
        let mut resp = Interfaces::new();
        resp.Interfaces = interfaces;
        Ok(resp)
    }

    async fn list_routes(&self, _: &TtrpcContext, _: ListRoutesRequest) -> ttrpc::Result<Routes> {
        let routes = self.sandbox.network().list_routes().await.map_err(|e| status("ListRoutes", e))?;
        let mut resp = Routes::new();
        resp.Routes = routes;
        Ok(resp)
    }

    async fn add_arp_neighbors(&self, _: &TtrpcContext, req: AddARPNeighborsRequest) -> ttrpc::Result<Empty> {
        let given = req.neighbors.as_ref().map(|n| n.ARPNeighbors.as_slice()).unwrap_or_default();
        empty("AddARPNeighbors", self.sandbox.network().add_arp_neighbors(given).await)
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: GetOOMEventRequest) -> ttrpc::Result<OOMEvent> {
        let id = self.sandbox.get_oom_event().await.map_err(|e| status("GetOOMEvent", e))?;
        let mut event = OOMEvent::new();
        event.container_id = id;
        Ok(event)
    }
} unimplemented {
        update_ephemeral_mounts "UpdateEphemeralMounts" (UpdateEphemeralMountsRequest) -> Empty;
        remove_stale_virtiofs_share_mounts "RemoveStaleVirtiofsShareMounts" (RemoveStaleVirtiofsShareMountsRequest) -> Empty;
        get_diagnostic_data "GetDiagnosticData" (GetDiagnosticDataRequest) -> GetDiagnosticDataResponse;
        get_ip_tables "GetIPTables" (GetIPTablesRequest) -> GetIPTablesResponse;
        set_ip_tables "SetIPTables" (SetIPTablesRequest) -> SetIPTablesResponse;
        get_metrics "GetMetrics" (GetMetricsRequest) -> Metrics;
        mem_agent_memcg_set "MemAgentMemcgSet" (MemAgentMemcgConfig) -> Empty;
        mem_agent_compact_set "MemAgentCompactSet" (MemAgentCompactConfig) -> Empty;
        online_cpu_mem "OnlineCPUMem" (OnlineCPUMemRequest) -> Empty;
        reseed_random_dev "ReseedRandomDev" (ReseedRandomDevRequest) -> Empty;
        mem_hotplug_by_probe "MemHotplugByProbe" (MemHotplugByProbeRequest) -> Empty;
        add_swap "AddSwap" (AddSwapRequest) -> Empty;
        add_swap_path "AddSwapPath" (AddSwapPathRequest) -> Empty;
        get_volume_stats "GetVolumeStats" (VolumeStatsRequest) -> VolumeStatsResponse;
        resize_volume "ResizeVolume" (ResizeVolumeRequest) -> Empty;
        set_policy "SetPolicy" (SetPolicyRequest) -> Empty;
}}

fn read_len(requested: u32) -> usize {
    (requested as usize).clamp(1, MAX_READ)
}

pub struct HealthService;

#[async_trait]
impl health_ttrpc::Health for HealthService {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        let mut resp = HealthCheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _: &TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        let mut resp = VersionCheckResponse::new();
        resp.agent_version = crate::VERSION.to_string();
        resp.grpc_version = crate::API_VERSION.to_string();
        Ok(resp)
    }
}

/// The agent's ttrpc server on `listener`: both services, and the one
/// that answers requests for any other service ([`unknown_service`]).
/// `kestrel-agent` and the fuzz target serve through this one.
pub fn server(listener: Listener, sandbox: Arc<Sandbox>) -> Server {
    let services = [
        agent_ttrpc::create_agent_service(Arc::new(AgentService::new(sandbox))),
        health_ttrpc::create_health(Arc::new(HealthService)),
        unknown_service::service(),
    ];
    // Requests for any other service are redirected to unknown_service's,
    // in front of the library's router.
    let served = services.iter().flat_map(|s| s.keys().cloned()).collect();
    let mut server = Server::new().add_listener(unknown_service::listener(listener, served));
    for service in services {
        server = server.register_service(service);
    }
    server
}
