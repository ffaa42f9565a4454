//! Sandboxes: their records, their lifecycle, the manager that owns them and its timers.
//!
//! - [`lifecycle`]: which state transitions are legal.
//! - [`manager`]: creates, resolves (default sandbox, unknown ids), resumes,
//!   pauses, forks and deletes sandboxes; enforces limits; records every
//!   transition in the registry before reporting it.
//! - [`timers`]: idle auto-pause and retention deletion.
//!
//! Nothing here speaks MCP; nothing here knows how a VM works (that is the engine).

pub mod lifecycle;
pub mod manager;
pub mod timers;

use std::collections::BTreeMap;

pub use capsule_tool_schemas::{SandboxInfo, SandboxState};
pub use manager::{Lease, Manager, ManagerConfig, ManagerError, Owner};

/// Everything the registry keeps about one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    /// Its id (`sb-` plus 12 hex digits).
    pub id: String,
    /// The MCP session (or shared owner) it belongs to.
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
    /// The record as tools report it.
    pub fn info(&self) -> SandboxInfo {
        SandboxInfo {
            sandbox_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            template: self.template.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            idle_timeout_s: self.idle_timeout_ms / 1000,
            is_default: self.is_default,
            parent_id: self.parent_id.clone(),
            created_unix_ms: self.created_ms,
            failure: self.failure.clone(),
        }
    }

    /// Whether it counts against the sandbox limit.
    pub fn is_live(&self) -> bool {
        matches!(self.state, SandboxState::Creating | SandboxState::Running | SandboxState::Paused)
    }

    /// Whether it holds memory (counts against the memory budget).
    pub fn holds_memory(&self) -> bool {
        matches!(self.state, SandboxState::Creating | SandboxState::Running)
    }
}
