//! Routes vsock packets between the guest and host Unix streams.
//!
//! The muxer owns every host socket of one vsock device: the hybrid
//! listener, handshakes in progress, and one stream per connection, all in
//! its own epoll set. Its owner (a device thread, a vhost-user backend)
//! polls [`Muxer::as_raw_fd`] and calls [`Muxer::process`] when it is
//! readable; nothing here ever blocks.
//!
//! Towards the guest, the muxer keeps a queue of connections that have a
//! packet to send and hands them out one at a time in [`Muxer::recv_pkt`],
//! so a busy stream cannot starve the others.
//!
//! Anyone who can open the hybrid socket can try to use up its connection
//! slots, so host connections are held to account before they get one: a
//! connection that has not sent its `CONNECT` line within
//! [`MuxerConfig::handshake_timeout`] is closed, and at most
//! [`MuxerConfig::max_handshakes`] (well below the connection limit) may be
//! in their handshake at once; past that the oldest is closed to make room,
//! so a runtime that sends its line at once always gets through, however
//! many idle connections are open. What is turned away is counted
//! ([`Refusals`]) and summarised in the log once per [`REPORT_INTERVAL`],
//! never logged one line per connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::Connection;
use super::unix::{self, Handshake, HandshakeStep, SocketFile};
use super::{
    op, Error, Header, CONN_BUF_SIZE, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES,
    HANDSHAKE_TIMEOUT, HOST_CID,
};

/// Host ports we give host-initiated connections start here, out of the
/// way of well-known ports a guest might connect to.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How often deadlines are checked while any is pending.
const TIMER_PERIOD: Duration = Duration::from_millis(500);
/// At most one log line about refused connections per this long.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct MuxerConfig {
    pub guest_cid: u64,
    /// The hybrid socket; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    pub max_connections: usize,
    /// Host connections in their `CONNECT` handshake at once; never more
    /// than `max_connections - 1`, whatever is asked.
    pub max_handshakes: usize,
    /// How long a host connection may take to send its `CONNECT` line.
    pub handshake_timeout: Duration,
}

impl MuxerConfig {
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> MuxerConfig {
        MuxerConfig {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    /// The handshake bound in force: below the connection limit, so
    /// handshakes alone never fill it.
    fn handshake_limit(&self) -> usize {
        self.max_handshakes
            .min(self.max_connections.saturating_sub(1))
            .max(1)
    }
}

/// Connections the muxer turned away since it started, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refusals {
    /// Host or guest connections refused at the connection limit.
    pub at_limit: u64,
    /// Host connections closed for not sending `CONNECT` in time.
    pub handshake_timeouts: u64,
    /// Host connections closed in their handshake to make room for a newer
    /// one.
    pub handshakes_evicted: u64,
    /// Host connections the listener could not accept (out of file
    /// descriptors, say); accepting resumes on the next timer tick.
    pub accept_failures: u64,
}

/// A host connection waiting for its `CONNECT` line.
#[derive(Debug)]
struct PendingHandshake {
    handshake: Handshake,
    deadline: Instant,
    /// Arrival order: one accept batch shares its deadline.
    arrival: u64,
}

/// A connection's identity: (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug)]
pub struct Muxer {
    config: MuxerConfig,
    /// Until the owner takes it (see [`Muxer::take_socket_file`]).
    socket_file: Option<SocketFile>,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is out of the event set after an accept failure that
    /// would otherwise wake us without end; the next tick puts it back.
    listener_paused: bool,
    handshakes: HashMap<RawFd, PendingHandshake>,
    handshakes_accepted: u64,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Each connection stream's current epoll interest; absent = not in
    /// the set (a hung-up socket with no interest would wake us forever).
    registered: HashMap<RawFd, EventSet>,
    rx_queue: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    /// Replies (RSTs) to packets that match no connection.
    stray_replies: VecDeque<Header>,
    next_local_port: u32,
    /// `process`'s event buffer, kept between wakeups.
    events: Vec<EpollEvent>,
    refusals: Refusals,
    /// What the last log line covered, and when it went out.
    reported: Refusals,
    last_report: Option<Instant>,
}

impl Muxer {
    /// Binds the hybrid socket and sets up the event set.
    pub fn new(config: MuxerConfig) -> Result<Muxer, Error> {
        let listener = unix::bind(&config.uds_path)?;
        // From here on, an error removes the socket as it returns.
        let socket_file = SocketFile::new(&config.uds_path);
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let timer = TimerFd::new().map_err(|e| Error::Epoll(e.into()))?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(Error::Epoll)?;
        }
        Ok(Muxer {
            config,
            socket_file: Some(socket_file),
            epoll,
            listener,
            timer,
            timer_armed: false,
            listener_paused: false,
            handshakes: HashMap::new(),
            handshakes_accepted: 0,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            registered: HashMap::new(),
            rx_queue: VecDeque::new(),
            queued: HashSet::new(),
            stray_replies: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            events: vec![EpollEvent::default(); 64],
            refusals: Refusals::default(),
            reported: Refusals::default(),
            last_report: None,
        })
    }

    /// Hands the hybrid socket's file to the caller, who removes it by
    /// dropping it; until then the muxer removes it when dropped. An owner
    /// takes it so the file goes on the owner's thread: the thread that
    /// drops the muxer last may be a device thread whose seccomp filter
    /// does not allow removing files.
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    /// Readable when [`Muxer::process`] has host events to handle.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Established connections and connections still in a handshake.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Host connections still in their `CONNECT` handshake.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Connections turned away so far.
    pub fn refusals(&self) -> Refusals {
        self.refusals
    }

    /// Handles every host-side event that is ready, without blocking.
    pub fn process(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waiting on vsock host sockets");
                    break;
                }
            };
            for event in &events[..n] {
                self.dispatch(event.fd(), event.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.events = events;
    }

    fn dispatch(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_host_connections(Instant::now());
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.on_tick(Instant::now());
        } else if self.handshakes.contains_key(&fd) {
            self.advance_handshake(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                let readable = set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
                conn.on_host_event(readable, set.contains(EventSet::OUT));
            }
            self.refresh(key);
        }
    }

    /// What the deadline timer does: expires connections waiting on the
    /// guest and handshakes past their deadline, resumes a paused
    /// listener, reports refusals. `now` comes from the caller so tests
    /// can move the clock.
    pub(super) fn on_tick(&mut self, now: Instant) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_timeout(now);
            }
            self.refresh(key);
        }
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            self.drop_handshake(fd);
            self.refusals.handshake_timeouts += 1;
        }
        if self.listener_paused {
            let fd = self.listener.as_raw_fd();
            match self.epoll_set(fd, EventSet::IN, None) {
                Ok(()) => self.listener_paused = false,
                Err(e) => tracing::warn!(error = %e, "watching the vsock listener again"),
            }
        }
        self.report_refusals(now);
        self.update_timer();
    }

    fn accept_host_connections(&mut self, now: Instant) {
        loop {
            let stream = match unix::accept(&self.listener) {
                Ok(Some(stream)) => stream,
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // The connection stays queued and the listener readable:
                    // stop watching it until the next tick rather than spin.
                    self.refusals.accept_failures += 1;
                    tracing::debug!(error = %e, "accepting a vsock host connection");
                    let fd = self.listener.as_raw_fd();
                    if self
                        .epoll_set(fd, EventSet::empty(), Some(EventSet::IN))
                        .is_ok()
                    {
                        self.listener_paused = true;
                    }
                    break;
                }
            };
            if self.handshakes.len() >= self.config.handshake_limit() {
                self.evict_oldest_handshake();
            }
            if self.connection_count() >= self.config.max_connections {
                self.refusals.at_limit += 1;
                continue;
            }
            let handshake = match Handshake::new(stream) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "setting up a vsock host connection");
                    continue;
                }
            };
            let fd = handshake.stream.as_raw_fd();
            if self.epoll_set(fd, EventSet::IN, None).is_ok() {
                let pending = PendingHandshake {
                    handshake,
                    deadline: now + self.config.handshake_timeout,
                    arrival: self.handshakes_accepted,
                };
                self.handshakes_accepted += 1;
                self.handshakes.insert(fd, pending);
            }
        }
        self.report_refusals(now);
        self.update_timer();
    }

    /// Closes the handshake that has waited longest: one that sends its
    /// line at once never is, however many newer connections stay silent.
    fn evict_oldest_handshake(&mut self) {
        let oldest = self
            .handshakes
            .iter()
            .min_by_key(|(_, p)| p.arrival)
            .map(|(&fd, _)| fd);
        if let Some(fd) = oldest {
            self.drop_handshake(fd);
            self.refusals.handshakes_evicted += 1;
        }
    }

    /// One summary line for what was turned away since the last one, at
    /// most once per [`REPORT_INTERVAL`]; the timer stays armed until it
    /// has gone out.
    fn report_refusals(&mut self, now: Instant) {
        if self.refusals == self.reported
            || self
                .last_report
                .is_some_and(|t| now.saturating_duration_since(t) < REPORT_INTERVAL)
        {
            return;
        }
        let (total, last) = (self.refusals, self.reported);
        tracing::warn!(
            at_limit = total.at_limit - last.at_limit,
            handshake_timeouts = total.handshake_timeouts - last.handshake_timeouts,
            handshakes_evicted = total.handshakes_evicted - last.handshakes_evicted,
            accept_failures = total.accept_failures - last.accept_failures,
            limit = self.config.max_connections,
            open = self.connection_count(),
            "vsock host connections turned away since the last report"
        );
        self.reported = total;
        self.last_report = Some(now);
    }

    /// Runs the timer while anything waits on a deadline or a report.
    fn update_timer(&mut self) {
        let wanted = !self.handshakes.is_empty()
            || self.listener_paused
            || self.refusals != self.reported
            || self.conns.values().any(|c| c.deadline().is_some());
        if wanted != self.timer_armed {
            self.set_timer(wanted);
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(pending) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match pending.handshake.advance() {
            HandshakeStep::Pending => return,
            HandshakeStep::Connect(port) => port,
            HandshakeStep::Failed(why) => {
                tracing::debug!(reason = %why, "vsock host handshake failed");
                self.drop_handshake(fd);
                return;
            }
        };
        let Some(pending) = self.drop_handshake(fd) else {
            return;
        };
        let local_port = self.allocate_local_port();
        let key = (local_port, port);
        let conn = Connection::host_initiated(pending.handshake.stream, local_port, port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn drop_handshake(&mut self, fd: RawFd) -> Option<PendingHandshake> {
        let handshake = self.handshakes.remove(&fd)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::empty(), 0),
        );
        Some(handshake)
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(local, _)| local == port) {
                return port;
            }
        }
    }

    /// A packet the guest sent (TX queue).
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.config.guest_cid {
            tracing::debug!(
                src_cid = hdr.src_cid,
                "dropping a vsock packet with a foreign source"
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != op::TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.send_pkt(hdr, data);
                self.refresh(key);
            }
            None if hdr.op == op::REQUEST => self.guest_connect(hdr),
            None if hdr.op == op::RST => {}
            None => self.reply_rst(hdr),
        }
    }

    /// Resets the connection a malformed packet belonged to (its header
    /// could be read, the rest could not).
    pub fn reset_connection(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        match self.conns.get_mut(&key) {
            Some(conn) if hdr.src_cid == self.config.guest_cid => {
                conn.reset();
                self.refresh(key);
            }
            _ if hdr.src_cid == self.config.guest_cid && hdr.op != op::RST => self.reply_rst(hdr),
            _ => {}
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.connection_count() >= self.config.max_connections {
            self.refusals.at_limit += 1;
            self.report_refusals(Instant::now());
            self.update_timer();
            return self.reply_rst(hdr);
        }
        let target = unix::guest_target(&self.config.uds_path, hdr.dst_port);
        match unix::connect_nonblocking(&target) {
            Ok(stream) => {
                let key = (hdr.dst_port, hdr.src_port);
                self.by_fd.insert(stream.as_raw_fd(), key);
                self.conns
                    .insert(key, Connection::guest_initiated(stream, hdr));
                self.refresh(key);
            }
            Err(e) => {
                tracing::debug!(target = %target.display(), error = %e, "guest vsock connection refused");
                self.reply_rst(hdr);
            }
        }
    }

    fn reply_rst(&mut self, to: &Header) {
        self.stray_replies.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: op::TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Whether [`Muxer::recv_pkt`] may have a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.stray_replies.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest (RX queue). An RW payload is written to
    /// `buf[..header.len]`; `buf`'s length bounds it.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some(reply) = self.stray_replies.pop_front() {
            return Some(reply);
        }
        while let Some(key) = self.rx_queue.pop_front() {
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let out = conn.recv_pkt(buf);
            let fwd_cnt = conn.fwd_cnt();
            self.refresh(key);
            if let Some(out) = out {
                return Some(Header {
                    src_cid: HOST_CID,
                    dst_cid: self.config.guest_cid,
                    src_port: key.0,
                    dst_port: key.1,
                    len: out.len,
                    type_: op::TYPE_STREAM,
                    op: out.op,
                    flags: out.flags,
                    buf_alloc: CONN_BUF_SIZE,
                    fwd_cnt,
                });
            }
        }
        None
    }

    /// After anything happened to a connection: queue it for RX if it has
    /// something to send, match its epoll interest to its state, drop it
    /// once finished.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_finished() {
            if self.registered.remove(&fd).is_some() {
                let _ = self.epoll_set(fd, EventSet::empty(), Some(EventSet::empty()));
            }
            self.by_fd.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        if conn.deadline().is_some() && !self.timer_armed {
            self.set_timer(true);
        }
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.has_pending_rx() && self.queued.insert(key) {
            self.rx_queue.push_back(key);
        }
        let (read, write) = conn.interest();
        let mut want = EventSet::empty();
        if read {
            want |= EventSet::IN;
        }
        if write {
            want |= EventSet::OUT;
        }
        let current = self.registered.get(&fd).copied();
        if current == Some(want) || (current.is_none() && want.is_empty()) {
            return;
        }
        match self.epoll_set(fd, want, current) {
            Ok(()) if want.is_empty() => {
                self.registered.remove(&fd);
            }
            Ok(()) => {
                self.registered.insert(fd, want);
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching a vsock host stream; resetting it");
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.reset();
                }
                if self.queued.insert(key) {
                    self.rx_queue.push_back(key);
                }
            }
        }
    }

    /// Adds, changes or (for an empty `want`) removes `fd`'s interest.
    fn epoll_set(
        &self,
        fd: RawFd,
        want: EventSet,
        current: Option<EventSet>,
    ) -> std::io::Result<()> {
        let operation = match (current, want.is_empty()) {
            (None, _) => ControlOperation::Add,
            (Some(_), true) => ControlOperation::Delete,
            (Some(_), false) => ControlOperation::Modify,
        };
        self.epoll
            .ctl(operation, fd, EpollEvent::new(want, fd as u64))
    }

    /// Runs the deadline timer only while some connection waits on the
    /// guest.
    fn set_timer(&mut self, on: bool) {
        let result = if on {
            self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD))
        } else {
            self.timer.reset(Duration::ZERO, None)
        };
        match result {
            Ok(()) => self.timer_armed = on,
            Err(e) => tracing::warn!(error = %e, "arming the vsock deadline timer"),
        }
    }
}
