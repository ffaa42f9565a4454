//! The sandbox tools: `create_sandbox`, `list_sandboxes`, `pause`, `resume`, `fork`, `kill_sandbox`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

// ---------------------------------------------------------------------------
// create_sandbox
// ---------------------------------------------------------------------------

/// Create a new sandbox: a disposable Linux microVM with Python (numpy, pandas,
/// matplotlib), Node.js and bash. You rarely need this: every other tool uses
/// this session's default sandbox when `sandbox_id` is omitted and creates it
/// on first use. Create one explicitly to run several isolated environments, or
/// to pick its size. Sandboxes pause themselves when idle (no CPU or memory
/// used) and resume on the next call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxParams {
    /// Template to start from: `default` (Debian with Python, Node.js and bash), or one saved
    /// with `save_template` (`list_templates` lists them; a saved template fixes the size, so
    /// leave `vcpus`, `memory_mib` and `disk_mib` out or give its own). Default: `default`.
    pub template: Option<String>,
    /// Virtual CPUs. Default 1. Hosts using PVM virtualization run guests with exactly one.
    pub vcpus: Option<u32>,
    /// Memory in MiB. Default 1024; the server's configured maximum applies.
    pub memory_mib: Option<u32>,
    /// Writable disk in MiB. Default 2048; the server's configured maximum applies.
    pub disk_mib: Option<u32>,
    /// Seconds without calls before the sandbox is paused automatically. Default 600.
    pub idle_timeout_s: Option<u64>,
    /// Environment variables set for every command and code context in the sandbox.
    pub env: Option<BTreeMap<String, String>>,
    /// A name for your own reference (at most 64 characters).
    pub name: Option<String>,
    /// Make it this session's default sandbox (the one used when `sandbox_id` is omitted).
    /// Default: true when the session has no default sandbox yet.
    pub make_default: Option<bool>,
    /// Most processes one command or code context may run at once; past it the command is
    /// stopped, whole (so a fork bomb cannot take the sandbox down). 16 to 32768; default 1024.
    pub pids_max: Option<u32>,
    /// Internet access of the sandbox. Default: the server's policy (usually `public`).
    /// `{"mode": "public"}`: any public internet address; `{"mode": "none"}`: no network;
    /// `{"mode": "allowlist", "allow": [...]}`: only what the rules allow. A rule is a name
    /// (`pkgs.example.org`), a wildcard (`*.example.net`: its subdomains), or an address or CIDR
    /// range (`10.1.0.0/16`), each optionally with a port or port range (`pkgs.example.org:443`,
    /// `[2001:db8::/32]:8000-8999`); `deny` rules (same syntax) win over everything. Never
    /// reachable: loopback, the host itself, multicast and broadcast; private, link-local
    /// (cloud metadata) and other special ranges only through an address rule that covers them.
    /// The request can only narrow the server's policy: one that asks for more is refused with
    /// what the server allows. Forks keep their parent's network.
    pub network: Option<NetworkRequest>,
}

/// Result of `create_sandbox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CreateSandboxResult {
    /// The new sandbox.
    pub sandbox: SandboxInfo,
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

/// Pause a sandbox: its memory is saved and it uses no CPU. Nothing is lost;
/// any later call on it (or `resume`) resumes it transparently. Idle
/// sandboxes are paused automatically, so you rarely need this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseSandboxParams {
    /// Sandbox to pause. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
}

/// Resume a paused sandbox. Every other tool resumes a paused sandbox by
/// itself, so this is only needed to warm one up ahead of time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeSandboxParams {
    /// Sandbox to resume. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
}

/// Result of `pause`, `resume` and `kill_sandbox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxResult {
    /// The sandbox after the operation.
    pub sandbox: SandboxInfo,
}

/// Fork a sandbox into `count` independent copies of its current state (files,
/// processes, interpreter variables), e.g. to try several approaches from the
/// same starting point. The original is left as it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSandboxParams {
    /// Sandbox to fork (running or paused). Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Number of copies. Default 1, at most 8.
    pub count: Option<u32>,
}

/// Result of `fork`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForkSandboxResult {
    /// The sandbox that was forked.
    pub parent_id: String,
    /// The new copies, running.
    pub sandboxes: Vec<SandboxInfo>,
    /// What the copies share with the parent and what they do not, on this server's engine.
    pub note: Option<String>,
}

/// List this session's sandboxes with their state and size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSandboxesParams {}

/// Result of `list_sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListSandboxesResult {
    /// The sandboxes (deleted ones are not listed).
    pub sandboxes: Vec<SandboxInfo>,
    /// The default sandbox's id, if it exists yet.
    pub default_sandbox_id: Option<String>,
}

/// Restart a sandbox that stopped answering (`unresponsive`) or `failed`: its VM is booted
/// again on its own disk, so its files are kept (except under `/tmp`, which is in memory), but
/// its processes and interpreter state are lost. Works on a running or paused sandbox too (a
/// clean slate with the same files).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartSandboxParams {
    /// Sandbox to restart. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
}

/// Result of `restart_sandbox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RestartSandboxResult {
    /// The sandbox, running again.
    pub sandbox: SandboxInfo,
    /// What it came back from and what was lost.
    pub note: String,
}

/// Delete a sandbox for good: its processes, files and memory are gone. Use it
/// when you are done with a sandbox; idle ones are paused, not deleted, so an
/// explicit kill frees resources at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillSandboxParams {
    /// Sandbox to delete (required, so that nothing is deleted by accident).
    pub sandbox_id: String,
}
