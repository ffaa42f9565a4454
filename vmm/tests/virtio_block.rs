//! virtio-blk against a driver-side mock queue over plain guest memory and a
//! real backing file: reads, writes, flush, GET_ID, range checks, read-only
//! disks and malformed chains.

mod virtio_common;

use std::io::{Read, Seek, SeekFrom, Write};

use capsule_vmm::devices::virtio::block::{Block, BlockConfig, MAX_DATA_SEGMENTS, MAX_SEGMENT_BYTES, SECTOR_BYTES};
use capsule_vmm::devices::virtio::device::VirtioDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_common::*;

const DISK_SECTORS: u64 = 64;
const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x100;
const STATUS_UNTOUCHED: u8 = 0xee;

struct Disk {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

/// A sparse 32 KiB disk whose sector `n` is filled with byte `n`.
fn disk() -> Disk {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let mut f = std::fs::File::create(&path).expect("create disk");
    f.set_len(DISK_SECTORS * SECTOR_BYTES).expect("size disk");
    for n in 0..8u8 {
        f.seek(SeekFrom::Start(u64::from(n) * SECTOR_BYTES)).expect("seek");
        f.write_all(&[n; SECTOR_BYTES as usize]).expect("fill");
    }
    Disk { _dir: dir, path }
}

fn block(disk: &Disk, read_only: bool) -> Block<Mem> {
    Block::new(BlockConfig { path: disk.path.clone(), read_only, disk_id: "capsule-disk-0".into(), undo_log: None })
        .expect("block device")
}

fn header(mem: &Mem, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    write_bytes(mem, HDR, &h);
    write_bytes(mem, STATUS, &[STATUS_UNTOUCHED]);
}

/// Posts `chain`, runs the device, returns (used len, status byte).
fn run(dev: &mut Block<Mem>, mem: &Mem, chain: &[Desc]) -> (u32, u8) {
    let mut driver = Driver::new(mem, 0);
    let _irq = activate(dev, mem, vec![driver.queue()]);
    let head = driver.add_chain(chain);
    assert_eq!(dev.process_queue(), 1, "one request completed");
    assert_eq!(driver.used_idx(), 1);
    let (id, len) = driver.used(0);
    assert_eq!(id, u32::from(head));
    (len, read_bytes(mem, STATUS, 1)[0])
}

#[test]
fn read_returns_sector_contents_and_length() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_IN, 3);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1024 + 1);
    let data = read_bytes(&mem, DATA, 1024);
    assert!(data[..512].iter().all(|&b| b == 3));
    assert!(data[512..].iter().all(|&b| b == 4));
}

#[test]
fn write_lands_in_backing_file() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_OUT, 10);
    write_bytes(&mem, DATA, &[0xab; 512]);
    write_bytes(&mem, DATA + 0x800, &[0xcd; 512]);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), r(DATA, 512), r(DATA + 0x800, 512), w(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1);
    let mut f = std::fs::File::open(&d.path).expect("open");
    f.seek(SeekFrom::Start(10 * SECTOR_BYTES)).expect("seek");
    let mut buf = vec![0u8; 1024];
    f.read_exact(&mut buf).expect("read back");
    assert!(buf[..512].iter().all(|&b| b == 0xab));
    assert!(buf[512..].iter().all(|&b| b == 0xcd));
}

#[test]
fn flush_succeeds() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK as u8));
}

#[test]
fn get_id_returns_disk_id() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 21);
    let id = read_bytes(&mem, DATA, 20);
    assert_eq!(&id[..14], b"capsule-disk-0");
    assert!(id[14..].iter().all(|&b| b == 0));
}

#[test]
fn out_of_range_read_is_ioerr() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    // Last sector plus one more.
    header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR as u8));
    // A sector number that overflows u64 arithmetic.
    header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
    let (_, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn exact_last_sector_read_is_ok() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let (_, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn write_to_read_only_disk_is_ioerr_and_file_unchanged() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, true);
    assert_ne!(dev.avail_features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO), 0);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    write_bytes(&mem, DATA, &[0xff; 512]);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR as u8));
    let contents = std::fs::read(&d.path).expect("read disk");
    assert!(contents[..512].iter().all(|&b| b == 0));
}

#[test]
fn unknown_request_type_is_unsupp() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, 0x77, 0);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_UNSUPP as u8));
}

#[test]
fn capacity_and_seg_max_in_config_space() {
    let d = disk();
    let dev = block(&d, false);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), MAX_DATA_SEGMENTS);
    let mut size_max = [0u8; 4];
    dev.read_config(8, &mut size_max);
    assert_eq!(u32::from_le_bytes(size_max), MAX_SEGMENT_BYTES);
    assert_ne!(
        dev.avail_features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_SIZE_MAX),
        0,
        "size_max is not advertised"
    );
    let mut beyond = [0xffu8; 4];
    dev.read_config(4000, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

/// A malformed chain is completed with used length 0 and its status byte untouched.
fn assert_rejected(chain: &[Desc]) {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (len, status) = run(&mut dev, &mem, chain);
    assert_eq!(len, 0, "malformed chain {chain:?} must be used with length 0");
    assert_eq!(status, STATUS_UNTOUCHED, "no status written for {chain:?}");
}

#[test]
fn chain_without_status_descriptor_is_rejected() {
    assert_rejected(&[r(HDR, 16)]);
}

#[test]
fn read_only_status_descriptor_is_rejected() {
    assert_rejected(&[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]);
}

#[test]
fn zero_length_status_descriptor_is_rejected() {
    assert_rejected(&[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]);
}

#[test]
fn short_header_is_rejected() {
    assert_rejected(&[r(HDR, 8), w(DATA, 512), w(STATUS, 1)]);
}

#[test]
fn writable_header_is_rejected() {
    assert_rejected(&[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
}

#[test]
fn descriptor_outside_guest_memory_is_rejected() {
    assert_rejected(&[r(HDR, 16), w(MEM_BYTES as u64 - 256, 512), w(STATUS, 1)]);
    assert_rejected(&[r(HDR, 16), w(u64::MAX - 10, 512), w(STATUS, 1)]);
}

#[test]
fn read_into_read_only_data_descriptor_is_rejected() {
    assert_rejected(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
}

#[test]
fn device_keeps_serving_after_a_malformed_chain() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = block(&d, false);
    let mut driver = Driver::new(&mem, 0);
    let _irq = activate(&mut dev, &mem, vec![driver.queue()]);
    header(&mem, VIRTIO_BLK_T_IN, 2);
    driver.add_chain(&[r(HDR, 8)]);
    driver.add_chain(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(dev.process_queue(), 2);
    assert_eq!(driver.used(0).1, 0);
    assert_eq!(driver.used(1).1, 513);
    assert!(read_bytes(&mem, DATA, 512).iter().all(|&b| b == 2));
}

#[test]
fn a_data_descriptor_larger_than_size_max_is_ioerr() {
    // A disk large enough that the request is in range: only its segment size is wrong.
    let d = disk();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.path)
        .expect("open disk")
        .set_len(4 * u64::from(MAX_SEGMENT_BYTES))
        .expect("grow disk");
    let mem = guest_memory();
    let mut dev = block(&d, false);
    let too_big = MAX_SEGMENT_BYTES + SECTOR_BYTES as u32;
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, too_big), w(STATUS, 1)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR as u8));
    // Exactly size_max is served.
    let mut dev = block(&d, false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (len, status) = run(&mut dev, &mem, &[r(HDR, 16), w(DATA, MAX_SEGMENT_BYTES), w(STATUS, 1)]);
    assert_eq!((len, status), (MAX_SEGMENT_BYTES + 1, VIRTIO_BLK_S_OK as u8));
}
