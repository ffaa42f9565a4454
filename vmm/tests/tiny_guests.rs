//! Real-KVM tests with hand-assembled guests that enter through the same boot path as Linux
//! (ELF load, zero page, our page tables, GDT and registers).

mod common;

use std::time::Duration;

use capsule_vmm::devices::legacy::i8042::ResetSource;
use capsule_vmm::snapshot::{save_snapshot, SnapshotError};
use capsule_vmm::{build_microvm, build_microvm_for_boot, BootOptions, MicroVmError, RunState, VmConfig, VmEvent};
use common::{asm, elf_payload, kvm_usable, COUNTER_ADDR};
use vm_memory::{Bytes, GuestAddress};

const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn config_for(kernel: &std::path::Path) -> VmConfig {
    let mut config = VmConfig::new(kernel, "");
    config.mem_mib = 64;
    config
}

#[test]
fn guest_in_long_mode_writes_serial_reads_zero_page_and_resets() {
    if !kvm_usable() {
        return;
    }
    let mut code = asm::DX_COM1.to_vec();
    code.extend(asm::out_bytes(b"Hi"));
    // mov al, [rsi + 0x1fe] (boot_flag low byte, 0x55); out dx, al
    code.extend([0x8a, 0x86, 0xfe, 0x01, 0x00, 0x00, asm::OUT_DX_AL]);
    code.extend(asm::RESET_I8042);
    code.extend(asm::HALT_FOREVER);
    let payload = elf_payload(&code);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut config = config_for(payload.path());
    config.serial_log = Some(log.clone());
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    let event = vm.wait_event(EVENT_TIMEOUT);
    assert_eq!(event, Some(VmEvent::Reset { source: ResetSource::I8042 }));
    assert_eq!(vm.state(), RunState::Stopped);
    vm.stop();
    assert_eq!(vm.serial().tail(), b"Hi\x55");
    assert_eq!(std::fs::read(&log).unwrap(), b"Hi\x55");
}

#[test]
fn unmapped_mmio_reads_all_ones() {
    if !kvm_usable() {
        return;
    }
    // mov ebx, 0xd8000000; mov eax, [rbx]; out dx, al (low byte); reset
    let mut code = asm::DX_COM1.to_vec();
    code.extend([0xbb, 0x00, 0x00, 0x00, 0xd8, 0x8b, 0x03, asm::OUT_DX_AL]);
    code.extend(asm::RESET_I8042);
    let payload = elf_payload(&code);
    let mut vm = build_microvm(&config_for(payload.path())).unwrap();
    vm.start().unwrap();
    assert!(matches!(vm.wait_event(EVENT_TIMEOUT), Some(VmEvent::Reset { .. })));
    assert_eq!(vm.serial().tail(), [0xff]);
}

#[test]
fn mmio_read_reaches_the_virtio_transport_on_the_bus() {
    if !kvm_usable() {
        return;
    }
    // mov ebx, 0xd0000000; mov eax, [rbx]; then out al; shr eax, 8 (x4): the magic, LE bytes
    let mut code = asm::DX_COM1.to_vec();
    code.extend([0xbb, 0x00, 0x00, 0x00, 0xd0, 0x8b, 0x03]);
    for _ in 0..4 {
        code.extend([asm::OUT_DX_AL, 0xc1, 0xe8, 0x08]);
    }
    code.extend(asm::RESET_I8042);
    let payload = elf_payload(&code);
    let mut config = config_for(payload.path());
    config.rng = true;
    let mut vm = build_microvm(&config).unwrap();
    vm.start().unwrap();
    assert!(matches!(vm.wait_event(EVENT_TIMEOUT), Some(VmEvent::Reset { .. })));
    assert_eq!(vm.serial().tail(), 0x7472_6976u32.to_le_bytes(), "virtio-mmio magic \"virt\"");
}

#[test]
fn ud2_without_idt_is_a_triple_fault() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&[0x0f, 0x0b]);
    let mut vm = build_microvm(&config_for(payload.path())).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait_event(EVENT_TIMEOUT), Some(VmEvent::TripleFault { vcpu: 0 }));
}

fn read_counter(vm: &capsule_vmm::MicroVm) -> u64 {
    vm.memory().read_obj::<u64>(GuestAddress(COUNTER_ADDR)).unwrap()
}

/// Waits (up to the event timeout, the host may be busy) until the counter exceeds `floor`.
fn counter_passes(vm: &capsule_vmm::MicroVm, floor: u64) -> bool {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if read_counter(vm) > floor {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A started guest that increments the counter at COUNTER_ADDR forever, seen running; `None`
/// where KVM is not usable.
fn running_counter_guest() -> Option<capsule_vmm::MicroVm> {
    if !kvm_usable() {
        return None;
    }
    // loop: inc qword [COUNTER_ADDR]; jmp loop
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];
    let payload = elf_payload(&code);
    let mut vm = build_microvm(&config_for(payload.path())).unwrap();
    vm.start().unwrap();
    assert!(counter_passes(&vm, 0), "the guest never ran");
    Some(vm)
}

#[test]
fn paused_guest_counter_stands_still_and_resumes() {
    let Some(mut vm) = running_counter_guest() else {
        return;
    };
    vm.pause().unwrap();
    assert_eq!(vm.state(), RunState::Paused);
    let paused_at = read_counter(&vm);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read_counter(&vm), paused_at, "counter moved while paused");
    vm.resume().unwrap();
    assert_eq!(vm.state(), RunState::Running);
    assert!(counter_passes(&vm, paused_at), "counter did not move after resume");
    vm.stop();
    assert_eq!(vm.state(), RunState::Stopped);
    assert!(vm.pause().is_err());
}

#[test]
fn a_pause_that_times_out_resumes_the_guest_and_refuses_to_save() {
    let Some(mut vm) = running_counter_guest() else {
        return;
    };
    // With no time allowed, the vCPU is still in KVM_RUN when the deadline passes (a rare
    // pause that wins the race just gets undone and retried).
    let mut timed_out = false;
    for _ in 0..100 {
        match vm.pause_within(Duration::ZERO) {
            Err(MicroVmError::PauseTimeout) => {
                timed_out = true;
                break;
            }
            Ok(()) => vm.resume().unwrap(),
            Err(e) => panic!("pause failed otherwise: {e}"),
        }
    }
    assert!(timed_out, "a zero-time pause never timed out");
    assert!(!vm.is_saveable(), "a VM whose pause timed out counts as saveable");
    assert_eq!(vm.state(), RunState::Running);
    let at = read_counter(&vm);
    assert!(counter_passes(&vm, at), "the guest stayed parked after its pause failed");
    let tmp = tempfile::tempdir().unwrap();
    match save_snapshot(&mut vm, &tmp.path().join("snap"), None) {
        Err(SnapshotError::Save(MicroVmError::NotPaused(RunState::Running))) => {}
        other => panic!("saving after a failed pause gave {other:?}"),
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "a refused save left files behind");
    // A pause with time to finish makes it saveable again.
    vm.pause().unwrap();
    assert!(vm.is_saveable());
    vm.stop();
}

#[test]
fn every_vcpu_runs_with_its_own_apic_id_and_pauses() {
    if !kvm_usable() {
        return;
    }
    // mov eax, 1; cpuid; shr ebx, 24; lea eax, [rbx + '0']; mov dx, 0x3f8; out dx, al; hlt
    let mut code = vec![0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0xc1, 0xeb, 0x18, 0x8d, 0x43, 0x30];
    code.extend(asm::DX_COM1);
    code.push(asm::OUT_DX_AL);
    code.extend(asm::HALT_FOREVER);
    let payload = elf_payload(&code);
    let mut config = config_for(payload.path());
    config.vcpus = 4;
    let mut vm = build_microvm_for_boot(&config, BootOptions { all_vcpus_at_entry: true }).unwrap();
    vm.start().unwrap();
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let mut seen = vm.serial().tail();
        seen.sort();
        if seen == b"0123" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "serial shows {:?}", String::from_utf8_lossy(&seen));
        std::thread::sleep(Duration::from_millis(10));
    }
    // All four are halted inside KVM_RUN now: pausing must still pull each one out.
    vm.pause().unwrap();
    vm.resume().unwrap();
    vm.stop();
    assert_eq!(vm.wait_event(Duration::from_millis(10)), None, "no guest exit happened");
}
