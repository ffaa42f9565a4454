//! Boots the project's guest kernel (the current image's) in-process with the test guest's
//! root disk, and checks that userspace prints and the guest's reboot (or a panic) comes back
//! as the right event.

mod common;

use std::time::{Duration, Instant};

use capsule_vmm::{build_microvm, DiskConfig, VmConfig, VmEvent, VsockConfig};
use common::{image_kernel, test_guest, TestInit, INIT_MARKER};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn the_guest_kernel_reaches_userspace_and_reboots() {
    let Some(guest) = test_guest(TestInit::REBOOT) else {
        return;
    };
    let mut config = guest.config();
    config.mem_mib = 512;
    let started = Instant::now();
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let reached = vm.serial().wait_for(INIT_MARKER.as_bytes(), BOOT_TIMEOUT);
    let to_userspace = started.elapsed();
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert!(reached, "no {INIT_MARKER:?} on serial; console tail:\n{tail}");
    assert!(matches!(event, Some(VmEvent::Reset { .. })), "event {event:?}; console tail:\n{tail}");
    eprintln!("boot to userspace: {} ms", to_userspace.as_millis());
}

/// A 2 GiB guest: RAM ends exactly at the 2 GiB boundary (`initrd_addr_max + 1`), where the
/// kernel's early allocations land.
#[test]
fn a_2048_mib_guest_reaches_userspace() {
    let Some(guest) = test_guest(TestInit::REBOOT) else {
        return;
    };
    let mut config = guest.config();
    config.mem_mib = 2048;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let reached = vm.serial().wait_for(INIT_MARKER.as_bytes(), BOOT_TIMEOUT);
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert!(reached, "no {INIT_MARKER:?} on serial; console tail:\n{tail}");
    assert!(matches!(event, Some(VmEvent::Reset { .. })), "event {event:?}; console tail:\n{tail}");
}

#[test]
fn the_guest_kernel_finds_both_disks_vsock_and_rng() {
    let Some(guest) = test_guest(TestInit::REBOOT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.img");
    let scratch = dir.path().join("scratch.img");
    std::fs::write(&root, vec![0u8; 4 << 20]).unwrap();
    std::fs::write(&scratch, vec![0u8; 8 << 20]).unwrap();
    let disks = vec![
        DiskConfig { path: root, read_only: true, undo_log: false },
        DiskConfig { path: scratch, read_only: false, undo_log: false },
    ];
    let mut config = guest.config_with_disks(disks, "");
    config.mem_mib = 256;
    config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: dir.path().join("vsock.sock") });
    config.rng = true;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let reached = vm.serial().wait_for(INIT_MARKER.as_bytes(), BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert!(reached, "console tail:\n{tail}");
    // 4 MiB = 8192 sectors, read-only; 8 MiB = 16384 sectors.
    assert!(tail.contains("[vda] 8192 512-byte logical blocks"), "console tail:\n{tail}");
    assert!(tail.contains("[vdb] 16384 512-byte logical blocks"), "console tail:\n{tail}");
    assert!(dir.path().join("vsock.sock").exists(), "vsock host socket not bound");
}

#[test]
fn a_kernel_panic_is_reported_as_panic_not_reset() {
    let Some(kernel) = image_kernel() else {
        return;
    };
    // No root device: the kernel panics ("VFS: Unable to mount root fs"), and panic=-1
    // reboot=k turns that into an immediate i8042 reset.
    let mut config = VmConfig::new(kernel, "console=ttyS0 panic=-1 reboot=k");
    config.mem_mib = 128;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert_eq!(event, Some(VmEvent::Panic), "console tail:\n{tail}");
    assert!(tail.contains("Kernel panic"), "console tail:\n{tail}");
}

#[test]
fn an_init_that_exits_is_reported_as_panic_not_reset() {
    let Some(guest) = test_guest(TestInit::EXIT) else {
        return;
    };
    // PID 1 exiting panics the kernel ("Attempted to kill init"); panic=-1 reboot=k resets.
    let mut config = guest.config();
    config.mem_mib = 128;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let event = vm.wait_event(BOOT_TIMEOUT);
    vm.stop();
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert_eq!(event, Some(VmEvent::Panic), "console tail:\n{tail}");
    assert!(tail.contains(INIT_MARKER) && tail.contains("Attempted to kill init"), "console tail:\n{tail}");
}

#[test]
fn a_panic_that_does_not_reboot_stops_the_vm_at_once() {
    let Some(kernel) = image_kernel() else {
        return;
    };
    // panic=0: the kernel prints "---[ end Kernel panic" and spins forever, as it does for any
    // panic before `panic=` is parsed. The VM must stop and say so, not wait for a timeout.
    let mut config = VmConfig::new(kernel, "console=ttyS0 panic=0");
    config.mem_mib = 128;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let event = vm.wait_event(BOOT_TIMEOUT);
    let tail = String::from_utf8_lossy(&vm.serial().tail()).into_owned();
    assert_eq!(event, Some(VmEvent::Panic), "console tail:\n{tail}");
    assert!(tail.contains("---[ end Kernel panic"), "console tail:\n{tail}");
    vm.stop();
}
