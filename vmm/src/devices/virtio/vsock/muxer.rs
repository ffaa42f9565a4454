//! The vsock muxer: maps guest vsock connections onto host Unix-socket
//! streams (the Firecracker "hybrid vsock" scheme).
//!
//! - Host-initiated: a host process connects to `uds_path` and sends
//!   `CONNECT <port>\n`; the muxer sends REQUEST to the guest port and, on the
//!   guest's RESPONSE, answers `OK <local_port>\n` on the stream.
//! - Guest-initiated: a REQUEST to (CID 2, port P) connects to `<uds_path>_P`;
//!   no listener there means RST.
//!
//! Owns every connection, the listener and an epoll over their fds (exposed
//! as one fd to the device-event thread). A connection is only changed
//! through `Muxer::sync`, which then re-derives its epoll interest, its
//! place in the RX queue, and its removal, so the rules live in one place.
//! It never touches guest memory: packets come in as [`TxPacket`] and go out
//! as (header, payload).

use crate::config::MAX_UDS_PATH_BYTES;
use crate::devices::guest_log::GuestWarnLimiter;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{Header, Op, TxPacket, HOST_CID, MAX_PAYLOAD_BYTES, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer we advertise per connection (guest → host bytes we hold).
pub const CONN_TX_BUF_BYTES: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once this many forwarded bytes are unannounced.
pub const CREDIT_UPDATE_THRESHOLD_BYTES: u32 = CONN_TX_BUF_BYTES / 2;
/// Most live connections per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host streams that have not yet sent their CONNECT line.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Longest accepted `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE_BYTES: usize = 32;
/// Most control packets (RSTs for unknown connections) queued for the guest.
pub const MAX_QUEUED_CONTROL_PACKETS: usize = 256;
/// First local port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll token of the listener.
const LISTENER_TOKEN: u64 = u64::MAX;
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
}

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST sent or queued, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
}

/// Control packets a connection still owes the guest.
#[derive(Clone, Copy, Debug, Default)]
struct PendingControl {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    shutdown: bool,
    rst: bool,
}

struct Connection {
    stream: UnixStream,
    state: ConnState,
    pending: PendingControl,
    /// Guest's receive buffer size and consumed count (its credit to us).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we have sent the guest.
    rx_cnt: u32,
    /// Bytes from the guest we have written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    last_fwd_cnt_sent: u32,
    /// `OK <port>\n` not yet written to the host.
    ack_line: Vec<u8>,
    /// Guest bytes not yet written to the host stream.
    tx_buf: VecDeque<u8>,
    /// The host stream has data we have not read (epoll said so).
    host_readable: bool,
    /// The host closed its write side.
    host_eof: bool,
    /// The guest will send no more (SHUTDOWN SEND).
    guest_shut_send: bool,
    /// The guest will receive no more (SHUTDOWN RCV).
    guest_shut_rcv: bool,
    /// We already shut the host stream's write side.
    host_write_shut: bool,
    /// Queued in `rx_ready`.
    in_rx_queue: bool,
    /// Current epoll interest (None: not registered).
    registered: Option<EventSet>,
    /// Remove once the pending RST has been delivered.
    closing: bool,
    /// A CREDIT_REQUEST went out and the guest has not answered yet.
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, peer: &Header) -> Self {
        Self {
            stream,
            state,
            pending: PendingControl::default(),
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            ack_line: Vec::new(),
            tx_buf: VecDeque::new(),
            host_readable: false,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            in_rx_queue: false,
            registered: None,
            closing: false,
            credit_requested: false,
        }
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && !self.guest_shut_rcv && !self.closing
    }

    fn wants_rx(&self) -> bool {
        let p = self.pending;
        p.request
            || p.response
            || p.rst
            || p.credit_update
            || p.credit_request
            || p.shutdown
            || (self.host_readable && self.can_send_data() && self.peer_credit() > 0)
    }

    fn desired_interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.can_send_data() && !self.host_readable && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.closing && (!self.ack_line.is_empty() || !self.tx_buf.is_empty()) {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn update_peer_credit(&mut self, h: &Header) {
        if (h.buf_alloc, h.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Queues an RST and marks the connection for removal.
    fn reset(&mut self) {
        self.pending = PendingControl { rst: true, ..PendingControl::default() };
        self.closing = true;
    }

    /// Writes the ack line and buffered guest bytes to the host stream.
    fn flush_to_host(&mut self) {
        while !self.ack_line.is_empty() {
            match self.stream.write(&self.ack_line) {
                Ok(n) => {
                    self.ack_line.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream write failed, resetting");
                    self.reset();
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.reset();
                    return;
                }
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream write failed, resetting");
                    self.reset();
                    return;
                }
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD_BYTES {
            self.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() && self.guest_shut_send && !self.host_write_shut {
            // Best effort: the host may already have closed its side.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.tx_buf.is_empty() && self.guest_shut_send && self.guest_shut_rcv {
            // The guest closed both directions and everything is delivered.
            self.reset();
        }
    }
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
    conns: HashMap<ConnKey, Connection>,
    pending_hosts: HashMap<RawFd, PendingHost>,
    fd_owner: HashMap<RawFd, FdOwner>,
    control_queue: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
    /// Budget of warnings the guest's packets can trigger.
    warnings: GuestWarnLimiter,
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
    }

    /// Handles host-side readiness: new host connections, CONNECT lines,
    /// readable and writable streams.
    pub fn process_events(&mut self) {
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
                let fd = token as RawFd;
                match self.fd_owner.get(&fd) {
                    Some(FdOwner::Pending) => self.read_connect_line(fd),
                    Some(FdOwner::Conn(key)) => {
                        let key = *key;
                        let set = ev.event_set();
                        if let Some(conn) = self.conns.get_mut(&key) {
                            if set
                                .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
                            {
                                conn.host_readable = true;
                            }
                            if set.contains(EventSet::OUT) {
                                conn.flush_to_host();
                            }
                        }
                        self.sync(key);
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
        }
    }

    fn drop_pending(&mut self, fd: RawFd) -> Option<PendingHost> {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fd_owner.remove(&fd);
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
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            tracing::warn!("vsock: no free local port, refusing host CONNECT");
            return;
        };
        let key = ConnKey { local_port, peer_port };
        let mut conn = Connection::new(pending.stream, ConnState::LocalInit, &Header::default());
        conn.pending.request = true;
        self.fd_owner.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.sync(key);
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
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.update_peer_credit(&h);
        match (pkt.op, conn.state) {
            (Op::Rst, _) => {
                self.remove(key);
                return;
            }
            (Op::Response, ConnState::LocalInit) => {
                conn.state = ConnState::Established;
                conn.pending.request = false;
                conn.ack_line = format!("OK {}\n", key.local_port).into_bytes();
                conn.flush_to_host();
            }
            (Op::Rw, ConnState::Established) => {
                if conn.guest_shut_send {
                    crate::guest_warn!(self.warnings, "vsock: guest sent data after SHUTDOWN SEND, resetting");
                    conn.reset();
                } else if conn.tx_buf.len() + pkt.payload.len() > CONN_TX_BUF_BYTES as usize {
                    crate::guest_warn!(
                        self.warnings,
                        limit = CONN_TX_BUF_BYTES,
                        "vsock: guest overran the advertised credit, resetting connection"
                    );
                    conn.reset();
                } else {
                    conn.tx_buf.extend(pkt.payload.iter());
                    conn.flush_to_host();
                }
            }
            (Op::CreditUpdate, ConnState::Established) => {}
            (Op::CreditRequest, ConnState::Established) => conn.pending.credit_update = true,
            (Op::Shutdown, ConnState::Established) => {
                conn.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                conn.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                conn.flush_to_host();
            }
            (op, state) => {
                crate::guest_warn!(
                    self.warnings,
                    ?op,
                    ?state,
                    "vsock: guest op not valid in connection state, resetting"
                );
                conn.reset();
            }
        }
        self.sync(key);
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
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, ConnState::Established, h);
        conn.pending.response = true;
        self.fd_owner.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.sync(key);
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
        if let Some(h) = self.control_queue.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            let packet = self.next_conn_packet(key, max_payload);
            self.sync(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    fn next_conn_packet(&mut self, key: ConnKey, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        let guest_cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        let fwd_cnt = conn.fwd_cnt;
        let p = &mut conn.pending;
        let control = if std::mem::take(&mut p.rst) {
            Some((Op::Rst, 0))
        } else if std::mem::take(&mut p.request) {
            Some((Op::Request, 0))
        } else if std::mem::take(&mut p.response) {
            Some((Op::Response, 0))
        } else if std::mem::take(&mut p.shutdown) {
            // The host closed its write side; it may still read the guest's reply.
            Some((Op::Shutdown, SHUTDOWN_SEND))
        } else if std::mem::take(&mut p.credit_update) {
            Some((Op::CreditUpdate, 0))
        } else if std::mem::take(&mut p.credit_request) {
            Some((Op::CreditRequest, 0))
        } else {
            None
        };
        if let Some((op, flags)) = control {
            conn.last_fwd_cnt_sent = fwd_cnt;
            let h = make_header(guest_cid, key, op, 0, flags, fwd_cnt);
            return Some((h, Vec::new()));
        }
        if !(conn.host_readable && conn.can_send_data()) {
            return None;
        }
        let credit = conn.peer_credit() as usize;
        if credit == 0 {
            if !conn.credit_requested {
                conn.credit_requested = true;
                conn.pending.credit_request = true;
            }
            return None;
        }
        let want = credit.min(max_payload).min(MAX_PAYLOAD_BYTES);
        if want == 0 {
            return None;
        }
        let mut buf = vec![0u8; want];
        let read = loop {
            match conn.stream.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match read {
            Ok(0) => {
                conn.host_eof = true;
                conn.host_readable = false;
                if conn.guest_shut_send {
                    conn.reset();
                } else {
                    conn.pending.shutdown = true;
                }
                None
            }
            Ok(n) => {
                buf.truncate(n);
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                conn.last_fwd_cnt_sent = fwd_cnt;
                if conn.peer_credit() == 0 && !conn.credit_requested {
                    // Out of credit with data possibly waiting: ask the guest.
                    conn.credit_requested = true;
                    conn.pending.credit_request = true;
                }
                let h = make_header(guest_cid, key, Op::Rw, n as u32, 0, fwd_cnt);
                Some((h, buf))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                conn.host_readable = false;
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "vsock: host stream read failed, resetting");
                conn.reset();
                None
            }
        }
    }

    /// Re-derives a connection's RX-queue membership, epoll interest and removal.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.closing && !conn.pending.rst {
            // RST delivered (or never owed): the connection is gone.
            self.remove(key);
            return;
        }
        if conn.wants_rx() && !conn.in_rx_queue {
            conn.in_rx_queue = true;
            self.rx_ready.push_back(key);
        }
        let desired = conn.desired_interest();
        let fd = conn.stream.as_raw_fd();
        let result = match (conn.registered, desired.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(desired, fd as u64)),
            (Some(_), true) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (Some(cur), false) if cur == desired => Ok(()),
            (Some(_), false) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(desired, fd as u64)),
        };
        match result {
            Ok(()) => conn.registered = (!desired.is_empty()).then_some(desired),
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll update failed, resetting connection");
                conn.reset();
                if !conn.in_rx_queue {
                    conn.in_rx_queue = true;
                    self.rx_ready.push_back(key);
                }
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            if conn.registered.is_some() {
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

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
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
