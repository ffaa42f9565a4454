//! A VM worker binary for the end-to-end tests (`capsule-tests-worker worker --control-fd N`):
//! integration tests of this crate find it as `CARGO_BIN_EXE_capsule-tests-worker`, which the
//! `capsule` binary of another package cannot be. It runs the same
//! [`capsule_vmm::worker::run_worker`] as `capsule worker`.

fn main() {
    capsule_vmm::worker::worker_main("capsule-tests-worker")
}
