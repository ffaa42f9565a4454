//! Test fixtures: hand-assembled guests packed as minimal ELF64 files (so they boot through the
//! same loader, page tables and GDT as Linux), and the KVM availability check.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

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

/// Whether /dev/kvm can run VMs here; prints why not.
pub fn kvm_usable() -> bool {
    match kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm cannot create a VM here: {e}");
            false
        }
    }
}

/// The prebuilt PVM kernel, decompressed into a per-user cache, or None (with the reason).
pub fn reference_kernel() -> Option<std::path::PathBuf> {
    let xz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/guest/vmlinux-6.12.117-pvm.xz");
    let xz = if xz.exists() { xz } else { Path::new("/work/shared/guest/vmlinux-6.12.117-pvm.xz").to_path_buf() };
    let out = std::env::temp_dir().join("capsule-vmm-test-vmlinux-6.12.117-pvm");
    if !out.exists() {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("xz -dc '{}' > '{}'", xz.display(), tmp.display()))
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        std::fs::rename(&tmp, &out).ok()?;
    }
    Some(out)
}

/// The reference busybox initramfs.
pub fn reference_initramfs() -> Option<std::path::PathBuf> {
    let p = Path::new("/work/shared/guest/reference-initramfs.cpio.gz");
    p.exists().then(|| p.to_path_buf())
}
