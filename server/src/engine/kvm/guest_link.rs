//! The link between the host and a guest's agent: connecting over the hybrid vsock (retried until
//! the agent is up), the clock and entropy a restored guest is told, and reading the serial
//! console that explains a guest that never answered.
//!
//! It knows the agent protocol and the console file; it never starts or stops a VM.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{Op, AGENT_VSOCK_PORT};

/// What the agent prints on the serial console once it serves on vsock.
pub const AGENT_READY_MARKER: &str = "capsule-agent ready";
/// How long a booting guest may take until its agent answers.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest may take until its agent answers (it was already up).
pub const AGENT_RESTORED_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two attempts to reach the agent.
const AGENT_RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// Deadline of the clock and entropy calls after a restore.
const GUEST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of host entropy sent to a restored guest.
const ENTROPY_BYTES: usize = 64;
/// Serial console lines quoted in boot failures.
pub const SERIAL_TAIL_LINES: usize = 40;

/// Errors of the link to a guest's agent.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The VM ended while the host was connecting (the string says how, as the caller saw it).
    #[error("the VM ended while connecting to its agent: {0}")]
    VmEnded(String),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {waited:?}; serial console tail:\n{serial_tail}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// The end of the serial log.
        serial_tail: String,
        /// The last connection error.
        #[source]
        last_error: ClientError,
    },
    /// The agent failed a call.
    #[error("the guest agent failed {what}")]
    Call {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Host entropy could not be read.
    #[error("cannot read host entropy from /dev/urandom")]
    Entropy(#[source] std::io::Error),
}

impl LinkError {
    /// Whether the agent dropped the connection under the call (a restored guest may drop the
    /// first connection while it handles the vsock transport reset).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, LinkError::Call { source: ClientError::Disconnected(_), .. })
    }
}

/// The last `lines` lines of the serial log at `path` (empty when there is none).
pub fn serial_tail(path: &Path, lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the serial log at `path` contains `needle`; returns how long that took, or
/// `None` at `timeout`. Polls the file (the worker writes it; the controller cannot see its
/// in-memory console).
pub fn wait_for_serial(path: &Path, needle: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let needle = needle.as_bytes();
    let mut seen = 0usize;
    let mut buffer = Vec::new();
    loop {
        if let Ok(mut file) = std::fs::File::open(path) {
            use std::io::{Seek, SeekFrom};
            if file.seek(SeekFrom::Start(seen as u64)).is_ok() {
                let _ = file.read_to_end(&mut buffer);
                // Search only what is new, plus enough before it to catch a straddling needle.
                let from = seen.saturating_sub(needle.len());
                seen = buffer.len();
                if buffer[from..].windows(needle.len()).any(|w| w == needle) {
                    return Some(started.elapsed());
                }
            }
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connects to the agent on the hybrid vsock at `uds` and shakes hands, retrying until
/// `timeout` while `alive` says the VM still runs (`Err(how it ended)` when not). The serial log
/// at `serial` is quoted when the agent never answers.
pub fn connect_agent(
    uds: &Path,
    serial: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<AgentClient, LinkError> {
    let started = Instant::now();
    loop {
        alive().map_err(LinkError::VmEnded)?;
        let error = match AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT) {
            Ok((client, _hello)) => return Ok(client),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(LinkError::NotReady {
                waited: started.elapsed(),
                serial_tail: serial_tail(serial, SERIAL_TAIL_LINES),
                last_error: error,
            });
        }
        std::thread::sleep(AGENT_RETRY_INTERVAL);
    }
}

/// Tells the guest the host's wall-clock time (after a fresh boot the RTC-less guest starts at
/// the epoch; after a restore its clock stands where it was saved).
pub fn set_guest_clock(client: &AgentClient) -> Result<(), LinkError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let unix_time_ns = u64::try_from(now).unwrap_or(u64::MAX);
    client
        .call_reply(Op::SetClock { unix_time_ns }, Some(GUEST_SYNC_TIMEOUT))
        .map(drop)
        .map_err(|source| LinkError::Call { what: "SetClock", source })
}

/// Tells a restored or forked guest the host's time and mixes in fresh entropy, so its clock
/// is right and forks never share RNG state.
pub fn sync_restored_guest(client: &AgentClient) -> Result<(), LinkError> {
    set_guest_clock(client)?;
    let mut bytes = vec![0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(LinkError::Entropy)?;
    client
        .call_reply(Op::AddEntropy { bytes }, Some(GUEST_SYNC_TIMEOUT))
        .map(drop)
        .map_err(|source| LinkError::Call { what: "AddEntropy", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(serial_tail(&log, 2), "c\nd");
        assert_eq!(serial_tail(&dir.path().join("none"), 2), "");
        assert!(wait_for_serial(&log, "c\nd", Duration::from_millis(50)).is_some());
        assert!(wait_for_serial(&log, "zz", Duration::from_millis(20)).is_none());
    }
}
