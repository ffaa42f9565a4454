//! The sandbox's resolver: a UDP socket on the gateway's port 53 that reads the guest's
//! queries ([`super::dns`]), asks the [`Upstream`] for A records, and answers; and the map of
//! the answers it gave (address → name, [`NameMap`]) so that a later connection can tell the
//! daemon which name the guest meant.
//!
//! Bounds: at most [`MAX_PENDING_QUERIES`] queries wait for the upstream (past that, and past
//! [`QUERY_TIMEOUT`], the guest gets SERVFAIL); the name map keeps at most [`MAX_NAME_ENTRIES`].
//! The sandbox has no IPv6, so AAAA (and every other type) is answered at once with no records,
//! never forwarded. It never opens a socket of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::udp;
use smoltcp::wire::IpEndpoint;
use thiserror::Error;

use super::dns::{self, Query, Rcode, MAX_DNS_ANSWER_BYTES, MAX_DNS_QUERY_BYTES, TYPE_A};
use super::upstream::Upstream;
use super::Refusals;
use crate::net::broker::Family;

/// Queries waiting for the upstream at most.
pub const MAX_PENDING_QUERIES: usize = 64;
/// How long a query waits for the upstream before the guest gets SERVFAIL.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Addresses the name map remembers at most.
pub const MAX_NAME_ENTRIES: usize = 1024;
/// Shortest time an answer is remembered, whatever its TTL (a guest connects right after).
const MIN_NAME_TTL: Duration = Duration::from_secs(30);
/// Longest TTL passed to the guest, in seconds.
const MAX_TTL_S: u32 = 24 * 3600;
/// Datagrams each way the DNS socket holds.
const SOCKET_DATAGRAMS: usize = 16;

/// Why the resolver's socket could not be made.
#[derive(Debug, Error)]
pub enum ResolverError {
    /// Binding the UDP socket to the gateway's port 53 failed.
    #[error("binding the resolver's socket failed: {0}")]
    Bind(udp::BindError),
}

/// Which name each address the resolver gave came from, for a while.
#[derive(Debug, Default)]
pub struct NameMap {
    entries: HashMap<IpAddr, (String, Instant)>,
}

impl NameMap {
    /// Remembers that `name` resolved to `addr`, until `ttl` has passed (at least
    /// [`MIN_NAME_TTL`]). When full, expired entries go first, then the one expiring soonest.
    pub fn insert(&mut self, addr: IpAddr, name: &str, ttl: Duration, now: Instant) {
        if self.entries.len() >= MAX_NAME_ENTRIES && !self.entries.contains_key(&addr) {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= MAX_NAME_ENTRIES {
                if let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, until))| *until).map(|(a, _)| *a) {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(addr, (name.to_owned(), now + ttl.max(MIN_NAME_TTL)));
    }

    /// The name `addr` came from, if it is remembered and not expired.
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Option<String> {
        self.entries.get(&addr).filter(|(_, until)| *until > now).map(|(name, _)| name.clone())
    }

    /// Addresses remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A query waiting for the upstream.
struct Pending {
    query: Query,
    guest: IpEndpoint,
    deadline: Instant,
}

/// The resolver's socket, its waiting queries and its name map.
pub struct Resolver {
    handle: SocketHandle,
    pending: HashMap<u64, Pending>,
    /// Answers given, by address.
    pub names: NameMap,
}

impl Resolver {
    /// Adds the resolver's UDP socket, bound to `endpoint`, to `sockets`.
    pub fn new(sockets: &mut SocketSet<'static>, endpoint: IpEndpoint) -> Result<Self, ResolverError> {
        let buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; SOCKET_DATAGRAMS],
                vec![0u8; SOCKET_DATAGRAMS * MAX_DNS_QUERY_BYTES],
            )
        };
        let mut socket = udp::Socket::new(buffer(), buffer());
        socket.bind(endpoint).map_err(ResolverError::Bind)?;
        Ok(Self { handle: sockets.add(socket), pending: HashMap::new(), names: NameMap::default() })
    }

    /// Queries waiting for the upstream.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The earliest time a waiting query times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Reads the guest's queries, forwards or answers them, and answers those that timed out.
    pub fn service(
        &mut self,
        sockets: &mut SocketSet<'static>,
        upstream: &mut dyn Upstream,
        next_id: &mut u64,
        refusals: &mut Refusals,
        now: Instant,
    ) {
        let socket = sockets.get_mut::<udp::Socket>(self.handle);
        let mut datagram = vec![0u8; MAX_DNS_QUERY_BYTES];
        while socket.can_recv() {
            let (len, meta) = match socket.recv_slice(&mut datagram) {
                Ok(got) => got,
                // Longer than any query: dropped.
                Err(udp::RecvError::Truncated) => continue,
                Err(udp::RecvError::Exhausted) => break,
            };
            let guest = meta.endpoint;
            let query = match dns::parse_query(&datagram[..len]) {
                Ok(query) => query,
                Err(e) => {
                    if let Some(reply) = e.rcode().and_then(|rcode| dns::error_reply(&datagram[..len], rcode)) {
                        send(socket, &reply, guest);
                    }
                    continue;
                }
            };
            if query.qtype != TYPE_A {
                // No IPv6 in the sandbox, and no other record types: an empty answer.
                send(socket, &dns::answer(&query, Rcode::NoError, &[], 0), guest);
                continue;
            }
            if self.pending.len() >= MAX_PENDING_QUERIES {
                send(socket, &dns::answer(&query, Rcode::ServFail, &[], 0), guest);
                continue;
            }
            *next_id += 1;
            match upstream.resolve(*next_id, &query.name, Family::V4) {
                Ok(()) => {
                    self.pending.insert(*next_id, Pending { query, guest, deadline: now + QUERY_TIMEOUT });
                }
                Err(reason) => {
                    refusals.record(format!("refused DNS name {} ({reason})", query.name));
                    send(socket, &dns::answer(&query, Rcode::Refused, &[], 0), guest);
                }
            }
        }
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                send(socket, &dns::answer(&p.query, Rcode::ServFail, &[], 0), p.guest);
            }
        }
    }

    /// Answers the query `id` with `addrs` (the upstream's `Resolved`). False when no query of
    /// that id waits.
    pub fn resolved(
        &mut self,
        sockets: &mut SocketSet<'static>,
        id: u64,
        addrs: &[IpAddr],
        ttl_s: u32,
        now: Instant,
    ) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        let ttl_s = ttl_s.min(MAX_TTL_S);
        let v4: Vec<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv4).collect();
        for addr in &v4 {
            self.names.insert(*addr, &p.query.name, Duration::from_secs(ttl_s.into()), now);
        }
        let rcode = Rcode::NoError;
        let reply = dns::answer(&p.query, rcode, &v4, ttl_s);
        debug_assert!(reply.len() <= MAX_DNS_ANSWER_BYTES);
        send(sockets.get_mut::<udp::Socket>(self.handle), &reply, p.guest);
        true
    }

    /// Answers the query `id` with NXDOMAIN (`nxdomain`) or REFUSED (the upstream's
    /// `NotResolved`); a refusal is recorded. False when no query of that id waits.
    pub fn not_resolved(
        &mut self,
        sockets: &mut SocketSet<'static>,
        id: u64,
        nxdomain: bool,
        reason: &str,
        refusals: &mut Refusals,
    ) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        let rcode = if nxdomain {
            Rcode::NxDomain
        } else {
            refusals.record(format!("refused DNS name {} ({reason})", p.query.name));
            Rcode::Refused
        };
        send(sockets.get_mut::<udp::Socket>(self.handle), &dns::answer(&p.query, rcode, &[], 0), p.guest);
        true
    }
}

/// Queues `reply` to `guest`; a full socket drops it (the guest asks again).
fn send(socket: &mut udp::Socket<'static>, reply: &[u8], guest: IpEndpoint) {
    if let Err(e) = socket.send_slice(reply, guest) {
        tracing::debug!(error = %e, "net stack: DNS answer dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_map_is_bounded_and_forgets_expired_answers() {
        let now = Instant::now();
        let mut names = NameMap::default();
        for i in 0..(MAX_NAME_ENTRIES as u32 + 10) {
            names.insert(IpAddr::from(i.to_be_bytes()), "a.example", Duration::from_secs(60 + u64::from(i)), now);
        }
        assert_eq!(names.len(), MAX_NAME_ENTRIES);
        let last = IpAddr::from((MAX_NAME_ENTRIES as u32 + 9).to_be_bytes());
        assert_eq!(names.lookup(last, now).as_deref(), Some("a.example"));
        assert_eq!(names.lookup(IpAddr::from(0u32.to_be_bytes()), now), None, "the soonest to expire went");
        assert_eq!(names.lookup(last, now + Duration::from_secs(100_000)), None);
    }
}
