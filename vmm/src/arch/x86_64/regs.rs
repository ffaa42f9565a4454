//! Initial vCPU registers for 64-bit entry: identity page tables (U bit set everywhere, which
//! PVM's shadow paging needs), the GDT, long-mode control registers and the entry `rip`/`rsi`.
//! It only sets up a boot; it never saves or restores a running vCPU (`vstate::vcpu_state` does).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_AM: u64 = 1 << 18;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, user.
const PTE_PRESENT_RW_USER: u64 = 0x7;
/// Page-directory entry bits for a 2 MiB page: present, writable, user, page size.
const PDE_2MIB_PAGE: u64 = 0x87;
const BYTES_PER_GIB: u64 = 1 << 30;
const BYTES_PER_2MIB: u64 = 1 << 21;

/// Errors from setting initial registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the boot {what} into guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM_{ioctl} on a vCPU")]
    Kvm {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Writes the boot GDT and identity page tables (first 4 GiB, 2 MiB pages) into guest memory.
pub fn write_boot_tables(memory: &GuestMemoryMmap) -> Result<(), RegsError> {
    let write = |what, addr: u64, value: u64| {
        memory.write_obj(value, GuestAddress(addr)).map_err(|source| RegsError::WriteMemory { what, source })
    };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write("GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write("IDT", BOOT_IDT_START, 0)?;
    write("PML4", PML4_START, PDPTE_START | PTE_PRESENT_RW_USER)?;
    for gib in 0..BOOT_PD_COUNT {
        let pd = PDE_START + gib * 0x1000;
        write("PDPT", PDPTE_START + gib * 8, pd | PTE_PRESENT_RW_USER)?;
        for i in 0..512u64 {
            let phys = gib * BYTES_PER_GIB + i * BYTES_PER_2MIB;
            write("page directory", pd + i * 8, phys | PDE_2MIB_PAGE)?;
        }
    }
    Ok(())
}

/// Sets the segment and control registers for 64-bit entry with the boot GDT and page tables.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|source| RegsError::Kvm { ioctl: "GET_SREGS", source })?;
    fill_long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(|source| RegsError::Kvm { ioctl: "SET_SREGS", source })
}

/// Fills `sregs` for 64-bit entry (pure; separated for unit tests).
pub fn fill_long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = kvm_segment_from_gdt(BOOT_GDT[2], 2);
    let data = kvm_segment_from_gdt(BOOT_GDT[3], 3);
    let tss = kvm_segment_from_gdt(BOOT_GDT[4], 4);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Sets the general registers for entry at `entry` (Linux 64-bit boot protocol: `rsi` holds the
/// zero page address).
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| RegsError::Kvm { ioctl: "SET_REGS", source })
}

/// Sets the FPU to its reset state (x87 control word 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Kvm { ioctl: "SET_FPU", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let mut sregs = kvm_sregs::default();
        fill_long_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & (X86_CR0_PG | X86_CR0_PE), X86_CR0_PG | X86_CR0_PE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.l, 1);
    }
}
