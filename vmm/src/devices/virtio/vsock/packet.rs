//! The virtio-vsock packet: its 44-byte header (include/uapi/linux/virtio_vsock.h,
//! `struct virtio_vsock_hdr`), parsing of guest TX packets and writing of RX
//! packets into guest buffers.
//!
//! Owns the wire format and its validation; it never decides what a packet
//! means for a connection (that is the muxer's job). [`parse_tx_packet`] is
//! the fuzz entry point.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemory;

use crate::devices::virtio::chain::{read_segments, total_len, write_segments, Chain, ChainError};

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_BYTES: usize = 44;
/// Largest payload accepted or produced in one packet.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The host's CID (VMADDR_CID_HOST, include/uapi/linux/vm_sockets.h).
pub const HOST_CID: u64 = 2;
/// VIRTIO_VSOCK_TYPE_STREAM.
pub const TYPE_STREAM: u16 = 1;
/// VIRTIO_VSOCK_SHUTDOWN_RCV: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// VIRTIO_VSOCK_SHUTDOWN_SEND: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A vsock operation (VIRTIO_VSOCK_OP_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset.
    Rst = 3,
    /// Half or full shutdown (flags say which).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Ask the peer for credit information.
    CreditRequest = 7,
}

impl Op {
    /// Decodes a raw op; `None` for VIRTIO_VSOCK_OP_INVALID and unknown values.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire form.
    pub fn from_bytes(b: &[u8; HEADER_BYTES]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// What is wrong with a guest packet (the packet is dropped).
#[derive(Debug, Error)]
pub enum PacketError {
    /// The descriptor chain is bad.
    #[error("bad descriptor chain")]
    Chain(#[source] ChainError),
    /// A TX chain contained a device-writable descriptor.
    #[error("TX packet descriptor {0} is writable, TX descriptors must be readable")]
    WritableTxDescriptor(usize),
    /// An RX chain contained a read-only descriptor.
    #[error("RX buffer descriptor {0} is read-only, RX descriptors must be writable")]
    ReadOnlyRxDescriptor(usize),
    /// Fewer than 44 bytes.
    #[error("packet has {0} bytes, the header alone needs {HEADER_BYTES}")]
    TooShort(usize),
    /// `len` exceeds the payload limit.
    #[error("packet payload length {0} exceeds {MAX_PAYLOAD_BYTES} bytes")]
    PayloadTooBig(u32),
    /// `len` exceeds the bytes actually provided.
    #[error("header says {len} payload bytes, the descriptors hold {available}")]
    PayloadTruncated {
        /// Header's len.
        len: u32,
        /// Bytes present after the header.
        available: usize,
    },
    /// Not VIRTIO_VSOCK_TYPE_STREAM.
    #[error("packet type {0} is not STREAM (1)")]
    BadType(u16),
    /// Unknown op.
    #[error("packet op {0} is not a valid vsock op")]
    BadOp(u16),
    /// The guest forged its source CID.
    #[error("packet src_cid {got} is not the guest CID {expected}")]
    BadSrcCid {
        /// CID in the packet.
        got: u64,
        /// The guest's CID.
        expected: u64,
    },
    /// Writing an RX packet failed.
    #[error("RX buffer of {available} bytes cannot hold a {needed}-byte packet")]
    RxBufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes the chain provides.
        available: u64,
    },
}

/// A validated packet from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header (fields as sent).
    pub header: Header,
    /// The decoded op.
    pub op: Op,
    /// The payload (`header.len` bytes; empty for non-RW ops).
    pub payload: Vec<u8>,
}

/// Parses and validates guest packet bytes (header followed by payload).
pub fn parse_tx_packet(bytes: &[u8], guest_cid: u64) -> Result<TxPacket, PacketError> {
    let Some(raw) = bytes.get(..HEADER_BYTES) else {
        return Err(PacketError::TooShort(bytes.len()));
    };
    let raw: &[u8; HEADER_BYTES] = raw.try_into().map_err(|_| PacketError::TooShort(bytes.len()))?;
    let header = Header::from_bytes(raw);
    if header.type_ != TYPE_STREAM {
        return Err(PacketError::BadType(header.type_));
    }
    let op = Op::from_raw(header.op).ok_or(PacketError::BadOp(header.op))?;
    if header.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid { got: header.src_cid, expected: guest_cid });
    }
    let payload = if op == Op::Rw {
        let len = header.len as usize;
        if len > MAX_PAYLOAD_BYTES {
            return Err(PacketError::PayloadTooBig(header.len));
        }
        let available = bytes.len() - HEADER_BYTES;
        if len > available {
            return Err(PacketError::PayloadTruncated { len: header.len, available });
        }
        bytes[HEADER_BYTES..HEADER_BYTES + len].to_vec()
    } else {
        Vec::new()
    };
    Ok(TxPacket { header, op, payload })
}

/// Reads a TX chain (all descriptors readable) and parses the packet.
pub fn read_tx_chain<M: GuestMemory>(mem: &M, chain: &Chain, guest_cid: u64) -> Result<TxPacket, PacketError> {
    if let Some(i) = chain.segments.iter().position(|s| s.writable) {
        return Err(PacketError::WritableTxDescriptor(i));
    }
    let bytes = read_segments(mem, &chain.segments, HEADER_BYTES + MAX_PAYLOAD_BYTES).map_err(PacketError::Chain)?;
    parse_tx_packet(&bytes, guest_cid)
}

/// Payload room of an RX chain (all descriptors writable, ≥44 bytes).
pub fn rx_payload_capacity(chain: &Chain) -> Result<usize, PacketError> {
    if let Some(i) = chain.segments.iter().position(|s| !s.writable) {
        return Err(PacketError::ReadOnlyRxDescriptor(i));
    }
    let total = total_len(&chain.segments);
    if total < HEADER_BYTES as u64 {
        return Err(PacketError::RxBufferTooSmall { needed: HEADER_BYTES, available: total });
    }
    Ok(((total - HEADER_BYTES as u64) as usize).min(MAX_PAYLOAD_BYTES))
}

/// Writes header and payload into an RX chain; returns the bytes written.
pub fn write_rx_packet<M: GuestMemory>(
    mem: &M,
    chain: &Chain,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let capacity = rx_payload_capacity(chain)?;
    if payload.len() > capacity {
        return Err(PacketError::RxBufferTooSmall {
            needed: HEADER_BYTES + payload.len(),
            available: total_len(&chain.segments),
        });
    }
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(payload);
    let n = write_segments(mem, &chain.segments, &bytes).map_err(PacketError::Chain)?;
    Ok(n as u32)
}
