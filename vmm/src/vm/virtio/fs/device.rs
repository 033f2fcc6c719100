//! The virtio-fs device: config space and features here, the queues in the
//! vhost-user backend, and a thread of its own between the two.
//!
//! The guest's notifications reach the backend without us: each queue's
//! kick is the transport's eventfd, which KVM signals (ioeventfd) and the
//! backend reads. The backend's "used buffers" events cannot go straight
//! to KVM's irqfd: virtio-mmio's driver reads InterruptStatus first and
//! ignores an interrupt without the VRING bit, so the thread waits on the
//! call eventfds and raises the interrupt through the transport, which sets
//! the bit. It also tells the backend what an activation or a reset asks
//! (the vhost-user messages, [`super::frontend`]), so a vCPU thread never
//! talks to the socket, and it notices the backend hanging up.
//!
//! Like the vsock device's, the thread starts with the device, before any
//! vCPU runs, and confines itself at once with the fs filter.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::config::{config_space, FsConfig, CONFIG_SPACE_LEN, NUM_REQUEST_QUEUES};
use super::frontend::Session;
use super::Error;
use crate::seccomp::Filter;
use crate::vm::virtio::worker::{self, Worker};
use crate::vm::virtio::{ActivateError, GuestMemoryAtomic, Interrupt, VirtioDevice};

/// The high-priority queue, then the request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
/// Epoll tokens beyond the queue indices (the call events).
const KILL_TOKEN: u64 = NUM_QUEUES as u64;
const SOCKET_TOKEN: u64 = NUM_QUEUES as u64 + 1;

/// A virtio-fs device whose queues a vhost-user backend serves.
#[derive(Debug)]
pub struct FsDevice {
    config_space: [u8; CONFIG_SPACE_LEN],
    queue_sizes: [u16; NUM_QUEUES],
    features: u64,
    acked_features: u64,
    worker: Worker<Serving>,
}

/// What the thread serves between an activation and a reset.
struct Serving {
    acked_features: u64,
    mem: GuestMemoryAtomic,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
}

impl FsDevice {
    /// Connects to the backend on `config.socket` and negotiates with it
    /// (see [`super::frontend`]), then starts the device thread, which
    /// confines itself with `seccomp` (the fs filter; `None` with
    /// `--no-seccomp`) before this returns.
    pub fn new(config: &FsConfig, seccomp: Option<Filter>) -> Result<FsDevice, Error> {
        let session = Session::connect(&config.socket, NUM_QUEUES)?;
        FsDevice::with_session(config, session, seccomp)
    }

    /// [`FsDevice::new`] over a session already negotiated.
    pub fn with_session(
        config: &FsConfig,
        session: Session,
        seccomp: Option<Filter>,
    ) -> Result<FsDevice, Error> {
        let features = session.device_features();
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let epoll = Epoll::new()?;
        let watched = calls
            .iter()
            .enumerate()
            .map(|(i, call)| (call.as_raw_fd(), i as u64, EventSet::IN))
            .chain([
                (kill.as_raw_fd(), KILL_TOKEN, EventSet::IN),
                (
                    session.socket_fd(),
                    SOCKET_TOKEN,
                    EventSet::IN | EventSet::READ_HANG_UP,
                ),
            ]);
        for (fd, token, events) in watched {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        let mut core = Core {
            epoll,
            kill: kill.try_clone()?,
            calls,
            session,
            backend_gone: false,
        };
        let worker = Worker::spawn(
            "virtio-fs",
            "kestrel-fs",
            seccomp,
            kill,
            move |activated, answer| core.run(activated, answer),
        )?;
        Ok(FsDevice {
            config_space: config_space(&config.tag),
            queue_sizes: [config.queue_size; NUM_QUEUES],
            features,
            acked_features: 0,
            worker,
        })
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at
                .and_then(|at| self.config_space.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            "guest wrote to the read-only virtio-fs config space"
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
            acked_features: self.acked_features,
            mem,
            interrupt,
            queues,
            kicks: queue_evts,
        })
    }

    fn reset(&mut self) -> bool {
        self.worker.reset()
    }
}

/// What the device thread owns for the device's lifetime.
struct Core {
    /// The call events, the kill event and the backend's socket.
    epoll: Epoll,
    kill: EventFd,
    calls: Vec<EventFd>,
    session: Session,
    /// Set once the backend hung up: its socket is out of the epoll set.
    backend_gone: bool,
}

impl Core {
    /// Serves each activation until its reset, until the device is
    /// dropped.
    fn run(&mut self, activations: &Receiver<Serving>, answer: &Sender<io::Result<()>>) {
        while let Ok(serving) = activations.recv() {
            let activated = {
                let mem = serving.mem.memory();
                self.session.activate(
                    serving.acked_features,
                    &mem,
                    &serving.queues,
                    &serving.kicks,
                    &self.calls,
                )
            };
            if let Err(e) = activated {
                let _ = answer.send(Err(io::Error::other(e.to_string())));
                continue;
            }
            let _ = answer.send(Ok(()));
            if let Err(e) = self.serve(&serving) {
                tracing::error!(error = %e, "virtio-fs device event loop failed; the device stops");
                return;
            }
            let stopped = self
                .session
                .deactivate()
                .map_err(|e| io::Error::other(e.to_string()));
            let _ = answer.send(stopped);
        }
    }

    /// Forwards the backend's used-buffer events as interrupts until
    /// killed; an `Err` is an event loop that cannot go on.
    fn serve(&mut self, serving: &Serving) -> io::Result<()> {
        let mut events = [EpollEvent::default(); NUM_QUEUES + 2];
        loop {
            let n = worker::wait(&self.epoll, &mut events)?;
            let mut used = false;
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => {
                        let _ = self.kill.read();
                        return Ok(());
                    }
                    SOCKET_TOKEN => self.backend_hung_up(),
                    token => {
                        if let Some(call) = self.calls.get(token as usize) {
                            used |= call.read().is_ok();
                        }
                    }
                }
            }
            if used {
                if let Err(e) = serving.interrupt.signal_used_queue() {
                    tracing::warn!(error = %e, "signalling the virtio-fs interrupt");
                }
            }
        }
    }

    /// The socket is readable between requests only when the backend
    /// closed it: the guest's file system is gone. Whoever started the
    /// backend sees it exit; here it is logged once and unwatched, so the
    /// level-triggered event does not spin.
    fn backend_hung_up(&mut self) {
        if self.backend_gone {
            return;
        }
        self.backend_gone = true;
        tracing::error!(
            "the vhost-user-fs backend hung up; the guest's shared file system is gone"
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.session.socket_fd(),
            EpollEvent::default(),
        );
    }
}
