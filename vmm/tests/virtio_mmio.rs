//! The virtio-mmio v2 transport driven register by register, as the Linux
//! driver does, with a real virtio-rng device behind it: identification,
//! feature negotiation, queue setup, notification and interrupts, reset, and
//! hostile accesses that must be ignored.

mod virtio_common;

use std::sync::{Arc, Mutex};

use capsule_vmm::devices::virtio::device::SharedDevice;
use capsule_vmm::devices::virtio::mmio::{kernel_cmdline_entry, MmioArgs, MmioState, MmioTransport};
use capsule_vmm::devices::virtio::rng::Rng;
use capsule_vmm::persist::Persist;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER, VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_common::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;

struct Bench {
    mem: Mem,
    dev: SharedDevice<Mem>,
    t: MmioTransport<Mem>,
}

fn bench() -> Bench {
    let mem = guest_memory();
    let dev: SharedDevice<Mem> = Arc::new(Mutex::new(Rng::<Mem>::new()));
    let t =
        MmioTransport::new(mem.clone(), dev.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd")).expect("transport");
    Bench { mem, dev, t }
}

fn rd(t: &mut MmioTransport<Mem>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport<Mem>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// ACK, DRIVER, accept VERSION_1 only, FEATURES_OK.
fn negotiate(t: &mut MmioTransport<Mem>) {
    wr(t, STATUS, ACK);
    wr(t, STATUS, ACK | DRIVER);
    wr(t, DRIVER_FEATURES_SEL, 1);
    wr(t, DRIVER_FEATURES, 1); // bit 32: VIRTIO_F_VERSION_1
    wr(t, DRIVER_FEATURES_SEL, 0);
    wr(t, DRIVER_FEATURES, 0);
    wr(t, STATUS, ACK | DRIVER | FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport<Mem>, driver: &Driver) {
    wr(t, QUEUE_SEL, 0);
    wr(t, QUEUE_NUM, u32::from(QUEUE_SIZE));
    setup_rings(t, driver);
}

/// Ring addresses and QueueReady for queue 0, leaving QueueNum as it is.
fn setup_rings(t: &mut MmioTransport<Mem>, driver: &Driver) {
    let m = &driver.mock;
    wr(t, QUEUE_DESC_LOW, m.desc_table_addr().0 as u32);
    wr(t, QUEUE_DESC_HIGH, (m.desc_table_addr().0 >> 32) as u32);
    wr(t, QUEUE_AVAIL_LOW, m.avail_addr().0 as u32);
    wr(t, QUEUE_AVAIL_HIGH, (m.avail_addr().0 >> 32) as u32);
    wr(t, QUEUE_USED_LOW, m.used_addr().0 as u32);
    wr(t, QUEUE_USED_HIGH, (m.used_addr().0 >> 32) as u32);
    wr(t, QUEUE_READY, 1);
}

#[test]
fn identification_registers_read_back() {
    let mut b = bench();
    assert_eq!(rd(&mut b.t, MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut b.t, VERSION), 2);
    assert_eq!(rd(&mut b.t, DEVICE_ID), 4);
    assert_eq!(rd(&mut b.t, CONFIG_GENERATION), 0);
    assert_eq!(kernel_cmdline_entry(0xd000_0000, 5), "virtio_mmio.device=4K@0xd0000000:5");
}

#[test]
fn feature_negotiation_keeps_only_offered_bits() {
    let mut b = bench();
    wr(&mut b.t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut b.t, DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
    wr(&mut b.t, DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut b.t, DEVICE_FEATURES), 0);
    wr(&mut b.t, STATUS, ACK);
    wr(&mut b.t, STATUS, ACK | DRIVER);
    wr(&mut b.t, DRIVER_FEATURES_SEL, 0);
    wr(&mut b.t, DRIVER_FEATURES, 0xffff_ffff); // nothing offered in the low word
    wr(&mut b.t, DRIVER_FEATURES_SEL, 1);
    wr(&mut b.t, DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(b.t.acked_features(), 1 << 32);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut b.t, STATUS), ACK | DRIVER | FEATURES_OK);
    // Feature writes after FEATURES_OK are ignored.
    wr(&mut b.t, DRIVER_FEATURES, 0);
    assert_eq!(b.t.acked_features(), 1 << 32);
}

#[test]
fn features_ok_refused_without_version_1() {
    let mut b = bench();
    wr(&mut b.t, STATUS, ACK);
    wr(&mut b.t, STATUS, ACK | DRIVER);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut b.t, STATUS) & FEATURES_OK, 0);
}

#[test]
fn queue_setup_notify_interrupt_and_ack() {
    let mut b = bench();
    let mut driver = Driver::new(&b.mem, 0);
    negotiate(&mut b.t);
    wr(&mut b.t, QUEUE_SEL, 0);
    assert_eq!(rd(&mut b.t, QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    assert_eq!(rd(&mut b.t, QUEUE_READY), 0);
    setup_queue(&mut b.t, &driver);
    assert_eq!(rd(&mut b.t, QUEUE_READY), 1);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(rd(&mut b.t, STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);

    let head = driver.add_chain(&[w(DATA_BASE, 32)]);
    wr(&mut b.t, QUEUE_NOTIFY, 0);
    assert_eq!(driver.used_idx(), 1);
    assert_eq!(driver.used(0), (u32::from(head), 32));
    assert_eq!(rd(&mut b.t, INTERRUPT_STATUS), 1);
    assert_eq!(b.t.interrupt().irq_fd().read().expect("irq raised"), 1);
    wr(&mut b.t, INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut b.t, INTERRUPT_STATUS), 0);
}

#[test]
fn status_zero_resets_device_and_queues() {
    let mut b = bench();
    let driver = Driver::new(&b.mem, 0);
    negotiate(&mut b.t);
    setup_queue(&mut b.t, &driver);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(b.dev.lock().expect("lock").is_activated());
    wr(&mut b.t, STATUS, 0);
    assert_eq!(rd(&mut b.t, STATUS), 0);
    assert_eq!(rd(&mut b.t, QUEUE_READY), 0);
    assert_eq!(b.t.acked_features(), 0);
    assert!(!b.dev.lock().expect("lock").is_activated());
    // The driver can bring it up again.
    negotiate(&mut b.t);
    setup_queue(&mut b.t, &driver);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(b.dev.lock().expect("lock").is_activated());
}

#[test]
fn bad_queue_sizes_are_ignored() {
    let mut b = bench();
    let mut driver = Driver::new(&b.mem, 0);
    negotiate(&mut b.t);
    wr(&mut b.t, QUEUE_SEL, 0);
    wr(&mut b.t, QUEUE_NUM, 100); // not a power of two
    wr(&mut b.t, QUEUE_NUM, 512); // above QueueNumMax
    wr(&mut b.t, QUEUE_NUM, 0);
    // QueueNum keeps its default (QueueNumMax), matching the driver's rings.
    setup_rings(&mut b.t, &driver);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    driver.add_chain(&[w(DATA_BASE, 8)]);
    wr(&mut b.t, QUEUE_NOTIFY, 0);
    assert_eq!(driver.used(0).1, 8);
}

#[test]
fn queue_outside_guest_memory_is_not_made_ready() {
    let mut b = bench();
    negotiate(&mut b.t);
    wr(&mut b.t, QUEUE_SEL, 0);
    wr(&mut b.t, QUEUE_DESC_LOW, 0);
    wr(&mut b.t, QUEUE_DESC_HIGH, 0x10); // 64 GiB: not guest memory
    wr(&mut b.t, QUEUE_READY, 1);
    assert_eq!(rd(&mut b.t, QUEUE_READY), 0);
    // DRIVER_OK with the queue not ready: the device asks for a reset.
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(rd(&mut b.t, STATUS) & NEEDS_RESET, 0);
    assert!(!b.dev.lock().expect("lock").is_activated());
    assert_eq!(rd(&mut b.t, INTERRUPT_STATUS) & 2, 2, "config-change interrupt");
}

#[test]
fn bad_accesses_are_ignored() {
    let mut b = bench();
    let mut buf = [0xaau8; 4];
    b.t.read(MAGIC + 2, &mut buf); // unaligned
    assert_eq!(buf, [0; 4]);
    let mut two = [0xaau8; 2];
    b.t.read(MAGIC, &mut two); // wrong size
    assert_eq!(two, [0; 2]);
    b.t.write(STATUS, &[ACK as u8, 0, 0]); // 3-byte write
    assert_eq!(rd(&mut b.t, STATUS), 0);
    wr(&mut b.t, STATUS + 1, ACK); // unaligned write
    assert_eq!(rd(&mut b.t, STATUS), 0);
    assert_eq!(rd(&mut b.t, 0x0e0), 0, "unknown register reads 0");
    wr(&mut b.t, 0x0e0, 0xffff_ffff);
    wr(&mut b.t, QUEUE_NOTIFY, 0); // before DRIVER_OK
    wr(&mut b.t, QUEUE_NOTIFY, 9999);
    wr(&mut b.t, QUEUE_SEL, 5);
    assert_eq!(rd(&mut b.t, QUEUE_NUM_MAX), 0, "queue that does not exist");
    wr(&mut b.t, QUEUE_NUM, 8);
    // Queue setup before FEATURES_OK is ignored.
    wr(&mut b.t, QUEUE_SEL, 0);
    wr(&mut b.t, QUEUE_READY, 1);
    assert_eq!(rd(&mut b.t, QUEUE_READY), 0);
    // Skipping status steps is ignored.
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(rd(&mut b.t, STATUS), 0);
    // Config accesses past the window or of odd sizes.
    let mut eight = [0xaau8; 8];
    b.t.read(0xffc, &mut eight);
    assert_eq!(eight, [0; 8]);
    let mut three = [0xaau8; 3];
    b.t.read(0x100, &mut three);
    assert_eq!(three, [0; 3]);
    b.t.write(0x100, &[1, 2, 3, 4]);
    b.t.read(u64::MAX - 1, &mut eight);
    b.t.write(u64::MAX - 1, &[0; 8]);
    assert_eq!(rd(&mut b.t, MAGIC), 0x7472_6976, "still answering");
}

#[test]
fn clearing_status_bits_without_reset_is_ignored() {
    let mut b = bench();
    negotiate(&mut b.t);
    wr(&mut b.t, STATUS, ACK);
    assert_eq!(rd(&mut b.t, STATUS), ACK | DRIVER | FEATURES_OK);
}

#[test]
fn snapshot_round_trip_resumes_queue_where_it_left_off() {
    let mut b = bench();
    let mut driver = Driver::new(&b.mem, 0);
    negotiate(&mut b.t);
    setup_queue(&mut b.t, &driver);
    wr(&mut b.t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    driver.add_chain(&[w(DATA_BASE, 16)]);
    wr(&mut b.t, QUEUE_NOTIFY, 0);
    assert_eq!(driver.used_idx(), 1);

    // Through serde, as a snapshot file would carry it.
    let saved = serde_json::to_string(&b.t.save()).expect("serialize");
    drop(b.t);
    let state: MmioState = serde_json::from_str(&saved).expect("deserialize");
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.interrupt_status, 1);
    let dev: SharedDevice<Mem> = Arc::new(Mutex::new(Rng::<Mem>::new()));
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t =
        MmioTransport::restore(MmioArgs { mem: b.mem.clone(), device: dev.clone(), irq }, &state).expect("restore");
    assert_eq!(rd(&mut t, STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(dev.lock().expect("lock").is_activated());
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), 1, "pending interrupt survives");
    assert_eq!(t.interrupt().irq_fd().read().expect("re-raised"), 1);

    let head = driver.add_chain(&[w(DATA_BASE + 0x100, 24)]);
    wr(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(driver.used_idx(), 2, "the restored queue continues, not restarts");
    assert_eq!(driver.used(1), (u32::from(head), 24));
}

#[test]
fn restore_rejects_snapshot_for_another_device_shape() {
    let b = bench();
    let mut state = b.t.save();
    state.queues.push(state.queues[0]);
    let dev: SharedDevice<Mem> = Arc::new(Mutex::new(Rng::<Mem>::new()));
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    assert!(MmioTransport::restore(MmioArgs { mem: b.mem.clone(), device: dev.clone(), irq }, &state).is_err());
    state.queues.pop();
    state.queues[0].max_size = 1024;
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    assert!(MmioTransport::restore(MmioArgs { mem: b.mem.clone(), device: dev, irq }, &state).is_err());
}

/// A `Write` into a shared buffer, for capturing log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_guest_hammering_bad_registers_cannot_flood_the_host_log() {
    use capsule_vmm::devices::guest_log::GUEST_WARN_BURST;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let mut b = bench();
    tracing::subscriber::with_default(subscriber, || {
        let mut two = [0u8; 2];
        for _ in 0..10_000 {
            // Register reads must be 4 aligned bytes: each of these is a guest error.
            b.t.read(MAGIC, &mut two);
        }
    });
    let log = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8");
    let lines = log.lines().filter(|l| l.contains("virtio-mmio")).count();
    assert!(lines >= 1 && lines <= GUEST_WARN_BURST as usize, "{lines} warning lines for 10000 bad reads:\n{log}");
}
