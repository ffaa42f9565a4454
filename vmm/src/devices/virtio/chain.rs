//! Turning a guest descriptor chain into validated segments, and copying bytes
//! between those segments and host buffers.
//!
//! Owns the checks every device needs before it touches a guest buffer: the
//! number of descriptors, each descriptor's address range lying in guest
//! memory, and the readable/writable direction. It never interprets what the
//! bytes mean; that is each device's job.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// The most descriptors we accept in one chain (the largest queue we offer).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// What was wrong with a descriptor chain.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The chain had no descriptors at all.
    #[error("descriptor chain is empty")]
    Empty,
    /// More descriptors than we accept.
    #[error("descriptor chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    /// A descriptor points outside guest memory.
    #[error("descriptor {index} at {addr:#x} with length {len} is not in guest memory")]
    OutOfMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer in bytes.
        len: u32,
    },
    /// A copy hit guest memory that vanished between the check and the copy.
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        /// Guest physical address of the failed access.
        addr: u64,
        /// The underlying vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One descriptor of a chain, already checked against guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device may write it (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// A descriptor chain whose every buffer lies in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor, given back in the used ring.
    pub head_index: u16,
    /// The descriptors in chain order.
    pub segments: Vec<Segment>,
}

impl Chain {
    /// Walks `chain` and checks every buffer against `mem`.
    pub fn collect<M>(mut chain: DescriptorChain<M>) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head_index = chain.head_index();
        let mut segments = Vec::new();
        let descs: Vec<_> = chain.by_ref().take(MAX_CHAIN_DESCRIPTORS + 1).collect();
        if descs.len() > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        let mem = chain.memory();
        for (index, desc) in descs.iter().enumerate() {
            let access = if desc.is_write_only() { Permissions::Write } else { Permissions::Read };
            if !mem.check_range(desc.addr(), desc.len() as usize, access) {
                return Err(ChainError::OutOfMemory { index, addr: desc.addr().raw_value(), len: desc.len() });
            }
            segments.push(Segment { addr: desc.addr(), len: desc.len(), writable: desc.is_write_only() });
        }
        if segments.is_empty() {
            return Err(ChainError::Empty);
        }
        Ok(Chain { head_index, segments })
    }
}

/// Total length of `segments`, in bytes.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Reads up to `max_bytes` from `segments` in order into a new buffer.
pub fn read_segments<M: GuestMemory>(mem: &M, segments: &[Segment], max_bytes: usize) -> Result<Vec<u8>, ChainError> {
    let want = usize::try_from(total_len(segments)).unwrap_or(usize::MAX).min(max_bytes);
    let mut out = vec![0u8; want];
    let mut done = 0;
    for seg in segments {
        if done == want {
            break;
        }
        let n = (seg.len as usize).min(want - done);
        mem.read_slice(&mut out[done..done + n], seg.addr)
            .map_err(|source| ChainError::Memory { addr: seg.addr.raw_value(), source })?;
        done += n;
    }
    Ok(out)
}

/// Writes `data` across `segments` in order; returns how many bytes fit.
pub fn write_segments<M: GuestMemory>(mem: &M, segments: &[Segment], data: &[u8]) -> Result<usize, ChainError> {
    let mut done = 0;
    for seg in segments {
        if done == data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], seg.addr)
            .map_err(|source| ChainError::Memory { addr: seg.addr.raw_value(), source })?;
        done += n;
    }
    Ok(done)
}
