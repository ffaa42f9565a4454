//! Network policies as rules: the server's ceiling ([`NetworkPolicy`], from the config file's
//! `[network]` table, [`NetworkConfig`]) and what a sandbox asks for
//! ([`capsule_tool_schemas::NetworkRequest`]), narrowed against the ceiling by [`narrow`] into
//! the [`EffectivePolicy`] that the sandbox's [`super::Egress`] enforces.
//!
//! Narrowing refuses a request that asks for more than the ceiling, saying what the server
//! allows in words a model reads. It never widens: `none` is always allowed; `public` needs a
//! `public` ceiling; an `allowlist` request needs each of its allow rules inside one of the
//! ceiling's (a name inside a name, with wildcards; a range inside a range; ports inside
//! ports), or, under a `public` ceiling, a name or an all-public range. Deny rules of both
//! apply, because the effective policy keeps both layers and every check passes both.

use capsule_tool_schemas::{NetworkMode, NetworkRequest};
use serde::Deserialize;

use super::ranges::special_overlap;
use super::rules::{self, Rule, RuleError, Target};

/// Most rules in one allow or deny list.
pub const MAX_RULES: usize = 256;

/// Why a policy cannot be read or a request is refused. The messages are for the model (or
/// the admin) to read, so each one says the cause in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A rule that cannot be read (the cause is part of the message, which a model reads).
    #[error("network: {rule:?} is not a valid rule: {reason}")]
    Rule {
        /// The rule as written.
        rule: String,
        /// Why.
        reason: RuleError,
    },
    /// Too many rules.
    #[error("network: at most {MAX_RULES} {list} rules")]
    TooMany {
        /// `allow` or `deny`.
        list: &'static str,
    },
    /// Allow rules with mode `none`.
    #[error("network: mode none takes no allow rules (got {0})")]
    NoneTakesNoAllow(String),
    /// A name allow rule with mode `public`.
    #[error(
        "network: in public mode every public name is reachable already; allow rules may only add address \
         ranges (CIDR) the server allows, and {0} is a name"
    )]
    PublicAllowsOnlyRanges(String),
    /// The request asks for a mode the server does not allow.
    #[error("network: this server allows {allowed}; the request asked for {asked}")]
    Mode {
        /// What the server allows, in words.
        allowed: String,
        /// The mode asked for.
        asked: &'static str,
    },
    /// An allow rule of the request is not inside what the server allows.
    #[error("network: this server allows {allowed}; the request's allow rule {rule} {why}")]
    RuleTooWide {
        /// What the server allows, in words.
        allowed: String,
        /// The rule.
        rule: String,
        /// Why it is too wide.
        why: String,
    },
}

/// A network policy: a mode and its allow and deny rules (parsed and checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// The mode.
    pub mode: NetworkMode,
    /// What `allowlist` allows (names and ranges), or the private ranges `public` adds.
    pub allow: Vec<Rule>,
    /// What is refused whatever the mode and allow rules say.
    pub deny: Vec<Rule>,
}

impl Default for NetworkPolicy {
    /// `public`, with no rules: the server's policy when the config file says nothing.
    fn default() -> Self {
        NetworkPolicy { mode: NetworkMode::Public, allow: Vec::new(), deny: Vec::new() }
    }
}

fn parse_list(texts: &[String], list: &'static str) -> Result<Vec<Rule>, PolicyError> {
    if texts.len() > MAX_RULES {
        return Err(PolicyError::TooMany { list });
    }
    texts.iter().map(|text| text.parse().map_err(|reason| PolicyError::Rule { rule: text.clone(), reason })).collect()
}

impl NetworkPolicy {
    /// A policy from its mode and rule texts. `none` takes no allow rules, and `public` only
    /// address ranges.
    pub fn new(mode: NetworkMode, allow: &[String], deny: &[String]) -> Result<NetworkPolicy, PolicyError> {
        let allow = parse_list(allow, "allow")?;
        let deny = parse_list(deny, "deny")?;
        match mode {
            NetworkMode::None if !allow.is_empty() => return Err(PolicyError::NoneTakesNoAllow(rules::list(&allow))),
            NetworkMode::Public => {
                if let Some(name) = allow.iter().find(|r| matches!(r.target, Target::Name(_))) {
                    return Err(PolicyError::PublicAllowsOnlyRanges(name.to_string()));
                }
            }
            _ => {}
        }
        Ok(NetworkPolicy { mode, allow, deny })
    }

    /// The policy a request asks for (not yet narrowed).
    pub fn from_request(request: &NetworkRequest) -> Result<NetworkPolicy, PolicyError> {
        NetworkPolicy::new(request.mode, &request.allow, &request.deny)
    }

    /// The server's policy from the config file's `[network]` table.
    pub fn from_config(config: &NetworkConfig) -> Result<NetworkPolicy, PolicyError> {
        NetworkPolicy::new(config.mode.unwrap_or_default(), &config.allow, &config.deny)
    }

    /// What this policy allows, in words: "only allowlist mode with: *.pkgs.example,
    /// 10.0.0.0/8", "public mode (private ranges: none)", "no network".
    pub fn describe(&self) -> String {
        let deny = if self.deny.is_empty() { String::new() } else { format!(", except {}", rules::list(&self.deny)) };
        match self.mode {
            NetworkMode::None => "no network".into(),
            NetworkMode::Public if self.allow.is_empty() => format!("public mode (public addresses only{deny})"),
            NetworkMode::Public => {
                format!("public mode (public addresses, and of private ranges only {}{deny})", rules::list(&self.allow))
            }
            NetworkMode::Allowlist => format!("only allowlist mode with: {}{deny}", rules::list(&self.allow)),
        }
    }
}

/// The config file's `[network]` table: the ceiling every sandbox's request is narrowed
/// against.
///
/// ```toml
/// [network]
/// mode = "allowlist"                       # "public" (default), "allowlist" or "none"
/// allow = ["*.pkgs.example.org", "files.example.net:443", "10.1.0.0/16:5432"]
/// deny = ["[2001:db8::/32]:443"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The mode; default `public`.
    pub mode: Option<NetworkMode>,
    /// Allow rules (see [`super::rules`] for the syntax).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Deny rules.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// What a sandbox may reach: its own policy (narrowed to fit) inside the server's. Every
/// check passes both, so the server's rules hold even where narrowing let something through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// The server's ceiling.
    pub server: NetworkPolicy,
    /// What the sandbox asked for, inside the ceiling.
    pub sandbox: NetworkPolicy,
}

impl EffectivePolicy {
    /// The policy of a sandbox that asked for nothing: the ceiling itself.
    pub fn from_ceiling(ceiling: &NetworkPolicy) -> EffectivePolicy {
        EffectivePolicy { server: ceiling.clone(), sandbox: ceiling.clone() }
    }

    /// The policy of a sandbox that asked for `request` (`None`: nothing) when it was created,
    /// under the server's ceiling now. Never fails: a request the ceiling no longer holds (the
    /// config changed since) keeps its own layer, and the ceiling's layer still bounds every
    /// check; a request that no longer parses gets no network.
    pub fn for_sandbox(ceiling: &NetworkPolicy, request: Option<&NetworkRequest>) -> EffectivePolicy {
        let Some(request) = request else { return EffectivePolicy::from_ceiling(ceiling) };
        narrow(ceiling, request).unwrap_or_else(|_| EffectivePolicy {
            server: ceiling.clone(),
            sandbox: NetworkPolicy::from_request(request).unwrap_or(NetworkPolicy {
                mode: NetworkMode::None,
                allow: Vec::new(),
                deny: Vec::new(),
            }),
        })
    }

    /// The mode a sandbox effectively has (`none` if either layer is `none`).
    pub fn mode(&self) -> NetworkMode {
        match (self.server.mode, self.sandbox.mode) {
            (NetworkMode::None, _) | (_, NetworkMode::None) => NetworkMode::None,
            (NetworkMode::Allowlist, _) | (_, NetworkMode::Allowlist) => NetworkMode::Allowlist,
            _ => NetworkMode::Public,
        }
    }
}

/// Narrows a sandbox's request against the server's ceiling, or says why it asks for more.
pub fn narrow(ceiling: &NetworkPolicy, request: &NetworkRequest) -> Result<EffectivePolicy, PolicyError> {
    let asked = NetworkPolicy::from_request(request)?;
    let mode_error = || PolicyError::Mode { allowed: ceiling.describe(), asked: request.mode.as_str() };
    match (ceiling.mode, asked.mode) {
        (_, NetworkMode::None) => {}
        (NetworkMode::None, _) | (NetworkMode::Allowlist, NetworkMode::Public) => return Err(mode_error()),
        (NetworkMode::Allowlist, NetworkMode::Allowlist) => {
            if let Some(rule) = asked.allow.iter().find(|r| !ceiling.allow.iter().any(|c| r.within(c))) {
                return Err(PolicyError::RuleTooWide {
                    allowed: ceiling.describe(),
                    rule: rule.to_string(),
                    why: "is not inside any of them".into(),
                });
            }
        }
        (NetworkMode::Public, _) => {
            for rule in &asked.allow {
                let Target::Cidr(cidr) = &rule.target else { continue };
                if ceiling.allow.iter().any(|c| rule.within(c)) {
                    continue;
                }
                if let Some(special) = special_overlap(cidr) {
                    return Err(PolicyError::RuleTooWide {
                        allowed: ceiling.describe(),
                        rule: rule.to_string(),
                        why: format!("overlaps {} ({} range), which it does not allow", special.range, special.what),
                    });
                }
            }
        }
    }
    Ok(EffectivePolicy { server: ceiling.clone(), sandbox: asked })
}
