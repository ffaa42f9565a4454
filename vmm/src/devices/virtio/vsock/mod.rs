//! virtio-vsock (device ID 19), hybrid: guest vsock streams are carried to
//! host Unix sockets by the [`muxer`], each stream a [`csm`] connection state
//! machine, with the [`handshake`] lines on the host side, as in Firecracker.
//!
//! Owns the three queues (RX 0, TX 1, event 2), moving validated packets
//! between them and the muxer, and the transport-reset event sent after a
//! snapshot restore. It never interprets connection state itself.

pub mod csm;
pub mod handshake;
pub mod kill_queue;
pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use vm_memory::Bytes;

use super::chain::Chain;
use super::device::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMemory, VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1_BIT,
};
use crate::persist::Persist;
use muxer::{Muxer, MuxerError};
use packet::{read_tx_chain, rx_payload_capacity, write_rx_packet, EVENT_TRANSPORT_RESET};

/// Device ID (include/uapi/linux/virtio_ids.h).
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Default guest CID.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Size of each of the three queues.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// TX queue index.
pub const TX_QUEUE: usize = 1;
/// Event queue index.
pub const EVENT_QUEUE: usize = 2;

/// Why a vsock device could not be created.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 and u32::MAX are not guest CIDs).
    #[error("guest CID {0} is reserved; use 3 or above")]
    ReservedCid(u64),
    /// The host listener could not be set up.
    #[error("vsock muxer failed to start")]
    Muxer(#[source] MuxerError),
}

/// Serde description of a vsock device, for configuration and snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Host Unix socket: host processes connect here; guest connects to port P
    /// reach `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// The vsock device.
pub struct Vsock<M> {
    config: VsockConfig,
    muxer: Muxer,
    common: VirtioCommon<M>,
}

impl<M> Vsock<M> {
    /// Binds the host listener at `config.uds_path`.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= packet::HOST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let muxer = Muxer::new(config.guest_cid, &config.uds_path).map_err(VsockError::Muxer)?;
        Ok(Self {
            config,
            muxer,
            common: VirtioCommon::new(VIRTIO_ID_VSOCK, VIRTIO_F_VERSION_1_BIT, &[VSOCK_QUEUE_SIZE; 3]),
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

/// What a snapshot keeps of a vsock device: the guest's CID. Connections are not kept (the
/// host side of each is a socket of the old process): a restored device starts with none and
/// the wiring sends the guest a transport reset once the device is active again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
}

impl<M> Persist for Vsock<M> {
    type State = VsockState;
    /// The host Unix socket to bind (a fork gets its own).
    type ConstructorArgs = PathBuf;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState { guest_cid: self.config.guest_cid }
    }

    fn restore(uds_path: PathBuf, state: &VsockState) -> Result<Self, VsockError> {
        Self::new(VsockConfig { guest_cid: state.guest_cid, uds_path })
    }
}

impl<M: DeviceMemory> Vsock<M> {
    /// Processes the guest's TX queue; returns how many packets were consumed.
    pub fn process_tx(&mut self) -> usize {
        let guest_cid = self.config.guest_cid;
        let muxer = &mut self.muxer;
        self.common.serve_queue(TX_QUEUE, "vsock", |mem, desc_chain, warnings| {
            let packet = Chain::collect(desc_chain)
                .map_err(packet::PacketError::Chain)
                .and_then(|chain| read_tx_chain(mem, &chain, guest_cid));
            match packet {
                Ok(pkt) => muxer.handle_guest_packet(pkt),
                Err(e) => crate::guest_warn!(*warnings, error = %e, "vsock: malformed TX packet dropped"),
            }
            Some(0)
        })
    }

    /// Moves pending packets from the muxer into the guest's RX buffers;
    /// returns how many were delivered.
    pub fn process_rx(&mut self) -> usize {
        let muxer = &mut self.muxer;
        self.common.serve_queue(RX_QUEUE, "vsock", |mem, desc_chain, warnings| {
            if !muxer.has_rx() {
                return None;
            }
            let buffer = Chain::collect(desc_chain)
                .map_err(packet::PacketError::Chain)
                .and_then(|chain| rx_payload_capacity(&chain).map(|cap| (chain, cap)));
            match buffer {
                Ok((chain, cap)) => {
                    let (header, payload) = muxer.next_rx(cap)?;
                    Some(match write_rx_packet(mem, &chain, &header, &payload) {
                        Ok(n) => n,
                        Err(e) => {
                            crate::guest_warn!(*warnings, error = %e, "vsock: writing RX packet failed, packet lost");
                            0
                        }
                    })
                }
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "vsock: malformed RX buffer rejected");
                    Some(0)
                }
            }
        })
    }

    /// Tells the guest driver that all connections are gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), e.g. after a snapshot restore,
    /// and drops every connection on the host side.
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset();
        if !self.common.is_activated() {
            tracing::warn!("vsock: transport reset before activation, nothing to tell the guest");
            return;
        }
        let mut sent = false;
        let served = self.common.serve_queue(EVENT_QUEUE, "vsock", |mem, desc_chain, warnings| {
            if std::mem::replace(&mut sent, true) {
                return None;
            }
            // struct virtio_vsock_event { __le32 id; }
            Some(match Chain::collect(desc_chain) {
                Ok(chain) => match chain.segments.first() {
                    Some(seg) if seg.writable && seg.len >= 4 => {
                        match mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), seg.addr) {
                            Ok(()) => 4,
                            Err(e) => {
                                crate::guest_warn!(*warnings, error = %e, "vsock: writing reset event failed");
                                0
                            }
                        }
                    }
                    _ => {
                        crate::guest_warn!(*warnings, "vsock: event buffer not writable or shorter than 4 bytes");
                        0
                    }
                },
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "vsock: malformed event buffer");
                    0
                }
            })
        });
        if served == 0 {
            crate::guest_warn!(self.common.warnings, "vsock: no event buffer for transport reset");
        }
    }
}

impl<M: DeviceMemory> VirtioDevice<M> for Vsock<M> {
    crate::virtio_common_accessors!();

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { __le64 guest_cid; }
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
        self.common.activate(ctx)?;
        // Host connections may have arrived before the driver was ready.
        self.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u32) {
        match queue_index as usize {
            RX_QUEUE => {}
            TX_QUEUE => {
                self.process_tx();
            }
            EVENT_QUEUE => return,
            _ => return,
        }
        self.process_rx();
    }

    fn reset(&mut self) {
        self.muxer.reset();
        self.common.reset();
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_events(&mut self) {
        self.muxer.process_events();
        self.process_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::Mem;
    use crate::persist::test_util::round_trip;

    #[test]
    fn a_vsock_device_round_trips_onto_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.sock");
        let fork = dir.path().join("fork.sock");
        let device: Vsock<Mem> = Vsock::new(VsockConfig { guest_cid: 7, uds_path: parent.clone() }).unwrap();
        let restored = round_trip(&device, fork.clone());
        let mut cid = [0u8; 8];
        restored.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 7);
        assert_eq!(restored.connection_count(), 0, "connections are not carried over");
        std::os::unix::net::UnixStream::connect(&fork).expect("the restored device listens on its new socket");
        std::os::unix::net::UnixStream::connect(&parent).expect("the parent keeps its own");
    }
}
