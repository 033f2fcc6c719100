//! A pod's network for a VM, the way Kata's default `tcfilter` model does
//! it: the CNI plugin made an interface (a veth) in the pod's network
//! namespace; beside each one we create a tap, and tc filters on both
//! ingresses redirect every frame from one to the other. The guest's
//! virtio-net card sits on the tap and carries the interface's MAC and
//! addresses, so to the rest of the pod's network the VM *is* the veth.
//!
//! [`attach`] sets it up and says what the agent must configure in the
//! guest; [`detach`] undoes it, also for a sandbox whose runtime is gone.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use kestrel_hypervisor::GuestNic;
use kestrel_protocols::types::{ARPNeighbor, IPAddress, IPFamily, Interface, Route};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::tap;

/// The taps we make are `tap<N>_kestrel`: [`detach`] knows them by name.
const TAP_SUFFIX: &str = "_kestrel";
/// `ETH_P_ALL`: the filters match every frame. tc takes the protocol in
/// network byte order (`tc … protocol all` sends `htons(ETH_P_ALL)`).
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The kernel's main routing table.
const RT_TABLE_MAIN: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the pod's network namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {name} in the pod's network namespace cannot be mirrored into the VM: {why}"
    )]
    Unmirrorable { name: String, why: String },
    #[error("{what} in the pod's network namespace: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("creating the tap {name} in the pod's network namespace: {source}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// What [`attach`] set up: the taps for the VMM and what the agent must
/// configure in the guest, in Kata's message shapes.
#[derive(Debug, Default)]
pub struct PodNetwork {
    pub nics: Vec<GuestNic>,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<ARPNeighbor>,
}

/// Mirrors every interface of the network namespace `netns` (but `lo`) to a
/// new tap for the VM. An interface that cannot be mirrored (no Ethernet
/// address) fails the whole call before anything is created; a failure
/// midway undoes what was made.
pub fn attach(netns: &Path) -> Result<PodNetwork, NetworkError> {
    in_netns(netns, |handle| async move {
        match attach_in(&handle).await {
            Ok(network) => Ok(network),
            Err(e) => {
                if let Err(undo) = detach_in(&handle).await {
                    tracing::warn!(error = %undo, "undoing a half-made pod network");
                }
                Err(e)
            }
        }
    })
}

/// Removes what [`attach`] made in `netns`: our taps, and the ingress
/// qdiscs (with their filters) on the pod's interfaces. Idempotent; a
/// namespace that no longer exists has nothing left to remove.
pub fn detach(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, |handle| async move { detach_in(&handle).await })
}

/// Runs `work` with a netlink handle inside the network namespace at
/// `path`, on a thread of its own: no other thread's namespace changes.
fn in_netns<T, F, Fut>(path: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let ns_err = {
        let path = path.to_path_buf();
        move |source: std::io::Error| NetworkError::Namespace {
            path: path.clone(),
            source,
        }
    };
    let file = std::fs::File::open(path).map_err(ns_err.clone())?;
    let thread_err = ns_err.clone();
    std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(std::io::Error::from(e)))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ns_err.clone())?;
            runtime.block_on(async move {
                // The socket belongs to the namespace it is made in: this one.
                let (connection, handle, _) = rtnetlink::new_connection().map_err(ns_err)?;
                tokio::spawn(connection);
                work(handle).await
            })
        })
        .map_err(thread_err.clone())?
        .join()
        .unwrap_or_else(|_| {
            Err(thread_err(std::io::Error::other(
                "the thread working in it panicked",
            )))
        })
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// One interface of the pod that the guest gets a card for.
struct PodLink {
    index: u32,
    name: String,
    mac: [u8; 6],
    mtu: u32,
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", link.header.index))
}

fn is_our_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with(TAP_SUFFIX)
}

/// The interface `link` stands for, or why it cannot be mirrored.
fn pod_link(link: &LinkMessage) -> Result<PodLink, NetworkError> {
    let name = link_name(link);
    let unmirrorable = |why: String| NetworkError::Unmirrorable {
        name: name.clone(),
        why,
    };
    if link.header.link_layer_type != LinkLayerType::Ether {
        return Err(unmirrorable(format!(
            "it is not an Ethernet interface (link type {:?}); only Ethernet frames can be \
             mirrored to a virtio-net card",
            link.header.link_layer_type
        )));
    }
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| unmirrorable("it has no 6-byte MAC address".into()))?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(1500);
    Ok(PodLink {
        index: link.header.index,
        name,
        mac,
        mtu,
    })
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing interfaces"))
}

/// The interfaces the guest gets cards for: all but loopback and our taps.
async fn pod_links(handle: &Handle) -> Result<Vec<PodLink>, NetworkError> {
    links(handle)
        .await?
        .iter()
        .filter(|l| l.header.link_layer_type != LinkLayerType::Loopback)
        .filter(|l| !is_our_tap(&link_name(l)))
        .map(pod_link)
        .collect()
}

async fn attach_in(handle: &Handle) -> Result<PodNetwork, NetworkError> {
    // Every interface is checked before the first tap is made.
    let links = pod_links(handle).await?;
    let mut network = PodNetwork::default();
    for (i, link) in links.iter().enumerate() {
        let tap_name = format!("tap{i}{TAP_SUFFIX}");
        let tap = tap::create(&tap_name).map_err(|source| NetworkError::Tap {
            name: tap_name.clone(),
            source,
        })?;
        let tap_index = links_named(handle, &tap_name).await?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap_index)
                    .mtu(link.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("bringing {tap_name} up")))?;
        mirror(handle, link.index, &link.name, tap_index, &tap_name).await?;
        network.nics.push(GuestNic {
            tap: Arc::new(tap),
            mac: link.mac,
            mtu: link.mtu,
            offload: true,
        });
        network
            .interfaces
            .push(interface(link, addresses(handle, link).await?));
        network.routes.extend(routes(handle, link).await?);
        network.neighbors.extend(neighbors(handle, link).await?);
    }
    Ok(network)
}

async fn links_named(handle: &Handle, name: &str) -> Result<u32, NetworkError> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(netlink(format!("finding {name}")))?;
    link.map(|l| l.header.index)
        .ok_or_else(|| NetworkError::Tap {
            name: name.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not there once created"),
        })
}

/// Redirects every frame arriving on either interface out of the other.
async fn mirror(
    handle: &Handle,
    link: u32,
    link_name: &str,
    tap: u32,
    tap_name: &str,
) -> Result<(), NetworkError> {
    for (from, from_name, to) in [(link, link_name, tap), (tap, tap_name, link)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink(format!("adding an ingress qdisc to {from_name}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL.to_be())
            .redirect(to)
            .map_err(netlink("building a redirect filter"))?
            .execute()
            .await
            .map_err(netlink(format!("redirecting {from_name}'s frames")))?;
    }
    Ok(())
}

/// Whether the guest can take `ip`: it has IPv4 only, and a link-local
/// IPv6 address it makes itself.
fn guest_takes(ip: &IpAddr) -> bool {
    ip.is_ipv4()
}

async fn addresses(handle: &Handle, link: &PodLink) -> Result<Vec<IPAddress>, NetworkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing {}'s addresses", link.name)))?;
    let mut out = Vec::new();
    for message in messages {
        let Some(ip) = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        }) else {
            continue;
        };
        if !guest_takes(&ip) {
            if !is_link_local(&ip) {
                tracing::warn!(interface = %link.name, %ip, "the guest has no IPv6: address left out");
            }
            continue;
        }
        out.push(ip_address(ip, message.header.prefix_len));
    }
    Ok(out)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn family(ip: &IpAddr) -> IPFamily {
    if ip.is_ipv4() {
        IPFamily::v4
    } else {
        IPFamily::v6
    }
}

fn ip_address(ip: IpAddr, prefix: u8) -> IPAddress {
    IPAddress {
        family: family(&ip).into(),
        address: ip.to_string(),
        mask: prefix.to_string(),
        ..Default::default()
    }
}

fn interface(link: &PodLink, addresses: Vec<IPAddress>) -> Interface {
    Interface {
        device: link.name.clone(),
        name: link.name.clone(),
        IPAddresses: addresses,
        mtu: link.mtu.into(),
        hwAddr: mac_string(&link.mac),
        ..Default::default()
    }
}

fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The main table's IPv4 routes out of `link`, as Kata sends them: the
/// destination as CIDR ("" for the default route), gateway, source, scope.
async fn routes(handle: &Handle, link: &PodLink) -> Result<Vec<Route>, NetworkError> {
    let messages: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing routes"))?;
    Ok(messages
        .iter()
        .filter(|m| route_table(m) == RT_TABLE_MAIN)
        .filter(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == link.index))
        })
        .map(|m| route(m, &link.name))
        .collect())
}

fn route_table(message: &RouteMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(message.header.table.into())
}

fn route(message: &RouteMessage, device: &str) -> Route {
    let ip_of = |want: fn(&RouteAttribute) -> Option<&RouteAddress>| {
        message
            .attributes
            .iter()
            .find_map(want)
            .and_then(route_ip)
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    };
    let destination = ip_of(|a| match a {
        RouteAttribute::Destination(d) => Some(d),
        _ => None,
    });
    let dest = if destination.is_empty() {
        String::new()
    } else {
        format!("{destination}/{}", message.header.destination_prefix_length)
    };
    Route {
        dest,
        gateway: ip_of(|a| match a {
            RouteAttribute::Gateway(g) => Some(g),
            _ => None,
        }),
        device: device.into(),
        source: ip_of(|a| match a {
            RouteAttribute::PrefSource(s) => Some(s),
            _ => None,
        }),
        scope: u8::from(message.header.scope).into(),
        family: IPFamily::v4.into(),
        flags: message.header.flags.bits(),
        ..Default::default()
    }
}

/// The permanent IPv4 neighbours on `link` (a CNI plugin may pin some).
async fn neighbors(handle: &Handle, link: &PodLink) -> Result<Vec<ARPNeighbor>, NetworkError> {
    let messages: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing neighbours"))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.ifindex == link.index && m.header.state == NeighbourState::Permanent)
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            let lladdr = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(mac) => Some(mac_string(mac)),
                _ => None,
            })?;
            Some(ARPNeighbor {
                toIPAddress: Some(ip_address(IpAddr::V4(ip), 32)).into(),
                device: link.name.clone(),
                lladdr,
                state: i32::from(u16::from(NeighbourState::Permanent)),
                ..Default::default()
            })
        })
        .collect())
}

async fn detach_in(handle: &Handle) -> Result<(), NetworkError> {
    for link in links(handle).await? {
        let name = link_name(&link);
        if link.header.link_layer_type == LinkLayerType::Loopback {
            continue;
        }
        if is_our_tap(&name) {
            match handle.link().del(link.header.index).execute().await {
                Ok(()) => {}
                // Gone meanwhile with the last descriptor on it.
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(netlink(format!("deleting {name}"))(e)),
            }
            continue;
        }
        // The mirror's qdisc and filters: the runtime owns the ingress of
        // the pod's interfaces, as Kata's tcfilter model does.
        let mut del = handle.qdisc().del(link.header.index as i32);
        del.message_mut().header.parent = INGRESS_PARENT.into();
        match del.execute().await {
            Ok(()) => {}
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(netlink(format!("removing {name}'s ingress qdisc"))(e)),
        }
    }
    Ok(())
}

/// Whether a netlink error says there was nothing to delete.
fn is_gone(error: &rtnetlink::Error) -> bool {
    match error {
        rtnetlink::Error::NetlinkError(message) => matches!(
            message.raw_code().abs(),
            libc::ENOENT | libc::ENODEV | libc::EINVAL
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn taps_are_known_by_name() {
        assert!(is_our_tap("tap0_kestrel"));
        assert!(is_our_tap("tap12_kestrel"));
        assert!(!is_our_tap("eth0"));
        assert!(!is_our_tap("tap0_kata"));
        assert!(format!("tap99{TAP_SUFFIX}").len() <= tap::MAX_NAME_LEN);
    }

    #[test]
    fn macs_print_as_every_vmm_reads_them() {
        assert_eq!(
            mac_string(&[0x02, 0x42, 0xac, 0x11, 0x00, 0x0a]),
            "02:42:ac:11:00:0a"
        );
    }

    #[test]
    fn only_ipv4_reaches_the_guest() {
        assert!(guest_takes(&"10.1.2.3".parse().unwrap()));
        assert!(!guest_takes(&"fd00::1".parse().unwrap()));
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local(&IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    /// A network namespace of the test's own (`ip netns`), removed on drop.
    struct TestNetns(String);

    impl TestNetns {
        fn new(tag: &str) -> Option<TestNetns> {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipped: needs root to make network namespaces");
                return None;
            }
            let name = format!("kestrel-tc-{tag}-{}", std::process::id());
            ip(&["netns", "add", &name]);
            Some(TestNetns(name))
        }

        fn path(&self) -> PathBuf {
            Path::new("/run/netns").join(&self.0)
        }

        fn ip(&self, args: &str) -> String {
            let mut all = vec!["-n", &self.0];
            all.extend(args.split_whitespace());
            ip(&all)
        }

        fn tc(&self, args: &str) -> String {
            let mut all = vec!["-n", &self.0];
            all.extend(args.split_whitespace());
            run("tc", &all)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) -> String {
        run("ip", args)
    }

    fn run(program: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A pod namespace as the CNI bridge plugin leaves it: a veth with an
    /// address, a default route and a pinned neighbour; the veth's peer in
    /// a second namespace.
    fn pod(tag: &str) -> Option<(TestNetns, TestNetns)> {
        let pod = TestNetns::new(tag)?;
        let peer = TestNetns::new(&format!("{tag}p"))?;
        pod.ip("link add eth0 type veth peer name peer0");
        pod.ip(&format!("link set peer0 netns {}", peer.0));
        pod.ip("link set eth0 mtu 1400 up");
        pod.ip("addr add 10.99.7.2/24 dev eth0");
        pod.ip("route add default via 10.99.7.1");
        pod.ip("neigh add 10.99.7.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent");
        Some((pod, peer))
    }

    #[test]
    fn attach_mirrors_each_interface_and_detach_removes_it_all() {
        let Some((pod, _peer)) = pod("ok") else {
            return;
        };
        let mac = pod.ip("-o link show eth0");
        let network = attach(&pod.path()).unwrap();

        assert_eq!(network.nics.len(), 1);
        let nic = &network.nics[0];
        assert!(mac.contains(&mac_string(&nic.mac)), "{mac}");
        assert_eq!(nic.mtu, 1400);
        let interface = &network.interfaces[0];
        assert_eq!(interface.name, "eth0");
        assert_eq!(interface.mtu, 1400);
        let addresses: Vec<_> = interface
            .IPAddresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.mask))
            .collect();
        assert_eq!(addresses, ["10.99.7.2/24"]);
        let routes: Vec<_> = network
            .routes
            .iter()
            .map(|r| (r.dest.as_str(), r.gateway.as_str(), r.device.as_str()))
            .collect();
        assert!(routes.contains(&("", "10.99.7.1", "eth0")), "{routes:?}");
        assert!(routes.contains(&("10.99.7.0/24", "", "eth0")), "{routes:?}");
        assert_eq!(network.neighbors.len(), 1);
        assert_eq!(network.neighbors[0].lladdr, "02:00:00:00:00:09");

        let tap = pod.ip("-o link show tap0_kestrel");
        assert!(tap.contains("mtu 1400") && tap.contains("UP"), "{tap}");
        for dev in ["eth0", "tap0_kestrel"] {
            let filters = pod.tc(&format!("filter show dev {dev} ingress"));
            assert!(
                filters.contains("protocol all") && filters.contains("mirred"),
                "{dev}: {filters}"
            );
        }

        detach(&pod.path()).unwrap();
        assert!(!pod.ip("-o link").contains("tap0_kestrel"));
        assert!(!pod.tc("qdisc show dev eth0").contains("ingress"));
        // Twice is fine: nothing left to remove.
        detach(&pod.path()).unwrap();
    }

    #[test]
    fn an_interface_that_cannot_be_mirrored_fails_before_any_tap_is_made() {
        let Some((pod, _peer)) = pod("tun") else {
            return;
        };
        pod.ip("tuntap add dev tun7 mode tun");
        let err = attach(&pod.path()).unwrap_err().to_string();
        assert!(
            err.contains("tun7") && err.contains("not an Ethernet"),
            "{err}"
        );
        let links = pod.ip("-o link");
        assert!(!links.contains("_kestrel"), "{links}");
        assert!(!pod.tc("qdisc show dev eth0").contains("ingress"));
    }

    #[test]
    fn a_missing_namespace_is_named_in_the_error() {
        let missing = Path::new("/run/netns/kestrel-no-such-netns");
        let err = attach(missing).unwrap_err().to_string();
        assert!(err.contains("kestrel-no-such-netns"), "{err}");
        detach(missing).unwrap();
    }
}
