//! A background command's life: one thread per process that copies its
//! output (pipes, or its terminal) into capped files, writes the input queued
//! by `WriteProcess` to its stdin, reaps its leader and publishes the exit,
//! and then stays with its cgroup until what the leader left running there
//! is gone (it ends by itself, or `Signal` 9 kills it).
//!
//! Owns [`Live`], the part of a background process that requests touch
//! while it runs (input queue, terminal, wake-up). Nothing here depends on
//! the connection that started the process: it survives any number of
//! reconnects and snapshot/restores.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::budget::MAX_LIVE_BACKGROUND_PROCESSES;
use crate::cgroup::Cgroup;
use crate::lock::lock;
use crate::oserror::{agent_error, error};
use crate::output::CappedFile;
use crate::protocol::{AgentError, ErrorKind, ExecRequest, ExitStatus, PtySize, MAX_PENDING_INPUT_BYTES};
use crate::pty;
use crate::spawn::Child;

use super::foreground::{read_fd, set_nonblocking, write_fd};
use super::launch::{ChildIo, Launched};
use super::{
    exit_status, kill_command, prune_finished, reap, Entry, KillRecord, Processes, MAX_BACKGROUND_OUTPUT_FILE_BYTES,
    MAX_FINISHED_OUTPUT_BYTES, MAX_FINISHED_PROCESSES, OUTPUT_DRAIN_GRACE,
};

/// Longest sleep of a background thread between looks at its process.
const POLL_SLICE: Duration = Duration::from_millis(250);
/// Bytes read from a pipe or terminal at a time.
const READ_BYTES: usize = 64 * 1024;
/// What closing a terminal's stdin sends: its end-of-file character (Ctrl-D).
const TERMINAL_EOF: &[u8] = b"\x04";

/// Why a process takes no more input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// `WriteProcess` asked to close it.
    Requested,
    /// The process stopped reading (its end of the pipe is closed).
    ReaderGone,
    /// The process exited.
    Exited,
}

#[derive(Debug, Default)]
struct Input {
    queue: VecDeque<u8>,
    /// Close once the queue is written.
    close_after: bool,
    /// No more input is accepted, and why.
    closed: Option<Closed>,
}

/// What requests reach of a running background process.
#[derive(Debug)]
pub(super) struct Live {
    input: Mutex<Input>,
    /// An eventfd that wakes the process's thread when input is queued.
    wake: OwnedFd,
    /// The terminal's master, when it runs on one.
    terminal: Option<Arc<OwnedFd>>,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Live {
    /// Queues `data`, then closes stdin with `close`; returns the bytes now waiting.
    pub(super) fn queue_input(&self, pid: u32, data: &[u8], close: bool) -> Result<u64, AgentError> {
        let too_large = |waiting: usize| {
            error(
                ErrorKind::TooLarge,
                format!(
                    "process {pid} has {waiting} bytes of input it has not read yet; with these {} bytes that \
                     would pass the cap of {MAX_PENDING_INPUT_BYTES} bytes (wait until it reads, or send less)",
                    data.len()
                ),
            )
        };
        let mut input = lock(&self.input);
        if let Some(why) = input.closed {
            let message = match why {
                Closed::Requested => format!("the stdin of process {pid} was closed (close_stdin)"),
                Closed::ReaderGone => format!("process {pid} closed its stdin and reads no more input"),
                Closed::Exited => format!("process {pid} exited"),
            };
            return Err(error(ErrorKind::Closed, message));
        }
        if data.len() > MAX_PENDING_INPUT_BYTES || input.queue.len() + data.len() > MAX_PENDING_INPUT_BYTES {
            return Err(too_large(input.queue.len()));
        }
        input.queue.extend(data);
        if close {
            input.close_after = true;
            input.closed = Some(Closed::Requested);
        }
        let waiting = input.queue.len() as u64;
        drop(input);
        let one = 1u64.to_ne_bytes();
        // A full counter (never in practice) still wakes the thread: it is readable.
        let _ = write_fd(self.wake.as_raw_fd(), &one);
        Ok(waiting)
    }

    /// Sets the terminal's size.
    pub(super) fn resize(&self, pid: u32, size: PtySize) -> Result<(), AgentError> {
        if let Some(problem) = pty::size_problem(size) {
            return Err(error(ErrorKind::InvalidArgument, problem));
        }
        let terminal = self.terminal.as_ref().ok_or_else(|| {
            error(ErrorKind::InvalidArgument, format!("process {pid} has no terminal (start it with pty set)"))
        })?;
        pty::set_size(std::os::fd::AsFd::as_fd(terminal.as_ref()), size)
            .map_err(|e| agent_error(&format!("resize the terminal of process {pid}"), &e))
    }
}

/// Releases a slot of [`MAX_LIVE_BACKGROUND_PROCESSES`] when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Processes {
    /// Starts a background command; its output goes to files, its stdin
    /// takes queued input. Returns its pid.
    pub fn start_background(&self, req: &ExecRequest) -> Result<u32, AgentError> {
        if self.live_background.fetch_add(1, Ordering::Relaxed) >= MAX_LIVE_BACKGROUND_PROCESSES {
            self.live_background.fetch_sub(1, Ordering::Relaxed);
            return Err(error(
                ErrorKind::Busy,
                format!(
                    "{MAX_LIVE_BACKGROUND_PROCESSES} background processes are running (the agent's cap); \
                     kill some before starting more"
                ),
            ));
        }
        let slot = Slot(Arc::clone(&self.live_background));
        let dir = self.state_dir.join("processes");
        std::fs::create_dir_all(&dir).map_err(|e| agent_error(&format!("create {}", dir.display()), &e))?;
        let mut launched = self.launch(req)?;
        let pid = launched.child.id();
        let seq = launched.seq;
        let paths = (dir.join(format!("{seq}-{pid}-stdout.log")), dir.join(format!("{seq}-{pid}-stderr.log")));
        let (live, parts) = match prepare(req, &mut launched, &paths) {
            Ok(built) => built,
            Err(e) => {
                kill_command(launched.cgroup.as_deref(), pid, true, &launched.kills);
                let _ = reap(&self.table, &mut launched.child);
                self.forget(pid);
                return Err(e);
            }
        };
        if let Some(entry) = lock(&self.table).get_mut(&pid) {
            entry.files = Some(paths);
            entry.live = Some(Arc::clone(&live));
        }
        let waiter = Waiter {
            child: launched.child,
            started: launched.started,
            cgroup: launched.cgroup,
            kills: launched.kills,
            parts,
            exited: None,
            published: false,
        };
        let table = Arc::clone(&self.table);
        let spawned = std::thread::Builder::new().name("bg-process".into()).spawn(move || {
            let _slot = slot;
            waiter.run(&table, &live);
        });
        // Without its thread nobody would reap it: the caller is told, and it is killed.
        spawned.map_err(|e| {
            self.kill_orphan(pid);
            error(ErrorKind::Busy, format!("cannot start a thread for background process {pid}: {e}"))
        })?;
        Ok(pid)
    }

    /// Kills a background process whose thread could not start (it is
    /// reaped by PID 1 or the host's init once the agent forgets it).
    fn kill_orphan(&self, pid: u32) {
        let entry = lock(&self.table).remove(&pid);
        if let Some(entry) = entry {
            kill_command(entry.cgroup.as_deref(), pid, true, &entry.kills);
        }
    }
}

/// The descriptors and files of a background process's thread.
struct Parts {
    /// Its stdin pipe (`None` with a terminal, or once closed).
    stdin: Option<OwnedFd>,
    /// Its terminal's master.
    terminal: Option<Arc<OwnedFd>>,
    /// Keeps the output pipes open while `streams` polls their raw fds.
    _pipes: Vec<OwnedFd>,
    /// stdout and stderr (with a terminal, its output is stdout's).
    streams: Vec<Output>,
}

/// Builds a background process's files, input queue and descriptors.
fn prepare(
    req: &ExecRequest,
    launched: &mut Launched,
    paths: &(PathBuf, PathBuf),
) -> Result<(Arc<Live>, Parts), AgentError> {
    let create = |path: &PathBuf| {
        let file = File::create(path).map_err(|e| agent_error(&format!("create {}", path.display()), &e))?;
        Ok::<_, AgentError>(CappedFile::new(file, path, MAX_BACKGROUND_OUTPUT_FILE_BYTES))
    };
    let files = [create(&paths.0)?, create(&paths.1)?];
    let wake = eventfd().map_err(|e| agent_error("create an eventfd", &e))?;
    let io = launched.io.take().ok_or_else(|| error(ErrorKind::Internal, "the process's stdio is gone"))?;
    let (stdin, pipes, terminal) = match io {
        ChildIo::Pipes { stdin, stdout, stderr } => (stdin, vec![stdout, stderr], None),
        ChildIo::Terminal { master } => (None, Vec::new(), Some(Arc::new(master))),
    };
    for fd in pipes.iter().chain(stdin.as_ref()).chain(terminal.as_deref()) {
        set_nonblocking(fd.as_raw_fd()).map_err(|e| agent_error("set a descriptor non-blocking", &e))?;
    }
    let sources: [Option<RawFd>; 2] = match &terminal {
        Some(master) => [Some(master.as_raw_fd()), None],
        None => [pipes.first().map(|p| p.as_raw_fd()), pipes.get(1).map(|p| p.as_raw_fd())],
    };
    let streams = sources.into_iter().zip(files).map(|(fd, file)| Output { fd, file, count: 0 }).collect();
    let mut input = Input::default();
    input.queue.extend(req.stdin.as_deref().unwrap_or_default());
    let live = Arc::new(Live { input: Mutex::new(input), wake, terminal: terminal.clone() });
    Ok((live, Parts { stdin, terminal, _pipes: pipes, streams }))
}

/// A background process's thread.
struct Waiter {
    child: Child,
    started: Instant,
    cgroup: Option<Arc<Cgroup>>,
    kills: Arc<KillRecord>,
    parts: Parts,
    exited: Option<std::process::ExitStatus>,
    published: bool,
}

impl Waiter {
    /// Serves the process until its leader exited and its cgroup is empty
    /// (or, without one, its output pipes are closed), then forgets its live state.
    fn run(mut self, table: &Mutex<HashMap<u32, Entry>>, live: &Live) {
        let pid = self.child.id();
        let mut buf = vec![0u8; READ_BYTES];
        let mut drain_deadline: Option<Instant> = None;
        let cgroup_events = self.cgroup.as_ref().and_then(|c| File::open(c.path().join("cgroup.events")).ok());
        loop {
            let outputs_open = self.parts.streams.iter().any(|s| s.fd.is_some());
            if self.exited.is_some()
                && !self.published
                && (!outputs_open || drain_deadline.is_some_and(|d| Instant::now() >= d))
            {
                self.publish(table);
            }
            // Reading cgroup.events also re-arms its notification for the poll below.
            let leftovers = self.exited.is_some() && self.cgroup.as_ref().is_some_and(|c| c.populated());
            if self.published && !outputs_open && !leftovers {
                break;
            }
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(7);
            let mut watch = |fd: RawFd, events: libc::c_short| fds.push(libc::pollfd { fd, events, revents: 0 });
            for stream in &self.parts.streams {
                if let Some(fd) = stream.fd {
                    watch(fd, libc::POLLIN);
                }
            }
            let input_fd = self.input_fd();
            if let (Some(fd), false) = (input_fd, lock(&live.input).queue.is_empty()) {
                watch(fd, libc::POLLOUT);
            }
            watch(live.wake.as_raw_fd(), libc::POLLIN);
            if let (Some(fd), None) = (self.child.pidfd(), self.exited) {
                watch(fd.as_raw_fd(), libc::POLLIN);
            }
            if let (Some(fd), false) =
                (self.cgroup.as_ref().and_then(|c| c.pids_events_fd()), self.kills.killed.load(Ordering::Relaxed))
            {
                watch(fd.as_raw_fd(), libc::POLLPRI);
            }
            if let (Some(file), true) = (&cgroup_events, leftovers) {
                watch(file.as_raw_fd(), libc::POLLPRI);
            }
            let slice = match (self.exited, drain_deadline) {
                (Some(_), Some(d)) if !self.published => d.saturating_duration_since(Instant::now()).min(POLL_SLICE),
                _ => POLL_SLICE,
            };
            let millis = i32::try_from(slice.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
            for stream in &mut self.parts.streams {
                stream.pump(&mut buf);
            }
            let mut counter = [0u8; 8];
            let _ = read_fd(live.wake.as_raw_fd(), &mut counter);
            self.write_input(live);
            if let Some(cgroup) = &self.cgroup {
                if !self.kills.killed.load(Ordering::Relaxed) && cgroup.pids_limit_hit() {
                    kill_command(Some(cgroup), pid, self.exited.is_none(), &self.kills);
                }
            }
            if self.exited.is_none() {
                match self.child.has_exited(false) {
                    Ok(false) => {}
                    Ok(true) | Err(_) => {
                        let status = reap(table, &mut self.child).unwrap_or_else(|e| {
                            eprintln!("capsule-agent: waiting for background pid {pid} failed: {e}");
                            std::process::ExitStatus::default()
                        });
                        self.exited = Some(status);
                        drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
                        let mut input = lock(&live.input);
                        input.closed = Some(Closed::Exited);
                        input.queue.clear();
                        self.parts.stdin = None;
                    }
                }
            }
        }
        for stream in &mut self.parts.streams {
            stream.file.flush();
        }
        let mut table = lock(table);
        if let Some(entry) = table.get_mut(&pid) {
            if let Some(exit) = &mut entry.info.exit {
                self.fill(exit);
            }
            entry.cgroup = None;
            entry.live = None;
        }
        prune_finished(&mut table, MAX_FINISHED_PROCESSES, MAX_FINISHED_OUTPUT_BYTES);
    }

    /// Where input goes: the stdin pipe, or the terminal.
    fn input_fd(&self) -> Option<RawFd> {
        self.parts.stdin.as_ref().map(|fd| fd.as_raw_fd()).or(self.parts.terminal.as_ref().map(|t| t.as_raw_fd()))
    }

    /// Writes what is queued (as much as fits now), then closes stdin if asked.
    fn write_input(&mut self, live: &Live) {
        let Some(fd) = self.input_fd().filter(|_| self.exited.is_none()) else { return };
        let mut input = lock(&live.input);
        while !input.queue.is_empty() {
            let written = write_fd(fd, input.queue.as_slices().0);
            match written {
                Ok(n) => drop(input.queue.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    input.queue.clear();
                    input.close_after = false;
                    input.closed = Some(Closed::ReaderGone);
                    self.parts.stdin = None;
                    return;
                }
            }
        }
        if input.close_after {
            input.close_after = false;
            match &self.parts.terminal {
                Some(_) => drop(write_fd(fd, TERMINAL_EOF)),
                None => self.parts.stdin = None,
            }
        }
    }

    /// Sets the byte counts, the limit and the kill count of `exit`.
    fn fill(&self, exit: &mut ExitStatus) {
        exit.stdout_bytes = self.parts.streams.first().map_or(0, |s| s.count);
        exit.stderr_bytes = self.parts.streams.get(1).map_or(0, |s| s.count);
        exit.limit = self.cgroup.as_ref().and_then(|c| c.limit_hit()).or(exit.limit);
        exit.escaped_killed = self.kills.others.load(Ordering::Relaxed);
    }

    /// Publishes the leader's exit in the table (after its output).
    fn publish(&mut self, table: &Mutex<HashMap<u32, Entry>>) {
        self.published = true;
        let Some(status) = self.exited else { return };
        let mut exit = exit_status(status, self.started, false);
        self.fill(&mut exit);
        let mut table = lock(table);
        if let Some(entry) = table.get_mut(&self.child.id()) {
            entry.info.exit = Some(exit);
        }
        prune_finished(&mut table, MAX_FINISHED_PROCESSES, MAX_FINISHED_OUTPUT_BYTES);
    }
}

/// One output stream: where it comes from and where it is kept.
struct Output {
    /// The pipe or terminal it is read from, until its end.
    fd: Option<RawFd>,
    file: CappedFile,
    /// Every byte read (kept or not).
    count: u64,
}

impl Output {
    /// Reads what is there now into the file; notes the end of the stream
    /// (a terminal whose processes all closed it says `EIO`).
    fn pump(&mut self, buf: &mut [u8]) {
        let Some(fd) = self.fd else { return };
        loop {
            match read_fd(fd, buf) {
                Ok(0) => break self.fd = None,
                Ok(n) => {
                    self.file.write(&buf[..n]);
                    self.count += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break self.fd = None,
            }
        }
    }
}
