//! Moves packets between the device's virtqueues and the [`Muxer`].
//!
//! Transport-independent: the builtin VMM's MMIO device and the vhost-user
//! backend both hold a `virtio_queue::Queue` and guest memory, and call
//! [`process_tx`] when the driver kicks the TX queue and [`process_rx`]
//! whenever the muxer may have something for the guest. Guest memory is only
//! touched here, through `vm-memory` and `virtio-vsock`'s packet parser.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemory};

use super::{Header, Muxer, HEADER_SIZE, MAX_PKT_DATA};

/// Queue indices (virtio spec 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;
/// The size we offer for each queue.
pub const QUEUE_SIZE: u16 = 256;

/// A reusable payload buffer, so the hot path does not allocate.
#[derive(Debug)]
pub struct Scratch(Vec<u8>);

impl Default for Scratch {
    fn default() -> Self {
        Scratch(vec![0; MAX_PKT_DATA as usize])
    }
}

/// Hands every packet the guest queued for transmission to the muxer.
/// Returns whether any descriptor was used (the caller then signals the
/// guest). A chain that does not parse is consumed and, if its header can
/// be read, its connection is reset.
pub fn process_tx<M>(mem: &M, queue: &mut Queue, muxer: &mut Muxer, scratch: &mut Scratch) -> bool
where
    M: GuestMemory,
{
    let mut used = false;
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let raw = chain.clone();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                let hdr = header_of(&pkt);
                let len = match pkt.data_slice() {
                    Some(data) if hdr.len > 0 => data.copy_to(&mut scratch.0[..hdr.len as usize]),
                    _ => 0,
                };
                if len as u32 == hdr.len {
                    muxer.send_pkt(&hdr, &scratch.0[..len]);
                } else {
                    tracing::debug!(
                        header_len = hdr.len,
                        data_len = len,
                        "vsock TX payload shorter than its header says"
                    );
                    muxer.reset_connection(&hdr);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed vsock TX descriptor chain");
                if let Some(hdr) = raw_header(mem, raw) {
                    muxer.reset_connection(&hdr);
                }
            }
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!(error = %e, "returning a vsock TX descriptor");
        }
        used = true;
    }
    used
}

/// Fills the guest's RX buffers with what the muxer has for it. Returns
/// whether any descriptor was used.
pub fn process_rx<M>(mem: &M, queue: &mut Queue, muxer: &mut Muxer, scratch: &mut Scratch) -> bool
where
    M: GuestMemory,
{
    let mut used = false;
    while muxer.has_pending_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let used_len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => {
                let room = pkt.data_slice().map_or(0, |d| d.len());
                match muxer.recv_pkt(&mut scratch.0[..room]) {
                    Some(hdr) => write_packet(&mut pkt, &hdr, &scratch.0[..hdr.len as usize]),
                    None => {
                        // Nothing after all (a stream had no bytes yet):
                        // give the buffer back untouched.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed vsock RX descriptor chain; skipping it");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, used_len) {
            tracing::warn!(error = %e, "returning a vsock RX descriptor");
        }
        used = true;
    }
    used
}

fn header_of<B: vm_memory::bitmap::BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    }
}

fn write_packet<B: vm_memory::bitmap::BitmapSlice>(
    pkt: &mut VsockPacket<'_, B>,
    hdr: &Header,
    data: &[u8],
) -> u32 {
    pkt.set_src_cid(hdr.src_cid)
        .set_dst_cid(hdr.dst_cid)
        .set_src_port(hdr.src_port)
        .set_dst_port(hdr.dst_port)
        .set_len(hdr.len)
        .set_type(hdr.type_)
        .set_op(hdr.op)
        .set_flags(hdr.flags)
        .set_buf_alloc(hdr.buf_alloc)
        .set_fwd_cnt(hdr.fwd_cnt);
    if let (Some(slice), false) = (pkt.data_slice(), data.is_empty()) {
        if let Err(e) = slice.write_slice(data, 0) {
            tracing::warn!(error = %e, "writing a vsock payload to guest memory");
            return HEADER_SIZE as u32;
        }
    }
    HEADER_SIZE as u32 + hdr.len
}

/// The header of a chain the packet parser refused, if its first
/// descriptor is at least readable and large enough.
fn raw_header<M, T>(mem: &M, mut chain: DescriptorChain<T>) -> Option<Header>
where
    M: GuestMemory,
    T: Deref,
    T::Target: GuestMemory,
{
    let desc = chain.next()?;
    if desc.is_write_only() || (desc.len() as usize) < HEADER_SIZE {
        return None;
    }
    let mut bytes = [0u8; HEADER_SIZE];
    mem.read_slice(&mut bytes, desc.addr()).ok()?;
    Some(Header::from_bytes(&bytes))
}
