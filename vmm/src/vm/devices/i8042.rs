//! The i8042 PS/2 controller, reduced to what a VM without a keyboard
//! needs: the CPU reset command, which is how a Linux guest with
//! `reboot=k` reboots, and which the VMM treats as "the guest is done".
//!
//! The model is `vm_superio::I8042Device`: every register reads 0, so the
//! status register never reports pending input or a busy controller and the
//! guest's i8042 probe and reset loops finish at once.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::vm::bus::BusDevice;

/// The controller's data port; the command/status port is at offset 4.
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..0x65, the data port through the command/status port.
pub const I8042_LEN: u64 = 5;

/// The i8042 on the port I/O bus.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest issues the CPU
    /// reset command (0xFE written to port 0x64).
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            device: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.device.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => {
                if let Err(err) = self.device.write(offset, *byte) {
                    tracing::error!(error = %err, "signalling the guest's reset request failed");
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "ignoring odd i8042 write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMAND: u64 = 4;
    const CMD_RESET_CPU: u8 = 0xfe;

    fn i8042() -> (I8042, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn reset_command_signals_the_exit_eventfd() {
        let (mut i8042, evt) = i8042();

        i8042.write(I8042_BASE, COMMAND, &[CMD_RESET_CPU]);

        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_do_not_end_the_vm() {
        let (mut i8042, evt) = i8042();

        i8042.write(I8042_BASE, COMMAND, &[0x20]);
        i8042.write(I8042_BASE, 0, &[CMD_RESET_CPU]);

        assert!(evt.read().is_err());
    }

    #[test]
    fn status_reads_report_an_idle_controller() {
        let (mut i8042, _evt) = i8042();
        let mut data = [0xffu8];

        i8042.read(I8042_BASE, COMMAND, &mut data);

        assert_eq!(data, [0]);
    }
}
