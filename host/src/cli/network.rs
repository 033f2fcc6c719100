//! `kestrel run --network` and `-p`: a container's network, as nerdctl
//! gives one.
//!
//! - `none` (the default): the container gets a network namespace of its
//!   own with only `lo` (a spec entry without a path).
//! - any other NAME: the CNI network whose configuration list in `[network]
//!   cni_conf_dir` is named NAME. Kestrel makes a network namespace on the
//!   host ([`netns`]), runs the list's plugins in it ([`cni`]), and names it
//!   in the spec as CRI does: the `process` backend runs the sandbox's
//!   agent in it, a VM backend wires the VM to it. The container gets
//!   `/etc/resolv.conf` and `/etc/hosts` bind-mounted from its directory.
//!   `bridge` is written on first use when no list has that name
//!   ([`DEFAULT_BRIDGE`]), as nerdctl writes its own.
//!
//! What DEL needs is kept in the container's directory ([`ATTACHMENT_FILE`],
//! a [`cni::Attachment`] as JSON), written before the first plugin runs, so
//! `kestrel rm` takes the network down, whichever process made it and
//! however far it got.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use kestrel_host::config::Config;
use kestrel_host::network::cni::{self, Attachment, CniResult, NetworkList, PortMapping};
use kestrel_host::network::netns;

use super::containers::Container;

/// The network a container gets without `--network`.
pub const NONE: &str = "none";
/// The network written on first use when no list has its name.
pub const BRIDGE: &str = "bridge";
/// The file the `bridge` network is written to.
pub const DEFAULT_BRIDGE_FILE: &str = "kestrel-bridge.conflist";
/// bridge `kestrel0` on 10.90.0.0/24 with NAT, portmap and firewall.
pub const DEFAULT_BRIDGE: &str = include_str!("../../cni/kestrel-bridge.conflist");
/// The container's attachment, in its directory.
pub const ATTACHMENT_FILE: &str = "network.json";
/// Used when the host names no nameserver a container can reach, as
/// Docker and nerdctl do.
const FALLBACK_NAMESERVERS: &[&str] = &["8.8.8.8", "8.8.4.4"];

#[derive(Args, Debug, Clone)]
pub struct NetworkArgs {
    /// The container's network: `none` (only lo) or a CNI network by name
    /// (`bridge`: bridge kestrel0 on 10.90.0.0/24 with NAT).
    #[arg(long, default_value = NONE, value_name = "NAME")]
    pub network: String,
    /// Publish a container port on the host's: [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]
    /// (repeatable; needs a CNI network).
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    pub publish: Vec<PortMapping>,
}

impl NetworkArgs {
    /// Refuses what cannot work, before anything is made.
    pub fn check(&self) -> Result<()> {
        if self.network.is_empty() {
            bail!("--network: give `none` or a CNI network's name");
        }
        if self.network == NONE && !self.publish.is_empty() {
            bail!("-p/--publish needs a network to publish from: add --network bridge (or another CNI network)");
        }
        Ok(())
    }
}

/// What the container was attached to.
pub struct Attached {
    pub netns: PathBuf,
    pub result: CniResult,
}

/// Attaches `container` to the network `args` name; `None` for `none`.
/// On failure, whatever was made is recorded in the container's directory
/// for [`detach`], which the caller runs.
pub async fn attach(
    container: &Container,
    args: &NetworkArgs,
    config: &Config,
) -> Result<Option<Attached>> {
    if args.network == NONE {
        return Ok(None);
    }
    let list = find_network(&config.network.cni_conf_dir, &args.network)?;
    let name = netns_name(container);
    let path = netns::create(Path::new(netns::DEFAULT_DIR), &name)
        .context("making the container's network namespace")?;
    let mut attachment = Attachment::new(
        &name,
        &path,
        list,
        &config.network.cni_bin_dirs,
        args.publish.clone(),
    );
    if let Err(e) = store(&container.dir, &attachment) {
        let _ = netns::remove(&path);
        return Err(e);
    }
    let result = attachment
        .add()
        .await
        .with_context(|| format!("attaching to network {:?}", args.network))?;
    store(&container.dir, &attachment)?;
    Ok(Some(Attached {
        netns: path,
        result,
    }))
}

/// The name of the container's network namespace, also the plugins'
/// container id: derived from its directory's path, which is unique on the
/// host (two CLI roots may hold one id), so that it is found again without
/// trusting any file.
fn netns_name(container: &Container) -> String {
    let dir = std::fs::canonicalize(&container.dir).unwrap_or_else(|_| container.dir.clone());
    netns::name_for(&dir.display().to_string())
}

/// The list named `name`; `bridge` is written first when missing.
fn find_network(dir: &Path, name: &str) -> Result<NetworkList> {
    match NetworkList::find(dir, name) {
        Err(cni::CniError::NoSuchNetwork { .. }) if name == BRIDGE => {
            write_default_bridge(dir)?;
            Ok(NetworkList::find(dir, name)?)
        }
        found => Ok(found?),
    }
}

/// Writes [`DEFAULT_BRIDGE`] as [`DEFAULT_BRIDGE_FILE`], never over a file
/// of that name, and never seen half-written.
fn write_default_bridge(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(DEFAULT_BRIDGE_FILE);
    let temp = dir.join(format!(".{DEFAULT_BRIDGE_FILE}.{}", std::process::id()));
    std::fs::write(&temp, DEFAULT_BRIDGE).with_context(|| format!("writing {}", temp.display()))?;
    let linked = std::fs::hard_link(&temp, &file);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("writing {}", file.display()))
        }
        _ => Ok(()),
    }
}

fn store(dir: &Path, attachment: &Attachment) -> Result<()> {
    let file = dir.join(ATTACHMENT_FILE);
    let temp = dir.join(format!(".{ATTACHMENT_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(attachment)?;
    std::fs::write(&temp, json)
        .and_then(|()| std::fs::rename(&temp, &file))
        .with_context(|| format!("writing {}", file.display()))
}

/// The attachment stored in a container's directory, if any.
pub fn load(dir: &Path) -> Result<Option<Attachment>> {
    let file = dir.join(ATTACHMENT_FILE);
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let attachment: Attachment =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", file.display()))?;
    if attachment.kind != Attachment::KIND {
        bail!(
            "{}: kind {:?} is not {:?}",
            file.display(),
            attachment.kind,
            Attachment::KIND
        );
    }
    Ok(Some(attachment))
}

/// The container's addresses, from its stored attachment.
pub fn ips(dir: &Path) -> Vec<IpAddr> {
    load(dir)
        .ok()
        .flatten()
        .and_then(|a| a.result)
        .and_then(|r| CniResult::parse(&r).ok())
        .map(|r| r.container_ips())
        .unwrap_or_default()
}

/// Takes down the network of `container`: CNI DEL with its record, then
/// its network namespace, then the record. A DEL that fails keeps the
/// record, so that `kestrel rm` can try again, unless `force`: then the
/// failure is reported on stderr and the rest goes all the same.
pub async fn detach(container: &Container, force: bool) -> Result<()> {
    let deleted = match load(&container.dir) {
        Ok(Some(attachment)) => attachment
            .del()
            .await
            .with_context(|| format!("detaching from network {:?}", attachment.config.name)),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = deleted {
        if !force {
            return Err(e.context(format!(
                "`kestrel rm -f {}` removes the container regardless",
                container.id
            )));
        }
        eprintln!("kestrel: {e:#} (removing the container regardless)");
    }
    netns::remove(&Path::new(netns::DEFAULT_DIR).join(netns_name(container)))?;
    let file = container.dir.join(ATTACHMENT_FILE);
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", file.display()))
        }
        _ => Ok(()),
    }
}

/// Puts the network into `spec`: a new namespace for `none`, else the
/// attached one, with `/etc/resolv.conf` and `/etc/hosts` written to `dir`
/// and bind-mounted (files, so a VM backend copies them in as it copies
/// any bind-mounted file).
pub fn apply(spec: &mut serde_json::Value, dir: &Path, attached: Option<&Attached>) -> Result<()> {
    let Some(attached) = attached else {
        push_namespace(spec, serde_json::json!({"type": "network"}));
        return Ok(());
    };
    push_namespace(
        spec,
        serde_json::json!({"type": "network", "path": attached.netns}),
    );
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let systemd_resolv = std::fs::read_to_string("/run/systemd/resolve/resolv.conf").ok();
    let resolv = resolv_conf(
        &attached.result.dns,
        &host_resolv,
        systemd_resolv.as_deref(),
    );
    let hostname = spec["hostname"].as_str().unwrap_or_default().to_string();
    let hosts = hosts_file(&hostname, &attached.result.container_ips());
    for (name, text, destination) in [
        ("resolv.conf", resolv, "/etc/resolv.conf"),
        ("hosts", hosts, "/etc/hosts"),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.push(serde_json::json!({
                "destination": destination,
                "type": "bind",
                "source": file,
                "options": ["rbind", "rprivate"]
            }));
        }
    }
    Ok(())
}

fn push_namespace(spec: &mut serde_json::Value, namespace: serde_json::Value) {
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        namespaces.push(namespace);
    }
}

/// The container's resolv.conf: the network's DNS when the plugins gave
/// one, else the host's without loopback nameservers (unreachable from
/// the container); systemd-resolved's upstream list stands in for its
/// stub, and Docker's fallback for nothing at all.
fn resolv_conf(dns: &cni::Dns, host: &str, systemd_resolved: Option<&str>) -> String {
    if !dns.nameservers.is_empty() {
        let mut out = String::new();
        for ns in &dns.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        let mut search = dns.search.clone();
        if search.is_empty() && !dns.domain.is_empty() {
            search.push(dns.domain.clone());
        }
        if !search.is_empty() {
            out.push_str(&format!("search {}\n", search.join(" ")));
        }
        if !dns.options.is_empty() {
            out.push_str(&format!("options {}\n", dns.options.join(" ")));
        }
        return out;
    }
    let reachable = |text: &str| -> (String, usize) {
        let mut out = String::new();
        let mut nameservers = 0;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("nameserver") {
                let loopback = words
                    .next()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .is_none_or(|a| a.is_loopback());
                if loopback {
                    continue;
                }
                nameservers += 1;
            }
            out.push_str(line);
            out.push('\n');
        }
        (out, nameservers)
    };
    let (mut out, mut nameservers) = reachable(host);
    if nameservers == 0 {
        if let Some((upstream, n)) = systemd_resolved.map(reachable).filter(|(_, n)| *n > 0) {
            (out, nameservers) = (upstream, n);
        }
    }
    if nameservers == 0 {
        for ns in FALLBACK_NAMESERVERS {
            out.push_str(&format!("nameserver {ns}\n"));
        }
    }
    out
}

/// The container's /etc/hosts: localhost, and its hostname at its addresses.
fn hosts_file(hostname: &str, ips: &[IpAddr]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        for ip in ips {
            out.push_str(&format!("{ip}\t{hostname}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_bridge_network_parses_and_publishes_ports() {
        let list =
            NetworkList::parse(Path::new(DEFAULT_BRIDGE_FILE), DEFAULT_BRIDGE.as_bytes()).unwrap();
        assert_eq!(list.name, BRIDGE);
        assert!(list
            .plugins
            .iter()
            .any(|p| p["type"] == "portmap" && p["capabilities"]["portMappings"] == true));
    }

    #[test]
    fn bridge_is_written_when_missing_and_left_alone_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("cni");
        assert_eq!(find_network(&conf, BRIDGE).unwrap().name, BRIDGE);
        assert_eq!(
            std::fs::read_to_string(conf.join(DEFAULT_BRIDGE_FILE)).unwrap(),
            DEFAULT_BRIDGE
        );
        let names: Vec<_> = std::fs::read_dir(&conf).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
        std::fs::write(conf.join(DEFAULT_BRIDGE_FILE), "edited").unwrap();
        let other = r#"{"cniVersion":"1.0.0","name":"bridge","plugins":[{"type":"ptp"}]}"#;
        std::fs::write(conf.join("50-mine.conflist"), other).unwrap();
        assert_eq!(
            find_network(&conf, BRIDGE).unwrap().plugins[0]["type"],
            "ptp"
        );
        assert_eq!(
            std::fs::read_to_string(conf.join(DEFAULT_BRIDGE_FILE)).unwrap(),
            "edited"
        );
        assert!(find_network(&conf, "other").is_err());
    }

    #[test]
    fn publishing_without_a_network_is_refused() {
        let args = NetworkArgs {
            network: NONE.into(),
            publish: vec!["8080:80".parse().unwrap()],
        };
        let err = args.check().unwrap_err().to_string();
        assert!(err.contains("--network bridge"), "{err}");
    }

    #[test]
    fn resolv_conf_prefers_the_networks_dns() {
        let dns = cni::Dns {
            nameservers: vec!["10.90.0.1".into()],
            domain: "example".into(),
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&dns, "nameserver 1.1.1.1\n", None),
            "nameserver 10.90.0.1\nsearch example\n"
        );
    }

    #[test]
    fn resolv_conf_drops_loopback_nameservers_of_the_host() {
        let host = "search lan\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.1.1.1\noptions edns0\n";
        assert_eq!(
            resolv_conf(&cni::Dns::default(), host, None),
            "search lan\nnameserver 10.1.1.1\noptions edns0\n"
        );
        let stub = "nameserver 127.0.0.53\n";
        assert_eq!(
            resolv_conf(&cni::Dns::default(), stub, Some("nameserver 192.0.2.53\n")),
            "nameserver 192.0.2.53\n"
        );
        assert_eq!(
            resolv_conf(&cni::Dns::default(), stub, None),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
    }

    #[test]
    fn hosts_names_localhost_and_the_container() {
        assert_eq!(
            hosts_file("web", &[IpAddr::from([10, 90, 0, 2])]),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.90.0.2\tweb\n"
        );
    }

    #[test]
    fn none_gives_a_new_namespace_and_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec =
            super::super::bundle::spec("c", Path::new("/r"), &["sh".into()], false, None);
        let mounts = spec["mounts"].as_array().unwrap().len();
        apply(&mut spec, dir.path(), None).unwrap();
        let namespaces = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(namespaces.contains(&serde_json::json!({"type": "network"})));
        assert_eq!(spec["mounts"].as_array().unwrap().len(), mounts);
    }

    #[test]
    fn an_attached_network_is_named_and_its_files_bind_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec =
            super::super::bundle::spec("web", Path::new("/r"), &["sh".into()], false, None);
        let result = CniResult::parse(&serde_json::json!({
            "interfaces": [{"name": "eth0", "sandbox": "/run/kestrel/netns/x"}],
            "ips": [{"address": "10.90.0.7/24", "interface": 0}]
        }))
        .unwrap();
        let attached = Attached {
            netns: "/run/kestrel/netns/x".into(),
            result,
        };
        apply(&mut spec, dir.path(), Some(&attached)).unwrap();
        assert!(spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"type": "network", "path": "/run/kestrel/netns/x"})));
        let hosts = std::fs::read_to_string(dir.path().join("hosts")).unwrap();
        assert!(hosts.ends_with("10.90.0.7\tweb\n"), "{hosts}");
        let destinations: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(destinations, ["/etc/resolv.conf", "/etc/hosts"]);
    }
}
