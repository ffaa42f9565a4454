//! Guest memory: one file-backed mapping per RAM region, laid out around the 32-bit MMIO hole:
//! a shared memfd for a booted VM, or a private (copy-on-write) mapping of a snapshot's memory
//! files for a restored one. Every region carries a dirty bitmap that records the VMM's own
//! (device) writes. It owns the layout constants and the backing file; it never interprets
//! guest data.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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
    #[error("mapping {bytes} bytes at offset {offset} of snapshot memory file {path}")]
    Overlay {
        path: PathBuf,
        offset: u64,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot memory run at offset {offset} ({bytes} bytes) is not page aligned or lies outside the {ram_bytes}-byte guest")]
    BadRun { offset: u64, bytes: u64, ram_bytes: u64 },
}

/// Bytes per guest page (the dirty-tracking granule).
pub const PAGE_BYTES: u64 = 4096;

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A memfd mapped `MAP_SHARED` (a booted VM).
    SharedMemfd,
    /// A snapshot's memory file(s) mapped `MAP_PRIVATE` (a restored VM): pages load lazily,
    /// writes stay in this process.
    PrivateSnapshot,
}

/// A page-aligned range of a snapshot layer file to map over the base: `(file offset, bytes)`,
/// where the file offset equals the offset into guest RAM (regions laid end to end).
pub type PageRun = (u64, u64);

/// One snapshot memory file over the base: the file and the runs it holds.
#[derive(Debug)]
pub struct MemoryLayer {
    pub path: PathBuf,
    pub file: File,
    pub runs: Vec<PageRun>,
}

/// The guest-physical RAM ranges `(start, bytes)` for a guest of `mem_bytes` of RAM: one range
/// below the MMIO hole and, for guests bigger than the hole start, a second one above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(HIGH_RAM_START), mem_bytes - MMIO_HOLE_START)]
    }
}

/// Guest memory plus the shared file behind it (kept so a snapshot can later save it or map it
/// copy-on-write).
#[derive(Debug)]
pub struct GuestMemoryBacking {
    pub memory: GuestMemoryMmap,
    pub file: File,
    pub kind: BackingKind,
    /// For a restored guest: the layer runs mapped over `file` (all layers' runs together).
    pub layer_runs: Vec<PageRun>,
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
    file.set_len(mem_bytes).map_err(|source| MemoryError::SetLen { bytes: mem_bytes, source })?;

    let memory = map_regions(&file, mem_bytes, libc::MAP_SHARED)?;
    Ok(GuestMemoryBacking { memory, file, kind: BackingKind::SharedMemfd, layer_runs: Vec::new() })
}

/// Maps `mem_bytes` of guest RAM from a snapshot: `base` (the full memory file) privately, then
/// each of `layers` (incremental files, oldest first) over it, run by run. Nothing is read:
/// pages fault in from the page cache on first touch and writes stay private.
pub fn map_snapshot_memory(
    base: File,
    mem_bytes: u64,
    layers: &[MemoryLayer],
) -> Result<GuestMemoryBacking, MemoryError> {
    if mem_bytes == 0 || mem_bytes % PAGE_BYTES != 0 {
        return Err(MemoryError::BadSize { bytes: mem_bytes });
    }
    let memory = map_regions(&base, mem_bytes, libc::MAP_PRIVATE)?;
    for layer in layers {
        for &(offset, bytes) in &layer.runs {
            overlay_run(&memory, mem_bytes, layer, offset, bytes)?;
        }
    }
    Ok(GuestMemoryBacking {
        memory,
        file: base,
        kind: BackingKind::PrivateSnapshot,
        layer_runs: layers.iter().flat_map(|l| l.runs.iter().copied()).collect(),
    })
}

/// Maps `[offset, offset + bytes)` of `layer.file` over the same RAM offset, copy-on-write.
fn overlay_run(
    memory: &GuestMemoryMmap,
    mem_bytes: u64,
    layer: &MemoryLayer,
    offset: u64,
    bytes: u64,
) -> Result<(), MemoryError> {
    let bad_run = MemoryError::BadRun { offset, bytes, ram_bytes: mem_bytes };
    if offset % PAGE_BYTES != 0 || bytes % PAGE_BYTES != 0 || bytes == 0 {
        return Err(bad_run);
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= mem_bytes => {}
        _ => return Err(bad_run),
    }
    // Find the region holding the run; runs never straddle regions (the writer splits them).
    let mut region_file_start = 0u64;
    for region in memory.iter() {
        let len = region.len();
        if offset >= region_file_start && offset + bytes <= region_file_start + len {
            let host = memory
                .get_host_address(region.start_addr().unchecked_add(offset - region_file_start))
                .map_err(|_| MemoryError::RegionOverflow)?;
            // SAFETY: `host..host+bytes` lies inside a mapping this process owns (`memory`,
            // checked above); MAP_FIXED replaces those pages with a private mapping of the same
            // size, which `memory` unmaps with the rest of the region on drop.
            let mapped = unsafe {
                libc::mmap(
                    host.cast(),
                    bytes as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    layer.file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(MemoryError::Overlay {
                    path: layer.path.clone(),
                    offset,
                    bytes,
                    source: std::io::Error::last_os_error(),
                });
            }
            return Ok(());
        }
        region_file_start += len;
    }
    Err(bad_run)
}

fn map_regions(file: &File, mem_bytes: u64, share: i32) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let bitmap = Some(AtomicBitmap::new(
            len as usize,
            std::num::NonZeroUsize::new(PAGE_BYTES as usize).expect("page size is not zero"),
        ));
        let mapping = MmapRegionBuilder::<Option<AtomicBitmap>>::new_with_bitmap(len as usize, bitmap)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
        let region = GuestRegionMmap::new(mapping, start).ok_or(MemoryError::RegionOverflow)?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

/// The pages the VMM itself (devices) wrote since the last call, per region, as KVM-style
/// bitmaps (bit `n` of word `n / 64` for page `n`); the device bitmaps are cleared.
pub fn take_device_dirty(memory: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    memory
        .iter()
        .map(|region| {
            let pages = (region.len() / PAGE_BYTES) as usize;
            let mut words = vec![0u64; pages.div_ceil(64)];
            let mapping: &vm_memory::MmapRegion<Option<AtomicBitmap>> = region;
            if let Some(bitmap) = mapping.bitmap() {
                for page in 0..pages {
                    if bitmap.is_bit_set(page) {
                        bitmap.reset_bit(page);
                        words[page / 64] |= 1 << (page % 64);
                    }
                }
            }
            words
        })
        .collect()
}

/// Total RAM in `memory`, in bytes.
pub fn ram_bytes(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}
