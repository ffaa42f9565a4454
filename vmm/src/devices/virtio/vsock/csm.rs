//! The connection state machine of one vsock stream (Firecracker's `csm`): the states a
//! connection between a guest port and a host stream goes through, the control packets it owes
//! the guest, and its credit accounting. It is generic over the host stream, so tests drive it
//! against an in-memory one.
//!
//! It owns one connection: what the guest's packets do to it, what it sends the guest next,
//! and the bytes it moves to and from its stream. It never touches guest memory, epoll or other
//! connections, and knows no addresses: the muxer turns what it yields into packet headers and
//! keeps its epoll interest and RX-queue place in step with it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::handshake::ok_line;
use super::kill_queue::Expiry;
use super::packet::{Header, Op, TxPacket, MAX_PAYLOAD_BYTES, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::guest_log::GuestWarnLimiter;

/// Receive buffer we advertise per connection (guest → host bytes we hold).
pub const CONN_TX_BUF_BYTES: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once this many forwarded bytes are unannounced.
pub const CREDIT_UPDATE_THRESHOLD_BYTES: u32 = CONN_TX_BUF_BYTES / 2;

/// The host end of a connection: a byte stream whose write side can be shut on its own.
pub trait ConnStream: Read + Write {
    /// Shuts the write side (the guest sends no more); the read side stays open.
    fn shutdown_write(&mut self) -> std::io::Result<()>;
}

impl ConnStream for UnixStream {
    fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// The guest-to-host half of an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToHost {
    /// The guest may send.
    Open,
    /// The guest said it sends no more (SHUTDOWN SEND); what it sent before still drains.
    Draining,
    /// Everything is delivered and the host stream's write side is shut.
    Shut,
}

/// The host-to-guest half of an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToGuest {
    /// Host bytes flow to the guest.
    Open,
    /// The host closed its write side (EOF); the guest is told with SHUTDOWN SEND.
    HostEof,
    /// The guest said it receives no more (SHUTDOWN RCV).
    GuestRefuses,
    /// Both of the above.
    Closed,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: we owe or sent the guest a REQUEST and wait for its RESPONSE.
    LocalInit,
    /// Connected; each half closes on its own.
    Established { to_host: ToHost, to_guest: ToGuest },
    /// An RST is owed to the guest; once it is out the connection is [`ConnState::Closed`].
    Killing,
    /// Gone: nothing more is owed, the muxer drops it.
    Closed,
}

/// A control packet a connection owes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum PendingRx {
    Request = 1 << 0,
    Response = 1 << 1,
    /// SHUTDOWN SEND: the host closed its write side.
    Shutdown = 1 << 2,
    CreditUpdate = 1 << 3,
    CreditRequest = 1 << 4,
}

/// The control packets a connection owes, sent in this order (after an RST, which is a state).
const PENDING_ORDER: [PendingRx; 5] =
    [PendingRx::Request, PendingRx::Response, PendingRx::Shutdown, PendingRx::CreditUpdate, PendingRx::CreditRequest];

/// A set of [`PendingRx`] (Firecracker's `PendingRxSet`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PendingSet(u8);

impl PendingSet {
    fn insert(&mut self, p: PendingRx) {
        self.0 |= p as u8;
    }
    fn remove(&mut self, p: PendingRx) -> bool {
        let had = self.0 & p as u8 != 0;
        self.0 &= !(p as u8);
        had
    }
    fn is_empty(self) -> bool {
        self.0 == 0
    }
    fn contains(self, p: PendingRx) -> bool {
        self.0 & p as u8 != 0
    }
    /// Takes the first owed packet in [`PENDING_ORDER`].
    fn take_first(&mut self) -> Option<PendingRx> {
        PENDING_ORDER.into_iter().find(|&p| self.remove(p))
    }
}

/// Credit flow control (virtio 1.2 §5.10.6.3): how much the guest can take from us, and how
/// much of what it sent we have consumed and told it about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// The guest's receive buffer size and consumed count, as it last said.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we have sent the guest.
    pub rx_cnt: u32,
    /// Bytes from the guest we have written to the host stream.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: u32,
    /// A CREDIT_REQUEST is owed or out, and the guest's credit has not changed since.
    pub requested: bool,
}

impl Credit {
    fn from_peer(h: &Header) -> Self {
        Self { peer_buf_alloc: h.buf_alloc, peer_fwd_cnt: h.fwd_cnt, ..Self::default() }
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields of a guest packet; a change answers an outstanding request.
    fn update_from_peer(&mut self, h: &Header) {
        if (h.buf_alloc, h.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.requested = false;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Whether enough forwarded bytes went unannounced to owe the guest a CREDIT_UPDATE.
    fn update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD_BYTES
    }
}

/// What a connection sends the guest next: the muxer adds the addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    pub op: Op,
    pub flags: u32,
    /// Our forwarded count, announced with every packet.
    pub fwd_cnt: u32,
    pub payload: Vec<u8>,
}

/// Which readiness of its stream a connection waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

/// One vsock connection over the host stream `S`.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    state: ConnState,
    pending: PendingSet,
    credit: Credit,
    /// Our port, for the `OK <port>` line of a host-initiated connection.
    local_port: u32,
    /// The `OK <port>\n` line not yet written to the host.
    ack_line: Vec<u8>,
    /// Guest bytes not yet written to the host stream.
    tx_buf: VecDeque<u8>,
    /// The stream has data (or EOF) we have not read: its readiness, not a protocol state.
    readable: bool,
    /// Bytes moved either way (guest to host written, host to guest read), for idle checks.
    bytes_moved: u64,
}

impl<S: ConnStream> Connection<S> {
    /// A host-initiated connection on `local_port`: a REQUEST is owed to the guest.
    pub fn new_local_init(stream: S, local_port: u32) -> Self {
        let mut conn = Self::with(stream, ConnState::LocalInit, Credit::default(), local_port);
        conn.pending.insert(PendingRx::Request);
        conn
    }

    /// A guest-initiated connection whose REQUEST was `peer`: connected, a RESPONSE is owed.
    pub fn new_peer_init(stream: S, peer: &Header) -> Self {
        let state = ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::Open };
        let mut conn = Self::with(stream, state, Credit::from_peer(peer), peer.dst_port);
        conn.pending.insert(PendingRx::Response);
        conn
    }

    fn with(stream: S, state: ConnState, credit: Credit, local_port: u32) -> Self {
        Self {
            stream,
            state,
            pending: PendingSet::default(),
            credit,
            local_port,
            ack_line: Vec::new(),
            tx_buf: VecDeque::new(),
            readable: false,
            bytes_moved: 0,
        }
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Where the connection stands.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Its credit accounting.
    pub fn credit(&self) -> &Credit {
        &self.credit
    }

    /// Whether it is gone (the muxer drops it).
    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// What the connection waits for that a bad peer could withhold forever, if anything: the
    /// guest's answer to our REQUEST once it went out, or the guest taking our RST
    /// ([`Expiry::GuestResponse`]); progress while half-closed ([`Expiry::HalfClosed`]).
    pub fn expiry(&self) -> Option<Expiry> {
        match self.state {
            ConnState::LocalInit if !self.pending.contains(PendingRx::Request) => Some(Expiry::GuestResponse),
            ConnState::Killing => Some(Expiry::GuestResponse),
            ConnState::Established { to_host, to_guest } if to_host != ToHost::Open || to_guest != ToGuest::Open => {
                Some(Expiry::HalfClosed)
            }
            _ => None,
        }
    }

    /// Bytes moved either way so far: a half-closed connection whose count stands still is
    /// idle.
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_moved
    }

    /// Resets the connection: an RST is owed, nothing else.
    pub fn kill(&mut self) {
        if self.state != ConnState::Closed {
            self.pending = PendingSet::default();
            self.state = ConnState::Killing;
        }
    }

    /// Host bytes may flow to the guest.
    fn can_send_data(&self) -> bool {
        matches!(self.state, ConnState::Established { to_guest: ToGuest::Open, .. })
    }

    /// Whether the connection has something for the guest.
    pub fn wants_rx(&self) -> bool {
        self.state == ConnState::Killing
            || !self.pending.is_empty()
            || (self.readable && self.can_send_data() && self.credit.peer_credit() > 0)
    }

    /// What the connection waits for on its stream.
    pub fn interest(&self) -> Interest {
        let live = !matches!(self.state, ConnState::Killing | ConnState::Closed);
        Interest {
            readable: self.can_send_data() && !self.readable && self.credit.peer_credit() > 0,
            writable: live && (!self.ack_line.is_empty() || !self.tx_buf.is_empty()),
        }
    }

    /// The stream became readable (or hung up): there is data or EOF to read.
    pub fn notify_readable(&mut self) {
        self.readable = true;
    }

    /// The stream became writable: write what waits for it.
    pub fn notify_writable(&mut self) {
        self.flush_to_host();
    }

    /// Handles one packet the guest sent on this connection. Packets that make no sense in
    /// the connection's state reset it (with a rate-limited warning in `warnings`).
    pub fn recv_pkt(&mut self, pkt: &TxPacket, warnings: &mut GuestWarnLimiter) {
        self.credit.update_from_peer(&pkt.header);
        match (pkt.op, self.state) {
            (Op::Rst, _) => self.state = ConnState::Closed,
            // Our RST is on its way: the guest's packets no longer matter.
            (_, ConnState::Killing | ConnState::Closed) => {}
            (Op::Response, ConnState::LocalInit) => {
                self.pending.remove(PendingRx::Request);
                self.state = ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::Open };
                self.ack_line = ok_line(self.local_port).into_bytes();
                self.flush_to_host();
            }
            (Op::Rw, ConnState::Established { to_host, .. }) => {
                if to_host != ToHost::Open {
                    crate::guest_warn!(*warnings, "vsock: guest sent data after SHUTDOWN SEND, resetting");
                    self.kill();
                } else if self.tx_buf.len() + pkt.payload.len() > CONN_TX_BUF_BYTES as usize {
                    crate::guest_warn!(
                        *warnings,
                        limit = CONN_TX_BUF_BYTES,
                        "vsock: guest overran the advertised credit, resetting connection"
                    );
                    self.kill();
                } else {
                    self.tx_buf.extend(pkt.payload.iter());
                    self.flush_to_host();
                }
            }
            (Op::CreditUpdate, ConnState::Established { .. }) => {}
            (Op::CreditRequest, ConnState::Established { .. }) => self.pending.insert(PendingRx::CreditUpdate),
            (Op::Shutdown, ConnState::Established { mut to_host, mut to_guest }) => {
                let flags = pkt.header.flags;
                if flags & SHUTDOWN_SEND != 0 && to_host == ToHost::Open {
                    to_host = ToHost::Draining;
                }
                if flags & SHUTDOWN_RCV != 0 {
                    to_guest = match to_guest {
                        ToGuest::Open | ToGuest::GuestRefuses => ToGuest::GuestRefuses,
                        ToGuest::HostEof | ToGuest::Closed => ToGuest::Closed,
                    };
                }
                self.state = ConnState::Established { to_host, to_guest };
                self.flush_to_host();
            }
            (op, state) => {
                crate::guest_warn!(*warnings, ?op, ?state, "vsock: guest op not valid in connection state, resetting");
                self.kill();
            }
        }
    }

    /// The next packet for the guest, with at most `max_payload` data bytes, if any.
    pub fn next_packet(&mut self, max_payload: usize) -> Option<RxPacket> {
        let fwd_cnt = self.credit.fwd_cnt;
        let control = |op, flags| RxPacket { op, flags, fwd_cnt, payload: Vec::new() };
        if self.state == ConnState::Killing {
            self.state = ConnState::Closed;
            self.credit.last_fwd_cnt_sent = fwd_cnt;
            return Some(control(Op::Rst, 0));
        }
        if let Some(pending) = self.pending.take_first() {
            self.credit.last_fwd_cnt_sent = fwd_cnt;
            return Some(match pending {
                PendingRx::Request => control(Op::Request, 0),
                PendingRx::Response => control(Op::Response, 0),
                // The host closed its write side; it may still read the guest's reply.
                PendingRx::Shutdown => control(Op::Shutdown, SHUTDOWN_SEND),
                PendingRx::CreditUpdate => control(Op::CreditUpdate, 0),
                PendingRx::CreditRequest => control(Op::CreditRequest, 0),
            });
        }
        if !(self.readable && self.can_send_data()) {
            return None;
        }
        let credit = self.credit.peer_credit() as usize;
        if credit == 0 {
            self.request_credit();
            return None;
        }
        let want = credit.min(max_payload).min(MAX_PAYLOAD_BYTES);
        if want == 0 {
            return None;
        }
        let mut buf = vec![0u8; want];
        let read = loop {
            match self.stream.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match read {
            Ok(0) => {
                self.readable = false;
                self.host_eof();
                None
            }
            Ok(n) => {
                buf.truncate(n);
                self.bytes_moved += n as u64;
                self.credit.rx_cnt = self.credit.rx_cnt.wrapping_add(n as u32);
                self.credit.last_fwd_cnt_sent = fwd_cnt;
                if self.credit.peer_credit() == 0 {
                    // Out of credit with data possibly waiting: ask the guest.
                    self.request_credit();
                }
                Some(RxPacket { op: Op::Rw, flags: 0, fwd_cnt, payload: buf })
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.readable = false;
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "vsock: host stream read failed, resetting");
                self.kill();
                None
            }
        }
    }

    /// Owes the guest a CREDIT_REQUEST unless one is already owed or unanswered.
    fn request_credit(&mut self) {
        if !self.credit.requested {
            self.credit.requested = true;
            self.pending.insert(PendingRx::CreditRequest);
        }
    }

    /// The host closed its write side (only read while host bytes flow to the guest).
    fn host_eof(&mut self) {
        if let ConnState::Established { to_host, .. } = self.state {
            if to_host == ToHost::Open {
                self.state = ConnState::Established { to_host, to_guest: ToGuest::HostEof };
                self.pending.insert(PendingRx::Shutdown);
            } else {
                // The guest sends no more either: nothing can flow any more.
                self.kill();
            }
        }
    }

    /// Writes the ack line and buffered guest bytes to the host stream, then moves the
    /// guest-to-host half on (and closes the connection once the guest closed both halves).
    fn flush_to_host(&mut self) {
        if matches!(self.state, ConnState::Killing | ConnState::Closed) {
            return;
        }
        while !self.ack_line.is_empty() {
            match self.stream.write(&self.ack_line) {
                Ok(n) => {
                    self.ack_line.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream write failed, resetting");
                    self.kill();
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.kill();
                    return;
                }
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.bytes_moved += n as u64;
                    self.credit.fwd_cnt = self.credit.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host stream write failed, resetting");
                    self.kill();
                    return;
                }
            }
        }
        if self.credit.update_due() {
            self.pending.insert(PendingRx::CreditUpdate);
        }
        let ConnState::Established { to_host, to_guest } = self.state else {
            return;
        };
        if !self.tx_buf.is_empty() || to_host == ToHost::Open {
            return;
        }
        if to_host == ToHost::Draining {
            // Best effort: the host may already have closed its side.
            let _ = self.stream.shutdown_write();
            self.state = ConnState::Established { to_host: ToHost::Shut, to_guest };
        }
        if matches!(to_guest, ToGuest::GuestRefuses | ToGuest::Closed) {
            // The guest closed both directions and everything is delivered.
            self.kill();
        }
    }
}

#[cfg(test)]
#[path = "csm_tests.rs"]
mod tests;
