//! The guest's `/etc/resolv.conf` and `/etc/hosts`, and the bind mounts
//! that show them to containers which do not bring their own.
//!
//! The agent is `/init` of an initramfs that has no `/etc` of its own, so
//! the directory is created on first write. Files are rewritten in place,
//! not replaced by a rename: containers see them through bind mounts of
//! the inode, and a rename would leave them with the old one.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use kestrel_protocols::oci;

use crate::error::{Error, Result};

pub const RESOLV_CONF: &str = "resolv.conf";
pub const HOSTS: &str = "hosts";
/// Where Debian-style systems put the host's own name when it has no
/// address of its own yet.
const NO_ADDRESS_YET: &str = "127.0.1.1";

/// Refuses `CreateSandbox.dns` entries that would add lines of their own.
pub fn validate_dns(dns: &[String]) -> Result<()> {
    for (n, line) in dns.iter().enumerate() {
        if line.contains(['\n', '\r', '\0']) {
            return Err(Error::invalid(format!(
                "CreateSandbox: dns[{n}] {line:?} spans lines; each entry is one resolv.conf line"
            )));
        }
    }
    Ok(())
}

/// Refuses a hostname that could not stand as one word of `/etc/hosts`.
pub fn validate_hostname(hostname: &str) -> Result<()> {
    // HOST_NAME_MAX
    if hostname.len() > 64
        || hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(Error::invalid(format!(
            "CreateSandbox: hostname {hostname:?} is not a host name (at most 64 bytes, no spaces, control characters or '#')"
        )));
    }
    Ok(())
}

/// The lines of `CreateSandbox.dns`, one per line, as Kata writes them.
pub fn resolv_conf(dns: &[String]) -> String {
    dns.iter().map(|l| format!("{l}\n")).collect()
}

/// `localhost` on the loopback addresses, and `hostname` on the pod's
/// address once UpdateInterface gave one (127.0.1.1 until then).
pub fn hosts(hostname: &str, address: Option<IpAddr>, ipv6: bool) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n");
    if ipv6 {
        out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
    }
    if !hostname.is_empty() {
        let address = address.map_or_else(|| NO_ADDRESS_YET.to_string(), |a| a.to_string());
        out.push_str(&format!("{address}\t{hostname}\n"));
    }
    out
}

/// Writes `etc/name`, creating `etc` if the guest has none yet.
pub fn write(etc: &Path, name: &str, content: &str) -> Result<()> {
    fs::create_dir_all(etc)
        .map_err(|e| Error::internal(format!("creating {}", etc.display()), e))?;
    let path = etc.join(name);
    fs::write(&path, content).map_err(|e| Error::internal(format!("writing {}", path.display()), e))
}

/// The bind mounts that give a container the guest's resolv.conf and
/// hosts: one for each file the guest has and the spec does not mount
/// itself. Read-write and shared by the pod, as Kubernetes mounts them.
pub fn guest_mounts(spec: &oci::Spec, etc: &Path) -> Vec<oci::Mount> {
    [RESOLV_CONF, HOSTS]
        .into_iter()
        .filter_map(|name| {
            let destination = format!("/etc/{name}");
            let mounted = spec
                .Mounts
                .iter()
                .any(|m| Path::new(&m.destination) == Path::new(&destination));
            let source = etc.join(name);
            (!mounted && source.is_file()).then(|| {
                let mut m = oci::Mount::new();
                m.destination = destination;
                m.source = source.to_string_lossy().into_owned();
                m.type_ = "bind".into();
                m.options = vec!["rbind".into(), "rprivate".into()];
                m
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_entries_become_resolv_conf_lines() {
        let dns = [
            "nameserver 10.96.0.10".to_string(),
            "search default.svc.cluster.local svc.cluster.local".to_string(),
            "options ndots:5".to_string(),
        ];
        validate_dns(&dns).unwrap();
        assert_eq!(
            resolv_conf(&dns),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn a_dns_entry_with_a_newline_is_refused() {
        let dns = [
            "nameserver 1.1.1.1".to_string(),
            "nameserver 8.8.8.8\nnameserver 6.6.6.6".to_string(),
        ];
        match validate_dns(&dns) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("dns[1]"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hosts_names_the_sandbox_on_its_address_or_127_0_1_1() {
        assert_eq!(
            hosts("pod-a", None, false),
            "127.0.0.1\tlocalhost\n127.0.1.1\tpod-a\n"
        );
        assert_eq!(
            hosts("pod-a", Some("10.88.0.5".parse().unwrap()), true),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.88.0.5\tpod-a\n"
        );
        assert_eq!(hosts("", None, false), "127.0.0.1\tlocalhost\n");
    }

    #[test]
    fn hostnames_that_would_break_hosts_are_refused() {
        assert!(validate_hostname("pod-a.example").is_ok());
        assert!(validate_hostname("").is_ok());
        for bad in ["a b", "a\nb", "a#b", &"x".repeat(65)] {
            assert!(
                matches!(validate_hostname(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn files_are_written_in_place_under_a_created_etc() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        write(&etc, HOSTS, "one\n").unwrap();
        let file = fs::File::open(etc.join(HOSTS)).unwrap();
        write(&etc, HOSTS, "two\n").unwrap();
        // The same inode shows the new content: bind mounts of it follow.
        use std::io::Read;
        let mut seen = String::new();
        (&file).read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "two\n");
    }

    #[test]
    fn containers_get_the_guest_files_they_do_not_mount_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = oci::Spec::new();
        assert!(
            guest_mounts(&spec, dir.path()).is_empty(),
            "no guest files yet"
        );
        write(dir.path(), RESOLV_CONF, "nameserver 10.0.0.1\n").unwrap();
        write(dir.path(), HOSTS, "127.0.0.1\tlocalhost\n").unwrap();
        let mounts = guest_mounts(&spec, dir.path());
        let dests: Vec<_> = mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(dests, ["/etc/resolv.conf", "/etc/hosts"]);
        assert_eq!(
            mounts[0].source,
            dir.path().join(RESOLV_CONF).to_str().unwrap()
        );

        let mut own = oci::Mount::new();
        own.destination = "/etc/resolv.conf".into();
        own.source = "/run/kestrel/shared/c1-resolv.conf".into();
        spec.Mounts.push(own);
        let dests: Vec<_> = guest_mounts(&spec, dir.path())
            .into_iter()
            .map(|m| m.destination)
            .collect();
        assert_eq!(dests, ["/etc/hosts"]);
    }
}
