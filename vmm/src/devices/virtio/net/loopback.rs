//! An in-memory [`NetBackend`] for tests, fuzzing and bring-up: two bounded frame queues
//! between the device ([`LoopbackBackend`]) and test code ([`LoopbackPeer`]), plus an eventfd
//! that the peer kicks when it queues a frame for the guest.
//!
//! It is not the sandbox network and reaches nothing: frames the guest sends only wait for the
//! peer to take them. It never blocks; each direction holds at most the capacity it was made
//! with and drops (and counts) frames past it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BackendError, BoundedFrameQueue, NetBackend};

/// Frames each direction of [`loopback_pair`] holds by default (at most 256 × 64 KiB each way;
/// 384 KiB at MTU 1500).
pub const DEFAULT_LOOPBACK_CAPACITY_FRAMES: usize = 256;

#[derive(Debug)]
struct Queues {
    to_guest: BoundedFrameQueue,
    from_guest: BoundedFrameQueue,
}

/// Both ends' view of the queues.
#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<Queues>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The device's end: hand it to [`super::Net::new`].
#[derive(Debug)]
pub struct LoopbackBackend {
    queues: Shared,
    to_guest_event: EventFd,
}

/// The test's end: queues frames for the guest and takes the guest's.
#[derive(Debug)]
pub struct LoopbackPeer {
    queues: Shared,
    to_guest_event: EventFd,
}

/// A connected backend and peer, each direction bounded to `capacity_frames` frames.
pub fn loopback_pair(capacity_frames: usize) -> std::io::Result<(LoopbackBackend, LoopbackPeer)> {
    let queues = Shared(Arc::new(Mutex::new(Queues {
        to_guest: BoundedFrameQueue::new(capacity_frames),
        from_guest: BoundedFrameQueue::new(capacity_frames),
    })));
    let event = EventFd::new(EFD_NONBLOCK)?;
    let peer = LoopbackPeer { queues: queues.clone(), to_guest_event: event.try_clone()? };
    Ok((LoopbackBackend { queues, to_guest_event: event }, peer))
}

impl LoopbackPeer {
    /// Queues `frame` for the guest and wakes the device; false when the queue was full and the
    /// frame was dropped.
    pub fn send_to_guest(&self, frame: Vec<u8>) -> bool {
        if self.queues.lock().to_guest.push(frame).is_err() {
            return false;
        }
        if let Err(e) = self.to_guest_event.write(1) {
            tracing::error!(error = %e, "virtio-net loopback: could not wake the device");
        }
        true
    }

    /// The oldest frame the guest sent.
    pub fn take_from_guest(&self) -> Option<Vec<u8>> {
        self.queues.lock().from_guest.pop()
    }

    /// Frames waiting for the guest.
    pub fn pending_to_guest(&self) -> usize {
        self.queues.lock().to_guest.len()
    }

    /// Frames for the guest dropped because their queue was full.
    pub fn dropped_to_guest(&self) -> u64 {
        self.queues.lock().to_guest.dropped_frames()
    }

    /// Guest frames dropped because their queue was full.
    pub fn dropped_from_guest(&self) -> u64 {
        self.queues.lock().from_guest.dropped_frames()
    }
}

impl NetBackend for LoopbackBackend {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        self.queues.lock().from_guest.push(frame.to_vec())
    }

    fn receive(&mut self) -> Option<Vec<u8>> {
        self.queues.lock().to_guest.pop()
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.to_guest_event.as_raw_fd())
    }

    fn process_events(&mut self) {
        // Clears the kick; frames still queued are pulled by the device right after, or when
        // the guest next adds RX buffers.
        let _ = self.to_guest_event.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_both_ways_and_the_kick_clears() {
        let (mut backend, peer) = loopback_pair(1).unwrap();
        assert!(peer.send_to_guest(vec![1; 20]));
        assert!(!peer.send_to_guest(vec![2; 20]), "the second frame is past the bound");
        assert_eq!(peer.dropped_to_guest(), 1);
        backend.process_events();
        assert!(backend.to_guest_event.read().is_err(), "the kick was cleared (would block)");
        assert_eq!(backend.receive(), Some(vec![1; 20]));
        assert_eq!(backend.receive(), None);

        backend.transmit(&[3; 20]).unwrap();
        assert!(backend.transmit(&[4; 20]).is_err());
        assert_eq!(peer.take_from_guest(), Some(vec![3; 20]));
        assert_eq!(peer.dropped_from_guest(), 1);
    }
}
