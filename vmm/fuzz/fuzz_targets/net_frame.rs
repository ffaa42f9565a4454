//! Fuzz target: arbitrary bytes as a guest virtio-net TX descriptor chain (also offered as an
//! RX buffer) through a real net device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::devices::virtio::fuzzing::net_frame(data);
});
