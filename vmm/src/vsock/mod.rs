//! The virtio-vsock device core, independent of any transport.
//!
//! The guest's virtio-vsock driver exchanges packets with the device over
//! two virtqueues (RX: device to driver, TX: driver to device). This module
//! turns those packets into host Unix-socket streams the way Firecracker's
//! "hybrid vsock" does:
//!
//! - a host program connects to the VMM's Unix socket (`uds_path`), writes
//!   `CONNECT <port>\n` and, once the guest accepted, reads
//!   `OK <host_port>\n`; then the stream carries the connection's bytes.
//!   If nothing in the guest listens on the port, the socket is closed.
//! - a guest connection to host port `P` is connected to `<uds_path>_P`.
//!
//! Pieces, one file each (after Firecracker's layout):
//! - [`connection`]: one stream's state machine and credit accounting,
//! - [`unix`]: the host side: the listening socket, the `CONNECT` handshake,
//!   connecting to `<uds_path>_P`,
//! - [`muxer`]: routes packets to connections, schedules what goes to the
//!   guest, owns an epoll set of every host socket,
//! - [`queue`]: moves packets between virtqueues and the muxer; the MMIO
//!   device of the builtin VMM and the vhost-user backend both call it.

pub mod connection;
pub mod muxer;
pub mod queue;
pub mod unix;

pub use muxer::{Muxer, MuxerConfig, Refusals};

/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Where Kestrel guests live unless told otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Each connection's receive buffer: what we advertise to the guest as
/// `buf_alloc`, and the most the guest may have in flight towards the host.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;
/// Connections (established or in a handshake) one device serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Host connections that may be in their `CONNECT` handshake at once. Well
/// below [`DEFAULT_MAX_CONNECTIONS`], so connections that never send their
/// line cannot take the slots established ones need.
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;
/// How long a host connection may take to send its `CONNECT` line
/// (Firecracker allows the same).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The largest payload a single packet may carry in either direction.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Packet types and operations from the virtio specification (5.10.6).
pub mod op {
    pub const TYPE_STREAM: u16 = 1;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flag: the sender will receive no more data.
    pub const SHUTDOWN_RCV: u32 = 1;
    /// SHUTDOWN flag: the sender will send no more data.
    pub const SHUTDOWN_SEND: u32 = 2;
}

/// A vsock packet header, decoded. Kept as plain fields so the muxer and
/// connections never touch guest memory: only [`queue`] does, through
/// `vm-memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// The header's size on the wire.
pub const HEADER_SIZE: usize = 44;

impl Header {
    /// Decodes the little-endian wire layout.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the vsock socket {0} already exists (another VM, or a stale file to remove)")]
    SocketExists(std::path::PathBuf),
    #[error("binding the vsock socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock event set: {0}")]
    Epoll(#[source] std::io::Error),
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn header_round_trips_through_the_wire_layout() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 0x4000_0001,
            len: 17,
            type_: op::TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0xdead_beef,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), hdr);
    }
}

#[cfg(test)]
mod tests;
