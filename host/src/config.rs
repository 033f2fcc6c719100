//! The runtime's configuration: TOML at `/etc/kestrel/config.toml`, or the
//! file `$KESTREL_CONFIG` names. `host/config.example.toml` documents every
//! key with its default; a test keeps the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the configuration is read from unless `KESTREL_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/kestrel/config.toml";
/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "KESTREL_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub sandbox: SandboxConfig,
    pub agent: AgentConfig,
    pub lifecycle: LifecycleConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    pub hypervisor: String,
    pub agent_path: PathBuf,
    pub state_dir: PathBuf,
    pub agent_log_level: String,
    pub stop_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub dial_timeout_ms: u64,
    pub dial_first_backoff_ms: u64,
    pub dial_max_backoff_ms: u64,
    pub handshake_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    pub tombstone_max_entries: usize,
    pub tombstone_max_age_s: u64,
    pub relist_period_ms: u64,
    pub relist_unhealthy_after_s: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            hypervisor: "process".into(),
            agent_path: "/usr/local/bin/kestrel-agent".into(),
            state_dir: "/run/kestrel/sandboxes".into(),
            agent_log_level: "info".into(),
            stop_grace_ms: 5000,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        // Kata's defaults: first retry after 10 ms, give up after 10 s.
        AgentConfig {
            dial_timeout_ms: 10_000,
            dial_first_backoff_ms: 10,
            dial_max_backoff_ms: 500,
            handshake_timeout_ms: 1000,
            request_timeout_ms: 30_000,
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        // Kubernetes' PLEG: relist every second, unhealthy after 3 minutes.
        LifecycleConfig {
            tombstone_max_entries: 1024,
            tombstone_max_age_s: 300,
            relist_period_ms: 1000,
            relist_unhealthy_after_s: 180,
        }
    }
}

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

impl Config {
    /// Reads the configuration from `$KESTREL_CONFIG`, else from
    /// [`DEFAULT_PATH`] when it exists, else returns the defaults. A file
    /// named by the variable must exist.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(PATH_ENV) {
            Some(path) if !path.is_empty() => Config::from_file(Path::new(&path)),
            _ if Path::new(DEFAULT_PATH).exists() => Config::from_file(Path::new(DEFAULT_PATH)),
            _ => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })
        };
        let backends = kestrel_hypervisor::backend::NAMES;
        if !backends.contains(&self.sandbox.hypervisor.as_str()) {
            return invalid(
                "sandbox.hypervisor",
                format!(
                    "{:?} is not a backend this build has (have: {})",
                    self.sandbox.hypervisor,
                    backends.join(", ")
                ),
            );
        }
        if !self.sandbox.agent_path.is_absolute() {
            return invalid("sandbox.agent_path", "must be an absolute path".into());
        }
        if !self.sandbox.state_dir.is_absolute() {
            return invalid("sandbox.state_dir", "must be an absolute path".into());
        }
        if !LOG_LEVELS.contains(&self.sandbox.agent_log_level.as_str()) {
            return invalid(
                "sandbox.agent_log_level",
                format!("must be one of {}", LOG_LEVELS.join(", ")),
            );
        }
        let positive = [
            ("agent.dial_timeout_ms", self.agent.dial_timeout_ms),
            (
                "agent.dial_first_backoff_ms",
                self.agent.dial_first_backoff_ms,
            ),
            ("agent.dial_max_backoff_ms", self.agent.dial_max_backoff_ms),
            (
                "agent.handshake_timeout_ms",
                self.agent.handshake_timeout_ms,
            ),
            ("agent.request_timeout_ms", self.agent.request_timeout_ms),
            (
                "lifecycle.relist_period_ms",
                self.lifecycle.relist_period_ms,
            ),
            (
                "lifecycle.relist_unhealthy_after_s",
                self.lifecycle.relist_unhealthy_after_s,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if self.agent.dial_max_backoff_ms < self.agent.dial_first_backoff_ms {
            return invalid(
                "agent.dial_max_backoff_ms",
                "must not be smaller than agent.dial_first_backoff_ms".into(),
            );
        }
        Ok(())
    }
}

impl AgentConfig {
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }
    pub fn dial_first_backoff(&self) -> Duration {
        Duration::from_millis(self.dial_first_backoff_ms)
    }
    pub fn dial_max_backoff(&self) -> Duration {
        Duration::from_millis(self.dial_max_backoff_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl LifecycleConfig {
    pub fn tombstone_max_age(&self) -> Duration {
        Duration::from_secs(self.tombstone_max_age_s)
    }
    pub fn relist_period(&self) -> Duration {
        Duration::from_millis(self.relist_period_ms)
    }
    pub fn relist_unhealthy_after(&self) -> Duration {
        Duration::from_secs(self.relist_unhealthy_after_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn the_documented_example_is_exactly_the_defaults() {
        let example = include_str!("../config.example.toml");
        assert_eq!(parse(example).unwrap(), Config::default());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn a_partial_file_overrides_only_its_keys() {
        let config = parse(
            "[sandbox]\nagent_path = \"/opt/agent\"\n[lifecycle]\ntombstone_max_entries = 8\n",
        )
        .unwrap();
        assert_eq!(config.sandbox.agent_path, Path::new("/opt/agent"));
        assert_eq!(config.lifecycle.tombstone_max_entries, 8);
        assert_eq!(config.agent, AgentConfig::default());
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let err = parse("[sandbox]\nhypervsior = \"process\"\n").unwrap_err();
        assert!(err.to_string().contains("hypervsior"), "{err}");
    }

    #[test]
    fn an_unknown_backend_is_refused_naming_those_available() {
        let err = parse("[sandbox]\nhypervisor = \"xen\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sandbox.hypervisor") && text.contains("xen") && text.contains("process"),
            "{text}"
        );
    }

    #[test]
    fn zero_timeouts_and_relative_paths_are_refused() {
        for (text, key) in [
            (
                "[agent]\nrequest_timeout_ms = 0\n",
                "agent.request_timeout_ms",
            ),
            (
                "[lifecycle]\nrelist_period_ms = 0\n",
                "lifecycle.relist_period_ms",
            ),
            (
                "[sandbox]\nagent_path = \"kestrel-agent\"\n",
                "sandbox.agent_path",
            ),
            (
                "[sandbox]\nagent_log_level = \"loud\"\n",
                "sandbox.agent_log_level",
            ),
            (
                "[agent]\ndial_first_backoff_ms = 100\ndial_max_backoff_ms = 10\n",
                "agent.dial_max_backoff_ms",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_wrong_type_is_a_parse_error_naming_the_file() {
        let err = parse("[agent]\nrequest_timeout_ms = \"soon\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().starts_with("test.toml:"), "{err}");
    }

    #[test]
    fn a_missing_named_file_is_an_error_naming_it() {
        let err = Config::from_file(Path::new("/nonexistent/kestrel.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/kestrel.toml"),
            "{err}"
        );
    }
}
