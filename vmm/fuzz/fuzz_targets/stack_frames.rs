//! Fuzz target: arbitrary bytes cut into guest Ethernet frames, fed to the sandbox network
//! stack (SYN peek, smoltcp, resolver) with no broker connected.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::net::stack::fuzz_guest_frames(data);
});
