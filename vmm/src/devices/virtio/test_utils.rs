//! Test support for the device models, as Firecracker's `test_utils`: one guest memory
//! region, a driver-side split queue laid out in it (virtio-queue's `MockSplitQueue`) and the
//! activation a transport would do. Compiled for unit tests only; it never runs a guest.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivateContext, Interrupt, VirtioDevice};

pub(crate) type Mem = vm_memory::GuestMemoryMmap<()>;

/// Guest memory of every device test.
const MEM_BYTES: usize = 4 << 20;
/// Queue size of the mock driver.
const QUEUE_SIZE: u16 = 16;

pub(crate) fn guest_memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory")
}

/// The driver side of one queue, its rings at `base`.
pub(crate) struct Driver<'a> {
    mock: MockSplitQueue<'a, Mem>,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    pub(crate) fn new(mem: &'a Mem, base: u64) -> Self {
        Self { mock: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE), next_desc: 0 }
    }

    /// A device-side queue over these rings.
    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().expect("queue")
    }

    /// Posts one chain of `(address, length, device-writable)` descriptors; returns its head.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let last = i + 1 == descs.len();
                let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).expect("add chain");
        self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    /// Posts one descriptor pointing at an indirect table written at `table`, holding the
    /// chain of `(address, length, device-writable)` descriptors; returns its head.
    pub(crate) fn add_indirect_chain(&mut self, mem: &Mem, table: u64, descs: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(raw, GuestAddress(table + 16 * i as u64)).expect("write indirect table");
        }
        let head = self.next_desc;
        let table_bytes = 16 * descs.len() as u32;
        let raw = RawDescriptor::from(SplitDescriptor::new(table, table_bytes, VRING_DESC_F_INDIRECT as u16, 0));
        self.mock.add_desc_chains(&[raw], head).expect("add indirect chain");
        self.next_desc = (head + 1) % QUEUE_SIZE;
        head
    }

    /// Used-ring entry `i`: (head, length).
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let e = self.mock.used().ring().ref_at(usize::from(i % QUEUE_SIZE)).expect("used").load();
        (e.id(), e.len())
    }

    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

/// Activates `device` with `queues` as a transport would at DRIVER_OK.
pub(crate) fn activate<D: VirtioDevice<Mem>>(device: &mut D, mem: &Mem, queues: Vec<Queue>) -> Arc<Interrupt> {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: interrupt.clone(),
        acked_features: device.avail_features(),
    };
    device.activate(ctx).expect("activate");
    interrupt
}

pub(crate) fn read_bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).expect("read guest memory");
    buf
}

pub(crate) fn write_bytes(mem: &Mem, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).expect("write guest memory");
}
