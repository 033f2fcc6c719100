//! Our side of the vhost-user conversation with a virtio-fs backend
//! (virtiofsd): the messages, their order, and what goes in them. The wire
//! format is the `vhost` crate's [`Frontend`]; the order follows the
//! vhost-user spec and Cloud Hypervisor's `vu_common_ctrl.rs`.
//!
//! [`Session::connect`], before the guest runs:
//! `SET_OWNER`, `GET_FEATURES`, and where the backend offers
//! `VHOST_USER_F_PROTOCOL_FEATURES`: `GET_PROTOCOL_FEATURES`,
//! `SET_PROTOCOL_FEATURES` (MQ and REPLY_ACK, where offered; with REPLY_ACK
//! every later message is acknowledged, so a backend's refusal surfaces
//! here instead of as a silent guest hang), `GET_QUEUE_NUM` (with MQ).
//!
//! [`Session::activate`], when the guest's driver sets DRIVER_OK:
//! `SET_FEATURES` (what the driver accepted, plus PROTOCOL_FEATURES),
//! `SET_MEM_TABLE` (each guest RAM region: its guest address, size, our
//! mapping's address, and the memfd with its offset), then per queue
//! `SET_VRING_NUM`, `SET_VRING_ADDR` (ring addresses in *our* address
//! space, which the backend translates through the memory table),
//! `SET_VRING_BASE` 0, `SET_VRING_CALL`, `SET_VRING_KICK`, and
//! `SET_VRING_ENABLE` 1 where protocol features were negotiated (a ring
//! starts disabled then).
//!
//! [`Session::deactivate`], on a driver reset: per queue `SET_VRING_ENABLE`
//! 0 and `GET_VRING_BASE`, which stops the ring in the backend.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::super::GuestMemoryMmap;

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// The ring features a vhost-user backend implements itself, so we can pass
/// them on to the guest when the backend offers them.
const RING_FEATURES: u64 = (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the vhost-user-fs backend at {path}: {source} (is virtiofsd running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user {step}: {source}")]
    Protocol {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user-fs backend {0}")]
    Backend(String),
    #[error("guest memory for vhost-user: {0}")]
    Memory(String),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { step, source }
}

/// One connection to a vhost-user-fs backend, for one device.
pub struct Session {
    frontend: Frontend,
    /// What the backend offered in `GET_FEATURES`.
    backend_features: u64,
    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` was negotiated: rings then
    /// need `SET_VRING_ENABLE`.
    protocol: bool,
    num_queues: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

impl Session {
    /// Connects to the backend at `socket` and negotiates what does not
    /// depend on the guest, for a device of `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize) -> Result<Session, Error> {
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        Session::handshake(stream, num_queues)
    }

    /// [`Session::connect`] on a stream already connected.
    pub fn handshake(stream: UnixStream, num_queues: usize) -> Result<Session, Error> {
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & VERSION_1 == 0 {
            return Err(Error::Backend(
                "does not offer VIRTIO_F_VERSION_1".to_string(),
            ));
        }
        let protocol = backend_features & PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            let acked = offered & wanted;
            frontend
                .set_protocol_features(acked)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let queues = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if queues < num_queues as u64 {
                    return Err(Error::Backend(format!(
                        "serves {queues} queues; the device needs {num_queues}"
                    )));
                }
            }
        }
        Ok(Session {
            frontend,
            backend_features,
            protocol,
            num_queues,
        })
    }

    /// The connection's descriptor, to watch for the backend hanging up:
    /// between requests it never has anything to read.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// The device features to offer the guest beyond `VIRTIO_F_VERSION_1`:
    /// the ring features the backend implements.
    pub fn device_features(&self) -> u64 {
        self.backend_features & RING_FEATURES
    }

    /// Hands the backend the guest's memory and rings: `acked` is what the
    /// driver accepted, `kicks[i]` fires when the guest notifies queue i
    /// (KVM's ioeventfd), the backend writes `calls[i]` when it used
    /// buffers of queue i.
    pub fn activate(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), Error> {
        if queues.len() != self.num_queues
            || kicks.len() != self.num_queues
            || calls.len() != self.num_queues
        {
            return Err(Error::Backend(format!(
                "needs {} queues, each with a kick and a call event",
                self.num_queues
            )));
        }
        let features =
            (acked & self.backend_features) | (self.backend_features & PROTOCOL_FEATURES);
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| {
                    Error::Memory(format!(
                        "region at {:#x} has no file to share: {e}",
                        region.start_addr().0
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for (index, ((queue, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(step("SET_VRING_NUM"))?;
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(mem, queue.desc_table())?,
                used_ring_addr: host_address(mem, queue.used_ring())?,
                avail_ring_addr: host_address(mem, queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, 0)
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(step("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops every ring in the backend, so a later [`Session::activate`]
    /// starts them afresh.
    pub fn deactivate(&mut self) -> Result<(), Error> {
        for index in 0..self.num_queues {
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(step("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// Where guest address `addr` is mapped in this process: vhost-user ring
/// addresses are the front end's virtual addresses.
fn host_address(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, Error> {
    mem.get_host_address(GuestAddress(addr))
        .map(|ptr| ptr as u64)
        .map_err(|e| Error::Memory(format!("ring at {addr:#x}: {e}")))
}
