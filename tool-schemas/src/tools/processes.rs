//! `run_command` and the tools for the processes it starts in the background.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

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
    /// With `background`: run it on a pseudo-terminal, for programs that need one (prompts,
    /// REPLs, `top`); `read_process` then returns what the terminal shows (stdout and stderr
    /// together). Default false.
    pub pty: Option<bool>,
    /// Rows of the pseudo-terminal (with `pty`). Default 24, at most 1000.
    pub rows: Option<u16>,
    /// Columns of the pseudo-terminal (with `pty`). Default 80, at most 1000.
    pub cols: Option<u16>,
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
    /// A limit it ran into (it was stopped, or a process of it was killed), if any.
    pub limit: Option<LimitHit>,
    /// Processes it left running that were killed when it ended.
    pub processes_killed: u32,
}

// ---------------------------------------------------------------------------
// read_process / kill_process / write_process
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
    /// A limit it ran into (it was stopped, or a process of it was killed), once it ended.
    pub limit: Option<LimitHit>,
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
    /// Whether a running process got it (false: it had exited already, or there is no such
    /// pid; killing it again is not an error).
    pub delivered: bool,
}

/// Send input to a background process (started by `run_command` with `background: true`), as
/// if typed: answer a prompt, feed a REPL, drive an interactive CLI. Then use `read_process`
/// for its answer. Set `close_stdin` to end its input (on a pseudo-terminal: Ctrl-D).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteProcessParams {
    /// The process id `run_command` returned.
    pub pid: u32,
    /// Sandbox of the process. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// The input, as text (at most 1 MiB). Include `\n` where Enter would be pressed.
    pub input: String,
    /// End the process's input after this. Default false.
    pub close_stdin: Option<bool>,
}

/// Result of `write_process`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteProcessResult {
    /// The sandbox of the process.
    pub sandbox_id: String,
    /// The process id.
    pub pid: u32,
    /// Input bytes the process has not read yet (this call's included).
    pub pending_bytes: u64,
}
