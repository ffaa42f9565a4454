//! A VM worker binary for the end-to-end tests (`capsule-tests-worker worker --control-fd N`):
//! integration tests of this crate find it as `CARGO_BIN_EXE_capsule-tests-worker`, which the
//! `capsule` binary of another package cannot be. It runs the same
//! [`capsule_vmm::worker::run_worker`] as `capsule worker`.

use capsule_vmm::worker::{error_chain, run_worker, CONTROL_FD_FLAG, WORKER_SUBCOMMAND};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fd = match args.as_slice() {
        [sub, flag, fd] if sub == WORKER_SUBCOMMAND && flag == CONTROL_FD_FLAG => fd.parse().ok(),
        _ => None,
    };
    let Some(fd) = fd else {
        eprintln!("usage: capsule-tests-worker {WORKER_SUBCOMMAND} {CONTROL_FD_FLAG} <fd>");
        std::process::exit(2);
    };
    if let Err(e) = run_worker(fd) {
        eprintln!("capsule-tests-worker: {}", error_chain(&e));
        std::process::exit(1);
    }
}
