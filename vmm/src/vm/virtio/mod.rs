//! virtio devices and the transport that exposes them to the guest.
//!
//! A device model ([`VirtioDevice`]) knows its queues, features and config
//! space and serves the queues once activated; it knows nothing about how
//! the guest reaches it. [`MmioTransport`] puts a device on the MMIO bus
//! with the virtio-mmio (version 2) register layout, runs the driver's
//! status handshake, and hands the device its queues when the driver is
//! ready.

pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;
pub(crate) mod worker;

pub use mmio::MmioTransport;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The guest's memory, as devices access it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
/// The guest's memory behind a handle devices can keep across threads.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;

/// Raises a device's interrupt toward the guest.
pub trait Interrupt: Send + Sync {
    /// Tells the driver the device put buffers in a used ring.
    fn signal_used_queue(&self) -> io::Result<()>;
    /// Tells the driver the device's config space changed.
    fn signal_config_change(&self) -> io::Result<()>;
}

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A host resource (eventfd, thread, socket) could not be set up.
    #[error("activating the device: {0}")]
    Io(#[from] io::Error),
    /// The driver left this queue unready or configured it out of spec
    /// (size, alignment, rings outside guest memory).
    #[error("virtio queue {0} is not ready or not valid")]
    InvalidQueue(usize),
    /// The device model refused to start.
    #[error("{0}")]
    Device(String),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_NET` = 1, `VIRTIO_ID_VSOCK` = 19, ...).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the length is the number of queues.
    /// Each size is a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device features offered to the driver. The transport always adds
    /// `VIRTIO_F_VERSION_1` (bit 32).
    fn features(&self) -> u64;

    /// The features the driver accepted, masked with what was offered
    /// (including `VIRTIO_F_VERSION_1`). Called once per negotiation, before
    /// [`activate`](Self::activate).
    fn ack_features(&mut self, features: u64);

    /// Reads `data.len()` bytes of config space at `offset`; bytes beyond
    /// the config space read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` to config space at `offset`; the device ignores writes
    /// to read-only or nonexistent fields.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Driver set DRIVER_OK: the device starts serving. `queues[i]` is ready
    /// and valid; `queue_evts[i]` fires when the driver notifies queue i.
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<virtio_queue::Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;

    /// Driver wrote status 0 after activation: stop serving, give queues
    /// back. Returns false if the device cannot reset (transport then sets
    /// DEVICE_NEEDS_RESET / logs).
    fn reset(&mut self) -> bool;
}
