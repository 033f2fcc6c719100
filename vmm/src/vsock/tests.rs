//! The vsock core driven the way a guest driver drives it: descriptor
//! chains built with `virtio-queue`'s mock driver in real guest memory, host
//! programs on real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::muxer::REPORT_INTERVAL;
use super::queue::{process_rx, process_tx, Scratch, QUEUE_SIZE};
use super::*;

const GUEST_CID: u64 = 3;
const RX_SLOTS: u16 = 64;
const RX_DATA: u32 = 4096;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u16 = 64;
/// What the test guest advertises as its receive buffer per connection.
const GUEST_BUF: u32 = 256 * 1024;

/// A guest driver: an RX and a TX queue in guest memory, and the muxer.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rx_mock: MockSplitQueue<'static, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'static, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    muxer: Muxer,
    scratch: Scratch,
    rx_free: Vec<u16>,
    rx_used_seen: u16,
    tx_next: u16,
    /// Bytes the guest consumed per connection, for its fwd_cnt.
    fwd_cnt: std::collections::HashMap<(u32, u32), u32>,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

impl Guest {
    fn new() -> Guest {
        Guest::with_limit(DEFAULT_MAX_CONNECTIONS)
    }

    fn with_limit(max_connections: usize) -> Guest {
        Guest::with_config(|c| c.max_connections = max_connections)
    }

    fn with_config(adjust: impl FnOnce(&mut MuxerConfig)) -> Guest {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
        ));
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(0x4_0000), QUEUE_SIZE);
        let rxq = rx_mock.create_queue::<Queue>().unwrap();
        let txq = tx_mock.create_queue::<Queue>().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut config = MuxerConfig::new(GUEST_CID, &uds);
        adjust(&mut config);
        let muxer = Muxer::new(config).unwrap();
        Guest {
            mem,
            rx_mock,
            tx_mock,
            rxq,
            txq,
            muxer,
            scratch: Scratch::default(),
            rx_free: (0..RX_SLOTS).rev().collect(),
            rx_used_seen: 0,
            tx_next: 0,
            fwd_cnt: Default::default(),
            _dir: dir,
            uds,
        }
    }

    fn header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: op::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: self
                .fwd_cnt
                .get(&(src_port, dst_port))
                .copied()
                .unwrap_or(0),
        }
    }

    /// Queues one TX chain made of `descs` (NEXT links filled in) and lets
    /// the device process it.
    fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let base = self.tx_next * 2;
        self.tx_next = (self.tx_next + 1) % TX_SLOTS;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                desc(addr, len, flags, base + i as u16 + 1)
            })
            .collect();
        self.tx_mock.add_desc_chains(&raw, base).unwrap();
        process_tx(self.mem, &mut self.txq, &mut self.muxer, &mut self.scratch);
    }

    fn slot_addr(&self) -> u64 {
        TX_BUFS + u64::from(self.tx_next) * TX_SLOT
    }

    /// The guest sends a packet (header and payload in two descriptors, as
    /// Linux does).
    fn send(&mut self, hdr: Header, data: &[u8]) {
        let addr = self.slot_addr();
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        if data.is_empty() {
            self.send_chain(&[(addr, HEADER_SIZE as u32, 0)]);
        } else {
            self.mem.write_slice(data, GuestAddress(addr + 64)).unwrap();
            self.send_chain(&[
                (addr, HEADER_SIZE as u32, 0),
                (addr + 64, data.len() as u32, 0),
            ]);
        }
    }

    fn send_op(&mut self, src_port: u32, dst_port: u32, op: u16) {
        let hdr = self.header(src_port, dst_port, op, 0);
        self.send(hdr, &[]);
    }

    fn send_data(&mut self, src_port: u32, dst_port: u32, data: &[u8]) {
        let hdr = self.header(src_port, dst_port, op::RW, data.len() as u32);
        self.send(hdr, data);
    }

    /// Offers every free RX buffer, lets the muxer handle host events, and
    /// returns the packets the device wrote.
    fn poll(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut chains = Vec::new();
        while let Some(slot) = self.rx_free.pop() {
            let addr = RX_BUFS + u64::from(slot) * 0x2000;
            chains.push(desc(
                addr,
                HEADER_SIZE as u32,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                slot * 2 + 1,
            ));
            chains.push(desc(addr + 64, RX_DATA, VRING_DESC_F_WRITE as u16, 0));
            self.rx_mock.add_desc_chains(&chains, slot * 2).unwrap();
            chains.clear();
        }
        self.muxer.process();
        process_rx(self.mem, &mut self.rxq, &mut self.muxer, &mut self.scratch);
        self.collect_used()
    }

    fn collect_used(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx_mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.rx_used_seen != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.rx_used_seen % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let slot = (id / 2) as u16;
            self.rx_free.push(slot);
            if len == 0 {
                continue;
            }
            let addr = RX_BUFS + u64::from(slot) * 0x2000;
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                len,
                HEADER_SIZE as u32 + hdr.len,
                "used length matches the header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + 64))
                .unwrap();
            if hdr.op == op::RW {
                *self
                    .fwd_cnt
                    .entry((hdr.dst_port, hdr.src_port))
                    .or_default() += hdr.len;
            }
            out.push((hdr, data));
        }
        out
    }

    /// Polls a few times: a new host connection's first bytes may only show
    /// on the poll after its accept.
    fn settle(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..5 {
            out.extend(self.poll());
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    /// Polls until `pred` matches a packet, returning it and everything
    /// before it.
    fn poll_until(&mut self, what: &str, pred: impl Fn(&Header) -> bool) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (hdr, data) in self.poll() {
                if pred(&hdr) {
                    return (hdr, data);
                }
            }
            assert!(Instant::now() < deadline, "no {what} from the device");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A host program connects through the hybrid socket and the guest
    /// accepts on `port`. Returns the host stream and the host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.poll_until("REQUEST", |h| h.op == op::REQUEST && h.dst_port == port);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        self.send_op(port, req.src_port, op::RESPONSE);
        let line = read_line(&mut host);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }
}

fn read_line(stream: &mut UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn assert_closed(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the host socket to close, got {e}"),
        }
    }
}

fn listen_guest_port(uds: &Path, port: u32) -> UnixListener {
    UnixListener::bind(unix::guest_target(uds, port)).unwrap()
}

#[test]
fn host_connect_is_answered_ok_once_the_guest_accepts() {
    let mut guest = Guest::new();
    let (_host, port) = guest.host_connect(1024);
    assert!(port >= 1 << 30);
    assert_eq!(guest.muxer.connection_count(), 1);
}

#[test]
fn lowercase_connect_works_too() {
    let mut guest = Guest::new();
    let mut host = UnixStream::connect(&guest.uds).unwrap();
    host.write_all(b"connect 52\n").unwrap();
    let (req, _) = guest.poll_until("REQUEST", |h| h.op == op::REQUEST);
    assert_eq!(req.dst_port, 52);
}

#[test]
fn host_connect_to_a_port_nobody_listens_on_closes_the_socket() {
    let mut guest = Guest::new();
    let mut host = UnixStream::connect(&guest.uds).unwrap();
    host.write_all(b"CONNECT 9999\n").unwrap();
    let (req, _) = guest.poll_until("REQUEST", |h| h.op == op::REQUEST);
    guest.send_op(9999, req.src_port, op::RST);
    guest.settle();
    assert_closed(&mut host);
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn bad_connect_line_closes_the_socket() {
    let mut guest = Guest::new();
    let mut host = UnixStream::connect(&guest.uds).unwrap();
    host.write_all(b"HELLO\n").unwrap();
    guest.settle();
    assert_closed(&mut host);
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn guest_connect_reaches_the_host_listener_at_path_port() {
    let mut guest = Guest::new();
    let listener = listen_guest_port(&guest.uds, 5000);
    guest.send_op(40000, 5000, op::REQUEST);
    let (resp, _) = guest.poll_until("RESPONSE", |h| h.dst_port == 40000);
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!(resp.src_port, 5000);
    let (mut host, _) = listener.accept().unwrap();
    guest.send_data(40000, 5000, b"from guest");
    assert_eq!(read_exactly(&mut host, 10), b"from guest");
    host.write_all(b"from host").unwrap();
    let (pkt, data) = guest.poll_until("RW", |h| h.op == op::RW);
    assert_eq!((pkt.src_port, pkt.dst_port), (5000, 40000));
    assert_eq!(data, b"from host");
}

#[test]
fn guest_connect_to_a_host_port_nobody_listens_on_is_reset() {
    let mut guest = Guest::new();
    guest.send_op(40000, 6000, op::REQUEST);
    let (rst, _) = guest.poll_until("RST", |h| h.dst_port == 40000);
    assert_eq!(rst.op, op::RST);
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn data_flows_both_ways_on_a_host_connection() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    host.write_all(b"ping").unwrap();
    let (pkt, data) = guest.poll_until("RW", |h| h.op == op::RW);
    assert_eq!(
        (pkt.src_port, pkt.dst_port, pkt.dst_cid),
        (port, 1024, GUEST_CID)
    );
    assert_eq!(pkt.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(data, b"ping");
    guest.send_data(1024, port, b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");
}

#[test]
fn host_to_guest_data_respects_the_guests_credit() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    // The guest says it has 8 KiB of room and consumed nothing.
    let mut hdr = guest.header(1024, port, op::CREDIT_UPDATE, 0);
    hdr.buf_alloc = 8192;
    guest.send(hdr, &[]);
    host.write_all(&vec![7u8; 20_000]).unwrap();
    let mut got = 0;
    let mut credit_requested = false;
    for _ in 0..50 {
        for (pkt, data) in guest.poll() {
            match pkt.op {
                op::RW => got += data.len(),
                op::CREDIT_REQUEST => credit_requested = true,
                other => panic!("unexpected op {other}"),
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(got, 8192, "no more than the advertised credit");
    assert!(credit_requested, "a blocked sender asks for credit");
    // The guest consumed it all: the rest flows.
    let mut hdr = guest.header(1024, port, op::CREDIT_UPDATE, 0);
    hdr.buf_alloc = 64 * 1024;
    hdr.fwd_cnt = 8192;
    guest.send(hdr, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < 20_000 && Instant::now() < deadline {
        got += guest
            .poll()
            .iter()
            .filter(|(h, _)| h.op == op::RW)
            .map(|(_, d)| d.len())
            .sum::<usize>();
    }
    assert_eq!(got, 20_000);
}

#[test]
fn credit_request_is_answered_with_a_credit_update() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    guest.send_data(1024, port, &[1u8; 1000]);
    assert_eq!(read_exactly(&mut host, 1000).len(), 1000);
    guest.send_op(1024, port, op::CREDIT_REQUEST);
    let (update, _) = guest.poll_until("CREDIT_UPDATE", |h| h.op == op::CREDIT_UPDATE);
    assert_eq!(update.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(
        update.fwd_cnt, 1000,
        "everything the host read counts as forwarded"
    );
}

#[test]
fn guest_to_host_data_sends_credit_updates_as_the_host_drains() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    // Three quarters of our buffer in flight: once the host reads it, the
    // guest must hear about the room without asking.
    guest.send_data(1024, port, &vec![3u8; 48 * 1024]);
    assert_eq!(read_exactly(&mut host, 48 * 1024).len(), 48 * 1024);
    let (update, _) = guest.poll_until("CREDIT_UPDATE", |h| h.op == op::CREDIT_UPDATE);
    assert_eq!(update.fwd_cnt, 48 * 1024);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    // The host never reads: the socket's kernel buffer fills, then our
    // 64 KiB, then the guest is past its credit.
    let chunk = vec![9u8; 60 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        guest.send_data(1024, port, &chunk);
        if guest.poll().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(
        reset,
        "the connection is reset once the guest overruns its credit"
    );
    assert_closed(&mut host);
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_a_reset_and_rst_gets_nothing() {
    let mut guest = Guest::new();
    guest.send_data(1111, 2222, b"stray");
    let (rst, _) = guest.poll_until("RST", |h| h.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (2222, 1111));
    guest.send_op(1111, 2222, op::RST);
    assert!(guest.settle().is_empty(), "a RST is never answered");
}

#[test]
fn guest_shutdown_closes_the_host_end_and_is_answered_with_rst() {
    let mut guest = Guest::new();
    let (mut host, port) = guest.host_connect(1024);
    guest.send_data(1024, port, b"last words");
    let mut hdr = guest.header(1024, port, op::SHUTDOWN, 0);
    hdr.flags = op::SHUTDOWN_RCV | op::SHUTDOWN_SEND;
    guest.send(hdr, &[]);
    let (rst, _) = guest.poll_until("RST", |h| h.op == op::RST);
    assert_eq!(rst.src_port, port);
    assert_eq!(
        read_exactly(&mut host, 10),
        b"last words",
        "buffered data is not lost"
    );
    assert_closed(&mut host);
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn host_close_sends_shutdown_and_the_guests_rst_ends_it() {
    let mut guest = Guest::new();
    let (host, port) = guest.host_connect(1024);
    drop(host);
    let (shutdown, _) = guest.poll_until("SHUTDOWN", |h| h.op == op::SHUTDOWN);
    assert_eq!(shutdown.flags, op::SHUTDOWN_RCV | op::SHUTDOWN_SEND);
    assert_eq!(
        guest.muxer.connection_count(),
        1,
        "waits for the guest's RST"
    );
    guest.send_op(1024, port, op::RST);
    guest.poll();
    assert_eq!(guest.muxer.connection_count(), 0);
}

#[test]
fn a_hundred_concurrent_connections_each_keep_their_own_bytes() {
    let mut guest = Guest::new();
    let mut hosts: Vec<(UnixStream, u32)> = Vec::new();
    for _ in 0..100 {
        let mut host = UnixStream::connect(&guest.uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        hosts.push((host, 0));
    }
    let mut accepted = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted < 100 {
        for (req, _) in guest.poll() {
            assert_eq!(req.op, op::REQUEST);
            guest.send_op(1024, req.src_port, op::RESPONSE);
            accepted += 1;
        }
        assert!(
            Instant::now() < deadline,
            "only {accepted} REQUESTs reached the guest"
        );
    }
    for (host, port) in &mut hosts {
        let line = read_line(host);
        *port = line.trim_start_matches("OK ").trim().parse().unwrap();
    }
    for (host, port) in &mut hosts {
        host.write_all(format!("hello from {port}").as_bytes())
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 100 {
        for (pkt, data) in guest.poll() {
            assert_eq!(pkt.op, op::RW);
            assert_eq!(
                String::from_utf8(data).unwrap(),
                format!("hello from {}", pkt.src_port)
            );
            seen.insert(pkt.src_port);
        }
        assert!(
            Instant::now() < deadline,
            "only {} connections delivered",
            seen.len()
        );
    }
    for (host, port) in &mut hosts {
        guest.send_data(1024, *port, format!("reply to {port}").as_bytes());
        let want = format!("reply to {port}");
        assert_eq!(read_exactly(host, want.len()), want.as_bytes());
    }
    assert_eq!(guest.muxer.connection_count(), 100);
}

#[test]
fn connections_beyond_the_limit_are_refused_and_counted() {
    let mut guest = Guest::with_limit(2);
    let (_a, _) = guest.host_connect(1);
    let (_b, _) = guest.host_connect(2);
    let mut third = UnixStream::connect(&guest.uds).unwrap();
    third.write_all(b"CONNECT 3\n").unwrap();
    guest.settle();
    assert_closed(&mut third);
    guest.send_op(4000, 7000, op::REQUEST);
    let (rst, _) = guest.poll_until("RST", |h| h.dst_port == 4000);
    assert_eq!(rst.op, op::RST);
    assert_eq!(guest.muxer.refusals().at_limit, 2);
}

/// Whether the peer closed `stream`, looking for at most `wait`.
fn closed_within(stream: &mut UnixStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        other => panic!("unexpected read on a connection in its handshake: {other:?}"),
    }
}

/// Opens `n` host connections that never send a byte, letting the muxer
/// accept them as they come (a full listen backlog would block `connect`).
fn open_idle(guest: &mut Guest, n: usize) -> Vec<UnixStream> {
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        idle.push(UnixStream::connect(&guest.uds).unwrap());
        if i % 32 == 31 {
            guest.poll();
        }
    }
    guest.settle();
    idle
}

#[test]
fn a_host_connection_silent_past_the_handshake_deadline_is_closed() {
    let mut guest = Guest::new();
    let mut silent = UnixStream::connect(&guest.uds).unwrap();
    let mut partial = UnixStream::connect(&guest.uds).unwrap();
    partial.write_all(b"CONNE").unwrap();
    guest.settle();
    assert_eq!(guest.muxer.handshake_count(), 2);

    let start = Instant::now();
    guest.muxer.on_tick(start + HANDSHAKE_TIMEOUT / 2);
    assert_eq!(
        guest.muxer.handshake_count(),
        2,
        "still within the deadline"
    );
    assert!(!closed_within(&mut silent, Duration::from_millis(20)));

    guest
        .muxer
        .on_tick(start + HANDSHAKE_TIMEOUT + Duration::from_millis(1));
    assert_eq!(guest.muxer.handshake_count(), 0);
    assert_closed(&mut silent);
    assert_closed(&mut partial);
    assert_eq!(guest.muxer.refusals().handshake_timeouts, 2);
    let (_ok, _) = guest.host_connect(1024);
}

#[test]
fn the_deadline_timer_closes_a_silent_connection_by_itself() {
    let mut guest = Guest::with_config(|c| c.handshake_timeout = Duration::from_millis(100));
    let mut silent = UnixStream::connect(&guest.uds).unwrap();
    let start = Instant::now();
    while !closed_within(&mut silent, Duration::from_millis(10)) {
        guest.poll();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the silent connection was never closed"
        );
    }
    assert_eq!(guest.muxer.refusals().handshake_timeouts, 1);
}

#[test]
fn past_the_handshake_bound_the_oldest_silent_connection_makes_room() {
    let mut guest = Guest::with_config(|c| {
        c.max_connections = 8;
        c.max_handshakes = 4;
    });
    let mut idle = open_idle(&mut guest, 10);
    assert_eq!(guest.muxer.handshake_count(), 4);
    assert_eq!(guest.muxer.refusals().handshakes_evicted, 6);
    for (i, stream) in idle.iter_mut().enumerate() {
        let wait = Duration::from_millis(if i < 6 { 2000 } else { 20 });
        assert_eq!(closed_within(stream, wait), i < 6, "idle connection {i}");
    }
    // A runtime that sends its line at once gets through, and keeps its
    // connection when more silent ones arrive.
    let (mut runtime, port) = guest.host_connect(1024);
    let _more = open_idle(&mut guest, 10);
    assert!(guest.muxer.connection_count() <= 5);
    guest.send_data(1024, port, b"still here");
    assert_eq!(read_exactly(&mut runtime, 10), b"still here");
}

#[test]
fn hundreds_of_idle_connections_never_lock_out_a_runtime() {
    let mut guest = Guest::new();
    let _idle = open_idle(&mut guest, 300);
    assert_eq!(guest.muxer.handshake_count(), DEFAULT_MAX_HANDSHAKES);
    assert_eq!(
        guest.muxer.refusals().handshakes_evicted,
        (300 - DEFAULT_MAX_HANDSHAKES) as u64
    );
    let (mut runtime, port) = guest.host_connect(1024);
    runtime.write_all(b"ping").unwrap();
    let (pkt, data) = guest.poll_until("RW", |h| h.op == op::RW);
    assert_eq!((pkt.src_port, data.as_slice()), (port, b"ping".as_slice()));
}

/// A `tracing` writer into a shared buffer, to count log lines.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn a_flood_of_refusals_is_one_summary_line_per_interval() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut guest = Guest::with_limit(2);
        let (_a, _) = guest.host_connect(1);
        let (_b, _) = guest.host_connect(2);
        let _first = open_idle(&mut guest, 1);
        let summary = "turned away";
        assert_eq!(
            log.lines_with(summary).len(),
            1,
            "the first refusal is reported at once"
        );
        let _flood = open_idle(&mut guest, 50);
        assert_eq!(guest.muxer.refusals().at_limit, 51);
        assert_eq!(
            log.lines_with(summary).len(),
            1,
            "the rest wait for the interval"
        );
        guest
            .muxer
            .on_tick(Instant::now() + REPORT_INTERVAL + Duration::from_secs(1));
        let lines = log.lines_with(summary);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("at_limit=50"), "{}", lines[1]);
    });
}

#[test]
fn malformed_tx_chains_reset_only_their_connection() {
    let mut guest = Guest::new();
    let (mut bad, bad_port) = guest.host_connect(1024);
    let (mut good, good_port) = guest.host_connect(1025);
    // A header claiming 1000 bytes of payload with a 10-byte data buffer.
    let addr = guest.slot_addr();
    let hdr = guest.header(1024, bad_port, op::RW, 1000);
    guest
        .mem
        .write_slice(&hdr.to_bytes(), GuestAddress(addr))
        .unwrap();
    guest.send_chain(&[(addr, HEADER_SIZE as u32, 0), (addr + 64, 10, 0)]);
    let (rst, _) = guest.poll_until("RST", |h| h.op == op::RST);
    assert_eq!(rst.src_port, bad_port);
    assert_closed(&mut bad);
    // Chains that are not even packets: too short, write-only, pointing
    // outside guest memory. Consumed, nothing panics.
    let addr = guest.slot_addr();
    guest.send_chain(&[(addr, 10, 0)]);
    guest.send_chain(&[(addr, HEADER_SIZE as u32, VRING_DESC_F_WRITE as u16)]);
    guest.send_chain(&[(1 << 40, HEADER_SIZE as u32, 0)]);
    // The other connection is unharmed.
    guest.send_data(1025, good_port, b"still here");
    assert_eq!(read_exactly(&mut good, 10), b"still here");
}

#[test]
fn malformed_rx_buffers_are_skipped_without_losing_packets() {
    let mut guest = Guest::new();
    let listener = listen_guest_port(&guest.uds, 5000);
    // One RX buffer too small for a header, then the normal ones.
    let bad = desc(RX_BUFS - 0x1000, 8, VRING_DESC_F_WRITE as u16, 0);
    guest.rx_mock.add_desc_chains(&[bad], 200).unwrap();
    guest.send_op(40000, 5000, op::REQUEST);
    let used_before = guest.rx_used_seen;
    let (resp, _) = guest.poll_until("RESPONSE", |h| h.op == op::RESPONSE);
    assert_eq!(resp.dst_port, 40000);
    assert!(
        guest.rx_used_seen.wrapping_sub(used_before) >= 2,
        "the bad buffer was consumed"
    );
    drop(listener);
}
