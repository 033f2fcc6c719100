//! The builtin VMM's virtio-vsock device: the transport-independent core in
//! [`crate::vsock`] behind the [`VirtioDevice`] interface, served by a
//! thread of its own.
//!
//! The thread starts with the device, before any vCPU runs, and lives as
//! long as it: it confines itself with the vsock seccomp filter at once,
//! so a vCPU's MMIO write that activates the device never has to start a
//! thread (which the vCPU filter does not allow). Activation hands it the
//! queues; a reset takes them back, and it waits for the next activation.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, Worker};
use super::{ActivateError, GuestMemoryAtomic, Interrupt, VirtioDevice};
use crate::seccomp::{self, Filter};
use crate::vsock::queue::{
    process_rx, process_tx, Scratch, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::vsock::Muxer;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Epoll tokens beyond the queue indices.
const MUXER_TOKEN: u64 = NUM_QUEUES as u64;
const KILL_TOKEN: u64 = NUM_QUEUES as u64 + 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] crate::vsock::Error),
    #[error(transparent)]
    Thread(#[from] seccomp::Error),
}

#[derive(Debug)]
pub struct VsockDevice {
    cid: u64,
    worker: Worker<Serving>,
}

/// What the thread serves between an activation and a reset.
struct Serving {
    mem: GuestMemoryAtomic,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
}

impl VsockDevice {
    /// Serves `muxer`'s connections to the guest. Starts the device thread,
    /// which confines itself with `seccomp` (the vsock filter; `None` with
    /// `--no-seccomp`) before this returns.
    pub fn new(muxer: Muxer, seccomp: Option<Filter>) -> Result<VsockDevice, Error> {
        let cid = muxer.guest_cid();
        let io_err = |e| Error::Core(crate::vsock::Error::Epoll(e));
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        let epoll = Epoll::new().map_err(io_err)?;
        for (fd, token) in [
            (muxer.as_raw_fd(), MUXER_TOKEN),
            (kill.as_raw_fd(), KILL_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err)?;
        }
        let mut core = Core {
            epoll,
            kill: kill.try_clone().map_err(io_err)?,
            muxer,
            scratch: Scratch::default(),
        };
        let worker = Worker::spawn(
            "vsock",
            "kestrel-vsock",
            seccomp,
            kill,
            move |activated, answer| core.run(activated, answer),
        )?;
        Ok(VsockDevice { cid, worker })
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // Nothing beyond VERSION_1, which the transport adds.
        0
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The config space is the guest's CID, a little-endian u64.
        let config = self.cid.to_le_bytes();
        let start = offset as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "guest wrote to the read-only vsock config space");
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
        })
    }

    fn reset(&mut self) -> bool {
        self.worker.reset()
    }
}

/// What the device thread owns for the device's lifetime.
struct Core {
    /// The muxer and the kill event, and while active the queue events.
    epoll: Epoll,
    kill: EventFd,
    muxer: Muxer,
    scratch: Scratch,
}

impl Core {
    /// Serves each activation until its reset, until the device is
    /// dropped.
    fn run(&mut self, activations: &Receiver<Serving>, answer: &Sender<io::Result<()>>) {
        while let Ok(mut serving) = activations.recv() {
            if let Err(e) = self.watch(&serving.queue_evts) {
                let _ = answer.send(Err(e));
                continue;
            }
            let _ = answer.send(Ok(()));
            let outcome = serving.run(self);
            self.unwatch(&serving.queue_evts);
            if let Err(e) = outcome {
                tracing::error!(error = %e, "vsock device event loop failed; the device stops");
                return;
            }
            let _ = answer.send(Ok(()));
        }
    }

    /// Adds the queue events to the set, all or none.
    fn watch(&self, queue_evts: &[EventFd]) -> io::Result<()> {
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
}

impl Serving {
    /// Serves until killed; an `Err` is an event loop that cannot go on.
    fn run(&mut self, core: &mut Core) -> io::Result<()> {
        let mut events = [EpollEvent::default(); NUM_QUEUES + 2];
        loop {
            let n = worker::wait(&core.epoll, &mut events)?;
            let mut used = false;
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => {
                        let _ = core.kill.read();
                        return Ok(());
                    }
                    MUXER_TOKEN => core.muxer.process(),
                    token => {
                        let _ = self.queue_evts[token as usize].read();
                        // RX kicks (new buffers) and event-queue kicks
                        // need nothing beyond the RX pass below.
                        if token as usize == TX_QUEUE {
                            used |= self.tx(core);
                        }
                    }
                }
            }
            used |= self.rx(core);
            if used {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    tracing::warn!(error = %e, "signalling the vsock interrupt");
                }
            }
        }
    }

    fn tx(&mut self, core: &mut Core) -> bool {
        let mem = self.mem.memory();
        process_tx(
            &*mem,
            &mut self.queues[TX_QUEUE],
            &mut core.muxer,
            &mut core.scratch,
        )
    }

    fn rx(&mut self, core: &mut Core) -> bool {
        let mem = self.mem.memory();
        process_rx(
            &*mem,
            &mut self.queues[RX_QUEUE],
            &mut core.muxer,
            &mut core.scratch,
        )
    }
}
