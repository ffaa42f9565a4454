//! The fuzz targets of `vmm/fuzz/` on stable: every entry point runs over a few
//! thousand deterministic pseudo-random inputs (fixed seed), half of them
//! shaped like plausible descriptor chains so they reach the parsers. A panic
//! anywhere in the device code fails the test.

use capsule_vmm::devices::virtio::fuzzing::{blk_request, net_frame, vsock_packet, FuzzOutcome};
use capsule_vmm::devices::virtio::net::frame::HEADER_BYTES;
use capsule_vmm::devices::virtio::vsock::packet::{Header, Op, HOST_CID, TYPE_STREAM};

const CASES_PER_TARGET: usize = 3000;

/// xorshift64*: deterministic, no dependency.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// An input in the `queue_from_bytes` format. Mostly the descriptors cut the
/// payload (copied to 0x1000) into consecutive pieces, read-only except the
/// last when `writable_last`; sometimes addresses, lengths, flags and links
/// are wild.
fn chain_input(rng: &mut Prng, payload: &[u8], writable_last: bool) -> Vec<u8> {
    let count = rng.below(4) as u8 + 1;
    let mut out = vec![count - 1];
    let mut addr = 0x1000u64;
    for i in 0..count {
        let last = i + 1 == count;
        let wild = rng.below(8) == 0;
        let a = if wild && rng.below(2) == 0 { rng.next() } else { addr };
        let len = match rng.below(8) {
            0 if wild => rng.next() as u32,
            0 => 1,
            1 => 44,
            2 => 16,
            _ => rng.below(256) as u32 + 1,
        };
        let mut flags = 0u16;
        if (last && writable_last) != (wild && rng.below(2) == 0) {
            flags |= 2; // VRING_DESC_F_WRITE
        }
        if !last || (wild && rng.below(4) == 0) {
            flags |= 1; // VRING_DESC_F_NEXT
        }
        if wild && rng.below(4) == 0 {
            flags |= 4; // VRING_DESC_F_INDIRECT
        }
        let next = if wild { rng.next() as u16 } else { u16::from(i) + 1 };
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
        addr = addr.wrapping_add(u64::from(len));
    }
    out.extend_from_slice(payload);
    out
}

/// Outcome counts, so a harness that stops reaching the parsers fails.
#[derive(Default)]
struct Tally {
    rejected: usize,
    accepted: usize,
}

impl Tally {
    fn count(&mut self, outcome: FuzzOutcome) {
        match outcome {
            FuzzOutcome::NoChain => {}
            FuzzOutcome::Rejected => self.rejected += 1,
            FuzzOutcome::Accepted => self.accepted += 1,
        }
    }

    fn assert_reached_parsers(&self, target: &str) {
        eprintln!("{target}: {} accepted, {} rejected", self.accepted, self.rejected);
        assert!(self.accepted >= 20, "{target}: only {} inputs accepted", self.accepted);
        assert!(self.rejected >= 20, "{target}: only {} inputs rejected", self.rejected);
    }
}

#[test]
fn blk_request_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0001);
    let mut tally = Tally::default();
    for case in 0..CASES_PER_TARGET {
        let input = if case % 2 == 0 {
            let n = rng.below(512) as usize;
            rng.bytes(n)
        } else {
            let mut payload = Vec::new();
            payload.extend_from_slice(&(rng.below(10) as u32).to_le_bytes()); // type
            payload.extend_from_slice(&0u32.to_le_bytes());
            payload.extend_from_slice(&rng.below(200).to_le_bytes()); // sector
            let n = rng.below(600) as usize;
            payload.extend_from_slice(&rng.bytes(n));
            chain_input(&mut rng, &payload, true)
        };
        tally.count(blk_request(&input));
    }
    tally.assert_reached_parsers("blk_request");
}

#[test]
fn vsock_packet_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0002);
    let mut tally = Tally::default();
    for case in 0..CASES_PER_TARGET {
        let input = if case % 2 == 0 {
            let n = rng.below(512) as usize;
            rng.bytes(n)
        } else {
            let op = rng.below(9) as u16;
            let len = if rng.below(4) == 0 { rng.next() as u32 } else { rng.below(128) as u32 };
            let h = Header {
                src_cid: if rng.below(8) == 0 { rng.next() } else { 3 },
                dst_cid: if rng.below(8) == 0 { rng.next() } else { HOST_CID },
                src_port: rng.below(4) as u32,
                dst_port: rng.below(4) as u32 + 1_000_000,
                len,
                type_: if rng.below(8) == 0 { rng.next() as u16 } else { TYPE_STREAM },
                op: if op == 0 { Op::Rw as u16 } else { op },
                flags: rng.below(4) as u32,
                buf_alloc: rng.next() as u32,
                fwd_cnt: rng.next() as u32,
            };
            let mut payload = h.to_bytes().to_vec();
            let n = rng.below(256) as usize;
            payload.extend_from_slice(&rng.bytes(n));
            chain_input(&mut rng, &payload, false)
        };
        tally.count(vsock_packet(&input));
    }
    tally.assert_reached_parsers("vsock_packet");
}

#[test]
fn net_frame_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0003);
    let mut tally = Tally::default();
    for case in 0..CASES_PER_TARGET {
        let input = if case % 2 == 0 {
            let n = rng.below(512) as usize;
            rng.bytes(n)
        } else {
            // A virtio_net_hdr_v1, mostly "no offload", then an Ethernet frame.
            let mut payload = vec![0u8; HEADER_BYTES];
            if rng.below(8) == 0 {
                payload[0] = rng.next() as u8; // flags
                payload[1] = rng.next() as u8; // gso_type
            }
            let n = rng.below(300) as usize;
            payload.extend_from_slice(&rng.bytes(n));
            chain_input(&mut rng, &payload, false)
        };
        tally.count(net_frame(&input));
    }
    tally.assert_reached_parsers("net_frame");
}
