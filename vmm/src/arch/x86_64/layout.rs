//! The guest-physical memory map used at boot (the same one for Linux and for test payloads):
//! constants only, it never writes memory.

/// GDT used to enter long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty; Linux installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`struct boot_params`); `rsi` points at it on entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (grows down below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the [`BOOT_PD_COUNT`] page directories of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Page directories of the boot identity map: each maps 1 GiB with 2 MiB pages.
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line we write, NUL included.
pub const CMDLINE_MAX_BYTES: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here and e820 leaves it out.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory; kernels are loaded at or above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// TSS address for `KVM_SET_TSS_ADDR` (3 pages just below the BIOS area, where QEMU puts it
/// too).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IOAPIC MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// First virtio-mmio window; device `i` sits at `MMIO_DEVICES_START + i * MMIO_DEVICE_WINDOW_BYTES`.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one device's MMIO window.
pub const MMIO_DEVICE_WINDOW_BYTES: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `i` uses `MMIO_DEVICES_FIRST_GSI + i`.
pub const MMIO_DEVICES_FIRST_GSI: u32 = 5;
/// Highest GSI we hand to devices (the IOAPIC has 24 pins).
pub const MAX_DEVICE_GSI: u32 = 23;
/// Legacy serial port COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1 IRQ.
pub const SERIAL_GSI: u32 = 4;
