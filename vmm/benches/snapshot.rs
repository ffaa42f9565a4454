//! Snapshot costs, wall clock (`cargo bench -p capsule-vmm --bench snapshot`), each printed
//! with its ratio to a baseline measured in the same run:
//! - restore of a tiny guest with 512 MiB and 2 GiB, from opening the snapshot to the guest's
//!   first instruction (its first port-I/O exit), in-process; baseline: a cold boot of the same
//!   guest to its first port-I/O exit;
//! - an incremental pause with 1% of pages dirty against a full dump of the same guest;
//! - 100 forks (worker processes restored from one snapshot and started), in total.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use capsule_vmm::builder::build_microvm_from_snapshot;
use capsule_vmm::snapshot::{save_snapshot, RestoreOverrides, SnapshotRef};
use capsule_vmm::worker::WorkerHandle;
use capsule_vmm::{build_microvm, MicroVm, VmConfig};

const RESTORE_RUNS: usize = 20;
const FULL_DUMP_RUNS: usize = 2;
const INCREMENTAL_RUNS: usize = 5;
const FORKS: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Guest RAM for the pause measurement, and how much of it the guest fills.
const PAUSE_GUEST_MIB: u64 = 512;
const PAUSE_FILL_BYTES: u64 = 500 << 20;
const PAGE_BYTES: u64 = 4096;
/// How long the guest runs between pauses: long enough to write every one of its 1% pages
/// (each first write after a snapshot is a write-protect fault, ~100 us under PVM).
const DIRTY_TIME: Duration = Duration::from_millis(400);

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(|a, b| a.total_cmp(b));
    ms[ms.len() / 2]
}

fn summary(name: &str, ms: &[f64]) -> f64 {
    let mut sorted = ms.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let m = median(ms.to_vec());
    println!(
        "{name}: median {m:.3} ms, min {:.3} ms, max {:.3} ms ({} runs)",
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len()
    );
    m
}

/// `mov dx, 0x3f8; mov al, 'x'; loop: out dx, al; jmp loop`
fn printer() -> Vec<u8> {
    let mut code = common::asm::DX_COM1.to_vec();
    code.extend([0xb0, b'x', common::asm::OUT_DX_AL, 0xeb, 0xfd]);
    code
}

/// Fills `fill` bytes from 4 MiB with 0x01, prints `F`, then forever increments one qword in
/// each of `pages` pages from 4 MiB.
fn fill_then_touch(fill: u64, pages: u32) -> Vec<u8> {
    let mut code = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, 0x400000
        0x48, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, // mov rcx, qwords
        0x48, 0xb8, 1, 1, 1, 1, 1, 1, 1, 1, // mov rax, 0x0101..
        0xf3, 0x48, 0xab, // rep stosq
        0xb0, 0x46, 0x66, 0xba, 0xf8, 0x03, 0xee, // mov al,'F'; mov dx,0x3f8; out dx,al
    ];
    code[9..17].copy_from_slice(&(fill / 8).to_le_bytes());
    let mut touch = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // outer: mov rdi, 0x400000
        0xb9, 0, 0, 0, 0, // mov ecx, pages
        0x48, 0xff, 0x07, // inner: inc qword [rdi]
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0xff, 0xc9, // dec ecx
        0x75, 0xf2, // jnz inner
        0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // inc qword [0x5000]
        0xeb, 0xdc, // jmp outer
    ];
    touch[8..12].copy_from_slice(&pages.to_le_bytes());
    code.extend(touch);
    code
}

fn tiny_config(kernel: &Path, mem_mib: u64) -> VmConfig {
    let mut config = VmConfig::new(kernel, "");
    config.mem_mib = mem_mib;
    config
}

fn first_output_ms(vm: &MicroVm, t0: Instant) -> f64 {
    assert!(vm.serial().wait_for(b"x", TIMEOUT), "guest printed nothing");
    let first = vm.serial().first_output().expect("first output time");
    (first - t0).as_secs_f64() * 1e3
}

fn bench_restore(payload: &Path, dir: &Path, mem_mib: u64) {
    let config = tiny_config(payload, mem_mib);
    let mut boots = Vec::new();
    for _ in 0..RESTORE_RUNS {
        let t0 = Instant::now();
        let mut vm = build_microvm(&config).expect("build");
        vm.start().expect("start");
        boots.push(first_output_ms(&vm, t0));
    }
    let boot = summary(&format!("  baseline, {mem_mib} MiB: cold boot -> first instruction (port I/O)"), &boots);

    let mut vm = build_microvm(&config).expect("build");
    vm.start().expect("start");
    assert!(vm.serial().wait_for(b"x", TIMEOUT));
    vm.pause().expect("pause");
    let snap = dir.join(format!("restore-{mem_mib}"));
    save_snapshot(&mut vm, &snap, None).expect("snapshot");
    drop(vm);
    let mut restores = Vec::new();
    for _ in 0..RESTORE_RUNS {
        let t0 = Instant::now();
        let (mut vm, _) = build_microvm_from_snapshot(&snap, &RestoreOverrides::default()).expect("restore");
        vm.start().expect("start");
        restores.push(first_output_ms(&vm, t0));
    }
    let restore =
        summary(&format!("  restore, {mem_mib} MiB: open snapshot -> first instruction (port I/O)"), &restores);
    println!(
        "  restore/boot ratio {:.3}; target <= 5 ms: {}",
        restore / boot,
        if restore <= 5.0 { "met" } else { "NOT met" }
    );
}

fn bench_pause(dir: &Path) {
    let pages = (PAUSE_GUEST_MIB << 20) / PAGE_BYTES / 100;
    let payload = common::elf_payload(&fill_then_touch(PAUSE_FILL_BYTES, pages as u32));
    let mut vm = build_microvm(&tiny_config(payload.path(), PAUSE_GUEST_MIB)).expect("build");
    vm.start().expect("start");
    assert!(vm.serial().wait_for(b"F", TIMEOUT), "the guest never filled its memory");
    let mut fulls = Vec::new();
    let mut parent: Option<SnapshotRef> = None;
    for run in 0..FULL_DUMP_RUNS {
        vm.pause().expect("pause");
        let t0 = Instant::now();
        let (info, snap) = save_snapshot(&mut vm, &dir.join(format!("full-{run}")), None).expect("full");
        fulls.push(t0.elapsed().as_secs_f64() * 1e3);
        println!("    full dump {run}: {} pages written", info.pages_written);
        parent = Some(snap);
        vm.resume().expect("resume");
        std::thread::sleep(DIRTY_TIME);
    }
    let mut incs = Vec::new();
    for run in 0..INCREMENTAL_RUNS {
        vm.pause().expect("pause");
        let t0 = Instant::now();
        let (info, snap) =
            save_snapshot(&mut vm, &dir.join(format!("inc-{run}")), parent.as_ref()).expect("incremental");
        incs.push(t0.elapsed().as_secs_f64() * 1e3);
        println!("    incremental {run}: {} pages written ({pages} touched by the guest)", info.pages_written);
        parent = Some(snap);
        vm.resume().expect("resume");
        std::thread::sleep(DIRTY_TIME);
    }
    let full =
        summary(&format!("  full dump, {PAUSE_GUEST_MIB} MiB guest, ~{} MiB non-zero", PAUSE_FILL_BYTES >> 20), &fulls);
    let inc = summary("  incremental pause, 1% of pages dirty", &incs);
    println!(
        "  incremental/full ratio {:.4}; target <= 0.10: {}",
        inc / full,
        if inc / full <= 0.10 { "met" } else { "NOT met" }
    );
}

fn bench_forks(dir: &Path) {
    // `mov dx, 0x3f8; mov al, 'x'; out dx, al; hlt; jmp hlt`: idle after one byte.
    let mut code = common::asm::DX_COM1.to_vec();
    code.extend([0xb0, b'x', common::asm::OUT_DX_AL]);
    code.extend(common::asm::HALT_FOREVER);
    let payload = common::elf_payload(&code);
    let mut vm = build_microvm(&tiny_config(payload.path(), 64)).expect("build");
    vm.start().expect("start");
    assert!(vm.serial().wait_for(b"x", TIMEOUT));
    vm.pause().expect("pause");
    let snap = dir.join("fork-base");
    save_snapshot(&mut vm, &snap, None).expect("snapshot");
    drop(vm);

    let exe = Path::new(env!("CARGO_BIN_EXE_capsule-vmm-worker"));
    // Baseline: one worker process that boots the same guest.
    let mut spawns = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let worker = WorkerHandle::spawn(exe, tiny_config(payload.path(), 64)).expect("spawn");
        worker.start().expect("start");
        spawns.push(t0.elapsed().as_secs_f64() * 1e3);
        worker.stop().expect("stop");
    }
    let spawn = summary("  baseline: one worker process booting the guest (spawn + start)", &spawns);

    let t0 = Instant::now();
    let forks: Vec<WorkerHandle> = (0..FORKS)
        .map(|_| {
            let worker = WorkerHandle::restore(exe, &snap, RestoreOverrides::default()).expect("restore");
            worker.start().expect("start");
            worker
        })
        .collect();
    let total = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "  {FORKS} forks of one snapshot (worker restore + start, all alive at the end): {total:.1} ms total, {:.2} ms each; per-fork/boot-spawn ratio {:.3}",
        total / FORKS as f64,
        total / FORKS as f64 / spawn
    );
    drop(forks);
}

fn main() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = common::elf_payload(&printer());
    println!("restore to first instruction:");
    bench_restore(payload.path(), dir.path(), 512);
    bench_restore(payload.path(), dir.path(), 2048);
    println!("pause:");
    bench_pause(dir.path());
    println!("forks:");
    bench_forks(dir.path());
}
