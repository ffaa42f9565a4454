//! Roll-backs on real KVM with the built guest image: a machine whose VM is lost (its worker
//! killed, with or without an engine watching) goes back to its newest snapshot with its disk
//! taken back to the same moment, so the guest's memory and its filesystem belong together: what
//! was written after the snapshot is gone from the disk too (the disk file is byte for byte as
//! it was when the snapshot was written), and the filesystem goes on working. A machine restarted
//! after its newest snapshot refuses a roll-back to it (its disk is newer) and says what to do.
//!
//! Skips only when /dev/kvm is unusable or no image is built (`capsule image build`).

#[path = "common/kvm.rs"]
mod kvm;

use std::path::Path;
use std::time::Duration;

use capsule::engine::kvm::KvmEngine;
use capsule::engine::{Engine, Machine};
use capsule_agent::client::AgentClient;
use kvm::{engine, engine_in_tempdir, sh, spec};

/// The writable disk of sandbox `id` under `root`, as the host sees it.
fn disk_of(root: &Path, id: &str) -> Vec<u8> {
    std::fs::read(root.join(id).join("rw.ext4")).expect("the writable disk")
}

/// Kills the machine's worker the way the host's OOM killer would.
fn kill_worker(machine: &dyn Machine) {
    let worker = machine.process_id().expect("a live worker");
    // SAFETY: kill(2) with plain integers, on a worker this test's engine started.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));
}

/// Writes after the snapshot that reach the disk for sure: a file changed, a file made, a
/// directory of files made, all synced.
fn write_after_the_snapshot(client: &AgentClient) {
    sh(client, "echo after > /root/mark && echo new > /root/new && mkdir /root/many");
    sh(client, "for i in $(seq 1 200); do echo $i > /root/many/$i; done; sync");
}

/// A new machine `id` paused once (its newest snapshot, with `/root/mark` reading "before") and
/// resumed, then written to (see [`write_after_the_snapshot`]); with its disk as the snapshot
/// left it.
fn written_after_a_snapshot(engine: &KvmEngine, root: &Path, id: &str) -> (Box<dyn Machine>, Vec<u8>) {
    let mut machine = engine.create(&spec(id)).expect("create");
    sh(&machine.connect().unwrap(), "echo before > /root/mark; sync");
    machine.pause().expect("pause");
    let at_snapshot = disk_of(root, id);
    machine.resume().expect("resume");
    write_after_the_snapshot(&machine.connect().unwrap());
    (machine, at_snapshot)
}

/// Asserts the guest is back at the snapshot, on disk as in memory, and its filesystem works.
fn assert_back_at_the_snapshot(client: &AgentClient) {
    // Reading with the caches dropped reads the disk itself.
    sh(client, "sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sh(client, "cat /root/mark"), "before\n", "the changed file is as it was");
    assert_eq!(sh(client, "ls /root/new /root/many 2>&1 | grep -c 'No such file'").trim(), "2", "made later");
    sh(client, "mkdir /root/many && for i in $(seq 1 200); do echo $i > /root/many/$i; done; sync");
    sh(client, "echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sh(client, "cat /root/many/* | wc -l").trim(), "200", "the filesystem takes new files");
    assert_eq!(sh(client, "dmesg | grep -ciE 'ext4.*(error|corrupt)' || true").trim(), "0", "no ext4 errors");
}

#[test]
fn a_machine_whose_worker_died_while_no_engine_watched_rolls_back_memory_and_disk_together() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let (machine, at_snapshot) = written_after_a_snapshot(&engine, root.path(), "kvm-b");
    let saved = machine.saved_state();
    let worker = machine.process_id().expect("a live worker");
    machine.release();
    drop(engine);
    // The worker dies while nothing watches (a host OOM kill, a host restart).
    // SAFETY: kill(2) with plain integers, on the worker this test's engine started.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));

    let engine = self::engine(root.path().to_path_buf()).expect("engine again");
    let found = engine.reattach(&spec("kvm-b"), &saved, false).expect("rolled back, not lost");
    let rolled = found.rolled_back.expect("the loss is reported");
    assert!(rolled.why.contains("worker was gone"), "{rolled:?}");
    assert!(disk_of(root.path(), "kvm-b") == at_snapshot, "the disk is byte for byte as at the snapshot");
    let mut machine = found.machine;
    machine.resume().expect("resume from the newest snapshot");
    assert_back_at_the_snapshot(&machine.connect().unwrap());
    machine.kill().expect("kill");
}

#[test]
fn a_machine_whose_worker_died_under_a_watching_engine_rolls_back_memory_and_disk_together() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let (mut machine, at_snapshot) = written_after_a_snapshot(&engine, root.path(), "kvm-w");
    kill_worker(machine.as_ref());
    let rolled = machine.roll_back("the worker was killed by the test").expect("a KVM machine rolls back");
    rolled.expect("rolled back");
    assert!(disk_of(root.path(), "kvm-w") == at_snapshot, "the disk is byte for byte as at the snapshot");
    machine.resume().expect("resume from the newest snapshot");
    let client = machine.connect().unwrap();
    assert_back_at_the_snapshot(&client);
    // Lost again, now from the epoch the roll-back's resume began: back to the same snapshot.
    sh(&client, "echo again > /root/mark; sync");
    kill_worker(machine.as_ref());
    machine.roll_back("killed again").expect("a KVM machine rolls back").expect("rolled back again");
    assert!(disk_of(root.path(), "kvm-w") == at_snapshot, "back at the same snapshot's disk");
    machine.resume().expect("resume");
    let client = machine.connect().unwrap();
    sh(&client, "echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sh(&client, "cat /root/mark"), "before\n");
    machine.kill().expect("kill");
}

#[test]
fn a_machine_restarted_after_its_newest_snapshot_refuses_to_roll_back_over_its_newer_disk() {
    let Some((_root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-r")).expect("create");
    sh(&machine.connect().unwrap(), "echo before > /root/mark; sync");
    machine.pause().expect("pause");
    machine.resume().expect("resume");
    let mut machine = engine.restart(&spec("kvm-r"), Some(&mut machine)).expect("restart");
    sh(&machine.connect().unwrap(), "echo rebooted > /root/mark; sync");
    kill_worker(machine.as_ref());
    let err = machine.roll_back("killed after the restart").expect("a KVM machine answers").unwrap_err().to_string();
    assert!(err.contains("changed since the sandbox's newest snapshot"), "{err}");
    assert!(err.contains("restart_sandbox"), "{err}");
    // What the error says works: booted again on its disk, with what it wrote there.
    let mut machine = engine.restart(&spec("kvm-r"), Some(&mut machine)).expect("restart again");
    assert_eq!(sh(&machine.connect().unwrap(), "cat /root/mark"), "rebooted\n");
    machine.kill().expect("kill");
}
