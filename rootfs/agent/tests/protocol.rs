//! The server's protocol behaviour against the real agent binary: many
//! concurrent requests, cancellation, hostile input, and that one bad
//! connection never affects the others.

mod fixture;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsule_agent::client::{AgentClient, ClientError, Incoming};
use capsule_agent::frame::{read_frame, write_frame};
use capsule_agent::protocol::{
    AgentFrame, AgentMessage, ClientFrame, ClientMessage, ErrorKind, ExecRequest, Hello, Op, Reply, Request,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use fixture::{eventually, process_alive, start_foreground_sleep, TestAgent};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn hello(version: u32) -> ClientFrame {
    ClientFrame { id: 0, body: ClientMessage::Hello(Hello { version, client: "test".into() }) }
}

fn ping(id: u64) -> ClientFrame {
    ClientFrame { id, body: ClientMessage::Request(Request { timeout_ms: None, op: Op::Ping }) }
}

/// A raw connection that has shaken hands.
fn raw_handshaken(agent: &TestAgent) -> UnixStream {
    let mut s = agent.raw();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut s, &hello(PROTOCOL_VERSION)).unwrap();
    let reply: AgentFrame = read_frame(&mut s).unwrap().unwrap();
    assert!(matches!(reply.body, AgentMessage::Hello(ref h) if h.version == PROTOCOL_VERSION && !h.pid1));
    s
}

/// Reads frames until the agent closes the stream; returns them.
fn frames_until_closed(s: &mut UnixStream) -> Vec<AgentFrame> {
    let mut out = Vec::new();
    loop {
        match read_frame::<AgentFrame, _>(s) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return out,
            Err(e) => panic!("expected a clean close, got {e}"),
        }
    }
}

fn still_serves(agent: &TestAgent) {
    let c = agent.connect();
    assert_eq!(c.call_reply(Op::Ping, T).unwrap(), Reply::Pong);
}

#[test]
fn handshake_reports_version_and_capabilities() {
    let agent = TestAgent::start();
    let (_c, hello) = AgentClient::connect_unix(&agent.socket).unwrap();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(!hello.pid1);
    assert!(hello.capabilities.iter().any(|c| c == "exec"));
    assert!(hello.capabilities.iter().any(|c| c == "files"));
    assert!(!hello.capabilities.iter().any(|c| c == "clock-and-entropy"), "not as a host process");
}

#[test]
fn fifty_concurrent_requests_on_one_connection_get_their_own_answers() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let (tx, rx) = mpsc::channel();
    let mut ids = Vec::new();
    for i in 0..50u32 {
        // Later requests finish first: answers come back out of order.
        let req = ExecRequest::shell(&format!("sleep 0.{:02}; echo {i}", 50 - i));
        let tx = tx.clone();
        let mut out = Vec::new();
        let handle = c
            .start(
                Request { timeout_ms: Some(30_000), op: Op::Exec(req) },
                Box::new(move |incoming| match incoming {
                    Incoming::Event(capsule_agent::protocol::Event::Output { data, .. }) => {
                        out.extend_from_slice(&data)
                    }
                    Incoming::Done(Reply::Exit(s)) => drop(tx.send((i, s.code, std::mem::take(&mut out)))),
                    other => panic!("request {i}: unexpected {other:?}"),
                }),
            )
            .unwrap();
        ids.push(handle.id());
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let (i, code, out) = rx.recv_timeout(Duration::from_secs(30)).expect("all answered");
        assert_eq!(code, Some(0));
        assert_eq!(String::from_utf8(out).unwrap(), format!("{i}\n"), "request {i} got another's output");
        assert!(seen.insert(i));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 50);
}

#[test]
fn cancelling_a_long_sleep_fails_it_quickly_and_kills_it() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let (handle, rx, pid) = start_foreground_sleep(&agent, &c, "sleep.pid");
    assert!(process_alive(pid));
    let start = Instant::now();
    handle.cancel().unwrap();
    let incoming = rx.recv_timeout(Duration::from_secs(5)).expect("a final frame");
    assert!(matches!(incoming, Incoming::Failed(ref e) if e.kind == ErrorKind::Cancelled), "{incoming:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "cancel took {:?}", start.elapsed());
    assert!(eventually(Duration::from_secs(5), || !process_alive(pid)), "sleep {pid} survived the cancel");
}

#[test]
fn a_dropped_connection_cancels_its_requests_but_not_background_processes() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut bg = ExecRequest::shell("exec sleep 300");
    bg.background = true;
    let Reply::Started { pid: bg_pid } = c.call_reply(Op::Exec(bg), T).unwrap() else { panic!() };
    let (_handle, rx, fg_pid) = start_foreground_sleep(&agent, &c, "fg.pid");
    c.close();
    let incoming = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(incoming, Incoming::Disconnected(_)), "{incoming:?}");
    assert!(eventually(Duration::from_secs(5), || !process_alive(fg_pid)), "foreground survived its connection");
    assert!(process_alive(bg_pid), "background process died with the connection");
    let c2 = agent.connect();
    c2.call_reply(Op::Signal { pid: bg_pid, signal: 9 }, T).unwrap();
}

#[test]
fn malformed_frame_closes_only_that_connection() {
    let agent = TestAgent::start();
    let bystander = agent.connect();
    let mut s = raw_handshaken(&agent);
    s.write_all(&5u32.to_le_bytes()).unwrap();
    s.write_all(&[0xff; 5]).unwrap();
    assert!(frames_until_closed(&mut s).is_empty());
    assert_eq!(bystander.call_reply(Op::Ping, T).unwrap(), Reply::Pong);
    still_serves(&agent);
}

#[test]
fn oversized_frame_header_closes_the_connection_before_any_payload() {
    let agent = TestAgent::start();
    let mut s = raw_handshaken(&agent);
    s.write_all(&((MAX_FRAME_BYTES as u32) + 1).to_le_bytes()).unwrap();
    assert!(frames_until_closed(&mut s).is_empty());
    // Also before the handshake.
    let mut s = agent.raw();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    still_serves(&agent);
}

#[test]
fn duplicate_in_flight_id_fails_with_protocol_and_closes() {
    let agent = TestAgent::start();
    let mut s = raw_handshaken(&agent);
    let slow = ClientFrame {
        id: 7,
        body: ClientMessage::Request(Request { timeout_ms: None, op: Op::Exec(ExecRequest::shell("sleep 300")) }),
    };
    write_frame(&mut s, &slow).unwrap();
    write_frame(&mut s, &slow).unwrap();
    let frames = frames_until_closed(&mut s);
    assert!(
        frames
            .iter()
            .any(|f| f.id == 7 && matches!(f.body, AgentMessage::Failed(ref e) if e.kind == ErrorKind::Protocol)),
        "{frames:?}"
    );
    still_serves(&agent);
}

#[test]
fn wrong_version_or_missing_hello_fails_the_handshake() {
    let agent = TestAgent::start();
    let err = {
        let mut s = agent.raw();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write_frame(&mut s, &hello(PROTOCOL_VERSION + 1)).unwrap();
        frames_until_closed(&mut s)
    };
    assert!(
        matches!(&err[..], [AgentFrame { id: 0, body: AgentMessage::Failed(e) }] if e.kind == ErrorKind::Protocol),
        "{err:?}"
    );

    let mut s = agent.raw();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut s, &ping(1)).unwrap();
    let frames = frames_until_closed(&mut s);
    assert!(
        matches!(&frames[..], [AgentFrame { id: 1, body: AgentMessage::Failed(e) }] if e.kind == ErrorKind::Protocol),
        "{frames:?}"
    );
    still_serves(&agent);
}

#[test]
fn request_id_zero_and_a_second_hello_are_protocol_errors() {
    let agent = TestAgent::start();
    let mut s = raw_handshaken(&agent);
    write_frame(&mut s, &ping(0)).unwrap();
    let frames = frames_until_closed(&mut s);
    assert!(
        matches!(&frames[..], [AgentFrame { id: 0, body: AgentMessage::Failed(e) }] if e.kind == ErrorKind::Protocol),
        "{frames:?}"
    );
    let mut s = raw_handshaken(&agent);
    write_frame(&mut s, &hello(PROTOCOL_VERSION)).unwrap();
    let frames = frames_until_closed(&mut s);
    assert!(
        matches!(&frames[..], [AgentFrame { body: AgentMessage::Failed(e), .. }] if e.kind == ErrorKind::Protocol),
        "{frames:?}"
    );
    still_serves(&agent);
}

#[test]
fn client_reports_disconnection_to_pending_and_new_requests() {
    let mut agent = TestAgent::start();
    let c = agent.connect();
    let (tx, rx) = mpsc::channel();
    c.start(
        Request { timeout_ms: None, op: Op::Exec(ExecRequest::shell("sleep 300")) },
        Box::new(move |i| drop(tx.send(i))),
    )
    .unwrap();
    drop(std::mem::replace(&mut agent, TestAgent::start())); // kills the first agent
    let incoming = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(incoming, Incoming::Disconnected(_)), "{incoming:?}");
    assert!(eventually(Duration::from_secs(5), || c.closed_reason().is_some()));
    assert!(matches!(c.call_reply(Op::Ping, T), Err(ClientError::Disconnected(_))));
}

#[test]
fn hybrid_vsock_connect_preamble_is_spoken() {
    // A stand-in VMM socket: answers `CONNECT 1024` with `OK 1`, then splices to the agent.
    let agent = TestAgent::start();
    let vmm_path = agent.dir.path().join("vmm.sock");
    let listener = std::os::unix::net::UnixListener::bind(&vmm_path).unwrap();
    let agent_socket = agent.socket.clone();
    std::thread::spawn(move || {
        let (mut host, _) = listener.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            host.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        assert_eq!(line, b"CONNECT 1024\n");
        host.write_all(b"OK 1\n").unwrap();
        let guest = UnixStream::connect(agent_socket).unwrap();
        let (mut host_in, mut guest_out) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut host_in, &mut guest_out));
        let (mut guest_in, mut host_out) = (guest, host);
        let _ = std::io::copy(&mut guest_in, &mut host_out);
    });
    let (c, hello) = AgentClient::connect_hybrid_vsock(&vmm_path, 1024).unwrap();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(c.call_reply(Op::Ping, T).unwrap(), Reply::Pong);

    // A refusing VMM is a clear error.
    let bad_path = agent.dir.path().join("bad.sock");
    let bad = std::os::unix::net::UnixListener::bind(&bad_path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = bad.accept().unwrap();
        let _ = s.write_all(b"FAILURE\n");
    });
    let err = AgentClient::connect_hybrid_vsock(&bad_path, 1024).unwrap_err();
    assert!(matches!(err, ClientError::HybridVsock { port: 1024, .. }), "{err:?}");
}
