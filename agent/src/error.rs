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

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }
}

/// Longest container or exec id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks a container, exec or sandbox id: 1 to 128 bytes of
/// `[A-Za-z0-9._-]`, and not `.` or `..`, so an id can never name a path
/// outside the directory it is joined to.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{kind} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(format!(
            "{kind} is {} bytes long; at most {MAX_ID_LEN} are allowed",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(format!(
            "{kind} {id:?} contains {c:?}; only [A-Za-z0-9._-] are allowed"
        )));
    }
    if id == "." || id == ".." {
        return Err(Error::invalid(format!("{kind} {id:?} is not a valid id")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_path_characters_are_rejected() {
        for bad in ["", "../x", "a/b", "a b", "..", ".", "é"] {
            assert!(
                matches!(
                    validate_id("container id", bad),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?} accepted"
            );
        }
        assert!(validate_id("container id", &"a".repeat(129)).is_err());
    }

    #[test]
    fn ordinary_ids_are_accepted() {
        for good in ["c1", "my-container_1.0", &"a".repeat(128)] {
            validate_id("container id", good).expect(good);
        }
    }
}
