//! The host↔guest protocol: every message that crosses the agent's byte stream.
//!
//! One connection carries many concurrent requests. The host opens with a
//! [`Hello`]; the agent answers with [`HelloReply`]. After that, each
//! [`ClientFrame`] names a request id chosen by the host, and every
//! [`AgentFrame`] about that request carries the same id: zero or more
//! [`Event`]s (ordered output), then exactly one final frame,
//! [`AgentMessage::Done`] or [`AgentMessage::Failed`].
//!
//! Connections do not survive a snapshot (vsock is reset), so nothing here
//! depends on per-connection state beyond the requests in flight: processes
//! and language contexts live in the agent, not in the connection.
//!
//! # Containment (capability [`capability::CGROUPS`])
//!
//! Every command ([`Op::Exec`]) and every context's interpreter runs in its
//! own cgroup (v2) under the agent's `workloads/` cgroup, with `pids.max` and
//! `memory.max`/`memory.high` ([`ProcessLimits`]; the guest's defaults and
//! ceilings are in [`HelloReply::containment`]). The agent itself lives in
//! `agent/` beside it, with memory reserved for it, so a fork bomb or a memory
//! hog is stopped, reported ([`ExitStatus::limit`], [`CodeOutcome::limit`]),
//! and the agent goes on answering.
//!
//! # Testing an unresponsive agent (the freeze hook)
//!
//! Because the agent has a cgroup of its own, a command can freeze it with
//! the cgroup-v2 freezer, PID 1 included:
//! `echo 1 > /sys/fs/cgroup/agent/cgroup.freeze`. From then on the agent
//! reads and answers nothing (not even [`Op::Ping`]) while commands and
//! contexts keep running, exactly what a host must survive when a guest stops
//! answering. Writing `0` there thaws it (for instance from a background
//! command started beforehand: `(sleep 5; echo 0 > /sys/fs/cgroup/agent/cgroup.freeze) &`),
//! and the agent carries on where it stopped. Nothing in the agent blocks it.
//!
//! This module holds plain data only. Framing lives in [`crate::frame`];
//! behaviour lives in the agent and the client.

use serde::{Deserialize, Serialize};

/// Version of this protocol. The agent refuses a host whose version differs.
/// 2: process limits and limit outcomes, interactive background processes.
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Hard cap on one frame's payload, in bytes. Larger frames close the connection.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Largest data payload of one file read or write request, in bytes.
/// Larger transfers are split by the client into several requests.
pub const MAX_FILE_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Default per-stream cap on output streamed back for one request, in bytes.
/// Past it the agent keeps the whole stream in a file and says where.
pub const DEFAULT_OUTPUT_CAP_BYTES: u64 = 1024 * 1024;

/// The request id chosen by the host. Id 0 is reserved for the handshake.
pub type RequestId = u64;

/// Capabilities the agent may advertise in [`HelloReply::capabilities`].
pub mod capability {
    /// Runs commands.
    pub const EXEC: &str = "exec";
    /// Reads and writes files.
    pub const FILES: &str = "files";
    /// Runs Python cells in persistent contexts.
    pub const PYTHON: &str = "python";
    /// Runs JavaScript cells in persistent contexts.
    pub const JAVASCRIPT: &str = "javascript";
    /// Runs Bash cells in persistent contexts.
    pub const BASH: &str = "bash";
    /// Sets the guest clock and adds entropy (needs privileges: PID 1 in a guest).
    pub const CLOCK_AND_ENTROPY: &str = "clock-and-entropy";
    /// Every command and context runs in its own cgroup with [`ProcessLimits`]
    /// (see [`HelloReply::containment`]); without it limits are not enforced
    /// and the limit fields of outcomes stay empty.
    pub const CGROUPS: &str = "cgroups";
    /// Background processes take input ([`Op::WriteProcess`](super::Op::WriteProcess))
    /// and can run on a pseudo-terminal ([`ExecRequest::pty`](super::ExecRequest::pty)).
    pub const INTERACTIVE: &str = "interactive";
}

/// Most bytes of one [`Op::WriteProcess`] (also the most a process may have
/// queued and not yet read).
pub const MAX_PENDING_INPUT_BYTES: usize = 1024 * 1024;

/// Largest pseudo-terminal size in rows and in columns.
pub const MAX_PTY_SIDE: u16 = 1000;

// ---------------------------------------------------------------------------
// Host → agent
// ---------------------------------------------------------------------------

/// One frame from the host to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// The request this frame starts or refers to.
    pub id: RequestId,
    /// What the host says.
    pub body: ClientMessage,
}

/// What the host can say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Opens the conversation; must be the first frame, with id 0.
    Hello(Hello),
    /// Starts request `id`. The id must not be in flight on this connection.
    Request(Request),
    /// Cancels request `id`: a running process is killed, a running cell interrupted.
    Cancel,
}

/// The host's opening frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The host's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Free-form name of the host side, for logs.
    pub client: String,
}

/// A request: an operation plus an optional deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds from receipt after which the agent gives up. For `Exec`
    /// and `RunCode` the process is killed / the cell interrupted and the final
    /// frame says `timed_out`; other operations fail with [`ErrorKind::Timeout`].
    pub timeout_ms: Option<u64>,
    /// What to do.
    pub op: Op,
}

/// Every operation the agent performs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Liveness check; replies [`Reply::Pong`].
    Ping,
    /// Runs a command. Foreground: streams output then [`Reply::Exit`].
    /// Background: replies [`Reply::Started`] at once.
    Exec(ExecRequest),
    /// Sends a signal to a process (by guest pid). Replies [`Reply::Unit`].
    /// For a process the agent started: its process group gets it while its
    /// leader runs, and signal 9 kills the command's whole cgroup, so
    /// processes that escaped the group die too; once a background leader
    /// exited, what it left running in its cgroup gets the signal. Any other
    /// pid gets it alone.
    Signal {
        /// Guest process id.
        pid: u32,
        /// Signal number, e.g. 15 for SIGTERM, 9 for SIGKILL.
        signal: i32,
    },
    /// Lists processes started by the agent. Replies [`Reply::Processes`].
    ListProcesses,
    /// Fetches a background process's output since the given offsets.
    /// Replies [`Reply::ProcessOutput`].
    ReadProcessOutput {
        /// Guest process id of a process the agent started in the background.
        pid: u32,
        /// Byte offset into the process's whole stdout.
        stdout_offset: u64,
        /// Byte offset into the process's whole stderr.
        stderr_offset: u64,
        /// Most bytes to return per stream (capped at [`MAX_FILE_CHUNK_BYTES`]).
        max_bytes: u64,
    },
    /// Runs a cell of code in a named, persistent language context (created on
    /// first use). Streams output and rich results, then [`Reply::CodeDone`].
    RunCode(RunCodeRequest),
    /// Creates a context. Fails with [`ErrorKind::AlreadyExists`] if the name is taken.
    CreateContext {
        /// Context name.
        name: String,
        /// Its language.
        language: Language,
        /// Limits of its interpreter (and everything its cells start); the
        /// guest's defaults when `None`. They last for the context's life,
        /// restarts included.
        limits: Option<ProcessLimits>,
    },
    /// Restarts a context's interpreter, dropping its state.
    ResetContext {
        /// Context name.
        name: String,
    },
    /// Stops and forgets a context.
    RemoveContext {
        /// Context name.
        name: String,
    },
    /// Lists contexts. Replies [`Reply::Contexts`].
    ListContexts,
    /// Writes one chunk of a file (at most [`MAX_FILE_CHUNK_BYTES`]).
    WriteFile(WriteFileRequest),
    /// Reads a byte range of a file. Replies [`Reply::FileData`].
    ReadFile {
        /// Absolute path, or relative to the agent's working directory.
        path: String,
        /// Byte offset to start at.
        offset: u64,
        /// Most bytes to return (capped at [`MAX_FILE_CHUNK_BYTES`]).
        length: u64,
    },
    /// Lists a directory to a depth (1 = its direct entries). Replies [`Reply::Entries`].
    ListDir {
        /// Directory path.
        path: String,
        /// How deep to descend; at least 1.
        depth: u32,
    },
    /// Describes one path without following a final symlink. Replies [`Reply::Stat`].
    Stat {
        /// The path.
        path: String,
    },
    /// Creates a directory and its missing parents (`mkdir -p`).
    MakeDir {
        /// The path.
        path: String,
        /// Permission bits for created directories, e.g. 0o755.
        mode: Option<u32>,
    },
    /// Removes a file, or a directory (with `recursive` when not empty).
    Remove {
        /// The path.
        path: String,
        /// Remove a directory and everything below it.
        recursive: bool,
    },
    /// Renames (moves) a path.
    Rename {
        /// Existing path.
        from: String,
        /// New path.
        to: String,
    },
    /// Sets the guest's wall clock (after restore or fork).
    SetClock {
        /// Nanoseconds since the Unix epoch.
        unix_time_ns: u64,
    },
    /// Mixes fresh host entropy into the guest RNG and reseeds it (after restore or fork).
    AddEntropy {
        /// Random bytes from the host (at most 4096).
        bytes: Vec<u8>,
    },
    /// Syncs filesystems and powers the guest off (or reboots). PID 1 only.
    Shutdown {
        /// Reboot instead of powering off.
        reboot: bool,
    },
    /// Queues input for a background process's stdin (its pipe, or its
    /// terminal with [`ExecRequest::pty`]). Replies [`Reply::InputQueued`] at
    /// once; the agent writes it as the process reads. Fails with
    /// [`ErrorKind::Closed`] once the process exited or its stdin was closed,
    /// [`ErrorKind::InvalidArgument`] for a foreground process, and
    /// [`ErrorKind::TooLarge`] when `data` would put more than
    /// [`MAX_PENDING_INPUT_BYTES`] unread in the queue.
    WriteProcess {
        /// Guest pid of a process the agent started in the background.
        pid: u32,
        /// The bytes (may be empty, e.g. to only close).
        data: Vec<u8>,
        /// After `data`, close stdin: the process reads end of file. On a
        /// terminal this sends the end-of-file character (Ctrl-D) instead,
        /// which a program reading a line sees as end of file.
        close_stdin: bool,
    },
    /// Changes the size of a background process's terminal (it gets `SIGWINCH`).
    /// Fails with [`ErrorKind::InvalidArgument`] when it has none.
    ResizePty {
        /// Guest pid of a process started with [`ExecRequest::pty`].
        pid: u32,
        /// The new size.
        size: PtySize,
    },
}

/// The command an [`Op::Exec`] runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Run through `/bin/sh -c`.
    Shell(String),
    /// Run directly: the first element is the program, looked up in `PATH`.
    Argv(Vec<String>),
}

/// Parameters of [`Op::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// What to run.
    pub command: Command,
    /// Working directory; the agent's default when `None`.
    pub cwd: Option<String>,
    /// Extra environment variables, applied over the agent's default environment.
    pub env: Vec<(String, String)>,
    /// Foreground: bytes fed to stdin, which is then closed; `None` gives an
    /// empty stdin. Background: stdin is a pipe the agent keeps open for
    /// [`Op::WriteProcess`]; these bytes are written first (at most
    /// [`MAX_PENDING_INPUT_BYTES`]).
    pub stdin: Option<Vec<u8>>,
    /// Start in the background and reply [`Reply::Started`] at once.
    pub background: bool,
    /// Per-stream cap on output streamed back; [`DEFAULT_OUTPUT_CAP_BYTES`] when `None`.
    pub output_cap_bytes: Option<u64>,
    /// Limits of the command's cgroup; the guest's defaults when `None`
    /// (see [`HelloReply::containment`]).
    pub limits: Option<ProcessLimits>,
    /// Run on a pseudo-terminal of this size (background commands only): the
    /// process gets a new session with the terminal as its controlling tty on
    /// stdin, stdout and stderr; its output is one stream, read as stdout by
    /// [`Op::ReadProcessOutput`], and [`Op::WriteProcess`] types into it.
    pub pty: Option<PtySize>,
}

/// Limits of one command's or context's cgroup. A field left `None` takes the
/// guest's default ([`Containment`]); a value above the guest's ceiling is
/// refused with [`ErrorKind::InvalidArgument`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessLimits {
    /// Most processes and threads alive at once in the cgroup (`pids.max`), at least 1.
    pub pids_max: Option<u32>,
    /// Most memory of the cgroup (`memory.max`), page cache included, at
    /// least [`MIN_MEMORY_MAX_BYTES`]. Past 90% of it (`memory.high`) the
    /// kernel reclaims and slows the cgroup down; at it, the out-of-memory
    /// killer kills a process of this cgroup (never the agent's).
    pub memory_max_bytes: Option<u64>,
}

/// Smallest [`ProcessLimits::memory_max_bytes`] the agent accepts.
pub const MIN_MEMORY_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// The size of a pseudo-terminal, each side 1 to [`MAX_PTY_SIDE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns (characters per line).
    pub cols: u16,
}

impl ExecRequest {
    /// Runs `command` with every other field at its default: the agent's
    /// working directory and environment, an empty stdin, in the foreground,
    /// with the default output cap and limits, without a terminal.
    pub fn new(command: Command) -> ExecRequest {
        ExecRequest {
            command,
            cwd: None,
            env: Vec::new(),
            stdin: None,
            background: false,
            output_cap_bytes: None,
            limits: None,
            pty: None,
        }
    }

    /// [`ExecRequest::new`] for a `/bin/sh -c` script.
    pub fn shell(script: &str) -> ExecRequest {
        ExecRequest::new(Command::Shell(script.to_owned()))
    }

    /// [`ExecRequest::new`] for a program and its arguments.
    pub fn argv(args: &[&str]) -> ExecRequest {
        ExecRequest::new(Command::Argv(args.iter().map(|a| (*a).to_owned()).collect()))
    }
}

/// Languages of persistent code contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Language {
    /// CPython 3, Jupyter-like cells.
    Python,
    /// Node.js, with top-level `await`.
    JavaScript,
    /// A persistent bash shell.
    Bash,
}

impl Language {
    /// The lowercase name used in tool parameters and context names.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// Parameters of [`Op::RunCode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCodeRequest {
    /// Context name; created with `language` on first use.
    pub context: String,
    /// Language of the cell; must match an existing context's language.
    pub language: Language,
    /// The source of the cell.
    pub code: String,
    /// Per-stream cap on output streamed back; [`DEFAULT_OUTPUT_CAP_BYTES`] when `None`.
    pub output_cap_bytes: Option<u64>,
    /// Limits of the context's interpreter when this request creates the
    /// context (see [`Op::CreateContext`]). For an existing context `None`
    /// or its own limits are accepted; other limits are refused with
    /// [`ErrorKind::InvalidArgument`] (reset does not change them: remove
    /// and create the context).
    pub limits: Option<ProcessLimits>,
}

/// Parameters of [`Op::WriteFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Destination path.
    pub path: String,
    /// Where this chunk goes.
    pub position: WritePosition,
    /// The bytes (at most [`MAX_FILE_CHUNK_BYTES`]).
    pub data: Vec<u8>,
    /// Permission bits when the file is created, e.g. 0o644.
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub create_parents: bool,
}

/// Where a [`WriteFileRequest`] chunk lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WritePosition {
    /// Create or truncate the file, then write at offset 0.
    Truncate,
    /// Write at this byte offset of an existing file (later chunks of one upload).
    At(u64),
    /// Append to the end, creating the file if needed.
    Append,
}

// ---------------------------------------------------------------------------
// Agent → host
// ---------------------------------------------------------------------------

/// One frame from the agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentFrame {
    /// The request this frame is about (0 for the handshake).
    pub id: RequestId,
    /// What the agent says.
    pub body: AgentMessage,
}

/// What the agent can say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Answer to [`Hello`].
    Hello(HelloReply),
    /// An intermediate event of a request; more frames follow.
    Event(Event),
    /// The request finished; nothing more follows for this id.
    Done(Reply),
    /// The request failed; nothing more follows for this id.
    Failed(AgentError),
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The agent's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// What this agent can do (see [`capability`]).
    pub capabilities: Vec<String>,
    /// Whether the agent runs as PID 1 of a guest.
    pub pid1: bool,
    /// The guest's limits for commands and contexts; `None` when the agent
    /// cannot contain them (no cgroup v2 with the pids and memory controllers).
    pub containment: Option<Containment>,
}

/// What [`ProcessLimits`] default to in this guest, and how far they may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containment {
    /// `pids_max` when a request leaves it out.
    pub default_pids_max: u32,
    /// The largest `pids_max` a request may ask for (what the guest can give
    /// all commands together while keeping a reserve for the agent).
    pub max_pids_max: u32,
    /// `memory_max_bytes` when a request leaves it out.
    pub default_memory_max_bytes: u64,
    /// The largest `memory_max_bytes` a request may ask for (the guest's
    /// memory less a reserve for the kernel and the agent; also the cap on
    /// all commands and contexts together).
    pub max_memory_max_bytes: u64,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Intermediate events, in the order they happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A chunk of output. Chunks of one stream arrive in order.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, not necessarily UTF-8.
        data: Vec<u8>,
    },
    /// The stream passed its cap: no more of it is streamed, and the stream
    /// from byte 0 is kept in `path` inside the guest, up to
    /// `output::MAX_OUTPUT_FILE_BYTES` and then a one-line truncation marker.
    /// Old overflow files are pruned as new ones appear.
    Truncated {
        /// Which stream.
        stream: Stream,
        /// The cap that was reached, in bytes.
        cap_bytes: u64,
        /// Guest path of the file that holds the complete stream.
        path: String,
    },
    /// A rich result of a cell: the value of its last expression, or a figure.
    Result(RichResult),
    /// An exception raised by a cell.
    Error(CodeError),
}

/// A MIME bundle, as Jupyter has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RichResult {
    /// `(mime type, data)`: `text/plain` and `text/html` as UTF-8, `image/png` as raw bytes.
    pub data: Vec<(String, Vec<u8>)>,
    /// Whether this is the value of the cell's last expression (rather than a display/figure).
    pub is_main_result: bool,
}

/// An exception raised by a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeError {
    /// Exception type, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message, e.g. `division by zero`.
    pub value: String,
    /// The traceback, one line per element, without ANSI colours.
    pub traceback: Vec<String>,
}

/// Final replies of successful requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Op::Ping`].
    Pong,
    /// Success with nothing to return.
    Unit,
    /// A foreground command ended.
    Exit(ExitStatus),
    /// A background command started.
    Started {
        /// Its guest pid, for [`Op::ReadProcessOutput`] and [`Op::Signal`].
        pid: u32,
    },
    /// A cell ended (successfully or with an exception, which came as [`Event::Error`]).
    CodeDone(CodeOutcome),
    /// Answer to [`Op::WriteProcess`].
    InputQueued {
        /// Bytes queued for the process and not yet written to it, these included.
        pending_bytes: u64,
    },
    /// Answer to [`Op::ListProcesses`].
    Processes(Vec<ProcessInfo>),
    /// Answer to [`Op::ReadProcessOutput`].
    ProcessOutput(ProcessOutput),
    /// Answer to [`Op::ListContexts`].
    Contexts(Vec<ContextInfo>),
    /// Answer to [`Op::ReadFile`].
    FileData {
        /// The bytes read.
        data: Vec<u8>,
        /// The file's whole size in bytes.
        size: u64,
    },
    /// Answer to [`Op::ListDir`].
    Entries(Vec<DirEntry>),
    /// Answer to [`Op::Stat`].
    Stat(FileStat),
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Wall time from spawn to exit, in microseconds.
    pub duration_us: u64,
    /// Whether the agent killed it because the request's timeout passed.
    pub timed_out: bool,
    /// Total bytes the process wrote to stdout (streamed or not).
    pub stdout_bytes: u64,
    /// Total bytes the process wrote to stderr (streamed or not).
    pub stderr_bytes: u64,
    /// A limit of the command's cgroup that stopped it or one of its
    /// processes; `None` when none did (or the agent has no cgroups).
    pub limit: Option<LimitHit>,
    /// Processes of the command other than its leader (`pid`) that were
    /// still running when the agent killed the command's cgroup, and died
    /// with it: those that outlived a foreground leader (they escaped its
    /// process group or were left running in the background; the host may say
    /// "N processes it left running were killed"), and those killed with the
    /// command on a timeout, a cancel, the pids limit or `Signal` 9.
    pub escaped_killed: u32,
}

/// A cgroup limit that ended a command, a process of it, or a context's interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitHit {
    /// The command tried to have more than `max` processes and threads at
    /// once: a fork failed at `pids.max`, and the agent killed the whole
    /// cgroup at once (a fork bomb never stops by itself). The host may say
    /// "the command started more than {max} processes and was stopped (pids limit)".
    Pids {
        /// Its `pids.max`.
        max: u32,
    },
    /// The out-of-memory killer killed a process of the cgroup at its
    /// `memory.max` (`memory.events` counted an `oom_kill`); the leader
    /// itself may have survived (e.g. a shell reporting a killed child). The
    /// host may say "killed by the out-of-memory killer at {max_bytes in MiB}
    /// MiB (memory limit)".
    Memory {
        /// Its `memory.max`, in bytes.
        max_bytes: u64,
    },
}

/// How a cell ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeOutcome {
    /// The context's cell counter after this cell (1 for its first cell).
    pub execution_count: u64,
    /// Wall time of the cell, in microseconds.
    pub duration_us: u64,
    /// Whether the cell was interrupted because the request's timeout passed.
    pub timed_out: bool,
    /// Whether the interpreter had to be restarted, losing the context's state.
    pub context_restarted: bool,
    /// For bash cells: the exit status of the cell's last command.
    pub exit_code: Option<i32>,
    /// A limit of the context's cgroup that the cell hit: with
    /// [`LimitHit::Pids`] the agent killed the interpreter and everything it
    /// started; with [`LimitHit::Memory`] the out-of-memory killer killed the
    /// interpreter or a process it started. When the interpreter died,
    /// `context_restarted` is set and an [`Event::Error`] named
    /// `ContextRestarted` says why; other contexts are untouched.
    pub limit: Option<LimitHit>,
}

/// A process the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Guest pid.
    pub pid: u32,
    /// The command line, for display.
    pub command: String,
    /// Whether it was started in the background.
    pub background: bool,
    /// `None` while running.
    pub exit: Option<ExitStatus>,
    /// When it started, in milliseconds since the Unix epoch (guest clock).
    pub started_unix_ms: u64,
}

/// New output of a background process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOutput {
    /// Stdout bytes from the requested offset.
    pub stdout: Vec<u8>,
    /// Stderr bytes from the requested offset.
    pub stderr: Vec<u8>,
    /// Offset to pass next time to continue stdout.
    pub next_stdout_offset: u64,
    /// Offset to pass next time to continue stderr.
    pub next_stderr_offset: u64,
    /// `None` while running.
    pub exit: Option<ExitStatus>,
}

/// A language context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextInfo {
    /// Its name.
    pub name: String,
    /// Its language.
    pub language: Language,
    /// Cells run so far.
    pub execution_count: u64,
    /// The interpreter's guest pid, if running.
    pub pid: Option<u32>,
}

/// Kinds of filesystem entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// Facts about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_unix_ms: i64,
    /// The target, for a symlink.
    pub symlink_target: Option<String>,
}

/// One entry of [`Reply::Entries`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Path relative to the listed directory, `/`-separated.
    pub path: String,
    /// Facts about it.
    pub stat: FileStat,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The path, process, or context does not exist.
    NotFound,
    /// A path component, or the target, is not a directory.
    NotADirectory,
    /// The target is a directory where a file was expected.
    IsADirectory,
    /// The guest refused for permissions.
    PermissionDenied,
    /// The name or path already exists.
    AlreadyExists,
    /// A directory is not empty (and `recursive` was not set).
    DirectoryNotEmpty,
    /// A parameter is malformed or out of range; the message names it.
    InvalidArgument,
    /// A size limit was passed; the message names the limit.
    TooLarge,
    /// The request's timeout passed.
    Timeout,
    /// The host cancelled the request.
    Cancelled,
    /// The operation is not supported by this agent (see its capabilities).
    Unsupported,
    /// The protocol was misused (bad handshake, duplicate request id).
    Protocol,
    /// Any other I/O error.
    Io,
    /// A bug or broken invariant in the agent.
    Internal,
    /// The agent is at one of its own capacity limits (concurrent requests,
    /// connections, background processes, contexts) and refuses more until
    /// some finish; the message names the limit. Retrying later may succeed.
    Busy,
    /// The target no longer takes input: the process exited or its stdin was closed.
    Closed,
}

/// A failed request's error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    /// Its category.
    pub kind: ErrorKind,
    /// A message for people: what was wrong, and the limit where one applies.
    pub message: String,
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for AgentError {}
