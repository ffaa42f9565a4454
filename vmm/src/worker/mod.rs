//! One VM per OS process. The worker side ([`run_worker`]) builds a [`crate::MicroVm`] from the
//! config it is sent and obeys a JSON-lines control protocol ([`protocol`]) on an inherited Unix
//! socket; the controller side ([`WorkerHandle`]) spawns the worker (or attaches to one that
//! outlived its first controller), sends requests and receives events.
//!
//! Lifetime: a worker exits when told to stop. An ordinary worker also exits when its control
//! socket closes, which the kernel guarantees when the controller process dies (the
//! controller's end is close-on-exec and owned by the handle only). A worker started with a
//! [`ControlSocket`] outlives its controller and waits there for the next one, so that a crash
//! of the controller stops no VM. Dropping a [`WorkerHandle`] kills the worker. If the worker
//! dies, the handle's requests fail with [`WorkerError::WorkerDied`] and [`WorkerEvent::Died`]
//! is delivered; other workers are untouched.
//!
//! Once its VM is built the worker lowers its rlimits and installs a seccomp filter
//! ([`crate::confinement`]). Whatever the VM needs from the host is opened before that, while it
//! is built: disks, the vsock socket, and for a VM with a net device the broker socket it
//! listens on for the daemon ([`crate::net::broker_socket`], bound by `virtio_wiring`). A worker remembers its last snapshot (or the one it was restored
//! from) as the parent of the next incremental one. The worker never reads anything but its
//! sockets; the controller never touches KVM. The worker's stdout is never the controller's
//! (which may carry MCP); its stderr, where [`crate::worker_log::init`] logs, goes to a bounded
//! file beside the serial log.

mod handle;
pub mod protocol;
mod serve;

use std::os::fd::RawFd;
use std::time::Duration;

pub use handle::WorkerHandle;
pub use protocol::{ControlSocket, Op, RemoteError, RemoteErrorKind, VmEnded, MAX_LINE_BYTES};
pub use serve::{control_fd_from_args, run_worker, worker_main};

use crate::vstate::vcpu::VmEvent;

/// File descriptor number the worker finds its control socket on.
pub const WORKER_CONTROL_FD: RawFd = 3;
/// How long `spawn` waits for the worker to build its VM.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot request waits (a full dump of a large guest writes gigabytes).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Subcommand and flag the controller starts the worker binary with.
pub const WORKER_SUBCOMMAND: &str = "worker";
/// Flag naming the control socket's fd.
pub const CONTROL_FD_FLAG: &str = "--control-fd";

/// What the controller hears without asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The guest did something that ended it.
    Vm(VmEvent),
    /// The worker process ended without being told to; `status` says how.
    Died { pid: u32, status: String },
    /// The worker exited after a stop request.
    Exited { pid: u32 },
}

/// Errors of the worker and of its controller.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("creating the control socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("starting the worker process {exe}")]
    Spawn {
        exe: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing to the control socket")]
    Write(#[source] std::io::Error),
    #[error("reading the control socket")]
    Read(#[source] std::io::Error),
    #[error("control message is not valid: {0}")]
    Protocol(String),
    #[error("control line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("the worker could not build its VM: {0}")]
    BuildFailed(RemoteError),
    #[error("worker {pid} did not answer within {timeout:?}")]
    Timeout { pid: u32, timeout: Duration },
    #[error("worker process {pid} died ({status}); its VM is gone and its resources are freed")]
    WorkerDied { pid: u32, status: String },
    #[error("the worker refused {op:?}: {error}")]
    Refused { op: Op, error: RemoteError },
    #[error("file descriptor {0} is not a usable control socket")]
    BadControlFd(RawFd),
    #[error("no worker listens on {path}")]
    NotListening {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl WorkerError {
    /// The kind of a failure the worker itself reported, if it was one.
    pub fn remote_kind(&self) -> Option<RemoteErrorKind> {
        match self {
            WorkerError::BuildFailed(error) | WorkerError::Refused { error, .. } => Some(error.kind),
            _ => None,
        }
    }
}

/// Renders an error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
