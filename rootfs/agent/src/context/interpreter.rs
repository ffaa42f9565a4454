//! One interpreter process of a context: spawning it (into its own cgroup,
//! with its private pipes), reading what it writes, signalling it, and
//! killing it with everything it started.
//!
//! Owns the process, its cgroup and its file descriptors: fd 3 (cells in),
//! fd 4 (driver messages out), stdout and stderr (pipes), and for bash its
//! stdin. It never interprets a cell's events or decides on timeouts: that
//! is [`super::cell`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use crate::budget::Protection;
use crate::cgroup::Cgroup;
use crate::process::merged_env;
use crate::protocol::{Language, Stream};
use crate::spawn::{self, Child, Session, SpawnError, SpawnSpec};

use super::driver::{self, DriverError, DriverMessage, Launch, MAX_DRIVER_MESSAGE_BYTES};

/// The fd on which a driver reads cells.
const DRIVER_CMD_FD: RawFd = 3;
/// The fd on which a driver writes its messages.
const DRIVER_MSG_FD: RawFd = 4;
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
        source: Box<SpawnError>,
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
    /// The cgroup's `pids.events` changed: a fork may have failed at the limit.
    pub pids_event: bool,
}

/// A running interpreter. Dropping it kills its process group and its cgroup.
pub struct Interpreter {
    child: Child,
    pid: i32,
    language: Language,
    /// Its cgroup (`None` when the agent has none); removed when dropped.
    cgroup: Option<Cgroup>,
    cmd: File,
    stdin: Option<File>,
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
    /// Starts an interpreter in its own process group, in `work_dir`, born
    /// in `cgroup` (which it then owns).
    pub fn spawn(
        launch: &Launch,
        work_dir: &Path,
        language: Language,
        cgroup: Option<Cgroup>,
        protection: Protection,
    ) -> Result<Self, InterpreterError> {
        let pipe = || spawn::pipe().map_err(InterpreterError::Pipe);
        let (cmd_r, cmd_w) = pipe()?;
        let (msg_r, msg_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin = if launch.stdin_preamble.is_some() { Some(pipe()?) } else { None };
        let null = File::open("/dev/null").map_err(InterpreterError::Pipe)?;
        let stdin_child: BorrowedFd<'_> = stdin.as_ref().map_or(null.as_fd(), |(r, _)| r.as_fd());
        let env: Vec<(String, String)> = launch.env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let env = merged_env(&env);
        let args: Vec<OsString> =
            std::iter::once(launch.program.as_os_str().to_owned()).chain(launch.args.iter().cloned()).collect();
        let fds = [
            (0, stdin_child),
            (1, out_w.as_fd()),
            (2, err_w.as_fd()),
            (DRIVER_CMD_FD, cmd_r.as_fd()),
            (DRIVER_MSG_FD, msg_w.as_fd()),
        ];
        let spec = SpawnSpec {
            program: OsStr::new(launch.program.as_os_str()),
            args: &args,
            env: &env,
            cwd: work_dir,
            fds: &fds,
            session: Session::NewProcessGroup,
            cgroup: cgroup.as_ref().map(|c| c.dir_fd()),
            protection,
        };
        // The agent may ignore or handle signals (PID 1 does); the spawner
        // resets every one to its default, so the interpreter has SIGINT live.
        let child = spawn::spawn(&spec).map_err(|source| InterpreterError::Spawn {
            program: launch.program.display().to_string(),
            work_dir: work_dir.display().to_string(),
            source: Box::new(source),
        })?;
        drop((cmd_r, msg_w, out_w, err_w, null));
        // From here on, dropping `interp` on an error kills the process group.
        let mut interp = Self {
            pid: i32::try_from(child.id()).unwrap_or(i32::MAX),
            child,
            language,
            cgroup,
            cmd: File::from(cmd_w),
            stdin: stdin.map(|(_, w)| File::from(w)),
            messages: File::from(msg_r),
            stdout: File::from(out_r),
            stderr: File::from(err_r),
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

    /// Its cgroup, when it has one.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
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
        let pids_events = self.cgroup.as_ref().and_then(|c| c.pids_events_fd()).map_or(-1, |fd| fd.as_raw_fd());
        let mut fds = [
            entry(&self.stdout, self.stdout_closed),
            entry(&self.stderr, self.stderr_closed),
            entry(&self.messages, self.messages_closed),
            libc::pollfd { fd: pids_events, events: libc::POLLPRI, revents: 0 },
        ];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` holds 4 initialised pollfd entries that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Readiness::default());
            }
            return Err(InterpreterError::Io { doing: "polling the pipes", source: e });
        }
        let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        Ok(Readiness {
            stdout: ready(&fds[0]),
            stderr: ready(&fds[1]),
            messages: ready(&fds[2]),
            pids_event: fds[3].revents & (libc::POLLPRI | libc::POLLERR) != 0,
        })
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

    /// Kills the whole process group and cgroup, and reaps the interpreter.
    pub fn kill(&mut self) {
        if self.group_killed {
            return;
        }
        // Once: after the group is empty its id may be reused by someone else.
        self.group_killed = true;
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.kill();
        }
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
