//! virtio-vsock (hybrid, Unix-socket backed) with a mock guest driver on one
//! side and real Unix sockets on the other, served by the real device-event
//! thread: host- and guest-initiated connections, data both ways, credit flow
//! control, shutdown, resets and hostile packets.

mod virtio_common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule_vmm::devices::virtio::device::{SharedDevice, VirtioDevice};
use capsule_vmm::devices::virtio::event_loop::DeviceEventLoop;
use capsule_vmm::devices::virtio::vsock::muxer::{CONNECT_LINE_TIMEOUT, CONN_TX_BUF_BYTES};
use capsule_vmm::devices::virtio::vsock::packet::{
    Header, Op, HEADER_BYTES, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use capsule_vmm::devices::virtio::vsock::{Vsock, VsockConfig, VIRTIO_ID_VSOCK};
use virtio_common::*;

const GUEST_CID: u64 = 3;
const RX_BUFFERS: u16 = 64;
const RX_BUF_BASE: u64 = 0x20_0000;
const RX_BUF_BYTES: u32 = 4096;
const TX_BUF_BASE: u64 = 0x80_0000;
const EV_BUF: u64 = 0xf0_0000;
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(150);

struct Guest<'a> {
    mem: &'a Mem,
    dev: Arc<Mutex<Vsock<Mem>>>,
    rx: Driver<'a>,
    tx: Driver<'a>,
    ev: Driver<'a>,
    rx_seen: u16,
    rx_addr: std::collections::HashMap<u32, u64>,
    tx_next: u64,
    uds: PathBuf,
    _events: DeviceEventLoop,
    _dir: tempfile::TempDir,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a Mem) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let dev = Arc::new(Mutex::new(
            Vsock::new(VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() }).expect("vsock device"),
        ));
        let mut rx = Driver::new(mem, 0x0);
        let tx = Driver::new(mem, 0x4000);
        let ev = Driver::new(mem, 0x8000);
        let mut rx_addr = std::collections::HashMap::new();
        for i in 0..u64::from(RX_BUFFERS) {
            let addr = RX_BUF_BASE + i * u64::from(RX_BUF_BYTES);
            let head = rx.add_chain(&[w(addr, RX_BUF_BYTES)]);
            rx_addr.insert(u32::from(head), addr);
        }
        {
            let mut d = dev.lock().expect("lock");
            let queues = vec![rx.queue(), tx.queue(), ev.queue()];
            activate(&mut *d, mem, queues);
        }
        let shared: SharedDevice<Mem> = dev.clone();
        let events = DeviceEventLoop::start(vec![shared]).expect("event loop");
        Self { mem, dev, rx, tx, ev, rx_seen: 0, rx_addr, tx_next: TX_BUF_BASE, uds, _events: events, _dir: dir }
    }

    /// Posts a raw TX chain and notifies the TX queue.
    fn send_raw(&mut self, descs: &[Desc]) {
        self.tx.add_chain(descs);
        self.dev.lock().expect("lock").queue_notify(1);
    }

    /// Sends a packet the way Linux does: header and payload in two descriptors.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let addr = self.tx_next;
        self.tx_next += 0x1_1000;
        write_bytes(self.mem, addr, &h.to_bytes());
        write_bytes(self.mem, addr + HEADER_BYTES as u64, payload);
        if payload.is_empty() {
            self.send_raw(&[r(addr, HEADER_BYTES as u32)]);
        } else {
            self.send_raw(&[r(addr, HEADER_BYTES as u32), r(addr + HEADER_BYTES as u64, payload.len() as u32)]);
        }
    }

    fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        while self.rx.used_idx() == self.rx_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rx.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let addr = self.rx_addr[&id];
        assert!(len as usize >= HEADER_BYTES, "RX packet of {len} bytes");
        let bytes = read_bytes(self.mem, addr, len as usize);
        let h = Header::from_bytes(bytes[..HEADER_BYTES].try_into().expect("header"));
        assert_eq!(h.len as usize, len as usize - HEADER_BYTES, "len matches used length");
        Some((h, bytes[HEADER_BYTES..].to_vec()))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(WAIT).expect("a packet on the RX queue")
    }

    fn recv_op(&mut self, op: Op) -> (Header, Vec<u8>) {
        let (h, p) = self.recv();
        assert_eq!(h.op, op as u16, "expected {op:?}, got header {h:?}");
        assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, GUEST_CID, TYPE_STREAM));
        (h, p)
    }

    fn assert_quiet(&mut self) {
        if let Some((h, _)) = self.try_recv(QUIET) {
            panic!("unexpected RX packet {h:?}");
        }
    }

    fn connections(&self) -> usize {
        self.dev.lock().expect("lock").connection_count()
    }

    fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }
}

fn pkt(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn rw(src_port: u32, dst_port: u32, len: usize) -> Header {
    Header { len: len as u32, ..pkt(Op::Rw, src_port, dst_port) }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("host read");
    buf
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF on host stream, got {other:?}"),
    }
}

/// Host connects with `CONNECT <port>`, guest accepts; returns (host stream, local port).
fn host_connect(g: &mut Guest, guest_port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(&g.uds).expect("connect uds");
    host.write_all(format!("CONNECT {guest_port}\n").as_bytes()).expect("CONNECT");
    let (req, _) = g.recv_op(Op::Request);
    assert_eq!(req.dst_port, guest_port);
    let local = req.src_port;
    g.send(pkt(Op::Response, guest_port, local), &[]);
    host.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut line = String::new();
    BufReader::new(&mut host).read_line(&mut line).expect("OK line");
    assert_eq!(line, format!("OK {local}\n"));
    (host, local)
}

/// Guest connects from `guest_port` to host port `port`; returns the accepted host stream.
fn guest_connect(g: &mut Guest, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
    g.send(pkt(Op::Request, guest_port, port), &[]);
    let (resp, _) = g.recv_op(Op::Response);
    assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
    assert_eq!(resp.buf_alloc, CONN_TX_BUF_BYTES);
    let (stream, _) = listener.accept().expect("accept guest connection");
    stream
}

#[test]
fn config_space_holds_guest_cid() {
    let mem = guest_memory();
    let g = Guest::new(&mem);
    let d = g.dev.lock().expect("lock");
    assert_eq!(d.device_type(), VIRTIO_ID_VSOCK);
    let mut cid = [0u8; 8];
    d.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
}

#[test]
fn host_initiated_connect_then_data_both_ways_then_guest_rst() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let (mut host, local) = host_connect(&mut g, 1234);
    assert!(local >= 1 << 30, "ephemeral local port {local}");
    assert_eq!(g.connections(), 1);

    host.write_all(b"ping from host").expect("host write");
    let (h, payload) = g.recv_op(Op::Rw);
    assert_eq!((h.src_port, h.dst_port), (local, 1234));
    assert_eq!(payload, b"ping from host");

    g.send(rw(1234, local, 14), b"pong from vm!!");
    assert_eq!(read_exact_timeout(&mut host, 14), b"pong from vm!!");

    g.send(pkt(Op::Rst, 1234, local), &[]);
    assert_eof(&mut host);
    assert_eq!(g.connections(), 0);
}

#[test]
fn second_host_connection_gets_a_different_local_port() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let (_a, pa) = host_connect(&mut g, 52);
    let (_b, pb) = host_connect(&mut g, 52);
    assert_ne!(pa, pb);
    assert_eq!(g.connections(), 2);
}

#[test]
fn malformed_connect_line_is_dropped() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut bad = UnixStream::connect(&g.uds).expect("connect");
    bad.write_all(b"HELLO there\n").expect("write");
    assert_eof(&mut bad);
    let mut long = UnixStream::connect(&g.uds).expect("connect");
    long.write_all(&[b'A'; 100]).expect("write");
    assert_eof(&mut long);
    g.assert_quiet();
    // The listener still works.
    host_connect(&mut g, 7);
}

#[test]
fn guest_initiated_connect_reaches_port_listener() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5000)).expect("bind port listener");
    let mut host = guest_connect(&mut g, &listener, 777, 5000);
    assert_eq!(g.connections(), 1);

    g.send(rw(777, 5000, 5), b"hello");
    assert_eq!(read_exact_timeout(&mut host, 5), b"hello");
    host.write_all(b"world").expect("host write");
    let (h, payload) = g.recv_op(Op::Rw);
    assert_eq!((h.src_port, h.dst_port), (5000, 777));
    assert_eq!(payload, b"world");

    // Host closes its side: the guest hears SHUTDOWN (host will send no more).
    drop(host);
    let (h, _) = g.recv_op(Op::Shutdown);
    assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.send(pkt(Op::Request, 778, 6000), &[]);
    let (h, _) = g.recv_op(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (6000, 778));
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_rst_tears_down_host_stream() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5001)).expect("bind");
    let mut host = guest_connect(&mut g, &listener, 900, 5001);
    g.send(pkt(Op::Rst, 900, 5001), &[]);
    assert_eof(&mut host);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_full_shutdown_closes_host_stream_and_gets_rst() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5002)).expect("bind");
    let mut host = guest_connect(&mut g, &listener, 901, 5002);
    g.send(rw(901, 5002, 3), b"bye");
    let shutdown = Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..pkt(Op::Shutdown, 901, 5002) };
    g.send(shutdown, &[]);
    assert_eq!(read_exact_timeout(&mut host, 3), b"bye", "data before shutdown is delivered");
    assert_eof(&mut host);
    let (h, _) = g.recv_op(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (5002, 901));
    assert_eq!(g.connections(), 0);
}

#[test]
fn host_to_guest_data_respects_guest_credit() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5003)).expect("bind");
    // The guest offers an 8-byte receive buffer.
    g.send(Header { buf_alloc: 8, ..pkt(Op::Request, 902, 5003) }, &[]);
    let _ = g.recv_op(Op::Response);
    let (mut host, _) = listener.accept().expect("accept");
    host.write_all(b"0123456789abcdefghij").expect("host write");

    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < 20 {
        let (h, payload) = g.recv();
        match Op::from_raw(h.op) {
            Some(Op::Rw) => {
                let in_flight = got.len() as u32 + payload.len() as u32 - fwd;
                assert!(in_flight <= 8, "device sent {in_flight} bytes past an 8-byte credit");
                got.extend_from_slice(&payload);
            }
            Some(Op::CreditRequest) => {
                // The guest consumed everything: announce it.
                fwd = got.len() as u32;
                g.send(Header { buf_alloc: 8, fwd_cnt: fwd, ..pkt(Op::CreditUpdate, 902, 5003) }, &[]);
            }
            other => panic!("unexpected op {other:?}"),
        }
    }
    assert_eq!(got, b"0123456789abcdefghij");
}

#[test]
fn credit_request_gets_credit_update_with_forwarded_count() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5004)).expect("bind");
    let mut host = guest_connect(&mut g, &listener, 903, 5004);
    g.send(rw(903, 5004, 10), b"0123456789");
    assert_eq!(read_exact_timeout(&mut host, 10), b"0123456789");
    g.send(pkt(Op::CreditRequest, 903, 5004), &[]);
    let (h, _) = g.recv_op(Op::CreditUpdate);
    assert_eq!(h.buf_alloc, CONN_TX_BUF_BYTES);
    assert_eq!(h.fwd_cnt, 10);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5005)).expect("bind");
    // The host never reads, so guest data piles up in the device.
    let host = guest_connect(&mut g, &listener, 904, 5005);
    host.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![0x5au8; 60 * 1024];
    let mut reset = false;
    for _ in 0..40 {
        g.send(rw(904, 5005, chunk.len()), &chunk);
        while let Some((h, _)) = g.try_recv(Duration::from_millis(5)) {
            match Op::from_raw(h.op) {
                Some(Op::CreditUpdate) => {} // the host socket buffer absorbed some
                Some(Op::Rst) => reset = true,
                other => panic!("only CREDIT_UPDATE or RST expected, got {other:?}"),
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "a guest sending past {CONN_TX_BUF_BYTES} buffered bytes must be reset");
    assert_eq!(g.connections(), 0);
}

#[test]
fn data_for_unknown_connection_gets_rst() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.send(rw(905, 4242, 3), b"abc");
    let (h, _) = g.recv_op(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (4242, 905));
}

#[test]
fn malformed_packets_are_dropped() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5006)).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let req = pkt(Op::Request, 906, 5006);
    let bad_headers = [
        Header { src_cid: 99, ..req }, // forged source CID
        Header { type_: 2, ..req },    // SEQPACKET: not offered
        Header { op: 0, ..req },       // VIRTIO_VSOCK_OP_INVALID
        Header { op: 99, ..req },      // unknown op
        Header { dst_cid: 77, ..req }, // not addressed to the host
    ];
    for h in bad_headers {
        g.send(h, &[]);
    }
    // RW whose len claims more than the descriptors hold.
    let addr = TX_BUF_BASE + 0x40_0000;
    write_bytes(&mem, addr, &rw(906, 5006, 100).to_bytes());
    g.send_raw(&[r(addr, HEADER_BYTES as u32), r(addr + 44, 10)]);
    // RW whose len exceeds the payload cap.
    write_bytes(&mem, addr, &rw(906, 5006, 1 << 20).to_bytes());
    g.send_raw(&[r(addr, HEADER_BYTES as u32)]);
    // Header shorter than 44 bytes.
    write_bytes(&mem, addr, &req.to_bytes());
    g.send_raw(&[r(addr, 20)]);
    // Writable TX descriptor.
    g.send_raw(&[w(addr, HEADER_BYTES as u32)]);
    // Descriptor outside guest memory.
    g.send_raw(&[r(MEM_BYTES as u64 - 10, HEADER_BYTES as u32)]);

    assert_eq!(g.tx.used_idx(), 10, "every TX chain is consumed");
    g.assert_quiet();
    assert_eq!(g.connections(), 0);
    assert!(listener.accept().is_err(), "no host connection from a malformed request");

    // The device is not wedged: a valid request still connects.
    listener.set_nonblocking(false).expect("blocking");
    guest_connect(&mut g, &listener, 906, 5006);
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let mem = guest_memory();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev: Vsock<Mem> =
        Vsock::new(VsockConfig { guest_cid: GUEST_CID, uds_path: dir.path().join("v.sock") }).expect("vsock");
    let mut rx = Driver::new(&mem, 0x0);
    let mut tx = Driver::new(&mem, 0x4000);
    let ev = Driver::new(&mem, 0x8000);
    rx.add_chain(&[r(RX_BUF_BASE, RX_BUF_BYTES)]); // read-only
    rx.add_chain(&[w(RX_BUF_BASE, 20)]); // shorter than a header
    let good = rx.add_chain(&[w(RX_BUF_BASE + 0x1000, RX_BUF_BYTES)]);
    activate(&mut dev, &mem, vec![rx.queue(), tx.queue(), ev.queue()]);
    write_bytes(&mem, TX_BUF_BASE, &pkt(Op::Request, 907, 6001).to_bytes());
    tx.add_chain(&[r(TX_BUF_BASE, HEADER_BYTES as u32)]);
    dev.queue_notify(1);
    assert_eq!(rx.used_idx(), 3);
    assert_eq!(rx.used(0).1, 0);
    assert_eq!(rx.used(1).1, 0);
    assert_eq!(rx.used(2), (u32::from(good), HEADER_BYTES as u32));
    let bytes = read_bytes(&mem, RX_BUF_BASE + 0x1000, HEADER_BYTES);
    let h = Header::from_bytes(bytes[..].try_into().expect("header"));
    assert_eq!(h.op, Op::Rst as u16);
}

#[test]
fn transport_reset_event_and_host_streams_closed() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let head = g.ev.add_chain(&[w(EV_BUF, 4)]);
    write_bytes(&mem, EV_BUF, &[0xff; 4]);
    let (mut host, _) = host_connect(&mut g, 88);
    g.dev.lock().expect("lock").send_transport_reset();
    assert_eq!(g.ev.used_idx(), 1);
    assert_eq!(g.ev.used(0), (u32::from(head), 4));
    assert_eq!(read_bytes(&mem, EV_BUF, 4), 0u32.to_le_bytes());
    assert_eof(&mut host);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_connect_to_full_listener_gets_rst_instead_of_blocking() {
    use std::os::fd::AsRawFd;
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = UnixListener::bind(g.port_path(5007)).expect("bind");
    // SAFETY: listen(2) on a socket fd we own; only the backlog changes.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "shrinking the backlog");
    // Nobody accepts: after the backlog fills, the device must answer RST
    // rather than block the vCPU thread in connect(2).
    for guest_port in 910..920 {
        g.send(pkt(Op::Request, guest_port, 5007), &[]);
        let (h, _) = g.recv();
        if h.op == Op::Rst as u16 {
            assert_eq!(h.dst_port, guest_port);
            return;
        }
        assert_eq!(h.op, Op::Response as u16);
    }
    panic!("10 connects to a listener with backlog 0 all succeeded");
}

#[test]
fn dropping_the_device_removes_its_socket_and_refuses_reserved_cids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let dev: Vsock<Mem> = Vsock::new(VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() }).expect("vsock");
    assert!(uds.exists());
    drop(dev);
    assert!(!uds.exists(), "socket file left behind");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let res = Vsock::<Mem>::new(VsockConfig { guest_cid: cid, uds_path: uds.clone() });
        assert!(res.is_err(), "CID {cid} accepted");
    }
}

#[test]
fn a_host_stream_that_never_sends_connect_is_closed_by_the_event_thread_after_the_timeout() {
    let mem = guest_memory();
    let g = Guest::new(&mem);
    let started = Instant::now();
    let mut silent = UnixStream::connect(&g.uds).expect("connect");
    silent.set_read_timeout(Some(CONNECT_LINE_TIMEOUT + WAIT)).expect("timeout");
    let mut b = [0u8; 16];
    let read = silent.read(&mut b);
    let waited = started.elapsed();
    assert!(matches!(read, Ok(0)), "expected EOF once the CONNECT line timed out, got {read:?}");
    assert!(waited >= CONNECT_LINE_TIMEOUT, "closed after {waited:?}, before the {CONNECT_LINE_TIMEOUT:?} timeout");
    assert_eq!(g.connections(), 0);
}
