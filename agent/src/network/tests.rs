//! The network RPCs against a real kernel: each test runs on a thread of
//! its own that first moves into a fresh network namespace (so the host's
//! links are never seen nor touched), with veth pairs standing in for the
//! guest's virtio-net card. They skip, saying why, without root.

use std::future::Future;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use kestrel_protocols::types::{self, IPFamily};
use nix::sched::{unshare, CloneFlags};
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::{LinkUnspec, LinkVeth};
use tempfile::TempDir;

use super::*;

const MAC: &str = "02:aa:bb:cc:dd:01";

/// Runs `test` in a new network namespace with a guest-mode [`Network`]
/// whose resolv.conf and hosts go to a temporary `etc`.
fn in_new_netns<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Network, TempDir) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {name}: creating a network namespace needs root");
        return;
    }
    let name = name.to_string();
    let outcome = std::thread::spawn(move || {
        // Only this thread moves: the test harness's threads, and so the
        // host's namespace, are never configured.
        if let Err(e) = unshare(CloneFlags::CLONE_NEWNET) {
            eprintln!("skipping {name}: unshare(CLONE_NEWNET): {e}");
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let network = Network::guest(dir.path().join("etc"));
        runtime.block_on(test(network, dir));
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn handle() -> rtnetlink::Handle {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    handle
}

async fn link_named(h: &rtnetlink::Handle, name: &str) -> LinkMessage {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .unwrap()
        .unwrap()
}

/// A veth pair whose `name` end has `mac`, its peer up (so it has carrier).
async fn veth(h: &rtnetlink::Handle, name: &str, peer: &str, mac: &str) {
    h.link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .unwrap();
    let index = link_named(h, name).await.header.index;
    let mac = request::hardware_address("test", "mac", mac).unwrap();
    h.link()
        .set(LinkUnspec::new_with_index(index).address(mac).build())
        .execute()
        .await
        .unwrap();
    let peer = link_named(h, peer).await.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(peer).up().build())
        .execute()
        .await
        .unwrap();
}

fn ip(address: &str, mask: &str) -> types::IPAddress {
    let mut a = types::IPAddress::new();
    let parsed: IpAddr = address.parse().unwrap();
    a.family = if parsed.is_ipv6() {
        IPFamily::v6
    } else {
        IPFamily::v4
    }
    .into();
    a.address = address.into();
    a.mask = mask.into();
    a
}

fn iface(mac: &str, name: &str, addresses: Vec<types::IPAddress>) -> types::Interface {
    let mut i = types::Interface::new();
    i.hwAddr = mac.into();
    i.name = name.into();
    i.IPAddresses = addresses;
    i
}

fn route(dest: &str, gateway: &str, device: &str) -> types::Route {
    let mut r = types::Route::new();
    r.dest = dest.into();
    r.gateway = gateway.into();
    r.device = device.into();
    let v6 = dest.contains(':') || gateway.contains(':');
    r.family = if v6 { IPFamily::v6 } else { IPFamily::v4 }.into();
    r
}

fn addresses(i: &types::Interface) -> Vec<String> {
    let mut v: Vec<String> = i
        .IPAddresses
        .iter()
        .filter(|a| !a.address.starts_with("fe80"))
        .map(|a| format!("{}/{}", a.address, a.mask))
        .collect();
    v.sort();
    v
}

/// `dest via gateway dev device` of each route, sorted.
fn shown(routes: &[types::Route]) -> Vec<String> {
    let mut v: Vec<String> = routes
        .iter()
        .filter(|r| !r.dest.starts_with("fe80"))
        .map(|r| format!("{} via {} dev {}", r.dest, r.gateway, r.device))
        .collect();
    v.sort();
    v
}

/// The pod's card as the guest kernel names it, configured as a runtime
/// would: 10.88.0.5/16 on eth0.
async fn pod_interface(network: &Network) -> types::Interface {
    veth(&handle(), "veth-pod", "veth-host", MAC).await;
    network
        .update_interface(Some(&iface(MAC, "eth0", vec![ip("10.88.0.5", "16")])))
        .await
        .unwrap()
}

#[test]
fn update_interface_finds_the_link_by_mac_renames_addresses_and_brings_it_up() {
    in_new_netns("update_interface", |network, dir| async move {
        veth(&handle(), "veth-pod", "veth-host", MAC).await;
        network
            .configure_sandbox("pod-a", &["nameserver 10.96.0.10".into()])
            .unwrap();
        let mut want = iface(
            &MAC.to_uppercase(),
            "eth0",
            vec![ip("10.88.0.5", "16"), ip("fd00::5", "64")],
        );
        want.mtu = 1400;
        let got = network.update_interface(Some(&want)).await.unwrap();
        assert_eq!(got.name, "eth0");
        assert_eq!(got.hwAddr, MAC);
        assert_eq!(got.mtu, 1400);
        assert_ne!(got.raw_flags & libc::IFF_UP as u32, 0, "the link is up");
        assert_eq!(addresses(&got), ["10.88.0.5/16", "fd00::5/64"]);

        let hosts = std::fs::read_to_string(dir.path().join("etc/hosts")).unwrap();
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.ends_with("10.88.0.5\tpod-a\n"), "{hosts}");
        let resolv = std::fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(resolv, "nameserver 10.96.0.10\n");

        // A second update replaces the addresses; the name stays.
        let again = network
            .update_interface(Some(&iface(MAC, "", vec![ip("10.88.0.6", "16")])))
            .await
            .unwrap();
        assert_eq!(again.name, "eth0");
        assert_eq!(addresses(&again), ["10.88.0.6/16"]);
        let listed = network.list_interfaces().await.unwrap();
        let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
        assert!(
            names.contains(&"lo") && names.contains(&"eth0"),
            "{names:?}"
        );
        let hosts = std::fs::read_to_string(dir.path().join("etc/hosts")).unwrap();
        assert!(hosts.ends_with("10.88.0.6\tpod-a\n"), "{hosts}");
    });
}

#[test]
fn update_interface_trades_names_with_the_link_that_has_the_wanted_one() {
    in_new_netns("update_interface_rename", |network, _dir| async move {
        let h = handle();
        veth(&h, "eth0", "peer0", "02:00:00:00:00:10").await;
        veth(&h, "eth1", "peer1", MAC).await;
        let got = network
            .update_interface(Some(&iface(MAC, "eth0", vec![])))
            .await
            .unwrap();
        assert_eq!(got.name, "eth0");
        let former = link_named(&h, "eth1").await;
        assert_eq!(
            netlink::link_mac(&former),
            Some(&[2, 0, 0, 0, 0, 0x10][..]),
            "the link that was eth0 is now eth1"
        );
    });
}

#[test]
fn update_interface_for_a_mac_no_link_has_is_not_found_after_a_bounded_wait() {
    in_new_netns("update_interface_missing", |network, _dir| async move {
        let started = std::time::Instant::now();
        let err = network
            .update_interface(Some(&iface("02:de:ad:00:00:01", "eth0", vec![])))
            .await
            .unwrap_err();
        match err {
            Error::NotFound(m) => assert!(m.contains("02:de:ad:00:00:01"), "{m}"),
            other => panic!("{other:?}"),
        }
        let waited = started.elapsed();
        assert!(waited >= LINK_WAIT && waited < LINK_WAIT * 3, "{waited:?}");
    });
}

#[test]
fn update_interface_with_a_bad_address_changes_nothing() {
    in_new_netns("update_interface_invalid", |network, _dir| async move {
        let h = handle();
        veth(&h, "veth-pod", "veth-host", MAC).await;
        let bad = iface(
            MAC,
            "eth0",
            vec![ip("10.88.0.5", "16"), ip("10.88.0.7", "99")],
        );
        match network.update_interface(Some(&bad)).await {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("IPAddresses[1].mask \"99\""), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let link = link_named(&h, "veth-pod").await;
        assert!(
            !netlink::is_up(&link),
            "untouched: still down and still named veth-pod"
        );
    });
}

#[test]
fn update_routes_adds_link_routes_before_gateways_and_replaces_the_links_routes() {
    in_new_netns("update_routes", |network, _dir| async move {
        pod_interface(&network).await;
        // The gateway 192.168.50.1 is reachable only through the link
        // route given after it: the order the agent adds them in matters.
        let routes = network
            .update_routes(&[
                route("", "192.168.50.1", "eth0"),
                route("192.168.50.0/24", "", "eth0"),
            ])
            .await
            .unwrap();
        assert_eq!(
            shown(&routes),
            [
                " via 192.168.50.1 dev eth0",
                "10.88.0.0/16 via  dev eth0",
                "192.168.50.0/24 via  dev eth0",
            ]
        );

        // The next list replaces the routes on eth0; the kernel's route for
        // the link's own subnet stays.
        let routes = network
            .update_routes(&[route("10.7.0.0/16", "10.88.0.1", "eth0")])
            .await
            .unwrap();
        let want = [
            "10.7.0.0/16 via 10.88.0.1 dev eth0",
            "10.88.0.0/16 via  dev eth0",
        ];
        assert_eq!(shown(&routes), want);
        assert_eq!(shown(&network.list_routes().await.unwrap()), want);
    });
}

#[test]
fn a_failed_update_routes_puts_the_links_previous_routes_back() {
    in_new_netns("update_routes_rollback", |network, _dir| async move {
        pod_interface(&network).await;
        let before = network
            .update_routes(&[route("default", "10.88.0.1", "eth0")])
            .await
            .unwrap();
        let err = network
            .update_routes(&[
                route("10.7.0.0/16", "", "eth0"),
                route("10.6.0.0/16", "172.31.0.1", "eth0"),
            ])
            .await
            .unwrap_err();
        match err {
            Error::InvalidArgument(m) => {
                assert!(m.contains("Routes[1]") && m.contains("172.31.0.1"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(shown(&network.list_routes().await.unwrap()), shown(&before));
    });
}

#[test]
fn update_routes_naming_an_unknown_link_changes_nothing() {
    in_new_netns("update_routes_unknown_link", |network, _dir| async move {
        pod_interface(&network).await;
        let before = network
            .update_routes(&[route("", "10.88.0.1", "eth0")])
            .await
            .unwrap();
        let err = network
            .update_routes(&[
                route("10.7.0.0/16", "", "eth0"),
                route("", "10.9.0.1", "eth9"),
            ])
            .await
            .unwrap_err();
        match err {
            Error::NotFound(m) => assert!(m.contains("Routes[1].device \"eth9\""), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(shown(&network.list_routes().await.unwrap()), shown(&before));
    });
}

#[test]
fn arp_neighbours_are_added_permanent_when_no_state_is_given() {
    in_new_netns("add_arp_neighbors", |network, _dir| async move {
        pod_interface(&network).await;
        let mut n = types::ARPNeighbor::new();
        n.toIPAddress = Some(ip("10.88.0.9", "")).into();
        n.device = "eth0".into();
        n.lladdr = "02:00:00:00:00:09".into();
        network.add_arp_neighbors(&[n.clone()]).await.unwrap();
        // Replacing the same entry is no error.
        network.add_arp_neighbors(&[n]).await.unwrap();

        let entries: Vec<_> = handle()
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .unwrap();
        let entry = entries
            .iter()
            .find(|e| {
                e.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if ip.to_string() == "10.88.0.9")
                })
            })
            .expect("the neighbour entry");
        assert_eq!(entry.header.state, NeighbourState::Permanent);
        assert!(entry
            .attributes
            .contains(&NeighbourAttribute::LinkLayerAddress(vec![
                2, 0, 0, 0, 0, 9
            ])));

        let mut unknown = types::ARPNeighbor::new();
        unknown.toIPAddress = Some(ip("10.88.0.10", "")).into();
        unknown.device = "eth7".into();
        assert!(matches!(
            network.add_arp_neighbors(&[unknown]).await,
            Err(Error::NotFound(m)) if m.contains("\"eth7\"")
        ));
    });
}

fn refused<T: std::fmt::Debug>(method: &str, r: Result<T>) {
    match r {
        Err(Error::FailedPrecondition(m)) => {
            assert!(m.starts_with(method), "{m}");
            assert!(m.contains(HOST_MODE), "{m}");
        }
        other => panic!("{method}: {other:?}"),
    }
}

#[test]
fn host_mode_refuses_every_network_rpc_and_ignores_dns() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let network = Network::host();
        // Valid requests: the mode is refused, not the request.
        refused(
            "UpdateInterface",
            network
                .update_interface(Some(&iface(MAC, "eth0", vec![ip("10.88.0.5", "16")])))
                .await,
        );
        refused(
            "UpdateRoutes",
            network
                .update_routes(&[route("", "10.88.0.1", "eth0")])
                .await,
        );
        refused("ListInterfaces", network.list_interfaces().await);
        refused("ListRoutes", network.list_routes().await);
        refused("AddARPNeighbors", network.add_arp_neighbors(&[]).await);

        network
            .configure_sandbox("pod-a", &["nameserver 10.0.0.1".into()])
            .unwrap();
        let spec = oci::Spec::new();
        assert!(matches!(network.with_guest_files(&spec), Cow::Borrowed(_)));
    });
}
