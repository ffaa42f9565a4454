//! Test fixture shared by the `virtio_*` tests: plain guest memory, a
//! driver-side split queue (virtio-queue's `MockSplitQueue`) and helpers to
//! post descriptor chains and read back used-ring entries, as rust-vmm does.
#![allow(dead_code)]

use std::sync::Arc;

use capsule_vmm::devices::virtio::device::{ActivateContext, Interrupt, VirtioDevice};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type Mem = GuestMemoryMmap<()>;

/// Guest memory size used by every test.
pub const MEM_BYTES: usize = 16 << 20;
/// Queue size used by the mock driver.
pub const QUEUE_SIZE: u16 = 256;
/// Where test data buffers start.
pub const DATA_BASE: u64 = 0x10_0000;

pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory")
}

/// One descriptor as the test driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn r(addr: u64, len: u32) -> Desc {
    Desc { addr, len, writable: false }
}

pub fn w(addr: u64, len: u32) -> Desc {
    Desc { addr, len, writable: true }
}

/// The driver side of one queue, laid out at `base` in guest memory.
pub struct Driver<'a> {
    pub mock: MockSplitQueue<'a, Mem>,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a Mem, base: u64) -> Self {
        // Start from clean rings even when a test reuses the memory.
        mem.write_slice(&[0u8; 0x2000], GuestAddress(base)).expect("clear rings");
        Self { mock: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE), next_desc: 0 }
    }

    /// A device-side queue over this driver's rings.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().expect("queue")
    }

    /// Posts one chain; returns its head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = if d.writable { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).expect("add chain");
        self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Used-ring entry `i`: (head id, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self.mock.used().ring().ref_at(i as usize % QUEUE_SIZE as usize).expect("used").load();
        (e.id(), e.len())
    }
}

/// Activates `device` with `queues`; returns its interrupt line.
pub fn activate<D: VirtioDevice<Mem> + ?Sized>(device: &mut D, mem: &Mem, queues: Vec<Queue>) -> Arc<Interrupt> {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    device
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: device.avail_features(),
        })
        .expect("activate");
    interrupt
}

pub fn write_bytes(mem: &Mem, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).expect("write guest memory");
}

pub fn read_bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).expect("read guest memory");
    buf
}
