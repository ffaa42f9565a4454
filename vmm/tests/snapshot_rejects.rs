//! Damaged snapshots are refused with errors that say what is wrong, in a worker that then
//! exits cleanly; a worker killed in the middle of a snapshot leaves the previous snapshot
//! valid and nothing that a restore accepts.

mod snapshot_common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_vmm::snapshot::{RestoreOverrides, MEMORY_FILE, STATE_FILE};
use capsule_vmm::worker::{RemoteErrorKind, WorkerError, WorkerHandle};
use snapshot_common::*;

fn restore_error(dir: &Path) -> String {
    match WorkerHandle::restore(Path::new(WORKER_EXE), dir, RestoreOverrides::default()) {
        Ok(_) => panic!("the damaged snapshot {} was accepted", dir.display()),
        Err(WorkerError::BuildFailed(error)) => {
            assert_eq!(error.kind, RemoteErrorKind::InvalidInput, "a damaged snapshot is bad input: {error}");
            error.to_string()
        }
        Err(other) => panic!("expected a clear refusal, got {other}"),
    }
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for name in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// A paused 64 MiB counter guest saved to `dir/good`.
fn good_snapshot(dir: &Path) -> PathBuf {
    let payload = elf_payload(&COUNTER_AND_TSC);
    let worker = start_worker(tiny_config(payload.path(), 64));
    run_for(&worker, Duration::from_millis(50));
    let good = dir.join("good");
    worker.snapshot(&good, false).unwrap();
    worker.stop().unwrap();
    good
}

#[test]
fn corrupt_truncated_wrong_version_and_mismatched_snapshots_are_refused() {
    if !kvm_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = good_snapshot(tmp.path());
    let state_len = std::fs::metadata(good.join(STATE_FILE)).unwrap().len();

    let corrupt = tmp.path().join("corrupt");
    copy_snapshot(&good, &corrupt);
    let f = std::fs::OpenOptions::new().write(true).open(corrupt.join(STATE_FILE)).unwrap();
    f.write_all_at(&[0xa5; 16], state_len / 2).unwrap();
    let message = restore_error(&corrupt);
    assert!(message.contains("checksum mismatch"), "{message}");

    let truncated = tmp.path().join("truncated");
    copy_snapshot(&good, &truncated);
    let f = std::fs::OpenOptions::new().write(true).open(truncated.join(STATE_FILE)).unwrap();
    f.set_len(state_len - 100).unwrap();
    let message = restore_error(&truncated);
    assert!(message.contains("truncated"), "{message}");
    f.set_len(10).unwrap();
    let message = restore_error(&truncated);
    assert!(message.contains("shorter than"), "{message}");

    let version = tmp.path().join("version");
    copy_snapshot(&good, &version);
    let f = std::fs::OpenOptions::new().write(true).open(version.join(STATE_FILE)).unwrap();
    f.write_all_at(&99u32.to_le_bytes(), 8).unwrap();
    let message = restore_error(&version);
    assert!(message.contains("format version 99"), "{message}");

    let magic = tmp.path().join("magic");
    copy_snapshot(&good, &magic);
    std::fs::write(magic.join(STATE_FILE), b"not a snapshot at all, just text").unwrap();
    let message = restore_error(&magic);
    assert!(message.contains("magic"), "{message}");

    let short_memory = tmp.path().join("short_memory");
    copy_snapshot(&good, &short_memory);
    std::fs::OpenOptions::new().write(true).open(short_memory.join(MEMORY_FILE)).unwrap().set_len(1 << 20).unwrap();
    let message = restore_error(&short_memory);
    assert!(message.contains("memory file") && message.contains("1048576"), "{message}");

    let message = restore_error(&tmp.path().join("missing"));
    assert!(message.contains("opening snapshot state file"), "{message}");

    // A replacement disk of the wrong size (the snapshot has no disk: count mismatch).
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let overrides = RestoreOverrides { disks: vec![disk], ..Default::default() };
    match WorkerHandle::restore(Path::new(WORKER_EXE), &good, overrides) {
        Err(WorkerError::BuildFailed(message)) => {
            assert!(message.to_string().contains("1 disks but the snapshot has 0"), "{message}")
        }
        other => panic!("mismatched disks accepted: {other:?}"),
    }

    // The intact snapshot still restores.
    let ok = WorkerHandle::restore(Path::new(WORKER_EXE), &good, RestoreOverrides::default());
    ok.unwrap().stop().unwrap();
}

#[test]
fn a_worker_killed_mid_snapshot_leaves_the_previous_snapshot_valid() {
    if !kvm_usable() {
        return;
    }
    const FILL_BYTES: u64 = 384 << 20;
    let payload = elf_payload(&filler(FILL_BYTES));
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serial.log");
    let mut config = tiny_config(payload.path(), 512);
    config.serial_log = Some(log.clone());
    let worker = start_worker(config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read(&log).unwrap_or_default() != b"F" {
        assert!(Instant::now() < deadline, "the guest never filled its memory");
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.pause().unwrap();
    let previous = tmp.path().join("previous");
    worker.snapshot(&previous, false).unwrap();
    let previous_counter = snapshot_u64(&previous, COUNTER_ADDR);

    // Start a second snapshot on another thread and kill the worker once it is writing.
    let doomed = tmp.path().join("doomed");
    let partial = tmp.path().join(format!("doomed.partial-{}", worker.pid()));
    let pid = worker.pid();
    let worker = std::sync::Arc::new(worker);
    let requester = {
        let worker = worker.clone();
        let doomed = doomed.clone();
        std::thread::spawn(move || worker.snapshot(&doomed, false))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written = std::fs::metadata(partial.join(MEMORY_FILE)).map(|m| m.len()).unwrap_or(0);
        if written > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the second snapshot never started");
        std::thread::sleep(Duration::from_micros(200));
    }
    // The worker is this test's child and not yet reaped, so the pid is still its own.
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let result = requester.join().unwrap();
    assert!(matches!(result, Err(WorkerError::WorkerDied { .. })), "{result:?}");

    // The interrupted snapshot never appears under its name, and its partial directory is
    // refused; the previous one still restores with its saved counter.
    assert!(!doomed.exists(), "a partial snapshot was renamed into place");
    let message = restore_error(&partial);
    assert!(message.contains("state file"), "partial snapshot not refused clearly: {message}");
    let restored = WorkerHandle::restore(Path::new(WORKER_EXE), &previous, RestoreOverrides::default()).unwrap();
    let again = tmp.path().join("again");
    restored.snapshot(&again, false).unwrap();
    assert_eq!(snapshot_u64(&again, COUNTER_ADDR), previous_counter);
    restored.stop().unwrap();
}

#[test]
fn a_fork_gets_its_own_disk_copy_only_if_it_has_the_saved_size() {
    if !kvm_usable() {
        return;
    }
    const DISK_BYTES: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; DISK_BYTES as usize]).unwrap();
    let payload = elf_payload(&COUNTER_AND_TSC);
    let mut config = tiny_config(payload.path(), 64);
    config.disks.push(capsule_vmm::DiskConfig { path: disk.clone(), read_only: false, undo_log: false });
    let worker = start_worker(config);
    run_for(&worker, Duration::from_millis(20));
    let snap = tmp.path().join("snap");
    worker.snapshot(&snap, false).unwrap();
    worker.stop().unwrap();

    let wrong = tmp.path().join("wrong.img");
    std::fs::write(&wrong, vec![7u8; 2 * DISK_BYTES as usize]).unwrap();
    let overrides = RestoreOverrides { disks: vec![wrong], ..Default::default() };
    match WorkerHandle::restore(Path::new(WORKER_EXE), &snap, overrides) {
        Err(WorkerError::BuildFailed(message)) => assert!(
            message.to_string().contains(&format!("bytes: {}", 2 * DISK_BYTES))
                && message.to_string().contains(&format!("bytes: {DISK_BYTES}")),
            "{message}"
        ),
        other => panic!("a disk of the wrong size was accepted: {other:?}"),
    }

    let copy = tmp.path().join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let overrides = RestoreOverrides { disks: vec![copy], ..Default::default() };
    let fork = WorkerHandle::restore(Path::new(WORKER_EXE), &snap, overrides).unwrap();
    fork.start().unwrap();
    fork.stop().unwrap();
}
