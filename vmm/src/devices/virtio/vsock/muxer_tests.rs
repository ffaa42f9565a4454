//! Bad-peer expiry in the muxer, with the clock handed in (`Muxer::expire(now)`): each kind
//! of deadline, the refresh on progress, and each count bound, over real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::vsock::packet::{Header, SHUTDOWN_SEND};

const GUEST_CID: u64 = 3;
const MARGIN: Duration = Duration::from_millis(5);

struct Fixture {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    muxer: Muxer,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let muxer = Muxer::new(GUEST_CID, &uds).unwrap();
    Fixture { _dir: dir, uds, muxer }
}

fn guest(op: Op, src_port: u32, dst_port: u32, flags: u32) -> TxPacket {
    let header = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    };
    TxPacket { header, op, payload: Vec::new() }
}

/// Runs the muxer's host side until `done` holds (bounded).
fn settle(m: &mut Muxer, done: impl Fn(&Muxer) -> bool) {
    for _ in 0..200 {
        m.process_events();
        if done(m) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the muxer never got there");
}

/// Every packet the muxer has for the guest now.
fn drain(m: &mut Muxer) -> Vec<Header> {
    std::iter::from_fn(|| m.next_rx(4096).map(|(h, _)| h)).collect()
}

/// Whether the host end saw its stream closed (EOF or reset) within a second.
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn still_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// A host stream that sent `CONNECT <port>`, accepted into a connection (REQUEST owed).
fn host_connect(f: &mut Fixture, port: u32) -> UnixStream {
    let before = f.muxer.connection_count();
    let mut s = UnixStream::connect(&f.uds).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    settle(&mut f.muxer, |m| m.connection_count() == before + 1);
    s
}

// ------------------------------------------------------------------ deadlines

#[test]
fn a_host_stream_without_its_connect_line_is_closed_after_the_timeout() {
    let mut f = fixture();
    let mut silent = UnixStream::connect(&f.uds).unwrap();
    let mut partial = UnixStream::connect(&f.uds).unwrap();
    partial.write_all(b"CONN").unwrap();
    settle(&mut f.muxer, |m| m.pending_hosts.len() == 2);
    let deadline = f.muxer.kill_queue.next_deadline().unwrap();
    assert!(f.muxer.armed_deadline().is_some(), "a deadline arms the timer");
    f.muxer.expire(deadline - MARGIN);
    assert!(still_open(&silent) && still_open(&partial), "not before the deadline");
    f.muxer.expire(Instant::now() + CONNECT_LINE_TIMEOUT + MARGIN);
    assert!(closed(&mut silent) && closed(&mut partial));
    assert!(f.muxer.pending_hosts.is_empty());
    // The listener still serves a stream that does send its line.
    host_connect(&mut f, 9);
}

#[test]
fn a_request_the_guest_never_answers_is_reset_after_the_timeout() {
    let mut f = fixture();
    let mut host = host_connect(&mut f, 5);
    f.muxer.expire(Instant::now() + GUEST_RESPONSE_TIMEOUT * 10);
    assert_eq!(f.muxer.connection_count(), 1, "the clock starts only when the guest sees the REQUEST");
    let request = drain(&mut f.muxer);
    assert_eq!(request.iter().map(|h| h.op).collect::<Vec<_>>(), [Op::Request as u16]);
    let deadline = f.muxer.kill_queue.next_deadline().unwrap();
    f.muxer.expire(deadline - MARGIN);
    assert!(still_open(&host));
    f.muxer.expire(Instant::now() + GUEST_RESPONSE_TIMEOUT + MARGIN);
    assert_eq!(f.muxer.connection_count(), 0);
    assert!(closed(&mut host), "the host stream closes at once");
    let rst = drain(&mut f.muxer);
    assert_eq!(rst.len(), 1);
    assert_eq!((rst[0].op, rst[0].src_port, rst[0].dst_port), (Op::Rst as u16, request[0].src_port, 5));
}

#[test]
fn an_answered_request_is_not_expired() {
    let mut f = fixture();
    let host = host_connect(&mut f, 5);
    let request = drain(&mut f.muxer);
    f.muxer.handle_guest_packet(guest(Op::Response, 5, request[0].src_port, 0));
    f.muxer.expire(Instant::now() + HALF_CLOSED_IDLE_TIMEOUT * 10);
    assert_eq!(f.muxer.connection_count(), 1, "an open connection has no deadline");
    assert!(f.muxer.kill_queue.next_deadline().is_none());
    drop(host);
}

#[test]
fn an_rst_the_guest_never_takes_is_dropped_after_the_timeout() {
    let mut f = fixture();
    let mut host = host_connect(&mut f, 5);
    let request = drain(&mut f.muxer);
    // Data before the RESPONSE: the connection is reset, and the guest takes no RX buffers.
    f.muxer.handle_guest_packet(guest(Op::Rw, 5, request[0].src_port, 0));
    assert_eq!(f.muxer.connection_count(), 1, "the RST waits for the guest");
    f.muxer.expire(Instant::now() + GUEST_RESPONSE_TIMEOUT + MARGIN);
    assert_eq!(f.muxer.connection_count(), 0);
    assert!(closed(&mut host));
}

#[test]
fn a_half_closed_connection_that_moves_no_bytes_is_reset_after_the_idle_timeout() {
    let mut f = fixture();
    let listener = UnixListener::bind(format!("{}_6000", f.uds.display())).unwrap();
    f.muxer.handle_guest_packet(guest(Op::Request, 900, 6000, 0));
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(drain(&mut f.muxer).len(), 1, "RESPONSE");
    f.muxer.handle_guest_packet(guest(Op::Shutdown, 900, 6000, SHUTDOWN_SEND));
    let deadline = f.muxer.kill_queue.next_deadline().unwrap();
    f.muxer.expire(deadline - MARGIN);
    assert_eq!(f.muxer.connection_count(), 1);

    // Progress (host bytes reaching the guest) moves the deadline.
    std::thread::sleep(Duration::from_millis(30));
    host.write_all(b"still talking").unwrap();
    settle(&mut f.muxer, |m| m.has_rx());
    assert_eq!(drain(&mut f.muxer).iter().filter(|h| h.op == Op::Rw as u16).count(), 1);
    f.muxer.expire(deadline + MARGIN);
    assert_eq!(f.muxer.connection_count(), 1, "progress refreshed the deadline");

    f.muxer.expire(Instant::now() + HALF_CLOSED_IDLE_TIMEOUT + MARGIN);
    assert_eq!(f.muxer.connection_count(), 0);
    let rst = drain(&mut f.muxer);
    assert_eq!((rst[0].op, rst[0].dst_port), (Op::Rst as u16, 900));
    // Its read side saw EOF at the SHUTDOWN already; now its writes find no one.
    let write = host.write_all(b"anyone?");
    assert!(matches!(&write, Err(e) if e.kind() == ErrorKind::BrokenPipe), "{write:?}");
}

// ------------------------------------------------------------------ counts

#[test]
fn host_streams_past_the_pending_limit_are_closed_at_once() {
    let mut f = fixture();
    let waiting: Vec<UnixStream> =
        (0..MAX_PENDING_HOST_STREAMS).map(|_| UnixStream::connect(&f.uds).unwrap()).collect();
    settle(&mut f.muxer, |m| m.pending_hosts.len() == MAX_PENDING_HOST_STREAMS);
    let mut extra = UnixStream::connect(&f.uds).unwrap();
    f.muxer.process_events();
    assert!(closed(&mut extra));
    assert_eq!(f.muxer.pending_hosts.len(), MAX_PENDING_HOST_STREAMS);
    drop(waiting);
}

#[test]
fn a_connect_past_the_awaiting_guest_limit_is_refused() {
    let mut f = fixture();
    let waiting: Vec<UnixStream> =
        (0..MAX_CONNECTIONS_AWAITING_GUEST as u32).map(|p| host_connect(&mut f, p)).collect();
    let mut extra = UnixStream::connect(&f.uds).unwrap();
    extra.write_all(b"CONNECT 99\n").unwrap();
    settle(&mut f.muxer, |m| m.pending_hosts.is_empty());
    assert!(closed(&mut extra));
    assert_eq!(f.muxer.connection_count(), MAX_CONNECTIONS_AWAITING_GUEST);
    drop(waiting);
}

#[test]
fn past_the_half_closed_limit_the_one_idle_longest_is_reset() {
    let mut f = fixture();
    let _listener = UnixListener::bind(format!("{}_6001", f.uds.display())).unwrap();
    let first_port = 1000;
    for port in first_port..=first_port + MAX_HALF_CLOSED_CONNECTIONS as u32 {
        f.muxer.handle_guest_packet(guest(Op::Request, port, 6001, 0));
        f.muxer.handle_guest_packet(guest(Op::Shutdown, port, 6001, SHUTDOWN_SEND));
    }
    assert_eq!(f.muxer.connection_count(), MAX_HALF_CLOSED_CONNECTIONS);
    assert_eq!(f.muxer.kill_queue.count(Expiry::HalfClosed), MAX_HALF_CLOSED_CONNECTIONS);
    let rsts: Vec<u32> = drain(&mut f.muxer).iter().filter(|h| h.op == Op::Rst as u16).map(|h| h.dst_port).collect();
    assert_eq!(rsts, [first_port]);
}

// ------------------------------------------------------------------ the timer

#[test]
fn an_idle_muxer_arms_no_timer() {
    let mut f = fixture();
    assert_eq!(f.muxer.armed_deadline(), None);
    let host = host_connect(&mut f, 5);
    let request = drain(&mut f.muxer);
    f.muxer.handle_guest_packet(guest(Op::Response, 5, request[0].src_port, 0));
    assert!(f.muxer.kill_queue.next_deadline().is_none(), "nothing waits on a peer");
    // The timer was armed for the CONNECT line; when it fires it finds nothing and stays off.
    f.muxer.disarm();
    f.muxer.expire(Instant::now() + HALF_CLOSED_IDLE_TIMEOUT * 10);
    f.muxer.rearm();
    assert_eq!(f.muxer.armed_deadline(), None);
    let mut pollfd = libc::pollfd { fd: f.muxer.epoll_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    assert_eq!(ready, 0, "nothing wakes the device-event thread");
    drop(host);
}
