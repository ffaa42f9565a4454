//! One interpreter process of a context: spawning it with its private pipes,
//! reading what it writes, signalling and killing its process group.
//!
//! Owns the process and its file descriptors: fd 3 (cells in), fd 4 (driver
//! messages out), stdout and stderr (pipes), and for bash its stdin. It never
//! interprets a cell's events or decides on timeouts: that is [`super::cell`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::protocol::{Language, Stream};

use super::driver::{self, DriverError, DriverMessage, Launch, MAX_DRIVER_MESSAGE_BYTES};

/// The fd on which a driver reads cells.
const DRIVER_CMD_FD: RawFd = 3;
/// The fd on which a driver writes its messages.
const DRIVER_MSG_FD: RawFd = 4;
/// Pipe ends are moved at or above this fd, so the child's `dup2` onto 3 and 4
/// can never clobber one of them.
const LOWEST_PIPE_FD: RawFd = 10;
/// Bytes read from one pipe per read call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Errors of an interpreter process.
#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    /// A pipe could not be created.
    #[error("cannot create a pipe for the interpreter")]
    Pipe(#[source] io::Error),
    /// The interpreter could not be started.
    #[error("cannot start {program} in {work_dir}")]
    Spawn {
        /// The program.
        program: String,
        /// The working directory.
        work_dir: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the interpreter's pipes failed.
    #[error("i/o with the interpreter failed while {doing}")]
    Io {
        /// What the agent was doing.
        doing: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The driver said something that is not a driver message.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The driver sent a message line longer than the cap.
    #[error("the driver sent a message over {MAX_DRIVER_MESSAGE_BYTES} bytes")]
    MessageTooLarge,
}

/// Which of the interpreter's pipes have something (data or end of file).
#[derive(Debug, Default, Clone, Copy)]
pub struct Readiness {
    /// stdout is readable.
    pub stdout: bool,
    /// stderr is readable.
    pub stderr: bool,
    /// The message pipe is readable or closed.
    pub messages: bool,
}

/// A running interpreter. Dropping it kills its process group.
pub struct Interpreter {
    child: Child,
    pid: i32,
    language: Language,
    cmd: File,
    stdin: Option<ChildStdin>,
    messages: File,
    stdout: File,
    stderr: File,
    message_buf: Vec<u8>,
    stdout_closed: bool,
    stderr_closed: bool,
    messages_closed: bool,
    exit: Option<ExitStatus>,
    group_killed: bool,
}

impl std::fmt::Debug for Interpreter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interpreter").field("pid", &self.pid).field("language", &self.language).finish()
    }
}

/// A pipe whose both ends sit at or above [`LOWEST_PIPE_FD`], close-on-exec.
fn high_pipe() -> Result<(OwnedFd, OwnedFd), InterpreterError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(InterpreterError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((raise_fd(r)?, raise_fd(w)?))
}

fn raise_fd(fd: OwnedFd) -> Result<OwnedFd, InterpreterError> {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd or -1; no memory is involved.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, LOWEST_PIPE_FD) };
    if high < 0 {
        return Err(InterpreterError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: fcntl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL take and return plain ints.
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

impl Interpreter {
    /// Starts an interpreter in its own process group, in `work_dir`.
    pub fn spawn(launch: &Launch, work_dir: &Path, language: Language) -> Result<Self, InterpreterError> {
        let (cmd_r, cmd_w) = high_pipe()?;
        let (msg_r, msg_w) = high_pipe()?;
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .current_dir(work_dir)
            .stdin(if launch.stdin_preamble.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        let (child_cmd, child_msg) = (cmd_r.as_raw_fd(), msg_w.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (dup2, signal) on fds that are open in it.
        unsafe {
            command.pre_exec(move || {
                // dup2 clears close-on-exec on the new fds; the originals (>= 10) close at exec.
                if libc::dup2(child_cmd, DRIVER_CMD_FD) < 0 || libc::dup2(child_msg, DRIVER_MSG_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The agent may ignore these (PID 1 does); the interpreter needs SIGINT live.
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| InterpreterError::Spawn {
            program: launch.program.display().to_string(),
            work_dir: work_dir.display().to_string(),
            source,
        })?;
        drop(cmd_r);
        drop(msg_w);
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            // Cannot happen (both were asked for as pipes); never leave the child behind.
            // SAFETY: kill(2) on the child's own process group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _reaped = child.wait();
            return Err(InterpreterError::Io {
                doing: "taking stdout and stderr",
                source: io::Error::other("no pipe"),
            });
        };
        let stdin = child.stdin.take();
        // From here on, dropping `interp` on an error kills the process group.
        let mut interp = Self {
            pid: i32::try_from(child.id()).unwrap_or(i32::MAX),
            child,
            language,
            cmd: File::from(cmd_w),
            stdin,
            messages: File::from(msg_r),
            stdout: OwnedFd::from(stdout).into(),
            stderr: OwnedFd::from(stderr).into(),
            message_buf: Vec::new(),
            stdout_closed: false,
            stderr_closed: false,
            messages_closed: false,
            exit: None,
            group_killed: false,
        };
        let io_err = |doing| move |source| InterpreterError::Io { doing, source };
        for fd in [interp.stdout.as_raw_fd(), interp.stderr.as_raw_fd(), interp.messages.as_raw_fd()] {
            set_nonblocking(fd).map_err(io_err("making pipes non-blocking"))?;
        }
        if let (Some(pre), Some(input)) = (launch.stdin_preamble, interp.stdin.as_mut()) {
            input.write_all(pre).map_err(io_err("writing the driver set-up"))?;
        }
        Ok(interp)
    }

    /// The interpreter's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Hands one cell to the driver.
    pub fn send_cell(&mut self, code: &str, count: u64) -> Result<(), InterpreterError> {
        let err = |source| InterpreterError::Io { doing: "sending the cell", source };
        if self.language == Language::Bash {
            // The command goes first: the shell then reads the source while we write it.
            let stdin = self.stdin.as_mut().ok_or_else(|| err(io::Error::other("bash has no stdin pipe")))?;
            stdin.write_all(driver::BASH_CELL_COMMAND.as_bytes()).map_err(err)?;
        }
        self.cmd.write_all(&driver::encode_cell(self.language, code, count)).map_err(err)
    }

    /// Lets the driver go on after a message that asked for an ack.
    pub fn ack(&mut self) -> Result<(), InterpreterError> {
        self.cmd
            .write_all(driver::ACK)
            .map_err(|source| InterpreterError::Io { doing: "acknowledging a result", source })
    }

    /// Waits up to `timeout` for one of the pipes to become readable.
    pub fn poll(&self, timeout: Duration) -> Result<Readiness, InterpreterError> {
        // A pipe at its end would report POLLHUP forever: poll ignores negative fds.
        let entry = |file: &File, closed: bool| libc::pollfd {
            fd: if closed { -1 } else { file.as_raw_fd() },
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            entry(&self.stdout, self.stdout_closed),
            entry(&self.stderr, self.stderr_closed),
            entry(&self.messages, self.messages_closed),
        ];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` holds 3 initialised pollfd entries that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Readiness::default());
            }
            return Err(InterpreterError::Io { doing: "polling the pipes", source: e });
        }
        let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        Ok(Readiness { stdout: ready(&fds[0]), stderr: ready(&fds[1]), messages: ready(&fds[2]) })
    }

    /// Reads what one output stream has now (empty when nothing, or at its end).
    pub fn read_output(&mut self, stream: Stream) -> Result<Vec<u8>, InterpreterError> {
        let (file, closed) = match stream {
            Stream::Stdout => (&mut self.stdout, &mut self.stdout_closed),
            Stream::Stderr => (&mut self.stderr, &mut self.stderr_closed),
        };
        if *closed {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        match read_some(file, &mut buf) {
            Ok(ReadOutcome::Data(n)) => {
                buf.truncate(n);
                Ok(buf)
            }
            Ok(ReadOutcome::Empty) => Ok(Vec::new()),
            Ok(ReadOutcome::End) => {
                *closed = true;
                Ok(Vec::new())
            }
            Err(source) => Err(InterpreterError::Io { doing: "reading output", source }),
        }
    }

    /// Reads the complete messages the driver has sent so far; notes when the
    /// driver's end is gone (see [`Self::messages_closed`]).
    pub fn read_messages(&mut self) -> Result<Vec<DriverMessage>, InterpreterError> {
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        while !self.messages_closed {
            match read_some(&mut self.messages, &mut buf) {
                Ok(ReadOutcome::Empty) => break,
                Ok(ReadOutcome::End) => self.messages_closed = true,
                Ok(ReadOutcome::Data(n)) => self.message_buf.extend_from_slice(&buf[..n]),
                Err(source) => return Err(InterpreterError::Io { doing: "reading driver messages", source }),
            }
            if self.message_buf.len() > MAX_DRIVER_MESSAGE_BYTES && !self.message_buf.contains(&b'\n') {
                return Err(InterpreterError::MessageTooLarge);
            }
        }
        let mut out = Vec::new();
        while let Some(end) = self.message_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.message_buf.drain(..=end).collect();
            out.push(driver::parse_message(&line[..end])?);
        }
        Ok(out)
    }

    /// Whether the driver's message pipe reached its end (the driver is gone).
    pub fn messages_closed(&self) -> bool {
        self.messages_closed
    }

    /// Interrupts the running cell with SIGINT.
    ///
    /// Python and node get it alone, as a Jupyter kernel does: the cell's
    /// KeyboardInterrupt/exception stops what it waits on (`subprocess.run`
    /// kills its child), and servers it started in the background live on.
    /// Bash gets it on its whole process group, as Ctrl-C in a terminal: the
    /// foreground command dies, and background jobs (started with SIGINT
    /// ignored, since job control is off) live on.
    pub fn interrupt(&self) {
        let target = if self.language == Language::Bash { -self.pid } else { self.pid };
        // SAFETY: kill(2) on our own child (or its process group); no memory involved.
        unsafe { libc::kill(target, libc::SIGINT) };
    }

    /// The exit status, once the interpreter has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.exit = status,
                // Someone else reaped it (PID 1's reaper): it is gone if its pid is.
                Err(_) => {
                    // SAFETY: kill with signal 0 only checks that the pid exists.
                    if unsafe { libc::kill(self.pid, 0) } != 0 {
                        self.exit = Some(ExitStatus::default());
                    }
                }
            }
        }
        self.exit
    }

    /// Kills the whole process group and reaps the interpreter.
    pub fn kill(&mut self) {
        if self.group_killed {
            return;
        }
        // Once: after the group is empty its id may be reused by someone else.
        self.group_killed = true;
        // SAFETY: kill(2) with a negative pid signals our own child's process group.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        if self.exit.is_none() {
            self.exit = Some(self.child.wait().unwrap_or_default());
        }
    }
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one non-blocking read found.
enum ReadOutcome {
    /// This many bytes.
    Data(usize),
    /// Nothing now.
    Empty,
    /// The writers are all gone.
    End,
}

fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<ReadOutcome> {
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(ReadOutcome::End),
            Ok(n) => return Ok(ReadOutcome::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::Empty),
            Err(e) => return Err(e),
        }
    }
}
