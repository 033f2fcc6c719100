//! Starting a container's shim the way containerd does and talking to its
//! Task API. There is no containerd: `-address` names a socket nobody
//! serves, and instead of `TTRPC_ADDRESS` the shim is given the directory
//! where `kestrel events` listen, to which it forwards its events.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use containerd_shim_protos::api::*;
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc::context::{self, Context};
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::Status;

use super::containers::{Container, NAMESPACE};
use kestrel_host::config::HYPERVISOR_ENV;
use kestrel_host::shim::publish::LISTENERS_ENV;

const SHIM_BINARY: &str = "containerd-shim-kestrel-v2";
/// How long a request other than Wait may take; Create boots the sandbox.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `ps` and `events` wait for a shim before calling it gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("creating the shim's log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the shim failed to start ({status}): {stderr}")]
    Start { status: String, stderr: String },
    #[error("cleaning up after the dead shim failed ({status}): {stderr}")]
    CleanUp { status: String, stderr: String },
    #[error("container {0} has no shim address")]
    NoAddress(String),
    #[error("connecting to the shim at {address}")]
    Connect {
        address: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("connecting to the shim at {address}: no answer within {PROBE_TIMEOUT:?}")]
    ConnectTimeout { address: String },
    /// The shim answered with an error status. Its code is printed by name
    /// (`INVALID_ARGUMENT`), because ttrpc's own error prints the whole
    /// `Status` message in its debug form.
    #[error("{request} {id}: {code:?}: {message}")]
    Rpc {
        request: &'static str,
        id: String,
        code: Code,
        message: String,
    },
    /// The request got no answer (the connection broke, or it timed out).
    #[error("{request} {id} got no answer")]
    Transport {
        request: &'static str,
        id: String,
        #[source]
        source: ttrpc::Error,
    },
}

/// The shim binary: the one next to `kestrel`, else the one on `PATH`.
fn shim_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(SHIM_BINARY)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| SHIM_BINARY.into())
}

/// The shim server's log in a container's directory (`kestrel run`'s shims
/// log there; containerd's read theirs from a FIFO of that name).
pub const SHIM_LOG: &str = "log";

/// Runs the shim's `start` in the container's directory (its bundle) and
/// returns the address it serves on. `hypervisor` overrides the config's.
pub fn start(container: &Container, hypervisor: Option<&str>) -> Result<String, ShimError> {
    // containerd gives the shim server a FIFO named `log` in the bundle;
    // here a plain file takes its place, so the shim's log is kept.
    let log = container.dir.join(SHIM_LOG);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|source| ShimError::Log { path: log, source })?;
    let (binary, mut command) = shim_command(container, "start");
    command
        .env_remove("TTRPC_ADDRESS")
        // The shim server outlives this command and inherits the variable.
        .env(LISTENERS_ENV, super::events::listeners_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C at our terminal is ours to forward,
        // not the shim server's (it inherits this group) to die of.
        .process_group(0);
    if let Some(hypervisor) = hypervisor {
        command.env(HYPERVISOR_ENV, hypervisor);
    }
    let output = command.output().map_err(|source| ShimError::Spawn {
        binary: binary.clone(),
        source,
    })?;
    let address = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || address.is_empty() {
        return Err(ShimError::Start {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(address)
}

/// The shim invoked the way containerd invokes it, for `action`.
fn shim_command(container: &Container, action: &str) -> (PathBuf, Command) {
    let binary = shim_binary();
    let mut command = Command::new(&binary);
    command
        .args(["-namespace", NAMESPACE, "-id", &container.id, "-address"])
        .arg(container.dir.join("containerd.sock"))
        .args(["-publish-binary", "/bin/true", action])
        .current_dir(&container.dir);
    (binary, command)
}

/// Runs the shim's `delete` action, as containerd does for a shim that
/// died: it stops the sandbox the dead shim left behind.
pub fn clean_up(container: &Container) -> Result<(), ShimError> {
    let (binary, mut command) = shim_command(container, "delete");
    let output = command
        .env_remove("TTRPC_ADDRESS")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ShimError::Spawn { binary, source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ShimError::CleanUp {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// A connection to one container's shim.
pub struct Shim {
    pub id: String,
    client: TaskClient,
}

fn request_context() -> Context {
    context::with_duration(REQUEST_TIMEOUT)
}

impl Shim {
    pub async fn connect(id: &str, address: &str) -> Result<Shim, ShimError> {
        let client = Client::connect(address)
            .await
            .map_err(|source| ShimError::Connect {
                address: address.to_string(),
                source,
            })?;
        Ok(Shim {
            id: id.to_string(),
            client: TaskClient::new(client),
        })
    }

    /// Connects to the shim whose address `start` left in the container's directory.
    pub async fn open(container: &Container) -> Result<Shim, ShimError> {
        let address = container
            .address()
            .ok_or_else(|| ShimError::NoAddress(container.id.clone()))?;
        let shim = tokio::time::timeout(PROBE_TIMEOUT, Shim::connect(&container.id, &address))
            .await
            .map_err(|_| ShimError::ConnectTimeout {
                address: address.clone(),
            })??;
        Ok(shim)
    }

    fn failed(&self, request: &'static str) -> impl FnOnce(ttrpc::Error) -> ShimError + '_ {
        move |e| request_error(request, &self.id, e)
    }

    pub async fn create(&self, bundle: &Path, stdio: &StdioPaths) -> Result<u32, ShimError> {
        let req = CreateTaskRequest {
            id: self.id.clone(),
            bundle: bundle.display().to_string(),
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            ..Default::default()
        };
        let resp = self.client.create(request_context(), &req).await;
        Ok(resp.map_err(self.failed("Create"))?.pid)
    }

    pub async fn exec(
        &self,
        exec_id: &str,
        process: &serde_json::Value,
        stdio: &StdioPaths,
    ) -> Result<(), ShimError> {
        let spec = containerd_shim_protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::to_vec(process).unwrap_or_default(),
            ..Default::default()
        };
        let req = ExecProcessRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            spec: Some(spec).into(),
            ..Default::default()
        };
        let resp = self.client.exec(request_context(), &req).await;
        resp.map_err(self.failed("Exec")).map(drop)
    }

    pub async fn start(&self, exec_id: &str) -> Result<u32, ShimError> {
        let req = StartRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let resp = self.client.start(request_context(), &req).await;
        Ok(resp.map_err(self.failed("Start"))?.pid)
    }

    /// Waits for the process to exit; returns its exit status.
    pub async fn wait(&self, exec_id: &str) -> Result<u32, ShimError> {
        let req = WaitRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let resp = self.client.wait(context::with_timeout(0), &req).await;
        Ok(resp.map_err(self.failed("Wait"))?.exit_status)
    }

    pub async fn state(&self, exec_id: &str) -> Result<StateResponse, ShimError> {
        let req = StateRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let resp = self
            .client
            .state(context::with_duration(PROBE_TIMEOUT), &req)
            .await;
        resp.map_err(self.failed("State"))
    }

    pub async fn kill(&self, exec_id: &str, signal: u32) -> Result<(), ShimError> {
        let req = KillRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        let resp = self.client.kill(request_context(), &req).await;
        resp.map_err(self.failed("Kill")).map(drop)
    }

    pub async fn delete(&self, exec_id: &str) -> Result<(), ShimError> {
        let req = DeleteRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let resp = self.client.delete(request_context(), &req).await;
        resp.map_err(self.failed("Delete")).map(drop)
    }

    /// Resizes the process's terminal to `rows` by `cols`.
    pub async fn resize_pty(&self, exec_id: &str, rows: u16, cols: u16) -> Result<(), ShimError> {
        let req = ResizePtyRequest {
            id: self.id.clone(),
            exec_id: exec_id.into(),
            width: cols.into(),
            height: rows.into(),
            ..Default::default()
        };
        let resp = self.client.resize_pty(request_context(), &req).await;
        resp.map_err(self.failed("ResizePty")).map(drop)
    }

    /// Asks the shim server to exit; it stops its sandboxes first.
    pub async fn shutdown(&self) -> Result<(), ShimError> {
        let req = ShutdownRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        let resp = self.client.shutdown(request_context(), &req).await;
        resp.map_err(self.failed("Shutdown")).map(drop)
    }
}

/// `request` for container `id` failed with `e`: an answer or none.
fn request_error(request: &'static str, id: &str, e: ttrpc::Error) -> ShimError {
    match e {
        ttrpc::Error::RpcStatus(status) => ShimError::Rpc {
            request,
            id: id.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        },
        source => ShimError::Transport {
            request,
            id: id.to_string(),
            source,
        },
    }
}

/// The FIFO paths a process's stdio goes through; empty means none.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A State answer's status, as `ps` prints it.
pub fn status_name(state: &StateResponse) -> &'static str {
    match state.status.enum_value_or(Status::UNKNOWN) {
        Status::CREATED => "CREATED",
        Status::RUNNING => "RUNNING",
        Status::STOPPED => "STOPPED",
        Status::PAUSED => "PAUSED",
        Status::PAUSING => "PAUSING",
        Status::UNKNOWN => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_status_reads_as_the_code_name_and_the_message_once() {
        let status = ttrpc::get_status(Code::INVALID_ARGUMENT, "executing /bin/nope: ENOENT");
        let e = request_error("Start", "c1", ttrpc::Error::RpcStatus(status));
        assert_eq!(
            e.to_string(),
            "Start c1: INVALID_ARGUMENT: executing /bin/nope: ENOENT"
        );
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn no_answer_keeps_the_transport_error_as_its_source_only() {
        let e = request_error("Wait", "c1", ttrpc::Error::Eof);
        assert_eq!(e.to_string(), "Wait c1 got no answer");
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("eof"));
    }
}
