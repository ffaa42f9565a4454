//! Fuzz entry points: arbitrary bytes become a guest memory holding a split
//! virtqueue with one descriptor chain, which is fed through the same code
//! the devices run ([`Chain::collect`], [`super::block::parse_request`] and
//! the block request path, [`super::vsock::packet::read_tx_chain`] and the
//! muxer, [`super::net::frame::read_tx_frame`] and a whole [`Net`] device).
//!
//! Used by the cargo-fuzz targets in `vmm/fuzz/` and by the deterministic
//! smoke test `vmm/tests/virtio_fuzz_smoke.rs`. These functions must never
//! panic, whatever the input: a panic is a bug in the device code.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::undo::undo_log_path;
use super::block::{parse_request, Block, BlockConfig};
use super::chain::Chain;
use super::device::{ActivateContext, Interrupt, VirtioDevice};
use super::net::frame::{read_tx_frame, MIN_FRAME_BYTES};
use super::net::loopback::loopback_pair;
use super::net::{Net, NetConfig, TX_QUEUE};
use super::vsock::muxer::Muxer;
use super::vsock::packet::{parse_tx_packet, read_tx_chain, MAX_PAYLOAD_BYTES};

/// How far one fuzz input got; the smoke test checks both outcomes occur.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzOutcome {
    /// The input did not describe a queue with a chain (too short).
    NoChain,
    /// The device code rejected the chain or packet.
    Rejected,
    /// The chain parsed as a valid request or packet and was served.
    Accepted,
}

/// Guest memory size of one fuzz case.
const FUZZ_MEM_BYTES: usize = 0x10000;
/// Queue size of the fuzz queue.
const FUZZ_QUEUE_SIZE: u16 = 16;
const DESC_TABLE_ADDR: u64 = 0x0;
const AVAIL_RING_ADDR: u64 = 0x100;
const USED_RING_ADDR: u64 = 0x200;
/// Where the input's remaining bytes are copied.
const PAYLOAD_ADDR: u64 = 0x1000;
/// Guest CID used by the vsock cases.
const FUZZ_GUEST_CID: u64 = 3;
/// The net cases' second queue (RX): the same descriptor table, its own rings.
const NET_RX_AVAIL_RING_ADDR: u64 = 0x300;
const NET_RX_USED_RING_ADDR: u64 = 0x400;
/// MAC of the net cases' device.
const FUZZ_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
/// Longest host frame the net cases queue for the guest (MTU 1500).
const FUZZ_HOST_FRAME_BYTES: usize = 1514;

/// Builds guest memory with a ready queue whose available ring holds one
/// chain, from `data`: byte 0 picks the descriptor count (1..=16), then 16
/// raw bytes per descriptor (addr, len, flags, next; little endian), and the
/// rest is copied into guest memory at 0x1000.
pub fn queue_from_bytes(data: &[u8]) -> Option<(GuestMemoryMmap<()>, Queue)> {
    let (&count, rest) = data.split_first()?;
    let count = usize::from(count % FUZZ_QUEUE_SIZE as u8) + 1;
    let table_len = count * 16;
    let table = rest.get(..table_len)?;
    let payload = &rest[table_len..];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_BYTES)]).ok()?;
    mem.write_slice(table, GuestAddress(DESC_TABLE_ADDR)).ok()?;
    // Available ring: flags 0, idx 1, ring[0] = head 0.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING_ADDR)).ok()?;
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL_RING_ADDR + 2)).ok()?;
    mem.write_obj(0u16, GuestAddress(AVAIL_RING_ADDR + 4)).ok()?;
    let n = payload.len().min(FUZZ_MEM_BYTES - PAYLOAD_ADDR as usize);
    mem.write_slice(&payload[..n], GuestAddress(PAYLOAD_ADDR)).ok()?;
    let mut queue = Queue::new(FUZZ_QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(DESC_TABLE_ADDR as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING_ADDR as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING_ADDR as u32), Some(0));
    queue.set_ready(true);
    Some((mem, queue))
}

/// A 64 KiB sparse scratch disk, unlinked at once so no file outlives the
/// process; devices open it again through `/proc/self/fd`.
fn fuzz_disk_path() -> Option<&'static PathBuf> {
    static DISK: OnceLock<Option<(std::fs::File, PathBuf)>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("capsule-fuzz-disk-{}", std::process::id()));
        let file = std::fs::File::create(&path).ok();
        let _ = std::fs::remove_file(&path);
        let file = file?;
        file.set_len(64 * 1024).ok()?;
        let reopen = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Some((file, reopen))
    })
    .as_ref()
    .map(|(_, path)| path)
}

/// Fuzz target: one virtio-blk request chain, parsed and then served by a
/// real [`Block`] device over a 64 KiB sparse file.
pub fn blk_request(data: &[u8]) -> FuzzOutcome {
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return FuzzOutcome::NoChain;
    };
    let Some(desc_chain) = queue.pop_descriptor_chain(&mem) else {
        return FuzzOutcome::NoChain;
    };
    let parsed = Chain::collect(desc_chain).ok().is_some_and(|chain| parse_request(&mem, &chain).is_ok());
    // Serve the same chain through the whole device.
    let Some((mem, queue)) = queue_from_bytes(data) else {
        return FuzzOutcome::NoChain;
    };
    if let Some(path) = fuzz_disk_path() {
        let config = BlockConfig {
            path: path.clone(),
            read_only: data.first().is_some_and(|b| b & 0x80 != 0),
            disk_id: "fuzz".into(),
            // Half the inputs write through an undo log.
            undo_log: data.first().is_some_and(|b| b & 0x40 != 0).then(|| undo_log_path(path)),
        };
        let block = Block::new(config).ok().and_then(|mut b| b.begin_undo_epoch("fuzz").ok().map(|()| b));
        if let (Some(mut block), Ok(irq)) = (block, EventFd::new(EFD_NONBLOCK)) {
            let ctx = ActivateContext {
                mem,
                queues: vec![queue],
                interrupt: Arc::new(Interrupt::new(irq)),
                acked_features: 0,
            };
            if block.activate(ctx).is_ok() {
                block.process_queue();
            }
        }
    }
    if parsed {
        FuzzOutcome::Accepted
    } else {
        FuzzOutcome::Rejected
    }
}

thread_local! {
    static FUZZ_MUXER: RefCell<Option<Muxer>> = const { RefCell::new(None) };
}

/// Fuzz target: one guest vsock TX packet, parsed from raw bytes and from a
/// descriptor chain, then handed to a real [`Muxer`] whose answers (RSTs,
/// credit updates) are drained.
pub fn vsock_packet(data: &[u8]) -> FuzzOutcome {
    let _ = parse_tx_packet(data, FUZZ_GUEST_CID);
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return FuzzOutcome::NoChain;
    };
    let Some(desc_chain) = queue.pop_descriptor_chain(&mem) else {
        return FuzzOutcome::NoChain;
    };
    let Ok(chain) = Chain::collect(desc_chain) else {
        return FuzzOutcome::Rejected;
    };
    let Ok(packet) = read_tx_chain(&mem, &chain, FUZZ_GUEST_CID) else {
        return FuzzOutcome::Rejected;
    };
    FUZZ_MUXER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let path = std::env::temp_dir().join(format!(
                "capsule-fuzz-vsock-{}-{:?}.sock",
                std::process::id(),
                std::thread::current().id()
            ));
            *slot = Muxer::new(FUZZ_GUEST_CID, &path).ok();
            // Nothing connects from the host side: drop the path right away.
            let _ = std::fs::remove_file(&path);
        }
        if let Some(muxer) = slot.as_mut() {
            muxer.handle_guest_packet(packet);
            for _ in 0..8 {
                if muxer.next_rx(MAX_PAYLOAD_BYTES).is_none() {
                    break;
                }
            }
            muxer.process_events();
        }
    });
    FuzzOutcome::Accepted
}

/// A second ready queue over `mem`'s descriptor table whose available ring offers the same
/// chain (head 0) that [`queue_from_bytes`] put in the first.
fn second_queue_over_the_same_chain(mem: &GuestMemoryMmap<()>) -> Option<Queue> {
    mem.write_obj(0u16, GuestAddress(NET_RX_AVAIL_RING_ADDR)).ok()?;
    mem.write_obj(1u16.to_le(), GuestAddress(NET_RX_AVAIL_RING_ADDR + 2)).ok()?;
    mem.write_obj(0u16, GuestAddress(NET_RX_AVAIL_RING_ADDR + 4)).ok()?;
    let mut queue = Queue::new(FUZZ_QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(DESC_TABLE_ADDR as u32), Some(0));
    queue.set_avail_ring_address(Some(NET_RX_AVAIL_RING_ADDR as u32), Some(0));
    queue.set_used_ring_address(Some(NET_RX_USED_RING_ADDR as u32), Some(0));
    queue.set_ready(true);
    Some(queue)
}

/// Fuzz target: one guest virtio-net TX chain, read as a frame, then served by a real [`Net`]
/// device over a loopback backend, where the same chain is also offered as an RX buffer for a
/// host frame made of the input (so both directions' checks see it).
pub fn net_frame(data: &[u8]) -> FuzzOutcome {
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return FuzzOutcome::NoChain;
    };
    let Some(desc_chain) = queue.pop_descriptor_chain(&mem) else {
        return FuzzOutcome::NoChain;
    };
    let parsed = Chain::collect(desc_chain).ok().is_some_and(|chain| read_tx_frame(&mem, &chain).is_ok());
    // Serve the same chain through the whole device.
    let Some((mem, tx_queue)) = queue_from_bytes(data) else {
        return FuzzOutcome::NoChain;
    };
    if let (Some(rx_queue), Ok((backend, peer)), Ok(irq)) =
        (second_queue_over_the_same_chain(&mem), loopback_pair(4), EventFd::new(EFD_NONBLOCK))
    {
        if let Ok(mut net) = Net::new(NetConfig { mac: FUZZ_MAC }, Box::new(backend)) {
            let mut frame = data.to_vec();
            frame.resize(frame.len().clamp(MIN_FRAME_BYTES, FUZZ_HOST_FRAME_BYTES), 0);
            peer.send_to_guest(frame);
            let ctx = ActivateContext {
                mem,
                queues: vec![rx_queue, tx_queue],
                interrupt: Arc::new(Interrupt::new(irq)),
                acked_features: net.avail_features(),
            };
            // Activation offers the frame to the RX buffer; the notify sends the TX chain.
            if net.activate(ctx).is_ok() {
                net.queue_notify(TX_QUEUE as u32);
                net.process_events();
            }
            while peer.take_from_guest().is_some() {}
        }
    }
    if parsed {
        FuzzOutcome::Accepted
    } else {
        FuzzOutcome::Rejected
    }
}
