//! Our vsock core served to another VMM (QEMU) as a vhost-user device.
//!
//! QEMU's `vhost-user-vsock-device` hands the guest's vsock virtqueues and
//! memory to this backend over a Unix socket; the packets then go through
//! the same [`crate::vsock`] muxer, connections and hybrid socket as in the
//! builtin VMM. `vhost-user-backend` does the protocol and the vring event
//! loop; this module is the device: which queues, which features, what to do
//! on a kick.
//!
//! Seccomp: `vhost-user-backend` starts its threads itself, with no hook of
//! ours to run first. The vring worker, which moves the guest's packets,
//! starts before [`serve`] confines anything and confines itself with the
//! vsock filter on its first event, before it reads a byte the guest
//! wrote. The protocol thread starts after, from [`serve`]'s thread, and
//! inherits the vhost-user filter that thread installed.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::seccomp::{Filter, ThreadKind};
use crate::vsock::queue::{process_rx, process_tx, Scratch, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::vsock::{Muxer, MuxerConfig};

/// The epoll token of the muxer's fd: tokens up to `NUM_QUEUES` belong to
/// the vrings and the daemon's exit event.
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Queue size we accept; QEMU asks for 128 by default.
const MAX_QUEUE_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Vsock(#[from] crate::vsock::Error),
    #[error("vhost-user backend: {0}")]
    Daemon(String),
    #[error("the vhost-user socket {0} already exists")]
    SocketExists(PathBuf),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
}

struct State {
    muxer: Muxer,
    scratch: Scratch,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

/// The vsock device as a vhost-user backend.
pub struct VsockBackend {
    cid: u64,
    state: Mutex<State>,
    /// What the vring worker confines itself with; `None` with
    /// `--no-seccomp`.
    worker_filter: Option<Filter>,
}

impl std::fmt::Debug for VsockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockBackend")
            .field("cid", &self.cid)
            .finish()
    }
}

impl VsockBackend {
    /// Binds the hybrid socket `uds` for guest `cid`; the vring worker will
    /// confine itself with `worker_filter`.
    pub fn new(cid: u64, uds: &Path, worker_filter: Option<Filter>) -> Result<VsockBackend, Error> {
        let muxer = Muxer::new(MuxerConfig::new(cid, uds))?;
        Ok(VsockBackend {
            cid,
            state: Mutex::new(State {
                muxer,
                scratch: Scratch::default(),
                mem: None,
            }),
            worker_filter,
        })
    }

    /// Confines the calling vring worker, once: see the module doc.
    fn confine_worker(&self) -> std::io::Result<()> {
        thread_local! {
            static CONFINED: Cell<bool> = const { Cell::new(false) };
        }
        let Some(filter) = &self.worker_filter else {
            return Ok(());
        };
        if CONFINED.get() {
            return Ok(());
        }
        if let Err(e) = filter.install() {
            tracing::error!(error = %e, "the vring worker stops");
            return Err(std::io::Error::other(e));
        }
        CONFINED.set(true);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {
        // EVENT_IDX is not offered: every used buffer is signalled.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.cid.to_le_bytes();
        (offset as usize..offset as usize + size as usize)
            .map(|i| config.get(i).copied().unwrap_or(0))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the vring worker never leaves, and the daemon's
        // teardown waits on it forever once the front end disconnects.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "creating the vring worker's exit event");
                None
            }
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        self.confine_worker()?;
        let mut guard = self.lock();
        let state = &mut *guard;
        if device_event == MUXER_EVENT {
            // Even before there is guest memory: the muxer's fd is
            // level-triggered, so a host connection left in the listener's
            // backlog would wake this thread again at once, for as long as
            // the guest takes to boot. What the host sends waits in the
            // muxer for the guest.
            state.muxer.process();
        }
        let Some(atomic) = state.mem.clone() else {
            // Events before the front end described guest memory: nothing to
            // move yet (the muxer keeps what it has).
            return Ok(());
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        let mut tx_used = false;
        // RX kicks bring buffers, for the RX pass below; the event queue is
        // unused.
        if usize::from(device_event) == TX_QUEUE {
            tx_used = process_tx(
                &*mem,
                tx.get_mut().get_queue_mut(),
                &mut state.muxer,
                &mut state.scratch,
            );
        }
        let rx_used = process_rx(
            &*mem,
            rx.get_mut().get_queue_mut(),
            &mut state.muxer,
            &mut state.scratch,
        );
        if tx_used {
            tx.signal_used_queue()?;
        }
        if rx_used {
            rx.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Serves one front end (one VM) on `socket` until it disconnects. With
/// `seccomp`, the calling thread confines itself once the backend is set up
/// (see the module doc): after this returns it may only log and exit.
pub fn serve(socket: &Path, uds: &Path, cid: u64, seccomp: bool) -> Result<(), Error> {
    if socket.symlink_metadata().is_ok() {
        return Err(Error::SocketExists(socket.to_path_buf()));
    }
    let filter = |kind| seccomp.then(|| Filter::new(kind)).transpose();
    let (worker_filter, serve_filter) =
        (filter(ThreadKind::Vsock)?, filter(ThreadKind::VhostUser)?);
    let backend = Arc::new(VsockBackend::new(cid, uds, worker_filter)?);
    // Removed on this thread when `serve` returns: whichever thread drops
    // the backend last may not remove files.
    let _uds_file = backend.lock().muxer.take_socket_file();
    let mut daemon = VhostUserDaemon::new(
        "kestrel-vsock".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Error::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers
        .first()
        .ok_or_else(|| Error::Daemon("no vring worker thread".into()))?;
    let muxer_fd = backend.lock().muxer.as_raw_fd();
    handler
        .register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_EVENT))
        .map_err(|e| Error::Daemon(format!("watching the vsock sockets: {e}")))?;
    if let Some(filter) = serve_filter {
        filter.install()?;
    }
    let result = daemon
        .serve(socket)
        .map_err(|e| Error::Daemon(e.to_string()));
    let _ = std::fs::remove_file(socket);
    result
}
