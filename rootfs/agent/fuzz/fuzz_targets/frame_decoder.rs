//! Feeds arbitrary bytes, split at an arbitrary point, into the agent's
//! incremental frame decoder as a hostile host would send them. It must
//! return frames or errors, never panic, and never buffer past one frame.
#![no_main]

use capsule_agent::frame::{FrameDecoder, FRAME_HEADER_BYTES};
use capsule_agent::protocol::{ClientFrame, MAX_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut dec = FrameDecoder::new();
    for piece in [&data[..split], &data[split..]] {
        dec.push(piece);
        loop {
            match dec.next_frame::<ClientFrame>() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return, // the connection would close here
            }
        }
        assert!(dec.buffered() <= FRAME_HEADER_BYTES + MAX_FRAME_BYTES);
    }
});
