//! What one `--net` option asks for: which inherited tap fd backs the NIC,
//! the guest's MAC address and MTU, and whether offloads are on.
//!
//! Parsed from `tap-fd=N,mac=aa:bb:cc:dd:ee:ff[,mtu=1500][,offload=on|off]`.
//! Only the text is checked here; whether the fd really is a tap is
//! [`super::tap`]'s job, when the VM is built.

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;

/// The MTU the guest gets unless `mtu=` says otherwise: Ethernet's.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU IPv4 allows (RFC 791); Linux refuses less.
pub const MIN_MTU: u16 = 68;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for Mac {
    type Err = NetConfigError;

    /// Six hex octets separated by `:`, unicast (the group bit of the
    /// first octet clear) and not all zero: the guest's driver would refuse
    /// either as its own address and pick a random one, which the host's
    /// plumbing (tc mirroring, neighbour entries) would not know.
    fn from_str(s: &str) -> Result<Mac, NetConfigError> {
        let bad = || NetConfigError::Mac(s.to_string());
        let mut mac = [0u8; 6];
        let mut octets = s.split(':');
        for byte in &mut mac {
            let octet = octets.next().ok_or_else(bad)?;
            if octet.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(octet, 16).map_err(|_| bad())?;
        }
        if octets.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(NetConfigError::Multicast(s.to_string()));
        }
        if mac == [0; 6] {
            return Err(NetConfigError::ZeroMac);
        }
        Ok(Mac(mac))
    }
}

/// One guest NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// A tap the parent opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
    /// and left open across exec; the VMM takes it over.
    pub tap_fd: RawFd,
    pub mac: Mac,
    pub mtu: u16,
    /// Whether the device offers checksum and segmentation offloads, so
    /// that 64 KiB TCP segments cross between guest and tap unsplit.
    pub offload: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error(
        "`{0}` is not KEY=VALUE (expected tap-fd=N,mac=aa:bb:cc:dd:ee:ff[,mtu=N][,offload=on|off])"
    )]
    NotKeyValue(String),
    #[error("unknown key `{0}` (known: tap-fd, mac, mtu, offload)")]
    UnknownKey(String),
    #[error("`{0}` is given twice")]
    Repeated(String),
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("tap-fd `{0}` is not a file descriptor number")]
    TapFd(String),
    #[error("mac `{0}` is not six hex octets like aa:bb:cc:dd:ee:ff")]
    Mac(String),
    #[error("mac `{0}` is a multicast address (the first octet's lowest bit is set); a NIC needs a unicast one")]
    Multicast(String),
    #[error("mac 00:00:00:00:00:00 is not a usable address")]
    ZeroMac,
    #[error("mtu `{0}` is not a number from {MIN_MTU} to 65535")]
    Mtu(String),
    #[error("offload `{0}` is neither on nor off")]
    Offload(String),
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<NetConfig, NetConfigError> {
        let (mut tap_fd, mut mac, mut mtu, mut offload) = (None, None, None, None);
        for pair in s.split(',') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(pair.to_string()))?;
            let repeated = || NetConfigError::Repeated(key.to_string());
            match key {
                "tap-fd" => {
                    let fd = value
                        .parse::<RawFd>()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| NetConfigError::TapFd(value.to_string()))?;
                    tap_fd.replace(fd).map_or(Ok(()), |_| Err(repeated()))?;
                }
                "mac" => {
                    mac.replace(value.parse::<Mac>()?)
                        .map_or(Ok(()), |_| Err(repeated()))?;
                }
                "mtu" => {
                    let parsed = value
                        .parse::<u16>()
                        .ok()
                        .filter(|m| *m >= MIN_MTU)
                        .ok_or_else(|| NetConfigError::Mtu(value.to_string()))?;
                    mtu.replace(parsed).map_or(Ok(()), |_| Err(repeated()))?;
                }
                "offload" => {
                    let on = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(NetConfigError::Offload(value.to_string())),
                    };
                    offload.replace(on).map_or(Ok(()), |_| Err(repeated()))?;
                }
                _ => return Err(NetConfigError::UnknownKey(key.to_string())),
            }
        }
        Ok(NetConfig {
            tap_fd: tap_fd.ok_or(NetConfigError::Missing("tap-fd"))?,
            mac: mac.ok_or(NetConfigError::Missing("mac"))?,
            mtu: mtu.unwrap_or(DEFAULT_MTU),
            offload: offload.unwrap_or(true),
        })
    }
}
