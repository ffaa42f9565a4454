//! virtio-net (device ID 1), modern only: one RX queue (0) and one TX queue (1), no multiqueue
//! and no offloads (no checksum, GSO, TSO or mergeable RX buffers), a fixed MAC
//! (VIRTIO_NET_F_MAC) and a link that is always up (VIRTIO_NET_F_STATUS).
//!
//! Owns the two queues: guest TX chains become Ethernet frames handed to the [`NetBackend`]
//! ([`backend`]), and frames the backend holds for the guest go into the guest's RX buffers
//! when there are some. The wire format and its checks live in [`frame`]. It never knows what
//! carries the frames (the sandbox's user-space stack, or [`loopback`] in tests), never holds a
//! host→guest frame itself (they wait, bounded, in the backend), and never panics on guest input:
//! a bad chain is completed with length 0 and counted ([`NetCounters`]).
//!
//! # Wiring (done in `virtio_wiring`, with the sandbox network stack as the backend)
//!
//! 1. Build the backend and the device: `Net::new(NetConfig { mac }, Box::new(backend))`, and
//!    share it as a [`SharedDevice`](super::device::SharedDevice)
//!    (`Arc<Mutex<Net<Mem>>>`, kept as its own `AttachedDevice::Net` variant so it can be saved).
//! 2. Transport and interrupt as for every device (see [`super`]): an irqfd `EventFd` for
//!    GSI `n`, `MmioTransport::new(mem, device, irq)`, the 4 KiB window on the MMIO bus, and
//!    `virtio_mmio.device=4K@0xA:n` on the kernel command line. The guest kernel configures
//!    the interface (`ip=` autoconfiguration) with the MAC given here.
//! 3. Pass the device to [`DeviceEventLoop::start`](super::event_loop::DeviceEventLoop::start)
//!    with the others: [`VirtioDevice::event_fd`] is the backend's
//!    [`NetBackend::event_fd`], and [`VirtioDevice::process_events`] lets the backend clear it
//!    and then moves waiting frames into RX buffers. Guest notifications (vCPU thread) do the
//!    rest: TX sends, then RX delivery; adding RX buffers delivers what waited.
//! 4. The backend keeps its own bounded queue for the guest (e.g. a [`BoundedFrameQueue`],
//!    drop-on-full) and kicks its event fd when it queues a frame. Its methods run with the
//!    device locked, on vCPU and event threads alike, so they never block.
//! 5. Snapshot: save [`NetState`] with [`Persist::save`]; restore with a fresh backend
//!    ([`Persist::restore`]). Frames in flight are not kept: guest TCP connections through the
//!    old backend are gone after a restore or fork, and the guest's stack sees them time out or
//!    reset.

pub mod backend;
pub mod frame;
pub mod loopback;
#[cfg(test)]
mod tests;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

use super::chain::Chain;
use super::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMemory, VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1_BIT,
};
use crate::persist::Persist;
pub use backend::{BackendError, BoundedFrameQueue, NetBackend};
use frame::FrameError;

/// Device ID (include/uapi/linux/virtio_ids.h).
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Size of each of the two queues.
pub const NET_QUEUE_SIZE: u16 = 256;
/// RX queue index (device → guest).
pub const RX_QUEUE: usize = 0;
/// TX queue index (guest → device).
pub const TX_QUEUE: usize = 1;
/// Features offered: VERSION_1, MAC, STATUS and MTU, nothing else.
pub const NET_FEATURES: u64 =
    VIRTIO_F_VERSION_1_BIT | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MTU);
/// The link's MTU, told to the guest (VIRTIO_NET_F_MTU): frames of up to 64 KiB, so that a
/// bulk transfer costs the guest one interrupt and one notification per 64 KiB rather than per
/// 1.5 KiB (every exit is dear on a nested or PVM host). The largest frame it allows fits
/// [`frame::MAX_FRAME_BYTES`].
pub const DEVICE_MTU: u16 = 65520;
/// Bytes of `struct virtio_net_config` the device fills: `mac[6]`, `status`,
/// `max_virtqueue_pairs` and `mtu` (le16 each).
const CONFIG_SPACE_BYTES: usize = 12;
const _: () = assert!(DEVICE_MTU as usize + 14 <= frame::MAX_FRAME_BYTES);

/// Why a net device could not be built or restored.
#[derive(Debug, Error)]
pub enum NetError {
    /// The MAC is all zeros or a multicast address: not an interface address.
    #[error("MAC {0:02x?} is not a unicast address")]
    NotUnicast([u8; 6]),
    /// A snapshot's device offered other features than this one does (its driver may rely on
    /// them).
    #[error("the saved device offered features {saved:#x}, this device offers {offered:#x}")]
    FeaturesChanged {
        /// Features the saved device offered.
        saved: u64,
        /// Features this device offers.
        offered: u64,
    },
}

/// Serde description of a net device, for configuration and snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The guest interface's MAC (unicast).
    pub mac: [u8; 6],
}

/// What the device counted since it was built (kept across snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Guest frames handed to the backend.
    pub tx_frames: u64,
    /// Their bytes (Ethernet frames, no header).
    pub tx_bytes: u64,
    /// Guest TX chains refused ([`FrameError`]): wrong direction, too short or long, offloads.
    pub tx_malformed: u64,
    /// Guest frames the backend refused (full or disconnected).
    pub tx_backend_dropped: u64,
    /// Frames delivered into guest RX buffers.
    pub rx_frames: u64,
    /// Their bytes (Ethernet frames, no header).
    pub rx_bytes: u64,
    /// Guest RX buffers refused (read-only, too small for any frame, bad chain), or that could
    /// not be written (their frame is lost).
    pub rx_buffers_malformed: u64,
    /// Host frames dropped because the guest's RX buffer was too small for them.
    pub rx_frames_too_big: u64,
    /// Host frames dropped because the backend gave a frame of impossible length.
    pub rx_frames_invalid: u64,
}

/// The virtio-net device.
pub struct Net<M> {
    config: NetConfig,
    backend: Box<dyn NetBackend>,
    config_space: [u8; CONFIG_SPACE_BYTES],
    counters: NetCounters,
    common: VirtioCommon<M>,
}

impl<M> Net<M> {
    /// A new, not yet activated device with `config`'s MAC, its frames carried by `backend`.
    pub fn new(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        if config.mac == [0; 6] || config.mac[0] & 1 != 0 {
            return Err(NetError::NotUnicast(config.mac));
        }
        // struct virtio_net_config: mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu.
        let mut config_space = [0u8; CONFIG_SPACE_BYTES];
        config_space[..6].copy_from_slice(&config.mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes());
        config_space[10..12].copy_from_slice(&DEVICE_MTU.to_le_bytes());
        Ok(Self {
            config,
            backend,
            config_space,
            counters: NetCounters::default(),
            common: VirtioCommon::new(VIRTIO_ID_NET, NET_FEATURES, &[NET_QUEUE_SIZE; 2]),
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// What the device has counted.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }
}

/// What a snapshot keeps of a net device: its MAC, the features it offered, and its counters.
/// What the driver accepted is the transport's ([`super::mmio::MmioState`]), with the queues.
/// Frames in flight (in the backend) are not kept: the restored device gets a fresh backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The device's configuration.
    pub config: NetConfig,
    /// Features the device offered ([`NET_FEATURES`] when saved); a restore refuses others.
    pub offered_features: u64,
    /// The counters at save time.
    pub counters: NetCounters,
}

impl<M> Persist for Net<M> {
    type State = NetState;
    /// The backend that carries the restored device's frames (a fork gets its own).
    type ConstructorArgs = Box<dyn NetBackend>;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState { config: self.config, offered_features: self.common.avail_features(), counters: self.counters }
    }

    fn restore(backend: Box<dyn NetBackend>, state: &NetState) -> Result<Self, NetError> {
        let mut net = Self::new(state.config, backend)?;
        let offered = net.common.avail_features();
        if state.offered_features != offered {
            return Err(NetError::FeaturesChanged { saved: state.offered_features, offered });
        }
        net.counters = state.counters;
        Ok(net)
    }
}

impl<M: DeviceMemory> Net<M> {
    /// Sends every pending guest TX chain to the backend; returns how many chains were
    /// completed (refused ones included).
    pub fn process_tx(&mut self) -> usize {
        let (backend, counters) = (&mut self.backend, &mut self.counters);
        self.common.serve_queue(TX_QUEUE, "virtio-net", |mem, desc_chain, warnings| {
            let frame = Chain::collect(desc_chain)
                .map_err(FrameError::Chain)
                .and_then(|chain| frame::read_tx_frame(mem, &chain));
            match frame {
                Ok(frame) => match backend.transmit(&frame) {
                    Ok(()) => {
                        counters.tx_frames = counters.tx_frames.saturating_add(1);
                        counters.tx_bytes = counters.tx_bytes.saturating_add(frame.len() as u64);
                    }
                    Err(e) => {
                        counters.tx_backend_dropped = counters.tx_backend_dropped.saturating_add(1);
                        crate::guest_warn!(*warnings, error = %e, "virtio-net: backend refused a guest frame, dropped");
                    }
                },
                Err(e) => {
                    counters.tx_malformed = counters.tx_malformed.saturating_add(1);
                    crate::guest_warn!(*warnings, error = %e, "virtio-net: malformed TX chain dropped");
                }
            }
            Some(0)
        })
    }

    /// Moves frames waiting in the backend into the guest's RX buffers, while both last;
    /// returns how many buffers were completed (refused ones included).
    pub fn process_rx(&mut self) -> usize {
        let (backend, counters) = (&mut self.backend, &mut self.counters);
        self.common.serve_queue(RX_QUEUE, "virtio-net", |mem, desc_chain, warnings| {
            let buffer = match Chain::collect(desc_chain).map_err(FrameError::Chain).and_then(frame::rx_buffer) {
                Ok(buffer) => buffer,
                Err(e) => {
                    counters.rx_buffers_malformed = counters.rx_buffers_malformed.saturating_add(1);
                    crate::guest_warn!(*warnings, error = %e, "virtio-net: malformed RX buffer refused");
                    return Some(0);
                }
            };
            // Frames that cannot go into any buffer are dropped here; the buffer waits for the
            // next frame (None puts it back when there is none).
            loop {
                let frame = backend.receive()?;
                match frame::write_rx_frame(mem, &buffer, &frame) {
                    Ok(used) => {
                        counters.rx_frames = counters.rx_frames.saturating_add(1);
                        counters.rx_bytes = counters.rx_bytes.saturating_add(frame.len() as u64);
                        return Some(used);
                    }
                    Err(e @ FrameError::FrameLength(_)) => {
                        counters.rx_frames_invalid = counters.rx_frames_invalid.saturating_add(1);
                        tracing::warn!(error = %e, "virtio-net: backend gave an invalid frame, dropped");
                    }
                    Err(e @ FrameError::FrameTooBigForBuffer { .. }) => {
                        counters.rx_frames_too_big = counters.rx_frames_too_big.saturating_add(1);
                        crate::guest_warn!(*warnings, error = %e, "virtio-net: RX buffer too small, frame dropped");
                    }
                    Err(e) => {
                        counters.rx_buffers_malformed = counters.rx_buffers_malformed.saturating_add(1);
                        crate::guest_warn!(*warnings, error = %e, "virtio-net: writing an RX frame failed, frame lost");
                        return Some(0);
                    }
                }
            }
        })
    }
}

impl<M: DeviceMemory> VirtioDevice<M> for Net<M> {
    crate::virtio_common_accessors!();

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        self.common.activate(ctx)?;
        // Frames may have waited for the driver.
        self.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u32) {
        match usize::try_from(queue_index) {
            Ok(RX_QUEUE) => {}
            Ok(TX_QUEUE) => {
                self.process_tx();
            }
            _ => {
                crate::guest_warn!(self.common.warnings, queue_index, "virtio-net: notify of a queue it lacks");
                return;
            }
        }
        // New RX buffers, or answers the backend produced while taking the guest's frames.
        self.process_rx();
    }

    fn event_fd(&self) -> Option<RawFd> {
        self.backend.event_fd()
    }

    fn process_events(&mut self) {
        self.backend.process_events();
        self.process_rx();
    }
}
