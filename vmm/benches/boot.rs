//! Boot latency, wall clock (`cargo bench -p capsule-vmm --bench boot`):
//! - tiny guest: `build_microvm` start → first port-I/O exit (first serial byte);
//! - the project's guest kernel (the current image's) with the test guest's root disk: build
//!   start → its init's marker on the serial console, in-process and through a worker process.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use capsule_vmm::worker::WorkerHandle;
use capsule_vmm::{build_microvm, VmConfig};

const TINY_RUNS: usize = 20;
const LINUX_RUNS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: median {:.2} ms, min {:.2} ms, max {:.2} ms ({} runs)",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    );
}

fn main() {
    if !common::kvm_usable() {
        return;
    }
    // mov dx, 0x3f8; mov al, '!'; out dx, al; i8042 reset
    let mut code = common::asm::DX_COM1.to_vec();
    code.extend(common::asm::out_bytes(b"!"));
    code.extend(common::asm::RESET_I8042);
    let payload = common::elf_payload(&code);
    let mut config = VmConfig::new(payload.path(), "");
    config.mem_mib = 128;
    let mut tiny = Vec::new();
    for _ in 0..TINY_RUNS {
        let t0 = Instant::now();
        let mut vm = build_microvm(&config).expect("build tiny VM");
        vm.start().expect("start tiny VM");
        assert!(vm.serial().wait_for(b"!", TIMEOUT), "tiny guest printed nothing");
        let first = vm.serial().first_output().expect("first output time");
        tiny.push((first - t0).as_secs_f64() * 1e3);
    }
    summary("tiny guest: create -> first port-I/O exit", tiny);

    let Some(guest) = common::test_guest(common::TestInit::REBOOT) else {
        return;
    };
    let mut linux = guest.config_with_disks(Vec::new(), "quiet");
    linux.mem_mib = 512;
    let marker = common::INIT_MARKER.as_bytes();
    let mut in_process = Vec::new();
    for _ in 0..LINUX_RUNS {
        let t0 = Instant::now();
        let mut vm = build_microvm(&linux).expect("build Linux VM");
        vm.start().expect("start Linux VM");
        assert!(vm.serial().wait_for(marker, TIMEOUT), "no userspace");
        in_process.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    summary("Linux in-process: create -> userspace", in_process);

    let worker_exe = Path::new(env!("CARGO_BIN_EXE_capsule-vmm-worker"));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut via_worker = Vec::new();
    for run in 0..LINUX_RUNS {
        let log = dir.path().join(format!("serial-{run}.log"));
        let mut config = linux.clone();
        config.serial_log = Some(log.clone());
        let t0 = Instant::now();
        let worker = WorkerHandle::spawn(worker_exe, config).expect("spawn worker");
        worker.start().expect("start");
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            if text.windows(marker.len()).any(|w| w == marker) {
                break;
            }
            assert!(t0.elapsed() < TIMEOUT, "no userspace via worker");
            std::thread::sleep(Duration::from_millis(1));
        }
        via_worker.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    summary("Linux via worker process: spawn -> userspace", via_worker);
}
