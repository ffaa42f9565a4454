//! Device tests for virtio-net: a loopback backend, both queues driven from the driver side
//! (virtio-queue's `MockSplitQueue`), good and hostile chains. Compiled for unit tests only.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::frame::{rx_header, HEADER_BYTES, MAX_FRAME_DESCRIPTORS, MAX_TX_CHAIN_BYTES};
use super::loopback::{loopback_pair, LoopbackPeer};
use super::*;
use crate::devices::virtio::device::{Interrupt, SharedDevice};
use crate::devices::virtio::event_loop::DeviceEventLoop;
use crate::devices::virtio::test_utils::{activate, guest_memory, read_bytes, write_bytes, Driver, Mem};
use crate::persist::test_util::round_trip;

const MAC: [u8; 6] = [0x02, 0xca, 0x95, 0x00, 0x00, 0x01];
/// Rings of the RX and TX queues.
const RX_RINGS: u64 = 0x0;
const TX_RINGS: u64 = 0x1_0000;
/// Where test buffers go.
const BUF: u64 = 0x10_0000;
/// Past the end of the 4 MiB test memory.
const OUTSIDE_MEMORY: u64 = 0x100_0000;
/// An RX buffer as Linux posts one without offloads: header plus a 1518-byte frame.
const LINUX_RX_BUFFER_BYTES: u32 = HEADER_BYTES as u32 + 1518;

/// A small Ethernet frame: broadcast destination, our MAC as source, IPv4, then `fill`.
fn ethernet_frame(len: usize, fill: u8) -> Vec<u8> {
    let mut frame = vec![fill; len];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame
}

struct Fixture<'a> {
    mem: &'a Mem,
    net: Net<Mem>,
    peer: LoopbackPeer,
    rx: Driver<'a>,
    tx: Driver<'a>,
    irq: Arc<Interrupt>,
}

impl<'a> Fixture<'a> {
    fn new(mem: &'a Mem, capacity_frames: usize) -> Self {
        let (backend, peer) = loopback_pair(capacity_frames).unwrap();
        let mut net = Net::new(NetConfig { mac: MAC }, Box::new(backend)).unwrap();
        let (rx, tx) = (Driver::new(mem, RX_RINGS), Driver::new(mem, TX_RINGS));
        let irq = activate(&mut net, mem, vec![rx.queue(), tx.queue()]);
        Self { mem, net, peer, rx, tx, irq }
    }

    /// Posts a TX chain of header + `frame`, header in its own descriptor, at `addr`.
    fn post_tx(&mut self, addr: u64, header: [u8; HEADER_BYTES], frame: &[u8]) {
        write_bytes(self.mem, addr, &header);
        write_bytes(self.mem, addr + 0x100, frame);
        self.tx.add_chain(&[(addr, HEADER_BYTES as u32, false), (addr + 0x100, frame.len() as u32, false)]);
    }

    /// Whether the device raised its interrupt since the last call.
    fn interrupted(&self) -> bool {
        self.irq.irq_fd().read().is_ok()
    }
}

#[test]
fn a_well_formed_tx_frame_reaches_the_backend() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    let frame = ethernet_frame(60, 0xab);
    f.post_tx(BUF, [0; HEADER_BYTES], &frame);
    f.net.queue_notify(TX_QUEUE as u32);
    assert_eq!(f.peer.take_from_guest(), Some(frame), "the frame, header stripped");
    assert_eq!((f.tx.used_idx(), f.tx.used(0).1), (1, 0), "completed, nothing written");
    assert!(f.interrupted());
    let c = f.net.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_malformed), (1, 60, 0));
}

#[test]
fn a_host_frame_lands_in_guest_buffers_with_its_header_and_used_length() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    let frame = ethernet_frame(100, 0x5a);
    assert!(f.peer.send_to_guest(frame.clone()));
    // Split across two descriptors, the header straddling them.
    f.rx.add_chain(&[(BUF, 8, true), (BUF + 0x1000, LINUX_RX_BUFFER_BYTES - 8, true)]);
    f.net.queue_notify(RX_QUEUE as u32);
    assert_eq!(f.rx.used(0), (0, (HEADER_BYTES + 100) as u32));
    let mut written = read_bytes(&mem, BUF, 8);
    written.extend(read_bytes(&mem, BUF + 0x1000, HEADER_BYTES - 8 + 100));
    assert_eq!(&written[..HEADER_BYTES], rx_header());
    assert_eq!(&written[HEADER_BYTES..], frame);
    assert!(f.interrupted());
    assert_eq!((f.net.counters().rx_frames, f.net.counters().rx_bytes), (1, 100));
}

#[test]
fn frames_wait_in_the_backend_until_the_guest_adds_rx_buffers() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    assert!(f.peer.send_to_guest(ethernet_frame(60, 1)));
    f.net.process_events();
    assert_eq!(f.peer.pending_to_guest(), 1, "no buffer yet: the frame stays in the backend");
    assert!(!f.interrupted());

    f.rx.add_chain(&[(BUF, LINUX_RX_BUFFER_BYTES, true)]);
    f.net.queue_notify(RX_QUEUE as u32);
    assert_eq!((f.rx.used_idx(), f.peer.pending_to_guest()), (1, 0));

    // With a buffer waiting, the backend's event delivers at once.
    f.rx.add_chain(&[(BUF + 0x1000, LINUX_RX_BUFFER_BYTES, true)]);
    f.net.queue_notify(RX_QUEUE as u32);
    assert_eq!(f.rx.used_idx(), 1, "a buffer without a frame stays posted");
    assert!(f.peer.send_to_guest(ethernet_frame(70, 2)));
    f.net.process_events();
    assert_eq!(f.rx.used(1), (1, HEADER_BYTES as u32 + 70));
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_queue_keeps_working() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    let frame = ethernet_frame(60, 7);
    write_bytes(&mem, BUF, &[0; HEADER_BYTES]);
    write_bytes(&mem, BUF + HEADER_BYTES as u64, &frame);
    let good_len = (HEADER_BYTES + frame.len()) as u32;
    // A device-writable descriptor in TX.
    f.tx.add_chain(&[(BUF, HEADER_BYTES as u32, false), (BUF + 0x100, 60, true)]);
    // A zero-length chain, and a header with no frame.
    f.tx.add_chain(&[(BUF, 0, false)]);
    f.tx.add_chain(&[(BUF, HEADER_BYTES as u32, false)]);
    // Outside guest memory.
    f.tx.add_chain(&[(OUTSIDE_MEMORY, good_len, false)]);
    // One byte over the cap.
    f.tx.add_chain(&[(BUF, MAX_TX_CHAIN_BYTES as u32 + 1, false)]);
    // More descriptors than any driver sends (through an indirect table).
    let many: Vec<_> = (0..MAX_FRAME_DESCRIPTORS as u64 + 1).map(|i| (BUF + i, 1, false)).collect();
    f.tx.add_indirect_chain(&mem, BUF + 0x2_0000, &many);
    // A header asking for checksum offload, which was not negotiated.
    let mut csum = [0; HEADER_BYTES];
    csum[0] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f.post_tx(BUF + 0x3_0000, csum, &frame);
    // Then a good frame.
    f.tx.add_chain(&[(BUF, good_len, false)]);

    assert_eq!(f.net.process_tx(), 8);
    assert_eq!(f.peer.take_from_guest(), Some(frame), "only the good frame reached the backend");
    assert_eq!(f.peer.take_from_guest(), None);
    assert!((0..8).all(|i| f.tx.used(i).1 == 0));
    let c = f.net.counters();
    assert_eq!((c.tx_malformed, c.tx_frames), (7, 1));
}

#[test]
fn malformed_rx_buffers_are_refused_and_the_queue_keeps_working() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    let frame = ethernet_frame(80, 9);
    assert!(f.peer.send_to_guest(frame.clone()));
    // A read-only descriptor, a zero-length one, one with room for the header only.
    f.rx.add_chain(&[(BUF, LINUX_RX_BUFFER_BYTES, false)]);
    f.rx.add_chain(&[(BUF, 0, true)]);
    f.rx.add_chain(&[(BUF, HEADER_BYTES as u32, true)]);
    // Outside guest memory, and too many descriptors.
    f.rx.add_chain(&[(OUTSIDE_MEMORY, LINUX_RX_BUFFER_BYTES, true)]);
    let many: Vec<_> = (0..MAX_FRAME_DESCRIPTORS as u64 + 1).map(|i| (BUF + 64 * i, 64, true)).collect();
    f.rx.add_indirect_chain(&mem, BUF + 0x2_0000, &many);
    // Then a good buffer.
    f.rx.add_chain(&[(BUF + 0x4_0000, LINUX_RX_BUFFER_BYTES, true)]);

    assert_eq!(f.net.process_rx(), 6);
    assert!((0..5).all(|i| f.rx.used(i).1 == 0), "refused buffers are given back empty");
    assert_eq!(f.rx.used(5), (5, (HEADER_BYTES + 80) as u32), "the frame went to the good buffer");
    assert_eq!(read_bytes(&mem, BUF + 0x4_0000 + HEADER_BYTES as u64, 80), frame);
    let c = f.net.counters();
    assert_eq!((c.rx_buffers_malformed, c.rx_frames), (5, 1));
}

#[test]
fn a_frame_too_big_for_the_rx_buffer_is_dropped_and_the_buffer_reused() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    assert!(f.peer.send_to_guest(ethernet_frame(2000, 1)));
    assert!(f.peer.send_to_guest(ethernet_frame(64, 2)));
    f.rx.add_chain(&[(BUF, LINUX_RX_BUFFER_BYTES, true)]);
    f.net.queue_notify(RX_QUEUE as u32);
    assert_eq!(f.rx.used(0).1, HEADER_BYTES as u32 + 64, "the buffer took the next frame that fits");
    assert_eq!(f.net.counters().rx_frames_too_big, 1);
}

#[test]
fn frames_of_impossible_length_from_the_backend_are_dropped() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    assert!(f.peer.send_to_guest(vec![0; 5]));
    assert!(f.peer.send_to_guest(Vec::new()));
    f.rx.add_chain(&[(BUF, LINUX_RX_BUFFER_BYTES, true)]);
    f.net.queue_notify(RX_QUEUE as u32);
    assert_eq!(f.rx.used_idx(), 0, "the buffer waits for a real frame");
    assert_eq!(f.net.counters().rx_frames_invalid, 2);
}

#[test]
fn a_full_backend_drops_frames_both_ways_and_counts_them() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 1);
    f.post_tx(BUF, [0; HEADER_BYTES], &ethernet_frame(60, 1));
    f.post_tx(BUF + 0x1000, [0; HEADER_BYTES], &ethernet_frame(60, 2));
    assert_eq!(f.net.process_tx(), 2, "both chains are completed");
    assert_eq!(f.net.counters().tx_backend_dropped, 1);
    assert_eq!(f.peer.dropped_from_guest(), 1);
    assert_eq!(f.peer.take_from_guest(), Some(ethernet_frame(60, 1)));

    assert!(f.peer.send_to_guest(ethernet_frame(60, 3)));
    assert!(!f.peer.send_to_guest(ethernet_frame(60, 4)), "no RX buffers: the bound is reached");
    assert_eq!(f.peer.dropped_to_guest(), 1);
}

#[test]
fn config_space_holds_the_mac_and_link_up() {
    let (backend, _peer) = loopback_pair(1).unwrap();
    let net: Net<Mem> = Net::new(NetConfig { mac: MAC }, Box::new(backend)).unwrap();
    let mut config = [0xee; 14];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), super::DEVICE_MTU, "the link's MTU");
    assert_eq!(&config[12..], [0, 0], "bytes past the config read as zero");
    assert_eq!(net.avail_features(), NET_FEATURES);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), [NET_QUEUE_SIZE; 2]);
}

#[test]
fn a_multicast_or_zero_mac_is_refused() {
    for mac in [[0; 6], [0x01, 0, 0x5e, 0, 0, 1]] {
        let (backend, _peer) = loopback_pair(1).unwrap();
        let err = Net::<Mem>::new(NetConfig { mac }, Box::new(backend)).map(|_| ()).unwrap_err();
        assert!(matches!(err, NetError::NotUnicast(_)), "{err}");
    }
}

#[test]
fn a_net_device_round_trips_and_still_moves_frames() {
    let mem = guest_memory();
    let mut f = Fixture::new(&mem, 8);
    f.post_tx(BUF, [0; HEADER_BYTES], &ethernet_frame(60, 1));
    f.net.process_tx();
    let (backend, peer) = loopback_pair(8).unwrap();
    let mut restored = round_trip(&f.net, Box::new(backend) as Box<dyn NetBackend>);
    assert_eq!(restored.counters().tx_frames, 1, "counters carry over");
    assert_eq!(restored.config().mac, MAC);

    let fresh = guest_memory();
    let (rx, mut tx) = (Driver::new(&fresh, RX_RINGS), Driver::new(&fresh, TX_RINGS));
    let _irq = activate(&mut restored, &fresh, vec![rx.queue(), tx.queue()]);
    write_bytes(&fresh, BUF, &[0; HEADER_BYTES]);
    write_bytes(&fresh, BUF + HEADER_BYTES as u64, &ethernet_frame(60, 2));
    tx.add_chain(&[(BUF, HEADER_BYTES as u32 + 60, false)]);
    restored.queue_notify(TX_QUEUE as u32);
    assert_eq!(peer.take_from_guest(), Some(ethernet_frame(60, 2)), "the new backend carries frames");
    assert_eq!(f.peer.take_from_guest(), Some(ethernet_frame(60, 1)), "the old one kept only its own");
    assert_eq!(restored.counters().tx_frames, 2);
}

#[test]
fn a_snapshot_of_a_device_with_other_features_is_refused() {
    let (backend, _peer) = loopback_pair(1).unwrap();
    let state = NetState {
        config: NetConfig { mac: MAC },
        offered_features: NET_FEATURES | 1,
        counters: NetCounters::default(),
    };
    let err = Net::<Mem>::restore(Box::new(backend), &state).map(|_| ()).unwrap_err();
    assert!(matches!(err, NetError::FeaturesChanged { .. }), "{err}");
}

#[test]
fn the_event_loop_delivers_a_host_frame_as_soon_as_the_backend_has_it() {
    let mem = guest_memory();
    let (backend, peer) = loopback_pair(8).unwrap();
    let mut net = Net::new(NetConfig { mac: MAC }, Box::new(backend)).unwrap();
    let (mut rx, tx) = (Driver::new(&mem, RX_RINGS), Driver::new(&mem, TX_RINGS));
    let _irq = activate(&mut net, &mem, vec![rx.queue(), tx.queue()]);
    rx.add_chain(&[(BUF, LINUX_RX_BUFFER_BYTES, true)]);
    let device: SharedDevice<Mem> = Arc::new(Mutex::new(net));
    let events = DeviceEventLoop::start(vec![device]).unwrap();

    assert!(peer.send_to_guest(ethernet_frame(60, 3)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.used_idx() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rx.used(0), (0, HEADER_BYTES as u32 + 60), "delivered by the device-event thread");
    assert_eq!(read_bytes(&mem, BUF + HEADER_BYTES as u64, 60), ethernet_frame(60, 3));
    drop(events);
}
