//! Admission: what a new sandbox is (its request checked against the limits and the host, its
//! network narrowed against the server's policy, its id minted) and whether it fits (the count limit and the memory budget).
//!
//! Checks and registration happen under one lock ([`Admission`]), so that concurrent requests
//! cannot together pass a limit. It never starts a machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capsule_tool_schemas::{NetworkRequest, MAX_PIDS_MAX, MIN_PIDS_MAX};

use crate::config::Limits;
use crate::engine::{HostLimits, MachineSpec};
use crate::network::{narrow, EffectivePolicy, NetworkPolicy, PolicyError};
use crate::record::{SandboxRecord, SandboxState};
use crate::registry::now_ms;

/// The template every sandbox uses unless told otherwise.
pub const DEFAULT_TEMPLATE: &str = "default";
/// Longest sandbox name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most environment variables per sandbox.
pub const MAX_ENV_VARS: usize = 256;
/// Least memory a sandbox may have, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Least writable disk a sandbox may have, in MiB.
pub const MIN_DISK_MIB: u32 = 64;

/// What `create` is asked for (all optional; defaults come from the config).
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Template name.
    pub template: Option<String>,
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Disk in MiB.
    pub disk_mib: Option<u32>,
    /// Idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Name.
    pub name: Option<String>,
    /// Make it the owner's default (`None`: only if the owner has none).
    pub make_default: Option<bool>,
    /// Most processes one command or context may run at once (`None`: the default).
    pub pids_max: Option<u32>,
    /// The network asked for (`None`: the server's policy).
    pub network: Option<NetworkRequest>,
}

/// A limit a request would pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many sandboxes.
    #[error("this server allows at most {max} sandboxes and {live} exist ({paused} paused)")]
    Count {
        /// The limit.
        max: u32,
        /// Sandboxes alive (creating, running or paused).
        live: usize,
        /// Of which paused.
        paused: usize,
        /// How long paused sandboxes are kept, in seconds.
        retention_s: u64,
    },
    /// As many templates are saved as the server allows (0: saving is disabled).
    #[error("{}", templates_message(*max, *saved))]
    Templates {
        /// The limit (`limits.max_saved_templates`).
        max: u32,
        /// Templates saved.
        saved: usize,
    },
    /// Saved templates would take more of the host's disk than the server allows them.
    #[error(
        "saved templates take {used_mib} MiB of the {max_mib} MiB this server allows them, and this one \
         would take {needed_mib} MiB more; remove templates with `capsule template rm NAME`"
    )]
    TemplateBytes {
        /// Taken by the saved ones.
        used_mib: u64,
        /// The limit (`limits.max_saved_template_mib`).
        max_mib: u64,
        /// What this one takes.
        needed_mib: u64,
    },
    /// Not enough of the memory budget left.
    #[error(
        "running sandboxes use {used_mib} MiB of this server's {budget_mib} MiB memory budget and this needs \
         {needed_mib} MiB more"
    )]
    Memory {
        /// In use by running (and creating) sandboxes.
        used_mib: u64,
        /// The budget.
        budget_mib: u64,
        /// What the request needs.
        needed_mib: u64,
    },
}

fn templates_message(max: u32, saved: usize) -> String {
    if max == 0 {
        "saving templates is disabled on this server (limits.max_saved_templates = 0)".to_string()
    } else {
        format!(
            "this server allows at most {max} saved templates and {saved} exist; remove one with \
             `capsule template rm NAME`"
        )
    }
}

/// A request the limits or the host do not allow: which parameter, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// A fresh sandbox id.
pub fn new_sandbox_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = now_ms() ^ (COUNTER.fetch_add(1, Ordering::Relaxed) << 40) ^ u64::from(std::process::id());
        bytes.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sb-{hex}")
}

/// Checks `req` against the server's `limits` and what the `host` can give one guest, and makes
/// the new machine's spec.
pub fn validate(req: &CreateRequest, limits: &Limits, host: &HostLimits) -> Result<MachineSpec, BadRequest> {
    let vcpus = req.vcpus.unwrap_or(limits.default_vcpus);
    let memory_mib = req.memory_mib.unwrap_or(limits.default_memory_mib);
    let disk_mib = req.disk_mib.unwrap_or(limits.default_disk_mib);
    let bad = |why: String| Err(BadRequest(why));
    if vcpus == 0 {
        return bad("vcpus must be at least 1".into());
    }
    if vcpus > host.max_vcpus {
        return bad(format!(
            "vcpus={vcpus} is more than this host can give one guest ({}): {}",
            host.max_vcpus,
            host.why.clone().unwrap_or_default()
        ));
    }
    if vcpus > limits.max_vcpus {
        return bad(format!(
            "vcpus={vcpus} is over this server's limit of {} per sandbox; ask for {} or fewer",
            limits.max_vcpus, limits.max_vcpus
        ));
    }
    if memory_mib < MIN_MEMORY_MIB || memory_mib > limits.max_memory_mib {
        return bad(format!(
            "memory_mib={memory_mib} is out of range: use {MIN_MEMORY_MIB} to {} MiB",
            limits.max_memory_mib
        ));
    }
    if disk_mib < MIN_DISK_MIB || disk_mib > limits.max_disk_mib {
        return bad(format!("disk_mib={disk_mib} is out of range: use {MIN_DISK_MIB} to {} MiB", limits.max_disk_mib));
    }
    if let Some(name) = &req.name {
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
            return bad(format!("name must be 1 to {MAX_NAME_BYTES} bytes of printable text"));
        }
    }
    if req.env.len() > MAX_ENV_VARS {
        return bad(format!("at most {MAX_ENV_VARS} environment variables"));
    }
    if let Some(key) = req.env.keys().find(|key| key.is_empty() || key.contains('=') || key.contains('\0')) {
        return bad(format!("environment variable name {key:?} is invalid"));
    }
    if let Some(pids) = req.pids_max {
        if !(MIN_PIDS_MAX..=MAX_PIDS_MAX).contains(&pids) {
            return bad(format!("pids_max={pids} is out of range: use {MIN_PIDS_MAX} to {MAX_PIDS_MAX}"));
        }
    }
    // A saved template's name is checked, and its size applied, by the manager.
    let template = req.template.clone().unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    Ok(MachineSpec { id: new_sandbox_id(), template, vcpus, memory_mib, disk_mib, env: req.env.clone() })
}

/// The network policy of a new sandbox that asks for `request` under the server's `ceiling`,
/// or why the request asks for more than the server allows (the error says what it allows).
/// `none` always fits.
pub fn network(ceiling: &NetworkPolicy, request: Option<&NetworkRequest>) -> Result<EffectivePolicy, PolicyError> {
    match request {
        None => Ok(EffectivePolicy::from_ceiling(ceiling)),
        Some(request) => narrow(ceiling, request),
    }
}

/// Checks that `extra_count` new sandboxes holding `extra_mib` fit beside `records`.
pub fn check_capacity(
    records: &[SandboxRecord],
    limits: &Limits,
    retention: Duration,
    extra_count: usize,
    extra_mib: u64,
) -> Result<(), LimitError> {
    let live = records.iter().filter(|r| r.is_live()).count();
    if live + extra_count > limits.max_sandboxes as usize {
        let paused = records.iter().filter(|r| r.state == SandboxState::Paused).count();
        return Err(LimitError::Count { max: limits.max_sandboxes, live, paused, retention_s: retention.as_secs() });
    }
    let used_mib: u64 = records.iter().filter(|r| r.holds_memory()).map(|r| u64::from(r.memory_mib)).sum();
    if used_mib + extra_mib > limits.memory_budget_mib {
        return Err(LimitError::Memory { used_mib, budget_mib: limits.memory_budget_mib, needed_mib: extra_mib });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_tool_schemas::NetworkMode;

    fn host() -> HostLimits {
        HostLimits { max_vcpus: 4, why: Some("this host has 4 CPUs".into()) }
    }

    #[test]
    fn each_bad_field_is_named_with_its_limit() {
        let limits = Limits::default();
        let cases: Vec<(CreateRequest, &str)> = vec![
            (CreateRequest { vcpus: Some(0), ..Default::default() }, "vcpus must be at least 1"),
            (CreateRequest { vcpus: Some(5), ..Default::default() }, "vcpus=5 is more than this host"),
            (CreateRequest { memory_mib: Some(64), ..Default::default() }, "memory_mib=64 is out of range"),
            (CreateRequest { disk_mib: Some(1), ..Default::default() }, "disk_mib=1 is out of range"),
            (CreateRequest { name: Some(String::new()), ..Default::default() }, "name must be 1 to 64 bytes"),
            (CreateRequest { pids_max: Some(8), ..Default::default() }, "pids_max=8 is out of range: use 16 to 32768"),
        ];
        for (req, want) in cases {
            let err = validate(&req, &limits, &host()).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let env = BTreeMap::from([("A=B".to_string(), "x".to_string())]);
        let err = validate(&CreateRequest { env, ..Default::default() }, &limits, &host()).unwrap_err();
        assert!(err.to_string().contains("\"A=B\" is invalid"), "{err}");
        assert!(validate(&CreateRequest::default(), &limits, &host()).unwrap().id.starts_with("sb-"));
    }

    fn request(mode: NetworkMode, allow: &[&str]) -> NetworkRequest {
        NetworkRequest { mode, allow: allow.iter().map(|r| r.to_string()).collect(), deny: Vec::new() }
    }

    #[test]
    fn a_network_wider_than_the_server_allows_is_refused_saying_what_it_allows() {
        let ceiling = NetworkPolicy::new(NetworkMode::Allowlist, &["*.example.com".into()], &[]).unwrap();
        let err = network(&ceiling, Some(&request(NetworkMode::Public, &[]))).unwrap_err().to_string();
        assert!(err.contains("this server allows only allowlist mode with: *.example.com"), "{err}");
        assert!(err.contains("asked for public"), "{err}");
        let err = network(&ceiling, Some(&request(NetworkMode::Allowlist, &["*.example.org"]))).unwrap_err();
        assert!(err.to_string().contains("*.example.org is not inside any of them"), "{err}");
        let inside = network(&ceiling, Some(&request(NetworkMode::Allowlist, &["api.example.com"]))).unwrap();
        assert_eq!(inside.mode(), NetworkMode::Allowlist);
        assert_eq!(network(&ceiling, None).unwrap(), EffectivePolicy::from_ceiling(&ceiling));
    }

    #[test]
    fn no_network_always_fits() {
        let none = NetworkPolicy::new(NetworkMode::None, &[], &[]).unwrap();
        let allowlist = NetworkPolicy::new(NetworkMode::Allowlist, &["*.example.com".into()], &[]).unwrap();
        for ceiling in [NetworkPolicy::default(), none, allowlist] {
            let policy = network(&ceiling, Some(&request(NetworkMode::None, &[]))).unwrap();
            assert_eq!(policy.mode(), NetworkMode::None, "under {}", ceiling.describe());
        }
    }

    #[test]
    fn a_recorded_request_keeps_its_layer_when_the_ceiling_narrows_later() {
        let asked = request(NetworkMode::Public, &[]);
        let now_none = NetworkPolicy::new(NetworkMode::None, &[], &[]).unwrap();
        let policy = EffectivePolicy::for_sandbox(&now_none, Some(&asked));
        assert_eq!(policy.mode(), NetworkMode::None, "the ceiling's layer still holds");
        assert_eq!(EffectivePolicy::for_sandbox(&now_none, None).mode(), NetworkMode::None);
    }
}
