//! Fuzz target: arbitrary bytes as a guest vsock TX descriptor chain and packet.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::devices::virtio::fuzzing::vsock_packet(data);
});
