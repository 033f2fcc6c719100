//! Moves frames between the virtqueues and a [`Backend`], and refuses the
//! descriptor chains that cannot carry one.
//!
//! Every frame is copied through one reusable buffer, header and all:
//! guest memory is then only touched through `vm-memory`'s bounds-checked
//! reads and writes, never through raw pointers handed to `readv` or
//! `writev`, at the cost of one copy of each frame.
//!
//! The guest owns the descriptors, so nothing in them is trusted: a chain
//! with the wrong kind of descriptor, one outside guest memory, lengths
//! past what a frame can be, or a `next` that loops or leads nowhere is
//! given back used with length 0, counted in [`Counters`], and reported in
//! the log at most once per [`REPORT_INTERVAL`].

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{Backend, ETH_HLEN, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};

/// At most one warning about dropped frames or malformed chains per
/// device per interval; the per-chain details are debug lines.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The smallest chain worth anything: a header and an Ethernet header.
const MIN_CHAIN_LEN: usize = VNET_HDR_LEN + ETH_HLEN;

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A device-writable descriptor in a TX chain.
    WritableInTx,
    /// A device-readable descriptor in an RX chain.
    ReadOnlyInRx,
    /// Shorter than a virtio-net header and an Ethernet header.
    TooShort,
    /// A TX chain longer than any frame may be.
    TooLong,
    /// A descriptor pointing outside guest memory.
    OutsideMemory,
    /// The chain ended on a descriptor that still says NEXT: it loops,
    /// points past the table, or its descriptors could not be read.
    Unterminated,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::WritableInTx => "device-writable descriptor in a TX chain",
            Malformed::ReadOnlyInRx => "read-only descriptor in an RX chain",
            Malformed::TooShort => "chain too short for a header and an Ethernet header",
            Malformed::TooLong => "TX chain longer than the largest frame",
            Malformed::OutsideMemory => "descriptor outside guest memory",
            Malformed::Unterminated => "chain loops or leads outside the descriptor table",
        })
    }
}

/// What the device has done since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Frames written to the backend.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// TX chains refused as malformed.
    pub tx_malformed: u64,
    /// RX chains refused as malformed.
    pub rx_malformed: u64,
    /// Well-formed TX frames the backend did not take (full, or failing).
    pub tx_dropped: u64,
    /// Frames from the backend the guest never got: larger than its
    /// buffer, or refused by the backend itself.
    pub rx_dropped: u64,
}

/// The counters and the rate limit on reporting them.
#[derive(Debug, Default)]
pub struct Stats {
    counts: Counters,
    reported: Counters,
    last_report: Option<Instant>,
}

impl Stats {
    pub fn counters(&self) -> Counters {
        self.counts
    }

    /// Logs what went wrong since the last report, unless that report is
    /// younger than [`REPORT_INTERVAL`]; `detail` says what this one was.
    fn trouble(&mut self, detail: &dyn fmt::Display) {
        tracing::debug!(%detail, "virtio-net");
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_INTERVAL)
        {
            return;
        }
        let (c, r) = (self.counts, self.reported);
        tracing::warn!(
            tx_malformed = c.tx_malformed - r.tx_malformed,
            rx_malformed = c.rx_malformed - r.rx_malformed,
            tx_dropped = c.tx_dropped - r.tx_dropped,
            rx_dropped = c.rx_dropped - r.rx_dropped,
            latest = %detail,
            "virtio-net dropped frames or refused descriptor chains"
        );
        self.reported = c;
        self.last_report = Some(now);
    }
}

/// The frame buffer and the RX chain's segments, kept so the hot path
/// does not allocate.
#[derive(Debug)]
pub struct Scratch {
    frame: Vec<u8>,
    segments: Vec<(GuestAddress, usize)>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            frame: vec![0; MAX_BUFFER_LEN],
            segments: Vec::new(),
        }
    }
}

/// What the RX pass stopped on, which tells the event loop whether to keep
/// watching the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The guest has no buffers: stop watching the backend until it posts
    /// some (an RX queue notification), so nothing spins.
    NoBuffers,
    /// The backend has no frame now, or the pass did its share and the
    /// backend may have more: keep watching it.
    Backend,
    /// The backend failed or closed: stop watching it for good.
    BackendGone,
}

/// Sends every frame the guest queued. Returns whether any chain was used
/// (the caller then signals the guest).
///
/// A frame the backend will not take now (`WouldBlock`) is dropped and
/// counted, as a NIC drops on a full ring: a tap's write only fails so when
/// the host cannot queue the frame either, and holding the chain back would
/// stall the guest's TX queue behind it; TCP resends.
pub fn process_tx<M, B>(
    mem: &M,
    queue: &mut Queue,
    backend: &mut B,
    scratch: &mut Scratch,
    stats: &mut Stats,
) -> bool
where
    M: GuestMemory,
    B: Backend + ?Sized,
{
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match gather(mem, chain, &mut scratch.frame) {
            Ok(len) => match backend.write_frame(&scratch.frame[..len]) {
                Ok(_) => stats.counts.tx_frames += 1,
                Err(e) => {
                    stats.counts.tx_dropped += 1;
                    stats.trouble(&format_args!("TX frame dropped: {e}"));
                }
            },
            Err(why) => {
                stats.counts.tx_malformed += 1;
                stats.trouble(&why);
            }
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!(error = %e, "returning a virtio-net TX descriptor");
        }
        used = true;
    }
    used
}

/// Fills the guest's RX buffers with frames from the backend, reading a
/// frame only when a well-formed buffer is there to take it, and at most a
/// queue's worth per call so TX gets its turn. Returns whether any chain
/// was used, and why it stopped.
pub fn process_rx<M, B>(
    mem: &M,
    queue: &mut Queue,
    backend: &mut B,
    scratch: &mut Scratch,
    stats: &mut Stats,
) -> (bool, RxStop)
where
    M: GuestMemory,
    B: Backend + ?Sized,
{
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return (used, RxStop::NoBuffers);
        };
        let head = chain.head_index();
        let capacity = match segments(mem, chain, &mut scratch.segments) {
            Ok(capacity) => capacity,
            Err(why) => {
                stats.counts.rx_malformed += 1;
                stats.trouble(&why);
                if let Err(e) = queue.add_used(mem, head, 0) {
                    tracing::warn!(error = %e, "returning a virtio-net RX descriptor");
                }
                used = true;
                continue;
            }
        };
        let read = backend.read_frame(&mut scratch.frame);
        let len = match read {
            Ok(len) if len >= MIN_CHAIN_LEN => len,
            Ok(0) => {
                give_back(queue);
                tracing::warn!("the virtio-net backend closed; the device receives no more");
                return (used, RxStop::BackendGone);
            }
            Ok(len) => {
                stats.counts.rx_dropped += 1;
                stats.trouble(&format_args!(
                    "{len}-byte frame from the backend is too short"
                ));
                give_back(queue);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back(queue);
                return (used, RxStop::Backend);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                give_back(queue);
                continue;
            }
            // The tap refused to hand over this one frame (longer than
            // the buffer, or shorter than a header) and dropped it; the
            // next one may be fine.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) => {
                stats.counts.rx_dropped += 1;
                stats.trouble(&format_args!("the backend dropped a frame: {e}"));
                give_back(queue);
                continue;
            }
            Err(e) => {
                give_back(queue);
                tracing::error!(
                    error = %e,
                    "reading the virtio-net backend; the device receives no more"
                );
                return (used, RxStop::BackendGone);
            }
        };
        if len > capacity {
            // The chain stays the guest's for the next frame: a driver
            // that accepted TSO but posts small buffers loses the big
            // frames only.
            stats.counts.rx_dropped += 1;
            stats.trouble(&format_args!(
                "{len}-byte frame does not fit a {capacity}-byte RX buffer"
            ));
            give_back(queue);
            continue;
        }
        // Without MRG_RXBUF each frame takes exactly one chain (virtio
        // 1.1, 5.1.6.3.2); the tap leaves these two bytes unwritten.
        scratch.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let used_len = match scatter(mem, &scratch.segments, &scratch.frame[..len]) {
            Ok(()) => {
                stats.counts.rx_frames += 1;
                len as u32
            }
            Err(e) => {
                stats.counts.rx_dropped += 1;
                stats.trouble(&format_args!("writing a frame to guest memory: {e}"));
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, used_len) {
            tracing::warn!(error = %e, "returning a virtio-net RX descriptor");
        }
        used = true;
    }
    (used, RxStop::Backend)
}

/// Puts the chain just popped back at the head of the available ring.
fn give_back(queue: &mut Queue) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

/// Copies a TX chain's header and frame into `buf`; returns its length.
fn gather<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
) -> Result<usize, Malformed> {
    let mut len = 0usize;
    let mut open_ended = false;
    for desc in chain {
        if desc.is_write_only() {
            return Err(Malformed::WritableInTx);
        }
        let end = len
            .checked_add(desc.len() as usize)
            .filter(|end| *end <= buf.len())
            .ok_or(Malformed::TooLong)?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| Malformed::OutsideMemory)?;
        len = end;
        open_ended = desc.has_next();
    }
    if open_ended {
        return Err(Malformed::Unterminated);
    }
    if len < MIN_CHAIN_LEN {
        return Err(Malformed::TooShort);
    }
    Ok(len)
}

/// Collects an RX chain's writable segments; returns their total length.
fn segments<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segments: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, Malformed> {
    segments.clear();
    let mut capacity = 0usize;
    let mut open_ended = false;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(Malformed::ReadOnlyInRx);
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len, Permissions::Write) {
            return Err(Malformed::OutsideMemory);
        }
        // Only the room a frame can use counts; the rest is never written.
        capacity = capacity.saturating_add(len).min(MAX_BUFFER_LEN);
        segments.push((desc.addr(), len));
        open_ended = desc.has_next();
    }
    if open_ended {
        return Err(Malformed::Unterminated);
    }
    if capacity < MIN_CHAIN_LEN {
        return Err(Malformed::TooShort);
    }
    Ok(capacity)
}

/// Writes `frame` across `segments`, which hold at least its length.
fn scatter<M: GuestMemory>(
    mem: &M,
    segments: &[(GuestAddress, usize)],
    mut frame: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for &(addr, len) in segments {
        if frame.is_empty() {
            break;
        }
        let n = len.min(frame.len());
        mem.write_slice(&frame[..n], addr)?;
        frame = &frame[n..];
    }
    Ok(())
}
