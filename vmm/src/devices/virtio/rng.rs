//! virtio-rng (device ID 4): fills the guest's writable buffers with bytes
//! from the host kernel's `getrandom(2)`.
//!
//! Owns the single request queue. It never blocks (getrandom on the urandom
//! pool) and gives at most [`MAX_RNG_BYTES_PER_REQUEST`] per request.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::chain::{write_segments, Chain, Segment};
use super::device::{DeviceMemory, VirtioCommon, VirtioDevice};
use crate::devices::guest_log::GuestWarnLimiter;
use crate::persist::Persist;

/// Device ID (include/uapi/linux/virtio_ids.h).
pub const VIRTIO_ID_RNG: u32 = 4;
/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most entropy bytes handed out per request.
pub const MAX_RNG_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Why the host could not produce random bytes.
#[derive(Debug, Error)]
pub enum RngError {
    /// getrandom(2) failed.
    #[error("getrandom failed")]
    GetRandom(#[source] std::io::Error),
}

/// Fills `buf` from getrandom(2).
pub fn fill_random(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // byte slice; getrandom writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(err));
        }
        done += n as usize;
    }
    Ok(())
}

/// The entropy device.
pub struct Rng<M> {
    common: VirtioCommon<M>,
}

impl<M> Default for Rng<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Rng<M> {
    /// A new, not yet activated entropy device.
    pub fn new() -> Self {
        Self { common: VirtioCommon::new(VIRTIO_ID_RNG, super::device::VIRTIO_F_VERSION_1_BIT, &[RNG_QUEUE_SIZE]) }
    }
}

/// What a snapshot keeps of the entropy device: nothing but that it exists (its queue lives
/// in the transport's state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

impl<M> Persist for Rng<M> {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> RngState {
        RngState {}
    }

    fn restore((): (), _state: &RngState) -> Result<Self, Self::Error> {
        Ok(Self::new())
    }
}

impl<M: DeviceMemory> Rng<M> {
    /// Serves every pending request; returns how many were completed.
    pub fn process_queue(&mut self) -> usize {
        self.common.serve_queue(0, "virtio-rng", |mem, desc_chain, warnings| {
            Some(match Chain::collect(desc_chain) {
                Ok(chain) => fill_request(mem, &chain.segments, warnings),
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "virtio-rng: malformed request rejected");
                    0
                }
            })
        })
    }
}

/// Writes random bytes into the writable segments; returns the byte count.
fn fill_request<M: DeviceMemory>(mem: &M, segments: &[Segment], warnings: &mut GuestWarnLimiter) -> u32 {
    let writable: Vec<Segment> = segments.iter().copied().filter(|s| s.writable).collect();
    let want = super::chain::total_len(&writable).min(MAX_RNG_BYTES_PER_REQUEST as u64) as usize;
    let mut bytes = vec![0u8; want];
    if let Err(e) = fill_random(&mut bytes) {
        tracing::error!(error = %e, "virtio-rng: no entropy, request gets 0 bytes");
        return 0;
    }
    match write_segments(mem, &writable, &bytes) {
        Ok(n) => n as u32,
        Err(e) => {
            crate::guest_warn!(*warnings, error = %e, "virtio-rng: writing entropy failed");
            0
        }
    }
}

impl<M: DeviceMemory> VirtioDevice<M> for Rng<M> {
    crate::virtio_common_accessors!();

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn queue_notify(&mut self, _queue_index: u32) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{activate, guest_memory, Driver, Mem};
    use crate::persist::test_util::round_trip;

    #[test]
    fn the_entropy_device_round_trips_and_still_fills_buffers() {
        let rng: Rng<Mem> = Rng::new();
        let mut restored = round_trip(&rng, ());
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0);
        let _irq = activate(&mut restored, &mem, vec![driver.queue()]);
        driver.add_chain(&[(0x10_0000, 64, true)]);
        assert_eq!(restored.process_queue(), 1);
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0).1, 64);
    }
}
