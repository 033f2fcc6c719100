//! Every way a task request can fail. [`ShimError::code`] is the one place
//! that decides the wire code; the variants that wrap another error keep it
//! as their `#[source]`, so a log line with `{:#}` shows the whole chain.

use kestrel_protocols::id::IdError;
use kestrel_protocols::ttrpc::Code;

use super::log_binary::LoggerError;
use super::mount::MountError;
use super::stdio::StdioError;
use crate::agent_client::AgentError;
use crate::config::ConfigError;
use crate::hooks::HookError;
use crate::lifecycle::registry::RegistryError;
use crate::lifecycle::state::IllegalTransition;
use crate::network::tcfilter::NetworkError;
use crate::oci::SpecError;
use crate::pod::SizingError;
use crate::rootfs::RootfsError;
use crate::sandbox::SandboxError;
use crate::shared_fs::SharedFsError;

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
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Mount(#[from] Box<MountError>),
    /// The configuration file the runtime options name.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// What a pod asks of its VM.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
    #[error("{0}")]
    Unimplemented(String),
    #[error("container {id}: {what}")]
    Agent {
        id: String,
        what: &'static str,
        #[source]
        source: Box<AgentError>,
    },
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error("sandbox {id} has died; its containers are stopped")]
    SandboxDead { id: String },
    #[error("sandbox {id} is not running")]
    SandboxNotRunning { id: String },
    #[error("sandbox {id} failed to start: {message}")]
    SandboxStartFailed { id: String, message: String },
    #[error("container {id}: copying its {what} into the VM")]
    CopyIntoVm {
        id: String,
        what: &'static str,
        #[source]
        source: Box<RootfsError>,
    },
    #[error("container {id}: sharing its rootfs and volumes with the VM")]
    ShareIntoVm {
        id: String,
        #[source]
        source: Box<SharedFsError>,
    },
    #[error("container {id}: setting up the stdio of {process}")]
    Stdio {
        id: String,
        process: String,
        #[source]
        source: StdioError,
    },
    #[error("container {id}")]
    Hook {
        id: String,
        #[source]
        source: HookError,
    },
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_)
            | ShimError::InvalidId(_)
            // A bundle containerd handed over that cannot be read, a rootfs
            // that does not mount, FIFOs that do not open, a log URI or
            // logging binary that does not work: a bad request.
            | ShimError::Spec(_)
            | ShimError::Mount(_)
            | ShimError::Config(_)
            | ShimError::Sizing(_) => Code::INVALID_ARGUMENT,
            ShimError::Stdio { source, .. } => match source {
                StdioError::Logger {
                    source: LoggerError::NotReady { .. },
                    ..
                } => Code::DEADLINE_EXCEEDED,
                StdioError::Logger {
                    source: LoggerError::Pipes(_) | LoggerError::Ready { .. },
                    ..
                } => Code::INTERNAL,
                _ => Code::INVALID_ARGUMENT,
            },
            ShimError::FailedPrecondition(_)
            | ShimError::Transition(_)
            | ShimError::SandboxDead { .. }
            | ShimError::SandboxNotRunning { .. } => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            // The agent's own verdict carries through (NOT_FOUND stays NOT_FOUND).
            ShimError::Agent { source, .. } => source.code().unwrap_or(Code::UNAVAILABLE),
            // The pod's network namespace is gone, or holds an interface no
            // VM card can stand for: nothing a retry would change.
            ShimError::Sandbox(e)
                if matches!(
                    **e,
                    SandboxError::Network {
                        source: NetworkError::Namespace { .. } | NetworkError::Unmirrorable { .. },
                        ..
                    }
                ) =>
            {
                Code::FAILED_PRECONDITION
            }
            ShimError::Sandbox(_) | ShimError::SandboxStartFailed { .. } => Code::UNAVAILABLE,
            // A bind source the spec cannot have meant, versus the host
            // failing to mount what it should have.
            ShimError::ShareIntoVm { source, .. } => match **source {
                SharedFsError::Io { .. } => Code::INTERNAL,
                _ => Code::INVALID_ARGUMENT,
            },
            ShimError::CopyIntoVm { .. } | ShimError::Internal(_) => Code::INTERNAL,
            // The spec's own hook refused, or could not be run here.
            ShimError::Hook {
                source: HookError::TimedOut { .. },
                ..
            } => Code::DEADLINE_EXCEEDED,
            ShimError::Hook { .. } => Code::FAILED_PRECONDITION,
        }
    }

    /// The error and each of its causes, `: `-separated: what goes on the
    /// wire and into the log, so nobody sees a cause without its context.
    pub fn chain(&self) -> String {
        crate::error_chain(self)
    }

    /// An agent call for container `id` that failed.
    pub fn agent<'a>(id: &'a str, what: &'static str) -> impl FnOnce(AgentError) -> ShimError + 'a {
        move |source| ShimError::Agent {
            id: id.into(),
            what,
            source: Box::new(source),
        }
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

pub type Result<T> = std::result::Result<T, ShimError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_carry_through_and_lost_agents_are_unavailable() {
        let not_found = ShimError::agent("c1", "signalling it")(AgentError::Rpc {
            method: "grpc.AgentService/SignalProcess",
            code: Code::NOT_FOUND,
            message: "no such process".into(),
        });
        assert_eq!(not_found.code(), Code::NOT_FOUND);
        let lost = ShimError::agent("c1", "waiting for it")(AgentError::Transport {
            method: "grpc.AgentService/WaitProcess",
            message: "connection reset".into(),
        });
        assert_eq!(lost.code(), Code::UNAVAILABLE);
    }

    #[test]
    fn the_chain_names_the_container_and_keeps_the_agents_words() {
        let err = ShimError::agent("web", "starting it")(AgentError::Rpc {
            method: "grpc.AgentService/StartContainer",
            code: Code::INVALID_ARGUMENT,
            message: "exec /bin/nope: no such file".into(),
        });
        let chain = err.chain();
        assert_eq!(
            chain,
            "container web: starting it: grpc.AgentService/StartContainer: exec /bin/nope: no such file"
        );
    }
}
