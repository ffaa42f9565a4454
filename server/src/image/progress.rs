//! Progress reporting for the long steps of an image build, and the one way the
//! build runs an external command: its output goes to a log file in the cache,
//! and the user sees a heartbeat line (elapsed time and the log's last line)
//! instead of a flood.
//!
//! Never prints to stdout: stdout belongs to `capsule image info --json` and to
//! the MCP stdio transport of `capsule serve`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a running step reports that it is still alive.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// How often the child process is polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How many bytes at the end of a log are read to find its last lines.
const LOG_TAIL_BYTES: u64 = 8 * 1024;
/// How many log lines a failure message quotes.
const FAILURE_TAIL_LINES: usize = 25;
/// Starts the line naming the command in a step's log.
const COMMAND_HEADER_PREFIX: &str = "$ ";
/// Longest last-line excerpt a heartbeat shows.
const HEARTBEAT_LINE_MAX_CHARS: usize = 100;

/// Where build progress lines go.
pub trait Progress: Sync {
    /// Reports one line of progress.
    fn line(&self, text: &str);
}

/// Prints progress lines to stderr, prefixed with the time since the build started.
#[derive(Debug)]
pub struct StderrProgress {
    started: Instant,
}

impl StderrProgress {
    /// A reporter whose clock starts now.
    pub fn new() -> Self {
        Self { started: Instant::now() }
    }
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for StderrProgress {
    fn line(&self, text: &str) {
        // Progress is best effort: a closed stderr must not stop (or panic) the build.
        let _ = writeln!(std::io::stderr(), "[capsule image {}] {text}", format_duration(self.started.elapsed()));
    }
}

/// Discards progress (for callers that only want the result).
#[derive(Debug, Default)]
pub struct SilentProgress;

impl Progress for SilentProgress {
    fn line(&self, _text: &str) {}
}

/// Errors of running one build command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The log file could not be opened.
    #[error("cannot open log file {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command could not be started.
    #[error("cannot start `{program}` for step `{label}`")]
    Spawn {
        /// The step.
        label: String,
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the command failed.
    #[error("waiting for step `{label}` failed")]
    Wait {
        /// The step.
        label: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and failed.
    #[error("step `{label}` failed ({status}); full log: {log}\n--- last lines of the log ---\n{tail}")]
    Failed {
        /// The step.
        label: String,
        /// How it ended.
        status: ExitStatus,
        /// The full log.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
}

/// Runs `command` to completion with stdout and stderr appended to `log`,
/// printing a heartbeat every [`HEARTBEAT_INTERVAL`]. Returns how long it took.
pub fn run_logged(
    progress: &dyn Progress,
    label: &str,
    command: &mut Command,
    log: &Path,
) -> Result<Duration, CommandError> {
    let log_error = |source| CommandError::Log { path: log.to_path_buf(), source };
    let mut out = OpenOptions::new().create(true).append(true).open(log).map_err(log_error)?;
    // Best effort: the header only helps a human reading the log.
    let _ = writeln!(out, "\n{COMMAND_HEADER_PREFIX}{command:?}");
    let err = out.try_clone().map_err(log_error)?;
    let program = command.get_program().to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| CommandError::Spawn { label: label.to_owned(), program, source })?;
    let mut next_heartbeat = started + HEARTBEAT_INTERVAL;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Wait { label: label.to_owned(), source });
            }
        }
        if Instant::now() >= next_heartbeat {
            next_heartbeat += HEARTBEAT_INTERVAL;
            let last = log_tail(log, 1);
            // The last line is our own command header until the command prints something.
            let last = if last.starts_with(COMMAND_HEADER_PREFIX) { "(no output yet)" } else { last.trim() };
            progress.line(&format!(
                "{label}: running for {} | {}",
                format_duration(started.elapsed()),
                truncate_chars(last, HEARTBEAT_LINE_MAX_CHARS)
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    if !status.success() {
        return Err(CommandError::Failed {
            label: label.to_owned(),
            status,
            log: log.to_path_buf(),
            tail: log_tail(log, FAILURE_TAIL_LINES),
        });
    }
    Ok(started.elapsed())
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `1m05s`-style rendering of a duration.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("step.log");
        let err = run_logged(
            &SilentProgress,
            "demo",
            Command::new("sh").args(["-c", "echo first; echo 'the real cause' >&2; exit 3"]),
            &log,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("step `demo` failed"), "{text}");
        assert!(text.contains("the real cause"), "{text}");
        assert!(text.contains(&log.display().to_string()), "{text}");
    }

    #[test]
    fn successful_command_output_lands_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("step.log");
        run_logged(&SilentProgress, "demo", Command::new("sh").args(["-c", "echo hello-log"]), &log).unwrap();
        assert_eq!(log_tail(&log, 1), "hello-log");
    }

    #[test]
    fn durations_render_compactly() {
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(65)), "1m05s");
    }
}
