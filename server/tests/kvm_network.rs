//! The sandbox network on real KVM with the built guest image, the test playing the daemon: it
//! connects to the machine's broker socket ([`Machine::network_socket`]) and answers the
//! worker's requests itself over `capsule_vmm::net::broker`. The guest resolves a name
//! (answered with a TEST-NET address), fetches a page from it (the test connects that address's
//! port to an HTTP server of its own on loopback and hands the worker the stream), sees a refused
//! connection reset at once, has no network at all before a daemon connects (fail closed), and
//! has it again after a pause to disk and resume (a new worker, a new socket, a new connection).
//! A fork listens on a socket of its own and is closed until its own daemon connects, while its
//! parent's network goes on.
//! Every request runs inside the confined worker, under its real seccomp filter.
//!
//! Skips only when /dev/kvm is unusable or no image is built (`capsule image build`).

#[path = "common/kvm.rs"]
mod kvm;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use capsule::engine::{Engine, Machine};
use capsule_agent::client::AgentClient;
use capsule_vmm::net::broker::{self, BrokerToWorker, WorkerToBroker};
use capsule_vmm::net::broker_socket;
use kvm::{engine, sh, sh_status, spec};

/// The name the guest looks up, and the TEST-NET-3 address the test answers with.
const WEB_NAME: &str = "web.example";
const WEB_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The port the guest fetches from (not 80/443: no first bytes are read before the request).
const WEB_PORT: u16 = 8080;
/// A port of the same address the test refuses.
const REFUSED_PORT: u16 = 9999;
const PAGE: &str = "hello from the test's web server";

/// An HTTP/1.0 server on loopback that answers every request with [`PAGE`].
fn web_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{PAGE}", PAGE.len());
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    addr
}

/// Copies bytes both ways between `a` and `b` until each side ends.
fn splice(a: UnixStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b2, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
}

/// Plays the daemon on the broker socket at `path`: `web.example` resolves to [`WEB_ADDR`],
/// other names do not exist; connects to [`WEB_ADDR`]:[`WEB_PORT`] go to `web`, every other
/// connect is refused. Every request is reported on the returned channel. Ends when the
/// channel to the worker closes.
fn fake_daemon(path: &Path, web: SocketAddr) -> Receiver<WorkerToBroker> {
    let worker = broker_socket::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    let (seen_tx, seen): (Sender<WorkerToBroker>, _) = channel();
    std::thread::spawn(move || loop {
        let Ok((message, _)) = broker::receive::<WorkerToBroker>(&worker) else {
            return;
        };
        let (answer, stream) = match &message {
            WorkerToBroker::Resolve { id, name, .. } if name == WEB_NAME => {
                (BrokerToWorker::Resolved { id: *id, addrs: vec![IpAddr::V4(WEB_ADDR)], ttl_s: 60 }, None)
            }
            WorkerToBroker::Resolve { id, .. } => {
                (BrokerToWorker::NotResolved { id: *id, nxdomain: true, reason: "no such name".into() }, None)
            }
            WorkerToBroker::Connect { id, dst, .. } if *dst == SocketAddr::from((WEB_ADDR, WEB_PORT)) => {
                let tcp = TcpStream::connect(web).unwrap();
                let (ours, theirs) = UnixStream::pair().unwrap();
                splice(ours, tcp);
                (BrokerToWorker::Connected { id: *id }, Some(OwnedFd::from(theirs)))
            }
            WorkerToBroker::Connect { id, .. } => {
                (BrokerToWorker::Refused { id: *id, reason: "the test refuses this port".into() }, None)
            }
            WorkerToBroker::Blocked { .. } => {
                let _ = seen_tx.send(message);
                continue;
            }
        };
        let _ = seen_tx.send(message);
        if broker::send(&worker, &answer, stream.as_ref()).is_err() {
            return;
        }
    });
    seen
}

/// Fetches `http://web.example:8080/` in the guest with Python; returns the body.
fn fetch_page(client: &AgentClient) -> String {
    let code = format!(
        "import urllib.request; print(urllib.request.urlopen('http://{WEB_NAME}:{WEB_PORT}/', timeout=10).read().decode())"
    );
    sh(client, &format!("python3 -c \"{code}\"")).trim().to_string()
}

/// Resolves and fetches through the daemon at the machine's socket; returns the requests seen.
fn resolve_and_fetch(machine: &dyn Machine, client: &AgentClient, web: SocketAddr) -> Vec<WorkerToBroker> {
    let socket = machine.network_socket().expect("a live machine has a broker socket");
    let seen = fake_daemon(&socket, web);
    let hosts = sh(client, &format!("getent hosts {WEB_NAME}"));
    assert!(hosts.contains(&WEB_ADDR.to_string()), "getent: {hosts}");
    let t = Instant::now();
    assert_eq!(fetch_page(client), PAGE);
    eprintln!("kvm network: fetch through the broker {:?}", t.elapsed());
    seen.try_iter().collect()
}

#[test]
fn a_guest_resolves_fetches_is_refused_fast_and_has_network_again_after_resume() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let web = web_server();
    let mut machine = engine.create(&spec("net-a")).expect("create");
    let client = machine.connect().expect("connect");
    let socket = machine.network_socket().expect("a live machine has a broker socket");
    assert_eq!(socket, root.path().join("net-a").join("net.sock"));
    assert_eq!(
        sh(&client, "cat /etc/resolv.conf").trim(),
        "nameserver 10.0.2.2",
        "the agent writes resolv.conf at boot (an image built before it does: run `capsule image build`)"
    );
    assert!(sh(&client, "cat /sys/class/net/lo/operstate /sys/class/net/eth0/operstate").contains("up"));

    // No daemon yet: the network is closed, and says so at once.
    let t = Instant::now();
    let (code, text) = sh_status(&client, &format!("getent hosts {WEB_NAME}"));
    assert_ne!(code, Some(0), "resolved without a broker: {text}");
    assert!(t.elapsed() < Duration::from_secs(5), "an unbrokered lookup took {:?}", t.elapsed());

    let seen = resolve_and_fetch(machine.as_ref(), &client, web);
    assert!(
        seen.iter().any(|m| matches!(m, WorkerToBroker::Connect { name: Some(name), .. } if name == WEB_NAME)),
        "the connect names what the guest resolved: {seen:?}"
    );

    // A refused connection: the handshake completes, then the guest is reset at once.
    let probe = format!(
        "import socket, time\n\
         t = time.monotonic()\n\
         try:\n    s = socket.create_connection(('{WEB_ADDR}', {REFUSED_PORT}), timeout=10)\n\
         \x20   got = s.recv(1)\n    what = 'eof' if not got else 'data'\n\
         except (ConnectionResetError, ConnectionRefusedError):\n    what = 'reset'\n\
         print(what, round(time.monotonic() - t, 3))"
    );
    let out = sh(&client, &format!("python3 -c \"{probe}\""));
    let mut words = out.split_whitespace();
    let (what, secs): (&str, f64) = (words.next().unwrap(), words.next().unwrap().parse().unwrap());
    eprintln!("kvm network: refused connection ended ({what}) after {secs} s");
    assert!(what == "reset" || what == "eof", "{out}");
    assert!(secs < 2.0, "the refusal took {secs} s");

    // Pause to disk and resume: a new worker listens on a new socket; the old channel is gone.
    machine.pause().expect("pause");
    assert_eq!(machine.network_socket(), None, "a machine paused to disk has no worker");
    let t = Instant::now();
    machine.resume().expect("resume");
    let client = machine.connect().expect("reconnect after resume");
    eprintln!("kvm network: resume + reconnect {:?}", t.elapsed());
    let seen = resolve_and_fetch(machine.as_ref(), &client, web);
    assert!(seen.iter().any(|m| matches!(m, WorkerToBroker::Connect { .. })), "{seen:?}");

    machine.kill().expect("kill");
}

#[test]
fn a_fork_listens_on_its_own_broker_socket_and_its_parent_keeps_its_network() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let web = web_server();
    let mut parent = engine.create(&spec("net-p")).expect("create");
    let parent_client = parent.connect().expect("connect");
    resolve_and_fetch(parent.as_ref(), &parent_client, web);

    let mut child = parent.fork(&spec("net-c")).expect("fork");
    let socket = child.network_socket().expect("a fork has a broker socket");
    assert_eq!(socket, root.path().join("net-c").join("net.sock"));
    let child_client = child.connect().expect("connect to the fork");
    // Without its own daemon the fork's network is closed, even though its parent's is open.
    let (code, text) = sh_status(&child_client, &format!("getent hosts {WEB_NAME}"));
    assert_ne!(code, Some(0), "the fork resolved without a broker: {text}");
    let seen = resolve_and_fetch(child.as_ref(), &child_client, web);
    assert!(seen.iter().any(|m| matches!(m, WorkerToBroker::Connect { .. })), "{seen:?}");

    // The parent ran on in its own worker: its broker channel still serves it.
    let parent_client = parent.connect().expect("reconnect to the parent");
    assert_eq!(fetch_page(&parent_client), PAGE);

    child.kill().expect("kill the fork");
    parent.kill().expect("kill the parent");
}
