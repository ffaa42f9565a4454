//! The vsock muxer: maps guest vsock connections onto host Unix-socket
//! streams (the Firecracker "hybrid vsock" scheme).
//!
//! - Host-initiated: a host process connects to `uds_path` and sends
//!   `CONNECT <port>\n` ([`super::handshake`]); the muxer sends REQUEST to the guest port and,
//!   on the guest's RESPONSE, answers `OK <local_port>\n` on the stream.
//! - Guest-initiated: a REQUEST to (CID 2, port P) connects to `<uds_path>_P`;
//!   no listener there means RST.
//!
//! Owns every connection (each a [`Connection`] state machine over its
//! `UnixStream`), the listener and an epoll over their fds (exposed as one fd
//! to the device-event thread). A connection is only changed through
//! `Muxer::mutate`, which then re-derives its epoll interest, its place in the
//! RX queue, and its removal, so the rules live in one place (Firecracker's
//! `apply_conn_mutation`). It never touches guest memory: packets come in as
//! [`TxPacket`] and go out as (header, payload).
//!
//! Bad peers are expired (Firecracker's kill queue, [`KillQueue`]): a host stream that never
//! finishes its `CONNECT` line, a connection whose REQUEST (or RST) the guest never answers,
//! and a half-closed connection that moves no bytes, each bounded by time (the `*_TIMEOUT`
//! constants) and by count. A timerfd in the muxer's epoll wakes the device-event thread at
//! the earliest deadline; with nothing to expire it is not armed, so an idle VM stays idle.

use crate::config::MAX_UDS_PATH_BYTES;
use crate::devices::guest_log::GuestWarnLimiter;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::csm::{ConnState, Connection, Interest, RxPacket};
pub use super::csm::{CONN_TX_BUF_BYTES, CREDIT_UPDATE_THRESHOLD_BYTES};
pub use super::handshake::{parse_connect_line, MAX_CONNECT_LINE_BYTES};
use super::kill_queue::{Expiry, KillQueue};
pub use super::kill_queue::{CONNECT_LINE_TIMEOUT, GUEST_RESPONSE_TIMEOUT, HALF_CLOSED_IDLE_TIMEOUT};
use super::packet::{Header, Op, TxPacket, HOST_CID, TYPE_STREAM};

/// Most live connections per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host streams that have not yet sent their CONNECT line; more are closed at once.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Most host-initiated connections waiting for the guest's RESPONSE (or for their REQUEST to
/// go out); a `CONNECT` beyond them is refused.
pub const MAX_CONNECTIONS_AWAITING_GUEST: usize = 64;
/// Most half-closed connections; past it the one idle longest is reset.
pub const MAX_HALF_CLOSED_CONNECTIONS: usize = 64;
/// Most control packets (RSTs for unknown connections) queued for the guest.
pub const MAX_QUEUED_CONTROL_PACKETS: usize = 256;
/// First local port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll token of the listener.
const LISTENER_TOKEN: u64 = u64::MAX;
/// Epoll token of the expiry timer.
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// Shortest timer wait (a zero wait would disarm the timerfd).
const MIN_TIMER_WAIT: Duration = Duration::from_millis(1);
/// Events taken from epoll per wait.
const MAX_EVENTS_PER_WAIT: usize = 64;

/// Why the muxer could not start.
#[derive(Debug, Error)]
pub enum MuxerError {
    /// Binding the host listener failed.
    #[error("binding vsock Unix listener {path} failed")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// Setting up epoll failed.
    #[error("setting up the vsock muxer epoll failed")]
    Epoll(#[source] std::io::Error),
    /// Creating the expiry timer failed.
    #[error("creating the vsock muxer's expiry timer failed")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// A connection and the muxer's bookkeeping about it.
struct MuxConn {
    conn: Connection<UnixStream>,
    /// Queued in `rx_ready`.
    in_rx_queue: bool,
    /// Current epoll interest (None: not registered).
    registered: Option<EventSet>,
    /// What its kill-queue deadline guards, and its byte count when the deadline was set.
    watched: Option<(Expiry, u64)>,
}

impl MuxConn {
    fn new(conn: Connection<UnixStream>) -> Self {
        Self { conn, in_rx_queue: false, registered: None, watched: None }
    }
}

/// What a kill-queue deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target {
    /// A host stream still sending its `CONNECT` line.
    Pending(RawFd),
    Conn(ConnKey),
}

fn event_set(interest: Interest) -> EventSet {
    let mut ev = EventSet::empty();
    if interest.readable {
        ev |= EventSet::IN;
    }
    if interest.writable {
        ev |= EventSet::OUT;
    }
    ev
}

/// A host stream that has not finished its `CONNECT <port>\n` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

enum FdOwner {
    Pending,
    Conn(ConnKey),
}

/// All vsock connections of one device and their host sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, MuxConn>,
    pending_hosts: HashMap<RawFd, PendingHost>,
    fd_owner: HashMap<RawFd, FdOwner>,
    control_queue: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
    /// Budget of warnings the guest's packets can trigger.
    warnings: GuestWarnLimiter,
    /// Deadlines of the streams and connections that wait on a peer.
    kill_queue: KillQueue<Target>,
    /// Fires at the earliest deadline (a stale, earlier one fires once for nothing).
    timer: TimerFd,
    /// When the timer is armed to fire.
    armed: Option<Instant>,
    /// The time of the call being handled (`Instant::now()`, or the one `expire` is given).
    now: Instant,
}

impl Muxer {
    /// Binds `uds_path` (replacing a stale socket file) and sets up epoll.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(uds_path);
            }
        }
        let bind_err = |source| MuxerError::Bind { path: uds_path.to_path_buf(), source };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))
            .map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new().map_err(MuxerError::Timer)?;
        epoll
            .ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TIMER_TOKEN))
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            pending_hosts: HashMap::new(),
            fd_owner: HashMap::new(),
            control_queue: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            warnings: GuestWarnLimiter::new(),
            kill_queue: KillQueue::default(),
            timer,
            armed: None,
            now: Instant::now(),
        })
    }

    /// The fd the device-event thread watches (readable when any host socket is).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether something may be waiting to go to the guest.
    pub fn has_rx(&self) -> bool {
        !self.control_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// Drops every connection (device reset, transport reset). The listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        for (fd, _) in self.pending_hosts.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fd_owner.remove(&fd);
        }
        self.control_queue.clear();
        self.rx_ready.clear();
        self.kill_queue.clear_all();
        self.disarm();
    }

    /// Handles host-side readiness: new host connections, CONNECT lines,
    /// readable and writable streams.
    pub fn process_events(&mut self) {
        self.now = Instant::now();
        self.process_ready();
        self.rearm();
    }

    fn process_ready(&mut self) {
        let mut events = vec![EpollEvent::default(); MAX_EVENTS_PER_WAIT];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: muxer epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == LISTENER_TOKEN {
                    self.accept_host_streams();
                    continue;
                }
                if token == TIMER_TOKEN {
                    // Disarming also clears the timer's readiness.
                    self.disarm();
                    self.expire(self.now);
                    continue;
                }
                let fd = token as RawFd;
                match self.fd_owner.get(&fd) {
                    Some(FdOwner::Pending) => self.read_connect_line(fd),
                    Some(FdOwner::Conn(key)) => {
                        let key = *key;
                        let set = ev.event_set();
                        self.mutate(key, |conn, _| {
                            if set
                                .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
                            {
                                conn.notify_readable();
                            }
                            if set.contains(EventSet::OUT) {
                                conn.notify_writable();
                            }
                        });
                    }
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_host_streams(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept on host listener failed");
                    return;
                }
            };
            if self.pending_hosts.len() >= MAX_PENDING_HOST_STREAMS {
                tracing::warn!(
                    limit = MAX_PENDING_HOST_STREAMS,
                    "vsock: too many host streams waiting for CONNECT, dropping one"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64)) {
                tracing::warn!(error = %e, "vsock: watching host stream failed");
                continue;
            }
            self.fd_owner.insert(fd, FdOwner::Pending);
            self.pending_hosts.insert(fd, PendingHost { stream, line: Vec::new() });
            self.kill_queue.set(Target::Pending(fd), Expiry::ConnectLine, self.now);
        }
    }

    fn drop_pending(&mut self, fd: RawFd) -> Option<PendingHost> {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fd_owner.remove(&fd);
        self.kill_queue.clear(Target::Pending(fd));
        self.pending_hosts.remove(&fd)
    }

    /// Reads the CONNECT line one byte at a time, so no data after it is consumed.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(pending) = self.pending_hosts.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => {
                    self.drop_pending(fd);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&pending.line),
                Ok(_) => {
                    pending.line.push(byte[0]);
                    if pending.line.len() > MAX_CONNECT_LINE_BYTES {
                        tracing::warn!(
                            limit = MAX_CONNECT_LINE_BYTES,
                            "vsock: CONNECT line too long, dropping host stream"
                        );
                        self.drop_pending(fd);
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_pending(fd);
                    return;
                }
            }
        };
        let Some(pending) = self.drop_pending(fd) else {
            return;
        };
        let Some(peer_port) = port else {
            tracing::warn!("vsock: malformed CONNECT line from host, dropping stream");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(limit = MAX_CONNECTIONS, "vsock: connection limit reached, refusing host CONNECT");
            return;
        }
        let awaiting = self.conns.values().filter(|e| e.conn.state() == ConnState::LocalInit).count();
        if awaiting >= MAX_CONNECTIONS_AWAITING_GUEST {
            tracing::warn!(
                limit = MAX_CONNECTIONS_AWAITING_GUEST,
                "vsock: too many connections wait for the guest to answer, refusing host CONNECT"
            );
            return;
        }
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            tracing::warn!("vsock: no free local port, refusing host CONNECT");
            return;
        };
        let key = ConnKey { local_port, peer_port };
        self.add(key, Connection::new_local_init(pending.stream, local_port));
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            let key = ConnKey { local_port: port, peer_port };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// Handles one validated packet from the guest's TX queue.
    pub fn handle_guest_packet(&mut self, pkt: TxPacket) {
        self.now = Instant::now();
        self.handle_packet(pkt);
        self.rearm();
    }

    fn handle_packet(&mut self, pkt: TxPacket) {
        let h = pkt.header;
        if h.dst_cid != HOST_CID {
            crate::guest_warn!(
                self.warnings,
                dst_cid = h.dst_cid,
                "vsock: guest packet not addressed to the host, dropped"
            );
            return;
        }
        let key = ConnKey { local_port: h.dst_port, peer_port: h.src_port };
        if !self.conns.contains_key(&key) {
            match pkt.op {
                Op::Request => self.guest_connect(key, &h),
                Op::Rst => {}
                _ => self.queue_rst(key),
            }
            return;
        }
        self.mutate(key, |conn, warnings| conn.recv_pkt(&pkt, warnings));
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!(
                self.warnings,
                limit = MAX_CONNECTIONS,
                "vsock: connection limit reached, refusing guest connect"
            );
            self.queue_rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, path = ?path, "vsock: no host listener for guest connect, RST");
                self.queue_rst(key);
                return;
            }
        };
        self.add(key, Connection::new_peer_init(stream, h));
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.control_queue.len() >= MAX_QUEUED_CONTROL_PACKETS {
            crate::guest_warn!(
                self.warnings,
                limit = MAX_QUEUED_CONTROL_PACKETS,
                "vsock: control queue full, RST dropped"
            );
            return;
        }
        let h = make_header(self.guest_cid, key, Op::Rst, 0, 0, 0);
        self.control_queue.push_back(h);
    }

    /// The next packet for the guest, with at most `max_payload` data bytes.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        self.now = Instant::now();
        let packet = self.next_packet(max_payload);
        self.rearm();
        packet
    }

    fn next_packet(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control_queue.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.in_rx_queue = false;
            let guest_cid = self.guest_cid;
            let packet = self.mutate(key, |conn, _| conn.next_packet(max_payload)).flatten();
            if let Some(RxPacket { op, flags, fwd_cnt, payload }) = packet {
                return Some((make_header(guest_cid, key, op, payload.len() as u32, flags, fwd_cnt), payload));
            }
        }
        None
    }

    /// Adds a new connection under `key` and brings its bookkeeping in step.
    fn add(&mut self, key: ConnKey, conn: Connection<UnixStream>) {
        self.fd_owner.insert(conn.stream().as_raw_fd(), FdOwner::Conn(key));
        self.conns.insert(key, MuxConn::new(conn));
        self.sync(key);
    }

    /// Changes connection `key` (if it exists) with `change`, then re-derives its RX-queue
    /// membership, epoll interest and removal: the one way a connection changes.
    fn mutate<T>(
        &mut self,
        key: ConnKey,
        change: impl FnOnce(&mut Connection<UnixStream>, &mut GuestWarnLimiter) -> T,
    ) -> Option<T> {
        let entry = self.conns.get_mut(&key)?;
        let result = change(&mut entry.conn, &mut self.warnings);
        self.sync(key);
        Some(result)
    }

    /// Re-derives a connection's RX-queue membership, epoll interest and removal.
    fn sync(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.is_closed() {
            // RST delivered (or never owed): the connection is gone.
            self.remove(key);
            return;
        }
        if entry.conn.wants_rx() && !entry.in_rx_queue {
            entry.in_rx_queue = true;
            self.rx_ready.push_back(key);
        }
        let newly_half_closed = Self::watch(&mut self.kill_queue, key, entry, self.now);
        let desired = event_set(entry.conn.interest());
        let fd = entry.conn.stream().as_raw_fd();
        let result = match (entry.registered, desired.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(desired, fd as u64)),
            (Some(_), true) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (Some(cur), false) if cur == desired => Ok(()),
            (Some(_), false) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(desired, fd as u64)),
        };
        match result {
            Ok(()) => entry.registered = (!desired.is_empty()).then_some(desired),
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll update failed, resetting connection");
                entry.conn.kill();
                if !entry.in_rx_queue {
                    entry.in_rx_queue = true;
                    self.rx_ready.push_back(key);
                }
            }
        }
        if newly_half_closed && self.kill_queue.count(Expiry::HalfClosed) > MAX_HALF_CLOSED_CONNECTIONS {
            if let Some(Target::Conn(oldest)) = self.kill_queue.oldest(Expiry::HalfClosed) {
                crate::guest_warn!(
                    self.warnings,
                    limit = MAX_HALF_CLOSED_CONNECTIONS,
                    "vsock: too many half-closed connections, resetting the one idle longest"
                );
                self.expel(oldest);
            }
        }
    }

    /// Brings `entry`'s kill-queue deadline in step with what it waits for: set when it starts
    /// waiting, refreshed when a half-closed connection moved bytes, dropped when it no longer
    /// waits. Returns whether it just became half-closed.
    fn watch(kill_queue: &mut KillQueue<Target>, key: ConnKey, entry: &mut MuxConn, now: Instant) -> bool {
        let wanted = entry.conn.expiry();
        let moved = entry.conn.bytes_moved();
        let unchanged = match (wanted, entry.watched) {
            (None, None) => true,
            (Some(Expiry::HalfClosed), Some((Expiry::HalfClosed, at))) => at == moved,
            (Some(kind), Some((was, _))) => kind == was,
            _ => false,
        };
        if unchanged {
            return false;
        }
        let newly_half_closed =
            wanted == Some(Expiry::HalfClosed) && entry.watched.map(|(kind, _)| kind) != Some(Expiry::HalfClosed);
        match wanted {
            Some(kind) => kill_queue.set(Target::Conn(key), kind, now),
            None => kill_queue.clear(Target::Conn(key)),
        }
        entry.watched = wanted.map(|kind| (kind, moved));
        newly_half_closed
    }

    /// Drops connection `key` at once (its host stream closes) and queues an RST for the guest.
    fn expel(&mut self, key: ConnKey) {
        self.remove(key);
        self.queue_rst(key);
    }

    /// Expires every stream and connection whose deadline is at or before `now`: a host
    /// stream without its `CONNECT` line is closed; a connection is dropped (its host stream
    /// closes) and the guest gets an RST.
    pub fn expire(&mut self, now: Instant) {
        self.now = now;
        while let Some((target, kind)) = self.kill_queue.pop_expired(now) {
            match target {
                Target::Pending(fd) => {
                    tracing::warn!(
                        timeout = ?CONNECT_LINE_TIMEOUT,
                        "vsock: host stream sent no CONNECT line in time, closing it"
                    );
                    self.drop_pending(fd);
                }
                Target::Conn(key) => {
                    crate::guest_warn!(
                        self.warnings,
                        ?kind,
                        timeout = ?kind.timeout(),
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        "vsock: connection made no progress in time, resetting it"
                    );
                    self.expel(key);
                }
            }
        }
    }

    /// Arms the timer for the earliest deadline, unless it is armed to fire earlier already.
    fn rearm(&mut self) {
        let Some(next) = self.kill_queue.next_deadline() else {
            return;
        };
        if self.armed.is_some_and(|at| at <= next) {
            return;
        }
        let wait = next.saturating_duration_since(Instant::now()).max(MIN_TIMER_WAIT);
        match self.timer.reset(wait, None) {
            Ok(()) => self.armed = Some(next),
            Err(e) => tracing::error!(error = %e, "vsock: arming the expiry timer failed"),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
        if let Err(e) = self.timer.clear() {
            tracing::error!(error = %e, "vsock: disarming the expiry timer failed");
        }
    }

    /// When the expiry timer is armed to fire (for tests: an idle muxer arms none).
    pub fn armed_deadline(&self) -> Option<Instant> {
        self.armed
    }

    fn remove(&mut self, key: ConnKey) {
        self.kill_queue.clear(Target::Conn(key));
        if let Some(entry) = self.conns.remove(&key) {
            let fd = entry.conn.stream().as_raw_fd();
            if entry.registered.is_some() {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_owner.remove(&fd);
        }
    }
}

impl Drop for Muxer {
    /// Removes the listener's socket file, so a finished VM leaves no stale path.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(error = %e, path = ?self.uds_path, "vsock: removing listener socket failed");
            }
        }
    }
}

/// A packet header from the host side of `key` to the guest.
fn make_header(guest_cid: u64, key: ConnKey, op: Op, len: u32, flags: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags,
        buf_alloc: CONN_TX_BUF_BYTES,
        fwd_cnt,
    }
}

/// Connects to a Unix stream listener without blocking: a listener whose
/// backlog is full answers EAGAIN instead of stalling the vCPU thread that
/// handles the guest's REQUEST.
fn connect_nonblocking(path: &OsStr) -> std::io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() > MAX_UDS_PATH_BYTES || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("socket path must be at most {MAX_UDS_PATH_BYTES} bytes without NUL"),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the
    // call, and `len` does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(socket.as_raw_fd(), std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len as libc::socklen_t)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
