//! A small CNI runtime (<https://www.cni.dev/docs/spec/>): finds a network
//! configuration list by name, runs its plugins for ADD in order and for
//! DEL in reverse, and parses what ADD returns.
//!
//! Hand-written because the one Rust CNI crate on crates.io is unmaintained
//! and async-less, and the part a runtime needs is small: build each
//! plugin's configuration (the list's `name` and `cniVersion`, the previous
//! plugin's result as `prevResult`, `runtimeConfig` for the capabilities
//! the plugin declares), run the binary with the `CNI_*` environment and
//! that configuration on stdin, and read a result or an error from stdout.
//!
//! The runtime speaks `cniVersion` 0.3.x, 0.4.0 and 1.0.0, whose results
//! have the same shape (0.3/0.4 add a `version` to each IP, which is
//! ignored); Debian 12's containernetworking-plugins 1.1 supports them all.
//! What ADD returned is kept by the caller (see [`Attachment`]) and given
//! back to DEL as `prevResult`, as libcni's result cache does.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

/// Where `kestrel run --network NAME` looks for network NAME.
pub const DEFAULT_CONF_DIR: &str = "/etc/kestrel/cni";
/// Where plugin binaries are looked for: Debian's package, then the
/// upstream release tarball's place.
pub const DEFAULT_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// The container's interface.
pub const DEFAULT_IFNAME: &str = "eth0";
/// The versions whose configurations and results this runtime reads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long one plugin may run. A bridge ADD takes milliseconds; iptables
/// waiting for its lock (`-w`) behind another runtime can take seconds.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    BadConfig { path: PathBuf, message: String },
    #[error("no CNI network named {name:?} in {}{}", dir.display(), unreadable_note(.unreadable))]
    NoSuchNetwork {
        name: String,
        dir: PathBuf,
        unreadable: Vec<String>,
    },
    #[error("CNI plugin {plugin:?} not found in {}", dirs_list(.dirs))]
    PluginNotFound { plugin: String, dirs: Vec<PathBuf> },
    #[error("CNI plugin {plugin} {command}: running {}", path.display())]
    Spawn {
        plugin: String,
        command: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command}: no answer after {}s", .timeout.as_secs())]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin} {command} failed: {msg} (code {code}){}", detail_note(.details))]
    Plugin {
        plugin: String,
        command: &'static str,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin} {command} failed ({status}){}", detail_note(.output))]
    PluginExit {
        plugin: String,
        command: &'static str,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("CNI plugin {plugin} {command}: its result is not valid JSON: {message}")]
    BadResult {
        plugin: String,
        command: &'static str,
        message: String,
    },
}

fn unreadable_note(unreadable: &[String]) -> String {
    if unreadable.is_empty() {
        String::new()
    } else {
        format!(" (unreadable there: {})", unreadable.join("; "))
    }
}

fn dirs_list(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(":")
}

fn detail_note(details: &str) -> String {
    let details = details.trim();
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

/// A network configuration list: `name`, `cniVersion` and the plugins to
/// run, each an object with at least a `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub name: String,
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkList {
    /// Parses a `.conflist`, or a `.conf` holding one plugin's
    /// configuration (which becomes a list of one, as libcni reads it).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<NetworkList, CniError> {
        let bad = |message: String| CniError::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let text = |object: &Map<String, Value>, key: &str| {
            object
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{key:?} is missing or not a string")))
        };
        let name = text(&object, "name")?;
        let cni_version = text(&object, "cniVersion")?;
        let plugins = match object.remove("plugins") {
            Some(Value::Array(plugins)) => plugins
                .into_iter()
                .map(|p| match p {
                    Value::Object(p) => Ok(p),
                    _ => Err(bad("a plugin is not a JSON object".into())),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not an array".into())),
            None if object.contains_key("type") => vec![object],
            None => return Err(bad("neither \"plugins\" nor \"type\"".into())),
        };
        let list = NetworkList {
            name,
            cni_version,
            plugins,
        };
        list.validate().map_err(bad)?;
        Ok(list)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("\"name\" is empty".into());
        }
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(format!(
                "cniVersion {:?} is not one of {}",
                self.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ));
        }
        if self.plugins.is_empty() {
            return Err("\"plugins\" is empty".into());
        }
        for plugin in &self.plugins {
            let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
            // The type names a binary in a plugin directory, nothing else.
            if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
                return Err(format!("plugin type {kind:?} is not a plugin's file name"));
            }
        }
        Ok(())
    }

    /// The list named `name` among the `.conflist`, `.conf` and `.json`
    /// files of `dir` (in file-name order, the first that matches). A file
    /// that does not parse is passed over, and named if none matches.
    pub fn find(dir: &Path, name: &str) -> Result<NetworkList, CniError> {
        let not_found = |unreadable| CniError::NoSuchNetwork {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            unreadable,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_found(Vec::new()))
            }
            Err(source) => {
                return Err(CniError::Read {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let mut unreadable = Vec::new();
        for file in files {
            let parsed = std::fs::read(&file)
                .map_err(|source| CniError::Read {
                    path: file.clone(),
                    source,
                })
                .and_then(|bytes| NetworkList::parse(&file, &bytes));
            match parsed {
                Ok(list) if list.name == name => return Ok(list),
                Ok(_) => {}
                Err(e) => unreadable.push(crate::error_chain(&e)),
            }
        }
        Err(not_found(unreadable))
    }

    fn plugin_type(plugin: &Map<String, Value>) -> &str {
        plugin.get("type").and_then(Value::as_str).unwrap_or("")
    }

    /// What plugin `plugin` gets on stdin.
    fn plugin_config(
        &self,
        plugin: &Map<String, Value>,
        prev_result: Option<&Value>,
        port_mappings: &[PortMapping],
    ) -> Value {
        let mut config = plugin.clone();
        config.insert("name".into(), Value::String(self.name.clone()));
        config.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev_result {
            config.insert("prevResult".into(), prev.clone());
        }
        // Only the capabilities the plugin asks for, and only when there
        // is something to give it, as libcni does.
        let wants_ports = plugin
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if wants_ports && !port_mappings.is_empty() {
            let mut runtime = Map::new();
            runtime.insert(
                "portMappings".into(),
                serde_json::to_value(port_mappings).unwrap_or(Value::Null),
            );
            config.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(config)
    }
}

/// One published port, as `runtimeConfig.portMappings` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    pub protocol: Protocol,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{spec:?}: {why} (expected [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp])")]
pub struct PortMappingError {
    spec: String,
    why: String,
}

impl FromStr for PortMapping {
    type Err = PortMappingError;

    /// `[HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTO]`, as `docker run -p`
    /// spells it (IPv4 host addresses only; no ranges).
    fn from_str(spec: &str) -> Result<PortMapping, PortMappingError> {
        let err = |why: String| PortMappingError {
            spec: spec.to_string(),
            why,
        };
        let (ports, protocol) = match spec.split_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => return Err(err(format!("protocol {other:?} is not tcp or udp"))),
            None => (spec, Protocol::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host, container) = match parts[..] {
            [host, container] => ("", host, container),
            [ip, host, container] => {
                ip.parse::<Ipv4Addr>()
                    .map_err(|_| err(format!("{ip:?} is not an IPv4 address")))?;
                (ip, host, container)
            }
            _ => return Err(err("needs a host port and a container port".into())),
        };
        let port = |what: &str, text: &str| match text.parse::<u32>() {
            Ok(p @ 1..=65535) => Ok(p as u16),
            Ok(p) => Err(err(format!("{what} port {p} is not between 1 and 65535"))),
            Err(_) => Err(err(format!("{what} port {text:?} is not a number"))),
        };
        Ok(PortMapping {
            host_port: port("host", host)?,
            container_port: port("container", container)?,
            protocol,
            host_ip: host_ip.to_string(),
        })
    }
}

/// The parts of a plugin's result a runtime uses. The raw result is what
/// DEL gets back as `prevResult`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The namespace the interface is in; empty for the host's.
    pub sandbox: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct IpConfig {
    /// CIDR notation: `10.89.0.2/24`.
    pub address: String,
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: String,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl CniResult {
    pub fn parse(result: &Value) -> Result<CniResult, serde_json::Error> {
        CniResult::deserialize(result)
    }

    /// The addresses given to interfaces inside the container's namespace
    /// (an IP naming no interface counts as the container's too).
    pub fn container_ips(&self) -> Vec<IpAddr> {
        self.ips
            .iter()
            .filter(|ip| match ip.interface {
                Some(i) => self
                    .interfaces
                    .get(i)
                    .is_some_and(|iface| !iface.sandbox.is_empty()),
                None => true,
            })
            .filter_map(|ip| ip.address.split('/').next()?.parse().ok())
            .collect()
    }
}

/// One container's attachment to one network: what ADD was asked and what
/// it answered, all DEL needs. Callers store it (as JSON) beside the
/// container, so the network can be taken down by a later process, and
/// even when the configuration has changed since; [`Attachment::KIND`]
/// marks the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub kind: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// `CNI_PATH`, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// The list, as found when ADD ran.
    pub config: NetworkList,
    /// `runtimeConfig` by capability.
    pub capability_args: CapabilityArgs,
    /// The last plugin's result; `None` until ADD succeeded.
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapabilityArgs {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

impl Attachment {
    /// The format of a stored attachment.
    pub const KIND: &'static str = "kestrel-cni-attachment-v1";

    pub fn new(
        container_id: &str,
        netns: &Path,
        config: NetworkList,
        bin_dirs: &[PathBuf],
        port_mappings: Vec<PortMapping>,
    ) -> Attachment {
        Attachment {
            kind: Attachment::KIND.into(),
            container_id: container_id.into(),
            netns: netns.into(),
            if_name: DEFAULT_IFNAME.into(),
            bin_dirs: bin_dirs.to_vec(),
            config,
            capability_args: CapabilityArgs { port_mappings },
            result: None,
        }
    }

    /// Runs every plugin's ADD in order, each with the one before's
    /// result; records and returns the last result.
    pub async fn add(&mut self) -> Result<CniResult, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &self.config.plugins {
            let stdin = self.config.plugin_config(
                plugin,
                prev.as_ref(),
                &self.capability_args.port_mappings,
            );
            let out = self.exec("ADD", plugin, &stdin).await?;
            let kind = NetworkList::plugin_type(plugin);
            let result: Value = serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
                plugin: kind.into(),
                command: "ADD",
                message: e.to_string(),
            })?;
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        let parsed = CniResult::parse(&result).map_err(|e| CniError::BadResult {
            plugin: self
                .config
                .plugins
                .last()
                .map(NetworkList::plugin_type)
                .unwrap_or_default()
                .into(),
            command: "ADD",
            message: e.to_string(),
        })?;
        self.result = Some(result);
        Ok(parsed)
    }

    /// Runs every plugin's DEL in reverse order with the recorded result
    /// as `prevResult`. Every plugin runs even when one fails, so as
    /// little as possible is left; the first failure is returned.
    pub async fn del(&self) -> Result<(), CniError> {
        let mut first_error = None;
        for plugin in self.config.plugins.iter().rev() {
            let stdin = self.config.plugin_config(
                plugin,
                self.result.as_ref(),
                &self.capability_args.port_mappings,
            );
            if let Err(e) = self.exec("DEL", plugin, &stdin).await {
                tracing::warn!(container_id = %self.container_id, error = %crate::error_chain(&e), "CNI DEL");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn find_plugin(&self, kind: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|dir| dir.join(kind))
            .find(|path| path.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: kind.into(),
                dirs: self.bin_dirs.clone(),
            })
    }

    /// Runs one plugin; its stdout on success.
    async fn exec(
        &self,
        command: &'static str,
        plugin: &Map<String, Value>,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let kind = NetworkList::plugin_type(plugin).to_string();
        let path = self.find_plugin(&kind)?;
        let cni_path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let mut env: BTreeMap<&str, &std::ffi::OsStr> = BTreeMap::new();
        env.insert("CNI_COMMAND", command.as_ref());
        env.insert("CNI_CONTAINERID", self.container_id.as_ref());
        env.insert("CNI_NETNS", self.netns.as_os_str());
        env.insert("CNI_IFNAME", self.if_name.as_ref());
        env.insert("CNI_PATH", &cni_path);
        let spawn_err = |source| CniError::Spawn {
            plugin: kind.clone(),
            command,
            path: path.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&path)
            // The environment is ours (plugins run iptables from PATH),
            // less a CNI_ARGS of whoever ran us, meant for other plugins.
            .env_remove("CNI_ARGS")
            .envs(env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let input = serde_json::to_vec(stdin).unwrap_or_default();
        let mut pipe = child.stdin.take();
        let run = async move {
            if let Some(pipe) = pipe.as_mut() {
                // A plugin that fails before reading its stdin closes it:
                // its answer on stdout says why, not our broken pipe.
                let _ = pipe.write_all(&input).await;
            }
            drop(pipe);
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(PLUGIN_TIMEOUT, run).await {
            Ok(output) => output.map_err(spawn_err)?,
            Err(_) => {
                return Err(CniError::Timeout {
                    plugin: kind,
                    command,
                    timeout: PLUGIN_TIMEOUT,
                })
            }
        };
        if output.status.success() {
            return Ok(output.stdout);
        }
        #[derive(Deserialize)]
        struct PluginError {
            code: u64,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        match serde_json::from_slice::<PluginError>(&output.stdout) {
            Ok(e) => Err(CniError::Plugin {
                plugin: kind,
                command,
                code: e.code,
                msg: e.msg,
                details: e.details,
            }),
            Err(_) => {
                let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&output.stderr));
                Err(CniError::PluginExit {
                    plugin: kind,
                    command,
                    status: output.status,
                    output: text,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn list(json: &str) -> Result<NetworkList, CniError> {
        NetworkList::parse(Path::new("test.conflist"), json.as_bytes())
    }

    #[test]
    fn port_mappings_parse_like_docker_run_p() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            (
                p.host_port,
                p.container_port,
                p.protocol,
                p.host_ip.as_str()
            ),
            (8080, 80, Protocol::Tcp, "")
        );
        let p: PortMapping = "127.0.0.1:53:5353/udp".parse().unwrap();
        assert_eq!(
            (
                p.host_port,
                p.container_port,
                p.protocol,
                p.host_ip.as_str()
            ),
            (53, 5353, Protocol::Udp, "127.0.0.1")
        );
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "127.0.0.1"})
        );
    }

    #[test]
    fn bad_port_mappings_say_what_is_wrong() {
        for (spec, says) in [
            ("abc", "host port and a container port"),
            ("abc:80", "\"abc\" is not a number"),
            ("0:80", "port 0 is not between 1 and 65535"),
            ("70000:80", "port 70000 is not between 1 and 65535"),
            ("80:0", "container port 0"),
            ("80:80/sctp", "\"sctp\" is not tcp or udp"),
            ("host:80:80", "not an IPv4 address"),
            ("1:2:3:4", "host port and a container port"),
        ] {
            let err = spec.parse::<PortMapping>().unwrap_err().to_string();
            assert!(err.contains(says), "{spec}: {err}");
            assert!(err.contains(spec), "{spec}: {err}");
        }
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_of_one() {
        let l = list(r#"{"cniVersion":"0.4.0","name":"n","type":"bridge","bridge":"b0"}"#).unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0]["bridge"], "b0");
    }

    #[test]
    fn bad_lists_are_refused_saying_why() {
        for (json, says) in [
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
                "\"name\"",
            ),
            (
                r#"{"cniVersion":"2.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                "2.0.0",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "empty"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
                "file name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                "file name",
            ),
            (r#"[1]"#, "object"),
        ] {
            let err = list(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
            assert!(err.starts_with("test.conflist: "), "{err}");
        }
    }

    #[test]
    fn plugins_get_name_version_prev_result_and_only_their_capabilities() {
        let l = list(
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge"},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        let ports = vec!["8080:80".parse().unwrap()];
        let prev = serde_json::json!({"cniVersion":"1.0.0","ips":[]});
        let bridge = l.plugin_config(&l.plugins[0], None, &ports);
        assert_eq!(
            bridge,
            serde_json::json!({"type":"bridge","name":"net","cniVersion":"1.0.0"})
        );
        let portmap = l.plugin_config(&l.plugins[1], Some(&prev), &ports);
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"],
            serde_json::json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp"}])
        );
        let no_ports = l.plugin_config(&l.plugins[1], Some(&prev), &[]);
        assert!(no_ports.get("runtimeConfig").is_none(), "{no_ports}");
    }

    #[test]
    fn find_picks_the_list_by_name_and_names_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00-broken.conflist"), "{").unwrap();
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        assert_eq!(NetworkList::find(dir.path(), "a").unwrap().name, "a");
        let err = NetworkList::find(dir.path(), "b").unwrap_err().to_string();
        assert!(err.contains("no CNI network named \"b\""), "{err}");
        assert!(err.contains("00-broken.conflist"), "{err}");
        let err = NetworkList::find(&dir.path().join("none"), "a").unwrap_err();
        assert!(matches!(err, CniError::NoSuchNetwork { .. }), "{err}");
    }

    #[test]
    fn results_of_both_versions_give_the_container_address() {
        for result in [
            // 1.0.0: no version per IP.
            serde_json::json!({"cniVersion":"1.0.0",
                "interfaces":[{"name":"k0","mac":"aa"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],
                "ips":[{"address":"10.89.0.5/24","gateway":"10.89.0.1","interface":2}],
                "dns":{"nameservers":["10.89.0.1"]}}),
            // 0.4.0.
            serde_json::json!({"cniVersion":"0.4.0",
                "interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
                "ips":[{"version":"4","address":"10.89.0.5/24","gateway":"10.89.0.1","interface":0}]}),
        ] {
            let r = CniResult::parse(&result).unwrap();
            assert_eq!(r.container_ips(), vec![IpAddr::from([10, 89, 0, 5])]);
        }
    }

    /// A fake plugin: a shell script that logs its environment and stdin
    /// and answers `answer`.
    fn fake_plugin(dir: &Path, kind: &str, script: &str) {
        let path = dir.join(kind);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn attachment(dir: &Path, plugins: &str) -> Attachment {
        let l = list(&format!(
            r#"{{"cniVersion":"1.0.0","name":"net","plugins":{plugins}}}"#
        ))
        .unwrap();
        Attachment::new(
            "c1",
            Path::new("/run/netns/x"),
            l,
            &[dir.join("missing"), dir.to_path_buf()],
            vec![],
        )
    }

    #[tokio::test]
    async fn add_chains_results_and_del_runs_in_reverse_with_the_last_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        for kind in ["one", "two"] {
            fake_plugin(
                dir.path(),
                kind,
                &format!(
                    r#"in=$(cat); echo "{kind} $CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME $in" >> {log}
echo '{{"cniVersion":"1.0.0","ips":[{{"address":"10.0.0.{n}/24"}}]}}'"#,
                    log = log.display(),
                    n = if kind == "one" { 1 } else { 2 },
                ),
            );
        }
        let mut a = attachment(dir.path(), r#"[{"type":"one"},{"type":"two"}]"#);
        let result = a.add().await.unwrap();
        assert_eq!(result.container_ips(), vec![IpAddr::from([10, 0, 0, 2])]);
        a.del().await.unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let heads: Vec<String> = lines
            .iter()
            .map(|l| l.split(' ').take(5).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            heads,
            [
                "one ADD c1 /run/netns/x eth0",
                "two ADD c1 /run/netns/x eth0",
                "two DEL c1 /run/netns/x eth0",
                "one DEL c1 /run/netns/x eth0",
            ]
        );
        assert!(!lines[0].contains("prevResult"), "{}", lines[0]);
        assert!(
            lines[1].contains(
                r#""prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/24"}]}"#
            ),
            "{}",
            lines[1]
        );
        for del in &lines[2..] {
            assert!(del.contains("10.0.0.2/24"), "{del}");
        }
    }

    #[tokio::test]
    async fn a_plugin_error_names_the_plugin_and_its_message() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(
            dir.path(),
            "bad",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":11,"msg":"failed to set bridge addr","details":"already in use"}'; exit 1"#,
        );
        let mut a = attachment(dir.path(), r#"[{"type":"bad"}]"#);
        let err = a.add().await.unwrap_err().to_string();
        assert_eq!(
            err,
            "CNI plugin bad ADD failed: failed to set bridge addr (code 11): already in use"
        );
        assert_eq!(a.result, None);
    }

    #[tokio::test]
    async fn a_missing_plugin_names_the_directories_searched() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = attachment(dir.path(), r#"[{"type":"nothere"}]"#);
        let err = a.add().await.unwrap_err().to_string();
        assert!(err.contains("\"nothere\" not found in"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn del_runs_every_plugin_and_returns_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fake_plugin(dir.path(), "fails", "cat >/dev/null; echo oops >&2; exit 3");
        fake_plugin(
            dir.path(),
            "works",
            &format!("cat >/dev/null; echo works >> {}", log.display()),
        );
        let a = attachment(dir.path(), r#"[{"type":"works"},{"type":"fails"}]"#);
        let err = a.del().await.unwrap_err().to_string();
        assert!(err.starts_with("CNI plugin fails DEL failed"), "{err}");
        assert!(err.contains("oops"), "{err}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "works\n");
    }

    #[test]
    fn an_attachment_round_trips_through_its_stored_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = attachment(dir.path(), r#"[{"type":"bridge"}]"#);
        a.capability_args.port_mappings = vec!["1:2/udp".parse().unwrap()];
        a.result = Some(serde_json::json!({"cniVersion":"1.0.0"}));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["kind"], Attachment::KIND);
        assert_eq!(json["containerId"], "c1");
        assert_eq!(json["ifName"], "eth0");
        assert_eq!(serde_json::from_value::<Attachment>(json).unwrap(), a);
    }
}
