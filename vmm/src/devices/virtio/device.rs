//! What every virtio device shares: the [`VirtioDevice`] trait the transport
//! drives, the interrupt line the device raises, and the state a device holds
//! once the driver has activated it ([`ActiveState`]), and the bookkeeping and queue-serving
//! loop each device delegates to ([`VirtioCommon`]).
//!
//! This module never parses guest buffers and never knows which transport
//! carries the device.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::guest_log::GuestWarnLimiter;

/// Feature bit VIRTIO_F_VERSION_1 (include/uapi/linux/virtio_config.h): every
/// device we offer is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1_BIT: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// InterruptStatus bit: the device used a buffer in a queue.
pub const INTERRUPT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The guest memory a device can use: any vm-memory guest memory that can be
/// shared with the device-event thread.
pub trait DeviceMemory: GuestMemory + Clone + Send + Sync + 'static {}
impl<T: GuestMemory + Clone + Send + Sync + 'static> DeviceMemory for T {}

/// A device as both the transport (vCPU thread) and the device-event thread
/// hold it.
pub type SharedDevice<M> = Arc<Mutex<dyn VirtioDevice<M>>>;

/// Locks a shared device. A poisoned lock (a panic elsewhere) still yields the
/// device: the device state stays consistent because no method panics midway
/// on guest input.
pub fn lock_device<M>(device: &SharedDevice<M>) -> MutexGuard<'_, dyn VirtioDevice<M> + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver enabled a different number of queues than the device has.
    #[error("device needs {expected} queues, the driver set up {actual}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed in.
        actual: usize,
    },
    /// A queue is not ready or does not lie in guest memory.
    #[error("queue {index} is not ready or not in guest memory")]
    InvalidQueue {
        /// Index of the bad queue.
        index: usize,
    },
    /// A device-side resource (socket, epoll) could not be set up.
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// The device's interrupt line: the InterruptStatus register plus the irqfd
/// that KVM turns into the device IRQ.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Wraps the irqfd registered with KVM (writing 1 raises the IRQ).
    pub fn new(irq: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irq }
    }

    /// Raises the interrupt for a used-ring update.
    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    /// Raises the interrupt for a configuration change.
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::error!(error = %e, "virtio: failed to raise interrupt");
        }
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores InterruptStatus from a snapshot and re-raises the IRQ if any
    /// bit is pending, so the guest does not miss it.
    pub fn restore_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irq.write(1) {
                tracing::error!(error = %e, "virtio: failed to re-raise restored interrupt");
            }
        }
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd (for tests and for vmmcore's registration).
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct ActivateContext<M> {
    /// Guest memory.
    pub mem: M,
    /// The queues the driver set up, in index order, all ready and valid.
    pub queues: Vec<Queue>,
    /// The device interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// The state every activated device holds (the common part of a device, like
/// Cloud Hypervisor's `VirtioCommon`).
pub struct ActiveState<M> {
    /// Guest memory.
    pub mem: M,
    /// The device's queues.
    pub queues: Vec<Queue>,
    /// The device interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// What every device holds for the transport (Cloud Hypervisor's `VirtioCommon`): its queue
/// sizes, its [`ActiveState`] once the driver activated it, and its budget of guest-triggered
/// warnings. The bookkeeping methods of [`VirtioDevice`] default to it, and devices serve their
/// queues with [`VirtioCommon::serve_queue`], adding only their own request logic.
pub struct VirtioCommon<M> {
    device_type: u32,
    avail_features: u64,
    queue_sizes: Vec<u16>,
    /// Present between activation and reset.
    pub active: Option<ActiveState<M>>,
    /// Rate limit for warnings the guest can trigger through this device.
    pub warnings: GuestWarnLimiter,
}

impl<M> VirtioCommon<M> {
    /// A device of `device_type` offering `avail_features`, with queues of these maximum sizes,
    /// not yet activated.
    pub fn new(device_type: u32, avail_features: u64, queue_sizes: &[u16]) -> Self {
        Self {
            device_type,
            avail_features,
            queue_sizes: queue_sizes.to_vec(),
            active: None,
            warnings: GuestWarnLimiter::new(),
        }
    }

    /// [`VirtioDevice::device_type`].
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// [`VirtioDevice::avail_features`].
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// [`VirtioDevice::queue_max_sizes`].
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// [`VirtioDevice::is_activated`].
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// [`VirtioDevice::queue_snapshots`]: empty before activation.
    pub fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.active.as_ref().map(ActiveState::queue_snapshots).unwrap_or_default()
    }

    /// [`VirtioDevice::reset`]: forgets the queues and memory.
    pub fn reset(&mut self) {
        self.active = None;
    }
}

impl<M: DeviceMemory> VirtioCommon<M> {
    /// [`VirtioDevice::activate`]: takes the driver's queues (one per queue size).
    pub fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        self.active = Some(ActiveState::from_context(ctx, self.queue_sizes.len())?);
        Ok(())
    }

    /// Pops each available chain of queue `index` and hands it to `serve`, which returns the
    /// used length to complete it with, or `None` to put it back and stop (nothing to put in
    /// it yet). Signals the driver once if anything completed; returns how many did. A used
    /// ring the device cannot write stops the loop with a (rate-limited) warning. Does nothing
    /// before activation.
    pub fn serve_queue<F>(&mut self, index: usize, device: &'static str, mut serve: F) -> usize
    where
        F: for<'a> FnMut(&'a M, DescriptorChain<&'a M>, &mut GuestWarnLimiter) -> Option<u32>,
    {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return 0;
        };
        let mut completed = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let Some(used_len) = serve(&mem, chain, &mut self.warnings) else {
                queue.go_to_previous_position();
                break;
            };
            if let Err(e) = queue.add_used(&mem, head, used_len) {
                crate::guest_warn!(self.warnings, error = %e, device, queue = index, "virtio: writing the used ring failed");
                break;
            }
            completed += 1;
        }
        if completed > 0 {
            active.interrupt.signal_used_queue();
        }
        completed
    }
}

impl<M> ActiveState<M> {
    /// The queues' positions and addresses, for a snapshot.
    pub fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(|q| q.state().into()).collect()
    }
}

impl<M: GuestMemory> ActiveState<M> {
    /// Checks the queue count and hands the context over as active state.
    pub fn from_context(ctx: ActivateContext<M>, queue_count: usize) -> Result<Self, ActivateError> {
        if ctx.queues.len() != queue_count {
            return Err(ActivateError::QueueCount { expected: queue_count, actual: ctx.queues.len() });
        }
        for (index, q) in ctx.queues.iter().enumerate() {
            if !q.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue { index });
            }
        }
        Ok(Self { mem: ctx.mem, queues: ctx.queues, interrupt: ctx.interrupt, acked_features: ctx.acked_features })
    }
}

/// A virtio device model, as the transport drives it.
///
/// Methods are called with the device locked, from a vCPU thread (register
/// accesses, queue notifications) or from the device-event thread
/// ([`VirtioDevice::process_events`]). None may block for long or panic.
///
/// Every device keeps its shared bookkeeping in a [`VirtioCommon`] and hands it out through
/// [`VirtioDevice::common`]/[`VirtioDevice::common_mut`]; the bookkeeping methods default to
/// it, so a device writes only what is its own (and overrides `activate`/`reset` only to add
/// to them).
pub trait VirtioDevice<M: DeviceMemory>: Send {
    /// Reads the device configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `queue_index` (QueueNotify).
    fn queue_notify(&mut self, queue_index: u32);
    /// The part every device shares (a device field named `common`: see
    /// [`virtio_common_accessors`](crate::virtio_common_accessors)).
    fn common(&self) -> &VirtioCommon<M>;
    /// The part every device shares, to change.
    fn common_mut(&mut self) -> &mut VirtioCommon<M>;

    /// Virtio device ID (include/uapi/linux/virtio_ids.h).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Features the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// The maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }
    /// Writes the device configuration space. Default: read-only config.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            device = self.device_type(),
            "virtio: guest wrote read-only config space, ignored"
        );
    }
    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        self.common_mut().activate(ctx)
    }
    /// Whether the device has been activated (and not reset since).
    fn is_activated(&self) -> bool {
        self.common().is_activated()
    }
    /// Device reset (Status written 0): drop queues and backend connections.
    fn reset(&mut self) {
        self.common_mut().reset();
    }
    /// The activated queues' state (empty when not activated), for a snapshot.
    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.common().queue_snapshots()
    }
    /// A file descriptor the device-event thread should watch for readability,
    /// if the device has host-side events.
    fn event_fd(&self) -> Option<RawFd> {
        None
    }
    /// Called on the device-event thread when [`VirtioDevice::event_fd`] is
    /// readable.
    fn process_events(&mut self) {}
}

/// Writes [`VirtioDevice::common`] and [`VirtioDevice::common_mut`] for a device whose
/// [`VirtioCommon`] is its field `common` (and whose memory type parameter is `M`).
#[macro_export]
macro_rules! virtio_common_accessors {
    () => {
        fn common(&self) -> &$crate::devices::virtio::device::VirtioCommon<M> {
            &self.common
        }
        fn common_mut(&mut self) -> &mut $crate::devices::virtio::device::VirtioCommon<M> {
            &mut self.common
        }
    };
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Serde form of a queue's state, for device snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size the device offers.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is on.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver (available) ring address.
    pub avail_ring: u64,
    /// Device (used) ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}
