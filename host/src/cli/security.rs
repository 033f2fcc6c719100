//! The lock-down flags of `kestrel run`, with docker's and nerdctl's
//! meaning: a container starts with containerd's default capability set
//! and containerd's default seccomp profile (nerdctl's default too);
//! `--cap-add`/`--cap-drop` change the set, `--security-opt seccomp=…`
//! replaces or removes the profile, `--read-only` makes the rootfs
//! read-only. The agent in the guest enforces all of it.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use caps::Capability;
use clap::Args;
use serde_json::{json, Value};

use super::seccomp_profile::default_profile;

/// containerd's (and docker's) default capabilities, in containerd's order.
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[derive(Args, Debug, Default)]
pub struct SecurityArgs {
    /// Add a Linux capability to the default set (CHOWN or CAP_CHOWN; ALL
    /// for every capability). Repeatable.
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a Linux capability from the default set (ALL for every one;
    /// `--cap-drop ALL --cap-add X` leaves only X). Repeatable.
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// `seccomp=PATH` (a file holding an OCI `linux.seccomp` profile) or
    /// `seccomp=unconfined`; without it containerd's default profile applies,
    /// as with nerdctl.
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
}

/// What `--security-opt seccomp=` asked for.
#[derive(Debug, PartialEq)]
enum Seccomp {
    Default,
    Unconfined,
    Profile(Value),
}

impl SecurityArgs {
    /// Sets the capabilities, seccomp profile and read-only root of `spec`
    /// (a `config.json` value from `bundle::spec`).
    pub fn apply(&self, spec: &mut Value) -> Result<()> {
        let caps = self.capabilities()?;
        spec["process"]["capabilities"] = json!({
            "bounding": caps,
            "effective": caps,
            "permitted": caps,
        });
        match self.seccomp()? {
            Seccomp::Default => spec["linux"]["seccomp"] = default_profile(&caps),
            Seccomp::Unconfined => {}
            Seccomp::Profile(profile) => spec["linux"]["seccomp"] = profile,
        }
        if self.read_only {
            spec["root"]["readonly"] = json!(true);
        }
        Ok(())
    }

    /// The capability set, docker's way: ALL in `--cap-add` starts from
    /// every capability, ALL in `--cap-drop` from none, otherwise from the
    /// defaults; then drops, then adds.
    fn capabilities(&self) -> Result<Vec<String>> {
        let add = normalize(&self.cap_add, "--cap-add")?;
        let drop = normalize(&self.cap_drop, "--cap-drop")?;
        let all = |list: &[String]| list.iter().any(|c| c == "ALL");
        let mut set: Vec<String> = if all(&add) {
            let mut every: Vec<_> = caps::all().into_iter().collect();
            every.sort_by_key(|c| c.index());
            every.iter().map(|c| c.to_string()).collect()
        } else if all(&drop) {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
        };
        set.retain(|c| !drop.contains(c));
        for c in add.into_iter().filter(|c| c != "ALL") {
            if !set.contains(&c) {
                set.push(c);
            }
        }
        Ok(set)
    }

    fn seccomp(&self) -> Result<Seccomp> {
        let mut choice = Seccomp::Default;
        for opt in &self.security_opt {
            let Some(value) = opt.strip_prefix("seccomp=") else {
                bail!(
                    "--security-opt {opt}: not supported (only seccomp=PATH|unconfined; \
                     the guest enforces no AppArmor or SELinux)"
                );
            };
            choice = match value {
                "unconfined" => Seccomp::Unconfined,
                path => Seccomp::Profile(load_profile(Path::new(path))?),
            };
        }
        Ok(choice)
    }
}

/// `chown`, `CHOWN`, `cap_chown` → `CAP_CHOWN`; refuses unknown names.
fn normalize(names: &[String], flag: &str) -> Result<Vec<String>> {
    names
        .iter()
        .map(|name| {
            let upper = name.to_ascii_uppercase();
            if upper == "ALL" {
                return Ok(upper);
            }
            let full = if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            };
            Capability::from_str(&full)
                .map(|c| c.to_string())
                .map_err(|_| anyhow::anyhow!("{flag} {name}: unknown capability"))
        })
        .collect()
}

/// Reads an OCI `linux.seccomp` profile and checks it parses as one, so a
/// mistake is reported here rather than by the shim.
fn load_profile(path: &Path) -> Result<Value> {
    let text = std::fs::read(path)
        .with_context(|| format!("--security-opt seccomp={}", path.display()))?;
    let value: Value = serde_json::from_slice(&text)
        .with_context(|| format!("--security-opt seccomp={}: not JSON", path.display()))?;
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(value.clone()).with_context(
        || {
            format!(
                "--security-opt seccomp={}: not an OCI linux.seccomp profile",
                path.display()
            )
        },
    )?;
    Ok(value)
}

/// Gives an exec's process the capabilities and no_new_privs of the
/// container's own process (from the bundle's `config.json`), as nerdctl
/// and `ctr task exec` do: an exec must not get more than its container.
pub fn inherit_from_container(process: &mut Value, bundle_dir: &Path) -> Result<()> {
    let path = bundle_dir.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec: Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    for key in ["capabilities", "noNewPrivileges"] {
        if let Some(v) = spec["process"].get(key) {
            process[key] = v.clone();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(add: &[&str], drop: &[&str], opts: &[&str]) -> SecurityArgs {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        SecurityArgs {
            cap_add: v(add),
            cap_drop: v(drop),
            security_opt: v(opts),
            read_only: false,
        }
    }

    #[test]
    fn defaults_are_containerds_capabilities() {
        assert_eq!(
            args(&[], &[], &[]).capabilities().unwrap(),
            DEFAULT_CAPABILITIES
        );
    }

    #[test]
    fn drop_all_leaves_only_what_is_added() {
        assert!(args(&[], &["ALL"], &[]).capabilities().unwrap().is_empty());
        assert_eq!(
            args(&["net_admin"], &["all"], &[]).capabilities().unwrap(),
            ["CAP_NET_ADMIN"]
        );
    }

    #[test]
    fn add_all_gives_every_capability_but_the_dropped() {
        let set = args(&["ALL"], &["SYS_ADMIN"], &[]).capabilities().unwrap();
        assert_eq!(set.len(), caps::all().len() - 1);
        assert!(!set.contains(&"CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn drop_then_add_by_either_spelling() {
        let set = args(&["CAP_SYS_ADMIN"], &["chown"], &[])
            .capabilities()
            .unwrap();
        assert!(!set.contains(&"CAP_CHOWN".to_string()));
        assert_eq!(set.last().unwrap(), "CAP_SYS_ADMIN");
    }

    #[test]
    fn unknown_capability_is_refused_naming_the_flag() {
        let err = args(&["FLY"], &[], &[]).capabilities().unwrap_err();
        assert_eq!(err.to_string(), "--cap-add FLY: unknown capability");
    }

    #[test]
    fn seccomp_options() {
        assert_eq!(args(&[], &[], &[]).seccomp().unwrap(), Seccomp::Default);
        assert_eq!(
            args(&[], &[], &["seccomp=unconfined"]).seccomp().unwrap(),
            Seccomp::Unconfined
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let profile = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
        std::fs::write(&path, profile.to_string()).unwrap();
        let opt = format!("seccomp={}", path.display());
        assert_eq!(
            args(&[], &[], &[&opt]).seccomp().unwrap(),
            Seccomp::Profile(profile)
        );
        std::fs::write(&path, r#"{"syscalls": 3}"#).unwrap();
        let err = args(&[], &[], &[&opt]).seccomp().unwrap_err();
        assert!(format!("{err:#}").contains("not an OCI linux.seccomp profile"));
        let err = args(&[], &[], &["apparmor=unconfined"])
            .seccomp()
            .unwrap_err();
        assert!(err.to_string().contains("not supported"));
    }

    #[test]
    fn apply_sets_capabilities_profile_and_read_only_root() {
        let mut spec = json!({"process": {}, "root": {"path": "/r"}, "linux": {}});
        let mut a = args(&[], &["ALL"], &[]);
        a.read_only = true;
        a.apply(&mut spec).unwrap();
        assert_eq!(spec["process"]["capabilities"]["bounding"], json!([]));
        assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(spec["root"]["readonly"], true);

        let mut spec = json!({"process": {}, "root": {"path": "/r"}, "linux": {}});
        args(&[], &[], &["seccomp=unconfined"])
            .apply(&mut spec)
            .unwrap();
        assert!(spec["linux"].get("seccomp").is_none());
    }

    #[test]
    fn exec_inherits_the_containers_capabilities_and_no_new_privileges() {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({"process": {"noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_KILL"]}}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        let mut process = json!({"args": ["sh"]});
        inherit_from_container(&mut process, dir.path()).unwrap();
        assert_eq!(process["capabilities"]["bounding"], json!(["CAP_KILL"]));
        assert_eq!(process["noNewPrivileges"], true);
    }
}
