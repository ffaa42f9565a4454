//! A bare worker binary (`capsule-vmm-worker worker --control-fd N`) so that capsule-vmm's own
//! tests and benches can spawn workers without the `capsule` binary. Production uses
//! `capsule worker`, which calls the same [`capsule_vmm::worker::run_worker`].

use capsule_vmm::worker::{error_chain, run_worker, CONTROL_FD_FLAG, WORKER_SUBCOMMAND};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fd = match args.as_slice() {
        [sub, flag, fd] if sub == WORKER_SUBCOMMAND && flag == CONTROL_FD_FLAG => fd.parse().ok(),
        _ => None,
    };
    let Some(fd) = fd else {
        eprintln!("usage: capsule-vmm-worker {WORKER_SUBCOMMAND} {CONTROL_FD_FLAG} <fd>");
        std::process::exit(2);
    };
    capsule_vmm::worker_log::init();
    if let Err(e) = run_worker(fd) {
        eprintln!("capsule-vmm-worker: {}", error_chain(&e));
        std::process::exit(1);
    }
}
