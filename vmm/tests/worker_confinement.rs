//! A running worker is confined: seccomp filter installed on every thread, no core dumps,
//! bounded open files.

mod common;

use std::path::Path;

use capsule_vmm::confinement::WORKER_MAX_OPEN_FILES;
use capsule_vmm::worker::WorkerHandle;
use capsule_vmm::VmConfig;
use common::{elf_payload, kvm_usable};

const WORKER_EXE: &str = env!("CARGO_BIN_EXE_capsule-vmm-worker");
/// `loop: inc qword [0x5000]; jmp loop`
const COUNTER_LOOP: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];

fn limit_line(limits: &str, name: &str) -> String {
    limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/pid/limits:\n{limits}"))
        .to_string()
}

#[test]
fn a_running_worker_has_its_seccomp_filter_and_rlimits() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&COUNTER_LOOP);
    let mut config = VmConfig::new(payload.path(), "");
    config.mem_mib = 64;
    let worker = WorkerHandle::spawn(Path::new(WORKER_EXE), config).unwrap();
    worker.start().unwrap();
    let pid = worker.pid();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(tasks.len() >= 3, "worker threads: {tasks:?}");
    for task in &tasks {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        // 2 = SECCOMP_MODE_FILTER.
        assert!(
            status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "thread {} is not filtered:\n{status}",
            task.display()
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limit_line(&limits, "Max core file size");
    assert!(core.split_whitespace().filter(|w| *w == "0").count() == 2, "{core}");
    let files = limit_line(&limits, "Max open files");
    assert!(files.contains(&WORKER_MAX_OPEN_FILES.to_string()), "{files}");
    // Still fully working under the filter: pause, resume, stop.
    worker.pause().unwrap();
    worker.resume().unwrap();
    worker.stop().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}
