//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only).
//!
//! One [`MmioTransport`] per device, on the MMIO bus at a page of its own.
//! It owns the driver-facing state — status handshake, feature
//! negotiation, queue configuration, interrupt status — and hands the
//! device ready, validated [`Queue`]s when the driver sets DRIVER_OK.
//!
//! Written here rather than taken from a crate: the rust-vmm crates we
//! build on stop at the queue (`virtio-queue`, which still does the queue
//! validation here), and the register file is small.
//!
//! A device gets all the queues it declares or none: a driver that leaves
//! one unready at DRIVER_OK gets DEVICE_NEEDS_RESET, because our devices
//! (vsock's rx, tx and event queues) need every one of them.
//!
//! Every register write comes from the guest, so nothing here trusts it: a
//! driver that breaks the protocol gets its write ignored (and logged) or
//! the device marked DEVICE_NEEDS_RESET, never a VMM panic.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, GuestMemoryAtomic, GuestMemoryMmap, Interrupt, VirtioDevice};
use crate::vm::bus::BusDevice;

/// Size of one transport's MMIO window: registers, then config space.
pub const MMIO_LEN: u64 = 0x1000;

/// "virt" in little-endian ASCII.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2: virtio 1.x without the legacy PFN queue layout.
const MMIO_VERSION: u32 = 2;
/// No vendor id is assigned to us; Linux only reports it.
const VENDOR_ID: u32 = 0;
/// Config space starts here; everything below is a 32-bit register.
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// Status values of the handshake, in the order the driver reaches them.
const S_ACKNOWLEDGED: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = S_ACKNOWLEDGED | VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

/// A queue as the driver configured it. Kept raw and turned into a
/// [`Queue`] only at DRIVER_OK, so an out-of-spec value is reported then
/// (DEVICE_NEEDS_RESET) instead of being silently replaced by a default
/// the driver does not know about.
#[derive(Debug)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The queue the device will serve, or why the driver's setup is not
    /// usable.
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, &'static str> {
        if !self.ready {
            return Err("not ready");
        }
        let mut queue = Queue::new(self.max_size).map_err(|_| "invalid maximum size")?;
        let size = u16::try_from(self.size).map_err(|_| "size too large")?;
        queue
            .try_set_size(size)
            .map_err(|_| "size is 0, above the maximum or not a power of two")?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| "descriptor table misaligned")?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| "available ring misaligned")?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| "used ring misaligned")?;
        queue.set_ready(true);
        queue.set_event_idx(event_idx);
        if !queue.is_valid(mem) {
            return Err("rings outside guest memory");
        }
        Ok(queue)
    }
}

/// The transport's interrupt: an InterruptStatus bit plus a pulse on the
/// irqfd. Shared with the activated device, which signals from its own
/// thread.
struct MmioInterrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, reason: u32) -> io::Result<()> {
        // The bit must be visible before the guest's handler reads
        // InterruptStatus, hence set before the irqfd fires.
        self.status.fetch_or(reason, Ordering::SeqCst);
        self.irq_evt.write(1)
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    fn signal_config_change(&self) -> io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }
}

/// A virtio device on the MMIO bus, as virtio-mmio version 2 lays it out.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryAtomic,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    status: u32,
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

impl MmioTransport {
    /// Puts `device` behind a virtio-mmio register file. `irq_evt` is
    /// signalled for every interrupt; register it as an irqfd for the
    /// device's GSI. Fails if an eventfd cannot be created or the device
    /// reports a queue maximum size that is not a power of two up to 32768.
    pub fn new(
        mem: GuestMemoryAtomic,
        device: Box<dyn VirtioDevice>,
        irq_evt: EventFd,
    ) -> io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| match Queue::new(max_size) {
                Ok(_) => Ok(QueueConfig::new(max_size)),
                Err(err) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("virtio queue {index} maximum size {max_size}: {err}"),
                )),
            })
            .collect::<io::Result<Vec<_>>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                irq_evt,
            }),
            queues,
            queue_evts,
            status: 0,
            activated: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        })
    }

    /// One eventfd per queue, signalled when the driver notifies that
    /// queue. Register each with KVM as an ioeventfd on QueueNotify
    /// (`base + 0x50`) matching the queue index, so a notify doesn't exit to
    /// user space; a notify that does exit signals the same eventfd.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Whether the device is serving its queues (DRIVER_OK accepted and no
    /// reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VERSION_1
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = self.offered_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.max_size)),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            // Config spaces are fixed when the device is created, so a
            // driver's multi-read of config never sees it change.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!(offset, "read of unknown or write-only virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => tracing::debug!(
                offset,
                value,
                "write to unknown or read-only virtio-mmio register"
            ),
        }
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are only negotiable between DRIVER and FEATURES_OK.
        if self.status != S_DRIVER {
            tracing::warn!(
                status = self.status,
                "driver features written outside negotiation; ignored"
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => tracing::debug!(sel, "driver features written to a page beyond 64 bits"),
        }
    }

    fn write_queue(&mut self, offset: u32, value: u32) {
        // The spec lets the driver configure queues after FEATURES_OK and
        // before DRIVER_OK; afterwards the device is using them.
        if self.status != S_FEATURES_OK {
            tracing::warn!(
                offset,
                status = self.status,
                "virtio queue configured outside setup; ignored"
            );
            return;
        }
        let queue_sel = self.queue_sel;
        let Some(queue) = self.queues.get_mut(queue_sel as usize) else {
            tracing::warn!(
                queue_sel,
                "virtio queue register written for a queue that does not exist"
            );
            return;
        };
        if offset == VIRTIO_MMIO_QUEUE_READY {
            queue.ready = value == 1;
            return;
        }
        if queue.ready {
            tracing::warn!(
                offset,
                queue_sel,
                "virtio queue reconfigured while ready; ignored"
            );
            return;
        }
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => queue.size = value,
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut queue.desc_table, value),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut queue.desc_table, value),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut queue.avail_ring, value),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut queue.avail_ring, value),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut queue.used_ring, value),
            VIRTIO_MMIO_QUEUE_USED_HIGH => set_high(&mut queue.used_ring, value),
            _ => {}
        }
    }

    fn notify(&self, queue_index: u32) {
        match self.queue_evts.get(queue_index as usize) {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    tracing::error!(
                        queue_index,
                        error = %err,
                        "signalling a virtio queue notification failed"
                    );
                }
            }
            None => tracing::debug!(queue_index, "notification for a queue that does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!(status = value, "virtio driver gave up on the device");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if self.status & !value != 0 {
            tracing::warn!(
                old = self.status,
                new = value,
                "virtio status bits cleared without a reset; ignored"
            );
            return;
        }
        match (self.status, added) {
            (_, 0) => {}
            (0, VIRTIO_CONFIG_S_ACKNOWLEDGE) | (S_ACKNOWLEDGED, VIRTIO_CONFIG_S_DRIVER) => {
                self.status = value
            }
            (S_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK) => self.accept_features(),
            (S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK) => self.start_device(),
            (old, _) => {
                tracing::warn!(
                    old,
                    new = value,
                    "virtio status transition out of order; ignored"
                )
            }
        }
    }

    fn accept_features(&mut self) {
        // Without VERSION_1 the driver expects the legacy interface, which
        // this transport does not speak; leaving FEATURES_OK clear tells it
        // the device refused.
        if self.driver_features & VERSION_1 == 0 {
            tracing::warn!(
                features = self.driver_features,
                "virtio driver did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK"
            );
            return;
        }
        let acked = self.driver_features & self.offered_features();
        self.device.ack_features(acked);
        self.status = S_FEATURES_OK;
    }

    fn start_device(&mut self) {
        match self.activate() {
            Ok(()) => {
                self.activated = true;
                self.status = S_DRIVER_OK;
            }
            Err(err) => {
                tracing::error!(
                    device_type = self.device.device_type(),
                    error = %err,
                    "virtio device activation failed; it needs a reset"
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & self.offered_features() & EVENT_IDX != 0;
        let queues = {
            let mem = self.mem.memory();
            self.queues
                .iter()
                .enumerate()
                .map(|(index, config)| {
                    config.build(&mem, event_idx).map_err(|reason| {
                        tracing::warn!(queue_index = index, reason, "virtio queue unusable");
                        ActivateError::InvalidQueue(index)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        self.device
            .activate(self.mem.clone(), interrupt, queues, queue_evts)
    }

    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                tracing::error!(
                    device_type = self.device.device_type(),
                    "virtio device cannot reset; it stays unusable"
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(QueueConfig::reset);
        self.interrupt.status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match register_access(offset, data.len()) {
            Some(register) => data.copy_from_slice(&self.read_register(register).to_le_bytes()),
            None => {
                tracing::debug!(
                    offset,
                    len = data.len(),
                    "virtio-mmio register read that is not 32-bit aligned"
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match (
            register_access(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            (Some(register), Ok(bytes)) => self.write_register(register, u32::from_le_bytes(bytes)),
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write that is not 32-bit aligned; ignored"
            ),
        }
    }
}

/// The register at `offset` if the access is the aligned 32-bit one the
/// spec requires below the config space.
fn register_access(offset: u64, len: usize) -> Option<u32> {
    if len == 4 && offset.is_multiple_of(4) {
        u32::try_from(offset).ok()
    } else {
        None
    }
}

fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const DEVICE_TYPE: u32 = 19;
    /// Two device-specific bits, one on each feature page.
    const DEVICE_FEATURES: u64 = (1 << 3) | (1 << 45);
    const QUEUE_MAX: u16 = 256;
    const MEM_SIZE: usize = 1 << 20;

    /// What the dummy device saw, shared with the test.
    #[derive(Default)]
    struct Seen {
        acked_features: Option<u64>,
        /// (size, desc table, avail ring, used ring) of each queue, per
        /// activation.
        activations: Vec<Vec<(u16, u64, u64, u64)>>,
        queue_evts: usize,
        interrupt: Option<Arc<dyn Interrupt>>,
        resets: usize,
        refuse_activate: bool,
        refuse_reset: bool,
    }

    struct Dummy {
        seen: Arc<Mutex<Seen>>,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            DEVICE_TYPE
        }

        fn queue_max_sizes(&self) -> &[u16] {
            &[QUEUE_MAX, QUEUE_MAX]
        }

        fn features(&self) -> u64 {
            DEVICE_FEATURES
        }

        fn ack_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked_features = Some(features);
        }

        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                let at = offset as usize + i;
                *byte = self.config.get(at).copied().unwrap_or(0);
            }
        }

        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, byte) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = *byte;
                }
            }
        }

        fn activate(
            &mut self,
            _mem: GuestMemoryAtomic,
            interrupt: Arc<dyn Interrupt>,
            queues: Vec<Queue>,
            queue_evts: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            let mut seen = self.seen.lock().unwrap();
            if seen.refuse_activate {
                return Err(ActivateError::Device("backend unavailable".into()));
            }
            seen.activations.push(
                queues
                    .iter()
                    .map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
                    .collect(),
            );
            seen.queue_evts = queue_evts.len();
            seen.interrupt = Some(interrupt);
            Ok(())
        }

        fn reset(&mut self) -> bool {
            let mut seen = self.seen.lock().unwrap();
            if seen.refuse_reset {
                return false;
            }
            seen.resets += 1;
            seen.interrupt = None;
            true
        }
    }

    /// A transport and the pieces a test pokes at, driven like Linux's
    /// virtio_mmio driver does.
    struct Guest {
        transport: MmioTransport,
        seen: Arc<Mutex<Seen>>,
        irq_evt: EventFd,
    }

    /// Queue i's rings: desc table, avail ring, used ring.
    fn rings(index: u32) -> (u64, u64, u64) {
        let base = 0x1_0000 * u64::from(index + 1);
        (base, base + 0x1000, base + 0x2000)
    }

    impl Guest {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let seen = Arc::new(Mutex::new(Seen::default()));
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let device = Dummy {
                seen: seen.clone(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
            };
            let transport = MmioTransport::new(
                GuestMemoryAtomic::new(mem),
                Box::new(device),
                irq_evt.try_clone().unwrap(),
            )
            .unwrap();
            Self {
                transport,
                seen,
                irq_evt,
            }
        }

        fn read(&mut self, offset: u32) -> u32 {
            let mut data = [0u8; 4];
            self.transport.read(0, u64::from(offset), &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, offset: u32, value: u32) {
            self.transport
                .write(0, u64::from(offset), &value.to_le_bytes());
        }

        fn status(&mut self) -> u32 {
            self.read(VIRTIO_MMIO_STATUS)
        }

        fn add_status(&mut self, bit: u32) {
            let status = self.status();
            self.write(VIRTIO_MMIO_STATUS, status | bit);
        }

        fn device_features(&mut self) -> u64 {
            self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
            let high = u64::from(self.read(VIRTIO_MMIO_DEVICE_FEATURES));
            self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
            let low = u64::from(self.read(VIRTIO_MMIO_DEVICE_FEATURES));
            (high << 32) | low
        }

        fn write_driver_features(&mut self, features: u64) {
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        }

        /// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK.
        fn negotiate(&mut self, features: u64) {
            self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.add_status(VIRTIO_CONFIG_S_DRIVER);
            self.write_driver_features(features);
            self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        }

        fn setup_queue(&mut self, index: u32, size: u32, (desc, avail, used): (u64, u64, u64)) {
            self.write(VIRTIO_MMIO_QUEUE_SEL, index);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_READY), 0);
            self.write(VIRTIO_MMIO_QUEUE_NUM, size);
            self.write(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
            self.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
            self.write(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        }

        /// The whole probe: negotiate, set up both queues with 16 entries,
        /// DRIVER_OK.
        fn start(&mut self) {
            self.negotiate(VERSION_1);
            for index in 0..2 {
                self.setup_queue(index, 16, rings(index));
            }
            self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        }

        fn activations(&self) -> usize {
            self.seen.lock().unwrap().activations.len()
        }
    }

    #[test]
    fn identifies_as_a_virtio_mmio_v2_device() {
        let mut guest = Guest::new();

        assert_eq!(guest.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(&guest.read(VIRTIO_MMIO_MAGIC_VALUE).to_le_bytes(), b"virt");
        assert_eq!(guest.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(guest.read(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
        assert_eq!(guest.status(), 0);
    }

    #[test]
    fn device_features_span_both_selector_pages_and_include_version_1() {
        let mut guest = Guest::new();

        assert_eq!(guest.device_features(), DEVICE_FEATURES | VERSION_1);
        guest.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(guest.read(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn accepted_features_reach_the_device_masked_with_the_offer() {
        let mut guest = Guest::new();
        let not_offered = 1 << 7;

        guest.negotiate(DEVICE_FEATURES | VERSION_1 | not_offered);

        assert_eq!(guest.status(), S_FEATURES_OK);
        assert_eq!(
            guest.seen.lock().unwrap().acked_features,
            Some(DEVICE_FEATURES | VERSION_1)
        );
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let mut guest = Guest::new();

        guest.negotiate(DEVICE_FEATURES);

        assert_eq!(guest.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(guest.seen.lock().unwrap().acked_features, None);
    }

    #[test]
    fn driver_ok_activates_the_device_once_with_the_configured_queues() {
        let mut guest = Guest::new();
        guest.write(VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(guest.read(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
        guest.write(VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(guest.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no third queue");

        guest.start();
        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert!(guest.transport.is_activated());
        assert_eq!(guest.status(), S_DRIVER_OK);
        let seen = guest.seen.lock().unwrap();
        let (desc0, avail0, used0) = rings(0);
        let (desc1, avail1, used1) = rings(1);
        assert_eq!(
            seen.activations,
            vec![vec![(16, desc0, avail0, used0), (16, desc1, avail1, used1)]]
        );
        assert_eq!(seen.queue_evts, 2);
    }

    #[test]
    fn config_space_is_the_devices_at_any_width() {
        let mut guest = Guest::new();
        let mut byte = [0u8; 1];
        let mut word = [0u8; 2];
        let mut quad = [0u8; 8];

        guest.transport.read(0, CONFIG_OFFSET + 2, &mut byte);
        guest.transport.read(0, CONFIG_OFFSET + 1, &mut word);
        guest.transport.read(0, CONFIG_OFFSET, &mut quad);

        assert_eq!(byte, [3]);
        assert_eq!(word, [2, 3]);
        assert_eq!(quad, [1, 2, 3, 4, 5, 6, 7, 8]);

        guest.transport.write(0, CONFIG_OFFSET + 6, &[0xaa, 0xbb]);
        assert_eq!(guest.read(VIRTIO_MMIO_CONFIG + 4), 0xbbaa_0605);
    }

    #[test]
    fn interrupt_status_holds_signalled_reasons_until_acked() {
        let mut guest = Guest::new();
        guest.start();
        let interrupt = guest.seen.lock().unwrap().interrupt.clone().unwrap();

        interrupt.signal_used_queue().unwrap();
        assert_eq!(guest.irq_evt.read().unwrap(), 1);
        assert_eq!(
            guest.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        interrupt.signal_config_change().unwrap();
        assert_eq!(
            guest.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );

        guest.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        assert_eq!(
            guest.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn queue_notify_signals_that_queues_eventfd() {
        let mut guest = Guest::new();
        guest.start();

        guest.write(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        guest.write(VIRTIO_MMIO_QUEUE_NOTIFY, 7);

        assert!(guest.transport.queue_evts()[0].read().is_err());
        assert_eq!(guest.transport.queue_evts()[1].read().unwrap(), 1);
    }

    #[test]
    fn status_zero_resets_the_device_and_clears_queues() {
        let mut guest = Guest::new();
        guest.start();
        guest
            .seen
            .lock()
            .unwrap()
            .interrupt
            .clone()
            .unwrap()
            .signal_used_queue()
            .unwrap();

        guest.write(VIRTIO_MMIO_STATUS, 0);

        assert_eq!(guest.seen.lock().unwrap().resets, 1);
        assert!(!guest.transport.is_activated());
        assert_eq!(guest.status(), 0);
        assert_eq!(guest.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        for index in 0..2 {
            guest.write(VIRTIO_MMIO_QUEUE_SEL, index);
            assert_eq!(guest.read(VIRTIO_MMIO_QUEUE_READY), 0);
        }

        // The driver can probe again from scratch.
        guest.start();
        assert_eq!(guest.activations(), 2);
    }

    #[test]
    fn reset_the_device_refuses_leaves_it_needing_reset() {
        let mut guest = Guest::new();
        guest.start();
        guest.seen.lock().unwrap().refuse_reset = true;

        guest.write(VIRTIO_MMIO_STATUS, 0);

        assert!(guest.transport.is_activated());
        assert_ne!(guest.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_writes_after_driver_ok_are_ignored() {
        let mut guest = Guest::new();
        guest.start();
        let (desc0, avail0, used0) = rings(0);

        guest.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        guest.write(VIRTIO_MMIO_QUEUE_READY, 0);
        guest.write(VIRTIO_MMIO_QUEUE_NUM, 32);
        guest.write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);

        assert_eq!(guest.read(VIRTIO_MMIO_QUEUE_READY), 1);
        let config = &guest.transport.queues[0];
        assert_eq!(
            (
                config.size,
                config.desc_table,
                config.avail_ring,
                config.used_ring
            ),
            (16, desc0, avail0, used0)
        );
    }

    #[test]
    fn queue_writes_while_the_queue_is_ready_are_ignored() {
        let mut guest = Guest::new();
        guest.negotiate(VERSION_1);
        guest.setup_queue(0, 16, rings(0));

        guest.write(VIRTIO_MMIO_QUEUE_NUM, 3);
        guest.setup_queue(1, 16, rings(1));
        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(guest.activations(), 1);
        assert_eq!(guest.seen.lock().unwrap().activations[0][0].0, 16);
    }

    #[test]
    fn queue_size_not_a_power_of_two_needs_reset_instead_of_activating() {
        let mut guest = Guest::new();
        guest.negotiate(VERSION_1);
        guest.setup_queue(0, 3, rings(0));
        guest.setup_queue(1, 16, rings(1));

        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(guest.activations(), 0);
        assert!(!guest.transport.is_activated());
        assert_ne!(guest.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn rings_outside_guest_memory_need_reset_instead_of_activating() {
        let mut guest = Guest::new();
        guest.negotiate(VERSION_1);
        guest.setup_queue(0, 16, rings(0));
        let beyond = MEM_SIZE as u64;
        guest.setup_queue(1, 16, (beyond, beyond + 0x1000, beyond + 0x2000));

        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(guest.activations(), 0);
        assert_ne!(guest.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn unready_queue_needs_reset_instead_of_activating() {
        let mut guest = Guest::new();
        guest.negotiate(VERSION_1);
        guest.setup_queue(0, 16, rings(0));

        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(guest.activations(), 0);
        assert_ne!(guest.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn device_activation_error_needs_reset() {
        let mut guest = Guest::new();
        guest.seen.lock().unwrap().refuse_activate = true;

        guest.start();

        assert!(!guest.transport.is_activated());
        assert_ne!(guest.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(guest.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }

    #[test]
    fn status_steps_out_of_order_are_ignored() {
        let mut guest = Guest::new();

        guest.write(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
        assert_eq!(guest.status(), 0);
        guest.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        guest.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(guest.status(), S_ACKNOWLEDGED);
        assert_eq!(guest.activations(), 0);
    }

    #[test]
    fn driver_failure_is_recorded_in_status() {
        let mut guest = Guest::new();
        guest.negotiate(VERSION_1);

        guest.add_status(VIRTIO_CONFIG_S_FAILED);

        assert_eq!(guest.status(), S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn odd_width_register_accesses_are_ignored() {
        let mut guest = Guest::new();
        guest.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);

        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xffu8; len];
            guest.transport.read(0, 0, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len}-byte read of magic");
            guest
                .transport
                .write(0, u64::from(VIRTIO_MMIO_STATUS), &vec![0xff; len]);
        }
        let mut data = [0xffu8; 4];
        guest.transport.read(0, 2, &mut data);
        assert_eq!(data, [0; 4], "misaligned 32-bit read");
        guest
            .transport
            .write(0, u64::from(VIRTIO_MMIO_STATUS) + 2, &[0xff; 4]);

        assert_eq!(guest.status(), S_ACKNOWLEDGED);
    }
}
