//! Address ranges: the [`Cidr`] type of rules, and the special-purpose ranges that `public`
//! never reaches (private, loopback, link-local and cloud metadata, CGNAT, multicast,
//! broadcast, documentation, benchmarking, IPv6 unique-local and the like), after the IANA
//! special-purpose registries (RFC 6890 and its updates).
//!
//! Addresses are compared in canonical form ([`canonical`]): an IPv4-mapped IPv6 address
//! (`::ffff:10.0.0.1`) is its IPv4 address. IPv6 forms that embed an IPv4 address for a
//! translator or tunnel (NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are as special as the address
//! they embed ([`embedded_v4`]); the deprecated IPv4-compatible range `::/96` and Teredo
//! `2001::/32` are special whatever they embed.
//!
//! This module only classifies; the policy decides what a class means.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A range of addresses: a network address and a prefix length, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a range cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not an address, or not address/prefix.
    #[error("not an IP address or CIDR range")]
    Syntax,
    /// The prefix is longer than the address.
    #[error("prefix /{0} is longer than the address")]
    Prefix(u8),
    /// Bits past the prefix are set.
    #[error("bits past the prefix are set; the range is {0}")]
    HostBits(Cidr),
    /// IPv4-mapped IPv6 ranges are written as IPv4.
    #[error("an IPv4-mapped IPv6 range: write it as IPv4")]
    Mapped,
}

/// The value of `ip` as a 128-bit number, and its width in bits.
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// A mask of the `prefix` top bits of a `width`-bit number.
fn mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(prefix))) >> (128 - u32::from(width))
    }
}

impl Cidr {
    /// The range `addr/prefix`; `addr` must have no bits set past the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, RangeError> {
        let (value, width) = bits(addr);
        if prefix > width {
            return Err(RangeError::Prefix(prefix));
        }
        let network = value & mask(prefix, width);
        let cidr = Cidr { addr: from_bits(network, addr.is_ipv4()), prefix };
        if network != value {
            return Err(RangeError::HostBits(cidr));
        }
        Ok(cidr)
    }

    /// The range of the one address `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, prefix: bits(addr).1 }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (compared as given: canonicalize first) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (value, width) = bits(ip);
        let (network, own_width) = bits(self.addr);
        width == own_width && value & mask(self.prefix, width) == network
    }

    /// Whether every address of `other` is in this range.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }
}

fn from_bits(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

impl FromStr for Cidr {
    type Err = RangeError;

    /// `10.0.0.0/8`, `2001:db8::/32`, or one address (`10.1.2.3`, `2001:db8::1`).
    fn from_str(text: &str) -> Result<Cidr, RangeError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => {
                if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(RangeError::Syntax);
                }
                (addr, Some(prefix.parse::<u8>().map_err(|_| RangeError::Syntax)?))
            }
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| RangeError::Syntax)?;
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() {
                return Err(RangeError::Mapped);
            }
        }
        match prefix {
            Some(prefix) => Cidr::new(addr, prefix),
            None => Ok(Cidr::host(addr)),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `ip` in canonical form: an IPv4-mapped IPv6 address is its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address a NAT64 (`64:ff9b::/96`, RFC 6052) or 6to4 (`2002::/16`, RFC 3056)
/// address carries to its translator or relay.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// A special-purpose range an address is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    /// What the range is, for a reason the model reads ("a private address").
    pub what: String,
    /// The range.
    pub range: Cidr,
    /// Whether no rule can make it reachable (unspecified, loopback, multicast, broadcast).
    pub hard: bool,
}

/// (range, what, hard), most specific first where ranges nest.
const V4_SPECIAL: &[(&str, &str, bool)] = &[
    ("0.0.0.0/32", "the unspecified address", true),
    ("0.0.0.0/8", "a \"this network\" address", false),
    ("10.0.0.0/8", "a private address", false),
    ("100.64.0.0/10", "a shared (CGNAT) address", false),
    ("127.0.0.0/8", "a loopback address", true),
    ("169.254.169.254/32", "the cloud metadata address", false),
    ("169.254.0.0/16", "a link-local address", false),
    ("172.16.0.0/12", "a private address", false),
    ("192.0.0.0/24", "an IETF protocol address", false),
    ("192.0.2.0/24", "a documentation address", false),
    ("192.88.99.0/24", "a 6to4 relay address", false),
    ("192.168.0.0/16", "a private address", false),
    ("198.18.0.0/15", "a benchmarking address", false),
    ("198.51.100.0/24", "a documentation address", false),
    ("203.0.113.0/24", "a documentation address", false),
    ("224.0.0.0/4", "a multicast address", true),
    ("255.255.255.255/32", "the broadcast address", true),
    ("240.0.0.0/4", "a reserved address", false),
];

/// As [`V4_SPECIAL`]; the embedding ranges (NAT64, 6to4) are handled apart.
const V6_SPECIAL: &[(&str, &str, bool)] = &[
    ("::/128", "the unspecified address", true),
    ("::1/128", "a loopback address", true),
    ("::/96", "an IPv4-compatible address (deprecated)", false),
    ("64:ff9b:1::/48", "a local-use NAT64 address", false),
    ("100::/64", "a discard-only address", false),
    ("2001::/32", "a Teredo address", false),
    ("2001:2::/48", "a benchmarking address", false),
    ("2001:db8::/32", "a documentation address", false),
    ("2001::/23", "an IETF protocol address", false),
    ("3fff::/20", "a documentation address", false),
    ("fc00::/7", "a unique local address", false),
    ("fe80::/10", "a link-local address", false),
    ("fec0::/10", "a site-local address (deprecated)", false),
    ("ff00::/8", "a multicast address", true),
];

fn parse_table(
    table: &'static [(&'static str, &'static str, bool)],
) -> impl Iterator<Item = (Cidr, &'static str, bool)> {
    table.iter().map(|(range, what, hard)| (range.parse().expect("the special-range tables are valid"), *what, *hard))
}

/// The special-purpose range `ip` is in, if any; `None` for a public address.
pub fn special(ip: IpAddr) -> Option<Special> {
    let ip = canonical(ip);
    let table = if ip.is_ipv4() { V4_SPECIAL } else { V6_SPECIAL };
    if let Some((range, what, hard)) = parse_table(table).find(|(range, _, _)| range.contains(ip)) {
        return Some(Special { what: what.to_string(), range, hard });
    }
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(inner) = embedded_v4(v6) {
        let range: Cidr = if v6.segments()[0] == 0x2002 { "2002::/16" } else { "64:ff9b::/96" }.parse().ok()?;
        let kind = if v6.segments()[0] == 0x2002 { "6to4" } else { "NAT64" };
        return special(IpAddr::V4(inner)).map(|s| Special {
            what: format!(
                "a {kind} address embedding {} {inner}",
                s.what.trim_start_matches("a ").trim_start_matches("the ")
            ),
            range,
            hard: s.hard,
        });
    }
    let global: Cidr = "2000::/3".parse().ok()?;
    if !global.contains(ip) {
        return Some(Special { what: "an address outside IPv6 global unicast".into(), range: global, hard: false });
    }
    None
}

/// The first special-purpose range that `cidr` shares an address with, if any (for telling
/// whether a rule's range is all public).
pub fn special_overlap(cidr: &Cidr) -> Option<Special> {
    let v4 = cidr.addr().is_ipv4();
    let table = if v4 { V4_SPECIAL } else { V6_SPECIAL };
    if let Some((range, what, hard)) = parse_table(table).find(|(range, _, _)| range.overlaps(cidr)) {
        return Some(Special { what: what.to_string(), range, hard });
    }
    if v4 {
        return None;
    }
    let six_to_four: Cidr = "2002::/16".parse().ok()?;
    if six_to_four.overlaps(cidr) {
        return Some(Special { what: "a 6to4 address".into(), range: six_to_four, hard: false });
    }
    let global: Cidr = "2000::/3".parse().ok()?;
    if !global.contains_cidr(cidr) {
        return Some(Special { what: "an address outside IPv6 global unicast".into(), range: global, hard: false });
    }
    None
}
