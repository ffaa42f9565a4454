//! Snapshot and restore of the project's guest kernel through worker processes: the restored
//! guest keeps running (its console continues to the reboot, kvm-clock continues from the saved
//! value), and a vsock device survives the restore: the guest is sent a transport reset and
//! the host reconnects on the new socket. The test guest's init sleeps a few seconds after
//! reaching userspace, so the snapshot catches it mid-run.

mod snapshot_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_vmm::devices::legacy::i8042::ResetSource;
use capsule_vmm::devices::virtio::device::QueueSnapshot;
use capsule_vmm::microvm::MachineState;
use capsule_vmm::snapshot::{load_snapshot, RestoreOverrides};
use capsule_vmm::virtio_wiring::VirtioDeviceKind;
use capsule_vmm::worker::{WorkerEvent, WorkerHandle};
use capsule_vmm::{VmConfig, VmEvent, VsockConfig};
use snapshot_common::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const USERSPACE_MARKER: &str = INIT_MARKER;
/// How long the guest's init sleeps after reaching userspace: the snapshot falls in it.
const GUEST_LINGER: Duration = Duration::from_secs(3);
/// How long the test leaves a snapshot before restoring it.
const PAUSED_TIME: Duration = Duration::from_secs(1);
/// virtio-vsock's event queue index.
const VSOCK_EVENT_QUEUE: usize = 2;

fn wait_for_console(log: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(log) {
            if String::from_utf8_lossy(&bytes).contains(needle) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// The saved event queue of the vsock device (it follows the disks).
fn vsock_event_queue(machine: &MachineState) -> QueueSnapshot {
    let vsock = machine.virtio.iter().find(|d| matches!(d.kind(), VirtioDeviceKind::Vsock { .. }));
    vsock.expect("a vsock device in the snapshot").transport.queues[VSOCK_EVENT_QUEUE]
}

fn console(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
}

/// The test guest's config (and its console log) in `dir`; `guest` must outlive the VMs.
fn linux_config(guest: &TestGuest, dir: &Path, vsock: Option<PathBuf>) -> (VmConfig, PathBuf) {
    let log = dir.join("parent.log");
    let mut config = guest.config();
    config.mem_mib = 256;
    config.serial_log = Some(log.clone());
    config.vsock = vsock.map(|uds_path| VsockConfig { guest_cid: 3, uds_path });
    (config, log)
}

/// Boots, pauses as soon as userspace prints, snapshots into `dir/snap` and stops the parent.
fn boot_and_snapshot(config: VmConfig, log: &Path, dir: &Path) -> PathBuf {
    let parent = start_worker(config);
    assert!(wait_for_console(log, USERSPACE_MARKER, BOOT_TIMEOUT), "guest never reached userspace:\n{}", console(log));
    parent.pause().unwrap();
    let snap = dir.join("snap");
    parent.snapshot(&snap, false).unwrap();
    parent.stop().unwrap();
    snap
}

#[test]
fn restored_linux_guest_keeps_running_to_its_reboot() {
    let Some(guest) = test_guest(TestInit::lingering(GUEST_LINGER)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (config, log) = linux_config(&guest, tmp.path(), None);
    let snap = boot_and_snapshot(config, &log, tmp.path());
    let parent_console = console(&log);
    assert!(
        !parent_console.contains("reboot: Restarting system"),
        "the parent rebooted before the snapshot:\n{parent_console}"
    );

    let restored_log = tmp.path().join("restored.log");
    let overrides = RestoreOverrides { serial_log: Some(restored_log.clone()), ..Default::default() };
    // kvm-clock continues from the saved value, not from the host time that passed meanwhile.
    std::thread::sleep(PAUSED_TIME);
    let restored = WorkerHandle::restore(Path::new(WORKER_EXE), &snap, overrides).unwrap();
    let at_restore = tmp.path().join("at_restore");
    restored.snapshot(&at_restore, false).unwrap();
    let saved_ns = load_snapshot(&snap).unwrap().state.machine.vm.clock.clock;
    let restored_ns = load_snapshot(&at_restore).unwrap().state.machine.vm.clock.clock;
    let advanced = Duration::from_nanos(restored_ns.saturating_sub(saved_ns));
    assert!(
        restored_ns >= saved_ns && advanced < PAUSED_TIME / 2,
        "kvm-clock went from {saved_ns} to {restored_ns} ns across a {PAUSED_TIME:?} pause"
    );
    restored.start().unwrap();
    let event = restored.wait_event(BOOT_TIMEOUT);
    let after = console(&restored_log);
    assert_eq!(
        event,
        Some(WorkerEvent::Vm(VmEvent::Reset { source: ResetSource::I8042 })),
        "parent console:\n{parent_console}\nrestored console:\n{after}"
    );
    assert!(
        !after.is_empty() && !after.contains("Linux version"),
        "the restored guest printed nothing new or booted afresh:\n{after}"
    );
    restored.stop().unwrap();
}

#[test]
fn vsock_guest_gets_a_transport_reset_and_host_reconnects_after_restore() {
    let Some(guest) = test_guest(TestInit::lingering(GUEST_LINGER)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let parent_uds = tmp.path().join("parent.sock");
    let (config, log) = linux_config(&guest, tmp.path(), Some(parent_uds.clone()));
    let parent = start_worker(config);
    assert!(
        wait_for_console(&log, USERSPACE_MARKER, BOOT_TIMEOUT),
        "guest never reached userspace:\n{}",
        console(&log)
    );
    // A host connection the parent's muxer holds when the snapshot is taken.
    let mut stale = UnixStream::connect(&parent_uds).unwrap();
    stale.write_all(b"CONNECT 4321\n").unwrap();
    parent.pause().unwrap();
    let snap = tmp.path().join("snap");
    parent.snapshot(&snap, false).unwrap();
    parent.stop().unwrap();
    let saved = load_snapshot(&snap).unwrap();
    let saved_events = vsock_event_queue(&saved.state.machine);
    assert!(saved_events.ready, "the guest driver set up the event queue");

    let restored_uds = tmp.path().join("restored.sock");
    let restored_log = tmp.path().join("restored.log");
    let overrides = RestoreOverrides {
        vsock_uds: Some(restored_uds.clone()),
        serial_log: Some(restored_log.clone()),
        disks: Vec::new(),
        net_socket: None,
        undo_logs: None,
    };
    let restored = WorkerHandle::restore(Path::new(WORKER_EXE), &snap, overrides).unwrap();
    // The connection to the old process is gone.
    stale.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    assert!(stale.read_to_end(&mut rest).is_ok() && rest.is_empty());

    // The host reconnects on the fork's own socket; the guest kernel answers (it refuses the
    // closed port, which proves the driver still works after the reset).
    let mut host = UnixStream::connect(&restored_uds).unwrap();
    host.write_all(b"CONNECT 4321\n").unwrap();
    host.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    restored.start().unwrap();
    let mut reply = Vec::new();
    let read = host.read_to_end(&mut reply);
    assert!(read.is_ok(), "no answer from the restored guest: {read:?}");
    assert!(reply.is_empty(), "guest accepted a closed port: {reply:?}");

    // The guest consumed the transport-reset event: the event queue moved on by one.
    restored.pause().unwrap();
    let later = tmp.path().join("later");
    restored.snapshot(&later, false).unwrap();
    let after = load_snapshot(&later).unwrap();
    let events = vsock_event_queue(&after.state.machine);
    assert_eq!(
        events.next_used,
        saved_events.next_used.wrapping_add(1),
        "no transport reset reached the guest's event queue"
    );
    restored.stop().unwrap();
}
