//! Builds a [`MicroVm`], the one recipe file: [`build_microvm_for_boot`] turns a [`VmConfig`]
//! into a VM that boots Linux, [`build_microvm_from_snapshot`] turns a snapshot directory into
//! a VM that continues where it was saved. Each is a short list of `attach_*`/`setup_*`/
//! `restore_*` steps, and the steps both need are written once here. It owns the order of setup
//! and the device layout (ports, MMIO windows, GSIs); it never runs the guest, and never reads
//! or writes snapshot files itself (`snapshot` does).

use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{SERIAL_GSI, SERIAL_PORT_BASE};
use crate::arch::x86_64::{mptable, regs};
use crate::boot::{self, LoadedKernel};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{
    I8042Args, I8042Error, ResetControl, StopRequest, I8042, I8042_DATA_PORT, I8042_KBD_GSI, I8042_PORT_COUNT,
    RESET_CONTROL_PORT,
};
use crate::devices::legacy::serial::{SerialDevice, SerialError, SerialLog, SERIAL_PORT_COUNT};
use crate::devices::legacy::{LegacyDevices, LegacyDevicesState};
use crate::host;
use crate::microvm::{MachineState, MicroVm, MicroVmParts};
use crate::persist::Persist;
use crate::snapshot::{load_snapshot, SnapshotError, SnapshotRef};
use crate::virtio_wiring::{self, VirtioDevices, VirtioWiringError};
use crate::vstate::memory::{create_guest_memory, map_snapshot_memory, GuestMemoryBacking, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vcpu_state::VcpuStateError;
use crate::vstate::vm::{Vm, VmError, PVM_GUEST_CMDLINE_QUIRKS};

pub use crate::snapshot::RestoreOverrides;

/// Bytes per MiB.
const BYTES_PER_MIB: u64 = 1 << 20;

/// Boot choices that are not part of the VM's description.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootOptions {
    /// Start every vCPU at the kernel entry (for bare payloads) instead of leaving APs waiting
    /// for INIT/SIPI from the boot vCPU (what Linux expects).
    pub all_vcpus_at_entry: bool,
}

/// Why a VM could not be built (booted or restored).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM config")]
    Config(#[from] ConfigError),
    #[error("creating the KVM VM")]
    Vm(#[from] VmError),
    #[error("creating guest memory")]
    Memory(#[from] MemoryError),
    #[error("loading the kernel")]
    Boot(#[from] boot::BootError),
    #[error("writing boot page tables and GDT")]
    Regs(#[from] regs::RegsError),
    #[error("writing the MP table")]
    Mptable(#[from] mptable::MptableError),
    #[error("creating the serial console")]
    Serial(#[from] SerialError),
    #[error("placing a device on the bus")]
    Bus(#[from] BusError),
    #[error("creating an interrupt eventfd for a legacy device")]
    EventFd(#[source] std::io::Error),
    #[error("attaching virtio devices")]
    Virtio(#[from] VirtioWiringError),
    #[error("configuring vCPUs")]
    Vcpu(#[from] VcpuError),
    #[error("reading the snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("mapping snapshot memory")]
    MapSnapshot(#[source] MemoryError),
    #[error("restoring vCPU state")]
    VcpuState(#[from] VcpuStateError),
    #[error("restoring the serial console")]
    RestoreSerial(#[source] SerialError),
    #[error("restoring the i8042 or the reset-control register")]
    RestoreI8042(#[source] I8042Error),
    #[error("restoring virtio devices")]
    RestoreVirtio(#[source] VirtioWiringError),
}

/// Builds a VM that boots Linux per `config` ([`build_microvm_for_boot`] with default options).
pub fn build_microvm(config: &VmConfig) -> Result<MicroVm, BuildError> {
    build_microvm_for_boot(config, BootOptions::default())
}

/// Builds a VM per `config` that boots from its kernel entry; not started.
pub fn build_microvm_for_boot(config: &VmConfig, options: BootOptions) -> Result<MicroVm, BuildError> {
    config.validate()?;
    let vm = Vm::new()?;
    let memory = create_guest_memory(config.mem_mib * BYTES_PER_MIB)?;
    vm.register_memory(&memory.memory)?;
    vm.setup_irqchip()?;

    let kernel = boot::load_kernel(&memory.memory, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&memory.memory, path, kernel.kernel_end)?),
        None => None,
    };

    let serial = match &config.serial_log {
        Some(path) => SerialLog::to_file(path)?,
        None => SerialLog::in_memory(),
    };
    let legacy = create_legacy_devices(serial)?;
    let pio = attach_legacy_devices(&vm, &legacy)?;

    let mut mmio = Bus::new();
    let mut cmdline = config.cmdline.clone();
    if host::is_pvm() {
        append_missing_params(&mut cmdline, PVM_GUEST_CMDLINE_QUIRKS);
    }
    let virtio = virtio_wiring::attach_virtio_devices(&vm, &memory.memory, config, &mut mmio, &mut cmdline)?;

    boot::write_boot_params(&memory.memory, &cmdline, initrd)?;
    regs::write_boot_tables(&memory.memory)?;
    mptable::setup_mptable(&memory.memory, config.vcpus)?;
    let vcpus = create_boot_vcpus(&vm, config.vcpus, kernel, options)?;

    Ok(assemble(vm, memory, vcpus, (pio, legacy), mmio, virtio, config.clone()))
}

/// Builds a VM from the snapshot at `dir` with `overrides` applied (not started:
/// [`MicroVm::start`] resumes the guest where it was saved). Memory is mapped copy-on-write;
/// dirty tracking is on, so the returned [`SnapshotRef`] can parent an incremental snapshot.
/// Nothing runs unless every part of the state was accepted.
pub fn build_microvm_from_snapshot(
    dir: &Path,
    overrides: &RestoreOverrides,
) -> Result<(MicroVm, SnapshotRef), BuildError> {
    let loaded = load_snapshot(dir)?;
    let state = &loaded.state;
    let config = overrides.apply(&state.config)?;
    let machine = &state.machine;

    let vm = Vm::new()?;
    let memory = map_snapshot_memory(loaded.base, state.mem_bytes, &loaded.layers).map_err(BuildError::MapSnapshot)?;
    // Registered with dirty logging from the start: switching it on later costs milliseconds.
    vm.set_dirty_logging(&memory.memory, true)?;
    vm.setup_irqchip()?;
    let vcpus = restore_kvm_state(&vm, machine)?;

    // Devices last: restoring them may raise interrupts, which must land in the restored
    // irqchip and LAPICs.
    let serial = match &config.serial_log {
        Some(path) => SerialLog::append_to_file(path).map_err(BuildError::RestoreSerial)?,
        None => SerialLog::in_memory(),
    };
    let legacy = restore_legacy_devices(serial, &machine.legacy)?;
    let pio = attach_legacy_devices(&vm, &legacy)?;
    let mut mmio = Bus::new();
    let virtio = virtio_wiring::restore_virtio_devices(&vm, &memory.memory, &config, &mut mmio, &machine.virtio)
        .map_err(BuildError::RestoreVirtio)?;

    let mut microvm = assemble(vm, memory, vcpus, (pio, legacy), mmio, virtio, config);
    microvm.assume_dirty_tracking();
    let dir = std::fs::canonicalize(&loaded.dir).unwrap_or(loaded.dir);
    Ok((microvm, SnapshotRef { dir, crc: loaded.crc, depth: loaded.layers.len() }))
}

/// Appends each of `params` that `cmdline` does not already have.
fn append_missing_params(cmdline: &mut String, params: &[&str]) {
    for param in params {
        if !cmdline.split_whitespace().any(|p| p == *param) {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(param);
        }
    }
}

/// The port-I/O devices of a VM, the console log they write to and the line they ask the
/// vCPUs to stop on, with the keyboard's interrupt eventfd (the serial one is the UART's own).
struct Legacy {
    devices: LegacyDevices,
    serial: Arc<SerialLog>,
    stop_request: Arc<StopRequest>,
    kbd_irq: EventFd,
}

/// COM1 writing to `serial`, the i8042 and the reset-control register, in their power-on state.
fn create_legacy_devices(serial: Arc<SerialLog>) -> Result<Legacy, BuildError> {
    let stop_request = Arc::new(StopRequest::default());
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let i8042 = I8042::new(stop_request.clone()).with_kbd_irq(kbd_irq.try_clone().map_err(BuildError::EventFd)?);
    let devices = LegacyDevices {
        serial: Arc::new(Mutex::new(SerialDevice::new(serial.clone())?)),
        i8042: Arc::new(Mutex::new(i8042)),
        reset_control: Arc::new(Mutex::new(ResetControl::new(stop_request.clone()))),
    };
    Ok(Legacy { devices, serial, stop_request, kbd_irq })
}

/// The same devices in their `saved` state, COM1 writing to `serial`.
fn restore_legacy_devices(serial: Arc<SerialLog>, saved: &LegacyDevicesState) -> Result<Legacy, BuildError> {
    let stop_request = Arc::new(StopRequest::default());
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let args =
        I8042Args { stop: stop_request.clone(), kbd_irq: Some(kbd_irq.try_clone().map_err(BuildError::EventFd)?) };
    let devices = LegacyDevices {
        serial: Arc::new(Mutex::new(
            SerialDevice::restore(serial.clone(), &saved.serial).map_err(BuildError::RestoreSerial)?,
        )),
        i8042: Arc::new(Mutex::new(I8042::restore(args, &saved.i8042).map_err(BuildError::RestoreI8042)?)),
        reset_control: Arc::new(Mutex::new(
            ResetControl::restore(stop_request.clone(), &saved.reset_control).map_err(BuildError::RestoreI8042)?,
        )),
    };
    Ok(Legacy { devices, serial, stop_request, kbd_irq })
}

/// Wires COM1 to IRQ 4 and the keyboard to IRQ 1 (irqfds) and places COM1, the i8042 and the
/// 0xcf9 register on a new port-I/O bus.
fn attach_legacy_devices(vm: &Vm, legacy: &Legacy) -> Result<Bus, BuildError> {
    let devices = &legacy.devices;
    let mut pio = Bus::new();
    vm.register_irqfd(devices.serial.lock().unwrap_or_else(|p| p.into_inner()).interrupt_evt(), SERIAL_GSI)?;
    vm.register_irqfd(&legacy.kbd_irq, I8042_KBD_GSI)?;
    pio.insert(devices.serial.clone(), u64::from(SERIAL_PORT_BASE), u64::from(SERIAL_PORT_COUNT))?;
    pio.insert(devices.i8042.clone(), u64::from(I8042_DATA_PORT), u64::from(I8042_PORT_COUNT))?;
    pio.insert(devices.reset_control.clone(), u64::from(RESET_CONTROL_PORT), 1)?;
    Ok(pio)
}

/// Creates and configures `count` vCPUs entering at the kernel entry point.
fn create_boot_vcpus(vm: &Vm, count: u8, kernel: LoadedKernel, options: BootOptions) -> Result<Vec<Vcpu>, BuildError> {
    let supported = vm.supported_cpuid()?;
    (0..count)
        .map(|index| {
            let fd = vm.create_vcpu(index)?;
            Ok(Vcpu::configure(fd, index, count, &supported, kernel.entry.0, options.all_vcpus_at_entry)?)
        })
        .collect()
}

/// Creates the saved vCPUs and writes the VM-wide and per-vCPU KVM state into them, in the
/// order `snapshot/NOTES.md` gives: irqchip, PIT and clock, then each vCPU. State this host
/// cannot take is refused before anything is written.
fn restore_kvm_state(vm: &Vm, machine: &MachineState) -> Result<Vec<Vcpu>, BuildError> {
    let caps = vm.host_caps();
    for saved in &machine.vcpus {
        saved.check_host(&caps)?;
    }
    let mut vcpus = Vec::with_capacity(machine.vcpus.len());
    for saved in &machine.vcpus {
        vcpus.push(Vcpu { fd: vm.create_vcpu(saved.index)?, index: saved.index });
    }
    vm.restore_state(&machine.vm)?;
    for (vcpu, saved) in vcpus.iter().zip(&machine.vcpus) {
        saved.restore(&vcpu.fd, &caps)?;
    }
    Ok(vcpus)
}

/// The last step of both recipes: hands every part to [`MicroVm::from_parts`].
fn assemble(
    vm: Vm,
    memory: GuestMemoryBacking,
    vcpus: Vec<Vcpu>,
    (pio, legacy): (Bus, Legacy),
    mmio: Bus,
    virtio: VirtioDevices,
    config: VmConfig,
) -> MicroVm {
    MicroVm::from_parts(MicroVmParts {
        vm,
        memory,
        vcpus,
        pio,
        mmio,
        stop_request: legacy.stop_request,
        serial: legacy.serial,
        legacy: legacy.devices,
        virtio,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_appended_once() {
        let mut cmdline = String::from("console=ttyS0 nopcid");
        append_missing_params(&mut cmdline, &["nopcid", "noinvpcid"]);
        assert_eq!(cmdline, "console=ttyS0 nopcid noinvpcid");
        let mut empty = String::new();
        append_missing_params(&mut empty, &["a"]);
        assert_eq!(empty, "a");
    }
}
