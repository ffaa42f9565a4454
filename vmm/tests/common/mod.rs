//! Test fixtures: hand-assembled guests packed as minimal ELF64 files (so they boot through the
//! same loader, page tables and GDT as Linux), the KVM availability check, and Linux test
//! guests: the kernel the project builds (`capsule image build`, found through the image
//! cache's `current.json`) booting a root disk written here, whose `/init` is hand-assembled
//! too ([`guest_init`], [`ext2`]). Nothing outside this repository is read but that cache.
//!
//! Without KVM or without a built image a test prints `SKIP: <reason>` and passes, unless
//! `CAPSULE_REQUIRE_KVM=1` is set: then it fails with the reason.
#![allow(dead_code)]

pub mod ext2;
pub mod guest_init;

use std::io::Write;
use std::path::PathBuf;

use capsule_vmm::{DiskConfig, VmConfig};
#[allow(unused_imports)]
pub use guest_init::{InitEnd, TestInit};

/// Where fixture payloads are loaded and entered.
pub const PAYLOAD_ADDR: u64 = 0x10_0000;
/// Guest address the counter payload increments.
pub const COUNTER_ADDR: u64 = 0x5000;

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at [`PAYLOAD_ADDR`].
pub fn elf_payload(code: &[u8]) -> tempfile::NamedTempFile {
    const EHDR_BYTES: u16 = 64;
    const PHDR_BYTES: u16 = 56;
    let offset = u64::from(EHDR_BYTES + PHDR_BYTES);
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&PAYLOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR_BYTES).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&EHDR_BYTES.to_le_bytes());
    elf.extend_from_slice(&PHDR_BYTES.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&offset.to_le_bytes());
    elf.extend_from_slice(&PAYLOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&PAYLOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(elf.len() as u64, offset);
    elf.extend_from_slice(code);
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&elf).expect("write ELF");
    file
}

/// x86-64 machine code snippets.
pub mod asm {
    /// `mov dx, 0x3f8`
    pub const DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
    /// `out dx, al`
    pub const OUT_DX_AL: u8 = 0xee;
    /// `mov dx, 0x64; mov al, 0xfe; out dx, al` (i8042 reset)
    pub const RESET_I8042: [u8; 7] = [0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee];
    /// `hlt; jmp back to hlt`
    pub const HALT_FOREVER: [u8; 3] = [0xf4, 0xeb, 0xfd];

    /// `mov al, byte; out dx, al` for each byte (dx must hold the port).
    pub fn out_bytes(bytes: &[u8]) -> Vec<u8> {
        bytes.iter().flat_map(|b| [0xb0, *b, OUT_DX_AL]).collect()
    }
}

/// Set to 1 to make a missing KVM or guest image a failure instead of a skip.
pub const REQUIRE_KVM_ENV: &str = "CAPSULE_REQUIRE_KVM";
/// What the test guest's `/init` prints once userspace runs.
pub const INIT_MARKER: &str = "CAPSULE-TEST-INIT: userspace reached";
/// What it prints just before it reboots or exits.
pub const INIT_DONE: &str = "CAPSULE-TEST-INIT: done";
/// Kernel command line of a test guest, before its `root=`.
pub const TEST_CMDLINE: &str = "console=ttyS0 ro rootfstype=ext4 init=/init panic=-1 reboot=k clocksource=kvm-clock";

/// Skips the test (prints `SKIP: <reason>`), or fails it when [`REQUIRE_KVM_ENV`] is 1.
pub fn skip(reason: &str) {
    if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_KVM_ENV}=1 but: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// Whether /dev/kvm can run VMs here; skips (see [`skip`]) if not.
pub fn kvm_usable() -> bool {
    match kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()) {
        Ok(_) => true,
        Err(e) => {
            skip(&format!("/dev/kvm cannot create a VM here: {e}"));
            false
        }
    }
}

/// The image cache: `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else
/// `~/.cache/capsule` (where `capsule image build` puts its images).
pub fn image_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("CAPSULE_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("capsule")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("capsule")))
}

/// The guest kernel of the current image (`current.json`'s `kernel`), or the reason there
/// is none.
pub fn find_image_kernel() -> Result<PathBuf, String> {
    let dir = image_cache_dir().ok_or("no image cache directory (HOME is not set)")?;
    let current = dir.join("current.json");
    let text = std::fs::read_to_string(&current)
        .map_err(|e| format!("no guest image built ({}: {e}); run `capsule image build`", current.display()))?;
    let info: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", current.display()))?;
    let kernel = info
        .get("kernel")
        .and_then(|k| k.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} names no kernel", current.display()))?;
    if !kernel.is_file() {
        return Err(format!("the image's kernel {} is missing; run `capsule image build`", kernel.display()));
    }
    Ok(kernel)
}

/// The image's kernel where KVM works, else None after [`skip`].
pub fn image_kernel() -> Option<PathBuf> {
    if !kvm_usable() {
        return None;
    }
    find_image_kernel().map_err(|reason| skip(&reason)).ok()
}

/// A Linux test guest: the image's kernel and a root disk whose `/init` is `init`.
pub struct TestGuest {
    pub kernel: PathBuf,
    disk: tempfile::NamedTempFile,
}

/// The Linux test guest for `init`, or None (after [`skip`]) without KVM or a built image.
pub fn test_guest(init: TestInit) -> Option<TestGuest> {
    let kernel = image_kernel()?;
    let mut disk = tempfile::NamedTempFile::new().expect("root disk file");
    disk.write_all(&ext2::image_with_init(&guest_init::init_elf(&init))).expect("write root disk");
    Some(TestGuest { kernel, disk })
}

impl TestGuest {
    /// A VM config booting this guest with `disks` first (they keep /dev/vda, /dev/vdb, ...)
    /// and the read-only root disk after them; `extra` is appended to [`TEST_CMDLINE`].
    pub fn config_with_disks(&self, disks: Vec<DiskConfig>, extra: &str) -> VmConfig {
        let root = format!("/dev/vd{}", char::from(b'a' + disks.len() as u8));
        let mut cmdline = format!("{TEST_CMDLINE} root={root}");
        if !extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let mut config = VmConfig::new(&self.kernel, cmdline);
        config.disks = disks;
        config.disks.push(DiskConfig { path: self.disk.path().to_path_buf(), read_only: true, undo_log: false });
        config
    }

    /// [`TestGuest::config_with_disks`] without other disks.
    pub fn config(&self) -> VmConfig {
        self.config_with_disks(Vec::new(), "")
    }
}
