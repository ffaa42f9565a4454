//! Snapshot, restore, fork and incremental pause of tiny guests, each VM in its own worker
//! process.

mod snapshot_common;

use std::path::Path;
use std::time::Duration;

use capsule_vmm::snapshot::linked_copy::link_chain;
use capsule_vmm::snapshot::{RestoreOverrides, SnapshotError};
use capsule_vmm::worker::{WorkerError, WorkerHandle};
use capsule_vmm::RunState;
use snapshot_common::*;

const RUN_TIME: Duration = Duration::from_millis(100);

fn restore(dir: &Path) -> WorkerHandle {
    WorkerHandle::restore(Path::new(WORKER_EXE), dir, RestoreOverrides::default()).expect("restore worker")
}

#[test]
fn restored_counter_continues_from_the_saved_value_with_equal_memory() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&COUNTER_AND_TSC);
    let tmp = tempfile::tempdir().unwrap();
    let parent = start_worker(tiny_config(payload.path(), 64));
    run_for(&parent, RUN_TIME);
    let first = tmp.path().join("first");
    let info = parent.snapshot(&first, false).unwrap();
    assert!(!info.incremental);
    assert!(info.pages_written >= 2, "{info:?}");
    let saved = snapshot_u64(&first, COUNTER_ADDR);
    assert!(saved > 0, "the counter ran before the snapshot");
    parent.stop().unwrap();

    // A new process, not started: its memory is exactly the snapshot's.
    let restored = restore(&first);
    assert_ne!(restored.pid(), parent.pid());
    let again = tmp.path().join("again");
    restored.snapshot(&again, false).unwrap();
    let a = std::fs::read(first.join("memory.bin")).unwrap();
    let b = std::fs::read(again.join("memory.bin")).unwrap();
    assert_eq!(a.len(), 64 << 20);
    assert!(a == b, "restored memory differs from the snapshot's");

    // Running, the counter continues from the saved value.
    assert_eq!(restored.start().unwrap(), RunState::Running);
    match restored.snapshot(&tmp.path().join("running"), false) {
        Err(WorkerError::Refused { error, .. }) => {
            assert!(error.to_string().contains("must be paused"), "{error}")
        }
        other => panic!("a running VM was snapshotted: {other:?}"),
    }
    run_for(&restored, RUN_TIME);
    let later = tmp.path().join("later");
    restored.snapshot(&later, false).unwrap();
    let continued = snapshot_u64(&later, COUNTER_ADDR);
    assert!(continued > saved, "counter went from {saved} to {continued} after restore");
    // Resumable after a snapshot.
    assert_eq!(restored.resume().unwrap(), RunState::Running);
    restored.stop().unwrap();
}

#[test]
fn ten_forks_of_one_snapshot_are_isolated_and_leave_the_parent_unchanged() {
    if !kvm_usable() {
        return;
    }
    const FORKS: usize = 10;
    let payload = elf_payload(&COUNTER_AND_TSC);
    let tmp = tempfile::tempdir().unwrap();
    let parent = start_worker(tiny_config(payload.path(), 64));
    run_for(&parent, RUN_TIME);
    let base = tmp.path().join("base");
    parent.snapshot(&base, false).unwrap();
    parent.stop().unwrap();
    let parent_memory = std::fs::read(base.join("memory.bin")).unwrap();
    let saved_counter = snapshot_u64(&base, COUNTER_ADDR);
    let saved_tsc = snapshot_u64(&base, TSC_ADDR);

    let forks: Vec<WorkerHandle> = (0..FORKS).map(|_| restore(&base)).collect();
    for (i, fork) in forks.iter().enumerate() {
        fork.start().unwrap();
        // Each fork runs a different time, so each writes different values.
        std::thread::sleep(Duration::from_millis(20 + 15 * i as u64));
        fork.pause().unwrap();
    }
    let mut tscs = Vec::new();
    for (i, fork) in forks.iter().enumerate() {
        let dir = tmp.path().join(format!("fork{i}"));
        fork.snapshot(&dir, false).unwrap();
        let counter = snapshot_u64(&dir, COUNTER_ADDR);
        assert!(counter > saved_counter, "fork {i} did not run on");
        tscs.push(snapshot_u64(&dir, TSC_ADDR));
        fork.stop().unwrap();
    }
    let mut distinct = tscs.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), FORKS, "forks wrote the same values: {tscs:?}");
    assert!(!tscs.contains(&saved_tsc));
    assert!(
        std::fs::read(base.join("memory.bin")).unwrap() == parent_memory,
        "a fork's writes reached the parent snapshot"
    );
    assert_eq!(snapshot_u64(&base, COUNTER_ADDR), saved_counter);
}

#[test]
fn incremental_snapshot_writes_about_the_pages_the_guest_touched() {
    if !kvm_usable() {
        return;
    }
    const TOUCHED_PAGES: u32 = 300;
    let payload = elf_payload(&toucher(TOUCHED_PAGES));
    let tmp = tempfile::tempdir().unwrap();
    let worker = start_worker(tiny_config(payload.path(), 256));
    run_for(&worker, RUN_TIME);
    let full = tmp.path().join("full");
    let full_info = worker.snapshot(&full, false).unwrap();
    assert!(full_info.pages_written >= u64::from(TOUCHED_PAGES));

    worker.resume().unwrap();
    run_for(&worker, RUN_TIME);
    let inc = tmp.path().join("inc");
    let info = worker.snapshot(&inc, true).unwrap();
    assert!(info.incremental);
    let k = u64::from(TOUCHED_PAGES);
    // The touched pages plus the counter page (the code page is only read).
    assert!(
        (k..=k + 4).contains(&info.pages_written),
        "incremental wrote {} pages for {k} touched",
        info.pages_written
    );
    let counter_full = snapshot_u64(&full, COUNTER_ADDR);
    let counter_inc = snapshot_u64(&inc, COUNTER_ADDR);
    assert!(counter_inc > counter_full);

    // A second layer on top, then restore the chain in a new process and check it equals the
    // running VM's memory (saved as a full snapshot).
    worker.resume().unwrap();
    run_for(&worker, RUN_TIME);
    let inc2 = tmp.path().join("inc2");
    worker.snapshot(&inc2, true).unwrap();
    let flat = tmp.path().join("flat");
    worker.snapshot(&flat, false).unwrap();
    worker.stop().unwrap();

    let restored = restore(&inc2);
    let from_chain = tmp.path().join("from_chain");
    restored.snapshot(&from_chain, false).unwrap();
    let a = std::fs::read(flat.join("memory.bin")).unwrap();
    let b = std::fs::read(from_chain.join("memory.bin")).unwrap();
    assert!(a == b, "memory restored from the layer chain differs");
    // The restored VM runs on and can take its own incremental layer.
    restored.start().unwrap();
    run_for(&restored, RUN_TIME);
    let inc3 = tmp.path().join("inc3");
    let info = restored.snapshot(&inc3, true).unwrap();
    assert!((k..=k + 4).contains(&info.pages_written), "{info:?}");
    assert!(snapshot_u64(&inc3, COUNTER_ADDR) > snapshot_u64(&inc2, COUNTER_ADDR));
    restored.stop().unwrap();
}

#[test]
fn a_confined_worker_clears_stale_partial_snapshots_of_dead_workers() {
    if !kvm_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // What a worker killed mid-save leaves: `<dir>.partial-<pid>` of a pid that is gone.
    let mut gone = std::process::Command::new("/bin/true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let stale = tmp.path().join(format!("old.partial-{gone_pid}"));
    std::fs::create_dir_all(stale.join("nested")).unwrap();
    std::fs::write(stale.join("memory.bin"), vec![7u8; 1 << 16]).unwrap();
    std::fs::write(stale.join("nested").join("x"), b"x").unwrap();

    let payload = elf_payload(&COUNTER_AND_TSC);
    let worker = start_worker(tiny_config(payload.path(), 64));
    run_for(&worker, RUN_TIME);
    // Under its seccomp filter: a forbidden syscall here would kill the worker.
    worker.snapshot(&tmp.path().join("snap"), false).unwrap();
    assert!(!stale.exists(), "stale partial snapshot survived");
    let names: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["snap".to_string()]);
    worker.stop().unwrap();
}

/// The inode of `path` and how many names it has.
fn inode_and_links(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.ino(), meta.nlink())
}

#[test]
fn a_linked_chain_copy_shares_memory_outlives_its_original_and_takes_layers_of_its_own() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&toucher(50));
    let tmp = tempfile::tempdir().unwrap();
    let worker = start_worker(tiny_config(payload.path(), 64));
    run_for(&worker, RUN_TIME);
    let full = tmp.path().join("full");
    worker.snapshot(&full, false).unwrap();
    worker.resume().unwrap();
    run_for(&worker, RUN_TIME);
    let inc = tmp.path().join("inc");
    worker.snapshot(&inc, true).unwrap();
    let flat = tmp.path().join("flat");
    worker.snapshot(&flat, false).unwrap();

    let copy_dir = tmp.path().join("elsewhere").join("copy");
    std::fs::create_dir(copy_dir.parent().unwrap()).unwrap();
    let copy = link_chain(&inc, &copy_dir).unwrap();
    assert_eq!(copy.depth, 1);
    assert_eq!(copy.dir, copy_dir.canonicalize().unwrap().join("1"));
    for (original, copied) in [(&full, copy_dir.join("0")), (&inc, copy_dir.join("1"))] {
        let (ino, links) = inode_and_links(&original.join("memory.bin"));
        assert_eq!(
            inode_and_links(&copied.join("memory.bin")),
            (ino, 2),
            "memory of {} is not shared",
            copied.display()
        );
        assert_eq!(links, 2);
    }
    assert!(matches!(link_chain(&inc, &copy_dir), Err(SnapshotError::Exists(_))));

    // The originals go; the copy restores and runs on, and takes its own layers.
    worker.stop().unwrap();
    std::fs::remove_dir_all(&full).unwrap();
    std::fs::remove_dir_all(&inc).unwrap();
    let restored = restore(&copy.dir);
    let from_copy = tmp.path().join("from_copy");
    restored.snapshot(&from_copy, false).unwrap();
    let a = std::fs::read(flat.join("memory.bin")).unwrap();
    let b = std::fs::read(from_copy.join("memory.bin")).unwrap();
    assert!(a == b, "memory restored from the linked copy differs from the VM's");
    restored.start().unwrap();
    run_for(&restored, RUN_TIME);
    let next = tmp.path().join("elsewhere").join("next");
    assert!(restored.snapshot(&next, true).unwrap().incremental);
    restored.stop().unwrap();
    assert!(snapshot_u64(&next, COUNTER_ADDR) > snapshot_u64(&from_copy, COUNTER_ADDR));
}
