//! The integration point between the VMM core and the virtio device models in
//! `devices::virtio`: it creates each device, gives it an MMIO window and a GSI (irqfd), adds
//! it to the kernel command line and starts the device-event thread. Devices are numbered in
//! this order: disks (vda, vdb, ...), vsock, rng. It never implements device behaviour.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{
    MMIO_DEVICES_FIRST_GSI, MMIO_DEVICES_START, MMIO_DEVICE_WINDOW_BYTES,
};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::device::SharedDevice;
use crate::devices::virtio::event_loop::{DeviceEventLoop, EventLoopError};
use crate::devices::virtio::mmio::{kernel_cmdline_entry, MmioError, MmioTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig, VsockError};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};

/// Errors from attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioWiringError {
    #[error("opening disk {index} ({path})")]
    Disk {
        index: usize,
        path: std::path::PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("creating the interrupt eventfd of virtio device {index}")]
    EventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("registering the irqfd of virtio device {index}")]
    Irqfd {
        index: usize,
        #[source]
        source: VmError,
    },
    #[error("creating the MMIO transport of virtio device {index}")]
    Transport {
        index: usize,
        #[source]
        source: MmioError,
    },
    #[error("placing virtio device {index} on the MMIO bus")]
    Bus {
        index: usize,
        #[source]
        source: BusError,
    },
    #[error("starting the device-event thread")]
    EventLoop(#[source] EventLoopError),
    #[error("creating the vsock device on {path}")]
    Vsock {
        path: std::path::PathBuf,
        #[source]
        source: VsockError,
    },
}

/// Adapts the virtio-mmio transport to the bus.
struct MmioBusDevice(MmioTransport<GuestMemoryMmap>);

impl BusDevice for MmioBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// The guest address and GSI of virtio device `index`.
pub fn device_slot(index: usize) -> (u64, u32) {
    (
        MMIO_DEVICES_START + index as u64 * MMIO_DEVICE_WINDOW_BYTES,
        MMIO_DEVICES_FIRST_GSI + index as u32,
    )
}

/// Creates the devices `config` asks for, maps them and appends them to `cmdline`. Returns what
/// must live as long as the VM (the device-event thread).
pub fn attach_virtio_devices(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    mmio: &mut Bus,
    cmdline: &mut String,
) -> Result<Vec<Box<dyn std::any::Any + Send>>, VirtioWiringError> {
    let mut devices: Vec<SharedDevice<GuestMemoryMmap>> = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            disk_id: format!("capsule-vd{}", char::from(b'a' + (index % 26) as u8)),
        })
        .map_err(|source| VirtioWiringError::Disk {
            index,
            path: disk.path.clone(),
            source,
        })?;
        devices.push(Arc::new(Mutex::new(block)));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(VsockDeviceConfig {
            guest_cid: u64::from(vsock.guest_cid),
            uds_path: vsock.uds_path.clone(),
        })
        .map_err(|source| VirtioWiringError::Vsock {
            path: vsock.uds_path.clone(),
            source,
        })?;
        devices.push(Arc::new(Mutex::new(device)));
    }
    if config.rng {
        devices.push(Arc::new(Mutex::new(Rng::new())));
    }
    if devices.is_empty() {
        return Ok(Vec::new());
    }

    for (index, device) in devices.iter().enumerate() {
        let (base, gsi) = device_slot(index);
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|source| VirtioWiringError::EventFd { index, source })?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| VirtioWiringError::Irqfd { index, source })?;
        let transport = MmioTransport::new(memory.clone(), device.clone(), irq)
            .map_err(|source| VirtioWiringError::Transport { index, source })?;
        mmio.insert(
            Arc::new(Mutex::new(MmioBusDevice(transport))),
            base,
            MMIO_DEVICE_WINDOW_BYTES,
        )
        .map_err(|source| VirtioWiringError::Bus { index, source })?;
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&kernel_cmdline_entry(base, gsi));
    }
    let event_loop = DeviceEventLoop::start(devices).map_err(VirtioWiringError::EventLoop)?;
    Ok(vec![Box::new(event_loop)])
}
