//! Fuzz target: arbitrary bytes as a virtio-blk request descriptor chain.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::devices::virtio::fuzzing::blk_request(data);
});
