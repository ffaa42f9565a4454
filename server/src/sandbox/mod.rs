//! Sandboxes: their records, their lifecycle, the manager that owns them and its timers.
//!
//! - [`lifecycle`]: which state transitions are legal.
//! - [`admission`]: what a new sandbox is and whether it fits the limits.
//! - [`capacity`]: those limits applied to the live sandboxes, atomically.
//! - [`manager`]: creates, resolves (default sandbox, unknown ids), resumes,
//!   pauses and deletes sandboxes; records every transition in the registry
//!   before reporting it.
//! - [`fork`]: N children from one moment of a parent.
//! - [`health`]: dead VMs, silent agents, and restarting a sandbox.
//! - [`network`]: each sandbox's network policy and its worker's channel to the broker.
//! - [`recovery`]: what a restarted manager finds of each recorded sandbox.
//! - [`templates`]: saving a sandbox as a template, and the saved templates.
//! - [`timers`]: idle auto-pause and retention deletion.
//!
//! The records and their states are [`crate::record`]'s.
//!
//! Nothing here speaks MCP; nothing here knows how a VM works (that is the engine).

pub mod admission;
pub mod capacity;
pub mod error;
pub mod fork;
pub mod health;
pub mod lifecycle;
pub mod manager;
pub mod network;
pub mod recovery;
pub mod templates;
pub mod timers;

pub use crate::record::{SandboxRecord, SandboxState};
pub use admission::{CreateRequest, LimitError};
pub use manager::{Lease, Manager, ManagerConfig, ManagerError, Owner};
