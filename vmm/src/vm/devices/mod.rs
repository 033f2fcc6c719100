//! Legacy PC devices on the port I/O bus: the COM1 serial console and the
//! i8042 controller, whose only job is to let the guest reboot (= stop) the
//! VM.
//!
//! Both are thin [`BusDevice`](super::bus::BusDevice) adapters around the
//! `vm-superio` models; the models signal the VMM through [`EventFdTrigger`].

pub mod i8042;
pub mod serial;

pub use i8042::{I8042, I8042_BASE, I8042_LEN};
pub use serial::{SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN};

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// A `vm-superio` [`Trigger`](vm_superio::Trigger) that signals an eventfd:
/// an irqfd for interrupts, or an eventfd the VMM watches for resets.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; every trigger adds 1 to its counter.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd this trigger signals.
    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
