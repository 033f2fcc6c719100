//! A client for the Kata agent API: dialing with retries, then one typed
//! method per RPC the runtime uses.
//!
//! Dialing retries with exponential backoff until a deadline (Kata's
//! defaults: first retry after 10 ms, give up after 10 s) because a guest's
//! agent comes up some time after its VM starts. Every request carries the
//! configured timeout except those that wait for a process by design
//! (WaitProcess, ReadStdout/ReadStderr, GetOOMEvent).

use std::time::{Duration, Instant};

use kestrel_protocols::agent::*;
use kestrel_protocols::agent_ttrpc::AgentServiceClient;
use kestrel_protocols::health::health_check_response::ServingStatus;
use kestrel_protocols::health::CheckRequest;
use kestrel_protocols::health_ttrpc::HealthClient;
use kestrel_protocols::ttrpc::{context, r#async::Client, Code};

use crate::config::AgentConfig;
use crate::dial::{connect, Address, DialError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("gave up dialing {address} after {elapsed:?} ({attempts} tries)")]
    DialDeadline {
        address: String,
        elapsed: Duration,
        attempts: u32,
        #[source]
        last: Box<DialError>,
    },
    /// The agent answered with an error status.
    #[error("{method}: {message}")]
    Rpc {
        method: &'static str,
        code: Code,
        message: String,
    },
    /// The request never got an answer (connection lost, local timeout).
    #[error("{method}: {message}")]
    Transport {
        method: &'static str,
        message: String,
    },
}

impl AgentError {
    /// The status code the agent answered with, if it answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_ttrpc(method: &'static str, e: kestrel_protocols::ttrpc::Error) -> Self {
        match e {
            kestrel_protocols::ttrpc::Error::RpcStatus(status) => AgentError::Rpc {
                method,
                code: status.code(),
                message: status.message().to_string(),
            },
            other => AgentError::Transport {
                method,
                message: other.to_string(),
            },
        }
    }
}

/// How a short probe found a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Running,
    Exited(u32),
    /// The agent does not know the container or process.
    Gone,
}

/// What Health.Check and Health.Version answered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub status: String,
    pub serving: bool,
    pub agent_version: String,
    pub api_version: String,
}

/// How to dial: overall deadline, backoff bounds, per-try handshake timeout.
#[derive(Debug, Clone, Copy)]
pub struct DialPolicy {
    pub deadline: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub attempt_timeout: Duration,
}

impl From<&AgentConfig> for DialPolicy {
    fn from(config: &AgentConfig) -> Self {
        DialPolicy {
            deadline: config.dial_timeout(),
            first_backoff: config.dial_first_backoff(),
            max_backoff: config.dial_max_backoff(),
            attempt_timeout: config.handshake_timeout(),
        }
    }
}

/// Dials `address` until it answers or `policy.deadline` passes.
pub async fn dial(address: &Address, policy: DialPolicy) -> Result<Client, AgentError> {
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = policy.deadline.saturating_sub(started.elapsed());
        match connect(address, policy.attempt_timeout.min(left)).await {
            Ok(client) => return Ok(client),
            Err(e @ DialError::BadAddress(_)) => return Err(e.into()),
            Err(last) => {
                let elapsed = started.elapsed();
                if elapsed + backoff >= policy.deadline {
                    return Err(AgentError::DialDeadline {
                        address: address.to_string(),
                        elapsed,
                        attempts,
                        last: Box::new(last),
                    });
                }
                tracing::trace!(%address, attempts, error = %last, "agent not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    agent: AgentServiceClient,
    health: HealthClient,
    request_timeout: Duration,
}

macro_rules! rpc {
    ($self:ident, $ctx:expr, $method:ident, $name:literal, $req:expr) => {
        $self
            .agent
            .$method($ctx, &$req)
            .await
            .map_err(|e| AgentError::from_ttrpc(concat!("grpc.AgentService/", $name), e))
    };
}

impl AgentClient {
    /// Dials `address` with `config`'s retry policy.
    pub async fn connect(address: &Address, config: &AgentConfig) -> Result<Self, AgentError> {
        let client = dial(address, DialPolicy::from(config)).await?;
        Ok(Self::from_client(client, config.request_timeout()))
    }

    pub fn from_client(client: Client, request_timeout: Duration) -> Self {
        AgentClient {
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
            request_timeout,
        }
    }

    fn timed(&self) -> context::Context {
        context::with_duration(self.request_timeout)
    }

    /// For calls that wait as long as a process runs.
    fn untimed() -> context::Context {
        context::Context::default()
    }

    pub async fn health(&self) -> Result<Health, AgentError> {
        let rpc = |method| move |e| AgentError::from_ttrpc(method, e);
        let check = self
            .health
            .check(self.timed(), &CheckRequest::new())
            .await
            .map_err(rpc("grpc.Health/Check"))?;
        let version = self
            .health
            .version(self.timed(), &CheckRequest::new())
            .await
            .map_err(rpc("grpc.Health/Version"))?;
        let status = check.status.enum_value_or(ServingStatus::UNKNOWN);
        Ok(Health {
            status: format!("{status:?}"),
            serving: status == ServingStatus::SERVING,
            agent_version: version.agent_version,
            api_version: version.grpc_version,
        })
    }

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), AgentError> {
        rpc!(self, self.timed(), create_sandbox, "CreateSandbox", req).map(drop)
    }

    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let req = DestroySandboxRequest::new();
        rpc!(self, self.timed(), destroy_sandbox, "DestroySandbox", req).map(drop)
    }

    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<(), AgentError> {
        rpc!(self, self.timed(), create_container, "CreateContainer", req).map(drop)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), start_container, "StartContainer", req).map(drop)
    }

    /// Removes a container, letting the agent take `timeout` to stop it.
    pub async fn remove_container(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: container_id.into(),
            timeout: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        // The agent needs the whole stop timeout plus time to clean up.
        let ctx = context::with_duration(timeout + self.request_timeout);
        rpc!(self, ctx, remove_container, "RemoveContainer", req).map(drop)
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<(), AgentError> {
        rpc!(self, self.timed(), exec_process, "ExecProcess", req).map(drop)
    }

    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        rpc!(self, self.timed(), signal_process, "SignalProcess", req).map(drop)
    }

    /// Waits, without a deadline, for a process to exit; its exit status.
    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<u32, AgentError> {
        let req = wait_request(container_id, exec_id);
        let resp = rpc!(self, Self::untimed(), wait_process, "WaitProcess", req)?;
        Ok(u32::try_from(resp.status).unwrap_or(255))
    }

    /// Asks whether a process still runs, waiting at most `deadline` for
    /// the agent's answer: a WaitProcess the agent cuts short.
    pub async fn probe_process(
        &self,
        container_id: &str,
        exec_id: &str,
        deadline: Duration,
    ) -> Result<Probe, AgentError> {
        let req = wait_request(container_id, exec_id);
        match rpc!(
            self,
            context::with_duration(deadline),
            wait_process,
            "WaitProcess",
            req
        ) {
            Ok(resp) => Ok(Probe::Exited(u32::try_from(resp.status).unwrap_or(255))),
            Err(e) if e.code() == Some(Code::DEADLINE_EXCEEDED) => Ok(Probe::Running),
            Err(e) if e.code() == Some(Code::NOT_FOUND) => Ok(Probe::Gone),
            // The client's own timer can fire first; the process runs.
            Err(AgentError::Transport { message, .. })
                if message.contains("timeout") || message.contains("deadline") =>
            {
                Ok(Probe::Running)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<u32, AgentError> {
        let req = WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        // Stdin blocks while the process does not read: no deadline.
        let resp = rpc!(self, Self::untimed(), write_stdin, "WriteStdin", req)?;
        Ok(resp.len)
    }

    /// Up to `len` bytes of stdout; `Ok(None)` at its end.
    pub async fn read_stdout(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = read_request(container_id, exec_id, len);
        end_of_stream(rpc!(self, Self::untimed(), read_stdout, "ReadStdout", req))
    }

    /// Up to `len` bytes of stderr; `Ok(None)` at its end.
    pub async fn read_stderr(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = read_request(container_id, exec_id, len);
        end_of_stream(rpc!(self, Self::untimed(), read_stderr, "ReadStderr", req))
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), close_stdin, "CloseStdin", req).map(drop)
    }

    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            row: rows,
            column: cols,
            ..Default::default()
        };
        rpc!(self, self.timed(), tty_win_resize, "TtyWinResize", req).map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = PauseContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), pause_container, "PauseContainer", req).map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ResumeContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), resume_container, "ResumeContainer", req).map(drop)
    }

    pub async fn update_container(&self, req: UpdateContainerRequest) -> Result<(), AgentError> {
        rpc!(self, self.timed(), update_container, "UpdateContainer", req).map(drop)
    }

    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, AgentError> {
        let req = StatsContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), stats_container, "StatsContainer", req)
    }

    /// Creates one directory or symlink, or writes one chunk of a regular
    /// file, below the agent's shared directory (see [`crate::rootfs`]).
    pub async fn copy_file(&self, req: CopyFileRequest) -> Result<(), AgentError> {
        rpc!(self, self.timed(), copy_file, "CopyFile", req).map(drop)
    }

    /// Gives the guest's card with `interface.hwAddr` its name, MTU and
    /// addresses, and brings it up.
    pub async fn update_interface(
        &self,
        interface: kestrel_protocols::types::Interface,
    ) -> Result<(), AgentError> {
        let req = UpdateInterfaceRequest {
            interface: Some(interface).into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), update_interface, "UpdateInterface", req).map(drop)
    }

    /// Makes `routes` the guest's routes on the interfaces they name.
    pub async fn update_routes(
        &self,
        routes: Vec<kestrel_protocols::types::Route>,
    ) -> Result<(), AgentError> {
        let req = UpdateRoutesRequest {
            routes: Some(Routes {
                Routes: routes,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        rpc!(self, self.timed(), update_routes, "UpdateRoutes", req).map(drop)
    }

    /// Adds permanent neighbour entries in the guest.
    pub async fn add_arp_neighbors(
        &self,
        neighbors: Vec<kestrel_protocols::types::ARPNeighbor>,
    ) -> Result<(), AgentError> {
        let req = AddARPNeighborsRequest {
            neighbors: Some(ARPNeighbors {
                ARPNeighbors: neighbors,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        rpc!(
            self,
            self.timed(),
            add_arp_neighbors,
            "AddARPNeighbors",
            req
        )
        .map(drop)
    }

    /// Waits, without a deadline, for the next OOM kill in the sandbox.
    pub async fn get_oom_event(&self) -> Result<String, AgentError> {
        let req = GetOOMEventRequest::new();
        let event = rpc!(self, Self::untimed(), get_oom_event, "GetOOMEvent", req)?;
        Ok(event.container_id)
    }
}

fn wait_request(container_id: &str, exec_id: &str) -> WaitProcessRequest {
    WaitProcessRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn read_request(container_id: &str, exec_id: &str, len: u32) -> ReadStreamRequest {
    ReadStreamRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        len,
        ..Default::default()
    }
}

/// The agent ends a stream with OUT_OF_RANGE (Kata's agent answers an
/// error there too).
fn end_of_stream(r: Result<ReadStreamResponse, AgentError>) -> Result<Option<Vec<u8>>, AgentError> {
    match r {
        Ok(resp) => Ok(Some(resp.data)),
        Err(e) if e.code() == Some(Code::OUT_OF_RANGE) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Dials the agent with backoff until it answers or `timeout` passes (a
/// guest that is still booting has no listener yet), then asks
/// Health.Check and Health.Version, each bounded by `timeout`.
pub async fn check(address: &Address, timeout: Duration) -> Result<Health, AgentError> {
    let policy = DialPolicy {
        deadline: timeout,
        ..DialPolicy::from(&AgentConfig::default())
    };
    let client = dial(address, policy).await?;
    AgentClient::from_client(client, timeout).health().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(deadline_ms: u64) -> DialPolicy {
        DialPolicy {
            deadline: Duration::from_millis(deadline_ms),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            attempt_timeout: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn dial_gives_up_at_the_deadline_reporting_tries_and_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let address = Address::Unix(dir.path().join("absent.sock"));
        let started = Instant::now();
        let err = dial(&address, policy(300)).await.err().unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        match &err {
            AgentError::DialDeadline { attempts, .. } => assert!(*attempts >= 3, "{err}"),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    #[tokio::test]
    async fn dial_retries_until_the_socket_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let address = Address::Unix(path.clone());
        let binder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tokio::net::UnixListener::bind(&path).unwrap()
        });
        dial(&address, policy(5000)).await.unwrap();
        drop(binder.await.unwrap());
    }

    #[tokio::test]
    async fn backoff_grows_to_its_bound() {
        // 10, 20, 40, 40, ... ms: within 400 ms at most ~12 tries, at least 6.
        let dir = tempfile::tempdir().unwrap();
        let address = Address::Unix(dir.path().join("absent.sock"));
        match dial(&address, policy(400)).await.err().unwrap() {
            AgentError::DialDeadline { attempts, .. } => {
                assert!((6..=13).contains(&attempts), "{attempts}")
            }
            other => panic!("{other}"),
        }
    }
}
