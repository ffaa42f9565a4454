//! `capsule worker` (hidden): runs one VM in this process for a controller that spawned it
//! with `capsule_vmm::worker::WorkerHandle::spawn`. A thin wrapper over
//! `capsule_vmm::worker::run_worker`.

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
    capsule_vmm::worker::run_worker(args.control_fd)?;
    Ok(())
}
