//! The decisions for one sandbox's traffic under its [`EffectivePolicy`]: what its resolver
//! may look up and tell the guest, and what it may connect to, each refusal with a reason the
//! model reads. [`Egress`] also records what allowed names resolved to, with an expiry, so
//! that in `allowlist` mode an address is reachable only while an allowed name's answer that
//! holds it is valid.
//!
//! Every check passes two layers, the sandbox's policy and the server's, the sandbox's first
//! (its reasons are the ones a model can act on). Per layer:
//!
//! - never, whatever the rules: unspecified, loopback, multicast and broadcast addresses, and
//!   the host's own addresses (given to [`Egress::new`]), also inside IPv4-mapped, NAT64 and
//!   6to4 forms;
//! - deny rules win over everything else: an address rule matches the address (or the IPv4
//!   address a NAT64/6to4 address embeds), a name rule matches the name the guest resolved the
//!   address from or the TLS server name / HTTP `Host` it sent;
//! - an allow address rule (CIDR) reaches its range, special ranges included: only such a rule
//!   ever reaches a private, link-local (cloud metadata), CGNAT or other special address;
//! - DNS rebinding: a name never reaches a special address. Such addresses are withheld from
//!   the resolver's answer ([`Egress::filter_resolved`]), so the guest never learns a private
//!   address for a public name, and refused on connect;
//! - `public` reaches every other address; name deny rules hold against the resolver, the
//!   name a connection names and its first bytes, but an IP literal bypasses names (an address
//!   deny rule is the firm tool);
//! - `allowlist` reaches an address only if an allowed name resolved to it (through
//!   [`Egress::filter_resolved`]) and that answer has not expired; on ports 80 and 443 over TCP
//!   the TLS server name or HTTP `Host` must then be that name (the one the connection says it
//!   resolved, else one of the allowed names that resolved to the address), so an allowed
//!   domain cannot front for another; UDP to 80 and 443 (QUIC) cannot be checked and is
//!   refused. Connections allowed by an address rule are not checked by name.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use capsule_tool_schemas::NetworkMode;
use capsule_vmm::net::broker::{FirstBytes, MAX_RESOLVED_ADDRS};

use super::policy::{EffectivePolicy, NetworkPolicy};
use super::ranges::{canonical, embedded_v4, special};
use super::rules::{self, normalize_name, Ports, Rule, Target};

/// Longest a resolver answer is cached by the guest, whatever its TTL.
pub const MAX_GUEST_TTL: Duration = Duration::from_secs(3600);
/// How long past the TTL the guest gave an answer a connection to its addresses is still
/// allowed (connections opened just as the guest's cache expires).
pub const RESOLUTION_GRACE: Duration = Duration::from_secs(60);
/// Most (name, address) resolutions one sandbox keeps; past it, the soonest to expire go.
pub const MAX_RESOLUTIONS: usize = 4096;
/// Ports whose first bytes are checked against the name in `allowlist` mode.
pub const WEB_PORTS: [u16; 2] = [80, 443];

/// The answer to one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Refused, and why, in words the model reads.
    Refuse(String),
}

impl Decision {
    /// Whether it is allowed.
    pub fn is_allowed(&self) -> bool {
        *self == Decision::Allow
    }
}

/// A resolver answer after the policy: what the guest may learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The addresses the guest may use (as the resolver gave them).
    pub addrs: Vec<IpAddr>,
    /// How long the guest may cache them, in seconds.
    pub ttl_s: u32,
    /// The addresses withheld, each with why.
    pub withheld: Vec<(IpAddr, String)>,
}

/// Transport of a connection, for what can be checked.
enum Transport<'a> {
    Tcp { first_bytes: Option<&'a FirstBytes> },
    Udp,
}

/// One layer of the policy and how its reasons name it.
struct Layer<'a> {
    policy: &'a NetworkPolicy,
    /// "this server's" or "the sandbox's".
    whose: &'static str,
    /// Whether it is the server's layer.
    server: bool,
}

/// The egress decisions and resolution records of one sandbox.
#[derive(Debug, Clone)]
pub struct Egress {
    policy: EffectivePolicy,
    host_addrs: HashSet<IpAddr>,
    /// Canonical address → the names that resolved to it, each with its expiry.
    resolutions: HashMap<IpAddr, Vec<(String, Instant)>>,
    resolution_count: usize,
}

impl Egress {
    /// The decisions for `policy`; `host_addrs` are the host's own addresses, never reachable.
    pub fn new(policy: EffectivePolicy, host_addrs: impl IntoIterator<Item = IpAddr>) -> Egress {
        let host_addrs = host_addrs.into_iter().map(canonical).collect();
        Egress { policy, host_addrs, resolutions: HashMap::new(), resolution_count: 0 }
    }

    /// The policy decided under.
    pub fn policy(&self) -> &EffectivePolicy {
        &self.policy
    }

    fn layers(&self) -> [Layer<'_>; 2] {
        [
            Layer { policy: &self.policy.sandbox, whose: "the sandbox's", server: false },
            Layer { policy: &self.policy.server, whose: "this server's", server: true },
        ]
    }

    /// Whether the guest may look `name` up.
    pub fn check_resolve(&self, name: &str) -> Decision {
        let name = match normalize_name(name) {
            Ok(name) => name,
            Err(why) => return Decision::Refuse(format!("{name:?} is not a DNS name: {why}")),
        };
        if let Some(why) = self.mode_refusal() {
            return Decision::Refuse(why);
        }
        for layer in self.layers() {
            if let Some(refusal) = layer.resolve_refusal(&name) {
                return Decision::Refuse(refusal);
            }
        }
        Decision::Allow
    }

    /// Filters the host resolver's answer for `name` (`ttl`: its time to live) down to what the
    /// guest may learn, and records it: until the guest's cache of it expires (plus
    /// [`RESOLUTION_GRACE`]), `allowlist` mode reaches those addresses as `name`.
    pub fn filter_resolved(&mut self, name: &str, addrs: &[IpAddr], ttl: Duration, now: Instant) -> Filtered {
        let ttl = ttl.min(MAX_GUEST_TTL);
        let mut filtered = Filtered { addrs: Vec::new(), ttl_s: ttl.as_secs() as u32, withheld: Vec::new() };
        let normalized = normalize_name(name);
        let refusal = match (&normalized, self.check_resolve(name)) {
            (_, Decision::Refuse(why)) => Some(why),
            (Ok(_), Decision::Allow) => None,
            (Err(_), Decision::Allow) => Some("not a DNS name".into()),
        };
        let mut seen = HashSet::new();
        for &addr in addrs {
            if !seen.insert(addr) {
                continue;
            }
            let why = refusal.clone().or_else(|| self.address_refusal(canonical(addr), None));
            match why {
                Some(why) => filtered.withheld.push((addr, why)),
                None if filtered.addrs.len() >= MAX_RESOLVED_ADDRS => {
                    filtered.withheld.push((addr, format!("more than {MAX_RESOLVED_ADDRS} addresses")))
                }
                None => filtered.addrs.push(addr),
            }
        }
        if let Ok(name) = normalized {
            let expires = now + ttl + RESOLUTION_GRACE;
            for &addr in &filtered.addrs {
                self.record(canonical(addr), &name, expires, now);
            }
        }
        filtered
    }

    /// Whether the guest may open a TCP connection to `dst`. `resolved_name`: the name the
    /// guest resolved `dst` from, as the worker saw it; `first_bytes`: for ports 80 and 443,
    /// what the guest sent first.
    pub fn check_connect(
        &self,
        dst: SocketAddr,
        resolved_name: Option<&str>,
        first_bytes: Option<&FirstBytes>,
        now: Instant,
    ) -> Decision {
        self.check(dst, resolved_name, Transport::Tcp { first_bytes }, now)
    }

    /// Whether the guest may send UDP datagrams to `dst` (the worker answers DNS to the
    /// gateway itself; this is for anything else).
    pub fn check_udp(&self, dst: SocketAddr, now: Instant) -> Decision {
        self.check(dst, None, Transport::Udp, now)
    }

    fn check(&self, dst: SocketAddr, resolved_name: Option<&str>, transport: Transport<'_>, now: Instant) -> Decision {
        let ip = canonical(dst.ip());
        let port = dst.port();
        if port == 0 {
            return Decision::Refuse("port 0 is not a destination".into());
        }
        let resolved_name = match resolved_name.map(normalize_name).transpose() {
            Ok(name) => name,
            Err(why) => return Decision::Refuse(format!("the name of the connection is not a DNS name: {why}")),
        };
        let first_host = match &transport {
            Transport::Tcp { first_bytes: Some(FirstBytes::TlsServerName(h) | FirstBytes::HttpHost(h)) } => {
                Some(h.trim_end_matches('.').to_ascii_lowercase())
            }
            _ => None,
        };
        if let Some(why) = self.mode_refusal().or_else(|| self.absolute_refusal(ip)) {
            return Decision::Refuse(why);
        }
        let names: Vec<&str> = resolved_name.iter().chain(first_host.iter()).map(String::as_str).collect();
        for layer in self.layers() {
            if let Some(why) = layer.deny_refusal(ip, Some(port), &names) {
                return Decision::Refuse(why);
            }
        }
        let ctx = Connection { ip, port, resolved_name: resolved_name.as_deref(), transport: &transport, now };
        for layer in self.layers() {
            if let Some(why) = self.allow_refusal(&layer, &ctx) {
                return Decision::Refuse(why);
            }
        }
        Decision::Allow
    }

    /// `none` in either layer, the server's first (its reason says more).
    fn mode_refusal(&self) -> Option<String> {
        let [sandbox, server] = self.layers();
        server.mode_refusal().or_else(|| sandbox.mode_refusal())
    }

    /// Refusals no rule overrides.
    fn absolute_refusal(&self, ip: IpAddr) -> Option<String> {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self.host_addrs.contains(&ip) || embedded.is_some_and(|e| self.host_addrs.contains(&e)) {
            return Some(format!("{ip} is an address of the host itself; no policy reaches it"));
        }
        match special(ip) {
            Some(s) if s.hard => Some(format!("{ip} is {}; no policy reaches it", s.what)),
            _ => None,
        }
    }

    /// Why the address `ip` (canonical) may not be reached at all (`port`: on that port, or
    /// if `None` by any rule for every port), before names: absolute refusals, address deny
    /// rules, special ranges without an allow rule, `none`.
    fn address_refusal(&self, ip: IpAddr, port: Option<u16>) -> Option<String> {
        if let Some(why) = self.mode_refusal().or_else(|| self.absolute_refusal(ip)) {
            return Some(why);
        }
        for layer in self.layers() {
            if let Some(why) = layer.deny_refusal(ip, port, &[]) {
                return Some(why);
            }
        }
        for layer in self.layers() {
            if let Some(why) = layer.mode_refusal() {
                return Some(why);
            }
            let covered = layer.policy.allow.iter().any(|r| covers(r, ip, port));
            if let (Some(s), false) = (special(ip), covered) {
                return Some(layer.special_refusal(ip, &s.what, &s.range.to_string()));
            }
        }
        None
    }

    fn allow_refusal(&self, layer: &Layer<'_>, c: &Connection<'_>) -> Option<String> {
        if let Some(why) = layer.mode_refusal() {
            return Some(why);
        }
        if layer.policy.allow.iter().any(|r| covers(r, c.ip, Some(c.port))) {
            return None;
        }
        if let Some(s) = special(c.ip) {
            return Some(layer.special_refusal(c.ip, &s.what, &s.range.to_string()));
        }
        if layer.policy.mode == NetworkMode::Public {
            return None;
        }
        // allowlist: the address must come from an allowed name's valid answer.
        let allowed = rules::list(&layer.policy.allow);
        let on_port = |name: &str| layer.policy.allow.iter().any(|r| r.matches_name(name, Some(c.port)));
        let resolved: Vec<&str> = self.names_for(c.ip, c.now);
        let expected: Vec<&str> = match c.resolved_name {
            Some(name) if !on_port(name) => {
                return Some(if layer.policy.allow.iter().any(|r| r.matches_name(name, None)) {
                    format!("port {} of {name} is not on {} allowlist (allowed: {allowed})", c.port, layer.whose)
                } else {
                    format!("{name} is not on {} allowlist (allowed: {allowed})", layer.whose)
                });
            }
            Some(name) if !resolved.contains(&name) => {
                return Some(format!(
                    "{} is not an address {name} resolved to through the sandbox's resolver (or that answer expired)",
                    c.ip
                ));
            }
            Some(name) => vec![name],
            None => {
                let expected: Vec<&str> = resolved.into_iter().filter(|n| on_port(n)).collect();
                if expected.is_empty() {
                    return Some(format!(
                        "{} port {} is not on {} allowlist (allowed: {allowed}); an address is reachable only \
                         by a name on the allowlist that the sandbox's resolver resolved to it",
                        c.ip, c.port, layer.whose
                    ));
                }
                expected
            }
        };
        if !WEB_PORTS.contains(&c.port) {
            return None;
        }
        let wanted = expected.join(" or ");
        match c.transport {
            Transport::Udp => Some(format!(
                "UDP to port {} (QUIC) cannot be checked against {} allowlist; use TCP",
                c.port, layer.whose
            )),
            Transport::Tcp { first_bytes: None | Some(FirstBytes::Unrecognized) } => Some(format!(
                "no TLS server name or HTTP Host in what the sandbox sent first on port {}; {} allowlist needs one \
                 to check against {wanted}",
                c.port, layer.whose
            )),
            Transport::Tcp { first_bytes: Some(FirstBytes::TlsServerName(h) | FirstBytes::HttpHost(h)) } => {
                let host = h.trim_end_matches('.').to_ascii_lowercase();
                if expected.contains(&host.as_str()) {
                    return None;
                }
                let what = match c.transport {
                    Transport::Tcp { first_bytes: Some(FirstBytes::TlsServerName(_)) } => "TLS server name",
                    _ => "HTTP Host",
                };
                Some(format!("{what} {host} does not match {wanted}"))
            }
        }
    }

    /// The names whose answers, still valid at `now`, hold `ip`.
    fn names_for(&self, ip: IpAddr, now: Instant) -> Vec<&str> {
        self.resolutions
            .get(&ip)
            .map(|names| names.iter().filter(|(_, exp)| *exp > now).map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default()
    }

    fn record(&mut self, ip: IpAddr, name: &str, expires: Instant, now: Instant) {
        let names = self.resolutions.entry(ip).or_default();
        if let Some(entry) = names.iter_mut().find(|(n, _)| n == name) {
            entry.1 = entry.1.max(expires);
            return;
        }
        names.push((name.to_string(), expires));
        self.resolution_count += 1;
        if self.resolution_count > MAX_RESOLUTIONS {
            self.resolutions.retain(|_, names| {
                names.retain(|(_, exp)| *exp > now);
                !names.is_empty()
            });
            self.resolution_count = self.resolutions.values().map(Vec::len).sum();
        }
        while self.resolution_count > MAX_RESOLUTIONS {
            let soonest = self
                .resolutions
                .iter()
                .flat_map(|(ip, names)| names.iter().map(move |(n, exp)| (*exp, *ip, n.clone())))
                .min();
            let Some((_, ip, name)) = soonest else { break };
            if let Some(names) = self.resolutions.get_mut(&ip) {
                names.retain(|(n, _)| *n != name);
                if names.is_empty() {
                    self.resolutions.remove(&ip);
                }
            }
            self.resolution_count -= 1;
        }
    }

    /// How many (name, address) resolutions are recorded.
    pub fn resolution_count(&self) -> usize {
        self.resolution_count
    }
}

/// What one connection check is about.
struct Connection<'a> {
    ip: IpAddr,
    port: u16,
    resolved_name: Option<&'a str>,
    transport: &'a Transport<'a>,
    now: Instant,
}

/// Whether the allow rule `rule` reaches the address `ip` on `port` (any port if `None`).
fn covers(rule: &Rule, ip: IpAddr, port: Option<u16>) -> bool {
    matches!(&rule.target, Target::Cidr(c) if c.contains(ip)) && port.is_none_or(|p| rule.ports.contains(p))
}

impl Layer<'_> {
    fn mode_refusal(&self) -> Option<String> {
        match (self.policy.mode, self.server) {
            (NetworkMode::None, true) => Some("this server allows no network".into()),
            (NetworkMode::None, _) => Some("the sandbox has no network (its network mode is none)".into()),
            _ => None,
        }
    }

    fn resolve_refusal(&self, name: &str) -> Option<String> {
        if let Some(why) = self.mode_refusal() {
            return Some(why);
        }
        if let Some(rule) = self.policy.deny.iter().find(|r| r.ports == Ports::Any && r.matches_name(name, None)) {
            return Some(format!("{name} is denied by {} rule {rule}", self.whose));
        }
        let allowed = self.policy.allow.iter().any(|r| r.matches_name(name, None));
        if self.policy.mode == NetworkMode::Allowlist && !allowed {
            let list = rules::list(&self.policy.allow);
            return Some(format!("{name} is not on {} allowlist (allowed: {list})", self.whose));
        }
        None
    }

    /// Deny rules matching `ip` (or the IPv4 address it embeds) on `port` (only rules for every
    /// port if `None`), or one of `names` on `port`.
    fn deny_refusal(&self, ip: IpAddr, port: Option<u16>, names: &[&str]) -> Option<String> {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let port_ok = |rule: &Rule| match port {
            Some(port) => rule.ports.contains(port),
            None => rule.ports == Ports::Any,
        };
        for rule in self.policy.deny.iter().filter(|r| port_ok(r)) {
            let hit = match &rule.target {
                Target::Cidr(c) => c.contains(ip) || embedded.is_some_and(|e| c.contains(e)),
                Target::Name(pattern) => names.iter().any(|n| pattern.matches(n)),
            };
            if hit {
                return Some(format!("denied by {} rule {rule}", self.whose));
            }
        }
        None
    }

    fn special_refusal(&self, ip: IpAddr, what: &str, range: &str) -> String {
        match self.policy.mode {
            NetworkMode::Allowlist => format!(
                "{ip} is {what} ({range}); {} allowlist reaches such an address only through an address rule \
                 that covers it",
                self.whose
            ),
            _ => format!(
                "{ip} is {what} ({range}); {} policy is public, which reaches only public addresses",
                self.whose
            ),
        }
    }
}
