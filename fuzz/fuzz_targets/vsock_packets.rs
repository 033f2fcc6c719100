//! vsock packets and the muxer: what a guest driver puts in the device's
//! TX and RX virtqueues, and what host programs do on the hybrid socket,
//! through `kestrel_vmm::vsock::queue::{process_tx, process_rx}` and the
//! `Muxer`, the way the vsock unit tests drive them: descriptor chains built
//! with `virtio_queue::mock` in real guest memory, real Unix sockets.
//!
//! An input is a list of steps: packets with chosen header fields (ports
//! that hit live connections, any op, lengths that lie), raw descriptor
//! chains over arbitrary guest memory, RX buffers of any shape, and host
//! programs connecting, writing, closing. Besides "no panic": every packet
//! the device writes to the guest fits the buffer it was given, its used
//! length says exactly header + payload, and it comes from the host to
//! this guest.

#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};

use arbitrary::Arbitrary;
use kestrel_protocols::AGENT_VSOCK_PORT;
use kestrel_vmm::vsock::muxer::FIRST_LOCAL_PORT;
use kestrel_vmm::vsock::queue::{process_rx, process_tx, Scratch, QUEUE_SIZE};
use kestrel_vmm::vsock::{
    op, unix, Header, Muxer, MuxerConfig, DEFAULT_GUEST_CID, HEADER_SIZE, HOST_CID,
};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 1 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Packet buffers live from here to the end of memory.
const BUFS: u64 = 0x2_0000;
/// A guest port a host program listens on (`<uds>_52`).
const LISTENED_PORT: u32 = 52;
/// Chains per queue and input. The mock writes avail entries without
/// wrapping, and lays its used ring out after only half of the avail
/// entries a `QUEUE_SIZE` ring has: more chains would overwrite the used
/// ring with avail entries (a harness fault, not the device's).
const MAX_CHAINS: u16 = QUEUE_SIZE / 2 - 8;

#[derive(Arbitrary, Debug)]
enum Port {
    Agent,
    Listened,
    /// The n-th host-initiated connection's host port.
    Local(u8),
    Small(u8),
    Any(u32),
}

impl Port {
    fn get(&self) -> u32 {
        match self {
            Port::Agent => AGENT_VSOCK_PORT,
            Port::Listened => LISTENED_PORT,
            Port::Local(n) => FIRST_LOCAL_PORT + u32::from(n % 4),
            Port::Small(n) => u32::from(*n),
            Port::Any(p) => *p,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct RawDesc {
    /// In 16-byte steps across all of guest memory (rings included); an
    /// `out_of_range` one points past its end.
    at: u16,
    out_of_range: bool,
    len: u32,
    write_only: bool,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// A packet from the guest, header and payload in one descriptor or two.
    Packet {
        foreign_src: bool,
        foreign_dst: bool,
        guest_port: Port,
        host_port: Port,
        op: u8,
        other_type: bool,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        /// Added to the true payload length in the header.
        len_lie: i8,
        data: Vec<u8>,
        one_descriptor: bool,
    },
    /// Any chain: up to four descriptors, memory filled with `fill`.
    RawChain {
        descs: Vec<RawDesc>,
        fill: Vec<u8>,
    },
    /// The guest offers RX buffers and the device fills them.
    Rx {
        count: u8,
        header_len: u8,
        data_len: u16,
        split: bool,
        write_only: bool,
    },
    /// A host program connects to the hybrid socket and asks for a guest
    /// port, in either case, or writes `junk` instead of the line.
    HostConnect {
        port: Port,
        lowercase: bool,
        junk: Option<Vec<u8>>,
    },
    HostWrite {
        which: u8,
        data: Vec<u8>,
    },
    HostShutdown {
        which: u8,
        read: bool,
        write: bool,
    },
    HostClose {
        which: u8,
    },
    /// The program listening on `<uds>_52` accepts what is pending.
    Accept,
    /// The muxer handles host events.
    Process,
}

struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    rx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    muxer: Muxer,
    scratch: Scratch,
    tx_chains: u16,
    rx_chains: u16,
    /// Per RX head index: where its header goes and how much data fits.
    rx_buffers: Vec<Option<(u64, u32, u32)>>,
    rx_used_seen: u16,
    /// Next free buffer memory (bump allocator, wraps).
    next_buf: u64,
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

impl Guest<'_> {
    fn buffer(&mut self, len: u64) -> u64 {
        let len = (len + 15) & !15;
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUFS;
        }
        let at = self.next_buf;
        self.next_buf += len;
        at
    }

    /// Queues one TX chain (NEXT links filled in) and lets the device
    /// process it.
    fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        if descs.is_empty() || self.tx_chains >= MAX_CHAINS {
            return;
        }
        let base = (self.tx_chains * 4) % QUEUE_SIZE;
        self.tx_chains += 1;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = base + i as u16 + 1;
                if i + 1 == descs.len() {
                    desc(addr, len, flags & !(VRING_DESC_F_NEXT as u16), 0)
                } else {
                    desc(addr, len, flags | VRING_DESC_F_NEXT as u16, next)
                }
            })
            .collect();
        self.tx_mock
            .add_desc_chains(&raw, base)
            .expect("queueing a TX chain");
        process_tx(self.mem, &mut self.txq, &mut self.muxer, &mut self.scratch);
    }

    fn offer_rx(&mut self, count: u8, header_len: u32, data_len: u32, split: bool, wo: bool) {
        let flags = if wo { VRING_DESC_F_WRITE as u16 } else { 0 };
        for _ in 0..count % 8 {
            if self.rx_chains >= MAX_CHAINS {
                break;
            }
            let base = (self.rx_chains * 2) % QUEUE_SIZE;
            self.rx_chains += 1;
            let at = self.buffer(u64::from(header_len) + u64::from(data_len));
            let chain = if split {
                let data_at = at + u64::from(header_len);
                vec![
                    desc(at, header_len, flags | VRING_DESC_F_NEXT as u16, base + 1),
                    desc(data_at, data_len, flags, 0),
                ]
            } else {
                vec![desc(at, header_len + data_len, flags, 0)]
            };
            self.rx_mock
                .add_desc_chains(&chain, base)
                .expect("queueing an RX chain");
            let room = if split {
                data_len
            } else {
                header_len + data_len - HEADER_SIZE as u32
            };
            self.rx_buffers[usize::from(base)] = Some((at, header_len, room));
        }
    }

    fn rx(&mut self) {
        process_rx(self.mem, &mut self.rxq, &mut self.muxer, &mut self.scratch);
        self.check_used();
    }

    /// Every packet the device wrote fits its buffer and says so.
    fn check_used(&mut self) {
        let used = self.rx_mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
        while self.rx_used_seen != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.rx_used_seen % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(at).expect("used id");
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            if len == 0 {
                continue;
            }
            let (addr, header_len, room) =
                self.rx_buffers[id as usize].expect("the device used a buffer the guest offered");
            assert!(
                header_len as usize >= HEADER_SIZE,
                "a packet in a short header buffer"
            );
            let mut raw = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(addr))
                .expect("reading a written header");
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len, HEADER_SIZE as u32 + hdr.len, "used length vs header");
            assert!(
                hdr.len <= room,
                "payload {} in a {room}-byte buffer",
                hdr.len
            );
            assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, DEFAULT_GUEST_CID));
            assert_eq!(hdr.type_, op::TYPE_STREAM);
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(RX_RING), QUEUE_SIZE);
    let tx_mock = MockSplitQueue::create(&mem, GuestAddress(TX_RING), QUEUE_SIZE);
    let rxq = rx_mock.create_queue::<Queue>().expect("RX queue");
    let txq = tx_mock.create_queue::<Queue>().expect("TX queue");
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let muxer = Muxer::new(MuxerConfig::new(DEFAULT_GUEST_CID, &uds)).expect("muxer");
    let listener = UnixListener::bind(unix::guest_target(&uds, LISTENED_PORT)).expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut guest = Guest {
        mem: &mem,
        rx_mock,
        tx_mock,
        rxq,
        txq,
        muxer,
        scratch: Scratch::default(),
        tx_chains: 0,
        rx_chains: 0,
        rx_buffers: vec![None; usize::from(QUEUE_SIZE)],
        rx_used_seen: 0,
        next_buf: BUFS,
    };

    for step in steps.into_iter().take(48) {
        match step {
            Step::Packet {
                foreign_src,
                foreign_dst,
                guest_port,
                host_port,
                op,
                other_type,
                flags,
                buf_alloc,
                fwd_cnt,
                len_lie,
                data,
                one_descriptor,
            } => {
                let data = &data[..data.len().min(8192)];
                let hdr = Header {
                    src_cid: if foreign_src { 7 } else { DEFAULT_GUEST_CID },
                    dst_cid: if foreign_dst {
                        DEFAULT_GUEST_CID
                    } else {
                        HOST_CID
                    },
                    src_port: guest_port.get(),
                    dst_port: host_port.get(),
                    len: (data.len() as u32).wrapping_add_signed(i32::from(len_lie)),
                    type_: if other_type { 2 } else { op::TYPE_STREAM },
                    op: u16::from(op % 9),
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                let at = guest.buffer(HEADER_SIZE as u64 + data.len() as u64);
                mem.write_slice(&hdr.to_bytes(), GuestAddress(at))
                    .expect("header");
                let data_at = at + HEADER_SIZE as u64;
                mem.write_slice(data, GuestAddress(data_at)).expect("data");
                if one_descriptor || data.is_empty() {
                    let len = (HEADER_SIZE + data.len()) as u32;
                    guest.send_chain(&[(at, len, 0)]);
                } else {
                    guest.send_chain(&[
                        (at, HEADER_SIZE as u32, 0),
                        (data_at, data.len() as u32, 0),
                    ]);
                }
            }
            Step::RawChain { descs, fill } => {
                let chain: Vec<(u64, u32, u16)> = descs
                    .iter()
                    .take(4)
                    .map(|d| {
                        let addr = if d.out_of_range {
                            MEM_SIZE + u64::from(d.at)
                        } else {
                            u64::from(d.at) * 16
                        };
                        let flags = if d.write_only {
                            VRING_DESC_F_WRITE as u16
                        } else {
                            0
                        };
                        (addr, d.len, flags)
                    })
                    .collect();
                // The fill lands where the first descriptor points, unless
                // that is one of the rings (the mock owns those bytes).
                if let Some(&(addr, _, _)) = chain.first() {
                    if addr >= BUFS && addr < MEM_SIZE {
                        let room = (MEM_SIZE - addr) as usize;
                        let fill = &fill[..fill.len().min(room)];
                        mem.write_slice(fill, GuestAddress(addr)).expect("fill");
                    }
                }
                guest.send_chain(&chain);
            }
            Step::Rx {
                count,
                header_len,
                data_len,
                split,
                write_only,
            } => {
                // A header buffer shorter than a header is the guest's
                // mistake the device must survive; a single buffer always
                // has room for one so `room` makes sense.
                let header_len = if split {
                    u32::from(header_len)
                } else {
                    HEADER_SIZE as u32
                };
                guest.offer_rx(count, header_len, u32::from(data_len), split, write_only);
                guest.rx();
            }
            Step::HostConnect {
                port,
                lowercase,
                junk,
            } => {
                let verb = if lowercase { "connect" } else { "CONNECT" };
                let line = junk.unwrap_or_else(|| format!("{verb} {}\n", port.get()).into_bytes());
                if let Ok(mut stream) = unix::connect_nonblocking(&uds) {
                    let _ = stream.write(&line[..line.len().min(256)]);
                    hosts.push(stream);
                }
            }
            Step::HostWrite { which, data } => {
                if let Some(stream) = pick(&mut hosts, which) {
                    let _ = stream.write(&data);
                }
            }
            Step::HostShutdown { which, read, write } => {
                if let Some(stream) = pick(&mut hosts, which) {
                    let how = match (read, write) {
                        (true, true) => Shutdown::Both,
                        (true, false) => Shutdown::Read,
                        _ => Shutdown::Write,
                    };
                    let _ = stream.shutdown(how);
                }
            }
            Step::HostClose { which } => {
                if !hosts.is_empty() {
                    hosts.remove(usize::from(which) % hosts.len());
                }
            }
            Step::Accept => {
                while let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    hosts.push(stream);
                }
            }
            Step::Process => {
                guest.muxer.process();
                guest.rx();
            }
        }
    }
    guest.muxer.process();
    guest.rx();
});

fn pick(hosts: &mut [UnixStream], which: u8) -> Option<&mut UnixStream> {
    let n = hosts.len();
    (n > 0).then(|| &mut hosts[usize::from(which) % n])
}
