//! Network rules as admins and models write them, and what they match.
//!
//! Syntax of one rule (case-insensitive, surrounding whitespace ignored):
//!
//! | rule                         | matches                                               |
//! |------------------------------|-------------------------------------------------------|
//! | `example.com`                | that name only (a trailing dot is the same name)      |
//! | `*.example.com`              | `a.example.com`, `a.b.example.com`; not `example.com` |
//! | `10.0.0.0/8`, `10.1.2.3`     | the range, or the one address                         |
//! | `2001:db8::/32`, `2001:db8::1` | an IPv6 range or address (no port: see below)       |
//! | `RULE:443`, `RULE:8000-8999` | the rule, on that port or port range only             |
//! | `[2001:db8::/32]:443`        | an IPv6 range with a port: brackets around the range  |
//!
//! A rule without a port matches every port. Names are DNS names: labels of letters, digits,
//! `-` (not first or last) and `_`, 1 to 63 long, at most 253 in all, the last label not all
//! digits; `*.` may only stand for the whole first label, and `*` alone is not a rule. Ports
//! apply to TCP and UDP alike.
//!
//! This module only parses and compares rules; the policy decides what they allow.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::ranges::{Cidr, RangeError};

/// Longest DNS name in text form, without the trailing dot.
pub const MAX_NAME_BYTES: usize = 253;
/// Longest rule text accepted.
const MAX_RULE_BYTES: usize = 300;

/// Why a rule or name cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Empty rule.
    #[error("an empty rule")]
    Empty,
    /// Too long to be a rule.
    #[error("longer than {MAX_RULE_BYTES} characters")]
    TooLong,
    /// Not a DNS name.
    #[error("not a DNS name ({0})")]
    Name(&'static str),
    /// A wildcard anywhere but as the whole first label.
    #[error("a wildcard may only be the first label, as in *.example.com")]
    Wildcard,
    /// A port that is not a number from 1 to 65535, or a range that runs backwards.
    #[error("not a port or port range (1-65535, e.g. 443 or 8000-8999)")]
    Port,
    /// An address range that cannot be read.
    #[error("{0}")]
    Range(#[from] RangeError),
}

/// A name a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Exactly this (normalized) name.
    Exact(String),
    /// Every name strictly under this one (`*.suffix`).
    Subdomains(String),
}

impl NamePattern {
    /// Whether the normalized `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(exact) => name == exact,
            NamePattern::Subdomains(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }

    /// Whether every name this pattern matches, `outer` matches too.
    pub fn within(&self, outer: &NamePattern) -> bool {
        match (self, outer) {
            (NamePattern::Exact(name), outer) => outer.matches(name),
            (NamePattern::Subdomains(inner), NamePattern::Subdomains(_)) => outer == self || outer.matches(inner),
            (NamePattern::Subdomains(_), NamePattern::Exact(_)) => false,
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Subdomains(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// What a rule is about: names or addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Names (reached through the sandbox's resolver).
    Name(NamePattern),
    /// An address range.
    Cidr(Cidr),
}

/// Ports a rule covers (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    /// Every port.
    Any,
    /// `lo` to `hi`, both included (one port when equal).
    Range(u16, u16),
}

impl Ports {
    /// Whether `port` is covered.
    pub fn contains(&self, port: u16) -> bool {
        match *self {
            Ports::Any => true,
            Ports::Range(lo, hi) => (lo..=hi).contains(&port),
        }
    }

    /// Whether every port of `self` is covered by `outer`.
    pub fn within(&self, outer: &Ports) -> bool {
        match (*self, *outer) {
            (_, Ports::Any) => true,
            (Ports::Any, Ports::Range(..)) => false,
            (Ports::Range(lo, hi), Ports::Range(olo, ohi)) => olo <= lo && hi <= ohi,
        }
    }
}

impl FromStr for Ports {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Ports, RuleError> {
        let port = |t: &str| -> Result<u16, RuleError> {
            if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RuleError::Port);
            }
            match t.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(RuleError::Port),
            }
        };
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(text)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(RuleError::Port);
        }
        Ok(Ports::Range(lo, hi))
    }
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Names or addresses.
    pub target: Target,
    /// Ports.
    pub ports: Ports,
}

impl Rule {
    /// Whether every connection this rule matches, `outer` matches too.
    pub fn within(&self, outer: &Rule) -> bool {
        let targets = match (&self.target, &outer.target) {
            (Target::Name(inner), Target::Name(outer)) => inner.within(outer),
            (Target::Cidr(inner), Target::Cidr(outer)) => outer.contains_cidr(inner),
            _ => false,
        };
        targets && self.ports.within(&outer.ports)
    }

    /// Whether this is a name rule matching `name` (normalized) on `port` (any port if `None`).
    pub fn matches_name(&self, name: &str, port: Option<u16>) -> bool {
        matches!(&self.target, Target::Name(p) if p.matches(name)) && port.is_none_or(|p| self.ports.contains(p))
    }

    /// Whether this is an address rule covering `ip` (canonical) on `port` (if `None`: only a
    /// rule for every port counts).
    pub fn matches_addr(&self, ip: IpAddr, port: Option<u16>) -> bool {
        let ports_ok = match port {
            Some(port) => self.ports.contains(port),
            None => self.ports == Ports::Any,
        };
        matches!(&self.target, Target::Cidr(c) if c.contains(ip)) && ports_ok
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Rule, RuleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(RuleError::Empty);
        }
        if text.len() > MAX_RULE_BYTES {
            return Err(RuleError::TooLong);
        }
        // Split off the port: `[v6 range]:port`, `host:port`; two or more colons without
        // brackets are an IPv6 address or range without a port.
        let (host, ports) = if let Some(inner) = text.strip_prefix('[') {
            let (range, after) = inner.split_once(']').ok_or(RangeError::Syntax)?;
            let ports = match after {
                "" => Ports::Any,
                after => after.strip_prefix(':').ok_or(RuleError::Port)?.parse()?,
            };
            return Ok(Rule { target: Target::Cidr(range.parse()?), ports });
        } else if text.matches(':').count() == 1 {
            let (host, ports) = text.split_once(':').ok_or(RuleError::Port)?;
            (host, ports.parse()?)
        } else {
            (text, Ports::Any)
        };
        let looks_like_address = host.contains('/') || host.contains(':') || host.parse::<IpAddr>().is_ok();
        let target = if looks_like_address {
            Target::Cidr(host.parse()?)
        } else if let Some(suffix) = host.strip_prefix("*.") {
            Target::Name(NamePattern::Subdomains(normalize_name(suffix).map_err(|e| match e {
                RuleError::Name("a wildcard") => RuleError::Wildcard,
                e => e,
            })?))
        } else if host.contains('*') {
            return Err(RuleError::Wildcard);
        } else {
            Target::Name(NamePattern::Exact(normalize_name(host)?))
        };
        Ok(Rule { target, ports })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Name(name) => write!(f, "{name}")?,
            Target::Cidr(cidr) => {
                let host = *cidr == Cidr::host(cidr.addr());
                let text = if host { cidr.addr().to_string() } else { cidr.to_string() };
                if cidr.addr().is_ipv6() && self.ports != Ports::Any {
                    write!(f, "[{text}]")?
                } else {
                    f.write_str(&text)?
                }
            }
        }
        match self.ports {
            Ports::Any => Ok(()),
            Ports::Range(lo, hi) if lo == hi => write!(f, ":{lo}"),
            Ports::Range(lo, hi) => write!(f, ":{lo}-{hi}"),
        }
    }
}

/// A DNS name in the form rules compare: lower case, without a trailing dot, checked.
pub fn normalize_name(name: &str) -> Result<String, RuleError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(RuleError::Name("empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(RuleError::Name("longer than 253 characters"));
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(RuleError::Name("an empty label"));
        }
        if label.len() > 63 {
            return Err(RuleError::Name("a label longer than 63 characters"));
        }
        if label.contains('*') {
            return Err(RuleError::Name("a wildcard"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(RuleError::Name("a character other than letters, digits, - and _"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(RuleError::Name("a label that starts or ends with -"));
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RuleError::Name("the last label is all digits"));
    }
    Ok(name.to_ascii_lowercase())
}

/// A list of rules as the model reads it: `a.com, *.b.com, 10.0.0.0/8:5432`.
pub fn list(rules: &[Rule]) -> String {
    if rules.is_empty() {
        return "nothing".into();
    }
    rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
