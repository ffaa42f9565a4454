//! The Intel MultiProcessor Specification 1.4 table: one processor entry per vCPU, an ISA bus,
//! one IOAPIC with identity-routed ISA IRQs, and LINT0/LINT1. Linux uses it to find APs when
//! there is no ACPI. Built as bytes (pure), then written into the EBDA; it never touches vCPU
//! state.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::vstate::memory::GuestMemoryMmap;

/// Most vCPUs an MP table here can describe (it must fit in the 1 KiB EBDA).
pub const MPTABLE_MAX_CPUS: u8 = 32;
/// IOAPIC pins, all identity-routed.
const IOAPIC_PINS: u8 = 24;
const MPC_SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID family 6, as QEMU reports.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU + APIC feature flags.
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_BYTES: u64 = 16;
const EBDA_BYTES: usize = 1024;

/// Errors from building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("an MP table describes 1..={MPTABLE_MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    #[error("writing the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The floating pointer structure followed by the configuration table, for `cpus` vCPUs, placed
/// at guest address `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MPTABLE_MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, IRQ_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_BYTES;
    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[MPC_SPEC_REVISION, 0]);
    table.extend_from_slice(b"CAPSULE ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating: Vec<u8> = Vec::new();
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    debug_assert!(bytes.len() <= EBDA_BYTES);
    memory.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_to_zero_and_fits_the_ebda() {
        for cpus in [1, 2, MPTABLE_MAX_CPUS] {
            let bytes = build(cpus, EBDA_START).unwrap();
            assert!(bytes.len() <= EBDA_BYTES, "{} bytes", bytes.len());
            assert_eq!(checksum(&bytes[..16]), 0);
            assert_eq!(checksum(&bytes[16..]), 0);
            assert_eq!(&bytes[16..20], b"PCMP");
            let len = u16::from_le_bytes([bytes[20], bytes[21]]) as usize;
            assert_eq!(len, bytes.len() - 16);
        }
        assert!(build(0, EBDA_START).is_err());
        assert!(build(33, EBDA_START).is_err());
    }
}
