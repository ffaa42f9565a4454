//! Fixtures for the snapshot tests: tiny guests, worker spawning, and reading guest memory out
//! of a snapshot directory (through its layer chain).
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsule_vmm::snapshot::load_snapshot;
use capsule_vmm::worker::WorkerHandle;
use capsule_vmm::VmConfig;

#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)]
pub use common::{elf_payload, kvm_usable, test_guest, TestGuest, TestInit, COUNTER_ADDR, INIT_DONE, INIT_MARKER};

pub const WORKER_EXE: &str = env!("CARGO_BIN_EXE_capsule-vmm-worker");
/// Guest address where [`COUNTER_AND_TSC`] stores the low half of `rdtsc`.
pub const TSC_ADDR: u64 = 0x6000;
/// Guest address of the first page [`toucher`] writes.
pub const TOUCH_BASE: u64 = 0x40_0000;

/// `loop: inc qword [0x5000]; rdtsc; mov [0x6000], eax; jmp loop`
pub const COUNTER_AND_TSC: [u8; 19] =
    [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0x0f, 0x31, 0x89, 0x04, 0x25, 0x00, 0x60, 0x00, 0x00, 0xeb, 0xed];

/// Forever: `inc qword` on each of `pages` pages from [`TOUCH_BASE`], then on the counter.
pub fn toucher(pages: u32) -> Vec<u8> {
    let mut code = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, 0x400000
        0xb9, 0, 0, 0, 0, // mov ecx, pages
        0x48, 0xff, 0x07, // inner: inc qword [rdi]
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0xff, 0xc9, // dec ecx
        0x75, 0xf2, // jnz inner
        0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // inc qword [0x5000]
        0xeb, 0xdc, // jmp outer
    ];
    code[8..12].copy_from_slice(&pages.to_le_bytes());
    code
}

/// Makes every page of `bytes` from [`TOUCH_BASE`] non-zero (one 8-byte store per 4 KiB page,
/// so that a full snapshot must write all of them), prints `F` on COM1, then counts forever.
/// One store per page keeps it fast where the guest runs in KVM's instruction emulator (a
/// byte-for-byte fill of hundreds of MiB takes minutes there).
pub fn filler(bytes: u64) -> Vec<u8> {
    let mut code = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, 0x400000
        0x48, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, // mov rcx, pages
        0x48, 0xb8, 1, 1, 1, 1, 1, 1, 1, 1, // mov rax, 0x0101..
        0x48, 0x89, 0x07, // fill: mov [rdi], rax
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf1, // jnz fill
        0xb0, 0x46, 0x66, 0xba, 0xf8, 0x03, 0xee, // mov al,'F'; mov dx,0x3f8; out dx,al
        0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // loop: inc qword [0x5000]
        0xeb, 0xf6, // jmp loop
    ];
    code[9..17].copy_from_slice(&(bytes / 4096).to_le_bytes());
    code
}

/// A tiny guest of `mem_mib` MiB running `kernel`.
pub fn tiny_config(kernel: &Path, mem_mib: u64) -> VmConfig {
    let mut config = VmConfig::new(kernel, "");
    config.mem_mib = mem_mib;
    config
}

/// Spawns a worker for `config` and starts it.
pub fn start_worker(config: VmConfig) -> WorkerHandle {
    let worker = WorkerHandle::spawn(Path::new(WORKER_EXE), config).expect("spawn worker");
    worker.start().expect("start");
    worker
}

/// Lets the guest run for `time`, then pauses it.
pub fn run_for(worker: &WorkerHandle, time: Duration) {
    std::thread::sleep(time);
    worker.pause().expect("pause");
}

/// Reads `len` bytes of guest RAM at `addr` (below 3 GiB) from a snapshot, newest layer first.
pub fn snapshot_bytes(dir: &Path, addr: u64, len: usize) -> Vec<u8> {
    let loaded = load_snapshot(dir).expect("load snapshot");
    let mut out = vec![0u8; len];
    let covering = loaded
        .layers
        .iter()
        .rev()
        .find(|layer| layer.runs.iter().any(|&(off, bytes)| addr >= off && addr + len as u64 <= off + bytes));
    let file = covering.map(|l| &l.file).unwrap_or(&loaded.base);
    file.read_exact_at(&mut out, addr).expect("read memory file");
    out
}

/// The u64 at guest address `addr` in a snapshot.
pub fn snapshot_u64(dir: &Path, addr: u64) -> u64 {
    let bytes = snapshot_bytes(dir, addr, 8);
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

/// A fresh path inside `dir`.
pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
