//! The integration point between the VMM core and the virtio device models in
//! `devices::virtio`: it creates each device, gives it an MMIO window and a GSI (irqfd), adds
//! it to the kernel command line and starts the device-event thread. Devices are numbered in
//! this order: disks (vda, vdb, ...), vsock, net, rng (a config without one of them leaves no
//! gap, so a snapshot saved before net existed restores as it was). Booting attaches them fresh
//! ([`attach_virtio_devices`]); a restore rebuilds each from its saved state
//! ([`restore_virtio_devices`], [`VirtioDeviceState`]) through its [`Persist`] impl, at the same
//! windows and GSIs. Every device kind is one `AttachedDevice` variant, so a new device cannot
//! be attached without saying how it saves. The net device's backend is the sandbox network stack
//! ([`crate::net::stack`]) over a [`BrokerUpstream`] listening on the config's broker socket,
//! bound here (so before the worker is confined); a restore binds a new listener and starts a
//! fresh stack: the guest's connections through the old one are gone (it sees resets). It never
//! implements device behaviour.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{MMIO_DEVICES_FIRST_GSI, MMIO_DEVICES_START, MMIO_DEVICE_WINDOW_BYTES};
use crate::config::{DiskConfig, NetDeviceConfig, VmConfig};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::virtio::block::undo::UndoError;
use crate::devices::virtio::block::{Block, BlockBacking, BlockConfig, BlockError, BlockState, SECTOR_BYTES};
use crate::devices::virtio::device::SharedDevice;
use crate::devices::virtio::event_loop::{DeviceEventLoop, EventLoopError};
use crate::devices::virtio::mmio::{kernel_cmdline_entry, MmioArgs, MmioError, MmioState, MmioTransport};
use crate::devices::virtio::net::{Net, NetBackend, NetConfig, NetError, NetState};
use crate::devices::virtio::rng::{Rng, RngState};
use crate::devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig, VsockError, VsockState};
use crate::net::broker_socket::{self, BrokerSocketError};
use crate::net::stack::{BrokerUpstream, BrokerUpstreamError, NetStack, StackError};
use crate::persist::Persist;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};

type Mem = GuestMemoryMmap;

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
    #[error("setting up the broker socket of the net device")]
    BrokerSocket(#[source] BrokerSocketError),
    #[error("setting up the broker upstream of the net device")]
    BrokerUpstream(#[source] BrokerUpstreamError),
    #[error("creating the network stack of the net device")]
    NetStack(#[source] StackError),
    #[error("creating the net device")]
    Net(#[source] NetError),
    #[error("the snapshot has {saved} virtio devices but the VM config describes {configured}")]
    DeviceCount { saved: usize, configured: usize },
    #[error("virtio device {index} is {configured:?} but the snapshot saved {saved:?}")]
    DeviceMismatch { index: usize, saved: VirtioDeviceKind, configured: VirtioDeviceKind },
    #[error("virtio device {index} is a net device in the snapshot but the VM config has none")]
    NetNotConfigured { index: usize },
    #[error("restoring the MMIO transport of virtio device {index}")]
    RestoreTransport {
        index: usize,
        #[source]
        source: MmioError,
    },
    #[error("reading the size of disk {index} ({path})")]
    DiskSize {
        index: usize,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What identifies a virtio device across a snapshot: what the configured device must match.
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
    /// The guest read its MAC at boot: it must stay.
    Net {
        mac: [u8; 6],
    },
}

/// A device's own state, by kind ([`Persist::State`] of each device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Vsock(VsockState),
    Rng(RngState),
    /// Last, so the older variants keep their tags in snapshot payloads (postcard).
    Net(NetState),
}

impl DeviceState {
    /// What identifies the device this state belongs to.
    pub fn kind(&self) -> VirtioDeviceKind {
        match self {
            Self::Block(s) => VirtioDeviceKind::Block { bytes: s.bytes, read_only: s.read_only },
            Self::Vsock(s) => VirtioDeviceKind::Vsock { guest_cid: s.guest_cid },
            Self::Net(s) => VirtioDeviceKind::Net { mac: s.config.mac },
            Self::Rng(_) => VirtioDeviceKind::Rng,
        }
    }
}

/// One virtio device in a snapshot: its own state and its transport/queue state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub device: DeviceState,
    pub transport: MmioState,
}

impl VirtioDeviceState {
    /// What identifies the device.
    pub fn kind(&self) -> VirtioDeviceKind {
        self.device.kind()
    }
}

/// One attached device, by kind, as the wiring holds it for saving.
#[derive(Clone)]
enum AttachedDevice {
    Block(Arc<Mutex<Block<Mem>>>),
    Vsock(Arc<Mutex<Vsock<Mem>>>),
    Net(Arc<Mutex<Net<Mem>>>),
    Rng(Arc<Mutex<Rng<Mem>>>),
}

fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl AttachedDevice {
    /// The device as the transport and the event thread drive it.
    fn shared(&self) -> SharedDevice<Mem> {
        match self {
            Self::Block(d) => d.clone(),
            Self::Vsock(d) => d.clone(),
            Self::Net(d) => d.clone(),
            Self::Rng(d) => d.clone(),
        }
    }

    fn save(&self) -> DeviceState {
        match self {
            Self::Block(d) => DeviceState::Block(lock(d).save()),
            Self::Vsock(d) => DeviceState::Vsock(lock(d).save()),
            Self::Net(d) => DeviceState::Net(lock(d).save()),
            Self::Rng(d) => DeviceState::Rng(lock(d).save()),
        }
    }
}

/// The attached virtio devices and their device-event thread.
#[derive(Default)]
pub struct VirtioDevices {
    devices: Vec<(AttachedDevice, Arc<Mutex<MmioBusDevice>>)>,
    event_loop: Option<DeviceEventLoop>,
}

impl VirtioDevices {
    /// Every device's and transport's state, in device order. Quiesce first
    /// ([`VirtioDevices::pause`]).
    pub fn save(&self) -> Vec<VirtioDeviceState> {
        self.devices
            .iter()
            .map(|(device, transport)| VirtioDeviceState { device: device.save(), transport: lock(transport).0.save() })
            .collect()
    }

    /// Starts a new undo epoch tagged `tag` on every disk that keeps an undo log. Call only while
    /// no device serves requests (before the VM starts, or paused).
    pub fn begin_undo_epochs(&self, tag: &str) -> Result<(), UndoError> {
        for (device, _) in &self.devices {
            if let AttachedDevice::Block(block) = device {
                lock(block).begin_undo_epoch(tag)?;
            }
        }
        Ok(())
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
struct MmioBusDevice(MmioTransport<Mem>);

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

/// The GET_ID answer of disk `index`: `capsule-vda`, `capsule-vdb`, ...
fn disk_id(index: usize) -> String {
    format!("capsule-vd{}", char::from(b'a' + (index % 26) as u8))
}

/// Creates the devices `config` asks for, fresh, maps them and appends them to `cmdline`.
/// Returns what must live as long as the VM.
pub fn attach_virtio_devices(
    vm: &Vm,
    memory: &Mem,
    config: &VmConfig,
    mmio: &mut Bus,
    cmdline: &mut String,
) -> Result<VirtioDevices, VirtioWiringError> {
    let devices = create_devices(config)?;
    let mut attached = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let (base, gsi) = device_slot(index);
        let transport = place_transport(vm, mmio, index, |irq| {
            MmioTransport::new(memory.clone(), device.shared(), irq)
                .map_err(|source| VirtioWiringError::Transport { index, source })
        })?;
        attached.push((device, transport));
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&kernel_cmdline_entry(base, gsi));
    }
    start(attached)
}

/// Rebuilds the devices `config` asks for, which must be the `saved` ones in order (disk paths
/// may differ, sizes not), each device and transport from its saved state, at the same MMIO
/// windows and GSIs. The guest parsed its command line long ago, so nothing is added to one.
/// The vsock device tells the guest its connections are gone.
pub fn restore_virtio_devices(
    vm: &Vm,
    memory: &Mem,
    config: &VmConfig,
    mmio: &mut Bus,
    saved: &[VirtioDeviceState],
) -> Result<VirtioDevices, VirtioWiringError> {
    let kinds = configured_kinds(config)?;
    check_saved_devices(saved, &kinds)?;
    let mut attached = Vec::with_capacity(saved.len());
    for (index, state) in saved.iter().enumerate() {
        let device = restore_device(config, index, &state.device)?;
        let transport = place_transport(vm, mmio, index, |irq| {
            MmioTransport::restore(MmioArgs { mem: memory.clone(), device: device.shared(), irq }, &state.transport)
                .map_err(|source| VirtioWiringError::RestoreTransport { index, source })
        })?;
        attached.push((device, transport));
    }
    for (device, _) in &attached {
        if let AttachedDevice::Vsock(vsock) = device {
            // Host-side connections did not survive the process change: tell the guest.
            lock(vsock).send_transport_reset();
        }
    }
    start(attached)
}

/// The devices of a config, fresh, in device order.
fn create_devices(config: &VmConfig) -> Result<Vec<AttachedDevice>, VirtioWiringError> {
    let mut devices = Vec::with_capacity(config.virtio_device_count());
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            disk_id: disk_id(index),
            undo_log: disk.undo_log_path(),
        })
        .map_err(|source| VirtioWiringError::Disk { index, path: disk.path.clone(), source })?;
        devices.push(AttachedDevice::Block(Arc::new(Mutex::new(block))));
    }
    if let Some(vsock) = &config.vsock {
        let device =
            Vsock::new(VsockDeviceConfig { guest_cid: u64::from(vsock.guest_cid), uds_path: vsock.uds_path.clone() })
                .map_err(|source| VirtioWiringError::Vsock { path: vsock.uds_path.clone(), source })?;
        devices.push(AttachedDevice::Vsock(Arc::new(Mutex::new(device))));
    }
    if let Some(net) = &config.net {
        let device = Net::new(NetConfig { mac: net.mac }, network_stack(net)?).map_err(VirtioWiringError::Net)?;
        devices.push(AttachedDevice::Net(Arc::new(Mutex::new(device))));
    }
    if config.rng {
        devices.push(AttachedDevice::Rng(Arc::new(Mutex::new(Rng::new()))));
    }
    Ok(devices)
}

/// What the devices of `config` are, in device order (a disk's size read from its file).
fn configured_kinds(config: &VmConfig) -> Result<Vec<VirtioDeviceKind>, VirtioWiringError> {
    let mut kinds = Vec::with_capacity(config.virtio_device_count());
    for (index, disk) in config.disks.iter().enumerate() {
        let len = std::fs::metadata(&disk.path)
            .map_err(|source| VirtioWiringError::DiskSize { index, path: disk.path.clone(), source })?
            .len();
        kinds.push(VirtioDeviceKind::Block { bytes: len / SECTOR_BYTES * SECTOR_BYTES, read_only: disk.read_only });
    }
    if let Some(vsock) = &config.vsock {
        kinds.push(VirtioDeviceKind::Vsock { guest_cid: u64::from(vsock.guest_cid) });
    }
    if let Some(net) = &config.net {
        kinds.push(VirtioDeviceKind::Net { mac: net.mac });
    }
    if config.rng {
        kinds.push(VirtioDeviceKind::Rng);
    }
    Ok(kinds)
}

/// Device `index` of `config` in its saved `state` (the kinds were checked to match), with the
/// live things the config names: a disk's path, the vsock socket, the broker socket.
fn restore_device(config: &VmConfig, index: usize, state: &DeviceState) -> Result<AttachedDevice, VirtioWiringError> {
    Ok(match state {
        DeviceState::Block(s) => {
            let disk = config.disks.get(index);
            let path: PathBuf = disk.map(|d| d.path.clone()).unwrap_or_default();
            let backing = BlockBacking { path: path.clone(), undo_log: disk.and_then(DiskConfig::undo_log_path) };
            let block = Block::restore(backing, s).map_err(|source| VirtioWiringError::Disk { index, path, source })?;
            AttachedDevice::Block(Arc::new(Mutex::new(block)))
        }
        DeviceState::Vsock(s) => {
            let path = config.vsock.as_ref().map(|v| v.uds_path.clone()).unwrap_or_default();
            let vsock = Vsock::restore(path.clone(), s).map_err(|source| VirtioWiringError::Vsock { path, source })?;
            AttachedDevice::Vsock(Arc::new(Mutex::new(vsock)))
        }
        DeviceState::Net(s) => {
            let net = config.net.as_ref().ok_or(VirtioWiringError::NetNotConfigured { index })?;
            let device = Net::restore(network_stack(net)?, s).map_err(VirtioWiringError::Net)?;
            AttachedDevice::Net(Arc::new(Mutex::new(device)))
        }
        DeviceState::Rng(s) => {
            let rng = Rng::restore((), s).unwrap_or_else(|e| match e {});
            AttachedDevice::Rng(Arc::new(Mutex::new(rng)))
        }
    })
}

/// The net device's backend: a fresh network stack whose upstream is the daemon, accepted on
/// the broker socket bound here (a stale socket file is replaced). Until the daemon connects,
/// the stack refuses everything.
fn network_stack(net: &NetDeviceConfig) -> Result<Box<dyn NetBackend>, VirtioWiringError> {
    let listener = broker_socket::listen(&net.broker_socket).map_err(VirtioWiringError::BrokerSocket)?;
    let upstream = BrokerUpstream::listening(listener).map_err(VirtioWiringError::BrokerUpstream)?;
    let stack = NetStack::new(Box::new(upstream)).map_err(VirtioWiringError::NetStack)?;
    Ok(Box::new(stack))
}

/// Gives virtio device `index` its interrupt (an irqfd on its GSI), builds its transport with
/// `make` and maps it at its MMIO window.
fn place_transport(
    vm: &Vm,
    mmio: &mut Bus,
    index: usize,
    make: impl FnOnce(EventFd) -> Result<MmioTransport<Mem>, VirtioWiringError>,
) -> Result<Arc<Mutex<MmioBusDevice>>, VirtioWiringError> {
    let (base, gsi) = device_slot(index);
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioWiringError::EventFd { index, source })?;
    vm.register_irqfd(&irq, gsi).map_err(|source| VirtioWiringError::Irqfd { index, source })?;
    let transport = Arc::new(Mutex::new(MmioBusDevice(make(irq)?)));
    mmio.insert(transport.clone(), base, MMIO_DEVICE_WINDOW_BYTES)
        .map_err(|source| VirtioWiringError::Bus { index, source })?;
    Ok(transport)
}

/// Starts the device-event thread over the attached devices (none without devices).
fn start(attached: Vec<(AttachedDevice, Arc<Mutex<MmioBusDevice>>)>) -> Result<VirtioDevices, VirtioWiringError> {
    if attached.is_empty() {
        return Ok(VirtioDevices::default());
    }
    let shared = attached.iter().map(|(device, _)| device.shared()).collect();
    let event_loop = DeviceEventLoop::start(shared).map_err(VirtioWiringError::EventLoop)?;
    Ok(VirtioDevices { devices: attached, event_loop: Some(event_loop) })
}

/// The configured devices must be the saved ones, in order (disk paths may differ, sizes not).
fn check_saved_devices(saved: &[VirtioDeviceState], configured: &[VirtioDeviceKind]) -> Result<(), VirtioWiringError> {
    if saved.len() != configured.len() {
        return Err(VirtioWiringError::DeviceCount { saved: saved.len(), configured: configured.len() });
    }
    for (index, (s, c)) in saved.iter().zip(configured).enumerate() {
        let saved_kind = s.kind();
        if saved_kind != *c {
            return Err(VirtioWiringError::DeviceMismatch { index, saved: saved_kind, configured: c.clone() });
        }
    }
    Ok(())
}
