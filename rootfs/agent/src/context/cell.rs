//! Running one cell on a live interpreter: streaming its output and results as
//! they arrive, interrupting it on timeout or cancel, and killing it when it
//! will not stop.
//!
//! Owns the wait loop (poll on the pipes, sliced so the cancel token and the
//! context's abort flag are seen within [`POLL_SLICE`]). It never starts or
//! restarts interpreters and never decides what the client is told about a
//! restart: that is [`super::Contexts`].

use std::process::ExitStatus;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::cancel::{CancelToken, StopReason};
use crate::protocol::{Event, Stream};

use super::driver::DriverMessage;
use super::interpreter::{Interpreter, InterpreterError, Readiness};

/// How long a cell may take to stop after SIGINT before its interpreter is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// Longest sleep between looks at the cancel token and the abort flag.
pub const POLL_SLICE: Duration = Duration::from_millis(50);
/// Longest an interpreter may take to start and say it is ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of an interpreter's start-up stderr kept for an error message.
const MAX_STARTUP_STDERR_BYTES: usize = 4096;

/// Why someone other than the cell's own request wants the cell stopped now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The context is being reset.
    Reset,
    /// The context is being removed (or the agent shuts down).
    Removed,
}

impl Abort {
    /// Stores into a context's abort flag.
    pub fn store(self, flag: &AtomicU8) {
        flag.store(self as u8 + 1, Ordering::SeqCst);
    }

    /// Reads a context's abort flag.
    pub fn load(flag: &AtomicU8) -> Option<Self> {
        match flag.load(Ordering::SeqCst) {
            1 => Some(Abort::Reset),
            2 => Some(Abort::Removed),
            _ => None,
        }
    }
}

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The driver said the cell was done (after an interrupt too, when it stopped in time).
    Done {
        /// Bash's exit status of the cell.
        exit: Option<i32>,
    },
    /// The interpreter ended by itself during the cell.
    Died(ExitStatus),
    /// The cell did not stop within [`INTERRUPT_GRACE`] of SIGINT; the interpreter was killed.
    Killed,
    /// [`Abort`] asked for it; the interpreter was killed.
    Aborted(Abort),
    /// A fork failed at the context's `pids.max`: the interpreter and
    /// everything it started were killed (a runaway never stops by itself).
    PidsLimit,
}

/// What running a cell came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellReport {
    /// How it ended.
    pub ending: Ending,
    /// Whether (and why) the request asked it to stop.
    pub stop: Option<StopReason>,
}

/// Runs one cell: hands it to the driver, emits output, results and errors in
/// order, and returns when the driver says done or the interpreter is gone.
pub fn run(
    interp: &mut Interpreter,
    code: &str,
    count: u64,
    cancel: &CancelToken,
    abort: &AtomicU8,
    emit: &mut dyn FnMut(Event),
) -> Result<CellReport, InterpreterError> {
    interp.send_cell(code, count)?;
    let mut stop: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(why) = Abort::load(abort) {
            interp.kill();
            drain_output(interp, emit)?;
            return Ok(CellReport { ending: Ending::Aborted(why), stop });
        }
        if stop.is_none() {
            if let Some(reason) = cancel.stop_reason() {
                stop = Some(reason);
                interp.interrupt();
                kill_at = Some(Instant::now() + INTERRUPT_GRACE);
            }
        }
        let slice = match (kill_at, cancel.remaining()) {
            (Some(at), _) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    interp.kill();
                    drain_output(interp, emit)?;
                    return Ok(CellReport { ending: Ending::Killed, stop });
                }
                left.min(POLL_SLICE)
            }
            (None, Some(left)) => left.min(POLL_SLICE),
            (None, None) => POLL_SLICE,
        };
        let ready = interp.poll(slice)?;
        forward_output(interp, ready, emit)?;
        if ready.pids_event && interp.cgroup().is_some_and(|c| c.pids_limit_hit()) {
            interp.kill();
            drain_output(interp, emit)?;
            return Ok(CellReport { ending: Ending::PidsLimit, stop });
        }
        if ready.messages {
            for message in interp.read_messages()? {
                // The driver flushed before writing this message: what the cell
                // printed before it is already in the pipes, and goes out first.
                drain_output(interp, emit)?;
                match message {
                    DriverMessage::Ready => {}
                    DriverMessage::Result { result, wants_ack } => {
                        emit(Event::Result(result));
                        if wants_ack {
                            interp.ack()?;
                        }
                    }
                    DriverMessage::Error(error) => emit(Event::Error(error)),
                    DriverMessage::Done { exit } => {
                        return Ok(CellReport { ending: Ending::Done { exit }, stop });
                    }
                }
            }
        }
        if interp.messages_closed() || interp.try_exit().is_some() {
            // Give a dying interpreter a moment to be reaped, then drain what it wrote.
            let status = wait_exit(interp);
            drain_output(interp, emit)?;
            return Ok(CellReport { ending: Ending::Died(status), stop });
        }
    }
}

/// Waits for a freshly spawned interpreter to say it is ready. Output before
/// that is the interpreter's own start-up noise and is dropped; stderr is kept
/// (capped) for the error message when it fails to start.
pub fn wait_ready(interp: &mut Interpreter, cancel: &CancelToken) -> Result<(), StartupFailure> {
    let give_up_at = Instant::now() + STARTUP_TIMEOUT;
    let mut stderr = Vec::new();
    loop {
        if let Some(reason) = cancel.stop_reason() {
            return Err(StartupFailure::Stopped(reason));
        }
        let left = give_up_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartupFailure::TooSlow);
        }
        let slice = cancel.remaining().unwrap_or(POLL_SLICE).min(POLL_SLICE).min(left);
        let ready = interp.poll(slice).map_err(StartupFailure::Io)?;
        if ready.stdout {
            interp.read_output(Stream::Stdout).map_err(StartupFailure::Io)?;
        }
        if ready.stderr {
            let chunk = interp.read_output(Stream::Stderr).map_err(StartupFailure::Io)?;
            let room = MAX_STARTUP_STDERR_BYTES.saturating_sub(stderr.len());
            stderr.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if ready.messages {
            let messages = interp.read_messages().map_err(StartupFailure::Io)?;
            if messages.contains(&DriverMessage::Ready) {
                return Ok(());
            }
        }
        if interp.messages_closed() || interp.try_exit().is_some() {
            let status = wait_exit(interp);
            while let Ok(chunk) = interp.read_output(Stream::Stderr) {
                if chunk.is_empty() {
                    break;
                }
                let room = MAX_STARTUP_STDERR_BYTES.saturating_sub(stderr.len());
                stderr.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            return Err(StartupFailure::Died { status, stderr: String::from_utf8_lossy(&stderr).into_owned() });
        }
    }
}

/// Why an interpreter did not become ready.
#[derive(Debug)]
pub enum StartupFailure {
    /// The request was cancelled or timed out meanwhile.
    Stopped(StopReason),
    /// It did not say ready within [`STARTUP_TIMEOUT`].
    TooSlow,
    /// It exited first.
    Died {
        /// How it exited.
        status: ExitStatus,
        /// The start of what it wrote on stderr.
        stderr: String,
    },
    /// Its pipes failed.
    Io(InterpreterError),
}

/// Waits briefly for an interpreter whose message pipe closed to exit; kills it
/// if it lingers (a driver that closed fd 4 is of no use any more).
fn wait_exit(interp: &mut Interpreter) -> ExitStatus {
    const EXIT_WAIT: Duration = Duration::from_millis(500);
    let until = Instant::now() + EXIT_WAIT;
    while Instant::now() < until {
        if let Some(status) = interp.try_exit() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    interp.kill();
    interp.try_exit().unwrap_or_default()
}

fn forward_output(
    interp: &mut Interpreter,
    ready: Readiness,
    emit: &mut dyn FnMut(Event),
) -> Result<(), InterpreterError> {
    for (is_ready, stream) in [(ready.stdout, Stream::Stdout), (ready.stderr, Stream::Stderr)] {
        if is_ready {
            let data = interp.read_output(stream)?;
            if !data.is_empty() {
                emit(Event::Output { stream, data });
            }
        }
    }
    Ok(())
}

/// Emits everything the output pipes hold right now.
fn drain_output(interp: &mut Interpreter, emit: &mut dyn FnMut(Event)) -> Result<(), InterpreterError> {
    for stream in [Stream::Stdout, Stream::Stderr] {
        loop {
            let data = interp.read_output(stream)?;
            if data.is_empty() {
                break;
            }
            emit(Event::Output { stream, data });
        }
    }
    Ok(())
}
