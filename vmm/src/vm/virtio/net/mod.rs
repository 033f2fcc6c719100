//! The builtin VMM's virtio-net device: one guest NIC backed by a tap the
//! caller opened and handed down (`--net tap-fd=N,...`).
//!
//! Frames cross as Firecracker passes them: the 12-byte
//! `virtio_net_hdr_v1` the guest puts before each TX frame goes to the tap
//! unchanged (the tap has `IFF_VNET_HDR` with a header size of 12), and the
//! header the tap puts before each frame it hands us goes to the guest, so
//! checksum and segmentation offloads need no work here: the tap is told
//! (`TUNSETOFFLOAD`) which ones the guest's driver accepted. A header
//! that asks for an offload the driver did not negotiate is not ours to
//! fix: the host kernel checks every header a tap is given as untrusted
//! (`SKB_GSO_DODGY`), as it does for any program writing to a tap.
//!
//! Pieces, one file each:
//! - [`config`]: the `--net` option, parsed and checked as text,
//! - [`tap`]: taking over the inherited tap fd and its ioctls,
//! - [`queue`]: moves frames between the virtqueues and a [`Backend`]; the
//!   only code that touches guest memory (through `vm-memory`), and the
//!   place that refuses malformed descriptor chains,
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice): features,
//!   config space, and the thread whose event loop serves the queues.
//!
//! Why no `MRG_RXBUF`: without it each received frame goes to one
//! descriptor chain, and Linux then posts chains big enough for a 64 KiB
//! segment whenever it accepts `GUEST_TSO*` (Firecracker worked this way
//! for years); merging buffers would add a second RX path to get right.

pub mod config;
pub mod device;
pub mod queue;
pub mod tap;
#[cfg(test)]
pub(crate) mod tests;

pub use config::{Mac, NetConfig, NetConfigError};
pub use device::NetDevice;
pub use tap::{Tap, TapError};

use std::io;
use std::os::fd::AsRawFd;

/// Queue indices (virtio 1.1, 5.1.2): one RX/TX pair, no control queue.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
/// The size we offer for each queue.
pub const QUEUE_SIZE: u16 = 256;

/// `virtio_net_hdr_v1`: the header before every frame in both directions
/// once `VIRTIO_F_VERSION_1` is negotiated, and the size we set on the tap
/// with `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 12;
/// Where `num_buffers` sits in that header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// An Ethernet header; a frame shorter than this carries nothing.
pub const ETH_HLEN: usize = 14;
/// The longest frame either side may hand over: a 64 KiB segment
/// (`GSO_MAX_SIZE`) with its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65536 + ETH_HLEN + 4;
/// The longest header-and-frame the device copies in one piece.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Where the device's frames go and come from: the tap, or in tests a
/// `SOCK_SEQPACKET` socket, which keeps frame boundaries the way a tap
/// does. Non-blocking: a read with nothing to give fails with
/// `WouldBlock`.
pub trait Backend: AsRawFd + Send {
    /// Reads one frame, its `virtio_net_hdr_v1` first.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame, its `virtio_net_hdr_v1` first.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;

    /// The guest's driver accepted `features` (virtio-net feature bits):
    /// from now on hand it only the offloaded frames those allow.
    fn set_offload(&mut self, features: u64) -> io::Result<()>;
}

/// Why a NIC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("net device {index}: setting up its event set")]
    EventSet {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Thread(#[from] crate::seccomp::Error),
}
