//! Taking a sandbox's writable disk back to the moment of the snapshot it rolls back to, so that
//! the memory and the disk it resumes with belong together (a guest whose page cache and
//! filesystem metadata describe another disk hangs or corrupts it).
//!
//! Its worker kept an undo log of the disk (`capsule_vmm::devices::virtio::block::undo`), with
//! an epoch begun at each boot, restore and snapshot. Rolling back to snapshot `N`:
//! - the log's epoch began at `N`: its records are written back, and the disk is at `N`;
//! - it began at an older snapshot: the worker was lost between writing `N` and beginning the
//!   next epoch, with its devices parked, so the disk has not changed since `N`;
//! - it began at a boot (a restart after `N`) or at an unknown moment: no snapshot's memory fits
//!   the disk, and the roll-back is refused (`restart_sandbox` boots it again on its disk);
//! - there is no log (a sandbox made before undo logs): the disk is used as it is, as before.
//!
//! It decides and applies; it never starts or stops a worker.

use capsule_vmm::devices::virtio::block::undo::{read_tag, snapshot_tag, undo_disk, undo_log_path, UndoError};

use super::layout::SandboxFiles;
use super::KvmError;

/// What was done to the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DiskBack {
    /// Blocks written since the snapshot were written back.
    Undone {
        /// How many 4 KiB blocks.
        blocks: u64,
    },
    /// The disk had not changed since the snapshot.
    Unchanged,
    /// No undo log: the disk is used as it is.
    NoLog,
}

/// Takes the writable disk of `files` back to its snapshot `generation` (0: its origin).
pub(super) fn disk_back_to(files: &SandboxFiles, generation: u64) -> Result<DiskBack, KvmError> {
    let disk = files.writable_disk();
    let log = undo_log_path(&disk);
    let undo_err = |source: UndoError| KvmError::DiskUndo { disk: disk.clone(), source };
    let disk_bytes = match std::fs::metadata(&disk) {
        Ok(meta) => meta.len(),
        Err(_) => return Err(KvmError::DiskGone(disk)),
    };
    let Some(found) = read_tag(&log, disk_bytes).map_err(undo_err)? else {
        tracing::warn!(disk = %disk.display(), "no undo log: rolling back over the disk as it is");
        return Ok(DiskBack::NoLog);
    };
    let wanted = snapshot_tag(&files.own_snapshot(generation));
    if found.tag == wanted {
        let undone = undo_disk(&disk, &log).map_err(undo_err)?.map_or(0, |summary| summary.records);
        return Ok(DiskBack::Undone { blocks: undone });
    }
    match tag_generation(&found.tag) {
        Some(older) if older < generation => Ok(DiskBack::Unchanged),
        _ => Err(KvmError::DiskNewerThanSnapshot { disk, since: found.tag, snapshot: wanted }),
    }
}

/// The generation an epoch tag names: `snapshot-origin` is 0, `snapshot-N` is `N`.
fn tag_generation(tag: &str) -> Option<u64> {
    match tag.strip_prefix("snapshot-")? {
        "origin" => Some(0),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    use capsule_vmm::devices::virtio::block::undo::{UndoLog, BOOT_TAG};

    use super::*;

    const DISK: u64 = 16 * 4096;

    /// A sandbox directory with a disk of `fill` bytes whose undo epoch began at `tag`, after
    /// which one block was overwritten.
    fn sandbox(tag: &str) -> (tempfile::TempDir, SandboxFiles) {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        let disk = files.writable_disk();
        std::fs::write(&disk, vec![1u8; DISK as usize]).unwrap();
        let mut log = UndoLog::open(&undo_log_path(&disk), DISK).unwrap();
        log.begin(tag).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        log.before_write(&file, 4096, 4096).unwrap();
        file.write_all_at(&[2u8; 4096], 4096).unwrap();
        (dir, files)
    }

    fn disk_is_as_at_the_epoch(files: &SandboxFiles) -> bool {
        std::fs::read(files.writable_disk()).unwrap() == vec![1u8; DISK as usize]
    }

    #[test]
    fn a_disk_written_since_the_snapshot_is_undone() {
        let (_dir, files) = sandbox("snapshot-3");
        assert_eq!(disk_back_to(&files, 3).unwrap(), DiskBack::Undone { blocks: 1 });
        assert!(disk_is_as_at_the_epoch(&files));
        let (_dir, files) = sandbox("snapshot-origin");
        assert_eq!(disk_back_to(&files, 0).unwrap(), DiskBack::Undone { blocks: 1 });
        assert!(disk_is_as_at_the_epoch(&files));
    }

    #[test]
    fn an_epoch_older_than_the_snapshot_means_the_disk_is_as_the_snapshot_left_it() {
        // The worker wrote snapshot 4 and was lost before its next epoch: the records are of
        // writes before snapshot 4 and must stay on the disk.
        let (_dir, files) = sandbox("snapshot-2");
        assert_eq!(disk_back_to(&files, 4).unwrap(), DiskBack::Unchanged);
        assert!(!disk_is_as_at_the_epoch(&files));
        let (_dir, files) = sandbox("snapshot-origin");
        assert_eq!(disk_back_to(&files, 1).unwrap(), DiskBack::Unchanged);
    }

    #[test]
    fn a_disk_booted_again_after_the_snapshot_refuses_the_roll_back() {
        for tag in [BOOT_TAG, "snapshot-9", "something else"] {
            let (_dir, files) = sandbox(tag);
            let err = disk_back_to(&files, 5).unwrap_err();
            assert!(matches!(err, KvmError::DiskNewerThanSnapshot { .. }), "{tag}: {err}");
            assert!(err.to_string().contains("restart_sandbox"), "{err}");
            assert!(!disk_is_as_at_the_epoch(&files), "the disk is left as it is");
        }
    }

    #[test]
    fn without_a_log_the_disk_is_used_as_it_is_and_without_a_disk_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        assert!(matches!(disk_back_to(&files, 1), Err(KvmError::DiskGone(_))));
        std::fs::write(files.writable_disk(), vec![0u8; DISK as usize]).unwrap();
        assert_eq!(disk_back_to(&files, 1).unwrap(), DiskBack::NoLog);
    }
}
