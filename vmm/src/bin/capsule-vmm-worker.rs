//! A bare worker binary (`capsule-vmm-worker worker --control-fd N`) so that capsule-vmm's own
//! tests and benches can spawn workers without the `capsule` binary. Production uses
//! `capsule worker`, which calls the same [`capsule_vmm::worker::run_worker`]. It holds no logic
//! of its own.

fn main() {
    capsule_vmm::worker::worker_main("capsule-vmm-worker")
}
