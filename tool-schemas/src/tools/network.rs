//! The network a sandbox asks for: the `network` field of `create_sandbox`. The server narrows it against its own policy (the ceiling) and refuses a request that
//! asks for more, saying what it allows.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Any public internet address; never private, loopback, link-local or other special
    /// ranges, nor the host itself.
    #[default]
    Public,
    /// No network at all.
    None,
    /// Only the names and address ranges in `allow`.
    Allowlist,
}

impl NetworkMode {
    /// The mode as written in requests and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Public => "public",
            NetworkMode::None => "none",
            NetworkMode::Allowlist => "allowlist",
        }
    }
}

/// Network access of a sandbox. The server's own policy is the limit: a request can only
/// narrow it, and one that asks for more is refused with what the server allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// `public` (any public internet address), `none`, or `allowlist` (only what `allow`
    /// lists).
    pub mode: NetworkMode,
    /// With `allowlist`: what the sandbox may reach. Each rule is a name (`pkgs.example.org`), a
    /// wildcard (`*.example.net`: subdomains only, not the name itself), an address or
    /// CIDR range (`10.1.0.0/16`, `2001:db8::/32`), optionally with a port or port range
    /// (`pkgs.example.org:443`, `10.1.0.0/16:5432`, `[2001:db8::/32]:8000-8999`). With `public`:
    /// only CIDR ranges, to add private ranges the server allows.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Rules (same syntax as `allow`) that are refused even where `allow` or the mode would
    /// let them through.
    #[serde(default)]
    pub deny: Vec<String>,
}
