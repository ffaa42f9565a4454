//! The smoltcp [`Device`] the stack's interface runs on: frames the guest sent wait in a small
//! queue until the next poll, and frames smoltcp emits go into the bounded, drop-on-full
//! [`BoundedFrameQueue`] the virtio-net device pulls from.
//!
//! It owns only those two queues. It never parses a frame and never blocks.

use std::collections::VecDeque;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::devices::virtio::net::BoundedFrameQueue;

/// Frames queued for the guest at most (at MTU 1500, 384 KiB).
pub const TO_GUEST_CAPACITY_FRAMES: usize = 256;
/// Guest frames waiting for the next poll at most (the stack polls after every frame, so more
/// than one only waits while a poll is under way).
pub const FROM_GUEST_CAPACITY_FRAMES: usize = 64;
/// Largest Ethernet frame either way: MTU plus the 14-byte Ethernet header.
pub const MAX_ETHERNET_FRAME_BYTES: usize = super::MTU_BYTES + 14;

/// The two frame queues between the virtio-net device and smoltcp.
#[derive(Debug)]
pub struct FrameDevice {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: BoundedFrameQueue,
}

impl Default for FrameDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDevice {
    /// Empty queues.
    pub fn new() -> Self {
        Self {
            from_guest: VecDeque::with_capacity(FROM_GUEST_CAPACITY_FRAMES),
            to_guest: BoundedFrameQueue::new(TO_GUEST_CAPACITY_FRAMES),
        }
    }

    /// Queues a guest frame for smoltcp; false (dropped) when the queue is full.
    pub fn push_from_guest(&mut self, frame: &[u8]) -> bool {
        if self.from_guest.len() >= FROM_GUEST_CAPACITY_FRAMES {
            return false;
        }
        self.from_guest.push_back(frame.to_vec());
        true
    }

    /// The oldest frame for the guest.
    pub fn pop_to_guest(&mut self) -> Option<Vec<u8>> {
        self.to_guest.pop()
    }

    /// Frames for the guest dropped because their queue was full.
    pub fn dropped_to_guest(&self) -> u64 {
        self.to_guest.dropped_frames()
    }
}

/// A guest frame, handed to smoltcp.
pub struct RxFrame(Vec<u8>);

/// Room for one frame towards the guest.
pub struct TxFrame<'a>(&'a mut BoundedFrameQueue);

impl phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxFrame<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        // A full queue drops the frame and counts it; TCP retransmits.
        let _ = self.0.push(frame);
        result
    }
}

impl Device for FrameDevice {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxFrame<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxFrame(frame), TxFrame(&mut self.to_guest)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        // With the queue full, smoltcp keeps what it would send and tries again next poll.
        if self.to_guest.len() >= TO_GUEST_CAPACITY_FRAMES {
            return None;
        }
        Some(TxFrame(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_ETHERNET_FRAME_BYTES;
        caps
    }
}
