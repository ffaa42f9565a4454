//! What a stuck or hostile agent can cost the host client: a peer on a real
//! socket pair that shakes hands correctly and then misbehaves (stops
//! reading, floods events, lies about sizes). The client must fail in
//! bounded time and memory, with errors that say why.

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsule_agent::client::{AgentClient, ClientError, ClientOptions, Incoming, MAX_COLLECTED_EVENT_BYTES};
use capsule_agent::frame::{read_frame, write_frame};
use capsule_agent::protocol::{
    AgentFrame, AgentMessage, ClientFrame, ClientMessage, Event, ExitStatus, HelloReply, Op, Reply, Request, Stream,
    PROTOCOL_VERSION,
};

const T: Option<Duration> = Some(Duration::from_secs(30));

/// A misbehaving agent: answers the handshake, then runs `behave` on its end.
fn hostile_agent(
    options: ClientOptions,
    behave: impl FnOnce(UnixStream) + Send + 'static,
) -> (AgentClient, JoinHandle<()>) {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        let hello: ClientFrame = read_frame(&mut guest).unwrap().expect("a Hello frame");
        assert!(matches!(hello.body, ClientMessage::Hello(_)));
        let reply = AgentFrame {
            id: 0,
            body: AgentMessage::Hello(HelloReply {
                version: PROTOCOL_VERSION,
                agent_version: "hostile".into(),
                capabilities: Vec::new(),
                pid1: false,
                containment: None,
            }),
        };
        write_frame(&mut guest, &reply).unwrap();
        behave(guest);
    });
    let (client, _) = AgentClient::handshake_with(host, "test", options).unwrap();
    (client, peer)
}

/// Reads the next request frame and returns its id.
fn next_request(guest: &mut UnixStream) -> Option<(u64, Op)> {
    loop {
        match read_frame::<ClientFrame, _>(guest).ok()?? {
            ClientFrame { id, body: ClientMessage::Request(Request { op, .. }) } => return Some((id, op)),
            _ => continue,
        }
    }
}

fn send(guest: &mut UnixStream, id: u64, body: AgentMessage) -> bool {
    write_frame(guest, &AgentFrame { id, body }).is_ok()
}

#[test]
fn an_agent_that_stops_reading_fails_writes_within_the_write_timeout() {
    let write_timeout = Duration::from_millis(500);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (c, peer) = hostile_agent(ClientOptions { write_timeout }, move |guest| {
        // Never read again; keep the socket open until the test is done.
        let _ = stop_rx.recv();
        drop(guest);
    });
    // A request that is pending when the connection dies.
    let (tx, rx) = mpsc::channel();
    c.start(Request { timeout_ms: None, op: Op::Ping }, Box::new(move |i| drop(tx.send(i)))).unwrap();

    let data = vec![0x5a; 32 * 1024 * 1024];
    let started = Instant::now();
    let result = c.write_file("/big", &data, None);
    let took = started.elapsed();
    assert!(took < write_timeout + Duration::from_secs(2), "write_file took {took:?}");
    match result {
        Err(ClientError::Disconnected(reason)) => {
            assert!(reason.contains("stopped reading for 500ms"), "{reason}")
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    match rx.recv_timeout(Duration::from_secs(1)) {
        Ok(Incoming::Disconnected(reason)) => {
            assert!(reason.contains("stopped reading"), "{reason}")
        }
        other => panic!("the pending request got {other:?}"),
    }
    // Later calls fail at once with the same reason.
    let started = Instant::now();
    match c.call_reply(Op::Ping, T) {
        Err(ClientError::Disconnected(reason)) => assert!(reason.contains("stopped reading")),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(c.closed_reason().is_some_and(|r| r.contains("stopped reading")));
    stop_tx.send(()).unwrap();
    peer.join().unwrap();
}

#[test]
fn call_stops_collecting_events_past_its_limit() {
    let chunk = 4 * 1024 * 1024;
    let chunks = MAX_COLLECTED_EVENT_BYTES / chunk + 4;
    let (c, peer) = hostile_agent(ClientOptions::default(), move |mut guest| {
        let (id, _) = next_request(&mut guest).unwrap();
        for _ in 0..chunks {
            let event = Event::Output { stream: Stream::Stdout, data: vec![b'y'; chunk] };
            if !send(&mut guest, id, AgentMessage::Event(event)) {
                return;
            }
        }
        send(&mut guest, id, AgentMessage::Done(Reply::Pong));
        // Drain the cancel (and anything else) until the client goes away.
        while next_request(&mut guest).is_some() {}
    });
    match c.call(Op::Ping, T) {
        Err(ClientError::TooLarge { limit_bytes, .. }) => {
            assert_eq!(limit_bytes, MAX_COLLECTED_EVENT_BYTES as u64)
        }
        Ok((events, _)) => panic!("collected {} events past the limit", events.len()),
        Err(other) => panic!("expected TooLarge, got {other:?}"),
    }
    drop(c);
    peer.join().unwrap();
}

#[test]
fn exec_keeps_at_most_the_cap_per_stream_whatever_the_agent_sends() {
    let (c, peer) = hostile_agent(ClientOptions::default(), move |mut guest| {
        let (id, op) = next_request(&mut guest).unwrap();
        let Op::Exec(req) = op else { panic!("{op:?}") };
        assert_eq!(req.output_cap_bytes, Some(10));
        for _ in 0..5 {
            let event = Event::Output { stream: Stream::Stdout, data: b"0123456789".to_vec() };
            send(&mut guest, id, AgentMessage::Event(event));
        }
        let event = Event::Output { stream: Stream::Stderr, data: b"err".to_vec() };
        send(&mut guest, id, AgentMessage::Event(event));
        let status = ExitStatus {
            code: Some(0),
            signal: None,
            duration_us: 1,
            timed_out: false,
            stdout_bytes: 50,
            stderr_bytes: 3,
            limit: None,
            escaped_killed: 0,
        };
        send(&mut guest, id, AgentMessage::Done(Reply::Exit(status)));
        while next_request(&mut guest).is_some() {}
    });
    let req = capsule_agent::protocol::ExecRequest {
        output_cap_bytes: Some(10),
        ..capsule_agent::protocol::ExecRequest::shell("yes")
    };
    let out = c.exec(req, T).unwrap();
    assert_eq!(out.stdout, b"0123456789");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.truncated, vec![(Stream::Stdout, String::new())]);
    drop(c);
    peer.join().unwrap();
}

#[test]
fn read_file_never_trusts_the_size_the_agent_claims() {
    let (c, peer) = hostile_agent(ClientOptions::default(), move |mut guest| {
        // First read: claims an enormous file.
        let (id, _) = next_request(&mut guest).unwrap();
        let reply = Reply::FileData { data: vec![1; 16], size: u64::MAX };
        send(&mut guest, id, AgentMessage::Done(reply));
        // Second read: claims a small file but never stops sending data.
        while let Some((id, _)) = next_request(&mut guest) {
            let reply = Reply::FileData { data: vec![2; 1024 * 1024], size: 2 * 1024 * 1024 };
            if !send(&mut guest, id, AgentMessage::Done(reply)) {
                return;
            }
        }
    });
    match c.read_file("/huge") {
        Err(ClientError::TooLarge { limit_bytes, .. }) => {
            assert_eq!(limit_bytes, capsule_agent::client::MAX_READ_FILE_BYTES)
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
    }
    match c.read_file_capped("/liar", 3 * 1024 * 1024) {
        // 2 MiB claimed: the client stops once it has that much.
        Ok(data) => assert_eq!(data.len(), 2 * 1024 * 1024),
        other => panic!("expected the claimed 2 MiB, got {:?}", other.map(|v| v.len())),
    }
    match c.read_file_capped("/liar", 1024 * 1024 + 1) {
        Err(ClientError::TooLarge { limit_bytes, .. }) => assert_eq!(limit_bytes, 1024 * 1024 + 1),
        other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
    }
    drop(c);
    peer.join().unwrap();
}
