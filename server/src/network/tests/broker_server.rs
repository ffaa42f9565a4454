//! The broker server over a real SEQPACKET pair, the test playing the worker: allowed
//! connections spliced to a TCP server of the test, refusals with their reasons (and kept for
//! the model), connect errors, filtered resolutions, malformed messages, the connection cap.
//!
//! Nothing here needs outside DNS or the internet: the test's upstream resolves a few
//! `*.example` names to TEST-NET addresses and connects every destination to the same port on
//! 127.0.0.1 (the policy decides on the TEST-NET address, the bytes go to the test's server).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_tool_schemas::NetworkMode;
use capsule_vmm::net::broker::{seqpacket_pair, BrokerError, BrokerToWorker, Family, WorkerToBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::network::broker_server::{
    BrokerLimits, Channel, NetBrokerError, NetworkBroker, Upstream, UpstreamFuture, MAX_REFUSALS_KEPT,
};
use crate::network::policy::{EffectivePolicy, NetworkPolicy};

const SANDBOX: &str = "sb-000000000001";
const WAIT: Duration = Duration::from_secs(5);

/// Resolves `*.test.example` names to TEST-NET addresses; connects to 127.0.0.1 on the
/// destination's port.
struct LoopbackUpstream;

impl Upstream for LoopbackUpstream {
    fn resolve(&self, name: String) -> UpstreamFuture<Result<Vec<IpAddr>, NetBrokerError>> {
        let ips = |texts: &[&str]| texts.iter().map(|t| t.parse().unwrap()).collect::<Vec<IpAddr>>();
        let answer = match name.as_str() {
            "files.test.example" => Ok(ips(&["192.0.2.10", "10.0.0.5", "2001:db8::10"])),
            "inner.test.example" => Ok(ips(&["10.0.0.5"])),
            _ => Err(NetBrokerError::NoSuchName { name }),
        };
        Box::pin(async move { answer })
    }

    fn connect(&self, dst: SocketAddr) -> UpstreamFuture<std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect((Ipv4Addr::LOCALHOST, dst.port())))
    }
}

fn policy(mode: NetworkMode, allow: &[&str]) -> EffectivePolicy {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    EffectivePolicy::from_ceiling(&NetworkPolicy::new(mode, &allow, &[]).expect("a valid policy"))
}

/// The policy the connecting tests run under: TEST-NET-1 by address, `*.test.example` by name.
fn test_net() -> EffectivePolicy {
    policy(NetworkMode::Allowlist, &["192.0.2.0/24", "*.test.example"])
}

/// A broker with `policy` attached for [`SANDBOX`], and the worker's end of its channel.
fn attached(policy: EffectivePolicy, limits: BrokerLimits) -> (NetworkBroker, Channel, OwnedFd) {
    let broker = NetworkBroker::with_upstream(Arc::new(LoopbackUpstream), limits, Vec::new());
    let (daemon, worker) = seqpacket_pair().unwrap();
    let raw = worker.try_clone().unwrap();
    broker.attach(SANDBOX, broker.egress(policy), daemon).unwrap();
    (broker, Channel::new(worker).unwrap(), raw)
}

async fn ask(worker: &Channel, message: WorkerToBroker) -> (BrokerToWorker, Option<OwnedFd>) {
    worker.send(&message, None).await.unwrap();
    answer(worker).await
}

async fn answer(worker: &Channel) -> (BrokerToWorker, Option<OwnedFd>) {
    tokio::time::timeout(WAIT, worker.receive::<BrokerToWorker>()).await.expect("an answer in time").unwrap()
}

fn connect(id: u64, dst: &str) -> WorkerToBroker {
    WorkerToBroker::Connect { id, dst: dst.parse().unwrap(), name: None, first_bytes: None }
}

fn resolve(id: u64, name: &str) -> WorkerToBroker {
    WorkerToBroker::Resolve { id, name: name.into(), family: Family::V4 }
}

/// A TCP server on 127.0.0.1 that echoes each connection until its client half-closes.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

fn stream(fd: Option<OwnedFd>) -> UnixStream {
    let stream = std::os::unix::net::UnixStream::from(fd.expect("a stream with Connected"));
    stream.set_nonblocking(true).unwrap();
    UnixStream::from_std(stream).unwrap()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_allowed_connection_is_a_stream_that_carries_bytes_both_ways_and_half_closes() {
    let port = echo_server().await;
    let (broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    let (message, fd) = ask(&worker, connect(1, &format!("192.0.2.10:{port}"))).await;
    assert_eq!(message, BrokerToWorker::Connected { id: 1 });
    let mut conn = stream(fd);
    conn.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, conn.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"ping");
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("upstream closes after our half-close")
        .unwrap();
    assert!(rest.is_empty());
    until("the connection is counted", || {
        broker.traffic(SANDBOX).is_some_and(|t| t.bytes_out == 4 && t.bytes_in == 4 && t.open_connections == 0)
    })
    .await;
    assert!(broker.take_refusals(SANDBOX).is_empty());
}

#[tokio::test]
async fn private_and_loopback_addresses_under_public_are_refused_with_the_reason_and_kept_for_the_model() {
    let (broker, worker, _raw) =
        attached(EffectivePolicy::from_ceiling(&NetworkPolicy::default()), BrokerLimits::default());
    let (message, fd) = ask(&worker, connect(7, "10.1.2.3:5432")).await;
    assert!(fd.is_none());
    let BrokerToWorker::Refused { id: 7, reason } = message else { panic!("refused: {message:?}") };
    assert!(reason.starts_with("refused TCP to 10.1.2.3:5432 ("), "{reason}");
    assert!(reason.contains("private") && reason.contains("policy is public"), "{reason}");
    let (message, _) = ask(&worker, connect(8, "127.0.0.1:22")).await;
    let BrokerToWorker::Refused { id: 8, reason: loopback } = message else { panic!("refused: {message:?}") };
    assert!(loopback.contains("loopback") && loopback.contains("no policy reaches it"), "{loopback}");
    assert_eq!(broker.take_refusals(SANDBOX), vec![reason, loopback]);
    assert!(broker.take_refusals(SANDBOX).is_empty(), "taken once");
}

#[tokio::test]
async fn a_closed_port_is_refused_fast_with_the_connect_error() {
    let port = {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let (broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    let started = Instant::now();
    let (message, _) = ask(&worker, connect(3, &format!("192.0.2.10:{port}"))).await;
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    let want = format!("connection refused by 192.0.2.10:{port}");
    assert_eq!(message, BrokerToWorker::Refused { id: 3, reason: want.clone() });
    assert_eq!(broker.take_refusals(SANDBOX), vec![want]);
}

#[tokio::test]
async fn resolutions_are_filtered_by_family_and_policy_and_private_answers_are_withheld() {
    let (broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    let (message, _) = ask(&worker, resolve(1, "files.test.example")).await;
    assert_eq!(message, BrokerToWorker::Resolved { id: 1, addrs: vec!["192.0.2.10".parse().unwrap()], ttl_s: 60 });

    let (message, _) = ask(&worker, resolve(2, "inner.test.example")).await;
    let BrokerToWorker::NotResolved { id: 2, nxdomain: false, reason } = message else { panic!("{message:?}") };
    assert!(reason.contains("withheld") && reason.contains("10.0.0.5"), "{reason}");

    let (message, _) = ask(&worker, resolve(3, "gone.test.example")).await;
    assert!(matches!(message, BrokerToWorker::NotResolved { id: 3, nxdomain: true, .. }), "{message:?}");

    let (message, _) = ask(&worker, resolve(4, "elsewhere.example")).await;
    let BrokerToWorker::NotResolved { id: 4, nxdomain: false, reason: off_list } = message else { panic!() };
    assert!(off_list.contains("is not on the sandbox's allowlist"), "{off_list}");

    let refusals = broker.take_refusals(SANDBOX);
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals[0].contains("withheld what inner.test.example resolved to"), "{refusals:?}");
    assert!(refusals[1].starts_with("refused to resolve elsewhere.example"), "{refusals:?}");
}

#[tokio::test]
async fn a_malformed_message_closes_the_channel() {
    let (broker, worker, raw) = attached(test_net(), BrokerLimits::default());
    let garbage = b"{not json";
    // SAFETY: write(2) of a buffer we own to a socket we own.
    let written = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&raw), garbage.as_ptr().cast(), garbage.len()) };
    assert_eq!(written, garbage.len() as isize);
    let closed = tokio::time::timeout(WAIT, worker.receive::<BrokerToWorker>()).await.expect("closed in time");
    assert!(matches!(closed, Err(BrokerError::Closed)), "{closed:?}");
    until("the broker stops serving", || !broker.is_serving(SANDBOX)).await;

    let (_broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    worker.send(&resolve(1, "not a name"), None).await.unwrap();
    let closed = tokio::time::timeout(WAIT, worker.receive::<BrokerToWorker>()).await.expect("closed in time");
    assert!(matches!(closed, Err(BrokerError::Closed)), "an invalid name closes it too: {closed:?}");
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_until_one_closes() {
    let port = echo_server().await;
    let limits = BrokerLimits { max_connections: 1, ..BrokerLimits::default() };
    let (broker, worker, _raw) = attached(test_net(), limits);
    let dst = format!("192.0.2.10:{port}");
    let (message, first) = ask(&worker, connect(1, &dst)).await;
    assert_eq!(message, BrokerToWorker::Connected { id: 1 });
    let (message, _) = ask(&worker, connect(2, &dst)).await;
    let BrokerToWorker::Refused { id: 2, reason } = message else { panic!("{message:?}") };
    assert!(reason.contains("1 connections open, the most it may"), "{reason}");

    let mut first = stream(first);
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, first.read_to_end(&mut rest)).await.unwrap().unwrap();
    drop(first);
    until("the first connection ends", || broker.traffic(SANDBOX).is_some_and(|t| t.open_connections == 0)).await;
    let (message, _) = ask(&worker, connect(3, &dst)).await;
    assert_eq!(message, BrokerToWorker::Connected { id: 3 });
}

#[tokio::test]
async fn blocked_reports_are_kept_bounded_with_repeats_folded() {
    let (broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    for _ in 0..3 {
        worker.send(&WorkerToBroker::Blocked { what: "UDP to 192.0.2.1:123".into() }, None).await.unwrap();
    }
    for i in 0..MAX_REFUSALS_KEPT + 4 {
        worker.send(&WorkerToBroker::Blocked { what: format!("ICMP echo {i}") }, None).await.unwrap();
    }
    // An answered request after them: the reports before it have been handled.
    let (message, _) = ask(&worker, resolve(1, "files.test.example")).await;
    assert!(matches!(message, BrokerToWorker::Resolved { .. }));
    let refusals = broker.take_refusals(SANDBOX);
    assert_eq!(refusals.len(), MAX_REFUSALS_KEPT + 1, "{refusals:?}");
    assert_eq!(refusals[0], "(5 earlier network refusals not shown)");
    assert_eq!(refusals.last().unwrap(), &format!("blocked ICMP echo {}", MAX_REFUSALS_KEPT + 3));

    let (broker, worker, _raw) = attached(test_net(), BrokerLimits::default());
    for _ in 0..3 {
        worker.send(&WorkerToBroker::Blocked { what: "UDP to 192.0.2.1:123".into() }, None).await.unwrap();
    }
    ask(&worker, resolve(1, "files.test.example")).await;
    assert_eq!(broker.take_refusals(SANDBOX), vec!["blocked UDP to 192.0.2.1:123 (3 times)"]);
}

#[tokio::test]
async fn a_detached_sandbox_has_its_channel_closed_and_its_refusals_forgotten() {
    let (broker, worker, _raw) = attached(policy(NetworkMode::None, &[]), BrokerLimits::default());
    let (message, _) = ask(&worker, connect(1, "192.0.2.10:80")).await;
    assert!(matches!(&message, BrokerToWorker::Refused { reason, .. } if reason.contains("no network")), "{message:?}");
    assert!(broker.is_serving(SANDBOX));
    broker.detach(SANDBOX);
    let closed = tokio::time::timeout(WAIT, worker.receive::<BrokerToWorker>()).await.expect("closed in time");
    assert!(matches!(closed, Err(BrokerError::Closed)), "{closed:?}");
    assert!(broker.take_refusals(SANDBOX).is_empty());
    assert!(broker.traffic(SANDBOX).is_none());
}
