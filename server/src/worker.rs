//! `capsule worker` (hidden): runs one VM in this process for a controller that spawned it
//! with `capsule_vmm::worker::WorkerHandle::spawn`. A thin wrapper over
//! `capsule_vmm::worker::run_worker`. It logs to stderr through
//! `capsule_vmm::worker_log::init` (`RUST_LOG`, default `warn`, bounded); the controller points
//! that stderr at `<serial log>.worker.log` beside the VM's serial log, or its own stderr.

use std::os::fd::RawFd;

/// Arguments of `capsule worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// File descriptor of the inherited control socket.
    #[arg(long)]
    pub control_fd: RawFd,
}

/// Errors of `capsule worker`.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker failed; the cause says how.
    #[error("worker failed")]
    Worker(#[from] capsule_vmm::worker::WorkerError),
}

/// Runs `capsule worker`.
pub fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    capsule_vmm::worker_log::init();
    capsule_vmm::worker::run_worker(args.control_fd)?;
    Ok(())
}
