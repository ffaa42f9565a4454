//! Guest memory: one shared, file-backed (memfd) mapping per RAM region, laid out around the
//! 32-bit MMIO hole. It owns the layout constants and the backing file; it never interprets
//! guest data.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as every part of the VMM (devices included) sees it. The dirty bitmap is
/// optional so that dirty tracking of device writes can be switched on later for snapshots.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Option<vm_memory::bitmap::AtomicBitmap>>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<Option<vm_memory::bitmap::AtomicBitmap>>;

/// Start of the 32-bit MMIO hole (devices, LAPIC, IOAPIC). RAM never overlaps it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole: from 3 GiB up to 4 GiB.
pub const MMIO_HOLE_BYTES: u64 = 0x4000_0000;
/// Where RAM resumes above the hole.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_START + MMIO_HOLE_BYTES;

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {bytes} bytes is not a non-zero multiple of 4 KiB")]
    BadSize { bytes: u64 },
    #[error("creating the memfd that backs guest memory")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest memory backing file to {bytes} bytes")]
    SetLen {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("a guest memory region wraps around the guest address space")]
    RegionOverflow,
    #[error("assembling guest memory regions")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// The guest-physical RAM ranges `(start, bytes)` for a guest of `mem_bytes` of RAM: one range
/// below the MMIO hole and, for guests bigger than the hole start, a second one above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// Guest memory plus the shared file behind it (kept so a snapshot can later save it or map it
/// copy-on-write).
#[derive(Debug)]
pub struct GuestMemoryBacking {
    pub memory: GuestMemoryMmap,
    pub file: File,
}

/// Creates `mem_bytes` of guest RAM backed by an anonymous memfd, mapped `MAP_SHARED`.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryBacking, MemoryError> {
    if mem_bytes == 0 || mem_bytes % 4096 != 0 {
        return Err(MemoryError::BadSize { bytes: mem_bytes });
    }
    let name = c"capsule-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no memory side effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_bytes)
        .map_err(|source| MemoryError::SetLen {
            bytes: mem_bytes,
            source,
        })?;

    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegionBuilder::<Option<AtomicBitmap>>::new(len as usize)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
        let region = GuestRegionMmap::new(mapping, start).ok_or(MemoryError::RegionOverflow)?;
        regions.push(region);
        offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)?;
    Ok(GuestMemoryBacking { memory, file })
}

/// Total RAM in `memory`, in bytes.
pub fn ram_bytes(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}
