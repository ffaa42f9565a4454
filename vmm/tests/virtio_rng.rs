//! virtio-rng against a driver-side mock queue: bytes are written, the used
//! length is reported, and the per-request cap holds.

mod virtio_common;

use capsule_vmm::devices::virtio::device::VirtioDevice;
use capsule_vmm::devices::virtio::rng::{Rng, MAX_RNG_BYTES_PER_REQUEST, VIRTIO_ID_RNG};
use virtio_common::*;

#[test]
fn fills_writable_buffers_and_reports_length() {
    let mem = guest_memory();
    let mut dev: Rng<Mem> = Rng::new();
    assert_eq!(dev.device_type(), VIRTIO_ID_RNG);
    let mut driver = Driver::new(&mem, 0);
    let irq = activate(&mut dev, &mem, vec![driver.queue()]);
    write_bytes(&mem, DATA_BASE, &[0u8; 4096]);
    let head = driver.add_chain(&[w(DATA_BASE, 1024), w(DATA_BASE + 2048, 1024)]);
    assert_eq!(dev.process_queue(), 1);
    assert_eq!(driver.used(0), (u32::from(head), 2048));
    let a = read_bytes(&mem, DATA_BASE, 1024);
    let b = read_bytes(&mem, DATA_BASE + 2048, 1024);
    // 1024 zero bytes from getrandom has probability 2^-8192.
    assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
    assert_ne!(a, b);
    assert_eq!(irq.status() & 1, 1, "used-ring interrupt raised");
    assert_eq!(irq.irq_fd().read().expect("irqfd signalled"), 1);
}

#[test]
fn caps_bytes_per_request() {
    let mem = guest_memory();
    let mut dev: Rng<Mem> = Rng::new();
    let mut driver = Driver::new(&mem, 0);
    let _irq = activate(&mut dev, &mem, vec![driver.queue()]);
    driver.add_chain(&[w(DATA_BASE, 1 << 20)]);
    dev.process_queue();
    assert_eq!(driver.used(0).1, MAX_RNG_BYTES_PER_REQUEST as u32);
}

#[test]
fn read_only_or_bad_buffers_get_zero_bytes() {
    let mem = guest_memory();
    let mut dev: Rng<Mem> = Rng::new();
    let mut driver = Driver::new(&mem, 0);
    let _irq = activate(&mut dev, &mem, vec![driver.queue()]);
    driver.add_chain(&[r(DATA_BASE, 64)]);
    driver.add_chain(&[w(MEM_BYTES as u64 - 8, 64)]);
    driver.add_chain(&[w(DATA_BASE, 16)]);
    assert_eq!(dev.process_queue(), 3);
    assert_eq!(driver.used(0).1, 0);
    assert_eq!(driver.used(1).1, 0);
    assert_eq!(driver.used(2).1, 16);
}
