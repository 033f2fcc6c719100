//! The network RPCs' inputs, checked: Kata's string-typed `types.Interface`,
//! `types.Route` and `types.ARPNeighbor` become typed requests before the
//! agent touches a single link, so a bad field fails the whole call with
//! INVALID_ARGUMENT naming the field and its value, and nothing changes.

use std::net::IpAddr;

use kestrel_protocols::protobuf::EnumOrUnknown;
use kestrel_protocols::types::{self, IPFamily};

use crate::error::{Error, Result};

/// The kernel's IFNAMSIZ less its terminating NUL.
const MAX_LINK_NAME: usize = 15;
/// RTNH_F_ONLINK: the gateway is on the link even if no prefix says so.
pub const ROUTE_ONLINK: u32 = 4;
/// RT_SCOPE_LINK: a gateway-less route's scope when the request leaves it
/// 0, as `ip route add` chooses.
pub const SCOPE_LINK: u8 = 253;
/// NUD_PERMANENT, AddARPNeighbors' state when the request leaves it 0.
pub const NUD_PERMANENT: u16 = 0x80;

/// An address with its prefix length, as `ip` writes it (`10.0.0.2/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The default route's destination in `addr`'s family.
    fn default_of(v6: bool) -> Cidr {
        let addr = if v6 {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0u8; 4])
        };
        Cidr { addr, prefix: 0 }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// UpdateInterface, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct InterfaceRequest {
    /// The link to change, found by its hardware address.
    pub mac: Vec<u8>,
    /// The name to give it; `None` keeps the one it has.
    pub name: Option<String>,
    /// `None` keeps the link's MTU.
    pub mtu: Option<u32>,
    /// Every address the link ends up with (IPv6 link-local ones aside).
    pub addresses: Vec<Cidr>,
    /// False when `raw_flags` carries IFF_NOARP.
    pub arp: bool,
}

/// One route of UpdateRoutes, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct RouteRequest {
    pub dest: Cidr,
    pub gateway: Option<IpAddr>,
    pub device: String,
    /// The preferred source address (`ip route ... src`).
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub onlink: bool,
    pub mtu: Option<u32>,
}

/// One entry of AddARPNeighbors, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct NeighborRequest {
    pub ip: IpAddr,
    pub device: String,
    pub lladdr: Option<Vec<u8>>,
    pub state: u16,
    pub flags: u8,
}

pub fn interface(i: &types::Interface) -> Result<InterfaceRequest> {
    let what = "UpdateInterface";
    if i.hwAddr.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: hwAddr is empty; the agent finds the link to change by its MAC"
        )));
    }
    let mac = hardware_address(what, "hwAddr", &i.hwAddr)?;
    let name = if i.name.is_empty() {
        None
    } else {
        link_name(what, "name", &i.name)?;
        Some(i.name.clone())
    };
    let mtu = match i.mtu {
        0 => None,
        m => Some(u32::try_from(m).map_err(|_| {
            Error::invalid(format!(
                "{what}: mtu {m} is larger than a link's MTU can be"
            ))
        })?),
    };
    let addresses = i
        .IPAddresses
        .iter()
        .enumerate()
        .map(|(n, a)| address(what, &format!("IPAddresses[{n}]"), a))
        .collect::<Result<Vec<_>>>()?;
    Ok(InterfaceRequest {
        mac,
        name,
        mtu,
        addresses,
        arp: i.raw_flags & libc::IFF_NOARP as u32 == 0,
    })
}

pub fn route(n: usize, r: &types::Route) -> Result<RouteRequest> {
    let what = "UpdateRoutes";
    let field = |f: &str| format!("Routes[{n}].{f}");
    let v6 = is_v6(what, &field("family"), r.family)?;
    if r.device.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: {} is empty; every route names its link",
            field("device")
        )));
    }
    link_name(what, &field("device"), &r.device)?;
    let dest = match r.dest.as_str() {
        "" | "default" => Cidr::default_of(v6),
        d => prefix(what, &field("dest"), d, v6)?,
    };
    let gateway = optional_ip(what, &field("gateway"), &r.gateway, v6)?;
    let source = match r.source.split_once('/') {
        // A source written as a host prefix (`10.0.0.2/32`) is the same address.
        Some((ip, len)) if len.parse::<u8>().ok() == Some(if v6 { 128 } else { 32 }) => {
            optional_ip(what, &field("source"), ip, v6)?
        }
        _ => optional_ip(what, &field("source"), &r.source, v6)?,
    };
    // Protobuf cannot tell 0 (universe) from unset. A route without a
    // gateway reaches its destination on the link; in universe scope it
    // could not serve as the way to any gateway.
    let scope = match u8::try_from(r.scope) {
        Ok(0) if gateway.is_none() => Ok(SCOPE_LINK),
        other => other,
    }
    .map_err(|_| {
        Error::invalid(format!(
            "{what}: {} {} is not a route scope (0 to 255)",
            field("scope"),
            r.scope
        ))
    })?;
    Ok(RouteRequest {
        dest,
        gateway,
        device: r.device.clone(),
        source,
        scope,
        onlink: r.flags & ROUTE_ONLINK != 0,
        mtu: (r.mtu != 0).then_some(r.mtu),
    })
}

pub fn neighbor(n: usize, a: &types::ARPNeighbor) -> Result<NeighborRequest> {
    let what = "AddARPNeighbors";
    let field = |f: &str| format!("ARPNeighbors[{n}].{f}");
    let to = a
        .toIPAddress
        .as_ref()
        .ok_or_else(|| Error::invalid(format!("{what}: {} is missing", field("toIPAddress"))))?;
    let v6 = is_v6(what, &field("toIPAddress.family"), to.family)?;
    let ip =
        optional_ip(what, &field("toIPAddress.address"), &to.address, v6)?.ok_or_else(|| {
            Error::invalid(format!("{what}: {} is empty", field("toIPAddress.address")))
        })?;
    if a.device.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: {} is empty",
            field("device")
        )));
    }
    link_name(what, &field("device"), &a.device)?;
    let lladdr = if a.lladdr.is_empty() {
        None
    } else {
        Some(hardware_address(what, &field("lladdr"), &a.lladdr)?)
    };
    let state = match a.state {
        0 => NUD_PERMANENT,
        s => u16::try_from(s).map_err(|_| {
            Error::invalid(format!(
                "{what}: {} {s} is not a neighbour state",
                field("state")
            ))
        })?,
    };
    let flags = u8::try_from(a.flags).map_err(|_| {
        Error::invalid(format!(
            "{what}: {} {} is not a set of neighbour flags",
            field("flags"),
            a.flags
        ))
    })?;
    Ok(NeighborRequest {
        ip,
        device: a.device.clone(),
        lladdr,
        state,
        flags,
    })
}

/// An Ethernet address: six hex pairs separated by colons, either case
/// (`52:54:00:AB:cd:01`).
pub fn hardware_address(what: &str, field: &str, s: &str) -> Result<Vec<u8>> {
    let bad = || {
        Error::invalid(format!(
            "{what}: {field} {s:?} is not a hardware address like 52:54:00:12:34:56"
        ))
    };
    let bytes = s
        .split(':')
        .map(|b| {
            if b.len() == 2 {
                u8::from_str_radix(b, 16).map_err(|_| bad())
            } else {
                Err(bad())
            }
        })
        .collect::<Result<Vec<u8>>>()?;
    if bytes.len() != 6 {
        return Err(bad());
    }
    Ok(bytes)
}

/// How `ip link` writes a hardware address: lowercase hex pairs.
pub fn format_hardware_address(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kernel's rule for interface names (`dev_valid_name`).
fn link_name(what: &str, field: &str, name: &str) -> Result<()> {
    let problem = if name.len() > MAX_LINK_NAME {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is not a name")
    } else if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        Some("contains '/', ':' or white space")
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::invalid(format!(
            "{what}: {field} {name:?} {p}, which no Linux interface name may"
        ))),
        None => Ok(()),
    }
}

fn is_v6(what: &str, field: &str, family: EnumOrUnknown<IPFamily>) -> Result<bool> {
    match family.enum_value() {
        Ok(IPFamily::v4) => Ok(false),
        Ok(IPFamily::v6) => Ok(true),
        Err(n) => Err(Error::invalid(format!(
            "{what}: {field} {n} is neither v4 (0) nor v6 (1)"
        ))),
    }
}

fn family_name(v6: bool) -> &'static str {
    if v6 {
        "v6"
    } else {
        "v4"
    }
}

/// An address of the request's family, or `None` for an empty field.
fn optional_ip(what: &str, field: &str, s: &str, v6: bool) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|_| Error::invalid(format!("{what}: {field} {s:?} is not an IP address")))?;
    if ip.is_ipv6() != v6 {
        return Err(Error::invalid(format!(
            "{what}: {field} {s:?} is not an IP{} address, as the family field says",
            family_name(v6)
        )));
    }
    Ok(Some(ip))
}

fn address(what: &str, field: &str, a: &types::IPAddress) -> Result<Cidr> {
    let v6 = is_v6(what, &format!("{field}.family"), a.family)?;
    let addr = optional_ip(what, &format!("{field}.address"), &a.address, v6)?
        .ok_or_else(|| Error::invalid(format!("{what}: {field}.address is empty")))?;
    let max = Cidr::max_prefix(addr);
    let prefix = a
        .mask
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what}: {field}.mask {:?} is not a prefix length for {addr} (0 to {max})",
                a.mask
            ))
        })?;
    Ok(Cidr { addr, prefix })
}

/// `10.0.0.0/24`, or a bare address for a host route. Host bits set under
/// the prefix (`10.0.0.1/24`) are refused, as the kernel would.
fn prefix(what: &str, field: &str, s: &str, v6: bool) -> Result<Cidr> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let addr = optional_ip(what, field, ip, v6)?
        .ok_or_else(|| Error::invalid(format!("{what}: {field} {s:?} is not a prefix")))?;
    let max = Cidr::max_prefix(addr);
    let prefix = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what}: {field} {s:?} has no prefix length from 0 to {max}"
                ))
            })?,
    };
    let host_bits = match addr {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) != 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) != 0,
    };
    if host_bits {
        return Err(Error::invalid(format!(
            "{what}: {field} {s:?} has bits set past its prefix length"
        )));
    }
    Ok(Cidr { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(family: IPFamily, address: &str, mask: &str) -> types::IPAddress {
        let mut a = types::IPAddress::new();
        a.family = family.into();
        a.address = address.into();
        a.mask = mask.into();
        a
    }

    fn iface(mac: &str, name: &str, addrs: Vec<types::IPAddress>) -> types::Interface {
        let mut i = types::Interface::new();
        i.hwAddr = mac.into();
        i.name = name.into();
        i.IPAddresses = addrs;
        i
    }

    fn invalid(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn an_interface_request_is_parsed_whatever_the_mac_case() {
        let req = interface(&iface(
            "52:54:00:AB:cd:01",
            "eth0",
            vec![
                ip(IPFamily::v4, "10.88.0.5", "16"),
                ip(IPFamily::v6, "fd00::5", "64"),
            ],
        ))
        .unwrap();
        assert_eq!(req.mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert_eq!(req.name.as_deref(), Some("eth0"));
        assert_eq!(req.mtu, None);
        assert!(req.arp);
        let shown: Vec<String> = req.addresses.iter().map(Cidr::to_string).collect();
        assert_eq!(shown, ["10.88.0.5/16", "fd00::5/64"]);
    }

    #[test]
    fn bad_interface_fields_are_refused_naming_field_and_value() {
        let ok = || iface("52:54:00:12:34:56", "eth0", vec![]);
        let m = invalid(interface(&iface("", "eth0", vec![])));
        assert!(m.contains("hwAddr is empty"), "{m}");
        let m = invalid(interface(&iface("52:54:00:12:34", "eth0", vec![])));
        assert!(m.contains("hwAddr \"52:54:00:12:34\""), "{m}");
        let m = invalid(interface(&iface("52:54:00:12:34:zz", "eth0", vec![])));
        assert!(m.contains("hwAddr \"52:54:00:12:34:zz\""), "{m}");
        let m = invalid(interface(&iface(
            "52:54:00:12:34:56",
            "a-very-long-name0",
            vec![],
        )));
        assert!(
            m.contains("name \"a-very-long-name0\" is longer than 15 bytes"),
            "{m}"
        );
        let m = invalid(interface(&iface("52:54:00:12:34:56", "eth/0", vec![])));
        assert!(m.contains("name \"eth/0\""), "{m}");
        let mut i = ok();
        i.IPAddresses = vec![ip(IPFamily::v4, "10.0.0.300", "24")];
        let m = invalid(interface(&i));
        assert!(m.contains("IPAddresses[0].address \"10.0.0.300\""), "{m}");
        i.IPAddresses = vec![ip(IPFamily::v4, "10.0.0.3", "33")];
        let m = invalid(interface(&i));
        assert!(m.contains("IPAddresses[0].mask \"33\""), "{m}");
        i.IPAddresses = vec![ip(IPFamily::v4, "10.0.0.3", "255.255.255.0")];
        let m = invalid(interface(&i));
        assert!(m.contains("IPAddresses[0].mask \"255.255.255.0\""), "{m}");
        i.IPAddresses = vec![ip(IPFamily::v4, "fd00::3", "64")];
        let m = invalid(interface(&i));
        assert!(m.contains("\"fd00::3\" is not an IPv4 address"), "{m}");
        let mut i = ok();
        i.mtu = u64::from(u32::MAX) + 1;
        assert!(invalid(interface(&i)).contains("mtu 4294967296"));
    }

    #[test]
    fn noarp_in_raw_flags_turns_arp_off() {
        let mut i = iface("52:54:00:12:34:56", "", vec![]);
        i.raw_flags = libc::IFF_NOARP as u32 | libc::IFF_UP as u32;
        let req = interface(&i).unwrap();
        assert!(!req.arp);
        assert_eq!(req.name, None);
    }

    fn route_of(dest: &str, gateway: &str, device: &str, family: IPFamily) -> types::Route {
        let mut r = types::Route::new();
        r.dest = dest.into();
        r.gateway = gateway.into();
        r.device = device.into();
        r.family = family.into();
        r
    }

    #[test]
    fn default_routes_are_spelled_empty_or_default_in_either_family() {
        for dest in ["", "default"] {
            let r = route(0, &route_of(dest, "10.0.0.1", "eth0", IPFamily::v4)).unwrap();
            assert_eq!(r.dest.to_string(), "0.0.0.0/0");
            let r = route(0, &route_of(dest, "fd00::1", "eth0", IPFamily::v6)).unwrap();
            assert_eq!(r.dest.to_string(), "::/0");
        }
        let r = route(0, &route_of("10.1.2.3", "", "eth0", IPFamily::v4)).unwrap();
        assert_eq!(r.dest.to_string(), "10.1.2.3/32");
        assert_eq!(r.gateway, None);
    }

    #[test]
    fn routes_without_gateway_default_to_link_scope() {
        let r = route(0, &route_of("10.1.0.0/16", "", "eth0", IPFamily::v4)).unwrap();
        assert_eq!(r.scope, SCOPE_LINK);
        let r = route(
            0,
            &route_of("10.1.0.0/16", "10.0.0.1", "eth0", IPFamily::v4),
        )
        .unwrap();
        assert_eq!(r.scope, 0);
        let mut given = route_of("10.1.0.0/16", "", "eth0", IPFamily::v4);
        given.scope = 200;
        assert_eq!(route(0, &given).unwrap().scope, 200);
    }

    #[test]
    fn bad_route_fields_are_refused_naming_field_and_value() {
        let m = invalid(route(2, &route_of("10.0.0.1/24", "", "eth0", IPFamily::v4)));
        assert!(
            m.contains("Routes[2].dest \"10.0.0.1/24\" has bits set"),
            "{m}"
        );
        let m = invalid(route(0, &route_of("10.0.0.0/40", "", "eth0", IPFamily::v4)));
        assert!(m.contains("Routes[0].dest \"10.0.0.0/40\""), "{m}");
        let m = invalid(route(0, &route_of("", "fd00::1", "eth0", IPFamily::v4)));
        assert!(
            m.contains("Routes[0].gateway \"fd00::1\" is not an IPv4"),
            "{m}"
        );
        let m = invalid(route(0, &route_of("", "10.0.0.1", "", IPFamily::v4)));
        assert!(m.contains("Routes[0].device is empty"), "{m}");
        let mut r = route_of("", "10.0.0.1", "eth0", IPFamily::v4);
        r.scope = 256;
        assert!(invalid(route(0, &r)).contains("Routes[0].scope 256"));
        let mut r = route_of("", "10.0.0.1", "eth0", IPFamily::v4);
        r.family = EnumOrUnknown::from_i32(7);
        assert!(invalid(route(0, &r)).contains("Routes[0].family 7"));
    }

    #[test]
    fn a_route_source_is_its_preferred_address_with_or_without_a_host_prefix() {
        let mut r = route_of("10.0.0.0/24", "", "eth0", IPFamily::v4);
        r.source = "10.0.0.5/32".into();
        r.flags = ROUTE_ONLINK;
        let parsed = route(0, &r).unwrap();
        assert_eq!(parsed.source, Some("10.0.0.5".parse().unwrap()));
        assert!(parsed.onlink);
        r.source = "10.0.0.5".into();
        assert_eq!(
            route(0, &r).unwrap().source,
            Some("10.0.0.5".parse().unwrap())
        );
        r.source = "10.0.0.0/24".into();
        assert!(invalid(route(0, &r)).contains("Routes[0].source \"10.0.0.0/24\""));
    }

    #[test]
    fn a_neighbour_without_state_is_permanent() {
        let mut n = types::ARPNeighbor::new();
        n.toIPAddress = Some(ip(IPFamily::v4, "10.0.0.9", "")).into();
        n.device = "eth0".into();
        n.lladdr = "02:00:00:00:00:09".into();
        let req = neighbor(0, &n).unwrap();
        assert_eq!(req.state, NUD_PERMANENT);
        assert_eq!(req.lladdr.as_deref(), Some(&[2, 0, 0, 0, 0, 9][..]));
        n.lladdr.clear();
        n.state = 2;
        let req = neighbor(0, &n).unwrap();
        assert_eq!((req.state, req.lladdr), (2, None));
        n.lladdr = "zz".into();
        assert!(invalid(neighbor(3, &n)).contains("ARPNeighbors[3].lladdr \"zz\""));
        n.lladdr.clear();
        n.toIPAddress = None.into();
        assert!(invalid(neighbor(3, &n)).contains("ARPNeighbors[3].toIPAddress is missing"));
    }

    #[test]
    fn hardware_addresses_are_written_lowercase() {
        assert_eq!(
            format_hardware_address(&[0x52, 0x54, 0, 0xab, 0xcd, 1]),
            "52:54:00:ab:cd:01"
        );
    }
}
