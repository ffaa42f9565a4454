//! Loading a 64-bit Linux kernel and what it reads at entry: the ELF segments (linux-loader),
//! the initrd, the command line and the zero page with its e820 map. Entry is the Linux 64-bit
//! boot protocol (long mode, `rsi` = zero page), the entry that works on PVM hosts
//! (`arch/x86_64/PVM.md`); a PVH entry would start the kernel in 32-bit mode, which PVM emulates.
//! It writes guest memory only; vCPU registers are the arch module's job.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{CMDLINE_MAX_BYTES, CMDLINE_START, EBDA_START, HIGH_MEMORY_START, ZERO_PAGE_START};
use crate::vstate::memory::GuestMemoryMmap;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;
const INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
const E820_RAM: u32 = 1;
const PAGE_BYTES: u64 = 4096;

/// Errors from loading the kernel and writing boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {what} {path}")]
    Open {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel ELF {path} (it must be an uncompressed x86_64 vmlinux)")]
    LoadKernel {
        path: std::path::PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the initrd ({bytes} bytes) does not fit between the kernel end {kernel_end:#x} and {ram_end:#x}")]
    InitrdTooBig { bytes: u64, kernel_end: u64, ram_end: u64 },
    #[error("reading the initrd into guest memory")]
    LoadInitrd(#[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is {got} bytes; at most {max} fit", max = CMDLINE_MAX_BYTES - 1)]
    Cmdline { got: usize },
    #[error("writing the command line into guest memory")]
    WriteCmdline(#[source] vm_memory::GuestMemoryError),
    #[error("writing the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
}

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub kernel_end: u64,
}

/// Loads the ELF kernel at `path` into guest memory.
pub fn load_kernel(memory: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file =
        File::open(path).map_err(|source| BootError::Open { what: "kernel", path: path.to_path_buf(), source })?;
    let result = Elf::load(memory, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|source| BootError::LoadKernel { path: path.to_path_buf(), source })?;
    Ok(LoadedKernel { entry: result.kernel_load, kernel_end: result.kernel_end })
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub address: GuestAddress,
    pub bytes: u64,
}

/// Loads the initrd at the top of low RAM (page aligned), above the kernel.
pub fn load_initrd(memory: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<LoadedInitrd, BootError> {
    let open_err = |source| BootError::Open { what: "initrd", path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(open_err)?;
    let bytes = file.metadata().map_err(open_err)?.len();
    // The kernel only takes an initrd that ends at or below initrd_addr_max.
    let ram_end = low_ram_end(memory).min(u64::from(INITRD_ADDR_MAX) + 1);
    let start = ram_end
        .checked_sub(bytes)
        .map(|s| s & !(PAGE_BYTES - 1))
        .filter(|s| *s >= kernel_end)
        .ok_or(BootError::InitrdTooBig { bytes, kernel_end, ram_end })?;
    memory.read_exact_volatile_from(GuestAddress(start), &mut file, bytes as usize).map_err(BootError::LoadInitrd)?;
    Ok(LoadedInitrd { address: GuestAddress(start), bytes })
}

/// End of the RAM region that starts at 0 (everything Linux needs at boot lives there).
fn low_ram_end(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().find(|r| r.start_addr().raw_value() == 0).map(|r| r.len()).unwrap_or(0)
}

/// The e820 RAM map: low memory below the EBDA, then from 1 MiB on, region by region.
pub fn e820_entries(memory: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut entries = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEMORY_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push(boot_e820_entry { addr: start, size: end - start, r#type: E820_RAM });
        }
    }
    entries
}

/// Writes the command line and the zero page (boot header, initrd, e820).
pub fn write_boot_params(
    memory: &GuestMemoryMmap,
    cmdline: &str,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_BYTES {
        return Err(BootError::Cmdline { got: cmdline.len() });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory.write_slice(&bytes, GuestAddress(CMDLINE_START)).map_err(BootError::WriteCmdline)?;

    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.version = BOOT_PROTOCOL_VERSION;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags = LOADFLAG_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    params.hdr.initrd_addr_max = INITRD_ADDR_MAX;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.bytes as u32;
    }
    let e820 = e820_entries(memory);
    for (slot, entry) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = *entry;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        memory,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_memory, HIGH_RAM_START, MMIO_HOLE_START};

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_below_initrd_addr_max() {
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut initrd, &[0xab; 5000]).unwrap();
        let small = create_guest_memory(64 << 20).unwrap();
        let loaded = load_initrd(&small.memory, initrd.path(), 0x200_0000).unwrap();
        assert_eq!(loaded.address.raw_value(), ((64 << 20) - 5000) & !0xfff);
        assert_eq!(loaded.bytes, 5000);
        let big = create_guest_memory(4 << 30).unwrap();
        let loaded = load_initrd(&big.memory, initrd.path(), 0x200_0000).unwrap();
        assert!(loaded.address.raw_value() + 5000 <= u64::from(INITRD_ADDR_MAX) + 1);
        let too_high_kernel = load_initrd(&small.memory, initrd.path(), (64 << 20) - 4096);
        assert!(matches!(too_high_kernel, Err(BootError::InitrdTooBig { .. })));
    }

    #[test]
    fn e820_splits_around_the_mmio_hole() {
        // NORESERVE memfd mappings: 4 GiB of address space costs nothing until touched.
        let big = create_guest_memory(4 << 30).unwrap();
        let e = e820_entries(&big.memory);
        let ranges: Vec<(u64, u64)> = e.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            ranges,
            vec![
                (0, EBDA_START),
                (HIGH_MEMORY_START, MMIO_HOLE_START - HIGH_MEMORY_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START),
            ]
        );
        let small = create_guest_memory(64 << 20).unwrap();
        assert_eq!(e820_entries(&small.memory).len(), 2);
    }
}
