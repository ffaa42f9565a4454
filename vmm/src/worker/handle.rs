//! The controller side: a [`WorkerHandle`] spawns a worker (or attaches to an outliving one),
//! sends requests and receives events.
//!
//! A spawned worker is this process's child: when it dies, the handle reaps it and says how
//! (`signal: 9 (SIGKILL)` …). An outliving worker is started in a session of its own, so that
//! signals meant for the controller's process group do not reach it; a controller that attaches
//! to one later is not its parent, and learns how it ended from its `ended` file or not at all.
//! Dropping a handle kills the worker (through a pidfd when attached, so a reused pid is never
//! hit); a controller that dies without dropping it (a crash, `kill -9`) leaves an outliving
//! worker running.

use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::protocol::{read_message, write_message, ControlSocket, FromWorker, Op, RemoteError, ToWorker, VmEnded};
use super::{
    WorkerError, WorkerEvent, BUILD_TIMEOUT, CONTROL_FD_FLAG, REQUEST_TIMEOUT, SNAPSHOT_TIMEOUT, WORKER_CONTROL_FD,
    WORKER_SUBCOMMAND,
};
use crate::config::VmConfig;
use crate::snapshot::{RestoreOverrides, SnapshotInfo};
use crate::vstate::vcpu::RunState;
use crate::worker_log::{open_worker_log, worker_log_path};

/// Where a new worker's stderr (its log, bounded by [`crate::worker_log`]) goes: the file
/// [`worker_log_path`] names beside the VM's serial log, so the log lives and dies with the
/// VM's other files. A VM without a serial log file (or a restore that keeps the saved one),
/// or a log file that cannot be opened, inherits the controller's stderr instead.
fn worker_stderr(first: &ToWorker) -> Stdio {
    let serial_log = match first {
        ToWorker::Configure { config, .. } => config.serial_log.as_deref(),
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

/// The worker process as the handle knows it.
enum Process {
    /// Our child: it is waited for, and its exit status is known.
    Child(Child),
    /// A worker attached to: a pidfd to signal it by, and the file it leaves when its VM ends.
    Attached { pidfd: Option<OwnedFd>, ended: std::path::PathBuf },
}

struct Shared {
    process: Mutex<Process>,
    pid: u32,
    stopping: AtomicBool,
    /// The handle let the worker go ([`WorkerHandle::detach`]): it is not killed.
    detached: AtomicBool,
    /// Set once the worker is gone: how it ended.
    death: Mutex<Option<String>>,
}

impl Shared {
    /// How the worker ended, if that is known.
    fn death(&self) -> Option<String> {
        self.death.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the worker to end (reaping our child) and records how it ended. The wait holds
    /// only the process lock, never `death`: a detached worker is reaped by a thread that may
    /// wait for as long as the VM runs, and dropping the handle must not wait with it.
    fn reap(&self) -> String {
        if let Some(status) = self.death() {
            return status;
        }
        let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        // Someone else may have reaped it while this waited for the lock.
        if let Some(status) = self.death() {
            return status;
        }
        let status = match &mut *process {
            Process::Child(child) => match child.wait() {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not reap it: {e}"),
            },
            Process::Attached { ended, .. } => match std::fs::read(ended.as_path()) {
                Ok(bytes) => match serde_json::from_slice::<VmEnded>(&bytes) {
                    Ok(ended) => format!("its VM ended ({:?}) while no controller was attached", ended.event),
                    Err(_) => "it exited (how is unknown: it was not this process's child)".to_string(),
                },
                Err(_) => "it exited (how is unknown: it was not this process's child)".to_string(),
            },
        };
        *self.death.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        status
    }

    /// Kills the worker (it may have exited already).
    fn kill(&self) {
        let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *process {
            Process::Child(child) => {
                let _ = child.kill();
            }
            Process::Attached { pidfd: Some(pidfd), .. } => {
                // SAFETY: pidfd_send_signal(2) with a pidfd we own, a signal number and no info.
                unsafe {
                    libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32);
                }
            }
            Process::Attached { pidfd: None, .. } => {}
        }
    }
}

/// How a child's exit reads, with what a SIGKILL most likely was.
fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGKILL) => format!("{status}: killed (kill -9, or the host's out-of-memory killer)"),
        Some(libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGABRT | libc::SIGSYS) => {
            format!("{status}: it crashed")
        }
        _ => status.to_string(),
    }
}

/// A reply as the controller's reader thread passes it on.
type ReplyMessage = (u64, Result<RunState, RemoteError>, Option<SnapshotInfo>);

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
    /// Starts `exe worker --control-fd 3` and has it build `config` (not yet started). The
    /// worker ends with this process.
    pub fn spawn(exe: &Path, config: VmConfig) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Configure { config, control: None })
    }

    /// Starts a worker that builds its VM from the snapshot at `dir` (not yet started:
    /// [`WorkerHandle::start`] resumes the guest). A fork passes its own vsock socket, serial
    /// log and copies of writable disks in `overrides`. The worker ends with this process.
    pub fn restore(exe: &Path, dir: &Path, overrides: RestoreOverrides) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Restore { dir: dir.to_path_buf(), overrides, control: None })
    }

    /// [`WorkerHandle::spawn`] for a worker that outlives this process: a later controller
    /// finds it with [`WorkerHandle::attach`] on `control`.
    pub fn spawn_outliving(exe: &Path, config: VmConfig, control: &ControlSocket) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Configure { config, control: Some(control.clone()) })
    }

    /// [`WorkerHandle::restore`] for a worker that outlives this process.
    pub fn restore_outliving(
        exe: &Path,
        dir: &Path,
        overrides: RestoreOverrides,
        control: &ControlSocket,
    ) -> Result<WorkerHandle, WorkerError> {
        Self::spawn_with(exe, ToWorker::Restore { dir: dir.to_path_buf(), overrides, control: Some(control.clone()) })
    }

    fn spawn_with(exe: &Path, first: ToWorker) -> Result<WorkerHandle, WorkerError> {
        let outliving =
            matches!(&first, ToWorker::Configure { control: Some(_), .. } | ToWorker::Restore { control: Some(_), .. });
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
        // async-signal-safe functions (dup2, fcntl, setsid).
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
                if outliving && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = command.spawn().map_err(|source| WorkerError::Spawn { exe: exe.to_path_buf(), source })?;
        drop(theirs);
        // From here on the handle owns the child: any early return drops it, which kills and
        // reaps the worker (no zombie, no orphan).
        let pid = child.id();
        let (handle, ready) = Self::start_reading(ours, pid, Process::Child(child))?;
        write_message(&mut *handle.writer.lock().unwrap_or_else(|p| p.into_inner()), &first)?;
        match ready.recv_timeout(BUILD_TIMEOUT) {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(error)) => Err(WorkerError::BuildFailed(error)),
            Err(RecvTimeoutError::Timeout) => Err(WorkerError::Timeout { pid, timeout: BUILD_TIMEOUT }),
            Err(RecvTimeoutError::Disconnected) => Err(handle.died()),
        }
    }

    /// Attaches to the outliving worker listening on `control` (started by an earlier
    /// controller). [`WorkerError::NotListening`] when none listens there.
    pub fn attach(control: &ControlSocket) -> Result<WorkerHandle, WorkerError> {
        let stream = UnixStream::connect(&control.path)
            .map_err(|source| WorkerError::NotListening { path: control.path.clone(), source })?;
        let mut greeting = BufReader::new(stream.try_clone().map_err(WorkerError::Read)?);
        let pid = match read_message::<FromWorker>(&mut greeting)? {
            Some(FromWorker::Ready { pid }) => pid,
            Some(FromWorker::Failed { error }) => return Err(WorkerError::BuildFailed(error)),
            other => return Err(WorkerError::Protocol(format!("expected Ready, got {other:?}"))),
        };
        // The greeting is one line and the worker writes nothing more until asked (or until an
        // event): whatever the reader buffered past it belongs to the reader thread.
        let buffered = greeting.buffer().to_vec();
        drop(greeting);
        // SAFETY: pidfd_open(2) takes a pid and flags; it returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        // SAFETY: a non-negative result is a new descriptor that nothing else owns.
        let pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as i32) });
        let process = Process::Attached { pidfd, ended: control.ended.clone() };
        let (handle, _ready) = Self::start_reading_after(stream, pid, process, buffered)?;
        Ok(handle)
    }

    /// The handle over the control stream `ours` to worker `pid`, with its reader thread
    /// running, and the channel the worker's Ready (or Failed) arrives on.
    fn start_reading(
        ours: UnixStream,
        pid: u32,
        process: Process,
    ) -> Result<(WorkerHandle, Receiver<Result<(), RemoteError>>), WorkerError> {
        Self::start_reading_after(ours, pid, process, Vec::new())
    }

    fn start_reading_after(
        ours: UnixStream,
        pid: u32,
        process: Process,
        buffered: Vec<u8>,
    ) -> Result<(WorkerHandle, Receiver<Result<(), RemoteError>>), WorkerError> {
        let writer = ours.try_clone().map_err(WorkerError::SocketPair)?;
        let (reply_tx, replies) = channel();
        let (event_tx, events) = channel();
        let (ready_tx, ready) = channel();
        let shared = Arc::new(Shared {
            process: Mutex::new(process),
            pid,
            stopping: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            death: Mutex::new(None),
        });
        let handle = WorkerHandle {
            shared: shared.clone(),
            writer: Mutex::new(writer),
            replies: Mutex::new(replies),
            events: Mutex::new(Some(events)),
            next_id: AtomicU64::new(1),
        };
        std::thread::Builder::new()
            .name(format!("worker-{pid}-reader"))
            .spawn(move || read_worker(buffered, ours, shared, ready_tx, reply_tx, event_tx))
            .map_err(WorkerError::Read)?;
        Ok((handle, ready))
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
                    return result.map(|state| (state, snapshot)).map_err(|error| WorkerError::Refused { op, error });
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

    /// Stops the VM; the worker then exits (and is reaped when it is our child).
    pub fn stop(&self) -> Result<(), WorkerError> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.request(Op::Stop)?;
        self.shared.reap();
        Ok(())
    }

    /// Lets an outliving worker go: closes the control connection, as the kernel does when the
    /// controller dies, and leaves the VM running for the next controller to
    /// [`WorkerHandle::attach`] to. (An ordinary worker exits when it sees that.)
    pub fn detach(self) {
        self.shared.detached.store(true, Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
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
        if !already_gone && !self.shared.detached.load(Ordering::SeqCst) {
            self.shared.stopping.store(true, Ordering::SeqCst);
            self.shared.kill();
            self.shared.reap();
        }
    }
}

fn read_worker(
    buffered: Vec<u8>,
    socket: UnixStream,
    shared: Arc<Shared>,
    ready: Sender<Result<(), RemoteError>>,
    replies: Sender<ReplyMessage>,
    events: Sender<WorkerEvent>,
) {
    let mut reader = BufReader::new(std::io::Read::chain(std::io::Cursor::new(buffered), socket));
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
    if shared.detached.load(Ordering::SeqCst) {
        // Let go on purpose: it runs on; a child of ours is reaped when it ends.
        std::thread::spawn(move || drop(shared.reap()));
    } else if shared.stopping.load(Ordering::SeqCst) {
        let _ = events.send(WorkerEvent::Exited { pid });
    } else {
        // Make sure it is really gone before reaping (it may only have closed the socket).
        shared.kill();
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
    fn a_sigkill_reads_as_kill_or_the_oom_killer() {
        use std::os::unix::process::ExitStatusExt;
        let text = describe_exit(std::process::ExitStatus::from_raw(libc::SIGKILL));
        assert!(text.contains("out-of-memory killer"), "{text}");
        let text = describe_exit(std::process::ExitStatus::from_raw(libc::SIGSEGV));
        assert!(text.contains("crashed"), "{text}");
    }

    #[test]
    fn how_it_ended_can_be_asked_while_a_detached_worker_is_still_being_waited_for() {
        // A detached worker's reaper waits for as long as the VM runs; asking how the worker
        // ended (as dropping a handle does) must not wait with it.
        let child = std::process::Command::new("sleep").arg("1000").spawn().expect("sleep");
        let shared = Arc::new(Shared {
            pid: child.id(),
            process: Mutex::new(Process::Child(child)),
            stopping: AtomicBool::new(true),
            detached: AtomicBool::new(true),
            death: Mutex::new(None),
        });
        let reaper = std::thread::spawn({
            let shared = shared.clone();
            move || shared.reap()
        });
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        let asker = shared.clone();
        std::thread::spawn(move || tx.send(asker.death()).unwrap());
        let asked = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(asked, Ok(None), "death() waited for the reaper");
        // SAFETY: kill(2) of the child this test spawned (the reaper holds the process lock).
        unsafe {
            libc::kill(shared.pid as i32, libc::SIGKILL);
        }
        assert!(reaper.join().unwrap().contains("killed"), "the reaper records the end");
        assert!(shared.death().is_some());
    }
}
