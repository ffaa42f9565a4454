//! Virtio devices of the embedded VMM: the virtio-mmio transport (version 2,
//! non-legacy) and the devices behind it (block, vsock, rng, net), plus the
//! per-VM device event thread.
//!
//! This module owns the guest-facing device models. It never touches KVM file
//! descriptors, the MMIO bus or the kernel command line: vmmcore wires a device
//! in with the steps below. Every byte the guest hands us (registers,
//! descriptors, packets) is hostile and is validated; nothing here panics on
//! guest input.
//!
//! # Wiring one device (what vmmcore does)
//!
//! 1. Construct the device (e.g. [`block::Block::new`]) and share it as a
//!    [`device::SharedDevice`] (`Arc<Mutex<dyn VirtioDevice<M>>>`).
//! 2. Create an `EventFd`, register it as the KVM irqfd for GSI `n`, and build
//!    [`mmio::MmioTransport::new`]`(mem, device.clone(), irq_fd)`.
//! 3. Register the transport on the MMIO bus at base address `A` with a 4 KiB
//!    ([`mmio::MMIO_WINDOW_BYTES`]) window; bus reads and writes call
//!    [`mmio::MmioTransport::read`] / [`mmio::MmioTransport::write`] with the
//!    offset relative to `A`.
//! 4. Append `virtio_mmio.device=4K@0xA:n` to the kernel command line
//!    ([`mmio::kernel_cmdline_entry`] formats it).
//! 5. Start one [`event_loop::DeviceEventLoop`] per VM with all devices; it
//!    serves device-side events (vsock's Unix sockets). Dropping it stops the
//!    thread.
//!
//! virtio-vsock is built with [`vsock::Vsock::new`]`(VsockConfig { guest_cid,
//! uds_path })`; it binds `uds_path` at once, so host processes may connect
//! (`CONNECT <port>\n`, answered `OK <local_port>\n`) even before the guest
//! driver is up. It needs the event loop, as does virtio-net.
//!
//! virtio-net ([`net::Net`], not attached by vmmcore yet) is built with
//! [`net::Net::new`]`(NetConfig { mac }, Box::new(backend))`: two queues (RX 0,
//! TX 1), no offloads, a fixed MAC and link up. Whatever carries its Ethernet
//! frames implements [`net::NetBackend`] (`transmit`, `receive`, `event_fd`,
//! `process_events`); the device's event fd is the backend's, so the event loop
//! delivers host→guest frames as they come, and guest notifications deliver those
//! that waited for RX buffers. [`net::loopback`] is an in-memory backend for
//! tests. The steps to wire it are in the [`net`] module's docs.
//!
//! # Snapshots
//!
//! Every device and the transport implement [`crate::persist::Persist`]: `save` gives plain
//! serde facts ([`block::BlockState`], [`vsock::VsockState`], [`rng::RngState`],
//! [`net::NetState`], [`mmio::MmioState`] with the registers and queue positions), `restore`
//! rebuilds the device from them and the live things handed in (a disk's path, the vsock
//! socket path, a fresh net backend; guest memory, the device and its irqfd for the transport,
//! which re-activates an activated device).
//! Vsock connections do not survive: after restoring, call
//! [`vsock::Vsock::send_transport_reset`] so the guest drops its sockets too. Nor do frames in
//! flight through a net backend: the guest's TCP connections through it time out or reset.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use capsule_vmm::devices::virtio::{device::SharedDevice, event_loop::DeviceEventLoop,
//!     mmio::{kernel_cmdline_entry, MmioTransport}, rng::Rng};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
//! let rng: SharedDevice<GuestMemoryMmap<()>> = Arc::new(Mutex::new(Rng::new()));
//! let irq = EventFd::new(EFD_NONBLOCK).unwrap(); // vmmcore: register as irqfd for GSI 5
//! let mut transport = MmioTransport::new(mem, rng.clone(), irq).unwrap();
//! // vmmcore: bus.insert(transport, 0xd000_0000, 0x1000)
//! let cmdline_part = kernel_cmdline_entry(0xd000_0000, 5); // "virtio_mmio.device=4K@0xd0000000:5"
//! let events = DeviceEventLoop::start(vec![rng]).unwrap();
//! let mut magic = [0u8; 4];
//! transport.read(0, &mut magic); // what a vCPU's MMIO read exit does
//! assert_eq!(u32::from_le_bytes(magic), 0x7472_6976);
//! assert_eq!(cmdline_part, "virtio_mmio.device=4K@0xd0000000:5");
//! drop(events); // stops the device-event thread
//! ```

pub mod block;
pub mod chain;
pub mod device;
pub mod event_loop;
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_utils;
pub mod vsock;
