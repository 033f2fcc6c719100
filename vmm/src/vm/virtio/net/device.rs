//! The virtio-net device (id 1) on the builtin VMM's virtio-mmio
//! transport: its features and config space, and the thread that serves
//! its queues.
//!
//! Like the vsock device, each NIC has a thread of its own, started with
//! the device before any vCPU runs and confined at once with the net
//! seccomp filter; activation hands it the queues, a reset takes them back.
//! Its event loop watches the two queue notifications (ioeventfds), the
//! backend, and a kill event. The backend is watched only while the guest
//! has RX buffers: with none, a readable tap would wake the loop for
//! nothing, so it leaves the set until the guest notifies the RX queue.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{process_rx, process_tx, RxStop, Scratch, Stats};
use super::{Backend, Error, NetConfig, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::seccomp::Filter;
use crate::vm::virtio::worker::{self, Worker};
use crate::vm::virtio::{ActivateError, GuestMemoryAtomic, Interrupt, VirtioDevice};

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Epoll tokens beyond the queue indices.
const BACKEND_TOKEN: u64 = NUM_QUEUES as u64;
const KILL_TOKEN: u64 = NUM_QUEUES as u64 + 1;

/// Offered always: the guest takes the MAC and MTU from config space.
const BASE_FEATURES: u64 = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU);
/// Offered with `offload=on`: checksums and segmentation both ways, all
/// done by the tap and the host stack on the passed-through header.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_UFO);

/// `struct virtio_net_config` up to `mtu` (virtio 1.1, 5.1.4): mac[6],
/// status, max_virtqueue_pairs, mtu, each a little-endian u16.
const CONFIG_LEN: usize = 12;

/// The features a NIC offers, VERSION_1 aside (the transport adds it).
pub fn offered_features(offload: bool) -> u64 {
    if offload {
        BASE_FEATURES | OFFLOAD_FEATURES
    } else {
        BASE_FEATURES
    }
}

#[derive(Debug)]
pub struct NetDevice {
    config_space: [u8; CONFIG_LEN],
    features: u64,
    acked: u64,
    worker: Worker<Serving>,
}

/// What the thread serves between an activation and a reset.
struct Serving {
    mem: GuestMemoryAtomic,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// What the driver accepted, for the backend's offloads.
    features: u64,
}

impl NetDevice {
    /// The guest NIC number `index` (0 is the guest's first, eth0), on
    /// `backend`. Starts the device thread, which confines itself with
    /// `seccomp` (the net filter; `None` with `--no-seccomp`) before this
    /// returns.
    pub fn new<B: Backend + 'static>(
        index: usize,
        backend: B,
        config: &NetConfig,
        seccomp: Option<Filter>,
    ) -> Result<NetDevice, Error> {
        let io_err = |source| Error::EventSet { index, source };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        let epoll = Epoll::new().map_err(io_err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, KILL_TOKEN),
            )
            .map_err(io_err)?;
        let mut core = Core {
            index,
            epoll,
            kill: kill.try_clone().map_err(io_err)?,
            backend,
            backend_watched: false,
            backend_gone: false,
            scratch: Scratch::default(),
            stats: Stats::default(),
        };
        let worker = Worker::spawn(
            "virtio-net",
            &format!("kestrel-net{index}"),
            seccomp,
            kill,
            move |activated, answer| core.run(activated, answer),
        )?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..6].copy_from_slice(&config.mac.0);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes());
        config_space[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        Ok(NetDevice {
            config_space,
            features: offered_features(config.offload),
            acked: 0,
            worker,
        })
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .checked_add(i)
                .and_then(|at| self.config_space.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only legacy drivers may write the MAC here; VERSION_1 ones use
        // the control queue, which this device does not have.
        tracing::debug!(
            offset,
            "guest wrote to the read-only virtio-net config space"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.worker
            .check_queues(NUM_QUEUES, queues.len(), queue_evts.len())?;
        self.worker.activate(Serving {
            mem,
            interrupt,
            queues,
            queue_evts,
            features: self.acked,
        })
    }

    fn reset(&mut self) -> bool {
        let reset = self.worker.reset();
        if reset {
            self.acked = 0;
        }
        reset
    }
}

/// What the device thread owns for the device's lifetime.
struct Core<B> {
    index: usize,
    /// The kill event, and while active the queue events and (while the
    /// guest has RX buffers) the backend.
    epoll: Epoll,
    kill: EventFd,
    backend: B,
    backend_watched: bool,
    /// The backend failed or closed; the device only transmits (into
    /// nothing) from then on.
    backend_gone: bool,
    scratch: Scratch,
    stats: Stats,
}

impl<B: Backend> Core<B> {
    /// Serves each activation until its reset, until the device is
    /// dropped.
    fn run(&mut self, activations: &Receiver<Serving>, answer: &Sender<io::Result<()>>) {
        while let Ok(mut serving) = activations.recv() {
            // The tap must hand the guest only the offloaded frames this
            // driver accepted, whatever an earlier driver took.
            let started = self
                .backend
                .set_offload(serving.features)
                .and_then(|()| self.watch(&serving.queue_evts));
            if let Err(e) = started {
                let _ = answer.send(Err(e));
                continue;
            }
            let _ = answer.send(Ok(()));
            let outcome = serving.run(self);
            self.unwatch(&serving.queue_evts);
            self.watch_backend(false);
            if let Err(e) = outcome {
                tracing::error!(
                    index = self.index,
                    error = %e,
                    "virtio-net event loop failed; the device stops"
                );
                return;
            }
            let _ = answer.send(Ok(()));
        }
    }

    /// Adds the queue events and the backend to the set, all or none.
    fn watch(&mut self, queue_evts: &[EventFd]) -> io::Result<()> {
        for (i, evt) in queue_evts.iter().enumerate() {
            let added = self.epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            );
            if let Err(e) = added {
                self.unwatch(&queue_evts[..i]);
                return Err(e);
            }
        }
        self.watch_backend(true);
        Ok(())
    }

    /// Takes queue events out of the set: the transport keeps them for the
    /// next activation.
    fn unwatch(&self, queue_evts: &[EventFd]) {
        for evt in queue_evts {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                evt.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Puts the backend in the set or takes it out, as `on` says.
    fn watch_backend(&mut self, on: bool) {
        let on = on && !self.backend_gone;
        if on == self.backend_watched {
            return;
        }
        let (op, event) = if on {
            (
                ControlOperation::Add,
                EpollEvent::new(EventSet::IN, BACKEND_TOKEN),
            )
        } else {
            (ControlOperation::Delete, EpollEvent::default())
        };
        match self.epoll.ctl(op, self.backend.as_raw_fd(), event) {
            Ok(()) => self.backend_watched = on,
            Err(e) => {
                tracing::error!(
                    index = self.index,
                    error = %e,
                    "watching the virtio-net backend; the device receives no more"
                );
                self.backend_gone = true;
            }
        }
    }
}

impl Serving {
    /// Serves until killed; an `Err` is an event loop that cannot go on.
    fn run<B: Backend>(&mut self, core: &mut Core<B>) -> io::Result<()> {
        let mut events = [EpollEvent::default(); NUM_QUEUES + 2];
        loop {
            let n = worker::wait(&core.epoll, &mut events)?;
            let mut used = false;
            let mut receive = false;
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => {
                        let _ = core.kill.read();
                        return Ok(());
                    }
                    BACKEND_TOKEN => receive = true,
                    token => {
                        let _ = self.queue_evts[token as usize].read();
                        match token as usize {
                            TX_QUEUE => used |= self.tx(core),
                            // New RX buffers: frames can flow again.
                            _ => receive = true,
                        }
                    }
                }
            }
            if receive && !core.backend_gone {
                let (rx_used, stop) = self.rx(core);
                used |= rx_used;
                match stop {
                    RxStop::NoBuffers => core.watch_backend(false),
                    RxStop::Backend => core.watch_backend(true),
                    RxStop::BackendGone => {
                        core.watch_backend(false);
                        core.backend_gone = true;
                    }
                }
            }
            if used {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    tracing::warn!(error = %e, "signalling the virtio-net interrupt");
                }
            }
        }
    }

    fn tx<B: Backend>(&mut self, core: &mut Core<B>) -> bool {
        let mem = self.mem.memory();
        process_tx(
            &*mem,
            &mut self.queues[TX_QUEUE],
            &mut core.backend,
            &mut core.scratch,
            &mut core.stats,
        )
    }

    fn rx<B: Backend>(&mut self, core: &mut Core<B>) -> (bool, RxStop) {
        let mem = self.mem.memory();
        process_rx(
            &*mem,
            &mut self.queues[RX_QUEUE],
            &mut core.backend,
            &mut core.scratch,
            &mut core.stats,
        )
    }
}
