//! The one rule for ids that name things on both sides of the guest
//! boundary: containers, execs, sandboxes and containerd namespaces.
//!
//! Every such id ends up joined to a directory somewhere (the shim's state
//! directory, the CLI's root, the agent's shared directory and cgroups), so
//! the rule is written to make that join harmless: 1 to [`MAX_ID_LEN`]
//! bytes of `[A-Za-z0-9._-]`, starting with a letter or digit. That rules
//! out empty ids, `.`, `..`, hidden names, separators and anything outside
//! ASCII, while accepting every id containerd and CRI generate (containerd's
//! own identifier rule is stricter still, and CRI ids are 64 hex digits).
//! The agent, the shim and the CLI all call [`validate`], so one table of
//! ids gets one verdict everywhere.

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused; the message names the kind of id and the id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} {id:?} contains {found:?}; only [A-Za-z0-9._-] are allowed")]
    BadCharacter {
        kind: &'static str,
        id: String,
        found: char,
    },
    #[error("{kind} {id:?} must start with a letter or a digit")]
    BadStart { kind: &'static str, id: String },
}

/// Checks `id`, a `kind` such as `"container id"` or `"sandbox id"`.
pub fn validate(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: id.len(),
        });
    }
    if let Some(found) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadCharacter {
            kind,
            id: id.to_string(),
            found,
        });
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(IdError::BadStart {
            kind,
            id: id.to_string(),
        });
    }
    Ok(())
}

/// Ids every caller's tests run through their own entry point, with the
/// verdict [`validate`] gives: the agent, the shim and the CLI must agree.
pub const VERDICTS: &[(&str, bool)] = &[
    (".", false),
    ("..", false),
    (".x", false),
    ("a/b", false),
    ("../victim", false),
    ("/tmp/victim", false),
    ("", false),
    ("é", false),
    ("a b", false),
    (LONG_ID, false),
    ("c1", true),
    ("web-1.a_b", true),
    (
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        true,
    ),
];

const LONG_ID: &str = concat!(
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_ids_gets_its_verdicts() {
        for (id, ok) in VERDICTS {
            assert_eq!(validate("container id", id).is_ok(), *ok, "{id:?}");
        }
    }

    #[test]
    fn the_longest_accepted_id_is_max_id_len() {
        assert_eq!(LONG_ID.len(), 300);
        validate("exec id", &"a".repeat(MAX_ID_LEN)).unwrap();
        assert_eq!(
            validate("exec id", &"a".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong {
                kind: "exec id",
                len: MAX_ID_LEN + 1
            })
        );
    }

    #[test]
    fn errors_name_the_kind_and_the_id() {
        let err = validate("sandbox id", "/tmp/victim")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sandbox id") && err.contains("/tmp/victim"),
            "{err}"
        );
    }
}
