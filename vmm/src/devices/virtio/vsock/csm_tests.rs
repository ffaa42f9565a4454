//! The connection state machine against an in-memory host stream: every transition, and the
//! credit accounting.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};

use super::*;
use crate::devices::virtio::vsock::packet::TYPE_STREAM;

const LOCAL_PORT: u32 = 1 << 30;
const GUEST_PORT: u32 = 52;

/// A host stream in memory: what the host "sent" waits in `to_read`, what the connection
/// wrote lands in `written`; `write_room` bounds what writes take before WouldBlock.
#[derive(Debug, Default)]
struct MemStream {
    to_read: VecDeque<u8>,
    eof: bool,
    written: Vec<u8>,
    write_room: Option<usize>,
    write_error: Option<ErrorKind>,
    write_shut: bool,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.to_read.is_empty() {
            return if self.eof { Ok(0) } else { Err(ErrorKind::WouldBlock.into()) };
        }
        let n = buf.len().min(self.to_read.len());
        for (dst, src) in buf.iter_mut().zip(self.to_read.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(kind) = self.write_error {
            return Err(kind.into());
        }
        assert!(!self.write_shut, "write after the write side was shut");
        let n = self.write_room.map_or(buf.len(), |room| room.min(buf.len()));
        if n == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        if let Some(room) = self.write_room.as_mut() {
            *room -= n;
        }
        self.written.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConnStream for MemStream {
    fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.write_shut = true;
        Ok(())
    }
}

fn header(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: GUEST_PORT,
        dst_port: LOCAL_PORT,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn pkt(op: Op) -> TxPacket {
    TxPacket { header: header(op, 64 * 1024, 0), op, payload: Vec::new() }
}

fn data(bytes: &[u8]) -> TxPacket {
    TxPacket {
        header: Header { len: bytes.len() as u32, ..header(Op::Rw, 64 * 1024, 0) },
        op: Op::Rw,
        payload: bytes.to_vec(),
    }
}

fn shutdown(flags: u32) -> TxPacket {
    TxPacket { header: Header { flags, ..header(Op::Shutdown, 64 * 1024, 0) }, op: Op::Shutdown, payload: Vec::new() }
}

fn credit_update(buf_alloc: u32, fwd_cnt: u32) -> TxPacket {
    TxPacket { header: header(Op::CreditUpdate, buf_alloc, fwd_cnt), op: Op::CreditUpdate, payload: Vec::new() }
}

fn recv(conn: &mut Connection<MemStream>, p: TxPacket) {
    conn.recv_pkt(&p, &mut GuestWarnLimiter::new());
}

fn next_op(conn: &mut Connection<MemStream>) -> Option<Op> {
    conn.next_packet(MAX_PAYLOAD_BYTES).map(|p| p.op)
}

const ESTABLISHED: ConnState = ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::Open };

/// A connected guest-initiated connection whose RESPONSE is already out.
fn established(buf_alloc: u32) -> Connection<MemStream> {
    let mut conn = Connection::new_peer_init(MemStream::default(), &header(Op::Request, buf_alloc, 0));
    assert_eq!(next_op(&mut conn), Some(Op::Response));
    conn
}

// ------------------------------------------------------------------ states

#[test]
fn a_host_connect_owes_a_request_and_the_response_establishes_it_and_writes_ok() {
    let mut conn = Connection::new_local_init(MemStream::default(), LOCAL_PORT);
    assert_eq!(conn.state(), ConnState::LocalInit);
    assert!(conn.wants_rx());
    assert_eq!(next_op(&mut conn), Some(Op::Request));
    assert!(!conn.wants_rx(), "one REQUEST only");
    assert_eq!(next_op(&mut conn), None);
    recv(&mut conn, pkt(Op::Response));
    assert_eq!(conn.state(), ESTABLISHED);
    assert_eq!(conn.stream().written, format!("OK {LOCAL_PORT}\n").as_bytes());
}

#[test]
fn an_ok_line_the_host_cannot_take_yet_waits_for_writability() {
    let stream = MemStream { write_room: Some(3), ..MemStream::default() };
    let mut conn = Connection::new_local_init(stream, LOCAL_PORT);
    recv(&mut conn, pkt(Op::Response));
    assert_eq!(conn.stream().written, b"OK ");
    assert!(conn.interest().writable);
    conn.stream.write_room = None;
    conn.notify_writable();
    assert_eq!(conn.stream().written, format!("OK {LOCAL_PORT}\n").as_bytes());
    assert!(!conn.interest().writable);
}

#[test]
fn anything_but_a_response_before_it_resets_a_host_connect() {
    for op in [Op::Rw, Op::Shutdown, Op::CreditRequest, Op::Request] {
        let mut conn = Connection::new_local_init(MemStream::default(), LOCAL_PORT);
        recv(&mut conn, pkt(op));
        assert_eq!(conn.state(), ConnState::Killing, "{op:?}");
        assert_eq!(next_op(&mut conn), Some(Op::Rst), "the RST goes before the owed REQUEST");
        assert!(conn.is_closed());
        assert_eq!(next_op(&mut conn), None);
    }
}

#[test]
fn a_guest_connect_owes_a_response_and_is_established_at_once() {
    let mut conn = Connection::new_peer_init(MemStream::default(), &header(Op::Request, 4096, 0));
    assert_eq!(conn.state(), ESTABLISHED);
    assert_eq!(next_op(&mut conn), Some(Op::Response));
    assert_eq!(conn.credit().peer_credit(), 4096);
}

#[test]
fn a_guest_rst_closes_without_an_answer_in_every_state() {
    let mut local = Connection::new_local_init(MemStream::default(), LOCAL_PORT);
    recv(&mut local, pkt(Op::Rst));
    assert!(local.is_closed());
    let mut conn = established(4096);
    recv(&mut conn, pkt(Op::Rst));
    assert!(conn.is_closed());
    assert!(!conn.wants_rx());
    let mut killing = established(4096);
    killing.kill();
    recv(&mut killing, pkt(Op::Rst));
    assert!(killing.is_closed(), "the guest's RST makes ours moot");
}

#[test]
fn data_flows_both_ways_while_established() {
    let mut conn = established(4096);
    recv(&mut conn, data(b"ping"));
    assert_eq!(conn.stream().written, b"ping");
    conn.stream.to_read.extend(b"pong");
    assert!(conn.interest().readable, "host bytes are wanted while the guest has credit");
    conn.notify_readable();
    assert!(conn.wants_rx());
    let p = conn.next_packet(MAX_PAYLOAD_BYTES).unwrap();
    assert_eq!((p.op, p.payload.as_slice(), p.fwd_cnt), (Op::Rw, &b"pong"[..], 4));
    assert_eq!(next_op(&mut conn), None, "WouldBlock: nothing more to read");
    assert!(!conn.wants_rx());
}

#[test]
fn shutdown_send_drains_the_guests_bytes_then_shuts_the_host_write_side() {
    let mut conn = established(4096);
    conn.stream.write_room = Some(0);
    recv(&mut conn, data(b"last words"));
    recv(&mut conn, shutdown(SHUTDOWN_SEND));
    assert_eq!(conn.state(), ConnState::Established { to_host: ToHost::Draining, to_guest: ToGuest::Open });
    assert!(!conn.stream().write_shut, "bytes still wait");
    assert!(conn.interest().writable);
    conn.stream.write_room = None;
    conn.notify_writable();
    assert_eq!(conn.stream().written, b"last words");
    assert!(conn.stream().write_shut);
    assert_eq!(conn.state(), ConnState::Established { to_host: ToHost::Shut, to_guest: ToGuest::Open });
    // Host bytes still flow to the guest.
    conn.stream.to_read.extend(b"reply");
    conn.notify_readable();
    assert_eq!(next_op(&mut conn), Some(Op::Rw));
}

#[test]
fn data_after_shutdown_send_resets() {
    let mut conn = established(4096);
    recv(&mut conn, shutdown(SHUTDOWN_SEND));
    recv(&mut conn, data(b"x"));
    assert_eq!(conn.state(), ConnState::Killing);
}

#[test]
fn shutdown_rcv_stops_host_bytes_and_a_full_shutdown_closes_once_drained() {
    let mut conn = established(4096);
    recv(&mut conn, shutdown(SHUTDOWN_RCV));
    assert_eq!(conn.state(), ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::GuestRefuses });
    conn.stream.to_read.extend(b"unwanted");
    assert!(!conn.interest().readable);
    conn.notify_readable();
    assert_eq!(next_op(&mut conn), None);
    recv(&mut conn, data(b"bye"));
    recv(&mut conn, shutdown(SHUTDOWN_SEND));
    assert_eq!(conn.stream().written, b"bye");
    assert_eq!(conn.state(), ConnState::Killing, "both halves closed by the guest, all delivered");
    assert_eq!(next_op(&mut conn), Some(Op::Rst));
}

#[test]
fn host_eof_owes_the_guest_a_shutdown_send() {
    let mut conn = established(4096);
    conn.stream.eof = true;
    conn.notify_readable();
    assert_eq!(next_op(&mut conn), None, "the EOF read itself carries nothing");
    assert_eq!(conn.state(), ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::HostEof });
    let p = conn.next_packet(MAX_PAYLOAD_BYTES).unwrap();
    assert_eq!((p.op, p.flags), (Op::Shutdown, SHUTDOWN_SEND));
    assert!(!conn.interest().readable);
    recv(&mut conn, shutdown(SHUTDOWN_RCV));
    assert_eq!(conn.state(), ConnState::Established { to_host: ToHost::Open, to_guest: ToGuest::Closed });
    recv(&mut conn, data(b"still"));
    assert_eq!(conn.stream().written, b"still", "the guest may still send");
}

#[test]
fn host_eof_after_the_guest_stopped_sending_resets() {
    let mut conn = established(4096);
    recv(&mut conn, shutdown(SHUTDOWN_SEND));
    conn.stream.eof = true;
    conn.notify_readable();
    assert_eq!(next_op(&mut conn), None);
    assert_eq!(conn.state(), ConnState::Killing);
}

#[test]
fn a_host_stream_that_fails_resets() {
    let mut conn = established(4096);
    conn.stream.write_error = Some(ErrorKind::BrokenPipe);
    recv(&mut conn, data(b"x"));
    assert_eq!(conn.state(), ConnState::Killing);
    assert!(!conn.interest().writable && !conn.interest().readable);
}

#[test]
fn a_killed_connection_ignores_the_guest_and_owes_only_its_rst() {
    let mut conn = established(4096);
    recv(&mut conn, pkt(Op::CreditRequest));
    conn.kill();
    recv(&mut conn, data(b"late"));
    recv(&mut conn, pkt(Op::CreditRequest));
    assert!(conn.stream().written.is_empty());
    assert_eq!(next_op(&mut conn), Some(Op::Rst), "no CREDIT_UPDATE before the RST");
    assert_eq!(next_op(&mut conn), None);
    conn.kill();
    assert!(conn.is_closed(), "killing a closed connection changes nothing");
}

// ------------------------------------------------------------------ credit

#[test]
fn host_bytes_stop_at_the_guests_credit_and_a_credit_request_goes_out_once() {
    let mut conn = established(8);
    conn.stream.to_read.extend(b"0123456789abcdefghij");
    conn.notify_readable();
    let p = conn.next_packet(MAX_PAYLOAD_BYTES).unwrap();
    assert_eq!(p.payload, b"01234567");
    assert_eq!(conn.credit().rx_cnt, 8);
    assert_eq!(conn.credit().peer_credit(), 0);
    assert!(!conn.interest().readable, "no credit, no reading");
    assert_eq!(next_op(&mut conn), Some(Op::CreditRequest));
    assert_eq!(next_op(&mut conn), None, "one request until the guest's credit changes");
    recv(&mut conn, credit_update(8, 0));
    assert_eq!(next_op(&mut conn), None, "an unchanged credit answers nothing");
    recv(&mut conn, credit_update(8, 8));
    assert_eq!(conn.credit().peer_credit(), 8);
    assert_eq!(conn.next_packet(MAX_PAYLOAD_BYTES).unwrap().payload, b"89abcdef");
    assert_eq!(next_op(&mut conn), Some(Op::CreditRequest), "out of credit again: asked again");
}

#[test]
fn a_packet_carries_at_most_the_buffer_the_guest_gave() {
    let mut conn = established(4096);
    conn.stream.to_read.extend([7u8; 100]);
    conn.notify_readable();
    assert_eq!(conn.next_packet(10).unwrap().payload.len(), 10);
    assert_eq!(conn.next_packet(0), None);
}

#[test]
fn forwarded_bytes_are_counted_and_announced_past_the_threshold() {
    let mut conn = established(4096);
    let chunk = vec![1u8; MAX_PAYLOAD_BYTES];
    let chunks = CREDIT_UPDATE_THRESHOLD_BYTES as usize / MAX_PAYLOAD_BYTES;
    for _ in 0..chunks - 1 {
        recv(&mut conn, data(&chunk));
    }
    assert_eq!(conn.credit().fwd_cnt, ((chunks - 1) * MAX_PAYLOAD_BYTES) as u32);
    assert!(!conn.wants_rx(), "below the threshold nothing is owed");
    recv(&mut conn, data(&chunk));
    let p = conn.next_packet(MAX_PAYLOAD_BYTES).unwrap();
    assert_eq!((p.op, p.fwd_cnt), (Op::CreditUpdate, CREDIT_UPDATE_THRESHOLD_BYTES));
    assert_eq!(conn.credit().last_fwd_cnt_sent, CREDIT_UPDATE_THRESHOLD_BYTES);
    recv(&mut conn, data(b"small"));
    assert!(!conn.wants_rx(), "the count was announced; a few more bytes owe nothing");
}

#[test]
fn a_guest_credit_request_is_answered_with_our_forwarded_count() {
    let mut conn = established(4096);
    recv(&mut conn, data(b"0123456789"));
    recv(&mut conn, pkt(Op::CreditRequest));
    let p = conn.next_packet(MAX_PAYLOAD_BYTES).unwrap();
    assert_eq!((p.op, p.fwd_cnt), (Op::CreditUpdate, 10));
}

#[test]
fn a_guest_sending_past_our_buffer_is_reset() {
    let mut conn = established(4096);
    conn.stream.write_room = Some(0);
    let chunk = vec![0x5au8; 60 * 1024];
    let fits = CONN_TX_BUF_BYTES as usize / chunk.len();
    for _ in 0..fits {
        recv(&mut conn, data(&chunk));
    }
    assert_eq!(conn.state(), ESTABLISHED, "{fits} chunks fit in {CONN_TX_BUF_BYTES} bytes");
    recv(&mut conn, data(&chunk));
    assert_eq!(conn.state(), ConnState::Killing);
}

#[test]
fn peer_credit_survives_the_counters_wrapping() {
    let mut credit = Credit { peer_buf_alloc: 100, peer_fwd_cnt: u32::MAX - 10, rx_cnt: 20, ..Credit::default() };
    // 31 bytes in flight across the wrap.
    assert_eq!(credit.peer_credit(), 69);
    credit.rx_cnt = (u32::MAX - 10).wrapping_add(200);
    assert_eq!(credit.peer_credit(), 0, "more in flight than the buffer: no credit, not a huge one");
}

// ------------------------------------------------------------------ expiry

#[test]
fn a_connection_waits_on_the_guest_only_once_its_request_went_out() {
    let mut conn = Connection::new_local_init(MemStream::default(), LOCAL_PORT);
    assert_eq!(conn.expiry(), None, "the guest has not seen the REQUEST yet");
    assert_eq!(next_op(&mut conn), Some(Op::Request));
    assert_eq!(conn.expiry(), Some(Expiry::GuestResponse));
    recv(&mut conn, pkt(Op::Response));
    assert_eq!(conn.expiry(), None, "established and open both ways");
    conn.kill();
    assert_eq!(conn.expiry(), Some(Expiry::GuestResponse), "the guest must take our RST");
    assert_eq!(next_op(&mut conn), Some(Op::Rst));
    assert_eq!(conn.expiry(), None);
}

#[test]
fn a_half_closed_connection_is_watched_and_its_progress_counted() {
    let mut conn = established(4096);
    recv(&mut conn, data(b"abc"));
    assert_eq!((conn.expiry(), conn.bytes_moved()), (None, 3));
    recv(&mut conn, shutdown(SHUTDOWN_SEND));
    assert_eq!(conn.expiry(), Some(Expiry::HalfClosed));
    conn.stream.to_read.extend(b"de");
    conn.notify_readable();
    assert_eq!(next_op(&mut conn), Some(Op::Rw));
    assert_eq!(conn.bytes_moved(), 5, "host bytes read count as progress");
    let mut other = established(4096);
    other.stream.eof = true;
    other.notify_readable();
    let _ = next_op(&mut other);
    assert_eq!(other.expiry(), Some(Expiry::HalfClosed), "the host closing its side half-closes too");
}
