//! The COM1 8250/16550A UART the guest kernel uses as its console
//! (`console=ttyS0`).
//!
//! The register model is `vm_superio::Serial`; this module puts it on the
//! port I/O bus and raises its interrupt through an eventfd the VMM
//! registers as an irqfd for [`COM1_GSI`]. Guest input is not wired: the
//! console is an output-only log.

use std::io::{self, Write};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::vm::bus::BusDevice;

/// COM1's first I/O port.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports an 8250 decodes.
pub const COM1_LEN: u64 = 8;
/// COM1's legacy interrupt line.
pub const COM1_GSI: u32 = 4;

/// COM1 on the port I/O bus, writing what the guest transmits to a host
/// writer.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// A broken console writer (closed pipe, full disk) would otherwise log
    /// once per guest byte.
    output_error_logged: bool,
}

impl SerialDevice {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            serial: Serial::new(EventFdTrigger::new(irq), out),
            output_error_logged: false,
        })
    }

    /// The eventfd signalled when the UART raises its interrupt; register it
    /// as an irqfd for [`COM1_GSI`].
    pub fn irq_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().evt()
    }

    fn report(&mut self, err: SerialError<io::Error>) {
        match err {
            SerialError::IOError(err) => {
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    tracing::warn!(
                        error = %err,
                        "serial console output failed; later failures are not logged"
                    );
                }
            }
            SerialError::Trigger(err) => {
                tracing::error!(error = %err, "raising the serial interrupt failed");
            }
            // Only input enqueueing reports a full FIFO, and we never enqueue.
            SerialError::FullFifo => {}
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset @ 0..=7), [byte]) => *byte = self.serial.read(offset),
            (_, data) => {
                tracing::debug!(offset, len = data.len(), "ignoring odd serial read");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset @ 0..=7), [byte]) => {
                if let Err(err) = self.serial.write(offset, *byte) {
                    self.report(err);
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "ignoring odd serial write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const IER_THR_EMPTY: u8 = 0x02;
    const LSR_THR_EMPTY: u8 = 0x20;

    /// A writer the test can inspect after handing it to the device.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read_reg(serial: &mut SerialDevice, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(COM1_BASE, offset, &mut data);
        data[0]
    }

    #[test]
    fn bytes_written_to_thr_reach_the_writer() {
        let out = SharedBuf::default();
        let mut serial = SerialDevice::new(Box::new(out.clone())).unwrap();

        for byte in b"Linux version" {
            serial.write(COM1_BASE, THR, &[*byte]);
        }

        assert_eq!(out.0.lock().unwrap().as_slice(), b"Linux version");
    }

    #[test]
    fn line_status_reports_thr_empty() {
        let mut serial = SerialDevice::new(Box::new(io::sink())).unwrap();
        serial.write(COM1_BASE, THR, b"x");

        assert_ne!(read_reg(&mut serial, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn enabling_thr_empty_interrupt_signals_the_irq_eventfd() {
        let mut serial = SerialDevice::new(Box::new(io::sink())).unwrap();
        assert!(serial.irq_evt().read().is_err(), "no interrupt before IER");

        serial.write(COM1_BASE, IER, &[IER_THR_EMPTY]);

        assert_eq!(serial.irq_evt().read().unwrap(), 1);
    }

    #[test]
    fn broken_writer_keeps_the_guest_running() {
        let mut serial = SerialDevice::new(Box::new(BrokenPipe)).unwrap();
        serial.write(COM1_BASE, IER, &[IER_THR_EMPTY]);
        serial.irq_evt().read().unwrap();
        // Reading IIR acknowledges the THR-empty interrupt so the next byte
        // raises it again.
        read_reg(&mut serial, 2);

        serial.write(COM1_BASE, THR, b"a");
        serial.write(COM1_BASE, THR, b"b");

        assert!(serial.output_error_logged);
        assert!(serial.irq_evt().read().is_ok(), "THR-empty still raised");
    }

    #[test]
    fn accesses_wider_than_a_byte_are_ignored() {
        let out = SharedBuf::default();
        let mut serial = SerialDevice::new(Box::new(out.clone())).unwrap();

        serial.write(COM1_BASE, THR, b"ab");
        let mut data = [0xffu8; 2];
        serial.read(COM1_BASE, LSR, &mut data);

        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(data, [0, 0]);
    }
}
