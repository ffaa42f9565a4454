//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register
//! window through which the guest driver discovers, configures and notifies
//! one virtio device.
//!
//! Owns the register state machine (status, feature negotiation, queue setup,
//! interrupt status) and hands queues to the device at DRIVER_OK. It never
//! touches the MMIO bus or KVM: vmmcore calls [`MmioTransport::read`] and
//! [`MmioTransport::write`] with offsets relative to the 4 KiB window. Every
//! guest access is validated; bad ones are logged and ignored, never a panic.

use crate::devices::guest_log::GuestWarnLimiter;
use crate::persist::Persist;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    lock_device, ActivateContext, DeviceMemory, Interrupt, QueueSnapshot, SharedDevice, VIRTIO_F_VERSION_1_BIT,
};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_BYTES: u64 = 0x1000;
/// MagicValue register content: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Version register content: 2, the non-legacy layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register content.
pub const MMIO_VENDOR_ID: u32 = 0;
/// Offset of the device configuration space in the window.
pub const MMIO_CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Why a transport could not be built.
#[derive(Debug, Error)]
pub enum MmioError {
    /// A snapshot's queue count differs from the device's.
    #[error("snapshot has {actual} queues, the device has {expected}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues in the snapshot.
        actual: usize,
    },
    /// A snapshot's queue state is invalid for this device.
    #[error("snapshot queue {index} is invalid (max size must be {max_size})")]
    InvalidQueueState {
        /// Queue index.
        index: usize,
        /// The device's maximum size for that queue.
        max_size: u16,
        /// The virtio-queue error, if it was the one to refuse.
        #[source]
        source: Option<virtio_queue::Error>,
    },
    /// The device asked for a queue size virtio does not allow.
    #[error("device queue {index} has invalid maximum size {size} (power of two up to 32768 required)")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The requested maximum size.
        size: u16,
        /// The virtio-queue error.
        #[source]
        source: virtio_queue::Error,
    },
}

/// What a snapshot keeps of a transport: the register state and every
/// queue's position (taken from the device once it is activated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
}

/// Formats the kernel command-line entry that declares a device window:
/// `virtio_mmio.device=4K@0x<base>:<irq>`.
pub fn kernel_cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// One device's virtio-mmio register window.
pub struct MmioTransport<M> {
    mem: M,
    device: SharedDevice<M>,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    avail_features: u64,
    device_status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    /// Budget of warnings the guest can trigger through this window.
    warnings: GuestWarnLimiter,
}

impl<M: DeviceMemory> MmioTransport<M> {
    /// Builds the window for `device`; `irq` is the irqfd vmmcore registers.
    pub fn new(mem: M, device: SharedDevice<M>, irq: EventFd) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock_device(&device);
            (d.device_type(), d.avail_features() | VIRTIO_F_VERSION_1_BIT, d.queue_max_sizes().to_vec())
        };
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| MmioError::InvalidQueueMaxSize { index, size, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(Interrupt::new(irq)),
            device_type,
            avail_features,
            device_status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            config_generation: 0,
            warnings: GuestWarnLimiter::new(),
        })
    }

    /// The device's interrupt line (InterruptStatus and the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device behind this window.
    pub fn device(&self) -> &SharedDevice<M> {
        &self.device
    }

    /// Current Status register value.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if !config_access_ok(offset, data.len()) {
                crate::guest_warn!(self.warnings, offset, len = data.len(), "virtio-mmio: bad config read, ignored");
                data.fill(0);
                return;
            }
            lock_device(&self.device).read_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                self.warnings,
                offset,
                len = data.len(),
                "virtio-mmio: register read must be 4 aligned bytes, ignored"
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.device_status,
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX, // no shared memory regions
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!(self.warnings, offset, "virtio-mmio: read of unknown or write-only register");
                0
            }
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if !config_access_ok(offset, data.len()) {
                crate::guest_warn!(self.warnings, offset, len = data.len(), "virtio-mmio: bad config write, ignored");
                return;
            }
            if self.device_status & VIRTIO_CONFIG_S_DRIVER == 0 {
                crate::guest_warn!(self.warnings, offset, "virtio-mmio: config write before DRIVER status, ignored");
                return;
            }
            lock_device(&self.device).write_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                self.warnings,
                offset,
                len = data.len(),
                "virtio-mmio: register write must be 4 bytes, ignored"
            );
            return;
        };
        if offset % 4 != 0 {
            crate::guest_warn!(self.warnings, offset, "virtio-mmio: unaligned register write, ignored");
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                self.update_queue("QueueNum", |q| u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok()))
            }
            reg::VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => self.update_queue("QueueDescLow", |q| {
                q.set_desc_table_address(Some(value), None);
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self.update_queue("QueueDescHigh", |q| {
                q.set_desc_table_address(None, Some(value));
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.update_queue("QueueDriverLow", |q| {
                q.set_avail_ring_address(Some(value), None);
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.update_queue("QueueDriverHigh", |q| {
                q.set_avail_ring_address(None, Some(value));
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => self.update_queue("QueueDeviceLow", |q| {
                q.set_used_ring_address(Some(value), None);
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.update_queue("QueueDeviceHigh", |q| {
                q.set_used_ring_address(None, Some(value));
                true
            }),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_SHM_SEL => {}
            _ => crate::guest_warn!(
                self.warnings,
                offset,
                value,
                "virtio-mmio: write of unknown or read-only register, ignored"
            ),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// Applies a queue-configuration write; allowed only between FEATURES_OK
    /// and DRIVER_OK, on an existing queue that is not ready yet.
    fn update_queue(&mut self, what: &str, apply: impl FnOnce(&mut Queue) -> bool) {
        let status = self.device_status;
        if status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            || status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) != 0
        {
            crate::guest_warn!(
                self.warnings,
                what,
                status,
                "virtio-mmio: queue setup outside FEATURES_OK..DRIVER_OK, ignored"
            );
            return;
        }
        let select = self.queue_select;
        let Some(queue) = self.queues.get_mut(select as usize) else {
            crate::guest_warn!(
                self.warnings,
                what,
                queue = select,
                "virtio-mmio: queue setup for a queue the device lacks, ignored"
            );
            return;
        };
        if queue.ready() {
            crate::guest_warn!(
                self.warnings,
                what,
                queue = select,
                "virtio-mmio: queue setup while queue is ready, ignored"
            );
            return;
        }
        if !apply(queue) {
            crate::guest_warn!(self.warnings, what, queue = select, "virtio-mmio: invalid queue setup value, ignored");
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let status = self.device_status;
        if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 || status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            crate::guest_warn!(
                self.warnings,
                status,
                "virtio-mmio: QueueReady outside FEATURES_OK..DRIVER_OK, ignored"
            );
            return;
        }
        let mem = &self.mem;
        let select = self.queue_select;
        let Some(queue) = self.queues.get_mut(select as usize) else {
            crate::guest_warn!(
                self.warnings,
                queue = select,
                "virtio-mmio: QueueReady for a queue the device lacks, ignored"
            );
            return;
        };
        match value {
            0 => queue.set_ready(false),
            1 => {
                queue.set_ready(true);
                if !queue.is_valid(mem) {
                    crate::guest_warn!(
                        self.warnings,
                        queue = select,
                        "virtio-mmio: queue rings not in guest memory, QueueReady refused"
                    );
                    queue.set_ready(false);
                }
            }
            _ => crate::guest_warn!(self.warnings, value, "virtio-mmio: QueueReady must be 0 or 1, ignored"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let status = self.device_status;
        if status & VIRTIO_CONFIG_S_DRIVER == 0 || status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            crate::guest_warn!(
                self.warnings,
                status,
                "virtio-mmio: DriverFeatures outside DRIVER..FEATURES_OK, ignored"
            );
            return;
        }
        let (shift, mask) = match self.driver_features_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            sel => {
                crate::guest_warn!(self.warnings, sel, "virtio-mmio: DriverFeaturesSel beyond 1, write ignored");
                return;
            }
        };
        let requested = u64::from(value) << shift;
        let offered = requested & self.avail_features;
        if offered != requested {
            crate::guest_warn!(
                self.warnings,
                not_offered = requested & !self.avail_features,
                "virtio-mmio: driver acked features the device does not offer, dropped"
            );
        }
        self.acked_features = (self.acked_features & !mask) | offered;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if value & old != old {
            crate::guest_warn!(
                self.warnings,
                old,
                value,
                "virtio-mmio: driver cleared status bits without reset, ignored"
            );
            return;
        }
        let mut new = value;
        let added = value & !old;
        // Each step needs the previous one already set (virtio 1.2 §3.1.1).
        let order_ok = (added & VIRTIO_CONFIG_S_DRIVER == 0 || old & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0)
            && (added & VIRTIO_CONFIG_S_FEATURES_OK == 0 || old & VIRTIO_CONFIG_S_DRIVER != 0)
            && (added & VIRTIO_CONFIG_S_DRIVER_OK == 0 || old & VIRTIO_CONFIG_S_FEATURES_OK != 0);
        if !order_ok {
            crate::guest_warn!(self.warnings, old, value, "virtio-mmio: status bits set out of order, ignored");
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1_BIT == 0 {
            crate::guest_warn!(
                self.warnings,
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1, FEATURES_OK refused"
            );
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.device_status = new;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(copy) if copy.ready() => queues.push(copy),
                _ => {
                    crate::guest_warn!(self.warnings, queue = index, "virtio-mmio: DRIVER_OK with a queue not ready");
                    self.set_needs_reset();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        let result = lock_device(&self.device).activate(ctx);
        if let Err(e) = result {
            tracing::error!(error = %e, device = self.device_type, "virtio-mmio: device activation failed");
            self.set_needs_reset();
        }
    }

    fn set_needs_reset(&mut self) {
        self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn notify(&mut self, value: u32) {
        if self.device_status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            crate::guest_warn!(self.warnings, queue = value, "virtio-mmio: QueueNotify before DRIVER_OK, ignored");
            return;
        }
        // With VIRTIO_F_NOTIFICATION_DATA not offered, the value is the queue index.
        if value as usize >= self.queues.len() {
            crate::guest_warn!(
                self.warnings,
                queue = value,
                "virtio-mmio: QueueNotify for a queue the device lacks, ignored"
            );
            return;
        }
        let mut device = lock_device(&self.device);
        if device.is_activated() {
            device.queue_notify(value);
        }
    }

    fn reset(&mut self) {
        lock_device(&self.device).reset();
        self.device_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
    }
}

/// What a restored transport needs live: guest memory, the freshly restored device, and the
/// irqfd registered for its GSI.
pub struct MmioArgs<M> {
    pub mem: M,
    pub device: SharedDevice<M>,
    pub irq: EventFd,
}

impl<M: DeviceMemory> Persist for MmioTransport<M> {
    type State = MmioState;
    type ConstructorArgs = MmioArgs<M>;
    type Error = MmioError;

    /// Saves the register and queue state (see [`MmioState`]).
    fn save(&self) -> MmioState {
        let active = lock_device(&self.device).queue_snapshots();
        let queues = if active.is_empty() { self.queues.iter().map(|q| q.state().into()).collect() } else { active };
        MmioState {
            device_status: self.device_status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Rebuilds a transport from `state` around a freshly constructed
    /// `device`; an activated device is re-activated with the saved queue
    /// positions, and a pending interrupt is raised again.
    fn restore(args: MmioArgs<M>, state: &MmioState) -> Result<Self, MmioError> {
        let mut t = Self::new(args.mem, args.device, args.irq)?;
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::QueueCount { expected: t.queues.len(), actual: state.queues.len() });
        }
        for (index, (slot, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            let max_size = slot.max_size();
            if saved.max_size != max_size {
                return Err(MmioError::InvalidQueueState { index, max_size, source: None });
            }
            *slot = Queue::try_from(QueueState::from(*saved)).map_err(|source| MmioError::InvalidQueueState {
                index,
                max_size,
                source: Some(source),
            })?;
        }
        t.device_status = state.device_status;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.acked_features = state.acked_features & t.avail_features;
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        if t.device_status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.device_status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            t.activate();
        }
        t.interrupt.restore_status(state.interrupt_status);
        Ok(t)
    }
}

/// Config-space accesses may be 1, 2, 4 or 8 bytes and must stay in the window.
fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset.checked_add(len as u64).is_some_and(|end| end <= MMIO_WINDOW_BYTES)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{guest_memory, Mem};
    use crate::persist::test_util::round_trip;

    fn write(t: &mut MmioTransport<Mem>, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn read(t: &mut MmioTransport<Mem>, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_transport_mid_negotiation_round_trips_and_negotiates_on() {
        let mem = guest_memory();
        let rng: SharedDevice<Mem> = Arc::new(Mutex::new(Rng::<Mem>::new()));
        let mut t = MmioTransport::new(mem.clone(), rng, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        write(&mut t, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(&mut t, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        write(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        write(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        let device: SharedDevice<Mem> = Arc::new(Mutex::new(Rng::<Mem>::new()));
        let args = MmioArgs { mem, device, irq: EventFd::new(libc::EFD_NONBLOCK).unwrap() };
        let mut restored = round_trip(&t, args);
        // Features word 1 holds VIRTIO_F_VERSION_1; the driver goes on from where it was.
        assert_eq!(read(&mut restored, reg::VIRTIO_MMIO_DEVICE_FEATURES), (VIRTIO_F_VERSION_1_BIT >> 32) as u32);
        write(&mut restored, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut restored, reg::VIRTIO_MMIO_DRIVER_FEATURES, (VIRTIO_F_VERSION_1_BIT >> 32) as u32);
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write(&mut restored, reg::VIRTIO_MMIO_STATUS, status);
        assert_eq!(read(&mut restored, reg::VIRTIO_MMIO_STATUS), status);
    }
}
