//! The integration point between the VMM core and the virtio device models in
//! `devices::virtio`: it creates each device, gives it an MMIO window and a GSI (irqfd), adds
//! it to the kernel command line and starts the device-event thread. Devices are numbered in
//! this order: disks (vda, vdb, ...), vsock, rng. Booting attaches them fresh
//! ([`attach_virtio_devices`]); a restore rebuilds them from their saved state
//! ([`restore_virtio_devices`], [`VirtioDeviceState`]) at the same windows and GSIs. It never
//! implements device behaviour.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{MMIO_DEVICES_FIRST_GSI, MMIO_DEVICES_START, MMIO_DEVICE_WINDOW_BYTES};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::device::SharedDevice;
use crate::devices::virtio::event_loop::{DeviceEventLoop, EventLoopError};
use crate::devices::virtio::mmio::{kernel_cmdline_entry, MmioError, MmioState, MmioTransport};
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
    #[error("the snapshot has {saved} virtio devices but the VM config describes {configured}")]
    DeviceCount { saved: usize, configured: usize },
    #[error("virtio device {index} is {configured:?} but the snapshot saved {saved:?}")]
    DeviceMismatch { index: usize, saved: VirtioDeviceKind, configured: VirtioDeviceKind },
    #[error("restoring the MMIO transport of virtio device {index}")]
    RestoreTransport {
        index: usize,
        #[source]
        source: MmioError,
    },
}

/// What identifies a virtio device across a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceKind {
    /// A disk: its size must match on restore (the path may change).
    Block {
        bytes: u64,
        read_only: bool,
    },
    Vsock {
        guest_cid: u64,
    },
    Rng,
}

/// One virtio device in a snapshot: its kind and its transport/queue state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub kind: VirtioDeviceKind,
    pub transport: MmioState,
}

/// The attached virtio devices and their device-event thread.
#[derive(Default)]
pub struct VirtioDevices {
    devices: Vec<(VirtioDeviceKind, Arc<Mutex<MmioBusDevice>>)>,
    event_loop: Option<DeviceEventLoop>,
}

impl VirtioDevices {
    /// Every transport's state, in device order. Quiesce first ([`VirtioDevices::pause`]).
    pub fn save(&self) -> Vec<VirtioDeviceState> {
        self.devices
            .iter()
            .map(|(kind, transport)| VirtioDeviceState {
                kind: kind.clone(),
                transport: transport.lock().unwrap_or_else(|p| p.into_inner()).0.save(),
            })
            .collect()
    }

    /// Parks the device-event thread; true once parked (or when there is none).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.event_loop.as_ref().is_none_or(|l| l.pause(timeout))
    }

    /// Lets the device-event thread run again.
    pub fn resume(&self) {
        if let Some(l) = &self.event_loop {
            l.resume();
        }
    }
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
    (MMIO_DEVICES_START + index as u64 * MMIO_DEVICE_WINDOW_BYTES, MMIO_DEVICES_FIRST_GSI + index as u32)
}

/// Creates the devices `config` asks for, fresh, maps them and appends them to `cmdline`.
/// Returns what must live as long as the VM.
pub fn attach_virtio_devices(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    mmio: &mut Bus,
    cmdline: &mut String,
) -> Result<VirtioDevices, VirtioWiringError> {
    let created = create_devices(config)?;
    let mut attached = Vec::with_capacity(created.devices.len());
    for (index, (device, kind)) in created.devices.iter().zip(created.kinds).enumerate() {
        let (base, gsi) = device_slot(index);
        let transport = place_transport(vm, mmio, index, |irq| {
            MmioTransport::new(memory.clone(), device.clone(), irq)
                .map_err(|source| VirtioWiringError::Transport { index, source })
        })?;
        attached.push((kind, transport));
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&kernel_cmdline_entry(base, gsi));
    }
    start(created.devices, attached)
}

/// Rebuilds the devices `config` asks for, which must be the `saved` ones in order, each
/// transport from its saved state, at the same MMIO windows and GSIs. The guest parsed its
/// command line long ago, so nothing is added to one. The vsock device tells the guest its
/// connections are gone.
pub fn restore_virtio_devices(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    mmio: &mut Bus,
    saved: &[VirtioDeviceState],
) -> Result<VirtioDevices, VirtioWiringError> {
    let created = create_devices(config)?;
    check_saved_devices(saved, &created.kinds)?;
    let mut attached = Vec::with_capacity(created.devices.len());
    for (index, ((device, kind), state)) in created.devices.iter().zip(created.kinds).zip(saved).enumerate() {
        let transport = place_transport(vm, mmio, index, |irq| {
            MmioTransport::restore(memory.clone(), device.clone(), irq, &state.transport)
                .map_err(|source| VirtioWiringError::RestoreTransport { index, source })
        })?;
        attached.push((kind, transport));
    }
    if let Some(vsock) = created.vsock {
        // Host-side connections did not survive the process change: tell the guest.
        vsock.lock().unwrap_or_else(|p| p.into_inner()).send_transport_reset();
    }
    start(created.devices, attached)
}

/// The devices of a config, in device order, with what identifies each.
struct CreatedDevices {
    devices: Vec<SharedDevice<GuestMemoryMmap>>,
    kinds: Vec<VirtioDeviceKind>,
    vsock: Option<Arc<Mutex<Vsock<GuestMemoryMmap>>>>,
}

fn create_devices(config: &VmConfig) -> Result<CreatedDevices, VirtioWiringError> {
    let mut devices: Vec<SharedDevice<GuestMemoryMmap>> = Vec::new();
    let mut kinds: Vec<VirtioDeviceKind> = Vec::new();
    let mut vsock_device = None;
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            disk_id: format!("capsule-vd{}", char::from(b'a' + (index % 26) as u8)),
        })
        .map_err(|source| VirtioWiringError::Disk { index, path: disk.path.clone(), source })?;
        kinds.push(VirtioDeviceKind::Block { bytes: block.capacity_sectors() * 512, read_only: disk.read_only });
        devices.push(Arc::new(Mutex::new(block)));
    }
    if let Some(vsock) = &config.vsock {
        let device =
            Vsock::new(VsockDeviceConfig { guest_cid: u64::from(vsock.guest_cid), uds_path: vsock.uds_path.clone() })
                .map_err(|source| VirtioWiringError::Vsock { path: vsock.uds_path.clone(), source })?;
        kinds.push(VirtioDeviceKind::Vsock { guest_cid: u64::from(vsock.guest_cid) });
        let device = Arc::new(Mutex::new(device));
        vsock_device = Some(device.clone());
        devices.push(device);
    }
    if config.rng {
        kinds.push(VirtioDeviceKind::Rng);
        devices.push(Arc::new(Mutex::new(Rng::new())));
    }
    Ok(CreatedDevices { devices, kinds, vsock: vsock_device })
}

/// Gives virtio device `index` its interrupt (an irqfd on its GSI), builds its transport with
/// `make` and maps it at its MMIO window.
fn place_transport(
    vm: &Vm,
    mmio: &mut Bus,
    index: usize,
    make: impl FnOnce(EventFd) -> Result<MmioTransport<GuestMemoryMmap>, VirtioWiringError>,
) -> Result<Arc<Mutex<MmioBusDevice>>, VirtioWiringError> {
    let (base, gsi) = device_slot(index);
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioWiringError::EventFd { index, source })?;
    vm.register_irqfd(&irq, gsi).map_err(|source| VirtioWiringError::Irqfd { index, source })?;
    let transport = Arc::new(Mutex::new(MmioBusDevice(make(irq)?)));
    mmio.insert(transport.clone(), base, MMIO_DEVICE_WINDOW_BYTES)
        .map_err(|source| VirtioWiringError::Bus { index, source })?;
    Ok(transport)
}

/// Starts the device-event thread over `devices` (none without devices).
fn start(
    devices: Vec<SharedDevice<GuestMemoryMmap>>,
    attached: Vec<(VirtioDeviceKind, Arc<Mutex<MmioBusDevice>>)>,
) -> Result<VirtioDevices, VirtioWiringError> {
    if devices.is_empty() {
        return Ok(VirtioDevices::default());
    }
    let event_loop = DeviceEventLoop::start(devices).map_err(VirtioWiringError::EventLoop)?;
    Ok(VirtioDevices { devices: attached, event_loop: Some(event_loop) })
}

/// The configured devices must be the saved ones, in order (disk paths may differ, sizes not).
fn check_saved_devices(saved: &[VirtioDeviceState], configured: &[VirtioDeviceKind]) -> Result<(), VirtioWiringError> {
    if saved.len() != configured.len() {
        return Err(VirtioWiringError::DeviceCount { saved: saved.len(), configured: configured.len() });
    }
    for (index, (s, c)) in saved.iter().zip(configured).enumerate() {
        if s.kind != *c {
            return Err(VirtioWiringError::DeviceMismatch { index, saved: s.kind.clone(), configured: c.clone() });
        }
    }
    Ok(())
}
