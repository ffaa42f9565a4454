//! Writing guest RAM into a snapshot's `memory.bin`. The file is laid out like guest RAM with
//! its regions end to end (file offset = RAM offset), so a restore maps it directly.
//!
//! * A full dump writes only non-zero pages; everything else stays a hole (reads as zero). On a
//!   memfd-backed guest the memfd's holes (`SEEK_DATA`/`SEEK_HOLE`) are skipped unread, so the
//!   cost follows the pages the guest ever touched, not its size. A restored guest's private
//!   mapping has no such holes to ask about: there only the pages that can be non-zero (data
//!   of the snapshot files under it, pages written since the restore) are read, so the file's
//!   holes are never pulled into the page cache.
//! * A layer (incremental) writes exactly the dirty pages, zero or not, and returns them as
//!   runs; the rest of the file is a hole that restore never maps.
//!
//! It reads guest memory only while the VM is paused; it never maps or restores anything.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::{GuestMemoryMmap, PageRun, PAGE_BYTES};

/// Errors from writing a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("writing {bytes} bytes at offset {offset} of the memory file")]
    Write {
        offset: u64,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("sizing the memory file to {bytes} bytes")]
    SetLen {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("finding data in the guest memory backing file")]
    Seek(#[source] std::io::Error),
    #[error("guest memory region at RAM offset {offset} has no host mapping")]
    Unmapped { offset: u64 },
    #[error("dirty bitmap for region {region} has {words} words, need {needed}")]
    Bitmap { region: usize, words: usize, needed: usize },
    #[error("reading /proc/self/pagemap for the guest memory mapping")]
    Pagemap(#[source] std::io::Error),
}

/// What a memory write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryWrite {
    /// Pages written.
    pub pages: u64,
    /// The runs written (layers only; empty for a full dump).
    pub runs: Vec<PageRun>,
}

/// One region as the writer sees it: host address, length, and offset in the file.
struct RegionView {
    host: *const u8,
    len: u64,
    file_offset: u64,
}

fn regions(memory: &GuestMemoryMmap) -> Result<Vec<RegionView>, MemoryFileError> {
    let mut file_offset = 0;
    let mut out = Vec::new();
    for region in memory.iter() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryFileError::Unmapped { offset: file_offset })?;
        out.push(RegionView { host, len: region.len(), file_offset });
        file_offset += region.len();
    }
    Ok(out)
}

impl RegionView {
    /// The bytes of `[offset, offset + len)` of this region.
    ///
    /// The caller guarantees the VM is paused (no vCPU runs, the device thread is parked), so
    /// nothing writes these bytes while the slice lives.
    fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: `host..host+self.len` is a live mapping owned by the guest memory the caller
        // borrows for the duration of the write, the range is inside it (callers derive
        // offsets from `self.len`), and the VM is paused so nothing mutates it meanwhile.
        unsafe { std::slice::from_raw_parts(self.host.add(offset as usize), len as usize) }
    }
}

fn write_at(file: &File, data: &[u8], offset: u64) -> Result<(), MemoryFileError> {
    file.write_all_at(data, offset).map_err(|source| MemoryFileError::Write {
        offset,
        bytes: data.len() as u64,
        source,
    })
}

fn set_len(file: &File, bytes: u64) -> Result<(), MemoryFileError> {
    file.set_len(bytes).map_err(|source| MemoryFileError::SetLen { bytes, source })
}

fn page_is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Data extents of `fd` within `[start, end)`, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_extents(fd: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on an fd we own; it has no memory effects.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(MemoryFileError::Seek(e));
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(MemoryFileError::Seek(std::io::Error::last_os_error()));
        }
        let hole = (hole as u64).min(end);
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

/// Writes every non-zero page of `memory` into `out` (sized to the guest's RAM). With
/// `backing_with_holes` (the memfd of a booted guest), ranges that are holes there are skipped
/// without reading them.
pub fn write_full(
    memory: &GuestMemoryMmap,
    backing_with_holes: Option<&File>,
    out: &File,
) -> Result<MemoryWrite, MemoryFileError> {
    let views = regions(memory)?;
    let total: u64 = views.iter().map(|v| v.len).sum();
    set_len(out, total)?;
    let mut pages = 0;
    for view in &views {
        let extents = match backing_with_holes {
            Some(fd) => data_extents(fd, view.file_offset, view.file_offset + view.len)?
                .into_iter()
                .map(|(a, b)| (a - view.file_offset, b - view.file_offset))
                .collect(),
            None => vec![(0, view.len)],
        };
        for (start, end) in extents {
            let start = start / PAGE_BYTES * PAGE_BYTES;
            let end = end.div_ceil(PAGE_BYTES) * PAGE_BYTES;
            let end = end.min(view.len);
            let mut run_start: Option<u64> = None;
            let mut page = start;
            while page <= end {
                let nonzero = page < end && !page_is_zero(view.bytes(page, PAGE_BYTES));
                match (nonzero, run_start) {
                    (true, None) => run_start = Some(page),
                    (false, Some(s)) => {
                        write_at(out, view.bytes(s, page - s), view.file_offset + s)?;
                        pages += (page - s) / PAGE_BYTES;
                        run_start = None;
                    }
                    _ => {}
                }
                page += PAGE_BYTES;
            }
        }
    }
    Ok(MemoryWrite { pages, runs: Vec::new() })
}

/// Writes the pages set in `dirty` (one KVM-style bitmap per region) into `out` at their RAM
/// offsets and returns them as runs. Cost follows the number of dirty pages.
pub fn write_layer(memory: &GuestMemoryMmap, dirty: &[Vec<u64>], out: &File) -> Result<MemoryWrite, MemoryFileError> {
    write_pages(memory, dirty, out, false)
}

/// `/proc/self/pagemap` entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED_ANON: u64 = 1 << 61;
/// Bytes of one pagemap entry.
const PAGEMAP_ENTRY_BYTES: u64 = 8;
/// Entries read from pagemap at once.
const PAGEMAP_CHUNK_ENTRIES: u64 = 8192;

/// Bitmaps (per region of `memory`) of the pages this process holds privately: the pages of a
/// `MAP_PRIVATE` snapshot mapping that anything (a vCPU, KVM, a device model) wrote since the
/// restore, since every write to such a mapping makes a private copy. This asks the host's
/// page tables, so it does not depend on dirty logging having seen every write.
pub fn privately_written_pages(memory: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MemoryFileError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(MemoryFileError::Pagemap)?;
    let views = regions(memory)?;
    let mut bitmaps = Vec::with_capacity(views.len());
    let mut entries = vec![0u8; (PAGEMAP_CHUNK_ENTRIES * PAGEMAP_ENTRY_BYTES) as usize];
    for view in &views {
        let pages = view.len / PAGE_BYTES;
        let mut bitmap = vec![0u64; (pages as usize).div_ceil(64)];
        let first_vpn = view.host as u64 / PAGE_BYTES;
        let mut page = 0;
        while page < pages {
            let count = PAGEMAP_CHUNK_ENTRIES.min(pages - page);
            let buf = &mut entries[..(count * PAGEMAP_ENTRY_BYTES) as usize];
            pagemap.read_exact_at(buf, (first_vpn + page) * PAGEMAP_ENTRY_BYTES).map_err(MemoryFileError::Pagemap)?;
            for (i, entry) in buf.chunks_exact(PAGEMAP_ENTRY_BYTES as usize).enumerate() {
                let entry = u64::from_le_bytes(entry.try_into().expect("chunks_exact gives 8 bytes"));
                let private = entry & PAGEMAP_PRESENT != 0 && entry & PAGEMAP_FILE_OR_SHARED_ANON == 0;
                if private || entry & PAGEMAP_SWAPPED != 0 {
                    let p = page + i as u64;
                    bitmap[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            page += count;
        }
        bitmaps.push(bitmap);
    }
    Ok(bitmaps)
}

/// A full dump of a restored guest: of the pages set in `candidates` (every page that may be
/// non-zero), writes the non-zero ones. Pages never touched are not read, so the snapshot's
/// file holes are not pulled into the page cache.
pub fn write_full_from_candidates(
    memory: &GuestMemoryMmap,
    candidates: &[Vec<u64>],
    out: &File,
) -> Result<MemoryWrite, MemoryFileError> {
    let mut written = write_pages(memory, candidates, out, true)?;
    written.runs.clear();
    Ok(written)
}

/// Bitmaps (per region of `memory`) of the pages that hold data in `file` (a snapshot's base
/// memory file, by `SEEK_DATA`) or lie in one of `runs`.
pub fn snapshot_data_pages(
    memory: &GuestMemoryMmap,
    file: &File,
    runs: &[PageRun],
) -> Result<Vec<Vec<u64>>, MemoryFileError> {
    let views = regions(memory)?;
    let mut bitmaps: Vec<Vec<u64>> =
        views.iter().map(|v| vec![0u64; ((v.len / PAGE_BYTES) as usize).div_ceil(64)]).collect();
    let total: u64 = views.iter().map(|v| v.len).sum();
    let mut ranges = data_extents(file, 0, total)?;
    ranges.extend(runs.iter().map(|&(offset, bytes)| (offset, offset + bytes)));
    for (start, end) in ranges {
        for (view, bitmap) in views.iter().zip(bitmaps.iter_mut()) {
            let lo = start.max(view.file_offset);
            let hi = end.min(view.file_offset + view.len);
            if lo >= hi {
                continue;
            }
            let first = (lo - view.file_offset) / PAGE_BYTES;
            let last = (hi - view.file_offset).div_ceil(PAGE_BYTES);
            for page in first..last {
                bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }
    Ok(bitmaps)
}

fn write_pages(
    memory: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
    out: &File,
    skip_zero: bool,
) -> Result<MemoryWrite, MemoryFileError> {
    let views = regions(memory)?;
    let total: u64 = views.iter().map(|v| v.len).sum();
    set_len(out, total)?;
    let mut result = MemoryWrite::default();
    for (index, view) in views.iter().enumerate() {
        let pages_in_region = view.len / PAGE_BYTES;
        let needed = (pages_in_region as usize).div_ceil(64);
        let bitmap = dirty.get(index).map(Vec::as_slice).unwrap_or(&[]);
        if bitmap.len() < needed {
            return Err(MemoryFileError::Bitmap { region: index, words: bitmap.len(), needed });
        }
        let mut run_start: Option<u64> = None;
        let flush = |s: u64, e: u64, result: &mut MemoryWrite| -> Result<(), MemoryFileError> {
            let offset = s * PAGE_BYTES;
            let bytes = (e - s) * PAGE_BYTES;
            write_at(out, view.bytes(offset, bytes), view.file_offset + offset)?;
            result.pages += e - s;
            result.runs.push((view.file_offset + offset, bytes));
            Ok(())
        };
        for (word_index, &word) in bitmap.iter().enumerate().take(needed) {
            if word == 0 && run_start.is_none() {
                continue;
            }
            for bit in 0..64 {
                let page = (word_index * 64 + bit) as u64;
                if page >= pages_in_region {
                    break;
                }
                let set =
                    word & (1 << bit) != 0 && !(skip_zero && page_is_zero(view.bytes(page * PAGE_BYTES, PAGE_BYTES)));
                match (set, run_start) {
                    (true, None) => run_start = Some(page),
                    (false, Some(s)) => {
                        flush(s, page, &mut result)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = run_start {
            flush(s, pages_in_region, &mut result)?;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_finds_exactly_the_pages_written_since_a_private_snapshot_mapping() {
        use std::io::Write;
        use vm_memory::{Bytes, GuestAddress};
        let mut base = tempfile::tempfile().unwrap();
        base.write_all(&vec![1u8; 64 * PAGE_BYTES as usize]).unwrap();
        let backing = crate::vstate::memory::map_snapshot_memory(base, 64 * PAGE_BYTES, &[]).unwrap();
        let memory = &backing.memory;
        // Reading a page maps it from the file: not a private copy.
        let _: u8 = memory.read_obj(GuestAddress(5 * PAGE_BYTES)).unwrap();
        memory.write_obj(7u8, GuestAddress(3 * PAGE_BYTES + 100)).unwrap();
        memory.write_obj(9u8, GuestAddress(40 * PAGE_BYTES)).unwrap();
        let written = privately_written_pages(memory).unwrap();
        assert_eq!(written, vec![vec![(1u64 << 3) | (1u64 << 40)]]);
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; PAGE_BYTES as usize];
        assert!(page_is_zero(&page));
        page[4095] = 1;
        assert!(!page_is_zero(&page));
    }
}
