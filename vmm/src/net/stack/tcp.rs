//! The guest's TCP connections: a smoltcp socket that ends each one in the stack, the request
//! to the [`Upstream`] for it, and, once the upstream connected, the splice between that socket
//! and the Unix stream that carries the connection's bytes.
//!
//! A connection is born from the guest's SYN ([`TcpTable::on_syn`], before smoltcp reads the
//! frame): a socket listening on exactly the address and port the guest asked for (smoltcp's
//! any-IP mode), so smoltcp completes the handshake. Then it moves through [`Phase`]:
//! `Handshake` → (ports 80 and 443) `FirstBytes` → `Asked` → `Spliced` → `Done`, or to `Done`
//! by a refusal (the guest gets a reset) or the guest's reset. Data waits in the socket's own
//! buffers ([`SOCKET_BUFFER_BYTES`] each way), so while the upstream is asked the guest's
//! window closes instead of anything growing. Half-closes cross both ways (`shutdown(Write)`
//! on the stream for the guest's FIN; a FIN to the guest for the stream's end of file).
//!
//! It owns the sockets' handles and the streams; it never blocks (the streams are
//! nonblocking) and never opens a connection itself.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use super::poller::Poller;
use super::resolver::NameMap;
use super::upstream::{ConnectRequest, Upstream};
use super::{Refusals, SANDBOX_NETWORK};
use crate::net::broker::FirstBytes;
use crate::net::first_bytes::{scan, Scan, MAX_FIRST_BYTES};

/// Guest connections open at once at most (a SYN past it gets a reset).
pub const MAX_CONNECTIONS: usize = 256;
/// Each connection's buffer each way, in bytes (also the largest TCP window offered).
pub const SOCKET_BUFFER_BYTES: usize = 256 * 1024;
/// How long the stack waits for the guest's first bytes on ports 80 and 443.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection waits for the upstream's answer before it is refused.
pub const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports whose first bytes are read and passed on (HTTP, HTTPS).
const WEB_PORTS: [u16; 2] = [80, 443];

/// A splice that failed on the stream side.
#[derive(Debug, Error)]
pub enum SpliceError {
    /// Reading the connection's stream failed.
    #[error("reading the upstream stream failed")]
    Read(#[source] std::io::Error),
    /// Writing the connection's stream failed.
    #[error("writing the upstream stream failed")]
    Write(#[source] std::io::Error),
}

/// The connection's guest address and the address it asked for.
pub type Tuple = (SocketAddrV4, SocketAddrV4);

/// Where a connection is.
enum Phase {
    /// The listener waits for (or is in) the handshake.
    Handshake,
    /// Reading the guest's first bytes (ports 80 and 443) until `deadline`.
    FirstBytes { deadline: Instant },
    /// The upstream was asked; its answer is due by `deadline`.
    Asked { deadline: Instant },
    /// Bytes flow between the socket and `stream`.
    Spliced(Splice),
    /// Finished or refused: removed after the next poll (which sends what is left, e.g. a reset).
    Done,
}

/// The stream side of a spliced connection.
struct Splice {
    stream: UnixStream,
    /// What the poller watches the stream for.
    interest: EventSet,
    /// The stream reached end of file (the guest got, or will get, a FIN).
    read_closed: bool,
    /// The guest's FIN was passed on (`shutdown(Write)`).
    write_closed: bool,
}

struct Conn {
    handle: SocketHandle,
    tuple: Tuple,
    phase: Phase,
}

/// Context a connection's step needs from the stack.
pub struct Ctx<'a> {
    /// The interface's sockets.
    pub sockets: &'a mut SocketSet<'static>,
    /// Where connections are asked for.
    pub upstream: &'a mut dyn Upstream,
    /// Watches the streams.
    pub poller: &'a Poller,
    /// The refusal log.
    pub refusals: &'a mut Refusals,
    /// The resolver's answers.
    pub names: &'a NameMap,
    /// Now.
    pub now: Instant,
}

/// Every guest connection, by id (the id of its upstream request too).
#[derive(Default)]
pub struct TcpTable {
    conns: HashMap<u64, Conn>,
    by_tuple: HashMap<Tuple, u64>,
    /// Room for peeking at first bytes, made on first use.
    scratch: Vec<u8>,
}

impl TcpTable {
    /// Connections open (in any phase).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The guest sent a SYN from `src` to `dst`: makes a listener for it (new connection `id`)
    /// unless one exists, or records why not (smoltcp then answers the SYN with a reset).
    pub fn on_syn(&mut self, tuple: Tuple, id: u64, sockets: &mut SocketSet<'static>, refusals: &mut Refusals) {
        if self.by_tuple.contains_key(&tuple) {
            return;
        }
        let dst = tuple.1;
        if !dst.ip().is_unicast_candidate() || dst.port() == 0 {
            return;
        }
        if SANDBOX_NETWORK.contains_addr(dst.ip()) {
            refusals.record(format!("refused TCP to {dst} (nothing listens on the sandbox network)"));
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            refusals.record(format!(
                "refused TCP to {dst} (the sandbox has {MAX_CONNECTIONS} connections open, the most it may)"
            ));
            return;
        }
        let buffer = || tcp::SocketBuffer::new(vec![0u8; SOCKET_BUFFER_BYTES]);
        let mut socket = tcp::Socket::new(buffer(), buffer());
        if socket.listen(dst).is_err() {
            return;
        }
        let handle = sockets.add(socket);
        self.conns.insert(id, Conn { handle, tuple, phase: Phase::Handshake });
        self.by_tuple.insert(tuple, id);
    }

    /// Removes listeners smoltcp did not take a SYN for (it rejected the frame, or the guest
    /// reset the handshake): call right after a poll that read the SYNs.
    pub fn sweep_listeners(&mut self, sockets: &mut SocketSet<'static>) {
        for conn in self.conns.values_mut() {
            if matches!(conn.phase, Phase::Handshake) && sockets.get::<tcp::Socket>(conn.handle).is_listening() {
                conn.phase = Phase::Done;
            }
        }
    }

    /// Moves every connection on as far as it can go now.
    pub fn service(&mut self, ctx: &mut Ctx<'_>) {
        for (id, conn) in self.conns.iter_mut() {
            step(*id, conn, ctx, &mut self.scratch);
        }
    }

    /// The upstream connected `id`: starts splicing (or drops `stream` when the connection is
    /// gone).
    pub fn connected(&mut self, id: u64, stream: UnixStream, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !matches!(conn.phase, Phase::Asked { .. }) {
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::error!(error = %e, "net stack: could not make an upstream stream nonblocking");
            refuse(conn, ctx, "the stack could not use the upstream stream");
            return;
        }
        conn.phase =
            Phase::Spliced(Splice { stream, interest: EventSet::empty(), read_closed: false, write_closed: false });
        step(id, conn, ctx, &mut self.scratch);
    }

    /// The upstream refused `id` for `reason`: the guest gets a reset.
    pub fn refused(&mut self, id: u64, reason: &str, ctx: &mut Ctx<'_>) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if matches!(conn.phase, Phase::Asked { .. }) {
                refuse(conn, ctx, reason);
            }
        }
    }

    /// Removes finished connections: call after the poll that sent their last segment.
    pub fn remove_done(&mut self, sockets: &mut SocketSet<'static>, poller: &Poller) {
        let done: Vec<u64> =
            self.conns.iter().filter(|(_, c)| matches!(c.phase, Phase::Done)).map(|(id, _)| *id).collect();
        for id in done {
            if let Some(mut conn) = self.conns.remove(&id) {
                if let Phase::Spliced(splice) = &mut conn.phase {
                    poller.forget(splice.stream.as_raw_fd(), &mut splice.interest);
                }
                sockets.remove(conn.handle);
                self.by_tuple.remove(&conn.tuple);
            }
        }
    }

    /// The earliest deadline of a connection waiting for first bytes or an answer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c.phase {
                Phase::FirstBytes { deadline } | Phase::Asked { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }
}

/// IPv4 addresses a connection may be made to.
trait UnicastCandidate {
    fn is_unicast_candidate(&self) -> bool;
}

impl UnicastCandidate for std::net::Ipv4Addr {
    fn is_unicast_candidate(&self) -> bool {
        !(self.is_unspecified() || self.is_broadcast() || self.is_multicast() || self.is_loopback())
    }
}

/// Moves the connection `id` on.
fn step(id: u64, conn: &mut Conn, ctx: &mut Ctx<'_>, scratch: &mut Vec<u8>) {
    let socket = ctx.sockets.get_mut::<tcp::Socket>(conn.handle);
    let state = socket.state();
    if state == State::Closed && !matches!(conn.phase, Phase::Done) {
        // The guest reset (or the connection ended): nothing more to do either way.
        conn.phase = Phase::Done;
        return;
    }
    match &mut conn.phase {
        Phase::Handshake => {
            if matches!(state, State::Listen | State::SynReceived) {
                return;
            }
            if WEB_PORTS.contains(&conn.tuple.1.port()) {
                conn.phase = Phase::FirstBytes { deadline: ctx.now + FIRST_BYTES_TIMEOUT };
                step(id, conn, ctx, scratch);
            } else {
                ask(id, conn, None, ctx);
            }
        }
        Phase::FirstBytes { deadline } => {
            let deadline = *deadline;
            if scratch.len() < MAX_FIRST_BYTES {
                scratch.resize(MAX_FIRST_BYTES, 0);
            }
            let got = socket.peek_slice(&mut scratch[..MAX_FIRST_BYTES]).unwrap_or(0);
            let guest_done = !socket.may_recv();
            let first = match scan(&scratch[..got]) {
                Scan::Done(first) => Some(first),
                Scan::NeedMore if guest_done || ctx.now >= deadline => Some(FirstBytes::Unrecognized),
                Scan::NeedMore => None,
            };
            if let Some(first) = first {
                ask(id, conn, Some(first), ctx);
            }
        }
        Phase::Asked { deadline } => {
            if ctx.now >= *deadline {
                refuse(conn, ctx, "no answer from the network broker in time");
            }
        }
        Phase::Spliced(splice) => {
            if let Err(e) = pump(socket, splice) {
                tracing::debug!(error = %e, "net stack: a spliced connection failed, resetting it");
                socket.abort();
                conn.phase = Phase::Done;
                return;
            }
            if matches!(socket.state(), State::TimeWait | State::Closed) && splice.read_closed {
                conn.phase = Phase::Done;
                return;
            }
            let mut wanted = EventSet::empty();
            if !splice.read_closed && socket.can_send() {
                wanted |= EventSet::IN;
            }
            if !splice.write_closed && socket.can_recv() {
                wanted |= EventSet::OUT;
            }
            ctx.poller.set_interest(splice.stream.as_raw_fd(), id, &mut splice.interest, wanted);
        }
        Phase::Done => {}
    }
}

/// Asks the upstream for the connection.
fn ask(id: u64, conn: &mut Conn, first_bytes: Option<FirstBytes>, ctx: &mut Ctx<'_>) {
    let dst = conn.tuple.1;
    let name = ctx.names.lookup(dst.ip().to_owned().into(), ctx.now);
    match ctx.upstream.connect(ConnectRequest { id, dst: SocketAddr::V4(dst), name, first_bytes }) {
        Ok(()) => conn.phase = Phase::Asked { deadline: ctx.now + CONNECT_ANSWER_TIMEOUT },
        Err(reason) => refuse(conn, ctx, &reason),
    }
}

/// Resets the guest's connection and records why.
fn refuse(conn: &mut Conn, ctx: &mut Ctx<'_>, reason: &str) {
    let dst = conn.tuple.1;
    let text = match ctx.names.lookup(dst.ip().to_owned().into(), ctx.now) {
        Some(name) => format!("refused TCP to {name} at {dst} ({reason})"),
        None => format!("refused TCP to {dst} ({reason})"),
    };
    ctx.refusals.record(text);
    ctx.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
    conn.phase = Phase::Done;
}

/// Moves what can move between the guest's socket and the stream, and passes half-closes on.
fn pump(socket: &mut tcp::Socket<'static>, splice: &mut Splice) -> Result<(), SpliceError> {
    // Guest → upstream.
    while !splice.write_closed && socket.can_recv() {
        let written = socket.recv(|buf| match (&splice.stream).write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match written {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(SpliceError::Write(e)),
            Err(_) => break,
        }
    }
    if !splice.write_closed && !socket.may_recv() && socket.recv_queue() == 0 {
        splice.write_closed = true;
        // The peer may be gone already; its end of file then comes from the read side.
        let _ = splice.stream.shutdown(Shutdown::Write);
    }
    // Upstream → guest.
    while !splice.read_closed && socket.can_send() {
        let read = socket.send(|buf| match (&splice.stream).read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match read {
            Ok(Ok(0)) => {
                splice.read_closed = true;
                socket.close();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(SpliceError::Read(e)),
            Err(_) => break,
        }
    }
    if !splice.read_closed && !socket.may_send() {
        // The guest's side can take nothing more (it was closed by a reset or by us).
        splice.read_closed = true;
    }
    Ok(())
}
