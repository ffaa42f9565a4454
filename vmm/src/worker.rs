//! One VM per OS process. The worker side ([`run_worker`]) builds a [`MicroVm`] from the config
//! it is sent and obeys a JSON-lines control protocol on an inherited Unix socket; the
//! controller side ([`WorkerHandle`]) spawns the worker, sends requests and receives events.
//!
//! Protocol, one JSON object per line: the controller sends [`ToWorker::Configure`] (boot) or
//! [`ToWorker::Restore`] (from a snapshot) first, the worker answers [`FromWorker::Ready`] or
//! [`FromWorker::Failed`]; then each
//! [`ToWorker::Request`] gets one [`FromWorker::Reply`] with the same id, and
//! [`FromWorker::Event`] may come at any time. Lines are capped at [`MAX_LINE_BYTES`].
//!
//! Lifetime: the worker exits when told to stop or when its control socket closes, which the
//! kernel guarantees when the controller process dies (the controller's end is close-on-exec
//! and owned by the handle only). Dropping a [`WorkerHandle`] kills and reaps the worker. If the
//! worker dies, the handle's requests fail with [`WorkerError::WorkerDied`] and
//! [`WorkerEvent::Died`] is delivered; other workers are untouched.
//! Once its VM is built the worker lowers its rlimits and installs a seccomp filter
//! ([`crate::confinement`]). A worker remembers its last snapshot (or the one it was restored
//! from) as the parent of the next incremental one.
//! The worker never reads anything but its socket; the controller never touches KVM.
//! The worker's stdout is never the controller's (which may carry MCP); its stderr, where
//! [`crate::worker_log::init`] logs, goes to a bounded file beside the serial log.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::{build_microvm, build_microvm_from_snapshot};
use crate::config::VmConfig;
use crate::microvm::MicroVm;
use crate::snapshot::{save_snapshot, RestoreOverrides, SnapshotInfo, SnapshotRef};
use crate::vstate::vcpu::{RunState, VmEvent};
use crate::worker_log::{open_worker_log, worker_log_path};

/// Longest protocol line.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// File descriptor number the worker finds its control socket on.
pub const WORKER_CONTROL_FD: RawFd = 3;
/// How long `spawn` waits for the worker to build its VM.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot request waits (a full dump of a large guest writes gigabytes).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Subcommand and flag the controller starts the worker binary with.
pub const WORKER_SUBCOMMAND: &str = "worker";
/// Flag naming the control socket's fd.
pub const CONTROL_FD_FLAG: &str = "--control-fd";

/// Controller → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    Configure(VmConfig),
    /// Build the VM from the snapshot at `dir` instead of booting.
    Restore {
        dir: PathBuf,
        overrides: RestoreOverrides,
    },
    Request {
        id: u64,
        op: Op,
    },
}

/// What the controller asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Start,
    Pause,
    Resume,
    Stop,
    Status,
    /// Save the paused (or not yet started) VM into the new directory `dir`; `incremental`
    /// writes only pages changed since this worker's last snapshot or restore.
    Snapshot {
        dir: PathBuf,
        incremental: bool,
    },
}

/// Worker → controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    Ready {
        pid: u32,
    },
    Failed {
        error: String,
    },
    Reply {
        id: u64,
        result: Result<RunState, String>,
        /// What a snapshot request wrote.
        #[serde(default)]
        snapshot: Option<SnapshotInfo>,
    },
    Event(VmEvent),
}

/// What the controller hears without asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The guest did something that ended it.
    Vm(VmEvent),
    /// The worker process ended without being told to; `status` says how.
    Died { pid: u32, status: String },
    /// The worker exited after a stop request.
    Exited { pid: u32 },
}

/// Errors of the worker and of its controller.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("creating the control socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("starting the worker process {exe}")]
    Spawn {
        exe: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing to the control socket")]
    Write(#[source] std::io::Error),
    #[error("reading the control socket")]
    Read(#[source] std::io::Error),
    #[error("control message is not valid: {0}")]
    Protocol(String),
    #[error("control line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("the worker could not build its VM: {0}")]
    BuildFailed(String),
    #[error("worker {pid} did not answer within {timeout:?}")]
    Timeout { pid: u32, timeout: Duration },
    #[error("worker process {pid} died ({status}); its VM is gone and its resources are freed")]
    WorkerDied { pid: u32, status: String },
    #[error("the worker refused {op:?}: {message}")]
    Refused { op: Op, message: String },
    #[error("file descriptor {0} is not a usable control socket")]
    BadControlFd(RawFd),
}

/// Reads one bounded JSON line; `Ok(None)` on EOF.
fn read_message<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> Result<Option<T>, WorkerError> {
    let mut line = Vec::new();
    let read = reader.take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line).map_err(WorkerError::Read)?;
    if read == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE_BYTES {
        return Err(WorkerError::LineTooLong);
    }
    serde_json::from_slice(&line).map(Some).map_err(|e| WorkerError::Protocol(e.to_string()))
}

fn write_message<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), WorkerError> {
    let mut line = serde_json::to_vec(message).map_err(|e| WorkerError::Protocol(e.to_string()))?;
    line.push(b'\n');
    writer.write_all(&line).map_err(WorkerError::Write)
}

/// Renders an error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------- worker side

enum Input {
    Request { id: u64, op: Op },
    Event(VmEvent),
    ControllerGone,
}

/// The control fd named by a worker command line (`worker --control-fd N`, program name
/// excluded), or `None` when the arguments are not a worker invocation.
pub fn control_fd_from_args(args: &[String]) -> Option<RawFd> {
    match args {
        [sub, flag, fd] if sub == WORKER_SUBCOMMAND && flag == CONTROL_FD_FLAG => fd.parse().ok(),
        _ => None,
    }
}

/// The `main` of a stand-alone worker binary (tests and benches spawn these, as production
/// spawns `capsule worker`): logs, runs the worker on the control fd from the command line,
/// and exits 2 on a bad command line or 1 when the worker fails.
pub fn worker_main(program: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(fd) = control_fd_from_args(&args) else {
        eprintln!("usage: {program} {WORKER_SUBCOMMAND} {CONTROL_FD_FLAG} <fd>");
        std::process::exit(2);
    };
    crate::worker_log::init();
    match run_worker(fd) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{program}: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// Runs the worker on the control socket at `fd` until told to stop or the controller goes.
pub fn run_worker(fd: RawFd) -> Result<(), WorkerError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(WorkerError::BadControlFd(fd));
    }
    // SAFETY: the controller handed us `fd` as our control socket; nothing else owns it.
    let socket = unsafe { UnixStream::from_raw_fd(fd) };
    // Keep the socket from leaking into anything this process might start.
    // SAFETY: setting FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut reader = BufReader::new(socket.try_clone().map_err(WorkerError::Read)?);
    let mut writer = socket;

    let built = match read_message::<ToWorker>(&mut reader)? {
        Some(ToWorker::Configure(config)) => build_microvm(&config).map(|vm| (vm, None)).map_err(|e| error_chain(&e)),
        Some(ToWorker::Restore { dir, overrides }) => build_microvm_from_snapshot(&dir, &overrides)
            .map(|(vm, parent)| (vm, Some(parent)))
            .map_err(|e| error_chain(&e)),
        Some(other) => return Err(WorkerError::Protocol(format!("expected Configure or Restore, got {other:?}"))),
        None => return Ok(()),
    };
    let built = built.and_then(|vm| crate::confinement::confine_worker().map(|()| vm).map_err(|e| error_chain(&e)));
    let (mut vm, mut last_snapshot) = match built {
        Ok(vm) => vm,
        Err(error) => {
            tracing::error!(%error, "worker: could not build the VM");
            write_message(&mut writer, &FromWorker::Failed { error: error.clone() })?;
            return Err(WorkerError::BuildFailed(error));
        }
    };
    write_message(&mut writer, &FromWorker::Ready { pid: std::process::id() })?;

    let (tx, rx) = channel::<Input>();
    if let Some(events) = vm.take_events() {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || {
                for event in events {
                    if tx.send(Input::Event(event)).is_err() {
                        break;
                    }
                }
            })
            .map_err(WorkerError::Read)?;
    }
    std::thread::Builder::new()
        .name("control-reader".into())
        .spawn(move || loop {
            match read_message::<ToWorker>(&mut reader) {
                Ok(Some(ToWorker::Request { id, op })) => {
                    if tx.send(Input::Request { id, op }).is_err() {
                        break;
                    }
                }
                Ok(Some(ToWorker::Configure(_) | ToWorker::Restore { .. })) | Err(_) | Ok(None) => {
                    let _ = tx.send(Input::ControllerGone);
                    break;
                }
            }
        })
        .map_err(WorkerError::Read)?;

    for input in rx {
        match input {
            Input::Request { id, op } => {
                let stopping = op == Op::Stop;
                let (result, snapshot) = apply(&mut vm, &mut last_snapshot, op);
                let ok = result.is_ok();
                let reply = FromWorker::Reply { id, result, snapshot };
                if write_message(&mut writer, &reply).is_err() || (stopping && ok) {
                    break;
                }
            }
            Input::Event(event) => {
                if write_message(&mut writer, &FromWorker::Event(event)).is_err() {
                    break;
                }
            }
            Input::ControllerGone => break,
        }
    }
    vm.stop();
    Ok(())
}

fn apply(
    vm: &mut MicroVm,
    last_snapshot: &mut Option<SnapshotRef>,
    op: Op,
) -> (Result<RunState, String>, Option<SnapshotInfo>) {
    if let Op::Snapshot { dir, incremental } = op {
        let parent = if incremental {
            match last_snapshot.as_ref() {
                Some(parent) => Some(parent.clone()),
                None => return (Err(error_chain(&crate::snapshot::SnapshotError::NoParent)), None),
            }
        } else {
            None
        };
        return match save_snapshot(vm, &dir, parent.as_ref()) {
            Ok((info, snapshot)) => {
                *last_snapshot = Some(snapshot);
                (Ok(vm.state()), Some(info))
            }
            Err(e) => {
                // Past the checks, the dirty log may be half consumed: the next snapshot must
                // be a full one.
                use crate::snapshot::SnapshotError as E;
                if !matches!(e, E::Exists(_) | E::NoParent | E::ChainTooDeep { .. } | E::Save(_)) {
                    *last_snapshot = None;
                }
                (Err(error_chain(&e)), None)
            }
        };
    }
    let done = match op {
        Op::Start => vm.start(),
        Op::Pause => vm.pause(),
        Op::Resume => vm.resume(),
        Op::Stop => {
            vm.stop();
            Ok(())
        }
        Op::Status | Op::Snapshot { .. } => Ok(()),
    };
    (done.map(|()| vm.state()).map_err(|e| error_chain(&e)), None)
}

// ------------------------------------------------------------ controller side

/// Where a new worker's stderr (its log, bounded by [`crate::worker_log`]) goes: the file
/// [`worker_log_path`] names beside the VM's serial log, so the log lives and dies with the
/// VM's other files. A VM without a serial log file (or a restore that keeps the saved one),
/// or a log file that cannot be opened, inherits the controller's stderr instead.
fn worker_stderr(first: &ToWorker) -> Stdio {
    let serial_log = match first {
        ToWorker::Configure(config) => config.serial_log.as_deref(),
        ToWorker::Restore { overrides, .. } => overrides.serial_log.as_deref(),
        ToWorker::Request { .. } => None,
    };
    let Some(path) = serial_log.map(worker_log_path) else {
        return Stdio::inherit();
    };
    match open_worker_log(&path) {
        Ok(file) => Stdio::from(file),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "worker log file cannot be opened; the worker logs to this process's stderr");
            Stdio::inherit()
        }
    }
}

struct Shared {
    child: Mutex<Child>,
    pid: u32,
    stopping: AtomicBool,
    /// Set once the worker is gone: how it ended.
    death: Mutex<Option<String>>,
}

impl Shared {
    /// Reaps the child (waits for it to end) and records how it ended.
    fn reap(&self) -> String {
        let mut death = self.death.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = death.as_ref() {
            return status.clone();
        }
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let status = match child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("could not reap it: {e}"),
        };
        *death = Some(status.clone());
        status
    }
}

/// A reply as the controller's reader thread passes it on.
type ReplyMessage = (u64, Result<RunState, String>, Option<SnapshotInfo>);

/// The controller's handle on one worker process.
pub struct WorkerHandle {
    shared: Arc<Shared>,
    writer: Mutex<UnixStream>,
    replies: Mutex<Receiver<ReplyMessage>>,
    events: Mutex<Option<Receiver<WorkerEvent>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle").field("pid", &self.shared.pid).finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// Starts `exe worker --control-fd 3` and has it build `config` (not yet started).
    pub fn spawn(exe: &Path, config: VmConfig) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Configure(config))
    }

    /// Starts a worker that builds its VM from the snapshot at `dir` (not yet started:
    /// [`WorkerHandle::start`] resumes the guest). A fork passes its own vsock socket, serial
    /// log and copies of writable disks in `overrides`.
    pub fn restore(exe: &Path, dir: &Path, overrides: RestoreOverrides) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Restore { dir: dir.to_path_buf(), overrides })
    }

    fn spawn_with(exe: &Path, first: ToWorker) -> Result<WorkerHandle, WorkerError> {
        let (ours, theirs) = UnixStream::pair().map_err(WorkerError::SocketPair)?;
        let stderr = worker_stderr(&first);
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(exe);
        command
            .arg(WORKER_SUBCOMMAND)
            .arg(CONTROL_FD_FLAG)
            .arg(WORKER_CONTROL_FD.to_string())
            .stdin(Stdio::null())
            // The controller's stdout may be an MCP stdio transport: never let a worker write
            // there. Its stderr (its log) goes to a file beside the serial log.
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe functions (dup2, fcntl).
        unsafe {
            command.pre_exec(move || {
                if theirs_fd == WORKER_CONTROL_FD {
                    let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, WORKER_CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        // Everything that can fail without a child is made before it exists.
        let writer = ours.try_clone().map_err(WorkerError::SocketPair)?;
        let (ready_tx, ready_rx) = channel::<Result<(), String>>();
        let (reply_tx, replies) = channel();
        let (event_tx, events) = channel();
        let child = command.spawn().map_err(|source| WorkerError::Spawn { exe: exe.to_path_buf(), source })?;
        drop(theirs);
        let pid = child.id();
        // From here on the handle owns the child: any early return drops it, which kills and
        // reaps the worker (no zombie, no orphan).
        let handle = WorkerHandle {
            shared: Arc::new(Shared {
                child: Mutex::new(child),
                pid,
                stopping: AtomicBool::new(false),
                death: Mutex::new(None),
            }),
            writer: Mutex::new(writer),
            replies: Mutex::new(replies),
            events: Mutex::new(Some(events)),
            next_id: AtomicU64::new(1),
        };
        write_message(&mut *handle.writer.lock().unwrap_or_else(|p| p.into_inner()), &first)?;

        let reader_shared = handle.shared.clone();
        std::thread::Builder::new()
            .name(format!("worker-{pid}-reader"))
            .spawn(move || read_worker(ours, reader_shared, ready_tx, reply_tx, event_tx))
            .map_err(|source| WorkerError::Spawn { exe: exe.to_path_buf(), source })?;

        match ready_rx.recv_timeout(BUILD_TIMEOUT) {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(error)) => Err(WorkerError::BuildFailed(error)),
            Err(RecvTimeoutError::Timeout) => Err(WorkerError::Timeout { pid, timeout: BUILD_TIMEOUT }),
            Err(RecvTimeoutError::Disconnected) => Err(handle.died()),
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    fn died(&self) -> WorkerError {
        WorkerError::WorkerDied { pid: self.shared.pid, status: self.shared.reap() }
    }

    fn request(&self, op: Op) -> Result<RunState, WorkerError> {
        self.request_with(op, REQUEST_TIMEOUT).map(|(state, _)| state)
    }

    fn request_with(&self, op: Op, timeout: Duration) -> Result<(RunState, Option<SnapshotInfo>), WorkerError> {
        let replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let request = ToWorker::Request { id, op: op.clone() };
            if write_message(&mut *writer, &request).is_err() {
                return Err(self.died());
            }
        }
        loop {
            match replies.recv_timeout(timeout) {
                Ok((reply_id, result, snapshot)) if reply_id == id => {
                    return result
                        .map(|state| (state, snapshot))
                        .map_err(|message| WorkerError::Refused { op, message });
                }
                // A reply to an earlier request that timed out: skip it.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(WorkerError::Timeout { pid: self.shared.pid, timeout }),
                Err(RecvTimeoutError::Disconnected) => return Err(self.died()),
            }
        }
    }

    /// Saves the paused (or not yet started) VM into the new directory `dir`. `incremental`
    /// writes only the pages changed since this worker's previous snapshot or its restore.
    pub fn snapshot(&self, dir: &Path, incremental: bool) -> Result<SnapshotInfo, WorkerError> {
        let op = Op::Snapshot { dir: dir.to_path_buf(), incremental };
        match self.request_with(op.clone(), SNAPSHOT_TIMEOUT)? {
            (_, Some(info)) => Ok(info),
            (_, None) => Err(WorkerError::Protocol(format!("the worker answered {op:?} without snapshot details"))),
        }
    }

    /// Starts the vCPUs.
    pub fn start(&self) -> Result<RunState, WorkerError> {
        self.request(Op::Start)
    }

    /// Pauses the VM in memory.
    pub fn pause(&self) -> Result<RunState, WorkerError> {
        self.request(Op::Pause)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<RunState, WorkerError> {
        self.request(Op::Resume)
    }

    /// What the vCPUs are doing.
    pub fn status(&self) -> Result<RunState, WorkerError> {
        self.request(Op::Status)
    }

    /// Stops the VM; the worker then exits and is reaped.
    pub fn stop(&self) -> Result<(), WorkerError> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.request(Op::Stop)?;
        self.shared.reap();
        Ok(())
    }

    /// Takes the stream of events (guest exits, the worker's own end) to consume it on another
    /// thread; afterwards [`WorkerHandle::wait_event`] returns `None`.
    pub fn take_events(&self) -> Option<Receiver<WorkerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits up to `timeout` for the next event.
    pub fn wait_event(&self, timeout: Duration) -> Option<WorkerEvent> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.as_ref()?.recv_timeout(timeout).ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let already_gone = self.shared.death.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !already_gone {
            self.shared.stopping.store(true, Ordering::SeqCst);
            let mut child = self.shared.child.lock().unwrap_or_else(|p| p.into_inner());
            // It may have exited already; kill then reap either way.
            let _ = child.kill();
            drop(child);
            self.shared.reap();
        }
    }
}

fn read_worker(
    socket: UnixStream,
    shared: Arc<Shared>,
    ready: Sender<Result<(), String>>,
    replies: Sender<ReplyMessage>,
    events: Sender<WorkerEvent>,
) {
    let mut reader = BufReader::new(socket);
    loop {
        match read_message::<FromWorker>(&mut reader) {
            Ok(Some(FromWorker::Ready { .. })) => {
                let _ = ready.send(Ok(()));
            }
            Ok(Some(FromWorker::Failed { error })) => {
                let _ = ready.send(Err(error));
            }
            Ok(Some(FromWorker::Reply { id, result, snapshot })) => {
                let _ = replies.send((id, result, snapshot));
            }
            Ok(Some(FromWorker::Event(event))) => {
                let _ = events.send(WorkerEvent::Vm(event));
            }
            // EOF or garbage: the worker is gone (or not to be trusted). Free it.
            Ok(None) | Err(_) => break,
        }
    }
    drop(ready);
    drop(replies);
    let pid = shared.pid;
    if shared.stopping.load(Ordering::SeqCst) {
        let _ = events.send(WorkerEvent::Exited { pid });
    } else {
        // Make sure it is really gone before reaping (it may only have closed the socket).
        let mut child = shared.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        drop(child);
        let status = shared.reap();
        let _ = events.send(WorkerEvent::Died { pid, status });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_can_be_shared_across_threads() {
        assert_send_sync::<WorkerHandle>();
    }

    #[test]
    fn oversized_and_malformed_lines_are_refused() {
        let long = vec![b'x'; MAX_LINE_BYTES + 2];
        let err = read_message::<ToWorker>(&mut &long[..]).unwrap_err();
        assert!(matches!(err, WorkerError::LineTooLong), "{err}");
        let err = read_message::<ToWorker>(&mut &b"{\"Nope\":1}\n"[..]).unwrap_err();
        assert!(matches!(err, WorkerError::Protocol(_)), "{err}");
        assert!(read_message::<ToWorker>(&mut &b""[..]).unwrap().is_none());
        let mut buf = Vec::new();
        write_message(&mut buf, &ToWorker::Request { id: 7, op: Op::Pause }).unwrap();
        match read_message::<ToWorker>(&mut &buf[..]).unwrap() {
            Some(ToWorker::Request { id: 7, op: Op::Pause }) => {}
            other => panic!("round trip gave {other:?}"),
        }
    }
}
