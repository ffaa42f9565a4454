//! A foreground command's life: its output streamed as it comes, its stdin
//! fed, its end awaited, and its whole cgroup killed when it times out, is
//! cancelled, hits its pids limit, or leaves processes behind.
//!
//! One thread (the request's) does it all: `poll` over the stdout/stderr/stdin
//! pipes, a pidfd of the child and the cgroup's `pids.events` (woken at least
//! every [`CANCEL_POLL_INTERVAL`] to check the cancel token), so a command
//! costs no extra threads. It never decides limits or creates the cgroup:
//! that is [`super::launch`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cancel::{CancelToken, StopReason};
use crate::oserror::{agent_error, error};
use crate::output::CappedOutput;
use crate::protocol::{AgentError, ErrorKind, Event, ExecRequest, ExitStatus, Stream, DEFAULT_OUTPUT_CAP_BYTES};

use super::launch::{ChildIo, Launched};
use super::{exit_status, kill_command, reap, Processes, OUTPUT_DRAIN_GRACE};

/// How often a foreground request checks its cancel token while the command runs.
const CANCEL_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Bytes read from a pipe at a time.
const PIPE_READ_BYTES: usize = 64 * 1024;

/// Why the agent stopped a command before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The request's deadline or a cancel.
    Request(StopReason),
    /// A fork failed at the cgroup's `pids.max`.
    PidsLimit,
}

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

pub(super) fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

impl Processes {
    /// Runs a foreground command: output streams through `emit` (capped), and
    /// the result is its exit status, or `Cancelled` when the token is
    /// cancelled (the whole cgroup is killed either way).
    pub fn run_foreground(
        &self,
        req: &ExecRequest,
        cancel: &CancelToken,
        emit: &dyn Fn(Event),
    ) -> Result<ExitStatus, AgentError> {
        let mut launched = self.launch(req)?;
        let pid = launched.child.id();
        let result = self.drive(req, &mut launched, cancel, emit);
        if launched.child.try_wait().ok().flatten().is_none() {
            // It failed before the command ended: kill it and reap it (the
            // group while the pid is still ours).
            kill_command(launched.cgroup.as_deref(), pid, true, &launched.kills);
            let _ = reap(&self.table, &mut launched.child);
        }
        self.forget(pid);
        result
    }

    fn drive(
        &self,
        req: &ExecRequest,
        launched: &mut Launched,
        cancel: &CancelToken,
        emit: &dyn Fn(Event),
    ) -> Result<ExitStatus, AgentError> {
        let cap = req.output_cap_bytes.unwrap_or(DEFAULT_OUTPUT_CAP_BYTES);
        let mut capped = CappedOutput::new(cap, &self.output_dir(), format!("exec-{}", launched.seq));
        let mut forward = |e: Event| emit(e);
        let io_err = |what: &str, e: io::Error| agent_error(what, &e);
        let Some(ChildIo::Pipes { stdin, stdout, stderr }) = launched.io.take() else {
            return Err(error(ErrorKind::Internal, "a foreground command has a terminal"));
        };
        let mut pipes: [(Stream, Option<OwnedFd>); 2] =
            [(Stream::Stdout, Some(stdout)), (Stream::Stderr, Some(stderr))];
        let mut stdin = stdin;
        let stdin_data = req.stdin.as_deref().unwrap_or_default();
        let mut stdin_written = 0usize;
        for fd in pipes.iter().filter_map(|(_, fd)| fd.as_ref()).chain(stdin.as_ref()) {
            set_nonblocking(fd.as_raw_fd()).map_err(|e| io_err("set a pipe non-blocking", e))?;
        }
        if stdin_data.is_empty() {
            stdin = None; // closes it: the command sees EOF at once
        }
        let pid = launched.child.id();
        let pidfd = launched.child.pidfd().map(|fd| fd.as_raw_fd());
        let cgroup = launched.cgroup.clone();
        let pids_events = cgroup.as_ref().and_then(|c| c.pids_events_fd()).map(|fd| fd.as_raw_fd());
        let mut buf = vec![0u8; PIPE_READ_BYTES];
        let mut stopped: Option<Stop> = None;
        let mut exited: Option<std::process::ExitStatus> = None;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let pipes_open = pipes.iter().any(|(_, fd)| fd.is_some());
            if exited.is_some() && (!pipes_open || drain_deadline.is_some_and(|d| Instant::now() >= d)) {
                break;
            }
            // The poll set: [pipes…, stdin?, pidfd?, pids.events?].
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
            fds.extend(pipes.iter().filter_map(|(_, fd)| fd.as_ref()).map(|fd| pollfd(fd.as_raw_fd(), libc::POLLIN)));
            if let Some(fd) = &stdin {
                fds.push(pollfd(fd.as_raw_fd(), libc::POLLOUT));
            }
            if let (Some(fd), None) = (pidfd, &exited) {
                fds.push(pollfd(fd, libc::POLLIN));
            }
            if let (Some(fd), None) = (pids_events, stopped) {
                fds.push(pollfd(fd, libc::POLLPRI));
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
            let ready = |fd: RawFd| fds.iter().any(|p| p.fd == fd && p.revents != 0);
            // Output pipes: read what is there; close on EOF.
            for (stream, slot) in &mut pipes {
                let Some(fd) = slot else { continue };
                if !ready(fd.as_raw_fd()) {
                    continue;
                }
                loop {
                    match read_fd(fd.as_raw_fd(), &mut buf) {
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
                if ready(fd.as_raw_fd()) {
                    match write_fd(fd.as_raw_fd(), &stdin_data[stdin_written..]) {
                        Ok(n) => stdin_written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => stdin_written = stdin_data.len(),
                    }
                    if stdin_written >= stdin_data.len() {
                        stdin = None;
                    }
                }
            }
            // A fork refused at pids.max: a runaway never stops by itself, so stop it all now.
            if let (Some(fd), None, Some(cgroup)) = (pids_events, stopped, &cgroup) {
                if ready(fd) && cgroup.pids_limit_hit() {
                    stopped = Some(Stop::PidsLimit);
                    kill_command(Some(cgroup), pid, exited.is_none(), &launched.kills);
                    stdin = None;
                }
            }
            // The child: reap it once it exited (pidfd readable, or checked each
            // round without one). A stopped command is killed again while the
            // zombie still holds its pid, so nothing of it lingers and no
            // reused pid is hit. Without a stop, what it left running in its
            // cgroup escaped it: those are killed and counted.
            let wait_err = |e| io_err("wait for the command", e);
            if exited.is_none() && launched.child.has_exited(false).map_err(wait_err)? {
                if stopped.is_some() {
                    super::kill_group(pid);
                }
                let status = reap(&self.table, &mut launched.child).map_err(wait_err)?;
                exited = Some(status);
                if let (None, Some(cgroup)) = (stopped, &cgroup) {
                    if !launched.kills.killed.load(Ordering::Relaxed) && cgroup.populated() {
                        kill_command(Some(cgroup), pid, false, &launched.kills);
                    }
                }
                drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
            }
            if stopped.is_none() {
                if let Some(reason) = cancel.stop_reason() {
                    stopped = Some(Stop::Request(reason));
                    kill_command(cgroup.as_deref(), pid, exited.is_none(), &launched.kills);
                    stdin = None;
                }
            }
        }
        capped.finish();
        if stopped == Some(Stop::Request(StopReason::Cancelled)) {
            return Err(error(ErrorKind::Cancelled, "the request was cancelled; the command was killed"));
        }
        let status = exited.ok_or_else(|| error(ErrorKind::Internal, "the command's status was lost"))?;
        let mut exit = exit_status(status, launched.started, stopped == Some(Stop::Request(StopReason::TimedOut)));
        exit.stdout_bytes = capped.total_bytes(Stream::Stdout);
        exit.stderr_bytes = capped.total_bytes(Stream::Stderr);
        exit.limit = cgroup.as_ref().and_then(|c| c.limit_hit());
        exit.escaped_killed = launched.kills.others.load(Ordering::Relaxed);
        Ok(exit)
    }
}
