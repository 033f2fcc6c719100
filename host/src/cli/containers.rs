//! The CLI's containers on disk: one directory per container under the
//! state root (`$KESTREL_CLI_ROOT`, else `/run/kestrel/cli`), holding the
//! OCI bundle, the shim's `address` and the stdio FIFOs.

use std::path::{Path, PathBuf};

/// Where the CLI keeps its containers unless [`ROOT_ENV`] says otherwise.
pub const DEFAULT_ROOT: &str = "/run/kestrel/cli";
/// The environment variable that overrides [`DEFAULT_ROOT`].
pub const ROOT_ENV: &str = "KESTREL_CLI_ROOT";
/// The containerd namespace the CLI's shims run in.
pub const NAMESPACE: &str = "kestrel";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id")]
    BadId(#[source] kestrel_protocols::id::IdError),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no such container: {0}")]
    NotFound(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state root.
pub fn root() -> PathBuf {
    match std::env::var_os(ROOT_ENV) {
        Some(root) if !root.is_empty() => root.into(),
        _ => DEFAULT_ROOT.into(),
    }
}

/// Checks an id the user gave: it names a directory and a containerd task,
/// so it follows the rule the shim and the agent apply.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    kestrel_protocols::id::validate("container id", id).map_err(ContainerError::BadId)
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub dir: PathBuf,
}

impl Container {
    /// Makes the directory of a new container.
    pub fn create(id: &str) -> Result<Container, ContainerError> {
        validate_id(id)?;
        let root = root();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let dir = root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(Container {
                id: id.to_string(),
                dir,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(ContainerError::Exists(id.to_string()))
            }
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// An existing container.
    pub fn open(id: &str) -> Result<Container, ContainerError> {
        validate_id(id)?;
        let dir = root().join(id);
        if dir.is_dir() {
            Ok(Container {
                id: id.to_string(),
                dir,
            })
        } else {
            Err(ContainerError::NotFound(id.to_string()))
        }
    }

    /// Every container under the root, by id.
    pub fn list() -> Result<Vec<Container>, ContainerError> {
        let root = root();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&root)(e)),
        };
        let mut containers: Vec<Container> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let id = e.file_name().into_string().ok()?;
                validate_id(&id).ok()?;
                Some(Container { id, dir: e.path() })
            })
            .collect();
        containers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(containers)
    }

    /// The shim's address, as its `start` wrote it.
    pub fn address(&self) -> Option<String> {
        let address = std::fs::read_to_string(self.dir.join("address")).ok()?;
        let address = address.trim();
        (!address.is_empty()).then(|| address.to_string())
    }

    /// The rootfs the bundle runs, from its config.json.
    pub fn rootfs(&self) -> String {
        std::fs::read(self.dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["root"]["path"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The sandbox the container runs in: the bundle's sandbox-id
    /// annotation, else its own id.
    pub fn sandbox_id(&self) -> String {
        match kestrel_host::oci::load_bundle_spec(&self.dir) {
            Ok(spec) => kestrel_host::oci::sandbox_id(&spec, &self.id).to_string(),
            Err(_) => self.id.clone(),
        }
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), ContainerError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&self.dir)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_table_of_ids_gets_the_same_verdicts_here() {
        for (id, ok) in kestrel_protocols::id::VERDICTS {
            assert_eq!(validate_id(id).is_ok(), *ok, "{id:?}");
        }
    }

    #[test]
    fn a_refused_id_says_why_once_in_the_printed_chain() {
        let err = validate_id("../escape").unwrap_err();
        let printed = format!("{:#}", anyhow::Error::new(err));
        assert!(printed.starts_with("invalid container id: "), "{printed}");
        assert_eq!(printed.matches("../escape").count(), 1, "{printed}");
    }
}
