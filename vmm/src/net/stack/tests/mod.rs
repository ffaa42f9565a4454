//! The stack end to end, without KVM or any network but loopback: a smoltcp guest
//! ([`harness`]) in front of the stack, with a test double upstream ([`test_upstream`]) or the
//! real [`BrokerUpstream`] over a seqpacket pair with the test playing the daemon.

mod harness;
mod test_upstream;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use super::dns::{self, build_query, parse_answer_header, TYPE_A, TYPE_AAAA};
use super::{BrokerUpstream, NetStack, GATEWAY_IP, MAX_CONNECTIONS, RESOLVER_PORT};
use crate::devices::virtio::net::NetBackend;
use crate::net::broker::{self, BrokerToWorker, FirstBytes, WorkerToBroker};
use harness::{echo_server, readable, test_net, Net};
use test_upstream::{TestUpstream, TestUpstreamTable};

const SHORT: Duration = Duration::from_secs(5);

fn net_with_test_upstream() -> (Net, TestUpstreamTable) {
    let (upstream, table) = TestUpstream::new();
    (Net::new(NetStack::new(Box::new(upstream)).unwrap()), table)
}

/// Sends `data` on the guest socket `h` and reads until `want` bytes came back.
fn exchange(net: &mut Net, h: SocketHandle, data: &[u8], want: usize) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    let ok = net.run_until(Duration::from_secs(60), |net| {
        let socket = net.tcp(h);
        if sent < data.len() && socket.can_send() {
            sent += socket.send_slice(&data[sent..]).unwrap();
        }
        while socket.can_recv() {
            socket
                .recv(|buf| {
                    got.extend_from_slice(buf);
                    (buf.len(), ())
                })
                .unwrap();
        }
        got.len() >= want
    });
    assert!(ok, "only {} of {want} bytes came back ({sent} sent)", got.len());
    got
}

/// Sends a DNS query from the guest and returns the answer.
fn ask_dns(net: &mut Net, query: &[u8]) -> Option<Vec<u8>> {
    let h = net.udp(5353);
    net.udp_socket(h).send_slice(query, (GATEWAY_IP, RESOLVER_PORT)).unwrap();
    let mut answer = None;
    net.run_until(SHORT, |net| {
        let socket = net.udp_socket(h);
        if socket.can_recv() {
            answer = Some(socket.recv().unwrap().0.to_vec());
        }
        answer.is_some()
    });
    net.sockets.remove(h);
    answer
}

#[test]
fn a_guest_connection_reaches_a_loopback_echo_server_both_ways_and_closes() {
    let (mut net, table) = net_with_test_upstream();
    let dst = test_net(10, 7);
    table.lock().routes.insert(dst.into(), echo_server());
    let h = net.connect(dst, 64 * 1024);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Established));
    assert_eq!(exchange(&mut net, h, b"hello capsule", 13), b"hello capsule");
    assert_eq!(exchange(&mut net, h, b"and back", 8), b"and back");
    {
        let t = table.lock();
        assert_eq!(t.requests.len(), 1);
        assert_eq!((t.requests[0].dst, &t.requests[0].name, &t.requests[0].first_bytes), (dst.into(), &None, &None));
    }
    net.tcp(h).close();
    assert!(
        net.run_until(SHORT, |net| matches!(net.tcp(h).state(), State::TimeWait | State::Closed)
            && net.stack.stats().connections == 0),
        "the close crossed both ways: guest {}, stack {:?}",
        net.tcp(h).state(),
        net.stack.stats()
    );
    assert!(net.stack.take_refusals().is_empty());
    // Idle: nothing keeps the event fd readable (the device-event thread would spin).
    net.run_until(Duration::from_millis(50), |_| false);
    assert!(!readable(net.stack.event_fd().unwrap()), "an idle stack's event fd is not readable");
}

#[test]
fn a_refused_connection_is_reset_quickly_and_logged_with_its_reason() {
    let (mut net, table) = net_with_test_upstream();
    table.lock().refusal = "private address; this server's policy is public".into();
    let dst = test_net(55, 5432);
    let h = net.connect(dst, 4096);
    let started = Instant::now();
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Closed), "{}", net.tcp(h).state());
    assert!(started.elapsed() < Duration::from_secs(2), "reset in {:?}", started.elapsed());
    assert_eq!(
        net.stack.take_refusals(),
        vec!["refused TCP to 203.0.113.55:5432 (private address; this server's policy is public)".to_string()]
    );
    assert!(net.stack.take_refusals().is_empty(), "taken once");
    assert!(net.run_until(SHORT, |net| net.stack.stats().connections == 0));
}

#[test]
fn dns_answers_allowed_names_nxdomain_for_unknown_and_survives_malformed_queries() {
    let (mut net, table) = net_with_test_upstream();
    table.lock().names.insert("allowed.example".into(), vec![IpAddr::from([203, 0, 113, 20])]);

    let answer = ask_dns(&mut net, &build_query(0x1234, "Allowed.Example", TYPE_A)).expect("an answer");
    assert_eq!(parse_answer_header(&answer), Some((0x1234, dns::Rcode::NoError as u8)));
    assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 1, "one A record");
    assert_eq!(&answer[answer.len() - 4..], &[203, 0, 113, 20]);

    let answer = ask_dns(&mut net, &build_query(2, "unknown.example", TYPE_A)).expect("an answer");
    assert_eq!(parse_answer_header(&answer), Some((2, dns::Rcode::NxDomain as u8)));

    let answer = ask_dns(&mut net, &build_query(3, "allowed.example", TYPE_AAAA)).expect("an answer");
    assert_eq!(parse_answer_header(&answer), Some((3, dns::Rcode::NoError as u8)));
    assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 0, "no IPv6 in the sandbox");

    let mut compressed = build_query(4, "allowed.example", TYPE_A);
    compressed[12] = 0xc0;
    let answer = ask_dns(&mut net, &compressed).expect("FORMERR");
    assert_eq!(parse_answer_header(&answer), Some((4, dns::Rcode::FormErr as u8)));
    assert_eq!(ask_dns(&mut net, &[1, 2, 3]), None, "too short to answer: dropped");

    let answer = ask_dns(&mut net, &build_query(5, "allowed.example", TYPE_A)).expect("still answering");
    assert_eq!(parse_answer_header(&answer), Some((5, 0)));
}

#[test]
fn a_port_80_connection_carries_the_http_host_and_the_resolved_name() {
    let (mut net, table) = net_with_test_upstream();
    let dst = test_net(80, 80);
    {
        let mut t = table.lock();
        t.routes.insert(dst.into(), echo_server());
        t.names.insert("x.example".into(), vec![IpAddr::V4(*dst.ip())]);
    }
    let answer = ask_dns(&mut net, &build_query(9, "x.example", TYPE_A)).expect("an answer");
    assert_eq!(parse_answer_header(&answer), Some((9, 0)));

    let h = net.connect(dst, 16 * 1024);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Established));
    assert!(table.lock().requests.is_empty(), "on port 80 the stack waits for the first bytes");
    let request = b"GET / HTTP/1.1\r\nHost: x.example\r\nAccept: */*\r\n\r\n";
    assert_eq!(exchange(&mut net, h, request, request.len()), request);
    let t = table.lock();
    assert_eq!(t.requests.len(), 1);
    assert_eq!(t.requests[0].first_bytes, Some(FirstBytes::HttpHost("x.example".into())));
    assert_eq!(t.requests[0].name.as_deref(), Some("x.example"));
}

#[test]
fn connections_past_the_limit_are_refused_without_harm() {
    let (mut net, table) = net_with_test_upstream();
    table.lock().hold = true;
    let extra = 4;
    let handles: Vec<SocketHandle> =
        (0..MAX_CONNECTIONS + extra).map(|i| net.connect(test_net(100, 9000 + i as u16), 1024)).collect();
    let settled = net.run_until(Duration::from_secs(20), |net| {
        let established = handles.iter().filter(|h| net.tcp(**h).state() == State::Established).count();
        let closed = handles.iter().filter(|h| net.tcp(**h).state() == State::Closed).count();
        established == MAX_CONNECTIONS && closed == extra
    });
    assert!(settled, "{:?}", net.stack.stats());
    assert_eq!(net.stack.stats().connections, MAX_CONNECTIONS);
    let refusals = net.stack.take_refusals();
    assert!(refusals.iter().any(|r| r.contains("connections open")), "{refusals:?}");
    assert!(refusals.len() <= super::MAX_REFUSALS);
}

#[test]
fn other_udp_is_refused_and_reported() {
    let (mut net, table) = net_with_test_upstream();
    let h = net.udp(123);
    net.udp_socket(h).send_slice(b"time?", (test_net(1, 123).ip().to_owned(), 123)).unwrap();
    net.run_until(Duration::from_millis(200), |_| false);
    let refusals = net.stack.take_refusals();
    assert_eq!(refusals, vec!["refused UDP to 203.0.113.1:123 (only DNS to 10.0.2.2:53 leaves the sandbox)"]);
    assert_eq!(table.lock().blocked, refusals);
}

/// Plays the daemon on `daemon`: answers `Resolve` for svc.example and connects every `Connect`
/// to an echo stream; sends each request it got on `seen`.
fn fake_daemon(daemon: OwnedFd, seen: std::sync::mpsc::Sender<WorkerToBroker>) {
    std::thread::spawn(move || loop {
        let Ok((message, _)) = broker::receive::<WorkerToBroker>(&daemon) else { return };
        let reply = match &message {
            WorkerToBroker::Resolve { id, name, .. } if name == "svc.example" => {
                BrokerToWorker::Resolved { id: *id, addrs: vec![IpAddr::from([203, 0, 113, 9])], ttl_s: 60 }
            }
            WorkerToBroker::Resolve { id, .. } => {
                BrokerToWorker::NotResolved { id: *id, nxdomain: true, reason: "no such name".into() }
            }
            WorkerToBroker::Connect { id, .. } => {
                let (ours, theirs) = UnixStream::pair().unwrap();
                std::thread::spawn(move || {
                    let mut ours = ours;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = ours.read(&mut buf) {
                        if n == 0 || ours.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                broker::send(&daemon, &BrokerToWorker::Connected { id: *id }, Some(&OwnedFd::from(theirs))).unwrap();
                let _ = seen.send(message);
                continue;
            }
            WorkerToBroker::Blocked { .. } => continue,
        };
        broker::send(&daemon, &reply, None).unwrap();
        let _ = seen.send(message);
    });
}

#[test]
fn the_broker_upstream_resolves_and_connects_through_a_fake_daemon() {
    let (daemon, worker) = broker::seqpacket_pair().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    fake_daemon(daemon, seen_tx);
    let mut net = Net::new(NetStack::new(Box::new(BrokerUpstream::connected(worker).unwrap())).unwrap());

    let answer = ask_dns(&mut net, &build_query(1, "svc.example", TYPE_A)).expect("an answer");
    assert_eq!(&answer[answer.len() - 4..], &[203, 0, 113, 9]);
    let dst = test_net(9, 8080);
    let h = net.connect(dst, 16 * 1024);
    assert_eq!(exchange(&mut net, h, b"ping", 4), b"ping");

    assert!(matches!(seen.recv().unwrap(), WorkerToBroker::Resolve { name, .. } if name == "svc.example"));
    match seen.recv().unwrap() {
        WorkerToBroker::Connect { dst: got, name, first_bytes, .. } => {
            assert_eq!(got, SocketAddr::from(dst));
            assert_eq!(name.as_deref(), Some("svc.example"));
            assert_eq!(first_bytes, None);
        }
        other => panic!("expected a Connect, got {other:?}"),
    }
}

#[test]
fn without_a_broker_everything_is_refused() {
    let mut net = Net::new(NetStack::new(Box::new(BrokerUpstream::disconnected().unwrap())).unwrap());
    let h = net.connect(test_net(3, 22), 4096);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Closed));
    let answer = ask_dns(&mut net, &build_query(1, "svc.example", TYPE_A)).expect("an answer");
    assert_eq!(parse_answer_header(&answer), Some((1, dns::Rcode::Refused as u8)));
    let refusals = net.stack.take_refusals();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals.iter().all(|r| r.contains("no network broker is connected")), "{refusals:?}");
}

#[test]
fn a_daemon_that_goes_away_leaves_waiting_connections_refused() {
    let (daemon, worker) = broker::seqpacket_pair().unwrap();
    let mut net = Net::new(NetStack::new(Box::new(BrokerUpstream::connected(worker).unwrap())).unwrap());
    let h = net.connect(test_net(4, 22), 4096);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Established));
    let (message, _) = broker::receive::<WorkerToBroker>(&daemon).unwrap();
    assert!(matches!(message, WorkerToBroker::Connect { .. }));
    drop(daemon);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Closed));
    assert!(net.stack.take_refusals()[0].contains("went away"));
}

#[test]
fn a_mebibyte_crosses_both_ways() {
    let (mut net, table) = net_with_test_upstream();
    let dst = test_net(11, 9);
    table.lock().routes.insert(dst.into(), echo_server());
    let h = net.connect(dst, 64 * 1024);
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let got = exchange(&mut net, h, &data, data.len());
    assert!(got == data, "the echoed bytes differ");
}

/// An ICMP echo request from the guest to `dst`, as an Ethernet frame to the gateway.
fn echo_request(dst: std::net::Ipv4Addr) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol,
        Ipv4Packet, Ipv4Repr,
    };
    let icmp = Icmpv4Repr::EchoRequest { ident: 1, seq_no: 1, data: b"ping" };
    let ip = Ipv4Repr {
        src_addr: super::GUEST_IP,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress([0x02, 0, 0, 0, 0, 0x15]),
        dst_addr: EthernetAddress(super::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut ethernet = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut ethernet);
    let mut packet = Ipv4Packet::new_unchecked(ethernet.payload_mut());
    ip.emit(&mut packet, &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(packet.payload_mut()), &caps);
    frame
}

#[test]
fn pings_are_answered_by_the_gateway_and_refused_elsewhere() {
    let (mut net, table) = net_with_test_upstream();
    // A DNS exchange first: the stack learns the guest's MAC from its ARP request.
    assert!(ask_dns(&mut net, &build_query(1, "unknown.example", TYPE_A)).is_some());
    net.stack.transmit(&echo_request(GATEWAY_IP)).unwrap();
    let reply = net.stack.receive().expect("the gateway answers");
    let eth = smoltcp::wire::EthernetFrame::new_checked(&reply[..]).unwrap();
    let ip = smoltcp::wire::Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.next_header()), (GATEWAY_IP, smoltcp::wire::IpProtocol::Icmp));
    assert_eq!(ip.payload()[0], 0, "an echo reply");

    let elsewhere = *test_net(1, 0).ip();
    net.stack.transmit(&echo_request(elsewhere)).unwrap();
    assert!(net.stack.receive().is_none(), "nobody answers for the world");
    let refusals = net.stack.take_refusals();
    assert_eq!(refusals, vec!["refused ICMP echo to 203.0.113.1 (only the gateway 10.0.2.2 answers pings)"]);
    assert_eq!(table.lock().blocked, refusals);
}

#[test]
fn a_silent_guest_on_port_443_is_asked_for_as_unrecognized_after_the_timeout() {
    let (mut net, table) = net_with_test_upstream();
    table.lock().hold = true;
    let h = net.connect(test_net(43, 443), 4096);
    assert!(net.run_until(SHORT, |net| net.tcp(h).state() == State::Established));
    let started = Instant::now();
    assert!(net.run_until(SHORT, |_| !table.lock().requests.is_empty()));
    assert!(started.elapsed() >= super::tcp::FIRST_BYTES_TIMEOUT - Duration::from_millis(100));
    assert_eq!(table.lock().requests[0].first_bytes, Some(FirstBytes::Unrecognized));
}

/// A `SOCK_SEQPACKET` socket bound and listening at `path` (what the worker makes), or
/// connected to it (what the daemon does).
fn seqpacket_at(path: &std::path::Path, listen: bool) -> OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below, within bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) makes a new descriptor, owned right after.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: socket just returned it and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let ptr = (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>();
    use std::os::fd::AsRawFd;
    // SAFETY: bind/listen/connect read `addr`, which lives across the calls.
    let ok = unsafe {
        if listen {
            libc::bind(fd.as_raw_fd(), ptr, len) == 0 && libc::listen(fd.as_raw_fd(), 4) == 0
        } else {
            libc::connect(fd.as_raw_fd(), ptr, len) == 0
        }
    };
    assert!(ok, "{}", std::io::Error::last_os_error());
    fd
}

#[test]
fn a_listening_broker_upstream_refuses_until_the_daemon_connects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.sock");
    let upstream = BrokerUpstream::listening(seqpacket_at(&path, true)).unwrap();
    let mut net = Net::new(NetStack::new(Box::new(upstream)).unwrap());
    let before = net.connect(test_net(5, 22), 4096);
    assert!(net.run_until(SHORT, |net| net.tcp(before).state() == State::Closed));
    assert!(net.stack.take_refusals()[0].contains("no network broker is connected"));

    let (seen_tx, seen) = std::sync::mpsc::channel();
    fake_daemon(seqpacket_at(&path, false), seen_tx);
    let after = net.connect(test_net(9, 22), 4096);
    assert_eq!(exchange(&mut net, after, b"hi", 2), b"hi");
    assert!(matches!(seen.recv().unwrap(), WorkerToBroker::Connect { .. }));
}

#[test]
fn the_kernel_ip_param_names_the_guest_gateway_and_subnet() {
    let mask = u32::MAX << (32 - super::SANDBOX_PREFIX_LEN);
    let want = format!("ip={}::{}:{}::eth0:off", super::GUEST_IP, GATEWAY_IP, std::net::Ipv4Addr::from(mask));
    assert_eq!(super::GUEST_KERNEL_IP_PARAM, want);
}
