//! The sandbox's user-space TCP/IP stack: the [`NetBackend`] behind the guest's virtio-net
//! device, built on smoltcp, that ends every guest connection inside the worker and asks an
//! [`Upstream`] (the daemon, through [`BrokerUpstream`]) for what leaves the sandbox.
//!
//! # The network the guest sees
//!
//! One IPv4 subnet, [`SANDBOX_NETWORK`] (10.0.2.0/24). The guest is [`GUEST_IP`] (10.0.2.15),
//! configured statically by the kernel's `ip=` argument with gateway and DNS [`GATEWAY_IP`]
//! (10.0.2.2). The stack answers ARP for the gateway with [`GATEWAY_MAC`], ICMP echo to the
//! gateway (smoltcp does), and DNS on [`RESOLVER_PORT`] (UDP 53) of the gateway. MTU
//! [`MTU_BYTES`]. No IPv6: AAAA queries get empty answers.
//!
//! # What happens to what the guest sends
//!
//! - **TCP, any address.** A SYN for a new (source, destination) makes a listening smoltcp
//!   socket on exactly that destination (any-IP mode) before smoltcp reads the frame, so the
//!   stack completes the handshake itself; then the upstream is asked (see [`tcp`]). The
//!   handshake is always completed first, on every port: on 80 and 443 the daemon needs the
//!   guest's first bytes (TLS SNI, HTTP Host; read for up to 2 s and [`MAX_FIRST_BYTES`]), and
//!   one path for every port keeps the state machine small. A refused connection is reset right
//!   after the handshake, so the guest sees `ECONNRESET` at once rather than SYN retries. The
//!   name the guest resolved the address from (through this resolver) goes with the request.
//!   Connections to the sandbox network itself, past [`MAX_CONNECTIONS`], or to non-unicast
//!   addresses are reset by smoltcp (no listener).
//! - **DNS** to the gateway: A queries are forwarded ([`resolver`]), answered with the
//!   addresses the upstream gave, NXDOMAIN, REFUSED or SERVFAIL.
//! - **Other UDP**: refused (smoltcp answers port unreachable), recorded and reported
//!   (`Blocked`). **ICMP echo** to anything but the gateway: dropped, recorded and reported.
//!
//! Every refusal goes into a bounded log ([`MAX_REFUSALS`] entries, e.g. "refused TCP to
//! 192.0.2.7:5432 (private address; …)"), read by [`NetStack::take_refusals`] or, once the stack
//! is inside the device, through the [`RefusalLog`] handle.
//!
//! # Driving it
//!
//! [`NetBackend::event_fd`] is the stack's own epoll ([`poller`]), readable while its timer
//! (smoltcp's next deadline and the stack's own), the upstream's descriptor, or a spliced
//! stream with room to move is ready. [`NetBackend::process_events`] and every
//! [`NetBackend::transmit`] run the stack: upstream answers, smoltcp's poll, each connection's
//! splice, the resolver, a second poll to send what that produced, and the timer re-armed.
//! Frames for the guest wait in a
//! [`BoundedFrameQueue`](crate::devices::virtio::net::BoundedFrameQueue); the device pulls them after each TX
//! burst and after each `process_events`, so the queue needs no wake-up of its own (a wake-up
//! while the guest has no RX buffer would only spin the event thread).
//!
//! # Bounds
//!
//! Per connection: two [`SOCKET_BUFFER_BYTES`] (64 KiB) buffers, nothing else (the splice reads
//! and writes straight between them and the stream; first bytes are peeked in place). At most
//! [`MAX_CONNECTIONS`] (256): worst case 32 MiB, plus the kernel's buffers of the streams.
//! With a few connections (8) open: about 1 MiB. Fixed: the DNS socket (2 × 16 × 1232 bytes),
//! 18 KiB of scratch, [`MAX_PENDING_QUERIES`] queries, [`resolver::MAX_NAME_ENTRIES`] names,
//! [`device::TO_GUEST_CAPACITY_FRAMES`] frames for the guest (384 KiB at MTU 1500) and
//! [`device::FROM_GUEST_CAPACITY_FRAMES`] the other way: under 1 MiB.
//!
//! # Wiring (done by `virtio_wiring` and the worker)
//!
//! 1. Before the worker is confined, bind and listen on the broker socket in the sandbox
//!    directory ([`broker_socket::listen`](crate::net::broker_socket::listen)), and make
//!    the upstream: `BrokerUpstream::listening(listener)`. (A worker spawned with one end of
//!    [`broker::seqpacket_pair`](crate::net::broker::seqpacket_pair) uses
//!    `BrokerUpstream::connected(end)`.) Until the daemon connects, everything is refused.
//! 2. `let stack = NetStack::new(Box::new(upstream))?;` keep `stack.refusal_log()` to report
//!    refusals, then `Net::new(NetConfig { mac }, Box::new(stack))` with a guest MAC other than
//!    [`GATEWAY_MAC`], and the kernel command line [`GUEST_KERNEL_IP_PARAM`]
//!    (`ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off`) plus `nameserver 10.0.2.2` in the guest's
//!    `/etc/resolv.conf`.
//! 3. Nothing else: the device-event loop waits on the stack's epoll through the device. The
//!    seccomp filter must allow `epoll_ctl`, `timerfd_settime`, `accept4` (listening upstream),
//!    `recvmsg`/`sendmsg`, `read`/`write`, `shutdown` on the streams.
//!
//! It never opens an internet socket, never blocks, and treats every frame as hostile.

mod broker_upstream;
pub mod device;
pub mod dns;
pub mod peek;
pub mod poller;
pub mod resolver;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod upstream;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::net::{BackendError, NetBackend};
use crate::net::first_bytes::MAX_FIRST_BYTES;
pub use broker_upstream::{BrokerUpstream, BrokerUpstreamError};
use peek::Peek;
use poller::{Poller, PollerError, UPSTREAM_TOKEN};
use resolver::{Resolver, ResolverError, MAX_PENDING_QUERIES};
use tcp::{Ctx, TcpTable};
pub use tcp::{MAX_CONNECTIONS, SOCKET_BUFFER_BYTES};
pub use upstream::{Answer, ConnectRequest, Upstream};

/// The gateway's address: the stack itself (router and resolver).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The gateway's MAC: locally administered, unicast.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0x00, 0x02, 0x02];
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the sandbox network.
pub const SANDBOX_PREFIX_LEN: u8 = 24;
/// The sandbox network, 10.0.2.0/24: nothing in it but the guest and the gateway.
pub const SANDBOX_NETWORK: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 0, 2, 0), SANDBOX_PREFIX_LEN);
/// The guest kernel's `ip=` argument for this network: [`GUEST_IP`], gateway [`GATEWAY_IP`],
/// the /24 of [`SANDBOX_NETWORK`], on `eth0` (the only NIC), no autoconfiguration protocol.
pub const GUEST_KERNEL_IP_PARAM: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
/// The resolver's UDP port on the gateway.
pub const RESOLVER_PORT: u16 = 53;
/// The IP MTU, in bytes.
pub const MTU_BYTES: usize = crate::devices::virtio::net::DEVICE_MTU as usize;
/// Refusals the log keeps (the oldest go first).
pub const MAX_REFUSALS: usize = 32;
/// Longest refusal text kept, in bytes.
const MAX_REFUSAL_BYTES: usize = 512;
/// `Blocked` reports sent to the upstream per minute at most (the log keeps them all).
const MAX_BLOCKED_REPORTS_PER_MINUTE: u32 = 60;

/// Why the stack could not be built.
#[derive(Debug, Error)]
pub enum StackError {
    /// The stack's epoll or timer.
    #[error("setting up the network stack's event descriptors failed")]
    Poller(#[from] PollerError),
    /// The resolver's socket.
    #[error("setting up the network stack's resolver failed")]
    Resolver(#[from] ResolverError),
    /// The interface rejected its address or route (a bug).
    #[error("configuring the network stack's interface failed: {0}")]
    Interface(&'static str),
}

/// The log of what the stack refused, shared between the stack and whoever reports it.
#[derive(Debug, Clone, Default)]
pub struct RefusalLog(Arc<Mutex<VecDeque<String>>>);

impl RefusalLog {
    /// Takes every refusal logged since the last take, oldest first.
    pub fn take(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }
}

/// The stack's side of the refusal log.
#[derive(Debug, Default)]
pub struct Refusals {
    log: RefusalLog,
}

impl Refusals {
    /// Logs `text` (cut to 512 bytes) unless it repeats the latest entry; false if it did.
    pub fn record(&mut self, mut text: String) -> bool {
        if text.len() > MAX_REFUSAL_BYTES {
            let mut cut = MAX_REFUSAL_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        tracing::info!(refusal = %text, "net stack: refused");
        let mut log = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
        if log.back() == Some(&text) {
            return false;
        }
        if log.len() >= MAX_REFUSALS {
            log.pop_front();
        }
        log.push_back(text);
        true
    }
}

/// Counts of what the stack holds, for tests and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    /// Guest TCP connections open.
    pub connections: usize,
    /// DNS queries waiting for the upstream.
    pub pending_queries: usize,
    /// Frames for the guest dropped because their queue was full.
    pub dropped_to_guest: u64,
}

/// The sandbox network stack (see the module doc).
pub struct NetStack {
    iface: Interface,
    device: device::FrameDevice,
    sockets: SocketSet<'static>,
    poller: Poller,
    upstream: Box<dyn Upstream>,
    tcp: TcpTable,
    resolver: Resolver,
    refusals: Refusals,
    epoch: Instant,
    next_id: u64,
    blocked_window: (Instant, u32),
    answers: Vec<Answer>,
}

impl NetStack {
    /// A stack whose traffic out of the sandbox goes through `upstream`.
    pub fn new(upstream: Box<dyn Upstream>) -> Result<Self, StackError> {
        let epoch = Instant::now();
        let mut device = device::FrameDevice::new();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = random_seed();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let mut pushed = Ok(());
        iface.update_ip_addrs(|addrs| {
            pushed = addrs.push(IpCidr::new(GATEWAY_IP.into(), SANDBOX_PREFIX_LEN)).map_err(|_| ());
        });
        pushed.map_err(|()| StackError::Interface("no room for the gateway's address"))?;
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_IP)
            .map_err(|_| StackError::Interface("no room for the default route"))?;
        // Every unicast destination routes through the gateway, which is us: any-IP takes them.
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let resolver = Resolver::new(&mut sockets, SocketAddrV4::new(GATEWAY_IP, RESOLVER_PORT).into())?;
        let poller = Poller::new()?;
        if let Some(fd) = upstream.event_fd() {
            poller.watch(fd, UPSTREAM_TOKEN, EventSet::IN)?;
        }
        Ok(Self {
            iface,
            device,
            sockets,
            poller,
            upstream,
            tcp: TcpTable::default(),
            resolver,
            refusals: Refusals::default(),
            epoch,
            next_id: 0,
            blocked_window: (epoch, 0),
            answers: Vec::new(),
        })
    }

    /// Takes every refusal logged since the last take, oldest first.
    pub fn take_refusals(&mut self) -> Vec<String> {
        self.refusals.log.take()
    }

    /// A handle on the refusal log that stays valid once the stack is inside the device.
    pub fn refusal_log(&self) -> RefusalLog {
        self.refusals.log.clone()
    }

    /// What the stack holds now.
    pub fn stats(&self) -> StackStats {
        StackStats {
            connections: self.tcp.len(),
            pending_queries: self.resolver.pending(),
            dropped_to_guest: self.device.dropped_to_guest(),
        }
    }

    /// Records `what` as refused and reports it to the upstream (rate-limited).
    fn block(&mut self, what: String) {
        if !self.refusals.record(what.clone()) {
            return;
        }
        let now = Instant::now();
        let (start, count) = &mut self.blocked_window;
        if now.duration_since(*start) >= Duration::from_secs(60) {
            (*start, *count) = (now, 0);
        }
        if *count < MAX_BLOCKED_REPORTS_PER_MINUTE {
            *count += 1;
            self.upstream.report_blocked(&what);
        }
    }

    /// Runs the stack once: answers, smoltcp, connections, resolver, timer.
    fn drive(&mut self) {
        let now = Instant::now();
        let stamp = smoltcp::time::Instant::from_micros(now.duration_since(self.epoch).as_micros() as i64);
        let mut answers = std::mem::take(&mut self.answers);
        self.upstream.take_answers(&mut answers);
        self.iface.poll(stamp, &mut self.device, &mut self.sockets);
        self.tcp.sweep_listeners(&mut self.sockets);
        answers.retain_mut(|answer| match answer {
            Answer::Resolved { id, addrs, ttl_s } => {
                self.resolver.resolved(&mut self.sockets, *id, addrs, *ttl_s, now);
                false
            }
            Answer::NotResolved { id, nxdomain, reason } => {
                self.resolver.not_resolved(&mut self.sockets, *id, *nxdomain, reason, &mut self.refusals);
                false
            }
            _ => true,
        });
        {
            let mut ctx = Ctx {
                sockets: &mut self.sockets,
                upstream: &mut *self.upstream,
                poller: &self.poller,
                refusals: &mut self.refusals,
                names: &self.resolver.names,
                now,
            };
            for answer in answers.drain(..) {
                match answer {
                    Answer::Connected { id, stream } => self.tcp.connected(id, stream, &mut ctx),
                    Answer::Refused { id, reason } => self.tcp.refused(id, &reason, &mut ctx),
                    Answer::Resolved { .. } | Answer::NotResolved { .. } => {}
                }
            }
            self.tcp.service(&mut ctx);
        }
        self.answers = answers;
        self.resolver.service(&mut self.sockets, &mut *self.upstream, &mut self.next_id, &mut self.refusals, now);
        self.iface.poll(stamp, &mut self.device, &mut self.sockets);
        self.tcp.remove_done(&mut self.sockets, &self.poller);
        let smoltcp_delay =
            self.iface.poll_delay(stamp, &self.sockets).map(|d| Duration::from_micros(d.total_micros()));
        let own_delay = [self.tcp.next_deadline(), self.resolver.next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .map(|deadline| deadline.saturating_duration_since(now));
        let delay = [smoltcp_delay, own_delay].into_iter().flatten().min();
        if let Err(e) = self.poller.arm(delay) {
            tracing::error!(error = %e, "net stack: could not arm its timer");
        }
    }
}

impl NetBackend for NetStack {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        match peek::peek(frame) {
            Peek::TcpSyn { src, dst } => {
                self.next_id += 1;
                self.tcp.on_syn((src, dst), self.next_id, &mut self.sockets, &mut self.refusals);
            }
            Peek::Udp { dst, .. } if dst != SocketAddrV4::new(GATEWAY_IP, RESOLVER_PORT) => {
                let ip = *dst.ip();
                if !(ip.is_broadcast() || ip.is_multicast() || ip == SANDBOX_NETWORK.broadcast().unwrap_or(ip)) {
                    self.block(format!(
                        "refused UDP to {dst} (only DNS to {GATEWAY_IP}:{RESOLVER_PORT} leaves the sandbox)"
                    ));
                }
            }
            Peek::IcmpEcho { dst } if dst != GATEWAY_IP => {
                self.block(format!("refused ICMP echo to {dst} (only the gateway {GATEWAY_IP} answers pings)"));
                return Ok(());
            }
            _ => {}
        }
        if !self.device.push_from_guest(frame) {
            return Err(BackendError::Full { capacity_frames: device::FROM_GUEST_CAPACITY_FRAMES });
        }
        self.drive();
        Ok(())
    }

    fn receive(&mut self) -> Option<Vec<u8>> {
        self.device.pop_to_guest()
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.poller.raw_fd())
    }

    fn process_events(&mut self) {
        self.drive();
    }
}

/// Fuzz entry point: cuts `data` into guest frames (each a 2-byte big-endian length, then the
/// bytes; frames of a shape the device would refuse are skipped) and feeds them to a fresh
/// stack with no broker, running it and draining its frames after each. Returns how many
/// frames the stack sent back. Used by `vmm/fuzz/fuzz_targets/stack_frames.rs` and the stable
/// smoke test `vmm/tests/virtio_fuzz_smoke.rs`.
pub fn fuzz_guest_frames(data: &[u8]) -> usize {
    let Ok(upstream) = BrokerUpstream::disconnected() else {
        return 0;
    };
    let Ok(mut stack) = NetStack::new(Box::new(upstream)) else {
        return 0;
    };
    let mut sent_back = 0;
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (frame, next) = tail.split_at(len);
        rest = next;
        if !(crate::devices::virtio::net::frame::MIN_FRAME_BYTES..=crate::devices::virtio::net::frame::MAX_FRAME_BYTES)
            .contains(&frame.len())
        {
            continue;
        }
        let _ = stack.transmit(frame);
        stack.process_events();
        while stack.receive().is_some() {
            sent_back += 1;
        }
    }
    sent_back
}

/// A seed for smoltcp (TCP initial sequence numbers, ports): from the process's random hasher
/// keys, so no two stacks share one.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(std::process::id().into());
    hasher.finish()
}

// Sizes the module doc promises.
const _: () = assert!(MAX_FIRST_BYTES <= SOCKET_BUFFER_BYTES);
const _: () = assert!(MAX_PENDING_QUERIES <= 256);
