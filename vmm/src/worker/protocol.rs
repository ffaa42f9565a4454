//! The control protocol between a controller and its worker: one JSON object per line, capped at
//! [`MAX_LINE_BYTES`].
//!
//! The controller sends [`ToWorker::Configure`] (boot) or [`ToWorker::Restore`] (from a
//! snapshot) first; the worker answers [`FromWorker::Ready`] or [`FromWorker::Failed`]. Then each
//! [`ToWorker::Request`] gets one [`FromWorker::Reply`] with the same id, and
//! [`FromWorker::Event`] may come at any time. A controller that attaches to an outliving
//! worker's [`ControlSocket`] is greeted with `Ready` (or `Failed` when another controller is
//! attached) and speaks the same protocol. Failures cross as a [`RemoteError`]: a kind and the
//! chain of causes.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::WorkerError;
use crate::config::VmConfig;
use crate::snapshot::{RestoreOverrides, SnapshotInfo};
use crate::vstate::vcpu::{RunState, VmEvent};

/// Longest protocol line.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Where an outliving worker listens for controllers, and where it leaves word of how its VM
/// ended when no controller was there to hear it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlSocket {
    /// The Unix socket a (new) controller connects to.
    pub path: PathBuf,
    /// The file the worker writes a [`VmEnded`] to before it exits with no controller.
    pub ended: PathBuf,
}

/// What an outliving worker leaves in [`ControlSocket::ended`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEnded {
    /// How the VM ended.
    pub event: VmEvent,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Controller → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Boot a VM per `config`.
    Configure {
        config: VmConfig,
        /// Outlive the controller, listening here for the next one.
        #[serde(default)]
        control: Option<ControlSocket>,
    },
    /// Build the VM from the snapshot at `dir` instead of booting.
    Restore {
        dir: PathBuf,
        overrides: RestoreOverrides,
        /// Outlive the controller, listening here for the next one.
        #[serde(default)]
        control: Option<ControlSocket>,
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

/// What kind of failure a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// What was asked, or the snapshot handed in, is not valid (bad config, corrupt or foreign
    /// snapshot, a parent that changed).
    InvalidInput,
    /// The request does not fit the VM's state (e.g. an incremental snapshot with no parent).
    WrongState,
    /// The host failed (KVM, memory, files, disk space).
    HostFault,
}

/// A failure reported by a worker: its kind and its chain of causes, outermost first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: RemoteErrorKind,
    /// The error and each of its causes.
    pub chain: Vec<String>,
}

impl RemoteError {
    /// `error` and its causes, as `kind`.
    pub fn new(kind: RemoteErrorKind, error: &dyn std::error::Error) -> Self {
        let mut chain = vec![error.to_string()];
        let mut source = error.source();
        while let Some(cause) = source {
            chain.push(cause.to_string());
            source = cause.source();
        }
        Self { kind, chain }
    }

    /// A failure with one message.
    pub fn message(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self { kind, chain: vec![message.into()] }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.chain.join(": "))
    }
}

/// Worker → controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    Ready {
        pid: u32,
    },
    Failed {
        error: RemoteError,
    },
    Reply {
        id: u64,
        result: Result<RunState, RemoteError>,
        /// What a snapshot request wrote.
        #[serde(default)]
        snapshot: Option<SnapshotInfo>,
    },
    Event(VmEvent),
}

/// Reads one bounded JSON line; `Ok(None)` on EOF.
pub(super) fn read_message<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> Result<Option<T>, WorkerError> {
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

pub(super) fn write_message<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), WorkerError> {
    let mut line = serde_json::to_vec(message).map_err(|e| WorkerError::Protocol(e.to_string()))?;
    line.push(b'\n');
    writer.write_all(&line).map_err(WorkerError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_remote_error_keeps_its_kind_and_every_cause() {
        let io = std::io::Error::other("disk full");
        let outer = WorkerError::Write(io);
        let remote = RemoteError::new(RemoteErrorKind::HostFault, &outer);
        assert_eq!(remote.chain, vec!["writing to the control socket".to_string(), "disk full".to_string()]);
        assert_eq!(remote.to_string(), "writing to the control socket: disk full");
        let line = serde_json::to_string(&FromWorker::Failed { error: remote.clone() }).unwrap();
        match serde_json::from_str::<FromWorker>(&line).unwrap() {
            FromWorker::Failed { error } => assert_eq!(error, remote),
            other => panic!("{other:?}"),
        }
    }
}
