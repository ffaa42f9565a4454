//! What capsule knows about one sandbox, and its lifecycle states: the facts the manager keeps
//! and the registry stores. The tool contract has its own wire types; `mcp/` maps these to them.
//!
//! Plain data: no rules (they are `sandbox::lifecycle`'s), no storage (the registry's).

use std::collections::BTreeMap;

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxState {
    /// Being created or restored; not usable yet.
    Creating,
    /// Running and ready for calls.
    Running,
    /// Frozen: memory saved to disk, no CPU used.
    Paused,
    /// Deleted; its state is gone.
    Deleted,
    /// Broken (its VM died); its in-memory state is lost.
    Failed,
    /// Its VM runs, but its agent stopped answering.
    Unresponsive,
}

impl SandboxState {
    /// Every state.
    pub const ALL: [SandboxState; 6] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Deleted,
        SandboxState::Failed,
        SandboxState::Unresponsive,
    ];

    /// The lowercase name (as the registry stores it).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Deleted => "deleted",
            SandboxState::Failed => "failed",
            SandboxState::Unresponsive => "unresponsive",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// What a sandbox was created with beyond its size: settings every command in it runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxSettings {
    /// Most processes one command or code context may run at once (`None`: the guest's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u32>,
    /// The network it asked for at creation, narrowed to fit the server's policy then (`None`:
    /// it asked for nothing, so it has the server's policy, also in records from before
    /// networks). See [`crate::network::EffectivePolicy::for_sandbox`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<capsule_tool_schemas::NetworkRequest>,
}

/// Everything the registry keeps about one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    /// Its id (`sb-` plus 12 hex digits).
    pub id: String,
    /// The owner (a client identity or an MCP session) it belongs to.
    pub owner: String,
    /// A name given at creation.
    pub name: Option<String>,
    /// Its state.
    pub state: SandboxState,
    /// Template it came from.
    pub template: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u32,
    /// Disk, in MiB.
    pub disk_mib: u32,
    /// Idle time before auto-pause, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Environment for everything run in it.
    pub env: BTreeMap<String, String>,
    /// What every command in it runs under.
    pub settings: SandboxSettings,
    /// Whether it is its owner's default sandbox.
    pub is_default: bool,
    /// The sandbox it was forked from.
    pub parent_id: Option<String>,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
    /// Last transition time (ms since the epoch).
    pub updated_ms: u64,
    /// When it was paused (ms since the epoch), while paused.
    pub paused_ms: Option<u64>,
    /// Why it failed.
    pub failure: Option<String>,
    /// The engine that runs it.
    pub engine: String,
    /// The engine's saved state (see [`crate::engine::Machine::saved_state`]).
    pub engine_state: serde_json::Value,
}

impl SandboxRecord {
    /// Whether it counts against the sandbox limit.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            SandboxState::Creating | SandboxState::Running | SandboxState::Paused | SandboxState::Unresponsive
        )
    }

    /// Whether it holds memory (counts against the memory budget).
    pub fn holds_memory(&self) -> bool {
        matches!(self.state, SandboxState::Creating | SandboxState::Running | SandboxState::Unresponsive)
    }
}

/// A template saved from a sandbox (`save_template`): what the registry keeps about it. Its
/// files are the engine's ([`TemplateRecord::engine_state`] says where).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRecord {
    /// Its name, unique on this host's state directory.
    pub name: String,
    /// The owner who saved it (who sees it, besides owners who see everything).
    pub owner: String,
    /// What it holds.
    pub description: Option<String>,
    /// The template the saved sandbox started from.
    pub base: String,
    /// The sandbox it was saved from.
    pub saved_from: String,
    /// vCPUs (fixed by its memory image).
    pub vcpus: u32,
    /// Memory, in MiB (fixed by its memory image).
    pub memory_mib: u32,
    /// Disk, in MiB (fixed by its disk image).
    pub disk_mib: u32,
    /// Bytes its files take on the host.
    pub bytes: u64,
    /// When it was saved (ms since the epoch).
    pub created_ms: u64,
    /// The engine that saved it (only that engine can start sandboxes from it).
    pub engine: String,
    /// Where the engine keeps its files.
    pub engine_state: serde_json::Value,
    /// For a template built from a spec (`capsule template build`), the content hash of its
    /// spec, files and base.
    pub spec_hash: Option<String>,
    /// The saved sandbox's environment: sandboxes made from it start with it (a create's
    /// `env` adds to it and wins where both name a variable).
    pub env: BTreeMap<String, String>,
    /// The saved sandbox's settings (its network and process cap): sandboxes made from it
    /// take each one their create does not name.
    pub settings: SandboxSettings,
}

/// The owner of templates built on the host from a spec: every client may use them.
pub const HOST_TEMPLATE_OWNER: &str = "host";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_parses_back_from_its_name() {
        for state in SandboxState::ALL {
            assert_eq!(SandboxState::parse(state.as_str()), Some(state));
        }
        assert_eq!(SandboxState::parse("Running"), None);
    }

    #[test]
    fn settings_keep_the_network_and_old_records_have_none() {
        use capsule_tool_schemas::{NetworkMode, NetworkRequest};
        let old: SandboxSettings = serde_json::from_str(r#"{"pids_max": 64}"#).unwrap();
        assert_eq!(old, SandboxSettings { pids_max: Some(64), network: None });
        assert_eq!(serde_json::to_string(&SandboxSettings::default()).unwrap(), "{}");
        let network =
            NetworkRequest { mode: NetworkMode::Allowlist, allow: vec!["*.example.com".into()], deny: vec![] };
        let settings = SandboxSettings { pids_max: None, network: Some(network) };
        let text = serde_json::to_string(&settings).unwrap();
        assert_eq!(serde_json::from_str::<SandboxSettings>(&text).unwrap(), settings);
    }
}
