//! The builtin VMM's virtio-vsock device: the transport-independent core in
//! [`crate::vsock`] behind the [`VirtioDevice`] interface, served by a
//! thread of its own once the driver activates it.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, GuestMemoryAtomic, Interrupt, VirtioDevice};
use crate::vsock::queue::{
    process_rx, process_tx, Scratch, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::vsock::{Muxer, MuxerConfig};

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Epoll tokens beyond the queue indices.
const MUXER_TOKEN: u64 = NUM_QUEUES as u64;
const KILL_TOKEN: u64 = NUM_QUEUES as u64 + 1;

#[derive(Debug)]
pub struct VsockDevice {
    cid: u64,
    /// The core, held here until activation and while reset.
    muxer: Option<Muxer>,
    worker: Option<Worker>,
}

#[derive(Debug)]
struct Worker {
    kill: EventFd,
    thread: JoinHandle<Muxer>,
}

impl VsockDevice {
    /// Binds the hybrid socket at once, so a taken path is reported before
    /// the guest boots.
    pub fn new(cid: u64, uds_path: &Path) -> Result<VsockDevice, crate::vsock::Error> {
        let muxer = Muxer::new(MuxerConfig::new(cid, uds_path))?;
        Ok(VsockDevice {
            cid,
            muxer: Some(muxer),
            worker: None,
        })
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
        if queues.len() != NUM_QUEUES || queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::Device(format!(
                "vsock needs {NUM_QUEUES} queues, got {}",
                queues.len()
            )));
        }
        let muxer = self
            .muxer
            .take()
            .ok_or_else(|| ActivateError::Device("vsock device is already active".into()))?;
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let watch = |fd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        let mut registered = Ok(());
        for (i, evt) in queue_evts.iter().enumerate() {
            registered = registered.and_then(|()| watch(evt.as_raw_fd(), i as u64));
        }
        registered = registered
            .and_then(|()| watch(muxer.as_raw_fd(), MUXER_TOKEN))
            .and_then(|()| watch(kill.as_raw_fd(), KILL_TOKEN));
        if let Err(e) = registered {
            self.muxer = Some(muxer);
            return Err(e.into());
        }
        let state = Serving {
            epoll,
            mem,
            interrupt,
            queues,
            queue_evts,
            muxer,
            scratch: Scratch::default(),
        };
        let thread = std::thread::Builder::new()
            .name("kestrel-vsock".into())
            .spawn(move || state.run())?;
        self.worker = Some(Worker { kill, thread });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Some(worker) = self.worker.take() else {
            return true;
        };
        let _ = worker.kill.write(1);
        match worker.thread.join() {
            Ok(muxer) => {
                self.muxer = Some(muxer);
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Everything the device thread owns while the device is active.
struct Serving {
    epoll: Epoll,
    mem: GuestMemoryAtomic,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    muxer: Muxer,
    scratch: Scratch,
}

impl Serving {
    /// Serves until told to stop; hands the core back for a later
    /// activation.
    fn run(mut self) -> Muxer {
        let mut events = [EpollEvent::default(); NUM_QUEUES + 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock device event loop failed; the device stops");
                    return self.muxer;
                }
            };
            let mut used = false;
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => return self.muxer,
                    MUXER_TOKEN => self.muxer.process(),
                    token => {
                        let _ = self.queue_evts[token as usize].read();
                        // RX kicks (new buffers) and event-queue kicks
                        // need nothing beyond the RX pass below.
                        if token as usize == TX_QUEUE {
                            used |= self.tx();
                        }
                    }
                }
            }
            used |= self.rx();
            if used {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    tracing::warn!(error = %e, "signalling the vsock interrupt");
                }
            }
        }
    }

    fn tx(&mut self) -> bool {
        let mem = self.mem.memory();
        process_tx(
            &*mem,
            &mut self.queues[TX_QUEUE],
            &mut self.muxer,
            &mut self.scratch,
        )
    }

    fn rx(&mut self) -> bool {
        let mem = self.mem.memory();
        process_rx(
            &*mem,
            &mut self.queues[RX_QUEUE],
            &mut self.muxer,
            &mut self.scratch,
        )
    }
}
