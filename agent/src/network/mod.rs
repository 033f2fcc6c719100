//! The guest's network as the Kata agent API sets it up: UpdateInterface,
//! UpdateRoutes, ListInterfaces, ListRoutes and AddARPNeighbors over
//! rtnetlink, and the guest's `/etc/resolv.conf` and `/etc/hosts`.
//!
//! - [`request`]: Kata's messages checked into typed requests; a bad field
//!   fails the call before anything changes,
//! - [`netlink`]: the rtnetlink calls and the kernel's messages in Kata's
//!   shapes,
//! - [`dns`]: resolv.conf, hosts, and their bind mounts into containers.
//!
//! In host mode (the agent is not the guest's PID 1) every one of these
//! RPCs answers FAILED_PRECONDITION and touches nothing: the host's network
//! is not the agent's to change, nor to show. CreateSandbox's `dns` is then
//! checked and ignored, since Kata runtimes always send it.
//!
//! Calls are serialised: two UpdateRoutes interleaving their deletes and
//! adds would leave a table neither asked for.

pub mod dns;
mod netlink;
mod request;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kestrel_protocols::{oci, types};
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::LinkUnspec;

use crate::error::{Error, Result};
use netlink::Netlink;
use request::{InterfaceRequest, RouteRequest};

const HOST_MODE: &str =
    "the agent runs on the host (not as a guest's PID 1): it never changes the host's network";
/// How long UpdateInterface waits for a NIC to appear: a hot-plugged card
/// may still be probing when the runtime asks for it.
const LINK_WAIT: Duration = Duration::from_secs(2);
const LINK_POLL: Duration = Duration::from_millis(100);

enum Mode {
    Host,
    /// The guest's PID 1, writing resolv.conf and hosts under `etc`.
    Guest {
        etc: PathBuf,
    },
}

/// What `/etc/hosts` is made of; it is rewritten when either changes.
#[derive(Default)]
struct HostsFacts {
    hostname: String,
    /// The first address UpdateInterface gave, and the MAC of its link: a
    /// later update of the same link moves it, another link's does not.
    address: Option<(Vec<u8>, IpAddr)>,
}

pub struct Network {
    mode: Mode,
    busy: tokio::sync::Mutex<()>,
    hosts: std::sync::Mutex<HostsFacts>,
}

impl Network {
    /// The guest's network when `is_init`, else host mode's refusals.
    pub fn new(is_init: bool) -> Network {
        if is_init {
            Network::guest("/etc")
        } else {
            Network::host()
        }
    }

    /// Configures the network namespace of the calling thread and writes
    /// resolv.conf and hosts under `etc`.
    pub fn guest(etc: impl Into<PathBuf>) -> Network {
        Network::with_mode(Mode::Guest { etc: etc.into() })
    }

    pub fn host() -> Network {
        Network::with_mode(Mode::Host)
    }

    fn with_mode(mode: Mode) -> Network {
        Network {
            mode,
            busy: tokio::sync::Mutex::new(()),
            hosts: std::sync::Mutex::new(HostsFacts::default()),
        }
    }

    fn guest_etc(&self, method: &str) -> Result<&Path> {
        match &self.mode {
            Mode::Guest { etc } => Ok(etc),
            Mode::Host => Err(Error::FailedPrecondition(format!("{method}: {HOST_MODE}"))),
        }
    }

    /// CreateSandbox's hostname and dns: checked in either mode, written to
    /// the guest's resolv.conf (when any are given) and hosts as PID 1.
    pub fn configure_sandbox(&self, hostname: &str, dns: &[String]) -> Result<()> {
        let Mode::Guest { etc } = &self.mode else {
            if !dns.is_empty() {
                tracing::info!(entries = dns.len(), "host mode: ignoring CreateSandbox's dns; the host's resolv.conf is not the agent's");
            }
            return Ok(());
        };
        if !dns.is_empty() {
            dns::write(etc, dns::RESOLV_CONF, &dns::resolv_conf(dns))?;
        }
        let mut facts = self.hosts();
        facts.hostname = hostname.to_string();
        write_hosts(etc, &facts)
    }

    /// Checks CreateSandbox's hostname and dns before anything is set.
    pub fn check_sandbox(hostname: &str, dns: &[String]) -> Result<()> {
        dns::validate_hostname(hostname)?;
        dns::validate_dns(dns)
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HostsFacts> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `spec`, plus bind mounts of the guest's resolv.conf and hosts where
    /// the spec does not mount its own (host mode: `spec` unchanged).
    pub fn with_guest_files<'a>(&self, spec: &'a oci::Spec) -> Cow<'a, oci::Spec> {
        let Mode::Guest { etc } = &self.mode else {
            return Cow::Borrowed(spec);
        };
        let mounts = dns::guest_mounts(spec, etc);
        if mounts.is_empty() {
            return Cow::Borrowed(spec);
        }
        let mut spec = spec.clone();
        spec.Mounts.extend(mounts);
        Cow::Owned(spec)
    }

    /// Finds the link by `hwAddr`, renames it, sets its MTU and ARP flag,
    /// makes the given addresses its only ones (IPv6 link-local addresses
    /// are the kernel's and stay) and brings it up.
    pub async fn update_interface(
        &self,
        iface: Option<&types::Interface>,
    ) -> Result<types::Interface> {
        let etc = self.guest_etc("UpdateInterface")?;
        let iface = iface.ok_or_else(|| Error::invalid("UpdateInterface has no interface"))?;
        let req = request::interface(iface)?;
        let _busy = self.busy.lock().await;
        let nl = connect()?;
        let (link, links) = link_by_mac(&nl, &req.mac, &iface.hwAddr).await?;
        let index = link.header.index;
        apply_interface(&nl, &link, &links, &req).await?;
        let link = nl
            .link(index)
            .await
            .map_err(|e| kernel(format!("UpdateInterface: reading back link {index}"), e))?;
        let addresses = nl
            .addresses(Some(index))
            .await
            .map_err(|e| kernel("UpdateInterface: reading back addresses", e))?;
        let updated = netlink::interface(&link, &addresses);
        tracing::info!(name = %updated.name, hw_addr = %updated.hwAddr, addresses = req.addresses.len(), "interface updated");

        let mut facts = self.hosts();
        if facts
            .address
            .as_ref()
            .is_none_or(|(mac, _)| *mac == req.mac)
        {
            facts.address = req.addresses.first().map(|c| (req.mac.clone(), c.addr));
        }
        write_hosts(etc, &facts)?;
        Ok(updated)
    }

    /// Makes `routes` the main table's routes on the links they name:
    /// routes already there (but the kernel's own, which follow the links'
    /// addresses) are deleted, then the given ones added, those without a
    /// gateway first so that the gateways are reachable. A failure puts the
    /// links' previous routes back. Links the request does not name, and
    /// `lo`'s existing routes, are left alone.
    pub async fn update_routes(&self, routes: &[types::Route]) -> Result<Vec<types::Route>> {
        self.guest_etc("UpdateRoutes")?;
        let reqs = routes
            .iter()
            .enumerate()
            .map(|(n, r)| request::route(n, r))
            .collect::<Result<Vec<_>>>()?;
        let _busy = self.busy.lock().await;
        let nl = connect()?;
        let links = list_links(&nl, "UpdateRoutes").await?;
        let index_of: HashMap<&str, &LinkMessage> = links
            .iter()
            .filter_map(|l| netlink::link_name(l).map(|n| (n, l)))
            .collect();
        let mut planned = Vec::with_capacity(reqs.len());
        let mut managed = HashSet::new();
        for (n, r) in reqs.iter().enumerate() {
            let link = index_of.get(r.device.as_str()).ok_or_else(|| {
                Error::NotFound(format!(
                    "UpdateRoutes: Routes[{n}].device {:?} is no link of the guest",
                    r.device
                ))
            })?;
            if !netlink::is_loopback(link) {
                managed.insert(link.header.index);
            }
            planned.push((n, r, netlink::route_message(r, link.header.index)));
        }
        // Stable: each group keeps the request's order.
        planned.sort_by_key(|(_, r, _)| r.gateway.is_some());

        let before = nl
            .main_routes()
            .await
            .map_err(|e| kernel("UpdateRoutes: listing routes", e))?;
        let old: Vec<RouteMessage> = before
            .iter()
            .filter(|r| netlink::route_oif(r).is_some_and(|i| managed.contains(&i)))
            .map(netlink::restorable)
            .collect();
        for r in old
            .iter()
            .filter(|r| r.header.protocol != RouteProtocol::Kernel)
        {
            if let Err(e) = nl.del_route(r.clone()).await {
                // Gone already (ESRCH) is what we wanted.
                if netlink::errno(&e) != Some(libc::ESRCH) {
                    restore_routes(&nl, &[], &old).await;
                    return Err(kernel("UpdateRoutes: deleting an existing route", e));
                }
            }
        }
        let mut added = Vec::with_capacity(planned.len());
        for (n, r, message) in planned {
            if let Err(e) = nl.replace_route(message.clone()).await {
                restore_routes(&nl, &added, &old).await;
                return Err(kernel(
                    format!("UpdateRoutes: adding Routes[{n}] ({}); the links' previous routes were put back", describe(r)),
                    e,
                ));
            }
            added.push(message);
        }
        tracing::info!(
            routes = added.len(),
            links = managed.len(),
            "routes updated"
        );
        list_routes(&nl, "UpdateRoutes").await
    }

    pub async fn list_interfaces(&self) -> Result<Vec<types::Interface>> {
        self.guest_etc("ListInterfaces")?;
        let _busy = self.busy.lock().await;
        let nl = connect()?;
        let links = list_links(&nl, "ListInterfaces").await?;
        let addresses = nl
            .addresses(None)
            .await
            .map_err(|e| kernel("ListInterfaces: listing addresses", e))?;
        Ok(links
            .iter()
            .map(|l| netlink::interface(l, &addresses))
            .collect())
    }

    pub async fn list_routes(&self) -> Result<Vec<types::Route>> {
        self.guest_etc("ListRoutes")?;
        let _busy = self.busy.lock().await;
        let nl = connect()?;
        list_routes(&nl, "ListRoutes").await
    }

    /// `ip neigh replace` for each entry, permanent unless a state is
    /// given. Every entry is checked, and every device found, before the
    /// first is added; a kernel failure midway keeps the earlier entries
    /// (replacing is idempotent: the caller may simply retry).
    pub async fn add_arp_neighbors(&self, neighbors: &[types::ARPNeighbor]) -> Result<()> {
        self.guest_etc("AddARPNeighbors")?;
        let reqs = neighbors
            .iter()
            .enumerate()
            .map(|(n, a)| request::neighbor(n, a))
            .collect::<Result<Vec<_>>>()?;
        let _busy = self.busy.lock().await;
        let nl = connect()?;
        let links = list_links(&nl, "AddARPNeighbors").await?;
        let mut planned = Vec::with_capacity(reqs.len());
        for (n, r) in reqs.iter().enumerate() {
            let link = links
                .iter()
                .find(|l| netlink::link_name(l) == Some(r.device.as_str()))
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "AddARPNeighbors: ARPNeighbors[{n}].device {:?} is no link of the guest",
                        r.device
                    ))
                })?;
            planned.push((n, r, link.header.index));
        }
        for (n, r, index) in planned {
            nl.replace_neighbour(index, r).await.map_err(|e| {
                kernel(
                    format!(
                        "AddARPNeighbors: ARPNeighbors[{n}] ({} on {})",
                        r.ip, r.device
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }
}

fn connect() -> Result<Netlink> {
    Netlink::connect().map_err(|e| Error::internal("opening a netlink socket", e))
}

/// A kernel refusal, classified by its errno: what the request asked for
/// is invalid, missing or already there, or the guest failed.
fn kernel(context: impl Display, e: rtnetlink::Error) -> Error {
    let message = format!("{context}: {e}");
    match netlink::errno(&e) {
        Some(
            libc::EINVAL
            | libc::ERANGE
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            | libc::EADDRNOTAVAIL
            | libc::EAFNOSUPPORT,
        ) => Error::InvalidArgument(message),
        Some(libc::ENODEV | libc::ENOENT | libc::ESRCH) => Error::NotFound(message),
        Some(libc::EEXIST) => Error::AlreadyExists(message),
        _ => Error::Internal(message),
    }
}

fn write_hosts(etc: &Path, facts: &HostsFacts) -> Result<()> {
    let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
    let content = dns::hosts(
        &facts.hostname,
        facts.address.as_ref().map(|(_, a)| *a),
        ipv6,
    );
    dns::write(etc, dns::HOSTS, &content)
}

async fn list_links(nl: &Netlink, method: &str) -> Result<Vec<LinkMessage>> {
    let mut links = nl
        .links()
        .await
        .map_err(|e| kernel(format!("{method}: listing links"), e))?;
    links.sort_by_key(|l| l.header.index);
    Ok(links)
}

async fn list_routes(nl: &Netlink, method: &str) -> Result<Vec<types::Route>> {
    let names: HashMap<u32, String> = list_links(nl, method)
        .await?
        .iter()
        .filter_map(|l| Some((l.header.index, netlink::link_name(l)?.to_string())))
        .collect();
    let routes = nl
        .main_routes()
        .await
        .map_err(|e| kernel(format!("{method}: listing routes"), e))?;
    Ok(routes.iter().map(|r| netlink::route(r, &names)).collect())
}

/// The link whose MAC is `mac`, and every link, waiting up to
/// [`LINK_WAIT`] for it to appear.
async fn link_by_mac(
    nl: &Netlink,
    mac: &[u8],
    written: &str,
) -> Result<(LinkMessage, Vec<LinkMessage>)> {
    let deadline = tokio::time::Instant::now() + LINK_WAIT;
    loop {
        let links = list_links(nl, "UpdateInterface").await?;
        if let Some(link) = links.iter().find(|l| netlink::link_mac(l) == Some(mac)) {
            return Ok((link.clone(), links));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotFound(format!(
                "UpdateInterface: no link of the guest has hwAddr {written} (waited {LINK_WAIT:?} for it to appear)"
            )));
        }
        tokio::time::sleep(LINK_POLL).await;
    }
}

async fn set_link(nl: &Netlink, message: LinkMessage, what: String) -> Result<()> {
    nl.set_link(message)
        .await
        .map_err(|e| kernel(format!("UpdateInterface: {what}"), e))
}

async fn apply_interface(
    nl: &Netlink,
    link: &LinkMessage,
    links: &[LinkMessage],
    req: &InterfaceRequest,
) -> Result<()> {
    let index = link.header.index;
    let current = netlink::link_name(link).unwrap_or_default().to_string();
    if let Some(name) = req.name.as_ref().filter(|n| **n != current) {
        // The kernel renames only links that are down. A link already
        // called `name` (the guest kernel numbers NICs in probe order, not
        // the host's) trades names with this one, as in Kata.
        let holder = links
            .iter()
            .find(|l| l.header.index != index && netlink::link_name(l) == Some(name.as_str()));
        set_link(
            nl,
            LinkUnspec::new_with_index(index).down().build(),
            format!("setting {current} down to rename it"),
        )
        .await?;
        if let Some(h) = holder {
            let temporary = format!("kestrel{}", h.header.index);
            let m = LinkUnspec::new_with_index(h.header.index)
                .down()
                .name(temporary)
                .build();
            set_link(nl, m, format!("moving {name} out of the way")).await?;
        }
        let m = LinkUnspec::new_with_index(index).name(name.clone()).build();
        set_link(nl, m, format!("renaming {current} to {name}")).await?;
        if let Some(h) = holder {
            let mut m = LinkUnspec::new_with_index(h.header.index).name(current.clone());
            if netlink::is_up(h) {
                m = m.up();
            }
            set_link(
                nl,
                m.build(),
                format!("renaming the former {name} to {current}"),
            )
            .await?;
        }
    }
    let mut m = LinkUnspec::new_with_index(index).arp(req.arp);
    if let Some(mtu) = req.mtu {
        m = m.mtu(mtu);
    }
    set_link(
        nl,
        m.build(),
        format!(
            "setting MTU {:?} and arp {} on link {index}",
            req.mtu, req.arp
        ),
    )
    .await?;

    let have = nl
        .addresses(Some(index))
        .await
        .map_err(|e| kernel("UpdateInterface: listing addresses", e))?;
    for a in have {
        let Some(cidr) = netlink::address_cidr(&a) else {
            continue;
        };
        if !req.addresses.contains(&cidr) && !netlink::is_kernel_managed(&cidr) {
            nl.del_address(a)
                .await
                .map_err(|e| kernel(format!("UpdateInterface: removing address {cidr}"), e))?;
        }
    }
    for cidr in &req.addresses {
        nl.add_address(index, *cidr)
            .await
            .map_err(|e| kernel(format!("UpdateInterface: adding address {cidr}"), e))?;
    }
    set_link(
        nl,
        LinkUnspec::new_with_index(index).up().build(),
        format!("bringing link {index} up"),
    )
    .await
}

/// Undoes a failed UpdateRoutes: deletes what it added, then puts back
/// the links' routes as they were. Best effort: what fails is logged.
async fn restore_routes(nl: &Netlink, added: &[RouteMessage], old: &[RouteMessage]) {
    for r in added {
        if let Err(e) = nl.del_route(r.clone()).await {
            tracing::warn!(error = %e, "UpdateRoutes rollback: deleting an added route");
        }
    }
    for r in old {
        if let Err(e) = nl.replace_route(r.clone()).await {
            tracing::warn!(error = %e, "UpdateRoutes rollback: restoring a route");
        }
    }
}

fn describe(r: &RouteRequest) -> String {
    let mut s = format!("{} dev {}", r.dest, r.device);
    if let Some(gw) = r.gateway {
        s = format!("{} via {gw} dev {}", r.dest, r.device);
    }
    s
}

#[cfg(test)]
mod tests;
