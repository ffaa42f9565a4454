//! What a disk's undo log costs the guest's writes (`cargo bench -p capsule-vmm --bench
//! disk_undo`): the same 64 KiB writes (the guest's usual request size) over a 256 MiB disk,
//! plain and through an [`UndoLog`] (the first write to each block in an epoch logs its old
//! contents), in the same run and on the same filesystem, as MiB/s and their ratio; then
//! rewriting the same blocks in the same epoch (logged once, so near the plain cost); then
//! taking the disk back (`undo_disk`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use capsule_vmm::devices::virtio::block::undo::{undo_disk, undo_log_path, UndoLog};

const DISK_BYTES: u64 = 256 << 20;
const REQUEST_BYTES: usize = 64 << 10;
const ROUNDS: usize = 3;

fn disk(dir: &Path, name: &str) -> (std::path::PathBuf, File) {
    let path = dir.join(name);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(DISK_BYTES).unwrap();
    // Old contents to log: the disk is written once first, as a used disk is.
    let chunk = vec![0x5a; 1 << 20];
    for at in (0..DISK_BYTES).step_by(chunk.len()) {
        file.write_all_at(&chunk, at).unwrap();
    }
    file.sync_all().unwrap();
    (path, file)
}

/// Writes the whole disk in requests, logging each first when `log` is given.
fn write_all(file: &File, mut log: Option<&mut UndoLog>) -> Duration {
    let data = vec![0xa5; REQUEST_BYTES];
    let start = Instant::now();
    for at in (0..DISK_BYTES).step_by(REQUEST_BYTES) {
        if let Some(log) = log.as_deref_mut() {
            log.before_write(file, at, REQUEST_BYTES as u64).unwrap();
        }
        file.write_all_at(&data, at).unwrap();
    }
    file.sync_data().unwrap();
    start.elapsed()
}

fn mib_s(d: Duration) -> f64 {
    (DISK_BYTES >> 20) as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // Beside the target directory, on the filesystem sandboxes' disks live on, not a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut plain, mut logged, mut again, mut undo) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (_, file) = disk(dir.path(), "plain.ext4");
        plain.push(mib_s(write_all(&file, None)));
        let (path, file) = disk(dir.path(), "logged.ext4");
        let mut log = UndoLog::open(&undo_log_path(&path), DISK_BYTES).unwrap();
        log.begin("snapshot-1").unwrap();
        logged.push(mib_s(write_all(&file, Some(&mut log))));
        again.push(mib_s(write_all(&file, Some(&mut log))));
        let start = Instant::now();
        undo_disk(&path, &undo_log_path(&path)).unwrap().unwrap();
        undo.push(mib_s(start.elapsed()));
    }
    let (plain, logged, again, undo) = (median(plain), median(logged), median(again), median(undo));
    println!("plain writes (floor, same run):     {plain:8.0} MiB/s");
    println!("first writes in an epoch, logged:   {logged:8.0} MiB/s  ({:.2}x the plain time)", plain / logged);
    println!("rewrites in the same epoch:         {again:8.0} MiB/s  ({:.2}x the plain time)", plain / again);
    println!("taking the disk back (undo_disk):   {undo:8.0} MiB/s of logged blocks");
}
