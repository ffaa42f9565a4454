//! The undo log of a writable disk: the old contents of every block the guest overwrites after
//! the disk was last at the state of a snapshot, so that a disk can be taken back to that moment
//! when the VM's memory is (a roll-back after its worker was lost).
//!
//! An *epoch* starts when the disk is at the state of a known moment: a boot, a restore, or a
//! snapshot just written (with the vCPUs and devices still parked). Its tag names that moment
//! ([`BOOT_TAG`], or the snapshot directory's name). During an epoch, before the first write to
//! each [`UNDO_BLOCK_BYTES`] block, the block's old contents are appended to the log; the write
//! itself goes to the disk only once that record is written. Each block is logged once per
//! epoch, so a log never outgrows its disk, and starting the next epoch empties it.
//!
//! [`undo_disk`] writes a log's records back over its disk, which is then as it was when the
//! epoch began. A record cut short by a process killed while writing it is the last one, and its
//! block was never written, so it is skipped; any other damaged record makes the log refused.
//! Records are written by ordinary `pwrite`s, which a killed process never loses: the log
//! covers a worker that crashes or is killed (`kill -9`, the OOM killer), not a host that loses
//! power.
//!
//! ```text
//! header (64 bytes): magic "CPSUNDO1" | disk bytes (le64) | tag length (le32) | tag | zeros
//! record (4112 bytes): block index (le64) | crc32 of index and data (le32) | 0 (le32) | data
//! ```
//!
//! It owns the file format and the writer's bitmap; it never decides which epoch a disk should
//! be taken back to (the caller compares tags).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Size of the blocks the log keeps, in bytes.
pub const UNDO_BLOCK_BYTES: u64 = 4096;
/// The tag of an epoch that began with a boot (no snapshot holds that moment).
pub const BOOT_TAG: &str = "boot";
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = HEADER_BYTES as usize - 20;

const MAGIC: &[u8; 8] = b"CPSUNDO1";
const HEADER_BYTES: u64 = 64;
const RECORD_HEADER_BYTES: u64 = 16;
const RECORD_BYTES: u64 = RECORD_HEADER_BYTES + UNDO_BLOCK_BYTES;

/// Errors of an undo log.
#[derive(Debug, Error)]
pub enum UndoError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The tag is too long for the header.
    #[error("the undo-log tag {tag:?} is longer than {MAX_TAG_BYTES} bytes")]
    TagTooLong {
        /// The tag.
        tag: String,
    },
    /// The file is not an undo log, or not one of this disk.
    #[error("{path} is not an undo log of a {disk_bytes}-byte disk: {why}")]
    NotALog {
        /// The file.
        path: PathBuf,
        /// The disk's size.
        disk_bytes: u64,
        /// What is wrong.
        why: String,
    },
    /// A record before the last is damaged: the log cannot say what the disk held.
    #[error("record {index} of the undo log {path} is damaged ({why}); the disk cannot be taken back")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The record's position.
        index: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Where the undo log of the disk at `disk` lives: beside it, with `.undo` appended.
pub fn undo_log_path(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_os_string();
    name.push(".undo");
    PathBuf::from(name)
}

/// The tag of the epoch that begins with the snapshot in `dir` (written, or restored): the
/// directory's name, which is unique among one sandbox's snapshots.
pub fn snapshot_tag(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The writing end of a disk's undo log, kept by its block device.
#[derive(Debug)]
pub struct UndoLog {
    file: File,
    path: PathBuf,
    disk_bytes: u64,
    /// One bit per block: logged in this epoch.
    logged: Vec<u64>,
    /// Records in this epoch.
    records: u64,
    /// Whether an epoch has begun (nothing may be written before).
    begun: bool,
}

impl UndoLog {
    /// Opens (creating) the log at `path` for a disk of `disk_bytes`. It is left as it is until
    /// [`UndoLog::begin`]: a log not yet undone must survive a restore that fails.
    pub fn open(path: &Path, disk_bytes: u64) -> Result<Self, UndoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("opening the undo log", path))?;
        let blocks = disk_bytes.div_ceil(UNDO_BLOCK_BYTES);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Ok(Self { file, path: path.to_path_buf(), disk_bytes, logged: vec![0; words], records: 0, begun: false })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in the current epoch.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Starts an epoch tagged `tag`: the disk is now at the state of that moment. The log is
    /// emptied; until this returns, writes must not reach the disk.
    pub fn begin(&mut self, tag: &str) -> Result<(), UndoError> {
        let header = header(self.disk_bytes, tag)?;
        self.file.set_len(0).map_err(io_err("emptying the undo log", &self.path))?;
        self.file.write_all_at(&header, 0).map_err(io_err("writing the undo log header", &self.path))?;
        self.logged.fill(0);
        self.records = 0;
        self.begun = true;
        Ok(())
    }

    /// Logs the old contents of every block of `disk` in `offset..offset + len` not yet logged
    /// in this epoch. Call before writing that range; an error means the write must not happen.
    pub fn before_write(&mut self, disk: &File, offset: u64, len: u64) -> Result<(), UndoError> {
        if !self.begun {
            // No known moment to go back to: the writer must begin an epoch first.
            return Err(UndoError::Io {
                what: "writing before an epoch began in",
                path: self.path.clone(),
                source: std::io::Error::other("no epoch"),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.disk_bytes);
        let first = offset / UNDO_BLOCK_BYTES;
        let last = end.div_ceil(UNDO_BLOCK_BYTES);
        let mut block = first;
        while block < last {
            if self.is_logged(block) {
                block += 1;
                continue;
            }
            // One run of blocks not yet logged: read it whole, write its records at once.
            let mut run_end = block + 1;
            while run_end < last && !self.is_logged(run_end) && run_end - block < 64 {
                run_end += 1;
            }
            self.log_run(disk, block, run_end)?;
            block = run_end;
        }
        Ok(())
    }

    fn log_run(&mut self, disk: &File, first: u64, end: u64) -> Result<(), UndoError> {
        let count = (end - first) as usize;
        let mut data = vec![0u8; count * UNDO_BLOCK_BYTES as usize];
        super::read_at_zero_fill(disk, &mut data, first * UNDO_BLOCK_BYTES)
            .map_err(io_err("reading the old contents for the undo log from the disk of", &self.path))?;
        let mut records = Vec::with_capacity(count * RECORD_BYTES as usize);
        for (i, old) in data.chunks_exact(UNDO_BLOCK_BYTES as usize).enumerate() {
            let index = first + i as u64;
            records.extend_from_slice(&index.to_le_bytes());
            records.extend_from_slice(&record_crc(index, old).to_le_bytes());
            records.extend_from_slice(&0u32.to_le_bytes());
            records.extend_from_slice(old);
        }
        let at = HEADER_BYTES + self.records * RECORD_BYTES;
        self.file.write_all_at(&records, at).map_err(io_err("appending to the undo log", &self.path))?;
        for block in first..end {
            self.logged[(block / 64) as usize] |= 1 << (block % 64);
        }
        self.records += count as u64;
        Ok(())
    }

    fn is_logged(&self, block: u64) -> bool {
        self.logged.get((block / 64) as usize).is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
}

/// What [`read_tag`] and [`undo_disk`] found in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoSummary {
    /// The epoch's tag.
    pub tag: String,
    /// Whole records (written back by [`undo_disk`]).
    pub records: u64,
    /// Whether a record cut short by a killed writer was skipped at the end.
    pub torn_tail: bool,
}

/// The tag and record count of the log at `log` for a disk of `disk_bytes`, or `None` when
/// there is no log.
pub fn read_tag(log: &Path, disk_bytes: u64) -> Result<Option<UndoSummary>, UndoError> {
    let Some(file) = open_existing(log)? else {
        return Ok(None);
    };
    let (tag, len) = read_header(&file, log, disk_bytes)?;
    let body = len - HEADER_BYTES;
    Ok(Some(UndoSummary { tag, records: body / RECORD_BYTES, torn_tail: body % RECORD_BYTES != 0 }))
}

/// Writes every record of the log at `log` back over `disk` (synced), which is then as it was
/// when the log's epoch began, and empties the log (keeping its tag). `None` when there is no
/// log. Nothing is written when a record before the last is damaged.
pub fn undo_disk(disk: &Path, log: &Path) -> Result<Option<UndoSummary>, UndoError> {
    let Some(file) = open_existing(log)? else {
        return Ok(None);
    };
    let target = OpenOptions::new().write(true).open(disk).map_err(io_err("opening the disk to undo", disk))?;
    let disk_bytes = target.metadata().map_err(io_err("reading the size of", disk))?.len();
    let (tag, len) = read_header(&file, log, disk_bytes)?;
    let whole = (len - HEADER_BYTES) / RECORD_BYTES;
    let mut torn_tail = (len - HEADER_BYTES) % RECORD_BYTES != 0;
    // Check every record before writing any: a damaged log leaves the disk as it is.
    let mut usable = whole;
    let mut record = vec![0u8; RECORD_BYTES as usize];
    for index in 0..whole {
        let block = read_record(&file, log, index, &mut record)?;
        let damaged = |why| UndoError::Damaged { path: log.to_path_buf(), index, why };
        if crc_of(&record) != record_crc(block, data_of(&record)) {
            // The last record may be cut short by a killed writer; its block was not written.
            if index + 1 == whole && !torn_tail {
                (usable, torn_tail) = (index, true);
                break;
            }
            return Err(damaged("bad checksum"));
        }
        if block.saturating_mul(UNDO_BLOCK_BYTES) >= disk_bytes {
            return Err(damaged("block past the end of the disk"));
        }
    }
    for index in 0..usable {
        let block = read_record(&file, log, index, &mut record)?;
        let at = block * UNDO_BLOCK_BYTES;
        let keep = (disk_bytes - at).min(UNDO_BLOCK_BYTES) as usize;
        target.write_all_at(&data_of(&record)[..keep], at).map_err(io_err("writing old contents back to", disk))?;
    }
    target.sync_data().map_err(io_err("syncing", disk))?;
    // Undone: empty the log so that undoing again changes nothing.
    file.set_len(HEADER_BYTES).map_err(io_err("emptying the undo log", log))?;
    Ok(Some(UndoSummary { tag, records: usable, torn_tail }))
}

/// Reads record `index` into `buf`; returns its block index.
fn read_record(file: &File, log: &Path, index: u64, buf: &mut [u8]) -> Result<u64, UndoError> {
    file.read_exact_at(buf, HEADER_BYTES + index * RECORD_BYTES).map_err(io_err("reading the undo log", log))?;
    Ok(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")))
}

fn crc_of(record: &[u8]) -> u32 {
    u32::from_le_bytes(record[8..12].try_into().expect("4 bytes"))
}

fn data_of(record: &[u8]) -> &[u8] {
    &record[RECORD_HEADER_BYTES as usize..]
}

fn open_existing(log: &Path) -> Result<Option<File>, UndoError> {
    match OpenOptions::new().read(true).write(true).open(log) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(UndoError::Io { what: "opening the undo log", path: log.to_path_buf(), source }),
    }
}

/// The tag and file length of a log, after checking its header against the disk's size.
fn read_header(file: &File, path: &Path, disk_bytes: u64) -> Result<(String, u64), UndoError> {
    let not_a_log = |why: String| UndoError::NotALog { path: path.to_path_buf(), disk_bytes, why };
    let len = file.metadata().map_err(io_err("reading the size of", path))?.len();
    if len < HEADER_BYTES {
        return Err(not_a_log(format!("{len} bytes, shorter than its header")));
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut header, 0).map_err(io_err("reading the undo log header", path))?;
    if &header[..8] != MAGIC {
        return Err(not_a_log("wrong magic".into()));
    }
    let saved = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if saved != disk_bytes {
        return Err(not_a_log(format!("it was written for a {saved}-byte disk")));
    }
    let tag_len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    let tag = header
        .get(20..20 + tag_len)
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| not_a_log(format!("a tag of {tag_len} bytes does not fit")))?;
    Ok((tag.to_string(), len))
}

fn header(disk_bytes: u64, tag: &str) -> Result<[u8; HEADER_BYTES as usize], UndoError> {
    if tag.len() > MAX_TAG_BYTES {
        return Err(UndoError::TagTooLong { tag: tag.to_string() });
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&disk_bytes.to_le_bytes());
    header[16..20].copy_from_slice(&(tag.len() as u32).to_le_bytes());
    header[20..20 + tag.len()].copy_from_slice(tag.as_bytes());
    Ok(header)
}

fn record_crc(block: u64, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&block.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UndoError + 'a {
    move |source| UndoError::Io { what, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: u64 = 64 * UNDO_BLOCK_BYTES + 512;

    struct Fixture {
        _dir: tempfile::TempDir,
        disk_path: PathBuf,
        disk: File,
        log: UndoLog,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("rw.ext4");
        let disk = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk_path).unwrap();
        disk.set_len(DISK).unwrap();
        let content: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        disk.write_all_at(&content, 0).unwrap();
        let log = UndoLog::open(&undo_log_path(&disk_path), DISK).unwrap();
        Fixture { _dir: dir, disk_path, disk, log }
    }

    fn guest_write(f: &mut Fixture, offset: u64, bytes: &[u8]) {
        f.log.before_write(&f.disk, offset, bytes.len() as u64).unwrap();
        f.disk.write_all_at(bytes, offset).unwrap();
    }

    fn contents(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn undoing_takes_the_disk_back_to_the_start_of_the_epoch_and_is_idempotent() {
        let mut f = fixture();
        f.log.begin("snapshot-3").unwrap();
        let at_epoch = contents(&f.disk_path);
        // Unaligned, spanning blocks, overlapping, and the partial last block.
        guest_write(&mut f, 1000, &[0xaa; 9000]);
        guest_write(&mut f, 4096, &[0xbb; 512]);
        guest_write(&mut f, DISK - 512, &[0xcc; 512]);
        assert_eq!(f.log.records(), 3 + 1, "blocks 0..=2 once each, and the last");
        assert_ne!(contents(&f.disk_path), at_epoch);
        let log_path = f.log.path().to_path_buf();
        assert_eq!(read_tag(&log_path, DISK).unwrap().unwrap().records, 4);

        let undone = undo_disk(&f.disk_path, &log_path).unwrap().unwrap();
        assert_eq!(undone, UndoSummary { tag: "snapshot-3".into(), records: 4, torn_tail: false });
        assert_eq!(contents(&f.disk_path), at_epoch);
        let again = undo_disk(&f.disk_path, &log_path).unwrap().unwrap();
        assert_eq!((again.tag.as_str(), again.records), ("snapshot-3", 0));
        assert_eq!(contents(&f.disk_path), at_epoch);
    }

    #[test]
    fn a_new_epoch_forgets_the_old_one() {
        let mut f = fixture();
        f.log.begin(BOOT_TAG).unwrap();
        guest_write(&mut f, 0, &[1; 4096]);
        f.log.begin("snapshot-1").unwrap();
        let at_epoch = contents(&f.disk_path);
        guest_write(&mut f, 0, &[2; 4096]);
        assert_eq!(f.log.records(), 1, "logged again in the new epoch");
        let undone = undo_disk(&f.disk_path, f.log.path()).unwrap().unwrap();
        assert_eq!((undone.tag.as_str(), undone.records), ("snapshot-1", 1));
        assert_eq!(contents(&f.disk_path), at_epoch, "back to the second epoch's start, not the first's");
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_skipped_but_damage_before_it_refuses_the_log() {
        let mut f = fixture();
        f.log.begin("snapshot-origin").unwrap();
        let at_epoch = contents(&f.disk_path);
        guest_write(&mut f, 0, &[9; 4096]);
        // The writer is killed while appending the second record: its block is never written.
        let log_path = f.log.path().to_path_buf();
        let log = OpenOptions::new().write(true).open(&log_path).unwrap();
        log.write_all_at(&[7; 100], HEADER_BYTES + RECORD_BYTES).unwrap();
        let undone = undo_disk(&f.disk_path, &log_path).unwrap().unwrap();
        assert_eq!((undone.records, undone.torn_tail), (1, true));
        assert_eq!(contents(&f.disk_path), at_epoch);

        let mut f = fixture();
        f.log.begin("snapshot-2").unwrap();
        guest_write(&mut f, 0, &[9; 8192]);
        let log_path = f.log.path().to_path_buf();
        let log = OpenOptions::new().write(true).open(&log_path).unwrap();
        log.write_all_at(&[0xff; 8], HEADER_BYTES + RECORD_HEADER_BYTES + 10).unwrap();
        let written = contents(&f.disk_path);
        let err = undo_disk(&f.disk_path, &log_path).unwrap_err();
        assert!(matches!(err, UndoError::Damaged { index: 0, .. }), "{err}");
        assert_eq!(contents(&f.disk_path), written, "nothing written back from a damaged log");
    }

    #[test]
    fn a_last_whole_record_with_a_bad_checksum_counts_as_cut_short() {
        let mut f = fixture();
        f.log.begin("snapshot-5").unwrap();
        let at_epoch = contents(&f.disk_path);
        guest_write(&mut f, 0, &[3; 4096]);
        // A second record whose bytes did not all land (its length did).
        let log_path = f.log.path().to_path_buf();
        let log = OpenOptions::new().write(true).open(&log_path).unwrap();
        log.write_all_at(&vec![0; RECORD_BYTES as usize], HEADER_BYTES + RECORD_BYTES).unwrap();
        let undone = undo_disk(&f.disk_path, &log_path).unwrap().unwrap();
        assert_eq!((undone.records, undone.torn_tail), (1, true));
        assert_eq!(contents(&f.disk_path), at_epoch);
    }

    #[test]
    fn a_log_of_another_disk_or_no_log_at_all_is_told_apart() {
        let mut f = fixture();
        f.log.begin("snapshot-1").unwrap();
        assert!(matches!(read_tag(f.log.path(), DISK + 4096), Err(UndoError::NotALog { .. })));
        std::fs::write(f.log.path(), b"not a log at all, but long enough to hold a header of sixty-four").unwrap();
        assert!(matches!(undo_disk(&f.disk_path, f.log.path()), Err(UndoError::NotALog { .. })));
        let missing = f.disk_path.with_extension("nothing");
        assert_eq!(read_tag(&missing, DISK).unwrap(), None);
        assert_eq!(undo_disk(&f.disk_path, &missing).unwrap(), None);
    }

    #[test]
    fn writes_before_an_epoch_and_overlong_tags_are_refused() {
        let mut f = fixture();
        assert!(f.log.before_write(&f.disk, 0, 512).is_err(), "no epoch yet");
        assert!(matches!(f.log.begin(&"x".repeat(MAX_TAG_BYTES + 1)), Err(UndoError::TagTooLong { .. })));
        f.log.begin(&"x".repeat(MAX_TAG_BYTES)).unwrap();
        assert_eq!(read_tag(f.log.path(), DISK).unwrap().unwrap().tag.len(), MAX_TAG_BYTES);
    }
}
