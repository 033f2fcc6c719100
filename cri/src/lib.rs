//! A small typed client for the Kubernetes Container Runtime Interface
//! (`runtime.v1`, which containerd 1.6 and later serve) over containerd's
//! unix socket: what Kestrel's CRI tests drive and what `kestrel-cri`, a
//! crictl-like command, is made of (Debian packages no crictl).
//!
//! The wire types are `k8s-cri`'s, generated from the CRI protos with
//! tonic/prost; this crate adds the unix-socket connection, one method per
//! RPC with the request built from its few real arguments, and errors that
//! keep the gRPC code and message.

pub mod config;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1 as api;
pub use tonic::Code;

use api::{
    ContainerConfig, ContainerFilter, ContainerStatus, ImageSpec, PodSandbox, PodSandboxConfig,
    PodSandboxFilter, PodSandboxStatus,
};

/// containerd's socket where a system containerd serves CRI.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("endpoint {endpoint:?}: only unix:///PATH (or a plain path) is supported")]
    Endpoint { endpoint: String },
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The runtime answered an RPC with an error status.
    #[error("{method}: {}: {message}", code_name(*.code))]
    Rpc {
        method: &'static str,
        code: Code,
        message: String,
    },
    /// The runtime's answer lacks a field the CRI says it carries.
    #[error("{method}: the reply has no {field}")]
    Incomplete {
        method: &'static str,
        field: &'static str,
    },
}

impl CriError {
    /// The gRPC code of an RPC error; `None` for connection errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            CriError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A gRPC code as the gRPC specification spells it (`NOT_FOUND`), which is
/// what users search for; tonic's `Debug` says `NotFound`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub type Result<T> = std::result::Result<T, CriError>;

/// What ExecSync brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// The socket path of a `unix:///PATH` endpoint (or of a plain path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(path) => path,
        None if !endpoint.contains("://") => endpoint,
        None => "",
    };
    if path.is_empty() {
        return Err(CriError::Endpoint {
            endpoint: endpoint.into(),
        });
    }
    Ok(PathBuf::from(path))
}

/// A connection to a CRI runtime and image service. Cheap to clone: the
/// clones share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

fn rpc(method: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |status| CriError::Rpc {
        method,
        code: status.code(),
        message: status.message().to_string(),
    }
}

impl CriClient {
    /// Connects to `endpoint` (`unix:///PATH` or a plain path).
    pub async fn connect(endpoint: &str) -> Result<CriClient> {
        let path = socket_path(endpoint)?;
        CriClient::connect_path(&path).await
    }

    /// Connects to the unix socket at `path`.
    pub async fn connect_path(path: &Path) -> Result<CriClient> {
        let socket = path.to_path_buf();
        // The URI is a placeholder: the connector dials the socket, and
        // tonic only needs a valid authority for HTTP/2.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version, and the CRI version it speaks.
    pub async fn version(&self) -> Result<api::VersionResponse> {
        let req = api::VersionRequest {
            version: "v1".into(),
        };
        Ok(self
            .runtime
            .clone()
            .version(req)
            .await
            .map_err(rpc("Version"))?
            .into_inner())
    }

    /// Creates and starts a pod sandbox with runtime handler `handler`
    /// (empty: the runtime's default); returns its id.
    pub async fn run_pod_sandbox(&self, config: PodSandboxConfig, handler: &str) -> Result<String> {
        let req = api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        };
        Ok(self
            .runtime
            .clone()
            .run_pod_sandbox(req)
            .await
            .map_err(rpc("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    pub async fn pod_sandbox_status(&self, pod_id: &str) -> Result<PodSandboxStatus> {
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        self.runtime
            .clone()
            .pod_sandbox_status(req)
            .await
            .map_err(rpc("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                method: "PodSandboxStatus",
                field: "status",
            })
    }

    pub async fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .clone()
            .stop_pod_sandbox(req)
            .await
            .map_err(rpc("StopPodSandbox"))?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .clone()
            .remove_pod_sandbox(req)
            .await
            .map_err(rpc("RemovePodSandbox"))?;
        Ok(())
    }

    pub async fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<Vec<PodSandbox>> {
        let req = api::ListPodSandboxRequest { filter };
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(req)
            .await
            .map_err(rpc("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// Creates a container in pod `pod_id`; `pod_config` is the config the
    /// pod was run with (the runtime takes its log directory and security
    /// context from it). Returns the container's id.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: ContainerConfig,
        pod_config: PodSandboxConfig,
    ) -> Result<String> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod_config),
        };
        Ok(self
            .runtime
            .clone()
            .create_container(req)
            .await
            .map_err(rpc("CreateContainer"))?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: id.into(),
        };
        self.runtime
            .clone()
            .start_container(req)
            .await
            .map_err(rpc("StartContainer"))?;
        Ok(())
    }

    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let req = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.runtime
            .clone()
            .container_status(req)
            .await
            .map_err(rpc("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                method: "ContainerStatus",
                field: "status",
            })
    }

    /// Runs `cmd` in container `id` and waits for it, at most `timeout`
    /// (`None`: no limit).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let req = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.to_vec(),
            // CRI counts whole seconds: round up, so a timeout never shrinks.
            timeout: timeout.map_or(0, |t| {
                (t.as_secs() + u64::from(t.subsec_nanos() > 0)).max(1) as i64
            }),
        };
        let reply = self
            .runtime
            .clone()
            .exec_sync(req)
            .await
            .map_err(rpc("ExecSync"))?
            .into_inner();
        Ok(ExecOutput {
            stdout: reply.stdout,
            stderr: reply.stderr,
            exit_code: reply.exit_code,
        })
    }

    /// Stops container `id`: SIGTERM, then SIGKILL after `timeout_s`.
    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let req = api::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_s,
        };
        self.runtime
            .clone()
            .stop_container(req)
            .await
            .map_err(rpc("StopContainer"))?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.runtime
            .clone()
            .remove_container(req)
            .await
            .map_err(rpc("RemoveContainer"))?;
        Ok(())
    }

    pub async fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<api::Container>> {
        let req = api::ListContainersRequest { filter };
        Ok(self
            .runtime
            .clone()
            .list_containers(req)
            .await
            .map_err(rpc("ListContainers"))?
            .into_inner()
            .containers)
    }

    /// The image `image` names, or `None` when the runtime does not have it.
    pub async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let req = api::ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        Ok(self
            .images
            .clone()
            .image_status(req)
            .await
            .map_err(rpc("ImageStatus"))?
            .into_inner()
            .image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_urls_or_paths() {
        assert_eq!(
            socket_path("unix:///run/c.sock").unwrap(),
            PathBuf::from("/run/c.sock")
        );
        assert_eq!(
            socket_path("/run/c.sock").unwrap(),
            PathBuf::from("/run/c.sock")
        );
        for bad in ["tcp://1.2.3.4:1", "unix://", ""] {
            assert!(
                matches!(socket_path(bad), Err(CriError::Endpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rpc_errors_show_the_grpc_code_and_message() {
        let err = rpc("RunPodSandbox")(tonic::Status::not_found("no runtime for \"x\""));
        assert_eq!(err.code(), Some(Code::NotFound));
        assert_eq!(
            err.to_string(),
            "RunPodSandbox: NOT_FOUND: no runtime for \"x\""
        );
    }
}
