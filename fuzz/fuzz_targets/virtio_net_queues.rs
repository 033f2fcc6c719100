//! The virtio-net device's queues: whatever a guest driver puts in the TX
//! and RX virtqueues, and whatever frames the host side hands in, through
//! `kestrel_vmm::vm::virtio::net::queue::{process_tx, process_rx}` the way
//! the device's unit tests drive them: descriptor chains built with
//! `virtio_queue::mock` in real guest memory, a Unix datagram pair in
//! place of the tap (it keeps frame boundaries as a tap does).
//!
//! Besides "no panic": every RX chain the device uses is one the guest
//! offered, its used length fits the chain's writable bytes, and what it
//! wrote there is a frame the host sent; every frame TX hands the host is
//! at least a header and an Ethernet header, and no longer than the
//! device's buffer.

#![no_main]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use arbitrary::Arbitrary;
use kestrel_vmm::vm::virtio::net::queue::{process_rx, process_tx, Scratch, Stats};
use kestrel_vmm::vm::virtio::net::{Backend, ETH_HLEN, MAX_BUFFER_LEN, QUEUE_SIZE, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 1 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Frame buffers live from here to the end of memory.
const BUFS: u64 = 0x2_0000;
/// Chains per queue and input; see the vsock target for why only half.
const MAX_CHAINS: u16 = QUEUE_SIZE / 2 - 8;

/// The tap's stand-in.
struct Datagrams(UnixDatagram);

impl AsRawFd for Datagrams {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for Datagrams {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }

    fn set_offload(&mut self, _features: u64) -> io::Result<()> {
        Ok(())
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
    /// A frame from the guest: header and frame in one descriptor or two.
    Tx {
        frame: Vec<u8>,
        split: bool,
    },
    /// Any TX chain over arbitrary memory.
    RawTx(Vec<RawDesc>),
    /// RX buffers of a chosen shape.
    Rx {
        count: u8,
        lens: Vec<u16>,
        write_only: bool,
    },
    /// Any RX chain over arbitrary memory.
    RawRx(Vec<RawDesc>),
    /// The host side sends a frame (any length, up to the device's max and
    /// a little past it).
    HostFrame {
        len: u32,
        fill: u8,
    },
    ProcessTx,
    ProcessRx,
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    rx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    backend: Datagrams,
    host: UnixDatagram,
    scratch: Scratch,
    stats: Stats,
    tx_chains: u16,
    rx_chains: u16,
    /// Per RX head index: the chain's writable bytes.
    rx_room: Vec<Option<u64>>,
    rx_used_seen: u16,
    /// Frames the host sent, not yet seen in the guest (their fill bytes).
    host_fills: Vec<u8>,
    next_buf: u64,
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

    /// Adds one chain (NEXT links filled in) at a fresh place in the
    /// descriptor table of `rx` or TX.
    fn chain(&mut self, rx: bool, descs: &[(u64, u32, u16)]) -> Option<u16> {
        let count = if rx {
            &mut self.rx_chains
        } else {
            &mut self.tx_chains
        };
        if descs.is_empty() || *count >= MAX_CHAINS {
            return None;
        }
        let base = (*count * 4) % QUEUE_SIZE;
        *count += 1;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .take(4)
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                if i + 1 == descs.len().min(4) {
                    desc(addr, len, flags & !(VRING_DESC_F_NEXT as u16), 0)
                } else {
                    desc(
                        addr,
                        len,
                        flags | VRING_DESC_F_NEXT as u16,
                        base + i as u16 + 1,
                    )
                }
            })
            .collect();
        let mock = if rx { &self.rx_mock } else { &self.tx_mock };
        mock.add_desc_chains(&raw, base).expect("queueing a chain");
        Some(base)
    }

    fn raw(descs: &[RawDesc]) -> Vec<(u64, u32, u16)> {
        descs
            .iter()
            .map(|d| {
                let addr = if d.out_of_range {
                    MEM_SIZE + u64::from(d.at)
                } else {
                    (u64::from(d.at) * 16) % MEM_SIZE
                };
                let flags = if d.write_only {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                (addr, d.len, flags)
            })
            .collect()
    }

    fn tx(&mut self) {
        process_tx(
            self.mem,
            &mut self.txq,
            &mut self.backend,
            &mut self.scratch,
            &mut self.stats,
        );
        // What reached the host: whole frames, never shorter than the
        // headers the device requires, never longer than its buffer.
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 16];
        loop {
            match self.host.recv(&mut buf) {
                Ok(n) => {
                    assert!(
                        n >= VNET_HDR_LEN + ETH_HLEN,
                        "{n}-byte frame reached the tap"
                    );
                    assert!(n <= MAX_BUFFER_LEN, "{n}-byte frame reached the tap");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the host side: {e}"),
            }
        }
    }

    fn rx(&mut self) {
        process_rx(
            self.mem,
            &mut self.rxq,
            &mut self.backend,
            &mut self.scratch,
            &mut self.stats,
        );
        let used = self.rx_mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
        while self.rx_used_seen != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.rx_used_seen % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(at).expect("used id");
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let room = self
                .rx_room
                .get(id as usize)
                .copied()
                .flatten()
                .expect("the device used an RX chain the guest never offered");
            if len == 0 {
                continue;
            }
            assert!(
                u64::from(len) <= room,
                "{len} bytes used of a {room}-byte chain"
            );
            assert!(
                len as usize >= VNET_HDR_LEN + ETH_HLEN,
                "a {len}-byte frame given to the guest"
            );
            assert!(!self.host_fills.is_empty(), "a frame the host never sent");
            self.host_fills.remove(0);
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
    let (a, b) = UnixDatagram::pair().expect("socketpair");
    for end in [&a, &b] {
        end.set_nonblocking(true).expect("non-blocking");
    }
    let mut guest = Guest {
        mem: &mem,
        rx_mock,
        tx_mock,
        rxq,
        txq,
        backend: Datagrams(a),
        host: b,
        scratch: Scratch::default(),
        stats: Stats::default(),
        tx_chains: 0,
        rx_chains: 0,
        rx_room: vec![None; usize::from(QUEUE_SIZE)],
        rx_used_seen: 0,
        host_fills: Vec::new(),
        next_buf: BUFS,
    };

    for step in steps.into_iter().take(48) {
        match step {
            Step::Tx { frame, split } => {
                let frame = &frame[..frame.len().min(4096)];
                let at = guest.buffer(frame.len() as u64);
                mem.write_slice(frame, GuestAddress(at)).expect("frame");
                let len = frame.len() as u32;
                let descs = if split && len > VNET_HDR_LEN as u32 {
                    vec![
                        (at, VNET_HDR_LEN as u32, 0),
                        (at + VNET_HDR_LEN as u64, len - VNET_HDR_LEN as u32, 0),
                    ]
                } else {
                    vec![(at, len, 0)]
                };
                guest.chain(false, &descs);
            }
            Step::RawTx(descs) => {
                let descs = Guest::raw(&descs);
                guest.chain(false, &descs);
            }
            Step::Rx {
                count,
                lens,
                write_only,
            } => {
                let flags = if write_only {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                for _ in 0..count % 4 {
                    let descs: Vec<(u64, u32, u16)> = lens
                        .iter()
                        .take(4)
                        .map(|&len| (guest.buffer(u64::from(len)), u32::from(len), flags))
                        .collect();
                    let room = if write_only {
                        descs.iter().map(|d| u64::from(d.1)).sum()
                    } else {
                        0
                    };
                    if let Some(head) = guest.chain(true, &descs) {
                        guest.rx_room[usize::from(head)] = Some(room);
                    }
                }
            }
            Step::RawRx(descs) => {
                let descs = Guest::raw(&descs);
                let room = descs
                    .iter()
                    .take(4)
                    .filter(|d| d.2 & VRING_DESC_F_WRITE as u16 != 0)
                    .map(|d| u64::from(d.1))
                    .sum();
                if let Some(head) = guest.chain(true, &descs) {
                    guest.rx_room[usize::from(head)] = Some(room);
                }
            }
            Step::HostFrame { len, fill } => {
                let len = (len as usize) % (MAX_BUFFER_LEN + 64);
                match guest.host.send(&vec![fill; len]) {
                    // A longer one reaches the device cut to its buffer (a
                    // datagram read with a smaller buffer is truncated).
                    Ok(_) if len >= VNET_HDR_LEN + ETH_HLEN => guest.host_fills.push(fill),
                    // Too short: the device drops it, never in the guest.
                    _ => {}
                }
            }
            Step::ProcessTx => guest.tx(),
            Step::ProcessRx => guest.rx(),
        }
    }
});
