//! Fuzz target: arbitrary bytes as a DNS query the guest sends to the sandbox's resolver.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule_vmm::net::stack::dns::fuzz_dns_query(data);
});
