//! x86_64 guest setup: the guest-physical layout, boot page tables and GDT, initial registers,
//! CPUID, MSRs, LAPIC and the MP table. These modules write guest memory and vCPU state; they
//! never run the guest.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
