//! The agent's error kinds. Each maps to exactly one ttrpc code in
//! `server.rs`, so every failure reaches the runtime with the code a Kata
//! client expects and a message naming what was wrong.

/// What went wrong, classified by how the caller should react.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed: bad id, bad path, incomplete spec.
    #[error("{0}")]
    InvalidArgument(String),
    /// An object with this id exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// No object with this id, or the process has already finished.
    #[error("{0}")]
    NotFound(String),
    /// The object is in a state that does not allow the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The agent does not provide this feature.
    #[error("{0}")]
    Unimplemented(String),
    /// The operation did not finish within the caller's timeout.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A stream has no more data.
    #[error("{0}")]
    EndOfStream(String),
    /// The system refused something the request was entitled to.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<crate::container::capabilities::CapabilityError> for Error {
    fn from(e: crate::container::capabilities::CapabilityError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<crate::container::seccomp::SeccompError> for Error {
    fn from(e: crate::container::seccomp::SeccompError) -> Self {
        use crate::container::seccomp::SeccompError as S;
        match e {
            S::Invalid(_) => Error::InvalidArgument(e.to_string()),
            S::Unsupported(_) => Error::Unimplemented(e.to_string()),
            S::Compile(_) => Error::Internal(e.to_string()),
        }
    }
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }

    /// The same kind of error, its message prefixed with `what: `.
    pub fn context(self, what: &str) -> Self {
        let prefix = |m: String| format!("{what}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(prefix(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(prefix(m)),
            Error::NotFound(m) => Error::NotFound(prefix(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(prefix(m)),
            Error::Unimplemented(m) => Error::Unimplemented(prefix(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(prefix(m)),
            Error::EndOfStream(m) => Error::EndOfStream(prefix(m)),
            Error::Internal(m) => Error::Internal(prefix(m)),
        }
    }
}

/// Checks a container, exec or sandbox id with the rule host and guest
/// share ([`kestrel_protocols::id`]), so an id can never name a path outside
/// the directory it is joined to.
pub fn validate_id(kind: &'static str, id: &str) -> Result<()> {
    kestrel_protocols::id::validate(kind, id).map_err(|e| Error::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_table_of_ids_gets_the_same_verdicts_here() {
        for (id, ok) in kestrel_protocols::id::VERDICTS {
            match validate_id("container id", id) {
                Ok(()) => assert!(ok, "{id:?} accepted"),
                Err(Error::InvalidArgument(_)) => assert!(!ok, "{id:?} refused"),
                Err(other) => panic!("{id:?}: {other:?}"),
            }
        }
    }
}
