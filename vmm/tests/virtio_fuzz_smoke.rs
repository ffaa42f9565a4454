//! The fuzz targets of `vmm/fuzz/` on stable: every entry point runs over a few
//! thousand deterministic pseudo-random inputs (fixed seed), half of them
//! shaped like plausible descriptor chains (or ClientHellos and HTTP heads) so
//! they reach the parsers. A panic anywhere in the device or parser code fails
//! the test.

use capsule_vmm::devices::virtio::fuzzing::{blk_request, net_frame, vsock_packet, FuzzOutcome};
use capsule_vmm::devices::virtio::net::frame::HEADER_BYTES;
use capsule_vmm::devices::virtio::vsock::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use capsule_vmm::net::first_bytes::{fuzz_scan, FirstBytesOutcome};
use capsule_vmm::net::stack::dns::{build_query, fuzz_dns_query, DnsQueryOutcome, TYPE_A, TYPE_AAAA};
use capsule_vmm::net::stack::{fuzz_guest_frames, GATEWAY_IP, GATEWAY_MAC, GUEST_IP};

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

/// A plausible ClientHello (records of random size, random extensions, sometimes a
/// server_name) or HTTP request head, then mutated: a few bytes flipped, cut short, or
/// trailed by garbage.
fn first_bytes_input(rng: &mut Prng) -> Vec<u8> {
    let names: [&[u8]; 4] = [b"example.com", b"API.pkgs.example.", b"a..b", b"x"];
    let name = names[rng.below(4) as usize];
    let mut out = if rng.below(2) == 0 {
        let mut ext = Vec::new();
        for _ in 0..rng.below(4) {
            let n = rng.below(40) as usize;
            ext.extend_from_slice(&(rng.below(60) as u16 + 1).to_be_bytes());
            ext.extend_from_slice(&(n as u16).to_be_bytes());
            ext.extend_from_slice(&rng.bytes(n));
        }
        if rng.below(4) != 0 {
            let len = name.len() as u16;
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(len + 5).to_be_bytes());
            ext.extend_from_slice(&(len + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&len.to_be_bytes());
            ext.extend_from_slice(name);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&rng.bytes(32));
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![1, 0];
        message.extend_from_slice(&(body.len() as u16).to_be_bytes());
        message.extend_from_slice(&body);
        let record_len = rng.below(200) as usize + 1;
        let mut out = Vec::new();
        for chunk in message.chunks(record_len) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    } else {
        let mut head = b"GET /index.html HTTP/1.1\r\nAccept: */*\r\n".to_vec();
        if rng.below(4) != 0 {
            head.extend_from_slice(b"Host: ");
            head.extend_from_slice(name);
            head.extend_from_slice(if rng.below(2) == 0 { b":8080\r\n" } else { b"\r\n" });
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    match rng.below(4) {
        0 => {
            for _ in 0..rng.below(3) + 1 {
                let at = rng.below(out.len() as u64) as usize;
                out[at] = rng.next() as u8;
            }
        }
        1 => out.truncate(rng.below(out.len() as u64) as usize),
        2 => {
            let n = rng.below(64) as usize;
            out.extend_from_slice(&rng.bytes(n));
        }
        _ => {}
    }
    out
}

#[test]
fn first_bytes_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0003);
    let (mut tls, mut http, mut unrecognized, mut need_more) = (0, 0, 0, 0);
    for case in 0..CASES_PER_TARGET {
        let input = if case % 4 == 0 {
            let n = rng.below(512) as usize;
            rng.bytes(n)
        } else {
            first_bytes_input(&mut rng)
        };
        match fuzz_scan(&input) {
            FirstBytesOutcome::TlsServerName => tls += 1,
            FirstBytesOutcome::HttpHost => http += 1,
            FirstBytesOutcome::Unrecognized => unrecognized += 1,
            FirstBytesOutcome::NeedMore => need_more += 1,
        }
    }
    eprintln!("first_bytes: {tls} TLS, {http} HTTP, {unrecognized} unrecognized, {need_more} undecided");
    for (what, count) in [("TLS", tls), ("HTTP", http), ("unrecognized", unrecognized), ("undecided", need_more)] {
        assert!(count >= 20, "first_bytes: only {count} inputs {what}");
    }
}

/// A DNS query, mostly well formed, sometimes cut, flipped or with wild header fields.
fn dns_query_input(rng: &mut Prng) -> Vec<u8> {
    let labels = rng.below(4) + 1;
    let name: Vec<String> = (0..labels)
        .map(|_| {
            let n = rng.below(70) as usize + 1;
            (0..n).map(|_| b"abcxyz019-_.A"[rng.below(13) as usize] as char).collect()
        })
        .collect();
    let qtype = [TYPE_A, TYPE_AAAA, 65, 255][rng.below(4) as usize];
    let mut query = build_query(rng.next() as u16, &name.join("."), qtype);
    match rng.below(6) {
        0 => query.truncate(rng.below(query.len() as u64 + 1) as usize),
        1 => {
            let at = rng.below(query.len() as u64) as usize;
            query[at] = rng.next() as u8;
        }
        2 => query[2..12].copy_from_slice(&rng.bytes(10)),
        3 => {
            let n = rng.below(64) as usize;
            query.extend(rng.bytes(n));
        }
        _ => {}
    }
    query
}

#[test]
fn dns_query_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0004);
    let (mut answered, mut errors, mut dropped) = (0, 0, 0);
    for case in 0..CASES_PER_TARGET {
        let input = if case % 4 == 0 {
            let n = rng.below(128) as usize;
            rng.bytes(n)
        } else {
            dns_query_input(&mut rng)
        };
        match fuzz_dns_query(&input) {
            DnsQueryOutcome::Answered => answered += 1,
            DnsQueryOutcome::ErrorReply => errors += 1,
            DnsQueryOutcome::Dropped => dropped += 1,
        }
    }
    eprintln!("dns_query: {answered} answered, {errors} error replies, {dropped} dropped");
    for (what, count) in [("answered", answered), ("error replies", errors), ("dropped", dropped)] {
        assert!(count >= 20, "dns_query: only {count} inputs {what}");
    }
}

/// The Internet checksum of `parts` (RFC 1071).
fn inet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A guest frame to the stack: an ARP request for the gateway, or an IPv4 TCP/UDP/ICMP packet
/// with valid checksums (so smoltcp reads it), sometimes with a byte flipped.
fn guest_frame(rng: &mut Prng) -> Vec<u8> {
    let guest_mac = [0x02, 0, 0, 0, 0, 0x15];
    let mut frame = Vec::new();
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&guest_mac);
    if rng.below(5) == 0 {
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&guest_mac);
        frame.extend_from_slice(&GUEST_IP.octets());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&GATEWAY_IP.octets());
        return frame;
    }
    frame.extend_from_slice(&[0x08, 0x00]);
    let dst: [u8; 4] = if rng.below(3) == 0 { GATEWAY_IP.octets() } else { [203, 0, 113, rng.below(4) as u8 + 1] };
    let (protocol, mut payload) = match rng.below(3) {
        0 => {
            // TCP: SYN mostly, any flags sometimes.
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&(40000 + rng.below(8) as u16).to_be_bytes());
            tcp[2..4].copy_from_slice(&[80u16, 443, 22, 5432][rng.below(4) as usize].to_be_bytes());
            tcp[4..8].copy_from_slice(&rng.bytes(4));
            tcp[12] = 0x50;
            tcp[13] = if rng.below(3) == 0 { rng.next() as u8 } else { 0x02 };
            tcp[14..16].copy_from_slice(&8192u16.to_be_bytes());
            let n = rng.below(64) as usize;
            tcp.extend(rng.bytes(n));
            (6u8, tcp)
        }
        1 => {
            let body = if rng.below(2) == 0 { build_query(1, "a.example", TYPE_A) } else { rng.bytes(32) };
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
            udp[2..4].copy_from_slice(&[53u16, 123][rng.below(2) as usize].to_be_bytes());
            udp[4..6].copy_from_slice(&((8 + body.len()) as u16).to_be_bytes());
            udp.extend(body);
            (17u8, udp)
        }
        _ => {
            let mut icmp = vec![8u8, 0, 0, 0, 0, 1, 0, 1];
            icmp.extend(rng.bytes(16));
            let sum = inet_checksum(&[&icmp]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            (1u8, icmp)
        }
    };
    if protocol != 1 {
        let sum_at = if protocol == 6 { 16 } else { 6 };
        let len = (payload.len() as u16).to_be_bytes();
        let pseudo = [GUEST_IP.octets().as_slice(), &dst, &[0, protocol], &len].concat();
        let sum = inet_checksum(&[&pseudo, &payload]);
        payload[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&dst);
    let sum = inet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend(ip);
    frame.extend(payload);
    if rng.below(6) == 0 {
        let at = rng.below(frame.len() as u64) as usize;
        frame[at] = rng.next() as u8;
    }
    frame
}

#[test]
fn stack_frames_target_survives_pseudo_random_inputs() {
    let mut rng = Prng(0x5eed_0005);
    let (mut answered, mut silent) = (0, 0);
    for case in 0..300 {
        let mut input = Vec::new();
        for _ in 0..rng.below(8) + 1 {
            let frame = if case % 4 == 0 {
                let n = rng.below(200) as usize;
                rng.bytes(n)
            } else {
                guest_frame(&mut rng)
            };
            input.extend_from_slice(&(frame.len() as u16).to_be_bytes());
            input.extend(frame);
        }
        if fuzz_guest_frames(&input) > 0 {
            answered += 1;
        } else {
            silent += 1;
        }
    }
    eprintln!("stack_frames: {answered} inputs got frames back, {silent} none");
    assert!(answered >= 20 && silent >= 20, "stack_frames: {answered} answered, {silent} silent");
}
