//! The virtio-net wire format on the queues: the 12-byte `struct virtio_net_hdr_v1`
//! (include/uapi/linux/virtio_net.h) in front of every Ethernet frame, reading a guest TX chain
//! into a frame ([`read_tx_frame`], also the fuzz entry point) and writing a host frame into a
//! guest RX buffer ([`rx_buffer`], [`write_rx_frame`]).
//!
//! Owns the validation of every TX and RX descriptor chain: direction, descriptor count
//! ([`MAX_FRAME_DESCRIPTORS`]), total length ([`MAX_TX_CHAIN_BYTES`]) and the header the guest
//! sends. No offload is negotiated, so a TX header asking for one is refused, and RX headers say
//! "no checksum help, no GSO, one buffer". It never decides where a frame goes (that is the
//! backend's job) and never panics on guest input: a bad chain is an error the device counts.

use thiserror::Error;
use virtio_bindings::virtio_net::{virtio_net_hdr_v1, VIRTIO_NET_HDR_GSO_NONE};
use vm_memory::GuestMemory;

use crate::devices::virtio::chain::{read_segments, total_len, write_segments, Chain, ChainError, Segment};

/// Size of `struct virtio_net_hdr_v1`: what precedes every frame on both queues (VERSION_1
/// always uses it, with or without VIRTIO_NET_F_MRG_RXBUF).
pub const HEADER_BYTES: usize = std::mem::size_of::<virtio_net_hdr_v1>();
const _: () = assert!(HEADER_BYTES == 12);
/// Shortest Ethernet frame accepted either way: a whole Ethernet header (destination, source,
/// EtherType). A header-only chain (no frame at all) is refused.
pub const MIN_FRAME_BYTES: usize = 14;
/// Longest TX chain accepted, virtio-net header included, in bytes: 64 KiB plus an Ethernet
/// header's 14 bytes. Far above what a guest without GSO sends (1514 bytes at MTU 1500).
pub const MAX_TX_CHAIN_BYTES: usize = 65550;
/// Longest Ethernet frame accepted either way (the TX cap less the header).
pub const MAX_FRAME_BYTES: usize = MAX_TX_CHAIN_BYTES - HEADER_BYTES;
/// Most descriptors in one TX or RX chain. Linux sends at most MAX_SKB_FRAGS + 2 (19, or 47
/// with the largest CONFIG_MAX_SKB_FRAGS) and posts one-descriptor RX buffers without offloads.
pub const MAX_FRAME_DESCRIPTORS: usize = 64;

// Byte offsets in `struct virtio_net_hdr_v1` (little endian, VERSION_1).
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: usize = 10;

/// What is wrong with a TX chain, an RX buffer or a frame (the chain is then completed with
/// used length 0, the frame dropped and counted).
#[derive(Debug, Error)]
pub enum FrameError {
    /// The chain itself is bad (outside memory, empty, longer than the generic cap).
    #[error("bad descriptor chain")]
    Chain(#[source] ChainError),
    /// More descriptors than [`MAX_FRAME_DESCRIPTORS`].
    #[error("chain has {0} descriptors, at most {MAX_FRAME_DESCRIPTORS} are accepted")]
    TooManyDescriptors(usize),
    /// A TX descriptor is device-writable.
    #[error("TX descriptor {0} is device-writable, TX buffers must be read-only")]
    TxWritable(usize),
    /// An RX descriptor is read-only.
    #[error("RX descriptor {0} is read-only, RX buffers must be device-writable")]
    RxReadOnly(usize),
    /// The TX chain holds less than a header and an Ethernet header.
    #[error("TX chain holds {0} bytes, needs {HEADER_BYTES} of header and {MIN_FRAME_BYTES} of frame")]
    TxTooShort(u64),
    /// The TX chain holds more than [`MAX_TX_CHAIN_BYTES`].
    #[error("TX chain holds {0} bytes, at most {MAX_TX_CHAIN_BYTES} are accepted")]
    TxTooLong(u64),
    /// The TX header asks for an offload that was not negotiated.
    #[error("TX header asks for an offload (flags {flags:#x}, gso_type {gso_type}) that was not negotiated")]
    TxOffload {
        /// The header's flags byte.
        flags: u8,
        /// The header's gso_type byte.
        gso_type: u8,
    },
    /// The RX buffer cannot hold the header and the shortest frame.
    #[error("RX buffer holds {0} bytes, less than {HEADER_BYTES} of header and {MIN_FRAME_BYTES} of frame")]
    RxBufferTooSmall(u64),
    /// A host frame outside [`MIN_FRAME_BYTES`]..=[`MAX_FRAME_BYTES`].
    #[error("host frame of {0} bytes is outside {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}")]
    FrameLength(usize),
    /// A frame does not fit the RX buffer it was offered.
    #[error("host frame of {frame} bytes does not fit an RX buffer of {capacity} bytes")]
    FrameTooBigForBuffer {
        /// Frame length (without header).
        frame: usize,
        /// Room for a frame in the buffer (its length less the header).
        capacity: usize,
    },
    /// Copying to or from guest memory failed.
    #[error("copying the frame failed")]
    Copy(#[source] ChainError),
}

/// Checks the descriptor count shared by both directions.
fn check_descriptor_count(chain: &Chain) -> Result<(), FrameError> {
    if chain.segments.len() > MAX_FRAME_DESCRIPTORS {
        return Err(FrameError::TooManyDescriptors(chain.segments.len()));
    }
    Ok(())
}

/// Reads one guest TX chain: every descriptor read-only, header plus frame within
/// [`HEADER_BYTES`] + [`MIN_FRAME_BYTES`]..=[`MAX_TX_CHAIN_BYTES`], no offload asked for.
/// Returns the Ethernet frame, header stripped.
pub fn read_tx_frame<M: GuestMemory>(mem: &M, chain: &Chain) -> Result<Vec<u8>, FrameError> {
    check_descriptor_count(chain)?;
    if let Some(index) = chain.segments.iter().position(|s| s.writable) {
        return Err(FrameError::TxWritable(index));
    }
    let len = total_len(&chain.segments);
    let min = (HEADER_BYTES + MIN_FRAME_BYTES) as u64;
    if len < min {
        return Err(FrameError::TxTooShort(len));
    }
    if len > MAX_TX_CHAIN_BYTES as u64 {
        return Err(FrameError::TxTooLong(len));
    }
    let mut bytes = read_segments(mem, &chain.segments, MAX_TX_CHAIN_BYTES).map_err(FrameError::Copy)?;
    check_tx_header(&bytes)?;
    bytes.drain(..HEADER_BYTES);
    Ok(bytes)
}

/// Refuses a header that asks for checksum or segmentation help: neither VIRTIO_NET_F_CSUM nor
/// any GSO feature is offered. `num_buffers` is not looked at (Linux leaves it unset on TX).
fn check_tx_header(bytes: &[u8]) -> Result<(), FrameError> {
    let flags = bytes.get(HDR_FLAGS).copied().unwrap_or(0);
    let gso_type = bytes.get(HDR_GSO_TYPE).copied().unwrap_or(0);
    if flags != 0 || u32::from(gso_type) != VIRTIO_NET_HDR_GSO_NONE {
        return Err(FrameError::TxOffload { flags, gso_type });
    }
    Ok(())
}

/// A validated guest RX buffer: device-writable descriptors with room for the header and a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    segments: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Room for a frame, in bytes: the buffer's length less the header, at least
    /// [`MIN_FRAME_BYTES`] and at most [`MAX_FRAME_BYTES`].
    pub fn frame_capacity(&self) -> usize {
        self.capacity
    }
}

/// Checks one guest RX chain: every descriptor device-writable, at most
/// [`MAX_FRAME_DESCRIPTORS`], room for the header and at least the shortest frame (a buffer no
/// frame fits is refused, rather than dropping every frame offered to it).
pub fn rx_buffer(chain: Chain) -> Result<RxBuffer, FrameError> {
    check_descriptor_count(&chain)?;
    if let Some(index) = chain.segments.iter().position(|s| !s.writable) {
        return Err(FrameError::RxReadOnly(index));
    }
    let len = total_len(&chain.segments);
    let room = len
        .checked_sub(HEADER_BYTES as u64)
        .filter(|room| *room >= MIN_FRAME_BYTES as u64)
        .ok_or(FrameError::RxBufferTooSmall(len))?;
    let capacity = usize::try_from(room).unwrap_or(usize::MAX).min(MAX_FRAME_BYTES);
    Ok(RxBuffer { segments: chain.segments, capacity })
}

/// Checks a host frame's length against [`MIN_FRAME_BYTES`]..=[`MAX_FRAME_BYTES`].
pub fn check_host_frame(frame: &[u8]) -> Result<(), FrameError> {
    if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&frame.len()) {
        return Err(FrameError::FrameLength(frame.len()));
    }
    Ok(())
}

/// Writes the RX header (no flags, GSO_NONE, `num_buffers` 1) and `frame` into `buffer`; returns
/// the used length (header plus frame). The frame must fit ([`RxBuffer::frame_capacity`]).
pub fn write_rx_frame<M: GuestMemory>(mem: &M, buffer: &RxBuffer, frame: &[u8]) -> Result<u32, FrameError> {
    check_host_frame(frame)?;
    if frame.len() > buffer.capacity {
        return Err(FrameError::FrameTooBigForBuffer { frame: frame.len(), capacity: buffer.capacity });
    }
    let mut bytes = Vec::with_capacity(HEADER_BYTES + frame.len());
    bytes.extend_from_slice(&rx_header());
    bytes.extend_from_slice(frame);
    let written = write_segments(mem, &buffer.segments, &bytes).map_err(FrameError::Copy)?;
    // At most MAX_TX_CHAIN_BYTES: the frame was checked above.
    Ok(u32::try_from(written).unwrap_or(u32::MAX))
}

/// The header of every RX frame: flags 0 (no VIRTIO_NET_F_GUEST_CSUM), gso_type
/// VIRTIO_NET_HDR_GSO_NONE, and `num_buffers` 1, as the spec asks of a device without
/// VIRTIO_NET_F_MRG_RXBUF.
pub fn rx_header() -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[HDR_GSO_TYPE] = VIRTIO_NET_HDR_GSO_NONE as u8;
    header[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, write_bytes};
    use vm_memory::GuestAddress;

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment { addr: GuestAddress(addr), len, writable }
    }

    fn chain(segments: Vec<Segment>) -> Chain {
        Chain { head_index: 0, segments }
    }

    #[test]
    fn each_bad_tx_chain_is_refused_for_its_own_reason() {
        let mem = guest_memory();
        let frame_len = (HEADER_BYTES + MIN_FRAME_BYTES) as u32;
        let writable = chain(vec![seg(0, HEADER_BYTES as u32, false), seg(0x100, 60, true)]);
        assert!(matches!(read_tx_frame(&mem, &writable), Err(FrameError::TxWritable(1))));
        let header_only = chain(vec![seg(0, HEADER_BYTES as u32, false)]);
        assert!(matches!(read_tx_frame(&mem, &header_only), Err(FrameError::TxTooShort(12))));
        let over = chain(vec![seg(0, MAX_TX_CHAIN_BYTES as u32 - 1, false), seg(0, 2, false)]);
        assert!(matches!(read_tx_frame(&mem, &over), Err(FrameError::TxTooLong(65551))));
        let many = chain(vec![seg(0, 1, false); MAX_FRAME_DESCRIPTORS + 1]);
        assert!(matches!(read_tx_frame(&mem, &many), Err(FrameError::TooManyDescriptors(65))));
        write_bytes(&mem, 0, &[0, 4]); // gso_type VIRTIO_NET_HDR_GSO_TCPV6
        let gso = chain(vec![seg(0, frame_len, false)]);
        assert!(matches!(read_tx_frame(&mem, &gso), Err(FrameError::TxOffload { flags: 0, gso_type: 4 })));
        write_bytes(&mem, 0, &[0, 0]);
        assert_eq!(read_tx_frame(&mem, &gso).unwrap().len(), MIN_FRAME_BYTES, "the same chain, header fixed");
    }

    #[test]
    fn each_bad_rx_buffer_is_refused_for_its_own_reason() {
        let read_only = chain(vec![seg(0, 100, true), seg(0x100, 100, false)]);
        assert!(matches!(rx_buffer(read_only), Err(FrameError::RxReadOnly(1))));
        let small = chain(vec![seg(0, 6, true), seg(0x100, 5, true)]);
        assert!(matches!(rx_buffer(small), Err(FrameError::RxBufferTooSmall(11))));
        let many = chain(vec![seg(0, 64, true); MAX_FRAME_DESCRIPTORS + 1]);
        assert!(matches!(rx_buffer(many), Err(FrameError::TooManyDescriptors(65))));
    }

    #[test]
    fn a_frame_is_written_only_into_a_buffer_it_fits() {
        let mem = guest_memory();
        let buffer = rx_buffer(chain(vec![seg(0x1000, (HEADER_BYTES + 20) as u32, true)])).unwrap();
        assert!(matches!(
            write_rx_frame(&mem, &buffer, &[0; 21]),
            Err(FrameError::FrameTooBigForBuffer { frame: 21, capacity: 20 })
        ));
        assert_eq!(write_rx_frame(&mem, &buffer, &[0; 20]).unwrap(), (HEADER_BYTES + 20) as u32);
    }

    #[test]
    fn the_rx_header_says_one_buffer_and_no_offload() {
        assert_eq!(rx_header(), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn an_rx_buffer_caps_its_capacity_at_the_largest_frame() {
        let chain = Chain { head_index: 0, segments: vec![seg(0, u32::MAX, true), seg(0, u32::MAX, true)] };
        assert_eq!(rx_buffer(chain).unwrap().frame_capacity(), MAX_FRAME_BYTES);
        let smallest = Chain { head_index: 0, segments: vec![seg(0, (HEADER_BYTES + MIN_FRAME_BYTES) as u32, true)] };
        assert_eq!(rx_buffer(smallest).unwrap().frame_capacity(), MIN_FRAME_BYTES);
        let header_only = Chain { head_index: 0, segments: vec![seg(0, HEADER_BYTES as u32, true)] };
        assert!(matches!(rx_buffer(header_only), Err(FrameError::RxBufferTooSmall(12))));
    }

    #[test]
    fn host_frames_outside_the_ethernet_bounds_are_refused() {
        assert!(check_host_frame(&[0; MIN_FRAME_BYTES - 1]).is_err());
        assert!(check_host_frame(&[0; MIN_FRAME_BYTES]).is_ok());
        assert!(check_host_frame(&vec![0; MAX_FRAME_BYTES]).is_ok());
        assert!(check_host_frame(&vec![0; MAX_FRAME_BYTES + 1]).is_err());
    }
}
