//! Builds a [`MicroVm`] from a [`VmConfig`]: a recipe of `attach_*`/`setup_*` steps. It owns the
//! order of setup and the device layout (ports, MMIO windows, GSIs); it never runs the guest.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{SERIAL_GSI, SERIAL_PORT_BASE};
use crate::arch::x86_64::{mptable, regs};
use crate::boot::{self, LoadedKernel};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{
    ResetControl, StopRequest, I8042, I8042_DATA_PORT, I8042_KBD_GSI, I8042_PORT_COUNT, RESET_CONTROL_PORT,
};
use crate::devices::legacy::serial::{SerialDevice, SerialError, SerialLog, SERIAL_PORT_COUNT};
use crate::host;
use crate::microvm::{MicroVm, MicroVmParts};
use crate::virtio_wiring::{self, VirtioWiringError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError, PVM_GUEST_CMDLINE_QUIRKS};

/// Bytes per MiB.
const BYTES_PER_MIB: u64 = 1 << 20;

/// Boot choices that are not part of the VM's description.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootOptions {
    /// Start every vCPU at the kernel entry (for bare payloads) instead of leaving APs waiting
    /// for INIT/SIPI from the boot vCPU (what Linux expects).
    pub all_vcpus_at_entry: bool,
}

/// Why a VM could not be built.
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
}

/// Builds a VM that boots Linux per `config`.
pub fn build_microvm(config: &VmConfig) -> Result<MicroVm, BuildError> {
    build_microvm_with(config, BootOptions::default())
}

/// Builds a VM per `config` with explicit boot options.
pub fn build_microvm_with(config: &VmConfig, options: BootOptions) -> Result<MicroVm, BuildError> {
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
    let stop_request = Arc::new(StopRequest::default());
    let mut pio = Bus::new();
    let (uart, irq) = SerialDevice::new(serial.clone())?;
    let serial_device = attach_legacy_devices(&vm, &mut pio, uart, irq, &stop_request)?;

    let mut mmio = Bus::new();
    let mut cmdline = config.cmdline.clone();
    if host::is_pvm() {
        append_missing_params(&mut cmdline, PVM_GUEST_CMDLINE_QUIRKS);
    }
    let virtio = virtio_wiring::attach_virtio_devices(&vm, &memory.memory, config, &mut mmio, &mut cmdline, None)?;

    boot::write_boot_params(&memory.memory, &cmdline, initrd)?;
    regs::write_boot_tables(&memory.memory)?;
    mptable::setup_mptable(&memory.memory, config.vcpus)?;
    let vcpus = create_vcpus(&vm, config.vcpus, kernel, options)?;

    Ok(MicroVm::from_parts(MicroVmParts {
        vm,
        memory,
        vcpus,
        pio,
        mmio,
        stop_request,
        serial,
        serial_device,
        virtio,
        config: config.clone(),
    }))
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

/// COM1 (`uart`, raising `irq`) on IRQ 4, the i8042 (keyboard on IRQ 1) and the 0xcf9 reset
/// register.
pub(crate) fn attach_legacy_devices(
    vm: &Vm,
    pio: &mut Bus,
    uart: SerialDevice,
    irq: EventFd,
    stop_request: &Arc<StopRequest>,
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    vm.register_irqfd(&irq, SERIAL_GSI)?;
    let uart = Arc::new(Mutex::new(uart));
    pio.insert(uart.clone(), u64::from(SERIAL_PORT_BASE), u64::from(SERIAL_PORT_COUNT))?;
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_GSI)?;
    let kbd = I8042::new(stop_request.clone()).with_kbd_irq(kbd_irq.try_clone().map_err(BuildError::EventFd)?);
    pio.insert(Arc::new(Mutex::new(kbd)), u64::from(I8042_DATA_PORT), u64::from(I8042_PORT_COUNT))?;
    pio.insert(Arc::new(Mutex::new(ResetControl::new(stop_request.clone()))), u64::from(RESET_CONTROL_PORT), 1)?;
    // The irqfds stay registered with KVM; the devices keep their own clones of the eventfds.
    drop(irq);
    drop(kbd_irq);
    Ok(uart)
}

/// Creates and configures `count` vCPUs entering at the kernel entry point.
fn create_vcpus(vm: &Vm, count: u8, kernel: LoadedKernel, options: BootOptions) -> Result<Vec<Vcpu>, BuildError> {
    let supported = vm.supported_cpuid()?;
    (0..count)
        .map(|index| {
            let fd = vm.create_vcpu(index)?;
            Ok(Vcpu::configure(fd, index, count, &supported, kernel.entry.0, options.all_vcpus_at_entry)?)
        })
        .collect()
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
