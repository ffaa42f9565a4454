//! The network policy of sandboxes: what a guest may resolve and connect to, decided in the
//! daemon (which alone holds internet sockets, see `capsule_vmm::net::broker`), each refusal
//! with a reason the model reads.
//!
//! - [`rules`]: the rule syntax (names, `*.` wildcards, CIDR ranges, ports) and matching;
//! - [`ranges`]: CIDR ranges and the special-purpose ranges `public` never reaches;
//! - [`policy`]: the server's ceiling and a sandbox's request, and [`narrow`], which fits the
//!   request inside the ceiling or says what the server allows;
//! - [`egress`]: [`Egress`], the per-sandbox decisions (`check_resolve`, `filter_resolved`,
//!   `check_connect`, `check_udp`) and the record of what allowed names resolved to.
//!
//! - [`broker_server`]: [`NetworkBroker`], the daemon's side of each sandbox's worker channel:
//!   resolutions through the host's resolver, allowed connections opened and spliced, refusals
//!   kept for the model;
//! - [`host`]: the host's own addresses, which no sandbox reaches.
//!
//! # Configuration
//!
//! The admin sets the ceiling in the config file (or the mode alone with `--network-mode` /
//! `CAPSULE_NETWORK_MODE`, which beats the file's):
//!
//! ```toml
//! [network]
//! mode = "allowlist"        # "public" (the default), "allowlist" or "none"
//! allow = ["*.pkgs.example.org", "files.example.net:443", "10.1.0.0/16:5432"]
//! deny = ["evil.example", "[2001:db8::/32]:443"]
//! ```
//!
//! [`NetworkConfig`] is that table ([`NetworkPolicy::from_config`] checks it), the config file's
//! `network` field. In `public` mode `allow` may only list address ranges: the private ranges
//! sandboxes may reach besides the internet.
//!
//! # The request
//!
//! A sandbox asks for its network with [`capsule_tool_schemas::NetworkRequest`]:
//! `{"mode": "public"|"none"|"allowlist", "allow": [...], "deny": [...]}`, rules as above. A
//! sandbox that asks for nothing gets the ceiling ([`EffectivePolicy::from_ceiling`]). What it
//! asked for is kept in its settings ([`crate::record::SandboxSettings::network`]), so a
//! restarted server (or a fork) finds it again ([`EffectivePolicy::for_sandbox`]).
//!
//! Only [`broker_server`] opens sockets and resolves names; the rest decides.

pub mod broker_server;
pub mod egress;
pub mod host;
pub mod policy;
pub mod ranges;
pub mod rules;

pub use broker_server::{NetBrokerError, NetworkBroker, Traffic};
pub use egress::{Decision, Egress, Filtered};
pub use policy::{narrow, EffectivePolicy, NetworkConfig, NetworkPolicy, PolicyError};
pub use rules::{Rule, RuleError};

#[cfg(test)]
mod tests;
