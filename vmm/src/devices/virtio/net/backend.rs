//! What carries the virtio-net device's frames on the host side: the [`NetBackend`] trait, and
//! [`BoundedFrameQueue`], the bounded, drop-on-full frame queue a backend keeps between the
//! device and whatever produces frames for the guest.
//!
//! This module owns the contract between the device and a backend. It never sees guest memory
//! or descriptors: a backend gets and hands out whole Ethernet frames (no virtio-net header),
//! already length-checked by the device. The sandbox network (the worker's smoltcp stack) is
//! one backend; [`super::loopback`] is another, for tests.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use thiserror::Error;

/// Why a backend did not take a guest frame (the device drops it and counts it).
#[derive(Debug, Error)]
pub enum BackendError {
    /// The backend's queue towards the host is full.
    #[error("backend queue is full ({capacity_frames} frames)")]
    Full {
        /// The queue's bound, in frames.
        capacity_frames: usize,
    },
    /// The host side is gone (the stack stopped).
    #[error("backend is disconnected")]
    Disconnected,
}

/// The host side of a virtio-net device.
///
/// Every method is called with the device locked, from a vCPU thread (queue notifications) or
/// from the device-event thread, so none may block or panic. Frames are plain Ethernet frames
/// of [`super::frame::MIN_FRAME_BYTES`]..=[`super::frame::MAX_FRAME_BYTES`] bytes.
///
/// The device pulls host→guest frames with [`NetBackend::receive`] only when the guest has an
/// RX buffer ready: frames the guest is not ready for stay in the backend, which must bound
/// them (drop on full and count, e.g. with a [`BoundedFrameQueue`]). The device pulls when the
/// guest adds RX buffers, after each TX burst, and when [`NetBackend::event_fd`] turns readable.
pub trait NetBackend: Send {
    /// A guest→host frame. The backend copies what it keeps; an error drops the frame.
    fn transmit(&mut self, frame: &[u8]) -> Result<(), BackendError>;

    /// The next host→guest frame, if one is waiting.
    fn receive(&mut self) -> Option<Vec<u8>>;

    /// A file descriptor the device-event thread waits on (level-triggered, readable) for
    /// host→guest frames; the same descriptor for the backend's whole life. `None`: the backend
    /// is only ever polled (frames then wait for the guest's next notification).
    fn event_fd(&self) -> Option<RawFd>;

    /// Called on the device-event thread when [`NetBackend::event_fd`] is readable, before the
    /// device pulls frames. It must leave the descriptor unreadable unless new work came in
    /// (read the eventfd, serve its own epoll), or the event thread spins.
    fn process_events(&mut self);
}

/// A FIFO of frames that holds at most `capacity_frames` and drops new frames when full,
/// counting them. Memory is bounded by `capacity_frames` × the longest frame pushed (the
/// device never hands over more than [`super::frame::MAX_FRAME_BYTES`]).
#[derive(Debug)]
pub struct BoundedFrameQueue {
    frames: VecDeque<Vec<u8>>,
    capacity_frames: usize,
    dropped_frames: u64,
}

impl BoundedFrameQueue {
    /// An empty queue of at most `capacity_frames` frames.
    pub fn new(capacity_frames: usize) -> Self {
        Self { frames: VecDeque::new(), capacity_frames, dropped_frames: 0 }
    }

    /// Appends `frame`, or drops and counts it when the queue is full.
    pub fn push(&mut self, frame: Vec<u8>) -> Result<(), BackendError> {
        if self.frames.len() >= self.capacity_frames {
            self.dropped_frames = self.dropped_frames.saturating_add(1);
            return Err(BackendError::Full { capacity_frames: self.capacity_frames });
        }
        self.frames.push_back(frame);
        Ok(())
    }

    /// The oldest frame.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames dropped because the queue was full.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped_frames
    }

    /// Drops every waiting frame (not counted as drops).
    pub fn clear(&mut self) {
        self.frames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_new_frames_and_counts_them() {
        let mut queue = BoundedFrameQueue::new(2);
        queue.push(vec![1]).unwrap();
        queue.push(vec![2]).unwrap();
        assert!(matches!(queue.push(vec![3]), Err(BackendError::Full { capacity_frames: 2 })));
        assert_eq!(queue.dropped_frames(), 1);
        assert_eq!(queue.pop(), Some(vec![1]), "oldest first, the dropped frame is not there");
        assert_eq!(queue.pop(), Some(vec![2]));
        assert!(queue.is_empty());
    }
}
