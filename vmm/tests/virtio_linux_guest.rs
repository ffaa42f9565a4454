//! The virtio devices under real Linux drivers: the project's guest kernel boots
//! with a virtio-blk disk and virtio-rng on virtio-mmio and its console shows
//! the disk probed with the right capacity; with virtio-vsock, a host
//! `CONNECT` to a guest port nobody listens on is refused by the guest kernel
//! (REQUEST delivered on RX, the guest's RST parsed from TX).

mod common;

use std::time::Duration;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use capsule_vmm::config::DiskConfig;
use capsule_vmm::{build_microvm, VmEvent, VsockConfig};
use common::{test_guest, TestInit};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SECTORS: u64 = 2048;
/// How long the vsock test's guest runs after reaching userspace.
const GUEST_LINGER: Duration = Duration::from_secs(1);

#[test]
fn linux_probes_virtio_blk_disk_with_its_capacity() {
    let Some(guest) = test_guest(TestInit::REBOOT) else {
        return;
    };
    let disk = tempfile::NamedTempFile::new().expect("disk file");
    disk.as_file().set_len(DISK_SECTORS * 512).expect("size disk");
    let mut config = guest
        .config_with_disks(vec![DiskConfig { path: disk.path().to_path_buf(), read_only: true, undo_log: false }], "");
    config.mem_mib = 256;
    config.rng = true;
    let mut vm = build_microvm(&config).expect("build VM");
    vm.start().expect("start VM");
    let probed = vm.serial().wait_for(b"logical blocks", BOOT_TIMEOUT);
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert!(probed, "virtio-blk never probed; console tail:\n{tail}");
    assert!(
        tail.contains(&format!("[vda] {DISK_SECTORS} 512-byte logical blocks")),
        "wrong disk size; console tail:\n{tail}"
    );
    assert!(!tail.contains("virtio_mmio: probe of"), "a virtio-mmio probe failed:\n{tail}");
    assert!(matches!(event, Some(VmEvent::Reset { .. })), "event {event:?}; console tail:\n{tail}");
}

#[test]
fn linux_guest_refuses_host_connect_to_closed_vsock_port() {
    // The guest stays up a moment after userspace starts, so its kernel has time to refuse the
    // connection before the reboot.
    let Some(guest) = test_guest(TestInit::lingering(GUEST_LINGER)) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let mut config = guest.config();
    config.mem_mib = 256;
    config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: uds.clone() });
    let mut vm = build_microvm(&config).expect("build VM");
    // The listener exists before the guest runs; the REQUEST waits for the driver.
    let mut host = UnixStream::connect(&uds).expect("connect to vsock socket");
    host.write_all(b"CONNECT 4321\n").expect("CONNECT");
    // Before the guest runs, the device holds the connection open (a
    // malformed CONNECT would already be closed here).
    std::thread::sleep(Duration::from_millis(300));
    host.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let early = host.read(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "host stream answered before the guest ran: {early:?}"
    );
    host.set_nonblocking(false).expect("blocking");
    host.set_read_timeout(Some(BOOT_TIMEOUT)).expect("timeout");
    vm.start().expect("start VM");
    let mut reply = Vec::new();
    let read = host.read_to_end(&mut reply);
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert!(read.is_ok(), "no answer from the guest ({read:?}); console tail:\n{tail}");
    assert!(reply.is_empty(), "guest accepted a port nobody listens on: {:?}", String::from_utf8_lossy(&reply));
    assert!(matches!(event, Some(VmEvent::Reset { .. })), "event {event:?}; console tail:\n{tail}");
}
