//! Commands the agent runs (`Op::Exec`), their table, signals and background output.
//!
//! Every command runs in its own process group (`setpgid(0, 0)` at spawn), so
//! a timeout or cancel kills the whole tree it started with one
//! `kill(-pgid, SIGKILL)`. Each child is reaped by pid (`waitpid(pid)`): a
//! foreground one by its request's poll loop (woken by a pidfd), a background
//! one by its own waiter thread. This module never calls `waitpid(-1)`, so it
//! cannot steal the exit status of children other modules (language contexts)
//! wait for. Orphans are reaped by PID 1 (see [`crate::init`]).
//!
//! - Foreground: stdout/stderr stream as ordered chunks through a
//!   [`CappedOutput`], then the caller replies [`Reply::Exit`](crate::protocol::Reply::Exit).
//! - Background: output goes to two files per process under
//!   `<state dir>/processes/`, each a [`CappedFile`] of at most
//!   [`MAX_BACKGROUND_OUTPUT_FILE_BYTES`] with a one-line marker at the cap;
//!   the host reads it by offsets. Finished processes are remembered (with
//!   their files) up to [`MAX_FINISHED_PROCESSES`] and
//!   [`MAX_FINISHED_OUTPUT_BYTES`], oldest forgotten first.
//!
//! A process group is only ever signalled while its leader is unreaped (a
//! zombie still holds the pid), so a pid the kernel reused is never hit.
//!
//! Processes belong to the agent, not to a connection: a dropped connection
//! cancels foreground requests but never touches background processes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cancel::{CancelToken, StopReason};
use crate::lock::lock;
use crate::oserror::{agent_error, error};
use crate::output::{CappedFile, CappedOutput, MAX_OUTPUT_FILE_BYTES};
use crate::protocol::{
    AgentError, Command, ErrorKind, Event, ExecRequest, ExitStatus, ProcessInfo, ProcessOutput, Stream,
    DEFAULT_OUTPUT_CAP_BYTES, MAX_FILE_CHUNK_BYTES,
};

/// Most bytes kept per stream of a background process; past it a marker line
/// is appended and the rest of the stream is read and dropped (counted only).
pub const MAX_BACKGROUND_OUTPUT_FILE_BYTES: u64 = MAX_OUTPUT_FILE_BYTES;

/// How long after a command exits its output pipes may stay open (held by a
/// child it left behind) before the agent stops waiting for them.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How often a foreground request checks its cancel token while the command runs.
const CANCEL_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Bytes read from a pipe at a time.
const PIPE_READ_BYTES: usize = 64 * 1024;

/// Finished background processes remembered for `ListProcesses`/`ReadProcessOutput`.
pub const MAX_FINISHED_PROCESSES: usize = 256;

/// Total bytes of output files kept for finished background processes.
pub const MAX_FINISHED_OUTPUT_BYTES: u64 = 256 * 1024 * 1024;

/// Largest valid signal number (`SIGRTMAX` on Linux).
const MAX_SIGNAL_NUMBER: i32 = 64;

/// A child's output pipe, read on its own thread.
type BoxedPipe = Box<dyn Read + Send>;

/// One process the agent started.
#[derive(Debug)]
struct Entry {
    info: ProcessInfo,
    /// Background output files (stdout, stderr).
    files: Option<(PathBuf, PathBuf)>,
    /// Order of start, for pruning the oldest finished entries.
    seq: u64,
    /// Whether the process was reaped (its pid may belong to another process since).
    reaped: bool,
}

/// The agent's process table and spawner. One per agent, shared by all connections.
#[derive(Debug)]
pub struct Processes {
    work_dir: PathBuf,
    state_dir: PathBuf,
    table: Arc<Mutex<HashMap<u32, Entry>>>,
    seq: AtomicU64,
}

/// A spawned child with its pipes.
struct Spawned {
    child: Child,
    pid: u32,
    started: Instant,
    seq: u64,
    /// Whether `child` was waited for (its pid may be reused since).
    reaped: bool,
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A pollable handle on a child's exit (Linux ≥ 5.3); `None` where unsupported.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags; the result is checked.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = libc::c_int::try_from(rc).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it out of commands spawned later.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn write_fd(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether child `pid` has exited, without reaping it (`waitid` with
/// `WNOWAIT`); with `block`, waits until it has.
fn has_exited(pid: u32, block: bool) -> io::Result<bool> {
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid(2) writes only into `info`, which lives for the call.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: after a successful waitid the pid field is set (0: no state change).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Reaps an exited child under the table lock, marking its entry reaped, so
/// [`Processes::signal`] (which signals under the same lock) never sends a
/// group signal to a pid that may have been reused.
fn reap(table: &Mutex<HashMap<u32, Entry>>, pid: u32, child: &mut Child) -> io::Result<std::process::ExitStatus> {
    let mut table = lock(table);
    if let Some(entry) = table.get_mut(&pid) {
        entry.reaped = true;
    }
    child.wait()
}

/// Kills a whole process group. Errors (the group is already gone) are ignored.
/// Call it only while the group's leader is unreaped.
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn exit_status(status: std::process::ExitStatus, started: Instant, timed_out: bool) -> ExitStatus {
    ExitStatus {
        code: status.code(),
        signal: status.signal(),
        duration_us: started.elapsed().as_micros() as u64,
        timed_out,
        stdout_bytes: 0,
        stderr_bytes: 0,
    }
}

fn display_command(cmd: &Command) -> String {
    match cmd {
        Command::Shell(s) => s.clone(),
        Command::Argv(v) => v.join(" "),
    }
}

impl Processes {
    /// A table whose commands default to `work_dir` and keep files under `state_dir`.
    /// Output files of background processes a previous agent left there
    /// (nothing can read them any more) are deleted.
    pub fn new(work_dir: &Path, state_dir: &Path) -> Self {
        let stale = state_dir.join("processes");
        if stale.exists() {
            if let Err(e) = std::fs::remove_dir_all(&stale) {
                eprintln!("capsule-agent: cannot clear {}: {e}", stale.display());
            }
        }
        Self {
            work_dir: work_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            table: Arc::new(Mutex::new(HashMap::new())),
            seq: AtomicU64::new(1),
        }
    }

    /// Where capped foreground output overflows to.
    pub fn output_dir(&self) -> PathBuf {
        self.state_dir.join("output")
    }

    /// A fresh sequence number for file names unique within the agent.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn spawn(&self, req: &ExecRequest, stdout: Stdio, stderr: Stdio) -> Result<Spawned, AgentError> {
        let mut cmd = match &req.command {
            Command::Shell(script) => {
                let mut c = std::process::Command::new("/bin/sh");
                c.arg("-c").arg(script);
                c
            }
            Command::Argv(argv) => {
                let Some((program, args)) = argv.split_first() else {
                    return Err(error(ErrorKind::InvalidArgument, "exec argv is empty"));
                };
                let mut c = std::process::Command::new(program);
                c.args(args);
                c
            }
        };
        let cwd = match &req.cwd {
            Some(dir) => self.work_dir.join(dir),
            None => self.work_dir.clone(),
        };
        match std::fs::metadata(&cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(error(ErrorKind::NotADirectory, format!("exec cwd {} is not a directory", cwd.display())))
            }
            Err(e) => return Err(agent_error(&format!("exec cwd {}", cwd.display()), &e)),
        }
        cmd.current_dir(&cwd)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let seq = self.next_seq();
        let started = Instant::now();
        let mut child =
            cmd.spawn().map_err(|e| agent_error(&format!("cannot run {:?}", display_command(&req.command)), &e))?;
        let background_stdin = if req.background { child.stdin.take() } else { None };
        if let (Some(data), Some(mut stdin)) = (req.stdin.clone(), background_stdin) {
            // A thread, so a command that does not read its stdin cannot block us.
            // (Foreground commands get their stdin from the poll loop.)
            let _ = std::thread::Builder::new().name("exec-stdin".into()).spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let pid = child.id();
        lock(&self.table).insert(
            pid,
            Entry {
                info: ProcessInfo {
                    pid,
                    command: display_command(&req.command),
                    background: req.background,
                    exit: None,
                    started_unix_ms: unix_ms_now(),
                },
                files: None,
                seq,
                reaped: false,
            },
        );
        Ok(Spawned { child, pid, started, seq, reaped: false })
    }

    /// Runs a foreground command: output streams through `emit` (capped), and
    /// the result is its exit status, or `Cancelled` when the token is cancelled
    /// (the process group is killed either way).
    ///
    /// One thread does it all: `poll` over the stdout/stderr/stdin pipes and a
    /// pidfd of the child (woken at least every [`CANCEL_POLL_INTERVAL`] to
    /// check the token), so a command costs no extra threads.
    pub fn run_foreground(
        &self,
        req: &ExecRequest,
        cancel: &CancelToken,
        emit: &dyn Fn(Event),
    ) -> Result<ExitStatus, AgentError> {
        let mut spawned = self.spawn(req, Stdio::piped(), Stdio::piped())?;
        let pid = spawned.pid;
        let result = self.drive_foreground(req, &mut spawned, cancel, emit);
        if !spawned.reaped {
            // It failed before the command ended: kill it and reap it (the
            // group while the pid is still ours).
            kill_group(pid);
            let _ = spawned.child.wait();
        }
        self.forget(pid);
        result
    }

    fn drive_foreground(
        &self,
        req: &ExecRequest,
        spawned: &mut Spawned,
        cancel: &CancelToken,
        emit: &dyn Fn(Event),
    ) -> Result<ExitStatus, AgentError> {
        let cap = req.output_cap_bytes.unwrap_or(DEFAULT_OUTPUT_CAP_BYTES);
        let mut capped = CappedOutput::new(cap, &self.output_dir(), format!("exec-{}", spawned.seq));
        let mut forward = |e: Event| emit(e);
        let io_err = |what: &str, e: io::Error| agent_error(what, &e);
        let mut pipes: [(Stream, Option<OwnedFd>); 2] = [
            (Stream::Stdout, spawned.child.stdout.take().map(OwnedFd::from)),
            (Stream::Stderr, spawned.child.stderr.take().map(OwnedFd::from)),
        ];
        let mut stdin: Option<OwnedFd> = spawned.child.stdin.take().map(OwnedFd::from);
        let stdin_data = req.stdin.as_deref().unwrap_or_default();
        let mut stdin_written = 0usize;
        for fd in pipes.iter().filter_map(|(_, fd)| fd.as_ref()).chain(stdin.as_ref()) {
            set_nonblocking(fd).map_err(|e| io_err("set a pipe non-blocking", e))?;
        }
        if stdin_data.is_empty() {
            stdin = None; // closes it: the command sees EOF at once
        }
        let pidfd = pidfd_open(spawned.pid);
        let mut buf = vec![0u8; PIPE_READ_BYTES];
        let mut stopped: Option<StopReason> = None;
        let mut exited: Option<std::process::ExitStatus> = None;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let pipes_open = pipes.iter().any(|(_, fd)| fd.is_some());
            if exited.is_some() && (!pipes_open || drain_deadline.is_some_and(|d| Instant::now() >= d)) {
                break;
            }
            // Build the poll set: [pipes…, stdin?, pidfd?].
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
            for (_, fd) in &pipes {
                if let Some(fd) = fd {
                    fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                }
            }
            if let Some(fd) = &stdin {
                fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
            }
            if let (Some(fd), None) = (&pidfd, &exited) {
                fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            let timeout_ms = CANCEL_POLL_INTERVAL.as_millis() as libc::c_int;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(io_err("poll the command's pipes", e));
                }
            }
            // Output pipes: read what is there; close on EOF.
            for (stream, slot) in &mut pipes {
                let Some(fd) = slot else { continue };
                let ready = fds.iter().any(|p| p.fd == fd.as_raw_fd() && p.revents != 0);
                if !ready {
                    continue;
                }
                loop {
                    match read_fd(fd, &mut buf) {
                        Ok(0) => {
                            *slot = None;
                            break;
                        }
                        Ok(n) => capped.push(Event::Output { stream: *stream, data: buf[..n].to_vec() }, &mut forward),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            *slot = None;
                            break;
                        }
                    }
                }
            }
            // Stdin: write what fits; close when done or when the command stops reading.
            if let Some(fd) = &stdin {
                let ready = fds.iter().any(|p| p.fd == fd.as_raw_fd() && p.revents != 0);
                if ready {
                    match write_fd(fd, &stdin_data[stdin_written..]) {
                        Ok(n) => stdin_written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => stdin_written = stdin_data.len(),
                    }
                    if stdin_written >= stdin_data.len() {
                        stdin = None;
                    }
                }
            }
            // The child: reap it once it exited (pidfd readable, or checked each round
            // without one). A stopped command's group is killed while the
            // zombie still holds its pid, so nothing of it lingers and no reused
            // pid is hit.
            let wait_err = |e| io_err("wait for the command", e);
            if exited.is_none() && has_exited(spawned.pid, false).map_err(wait_err)? {
                if stopped.is_some() {
                    kill_group(spawned.pid);
                }
                let status = reap(&self.table, spawned.pid, &mut spawned.child).map_err(wait_err)?;
                exited = Some(status);
                spawned.reaped = true;
                drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
            }
            if stopped.is_none() {
                if let Some(reason) = cancel.stop_reason() {
                    stopped = Some(reason);
                    kill_group(spawned.pid);
                    stdin = None;
                }
            }
        }
        capped.finish();
        if stopped == Some(StopReason::Cancelled) {
            return Err(error(ErrorKind::Cancelled, "the request was cancelled; the command was killed"));
        }
        let status = exited.ok_or_else(|| error(ErrorKind::Internal, "the command's status was lost"))?;
        let mut exit = exit_status(status, spawned.started, stopped == Some(StopReason::TimedOut));
        exit.stdout_bytes = capped.total_bytes(Stream::Stdout);
        exit.stderr_bytes = capped.total_bytes(Stream::Stderr);
        Ok(exit)
    }

    /// Starts a background command; its output goes to files. Returns its pid.
    pub fn start_background(&self, req: &ExecRequest) -> Result<u32, AgentError> {
        let dir = self.state_dir.join("processes");
        std::fs::create_dir_all(&dir).map_err(|e| agent_error(&format!("create {}", dir.display()), &e))?;
        let mut spawned = self.spawn(req, Stdio::piped(), Stdio::piped())?;
        let pid = spawned.pid;
        let paths = (
            dir.join(format!("{}-{pid}-stdout.log", spawned.seq)),
            dir.join(format!("{}-{pid}-stderr.log", spawned.seq)),
        );
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let mut pumps = Vec::new();
        let pipes: [(usize, Option<BoxedPipe>, &PathBuf); 2] = [
            (0, spawned.child.stdout.take().map(|p| Box::new(p) as BoxedPipe), &paths.0),
            (1, spawned.child.stderr.take().map(|p| Box::new(p) as BoxedPipe), &paths.1),
        ];
        for (i, pipe, path) in pipes {
            let file = File::create(path);
            let (Some(pipe), Ok(file)) = (pipe, file) else {
                kill_group(pid);
                let _ = spawned.child.wait();
                self.forget(pid);
                return Err(error(ErrorKind::Io, format!("cannot create {}", path.display())));
            };
            let file = CappedFile::new(file, path, MAX_BACKGROUND_OUTPUT_FILE_BYTES);
            let counts = Arc::clone(&counts);
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let pump = std::thread::Builder::new().name("bg-output".into()).spawn(move || {
                pump_to_file(pipe, file, &counts[i]);
                let _ = done_tx.send(());
            });
            if pump.is_ok() {
                pumps.push(done_rx);
            }
        }
        if let Some(entry) = lock(&self.table).get_mut(&pid) {
            entry.files = Some(paths);
        }
        let table = Arc::clone(&self.table);
        let started = spawned.started;
        let mut child = spawned.child;
        std::thread::Builder::new()
            .name("bg-wait".into())
            .spawn(move || {
                // Wait for the exit without reaping, then reap under the table lock.
                let status = has_exited(pid, true).and_then(|_| reap(&table, pid, &mut child));
                // Let the pumps catch up so the published exit follows all output.
                let drain_deadline = Instant::now() + OUTPUT_DRAIN_GRACE;
                for done in pumps {
                    let _ = done.recv_timeout(drain_deadline.saturating_duration_since(Instant::now()));
                }
                let mut exit = match status {
                    Ok(status) => exit_status(status, started, false),
                    Err(e) => {
                        eprintln!("capsule-agent: waiting for background pid {pid} failed: {e}");
                        ExitStatus {
                            code: None,
                            signal: None,
                            duration_us: started.elapsed().as_micros() as u64,
                            timed_out: false,
                            stdout_bytes: 0,
                            stderr_bytes: 0,
                        }
                    }
                };
                exit.stdout_bytes = counts[0].load(Ordering::Relaxed);
                exit.stderr_bytes = counts[1].load(Ordering::Relaxed);
                let mut table = lock(&table);
                if let Some(entry) = table.get_mut(&pid) {
                    entry.info.exit = Some(exit);
                }
                prune_finished(&mut table, MAX_FINISHED_PROCESSES, MAX_FINISHED_OUTPUT_BYTES);
            })
            .map_err(|e| error(ErrorKind::Internal, format!("cannot start a waiter thread: {e}")))?;
        Ok(pid)
    }

    /// Drops a foreground process from the table.
    fn forget(&self, pid: u32) {
        lock(&self.table).remove(&pid);
    }

    /// Every process the agent knows: running ones and recent finished background ones.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let table = lock(&self.table);
        let mut entries: Vec<&Entry> = table.values().collect();
        entries.sort_by_key(|e| e.seq);
        entries.into_iter().map(|e| e.info.clone()).collect()
    }

    /// Sends `signal` to a process. A running process the agent started gets
    /// it as a process group (its whole tree); any other pid gets it alone.
    pub fn signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        if !(0..=MAX_SIGNAL_NUMBER).contains(&signal) {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("signal {signal} is out of range 0..={MAX_SIGNAL_NUMBER}"),
            ));
        }
        let target = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| error(ErrorKind::InvalidArgument, format!("pid {pid} cannot be signalled")))?;
        // The lock is held across kill(2): no reap can slip in between.
        let table = lock(&self.table);
        let ours_unreaped = table.get(&pid).is_some_and(|e| !e.reaped);
        let target = if ours_unreaped { -target } else { target };
        // SAFETY: kill(2) takes plain integers; no memory is involved.
        let rc = unsafe { libc::kill(target, signal) };
        drop(table);
        if rc != 0 {
            return Err(agent_error(&format!("signal {signal} to pid {pid}"), &io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Output of a background process from the given offsets.
    pub fn read_output(
        &self,
        pid: u32,
        stdout_offset: u64,
        stderr_offset: u64,
        max_bytes: u64,
    ) -> Result<ProcessOutput, AgentError> {
        let (files, exit) = {
            let table = lock(&self.table);
            let entry = table
                .get(&pid)
                .ok_or_else(|| error(ErrorKind::NotFound, format!("no background process with pid {pid}")))?;
            let files = entry
                .files
                .clone()
                .ok_or_else(|| error(ErrorKind::InvalidArgument, format!("pid {pid} is a foreground process")))?;
            (files, entry.info.exit.clone())
        };
        let max = max_bytes.min(MAX_FILE_CHUNK_BYTES as u64);
        let stdout = read_range(&files.0, stdout_offset, max)?;
        let stderr = read_range(&files.1, stderr_offset, max)?;
        Ok(ProcessOutput {
            next_stdout_offset: stdout_offset + stdout.len() as u64,
            next_stderr_offset: stderr_offset + stderr.len() as u64,
            stdout,
            stderr,
            exit,
        })
    }
}

/// Forgets the oldest finished processes (and deletes their files) until at
/// most `max_count` of them with at most `max_bytes` of output files are left.
fn prune_finished(table: &mut HashMap<u32, Entry>, max_count: usize, max_bytes: u64) {
    let mut finished: Vec<(u64, u32, u64)> =
        table.values().filter(|e| e.info.exit.is_some()).map(|e| (e.seq, e.info.pid, output_file_bytes(e))).collect();
    // Newest first; keep while both bounds hold.
    finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
    let mut kept_bytes = 0u64;
    for (n, (_, pid, bytes)) in finished.into_iter().enumerate() {
        kept_bytes = kept_bytes.saturating_add(bytes);
        if n < max_count && kept_bytes <= max_bytes {
            continue;
        }
        if let Some(Entry { files: Some((out, err)), .. }) = table.remove(&pid) {
            let _ = std::fs::remove_file(out);
            let _ = std::fs::remove_file(err);
        }
    }
}

/// Bytes on disk of an entry's output files.
fn output_file_bytes(entry: &Entry) -> u64 {
    let Some((out, err)) = &entry.files else {
        return 0;
    };
    [out, err].iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

/// Copies a pipe into a [`CappedFile`] (which stops storing at its cap), and
/// counts every byte read.
fn pump_to_file(mut pipe: BoxedPipe, mut file: CappedFile, count: &AtomicU64) {
    let mut buf = vec![0u8; PIPE_READ_BYTES];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        file.write(&buf[..n]);
        // Published after the write, so a reader never sees a count ahead of the file.
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    file.flush();
}

/// Reads up to `max` bytes of `path` from `offset` (empty past the end).
fn read_range(path: &Path, offset: u64, max: u64) -> Result<Vec<u8>, AgentError> {
    let what = || format!("read {}", path.display());
    let mut file = File::open(path).map_err(|e| agent_error(&what(), &e))?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| agent_error(&what(), &e))?;
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out).map_err(|e| agent_error(&what(), &e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_entry(dir: &Path, pid: u32, seq: u64, bytes: u64) -> Entry {
        let out = dir.join(format!("{pid}-stdout.log"));
        let err = dir.join(format!("{pid}-stderr.log"));
        File::create(&out).unwrap().set_len(bytes).unwrap();
        File::create(&err).unwrap();
        Entry {
            info: ProcessInfo {
                pid,
                command: "x".into(),
                background: true,
                exit: Some(ExitStatus {
                    code: Some(0),
                    signal: None,
                    duration_us: 0,
                    timed_out: false,
                    stdout_bytes: bytes,
                    stderr_bytes: 0,
                }),
                started_unix_ms: 0,
            },
            files: Some((out, err)),
            seq,
            reaped: true,
        }
    }

    #[test]
    fn an_exit_is_seen_without_reaping_so_the_pid_stays_ours() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        assert!(has_exited(pid, true).unwrap());
        assert!(has_exited(pid, false).unwrap(), "still there to be seen");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        assert_eq!(state, Some("Z"), "a zombie holds the pid until it is reaped");
        let table = Mutex::new(HashMap::new());
        assert!(reap(&table, pid, &mut child).unwrap().success());
        assert!(has_exited(pid, false).is_err(), "reaped: no longer our child");
    }

    #[test]
    fn finished_processes_are_bounded_by_count_and_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = HashMap::new();
        for (pid, seq) in [(10, 1), (11, 2), (12, 3), (13, 4)] {
            table.insert(pid, finished_entry(dir.path(), pid, seq, 100));
        }
        // A running one is never pruned.
        let mut running = finished_entry(dir.path(), 20, 0, 1000);
        running.info.exit = None;
        table.insert(20, running);

        prune_finished(&mut table, 3, 10_000);
        let mut left: Vec<u32> = table.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![11, 12, 13, 20], "the oldest finished one goes first");
        assert!(!dir.path().join("10-stdout.log").exists(), "its files go with it");

        prune_finished(&mut table, 3, 250);
        let mut left: Vec<u32> = table.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![12, 13, 20], "only the newest 250 bytes of output stay");
        assert!(!dir.path().join("11-stdout.log").exists());
        assert!(dir.path().join("12-stdout.log").exists());
    }
}
