//! Fuzz target: arbitrary bytes as the first bytes of a guest connection (TLS ClientHello or
//! HTTP request head).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::net::first_bytes::fuzz_scan(data);
});
