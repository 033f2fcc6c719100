//! One vsock stream: its state machine, its credit accounting and the host
//! Unix stream it is bound to.
//!
//! Credit (virtio spec 5.10.6.3): each side advertises `buf_alloc` (its
//! receive buffer) and `fwd_cnt` (bytes it has consumed). A sender may have
//! at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. Our
//! receive buffer is [`to_host`](Connection) — bytes from the guest the host
//! socket has not taken yet — capped at [`CONN_BUF_SIZE`]; a guest that
//! overruns it broke the protocol and gets its connection reset.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{op, Header, CONN_BUF_SIZE};

/// How long the guest has to answer a host-initiated REQUEST, and to send
/// its RST after we shut a connection down (Firecracker's figure).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected and asked for a guest port; REQUEST sent, no
    /// RESPONSE yet.
    LocalInit,
    /// Both ends talk.
    Established,
    /// The host closed its end; SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed,
    /// The guest shut down both directions; bytes for the host are still
    /// being written, then RST.
    Draining,
    /// Done: a RST may still be queued, then the connection is dropped.
    Killed,
}

/// Control packets waiting for room in the RX queue, in sending order.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    rst: bool,
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
    credit_request: bool,
}

/// What a connection wants sent to the guest next (the muxer adds
/// addresses, type and credit fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub op: u16,
    pub flags: u32,
    pub len: u32,
}

impl Outgoing {
    fn control(op: u16) -> Outgoing {
        Outgoing {
            op,
            flags: 0,
            len: 0,
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    pending: Pending,
    /// The host stream has bytes (or EOF) we have not read yet.
    readable: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes received from the guest.
    recv_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    to_host: VecDeque<u8>,
    peer_shut_rcv: bool,
    peer_shut_send: bool,
    host_write_shut: bool,
    /// A CREDIT_REQUEST is out and unanswered.
    credit_requested: bool,
    deadline: Option<Instant>,
}

impl Connection {
    /// A connection the host asked for: REQUEST goes to the guest first.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Connection {
        let mut conn = Connection::new(stream, local_port, peer_port, State::LocalInit);
        conn.pending.request = true;
        conn.deadline = Some(Instant::now() + PEER_TIMEOUT);
        conn
    }

    /// A connection the guest asked for and the host accepted.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header) -> Connection {
        let mut conn = Connection::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        conn.pending.response = true;
        conn.update_peer_credit(hdr);
        conn
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            readable: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            to_host: VecDeque::new(),
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_write_shut: false,
            credit_requested: false,
            deadline: None,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// Our consumed-bytes counter, stamped on every packet we send.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Done and nothing left to tell the guest: the muxer may drop it.
    pub fn is_finished(&self) -> bool {
        self.state == State::Killed && !self.pending.rst
    }

    /// How many bytes the guest can take right now.
    fn peer_avail(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established && !self.peer_shut_rcv
    }

    /// Something is waiting to go to the guest.
    pub fn has_pending_rx(&self) -> bool {
        let p = self.pending;
        p.rst
            || p.request
            || p.response
            || p.shutdown
            || p.credit_update
            || p.credit_request
            || (self.readable && self.can_send_data() && self.peer_avail() > 0)
    }

    /// Which host-stream events we want now: (readable, writable).
    pub fn interest(&self) -> (bool, bool) {
        let want_read = self.can_send_data() && !self.readable && self.peer_avail() > 0;
        let want_write = !self.to_host.is_empty() && self.state != State::Killed;
        (want_read, want_write)
    }

    /// Ends the connection: the host sees its socket close, the guest gets
    /// a RST.
    pub fn reset(&mut self) {
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.kill();
    }

    fn kill(&mut self) {
        self.state = State::Killed;
        self.readable = false;
        self.to_host.clear();
        self.deadline = None;
        // The fd closes when the muxer drops us; shutting down now tells the
        // host program at once even if a RST waits for queue room.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The muxer's epoll saw the host stream: readable / writable / hung up.
    pub fn on_host_event(&mut self, readable: bool, writable: bool) {
        if readable {
            self.readable = true;
            self.maybe_request_credit();
        }
        if writable {
            self.flush_to_host();
        }
    }

    /// The peer's deadline passed.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            tracing::debug!(
                local_port = self.local_port,
                peer_port = self.peer_port,
                state = ?self.state,
                "vsock peer did not answer in time; resetting"
            );
            self.reset();
        }
    }

    /// The next packet for the guest, if any. `buf` receives an RW payload;
    /// its length bounds the packet.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<Outgoing> {
        let out = self.next_outgoing(buf)?;
        // Every packet carries our fwd_cnt: the guest is up to date now.
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        Some(out)
    }

    fn next_outgoing(&mut self, buf: &mut [u8]) -> Option<Outgoing> {
        let p = &mut self.pending;
        if p.rst {
            p.rst = false;
            return Some(Outgoing::control(op::RST));
        }
        if p.request {
            p.request = false;
            return Some(Outgoing::control(op::REQUEST));
        }
        if p.response {
            p.response = false;
            return Some(Outgoing::control(op::RESPONSE));
        }
        if p.shutdown {
            p.shutdown = false;
            return Some(Outgoing {
                op: op::SHUTDOWN,
                flags: op::SHUTDOWN_RCV | op::SHUTDOWN_SEND,
                len: 0,
            });
        }
        if p.credit_update {
            p.credit_update = false;
            return Some(Outgoing::control(op::CREDIT_UPDATE));
        }
        if p.credit_request {
            p.credit_request = false;
            return Some(Outgoing::control(op::CREDIT_REQUEST));
        }
        if !(self.readable && self.can_send_data()) {
            return None;
        }
        let room = (self.peer_avail() as usize).min(buf.len());
        if room == 0 {
            return None;
        }
        loop {
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    // The host closed: tell the guest, and give it a while
                    // to answer with RST.
                    self.state = State::LocalClosed;
                    self.readable = false;
                    self.deadline = Some(Instant::now() + PEER_TIMEOUT);
                    return Some(Outgoing {
                        op: op::SHUTDOWN,
                        flags: op::SHUTDOWN_RCV | op::SHUTDOWN_SEND,
                        len: 0,
                    });
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    self.maybe_request_credit();
                    return Some(Outgoing {
                        op: op::RW,
                        flags: 0,
                        len: n as u32,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(local_port = self.local_port, error = %e, "vsock host read failed");
                    self.reset();
                    self.pending.rst = false;
                    return Some(Outgoing::control(op::RST));
                }
            }
        }
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8]) {
        self.update_peer_credit(hdr);
        match hdr.op {
            op::RW => self.guest_data(data),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.pending.credit_update = true,
            op::RESPONSE if self.state == State::LocalInit => self.established_by_guest(),
            op::SHUTDOWN => self.guest_shutdown(hdr.flags),
            op::RST => {
                self.pending = Pending::default();
                self.kill();
            }
            other => {
                tracing::debug!(
                    local_port = self.local_port,
                    op = other,
                    state = ?self.state,
                    "unexpected vsock packet; resetting"
                );
                self.reset();
            }
        }
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_avail() > 0 {
            self.credit_requested = false;
        }
    }

    /// The guest accepted a host-initiated connection: answer the host.
    fn established_by_guest(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.local_port);
        // A fresh socket's send buffer always has room for these few bytes;
        // anything else means the host is already gone.
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => self.reset(),
        }
    }

    fn guest_data(&mut self, data: &[u8]) {
        match self.state {
            State::Established if !self.peer_shut_send => {}
            // The host end is gone; the guest has not seen our SHUTDOWN yet.
            State::LocalClosed | State::Killed => return,
            _ => return self.reset(),
        }
        self.recv_cnt += Wrapping(data.len() as u32);
        let mut rest = data;
        if self.to_host.is_empty() {
            match write_some(&mut self.stream, rest) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    rest = &rest[n..];
                }
                Err(_) => return self.host_gone(),
            }
        }
        if self.to_host.len() + rest.len() > CONN_BUF_SIZE as usize {
            tracing::warn!(
                local_port = self.local_port,
                peer_port = self.peer_port,
                "guest sent past its vsock credit; resetting the connection"
            );
            return self.reset();
        }
        self.to_host.extend(rest);
        self.after_forward();
    }

    fn guest_shutdown(&mut self, flags: u32) {
        self.peer_shut_rcv |= flags & op::SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & op::SHUTDOWN_SEND != 0;
        match self.state {
            State::LocalClosed => self.reset(),
            State::Established | State::Draining => self.after_forward(),
            _ => self.reset(),
        }
    }

    /// Writes buffered guest bytes to the host stream.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(_) => return self.host_gone(),
            }
        }
        self.after_forward();
    }

    /// Bookkeeping after guest bytes moved on: credit updates, deferred
    /// shutdowns.
    fn after_forward(&mut self) {
        let unacked = (self.recv_cnt - self.last_fwd_cnt_to_peer).0;
        if self.fwd_cnt != self.last_fwd_cnt_to_peer && unacked >= CONN_BUF_SIZE / 2 {
            // The guest thinks our buffer is half full or worse: tell it
            // what we consumed before it stalls.
            self.pending.credit_update = true;
        }
        let both_shut = self.peer_shut_rcv && self.peer_shut_send;
        if !self.to_host.is_empty() {
            if both_shut {
                self.state = State::Draining;
            }
            return;
        }
        if self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if both_shut {
            self.reset();
        }
    }

    /// The host stream failed while we wrote to it.
    fn host_gone(&mut self) {
        tracing::debug!(
            local_port = self.local_port,
            "vsock host stream closed while writing"
        );
        self.reset();
    }

    /// Blocked by the guest's credit with bytes waiting: ask for an update
    /// once.
    fn maybe_request_credit(&mut self) {
        if self.can_send_data() && self.peer_avail() == 0 && !self.credit_requested {
            self.credit_requested = true;
            self.pending.credit_request = true;
        }
    }
}

/// One non-blocking write: bytes written, 0 when the socket is full.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}
