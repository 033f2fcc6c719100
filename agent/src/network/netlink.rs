//! The rtnetlink calls behind the network RPCs, and the translation of the
//! kernel's link, address and route messages into Kata's `types` shapes.
//!
//! A [`Netlink`] is one rtnetlink socket, opened in the network namespace
//! of the thread that calls [`Netlink::connect`] and served by a task on
//! the current tokio runtime; it closes when the value is dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use kestrel_protocols::types::{self, IPFamily};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::request::{format_hardware_address, Cidr, NeighborRequest, RouteRequest};

pub type Result<T> = std::result::Result<T, rtnetlink::Error>;

/// The errno behind a netlink failure, when the kernel gave one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> std::io::Result<Netlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle.link().get().execute().try_collect().await
    }

    pub async fn link(&self, index: u32) -> Result<LinkMessage> {
        self.handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await?
            .ok_or(rtnetlink::Error::RequestFailed)
    }

    pub async fn set_link(&self, message: LinkMessage) -> Result<()> {
        self.handle.link().set(message).execute().await
    }

    /// Every address of every link, or of the link `index`.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<AddressMessage>> {
        let all: Vec<AddressMessage> = self.handle.address().get().execute().try_collect().await?;
        Ok(all
            .into_iter()
            .filter(|a| index.is_none_or(|i| a.header.index == i))
            .collect())
    }

    pub async fn add_address(&self, index: u32, cidr: Cidr) -> Result<()> {
        self.handle
            .address()
            .add(index, cidr.addr, cidr.prefix)
            .replace()
            .execute()
            .await
    }

    pub async fn del_address(&self, address: AddressMessage) -> Result<()> {
        self.handle.address().del(address).execute().await
    }

    /// The main table's routes, IPv4 then IPv6.
    pub async fn main_routes(&self) -> Result<Vec<RouteMessage>> {
        let mut all = Vec::new();
        // One dump at a time: a second on the same socket fails with EBUSY.
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await?;
            all.append(&mut routes);
        }
        all.retain(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN));
        Ok(all)
    }

    /// Adds `route`, replacing one with the same destination (`ip route replace`).
    pub async fn replace_route(&self, route: RouteMessage) -> Result<()> {
        self.handle.route().add(route).replace().execute().await
    }

    pub async fn del_route(&self, route: RouteMessage) -> Result<()> {
        self.handle.route().del(route).execute().await
    }

    /// `ip neigh replace`.
    pub async fn replace_neighbour(&self, index: u32, n: &NeighborRequest) -> Result<()> {
        let mut request = self
            .handle
            .neighbours()
            .add(index, n.ip)
            .state(NeighbourState::from(n.state))
            .flags(NeighbourFlags::from_bits_retain(n.flags));
        if let Some(lladdr) = &n.lladdr {
            request = request.link_layer_address(lladdr);
        }
        request.replace().execute().await
    }
}

pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The link's driver kind (`veth`, `dummy`, ...); none for a plain NIC
/// such as virtio-net.
fn link_kind(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

pub fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

pub fn is_loopback(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Loopback)
}

/// The address a link answers on: IFA_LOCAL where the kernel gives one
/// (IPv4; on a point-to-point link IFA_ADDRESS is the peer's), else
/// IFA_ADDRESS.
pub fn address_cidr(a: &AddressMessage) -> Option<Cidr> {
    let local = a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|addr| Cidr {
        addr,
        prefix: a.header.prefix_len,
    })
}

/// IPv6 link-local addresses are the kernel's, derived from the MAC when
/// the link comes up; UpdateInterface leaves them be.
pub fn is_kernel_managed(cidr: &Cidr) -> bool {
    matches!(cidr.addr, IpAddr::V6(a) if a.is_unicast_link_local())
}

fn family(ip: &IpAddr) -> IPFamily {
    if ip.is_ipv6() {
        IPFamily::v6
    } else {
        IPFamily::v4
    }
}

/// A link as ListInterfaces shows it. `device` repeats the name, as Kata's
/// runtime fills it in its own requests; `devicePath` stays empty.
pub fn interface(link: &LinkMessage, addresses: &[AddressMessage]) -> types::Interface {
    let mut i = types::Interface::new();
    i.name = link_name(link).unwrap_or_default().to_string();
    i.device = i.name.clone();
    i.hwAddr = link_mac(link)
        .map(format_hardware_address)
        .unwrap_or_default();
    i.mtu = link_mtu(link).map(u64::from).unwrap_or(0);
    i.type_ = link_kind(link).unwrap_or_default();
    i.raw_flags = link.header.flags.bits();
    i.IPAddresses = addresses
        .iter()
        .filter(|a| a.header.index == link.header.index)
        .filter_map(address_cidr)
        .map(|c| {
            let mut ip = types::IPAddress::new();
            ip.family = family(&c.addr).into();
            ip.address = c.addr.to_string();
            ip.mask = c.prefix.to_string();
            ip
        })
        .collect();
    i
}

/// The routing table a route is in: RTA_TABLE where present (tables past
/// 255 only have that), else the header's.
pub fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

pub fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A route as ListRoutes shows it: `dest` as `address/prefix`, empty for a
/// default route (the spelling UpdateRoutes takes back); `source` is the
/// preferred source address (`ip route ... src`).
pub fn route(r: &RouteMessage, names: &HashMap<u32, String>) -> types::Route {
    let mut out = types::Route::new();
    let ip_of = |want: fn(&RouteAttribute) -> Option<&RouteAddress>| {
        r.attributes.iter().find_map(want).and_then(route_ip)
    };
    let dest = ip_of(|a| match a {
        RouteAttribute::Destination(d) => Some(d),
        _ => None,
    });
    if let Some(dest) = dest {
        out.dest = format!("{dest}/{}", r.header.destination_prefix_length);
    }
    if let Some(gw) = ip_of(|a| match a {
        RouteAttribute::Gateway(g) => Some(g),
        _ => None,
    }) {
        out.gateway = gw.to_string();
    }
    if let Some(src) = ip_of(|a| match a {
        RouteAttribute::PrefSource(s) => Some(s),
        _ => None,
    }) {
        out.source = src.to_string();
    }
    out.device = route_oif(r)
        .and_then(|i| names.get(&i).cloned())
        .unwrap_or_default();
    out.scope = u32::from(u8::from(r.header.scope));
    out.family = if r.header.address_family == AddressFamily::Inet6 {
        IPFamily::v6
    } else {
        IPFamily::v4
    }
    .into();
    out.flags = r.header.flags.bits();
    out.mtu = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Metrics(m) => m.iter().find_map(|m| match m {
                RouteMetric::Mtu(mtu) => Some(*mtu),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(0);
    out
}

/// The RTM_NEWROUTE message for one requested route through link `index`,
/// in the main table with protocol `boot`, as `ip route add` makes it.
pub fn route_message(r: &RouteRequest, index: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if r.dest.addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.destination_prefix_length = r.dest.prefix;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::from(r.scope);
    m.header.kind = RouteType::Unicast;
    if r.onlink {
        m.header.flags.insert(RouteFlags::Onlink);
    }
    if r.dest.prefix > 0 {
        m.attributes
            .push(RouteAttribute::Destination(r.dest.addr.into()));
    }
    if let Some(gw) = r.gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(src) = r.source {
        m.attributes.push(RouteAttribute::PrefSource(src.into()));
    }
    m.attributes.push(RouteAttribute::Oif(index));
    if let Some(mtu) = r.mtu {
        m.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    m
}

/// A dumped route, trimmed to what identifies and recreates it: the
/// kernel refuses status flags (`linkdown`) and ignores cache data in a
/// request, so a delete or a re-add sends only these.
pub fn restorable(r: &RouteMessage) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = r.header.clone();
    m.header.flags = r.header.flags & RouteFlags::Onlink;
    m.attributes = r
        .attributes
        .iter()
        .filter(|a| {
            matches!(
                a,
                RouteAttribute::Destination(_)
                    | RouteAttribute::Source(_)
                    | RouteAttribute::Gateway(_)
                    | RouteAttribute::PrefSource(_)
                    | RouteAttribute::Oif(_)
                    | RouteAttribute::Priority(_)
                    | RouteAttribute::Table(_)
                    | RouteAttribute::Metrics(_)
                    | RouteAttribute::MultiPath(_)
                    | RouteAttribute::Preference(_)
                    | RouteAttribute::Via(_)
            )
        })
        .cloned()
        .collect();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressHeader;
    use rtnetlink::packet_route::link::LinkHeader;

    fn link(index: u32, name: &str, mac: &[u8], flags: LinkFlags) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header = LinkHeader {
            index,
            flags,
            ..Default::default()
        };
        l.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(mac.to_vec()),
            LinkAttribute::Mtu(1450),
        ];
        l
    }

    fn address(index: u32, ip: &str, prefix: u8) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap();
        let mut a = AddressMessage::default();
        a.header = AddressHeader {
            family: if ip.is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            },
            prefix_len: prefix,
            index,
            ..Default::default()
        };
        a.attributes = vec![AddressAttribute::Address(ip)];
        a
    }

    #[test]
    fn a_link_becomes_a_kata_interface_with_only_its_own_addresses() {
        let l = link(
            2,
            "eth0",
            &[0x52, 0x54, 0, 0xab, 0xcd, 1],
            LinkFlags::Up | LinkFlags::Broadcast,
        );
        let addrs = [
            address(2, "10.88.0.5", 16),
            address(3, "10.99.0.1", 24),
            address(2, "fd00::5", 64),
        ];
        let i = interface(&l, &addrs);
        assert_eq!((i.name.as_str(), i.device.as_str()), ("eth0", "eth0"));
        assert_eq!(i.hwAddr, "52:54:00:ab:cd:01");
        assert_eq!(i.mtu, 1450);
        assert_eq!(i.raw_flags, (libc::IFF_UP | libc::IFF_BROADCAST) as u32);
        let shown: Vec<_> = i
            .IPAddresses
            .iter()
            .map(|a| {
                (
                    a.family.enum_value().unwrap(),
                    a.address.as_str(),
                    a.mask.as_str(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (IPFamily::v4, "10.88.0.5", "16"),
                (IPFamily::v6, "fd00::5", "64")
            ]
        );
    }

    #[test]
    fn a_requested_route_round_trips_through_its_netlink_message() {
        let req = RouteRequest {
            dest: Cidr {
                addr: "10.9.0.0".parse().unwrap(),
                prefix: 16,
            },
            gateway: Some("10.88.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: Some("10.88.0.5".parse().unwrap()),
            scope: 0,
            onlink: true,
            mtu: Some(1400),
        };
        let names = HashMap::from([(2, "eth0".to_string())]);
        let r = route(&route_message(&req, 2), &names);
        assert_eq!(r.dest, "10.9.0.0/16");
        assert_eq!(r.gateway, "10.88.0.1");
        assert_eq!(r.source, "10.88.0.5");
        assert_eq!(r.device, "eth0");
        assert_eq!(r.family.enum_value(), Ok(IPFamily::v4));
        assert_eq!(r.flags, super::super::request::ROUTE_ONLINK);
        assert_eq!(r.mtu, 1400);
    }

    #[test]
    fn a_default_route_is_listed_with_an_empty_dest() {
        let req = RouteRequest {
            dest: Cidr {
                addr: "::".parse().unwrap(),
                prefix: 0,
            },
            gateway: Some("fd00::1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: 0,
            onlink: false,
            mtu: None,
        };
        let r = route(&route_message(&req, 2), &HashMap::new());
        assert_eq!(r.dest, "");
        assert_eq!(r.gateway, "fd00::1");
        assert_eq!(r.family.enum_value(), Ok(IPFamily::v6));
        assert_eq!(r.device, "", "an unknown link index has no name");
    }

    #[test]
    fn a_restored_route_drops_status_flags_and_cache_data() {
        let mut m = RouteMessage::default();
        m.header.flags = RouteFlags::Onlink | RouteFlags::Linkdown;
        m.attributes = vec![
            RouteAttribute::Oif(2),
            RouteAttribute::Expires(5),
            RouteAttribute::Table(254),
        ];
        let r = restorable(&m);
        assert_eq!(r.header.flags, RouteFlags::Onlink);
        assert_eq!(
            r.attributes,
            [RouteAttribute::Oif(2), RouteAttribute::Table(254)]
        );
    }

    #[test]
    fn ipv6_link_local_addresses_are_left_to_the_kernel() {
        let c = |s: &str| Cidr {
            addr: s.parse().unwrap(),
            prefix: 64,
        };
        assert!(is_kernel_managed(&c("fe80::1")));
        assert!(!is_kernel_managed(&c("fd00::1")));
        assert!(!is_kernel_managed(&c("169.254.1.1")));
    }
}
