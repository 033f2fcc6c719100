//! Port and MMIO buses: route a guest access that exited to user space to
//! the device that owns the address.
//!
//! The VMM keeps two [`Bus`] instances, one for port I/O and one for MMIO.
//! Each vCPU thread holds a clone; clones share the devices (they sit behind
//! `Arc<Mutex<_>>`) but not the address map, so the map is built completely
//! before the vCPUs start.
//!
//! Written by hand rather than taken from rust-vmm's `vm-device`: that crate
//! is not among our dependencies and brings its own device and address
//! traits, while a sorted range map is all the vCPU exit path needs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A device that answers guest accesses on a [`Bus`].
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset` bytes into the
    /// range the device was inserted at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);

    /// Handles a guest write of `data` at `offset` bytes into the range the
    /// device was inserted at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// The range is empty.
    #[error("bus range of length 0")]
    ZeroLength,
    /// The range runs past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} runs past the end of the address space")]
    Wraps {
        /// Start of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

#[derive(Clone)]
struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges mapped to the devices that serve them.
#[derive(Default, Clone)]
pub struct Bus {
    /// Keyed by range start; ranges never overlap, so the last range starting
    /// at or below an address is the only one that can hold it.
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength);
        }
        let end = base.checked_add(len).ok_or(BusError::Wraps { base, len })?;
        let overlaps_lower = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(start, range)| start + range.len > base);
        let overlaps_upper = self.ranges.range(base..end).next().is_some();
        if overlaps_lower || overlaps_upper {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// Reads from the device mapped at `addr`; returns false when no device
    /// is there (the caller decides what the guest sees).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, device)) => {
                lock(device).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device mapped at `addr`; returns false when no device
    /// is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, device)) => {
                lock(device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    fn lookup(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        // `addr >= base` here, so the subtraction cannot underflow.
        (addr - base < range.len).then_some((base, &range.device))
    }
}

/// Locks a device even if another vCPU panicked while holding it: one
/// vCPU's bug must not take the others down with it, and device state is
/// still consistent enough to serve the guest.
fn lock(device: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access; reads answer with the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.last = Some((base, offset, data.to_vec()));
        }

        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn bus_can_be_shared_by_vcpu_threads() {
        assert_send_sync::<Bus>();
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(probe(), 0x100, 0x10).unwrap();

        for (base, len) in [(0x100, 0x10), (0xf8, 0x9), (0x10f, 1), (0x80, 0x100)] {
            assert_eq!(
                bus.insert(probe(), base, len),
                Err(BusError::Overlap { base, len }),
                "{base:#x}+{len:#x}"
            );
        }
        // Touching ranges on either side are fine.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
    }

    #[test]
    fn empty_and_wrapping_ranges_are_refused() {
        let mut bus = Bus::default();
        assert_eq!(bus.insert(probe(), 0x100, 0), Err(BusError::ZeroLength));
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Wraps {
                base: u64::MAX,
                len: 2
            })
        );
    }

    #[test]
    fn accesses_at_range_edges_reach_the_device_with_its_offset() {
        let mut bus = Bus::default();
        let device = probe();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3f8, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.read(0x3ff, &mut data));
        assert_eq!(data, [7]);
        assert!(bus.write(0x3ff, &[0xab]));
        assert_eq!(device.lock().unwrap().last, Some((0x3f8, 7, vec![0xab])));
    }

    #[test]
    fn unmapped_addresses_report_no_device() {
        let mut bus = Bus::default();
        let device = probe();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0, &[1]));
        assert!(!Bus::default().read(0x3f8, &mut data));
        assert_eq!(device.lock().unwrap().last, None);
    }

    #[test]
    fn poisoned_device_still_serves_other_vcpus() {
        let mut bus = Bus::default();
        let device = probe();
        bus.insert(device.clone(), 0x60, 5).unwrap();

        let poisoner = device.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("vCPU thread dies holding the device");
        })
        .join();
        assert!(device.is_poisoned());

        let mut data = [0u8; 1];
        assert!(bus.read(0x64, &mut data));
        assert_eq!(data, [4]);
    }
}
