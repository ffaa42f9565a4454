//! Params and results of every capsule tool.
//!
//! Doc comments here become the JSON-schema descriptions a model reads. The
//! doc comment of each `*Params` struct is the tool's description. Keep them
//! short, concrete, and say the default and the limit of every knob.
//!
//! Defaults and limits that the server enforces are constants here, so the
//! contract and the implementation cannot disagree.

use std::collections::BTreeMap;

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
    /// Template to start from. Default: `default` (Debian with Python, Node.js and bash).
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
}

/// Result of `create_sandbox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CreateSandboxResult {
    /// The new sandbox.
    pub sandbox: SandboxInfo,
}

// ---------------------------------------------------------------------------
// run_code
// ---------------------------------------------------------------------------

/// Run a cell of code in a persistent interpreter, like a Jupyter notebook:
/// variables, imports and functions survive between calls in the same context.
/// The value of the last expression is returned, stdout and stderr are
/// captured, exceptions come back as name, value and traceback, and matplotlib
/// figures come back as PNG images. Use this for computation, data analysis and
/// plots; use `run_command` for shell commands and programs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeParams {
    /// The code to run.
    pub code: String,
    /// Language of the code. Default: `python`.
    pub language: Option<Language>,
    /// Sandbox to run in. Default: this session's default sandbox (created on first use).
    pub sandbox_id: Option<String>,
    /// Name of the interpreter context; each context keeps its own state.
    /// Default: the language name (one shared context per language).
    pub context: Option<String>,
    /// Time limit in seconds; the cell is interrupted when it passes. Default 60, at most 3600.
    pub timeout_s: Option<u64>,
}

/// One rich result of a cell: the value of its last expression, or a display/figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CodeResult {
    /// Plain-text form, when the result has one.
    pub text: Option<String>,
    /// HTML form (e.g. a pandas table), when the result has one.
    pub html: Option<String>,
    /// Every MIME type the result came with (images are returned as image content).
    pub mime_types: Vec<String>,
    /// Whether this is the value of the cell's last expression.
    pub is_main_result: bool,
}

/// An exception raised by a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CodeErrorInfo {
    /// Exception type, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message, e.g. `division by zero`.
    pub value: String,
    /// The traceback, without colours.
    pub traceback: String,
}

/// Result of `run_code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCodeResult {
    /// The sandbox it ran in.
    pub sandbox_id: String,
    /// The context it ran in.
    pub context: String,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
    /// Rich results: the last expression's value and displays. Images come as image content.
    pub results: Vec<CodeResult>,
    /// The exception, if the cell raised one.
    pub error: Option<CodeErrorInfo>,
    /// The context's cell counter after this cell.
    pub execution_count: u64,
    /// Wall time of the cell, in milliseconds.
    pub duration_ms: u64,
    /// Whether the cell was interrupted because it ran past `timeout_s`.
    pub timed_out: bool,
    /// Whether the interpreter had to restart, losing the context's variables.
    pub context_restarted: bool,
    /// For bash: the exit status of the cell's last command.
    pub exit_code: Option<i32>,
    /// Streams cut to fit this result, and where their full text lives.
    pub truncated: Vec<Truncation>,
    /// Displayed results left out because this result was full (the text says the limits).
    pub results_left_out: u64,
    /// Images left out because this result was full (the text says the limits).
    pub images_left_out: u64,
}

// ---------------------------------------------------------------------------
// run_command
// ---------------------------------------------------------------------------

/// Run a shell command (through `/bin/sh -c`) in a sandbox and return its exit
/// code, stdout and stderr. Use it to install packages, run programs, build
/// and test code, or inspect the system. Set `background` for servers and
/// long jobs: you get a process id at once, then use `read_process` for its
/// output and `kill_process` to stop it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandParams {
    /// The shell command line, e.g. `pip install requests && python3 app.py`.
    pub command: String,
    /// Sandbox to run in. Default: this session's default sandbox (created on first use).
    pub sandbox_id: Option<String>,
    /// Working directory. Default: the sandbox's work directory.
    pub cwd: Option<String>,
    /// Extra environment variables for this command.
    pub env: Option<BTreeMap<String, String>>,
    /// Text fed to the command's standard input. Default: empty stdin.
    pub stdin: Option<String>,
    /// Time limit in seconds; the command is killed when it passes. Default 60, at most 3600.
    /// Ignored for background commands.
    pub timeout_s: Option<u64>,
    /// Start in the background and return its process id at once. Default false.
    pub background: Option<bool>,
}

/// Result of `run_command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCommandResult {
    /// The sandbox it ran in.
    pub sandbox_id: String,
    /// Process id, for background commands (use it with `read_process` and `kill_process`).
    pub pid: Option<u32>,
    /// Exit code, when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
    /// Wall time, in milliseconds.
    pub duration_ms: u64,
    /// Whether it was killed because it ran past `timeout_s`.
    pub timed_out: bool,
    /// Streams cut to fit this result, and where their full text lives.
    pub truncated: Vec<Truncation>,
}

// ---------------------------------------------------------------------------
// read_process / kill_process
// ---------------------------------------------------------------------------

/// Read the new output of a background process (started by `run_command` with
/// `background: true`) and whether it is still running. Pass the offsets from
/// the previous call to get only what is new.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadProcessParams {
    /// The process id `run_command` returned.
    pub pid: u32,
    /// Sandbox of the process. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Byte offset into the process's whole stdout. Default 0 (from the start).
    pub stdout_offset: Option<u64>,
    /// Byte offset into the process's whole stderr. Default 0 (from the start).
    pub stderr_offset: Option<u64>,
    /// Most bytes per stream to return. Default 32768.
    pub max_bytes: Option<u64>,
}

/// Result of `read_process`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadProcessResult {
    /// The sandbox of the process.
    pub sandbox_id: String,
    /// The process id.
    pub pid: u32,
    /// Whether the process is still running.
    pub running: bool,
    /// Exit code, once it exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// New stdout since `stdout_offset`.
    pub stdout: String,
    /// New stderr since `stderr_offset`.
    pub stderr: String,
    /// Pass as `stdout_offset` next time.
    pub next_stdout_offset: u64,
    /// Pass as `stderr_offset` next time.
    pub next_stderr_offset: u64,
}

/// Stop a process in a sandbox by sending it a signal (default SIGKILL).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillProcessParams {
    /// The process id.
    pub pid: u32,
    /// Sandbox of the process. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Signal number. Default 9 (SIGKILL); 15 (SIGTERM) asks it to stop cleanly.
    pub signal: Option<i32>,
}

/// Result of `kill_process`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillProcessResult {
    /// The sandbox of the process.
    pub sandbox_id: String,
    /// The process id.
    pub pid: u32,
    /// The signal sent.
    pub signal: i32,
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// How file content is encoded in a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContentEncoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Base64 of arbitrary bytes.
    Base64,
}

/// Write a file in a sandbox, creating missing parent directories. Content is
/// text by default; use `encoding: base64` for binary data. Set `append` to add
/// to the end of an existing file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// Destination path, absolute or relative to the sandbox's work directory.
    pub path: String,
    /// The content (at most 16 MiB once decoded).
    pub content: String,
    /// How `content` is encoded. Default: `text`.
    pub encoding: Option<ContentEncoding>,
    /// Sandbox to write in. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Permission bits as an octal string, e.g. `"755"` for an executable script. Default `"644"`.
    pub mode: Option<String>,
    /// Append to the file instead of replacing it. Default false.
    pub append: Option<bool>,
}

/// Result of `write_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteFileResult {
    /// The sandbox written to.
    pub sandbox_id: String,
    /// The path written.
    pub path: String,
    /// Bytes written by this call.
    pub bytes_written: u64,
}

/// Read a file from a sandbox. Text comes back as text; images (PNG, JPEG,
/// GIF, WebP) come back as image content; other binary data as base64. Large
/// files are read in pieces with `offset` and `limit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// Path, absolute or relative to the sandbox's work directory.
    pub path: String,
    /// Sandbox to read from. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Byte offset to start at. Default 0.
    pub offset: Option<u64>,
    /// Most bytes to return. Default 262144 (256 KiB), at most 4194304 (4 MiB).
    pub limit: Option<u64>,
}

/// Result of `read_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadFileResult {
    /// The sandbox read from.
    pub sandbox_id: String,
    /// The path read.
    pub path: String,
    /// The file's whole size in bytes.
    pub size: u64,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Bytes returned.
    pub bytes_read: u64,
    /// How `content` is encoded: `text`, `base64`, or `image` (the bytes are in the image content).
    pub encoding: String,
    /// The content: text, or base64; absent for images.
    pub content: Option<String>,
    /// MIME type, for images.
    pub mime_type: Option<String>,
    /// Whether bytes remain after this piece; read on from `next_offset`.
    pub has_more: bool,
    /// Offset to pass next time to continue.
    pub next_offset: u64,
}

/// List the files under a directory of a sandbox, with size, kind and mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// Directory to list. Default: the sandbox's work directory.
    pub path: Option<String>,
    /// How deep to descend: 1 lists direct entries only. Default 1, at most 8.
    pub depth: Option<u32>,
    /// Sandbox to list. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
}

/// Kinds of filesystem entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else.
    Other,
}

/// One entry of `list_files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileEntry {
    /// Path relative to the listed directory.
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits as an octal string, e.g. `"644"`.
    pub mode: String,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_unix_ms: i64,
}

/// Result of `list_files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListFilesResult {
    /// The sandbox listed.
    pub sandbox_id: String,
    /// The directory listed.
    pub path: String,
    /// Its entries (at most 2000).
    pub entries: Vec<FileEntry>,
    /// Whether entries were left out because there were more than 2000.
    pub truncated: bool,
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

/// Delete a sandbox for good: its processes, files and memory are gone. Use it
/// when you are done with a sandbox; idle ones are paused, not deleted, so an
/// explicit kill frees resources at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillSandboxParams {
    /// Sandbox to delete (required, so that nothing is deleted by accident).
    pub sandbox_id: String,
}
