//! Device models and the bus that routes guest accesses to them. Nothing here touches KVM
//! file descriptors (the builder wires devices to KVM).

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;
