//! Params and results of every capsule tool, one module per group of tools.
//!
//! Doc comments here become the JSON-schema descriptions a model reads. The
//! doc comment of each `*Params` struct is the tool's description. Keep them
//! short, concrete, and say the default and the limit of every knob.
//!
//! Defaults and limits that the server enforces are constants here, so the
//! contract and the implementation cannot disagree.

mod code;
mod files;
mod network;
mod processes;
mod sandboxes;
mod templates;

pub use code::*;
pub use files::*;
pub use network::*;
pub use processes::*;
pub use sandboxes::*;
pub use templates::*;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default time limit of `run_code` and `run_command`, in seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 60;
/// Largest time limit of `run_code` and `run_command`, in seconds.
pub const MAX_TIMEOUT_S: u64 = 3600;
/// Default number of bytes `read_file` returns.
pub const DEFAULT_READ_LIMIT_BYTES: u64 = 256 * 1024;
/// Largest number of bytes one `read_file` call returns.
pub const MAX_READ_LIMIT_BYTES: u64 = 4 * 1024 * 1024;
/// Largest decoded size of one `write_file` call, in bytes.
pub const MAX_WRITE_BYTES: u64 = 16 * 1024 * 1024;
/// Default depth of `list_files`.
pub const DEFAULT_LIST_DEPTH: u32 = 1;
/// Largest depth of `list_files`.
pub const MAX_LIST_DEPTH: u32 = 8;
/// Most entries `list_files` returns.
pub const MAX_LIST_ENTRIES: usize = 2000;
/// Most copies one `fork` call makes.
pub const MAX_FORK_COUNT: u32 = 8;
/// Processes one command (or one code context) may run at once, unless its sandbox was
/// created with another `pids_max`.
pub const DEFAULT_PIDS_MAX: u32 = 1024;
/// Fewest processes a sandbox's `pids_max` may allow.
pub const MIN_PIDS_MAX: u32 = 16;
/// Most processes a sandbox's `pids_max` may allow (a small guest's kernel allows fewer, and
/// says so when a command starts).
pub const MAX_PIDS_MAX: u32 = 32768;
/// Longest side of a pseudo-terminal, in rows or columns.
pub const MAX_PTY_SIDE: u16 = 1000;
/// Most input bytes one `write_process` call sends.
pub const MAX_PROCESS_INPUT_BYTES: usize = 1024 * 1024;
/// Default number of bytes per stream `read_process` returns.
pub const DEFAULT_PROCESS_READ_BYTES: u64 = 32 * 1024;

// ---------------------------------------------------------------------------
// Shared types
// ---------------------------------------------------------------------------

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created or restored; not usable yet.
    Creating,
    /// Running and ready for calls.
    Running,
    /// Frozen: memory saved, no CPU used. Any call on it resumes it transparently.
    Paused,
    /// Deleted; its state is gone.
    Deleted,
    /// Broken (its VM died); its in-memory state is lost. Kill it and create a new one.
    Failed,
    /// Its VM runs but its agent stopped answering (a runaway process may starve it).
    /// `restart_sandbox` brings it back.
    Unresponsive,
}

/// A limit a command or a code cell ran into, and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LimitHit {
    /// It tried to run more processes than allowed and was stopped, all of it.
    Pids {
        /// The limit: processes at once.
        max: u32,
    },
    /// The out-of-memory killer killed a process of it at its memory limit.
    Memory {
        /// The limit, in MiB.
        max_mib: u64,
    },
}

/// A sandbox as the tools report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxInfo {
    /// Its id; pass it as `sandbox_id` to target this sandbox.
    pub sandbox_id: String,
    /// Its name, if one was given.
    pub name: Option<String>,
    /// Its lifecycle state.
    pub state: SandboxState,
    /// The template it was made from.
    pub template: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u32,
    /// Writable disk, in MiB.
    pub disk_mib: u32,
    /// Seconds without calls after which it is paused automatically.
    pub idle_timeout_s: u64,
    /// Whether it is this session's default sandbox (used when `sandbox_id` is omitted).
    pub is_default: bool,
    /// The sandbox it was forked from, if any.
    pub parent_id: Option<String>,
    /// Creation time, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Why it failed, when `state` is `failed`.
    pub failure: Option<String>,
    /// Processes one command or code context may run at once.
    pub pids_max: u32,
    /// Its network: `public` (public internet addresses), `allowlist` (only what its rules and
    /// the server's allow) or `none`.
    pub network: NetworkMode,
}

/// Programming languages of `run_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Python 3 with numpy, pandas and matplotlib.
    #[default]
    Python,
    /// Node.js; top-level `await` works.
    Javascript,
    /// A persistent bash shell.
    Bash,
}

impl Language {
    /// The lowercase name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// Output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A stream that was cut to fit the result, and where the whole of it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Truncation {
    /// Which stream was cut.
    pub stream: OutputStream,
    /// Bytes of it shown in this result.
    pub shown_bytes: u64,
    /// Bytes it had in all (when known).
    pub total_bytes: Option<u64>,
    /// Path inside the sandbox of a file holding the complete stream, when kept.
    /// Read it with `read_file` (use `offset` and `limit` for large files).
    pub full_output_path: Option<String>,
}
