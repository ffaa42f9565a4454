//! Device models and the bus that routes guest accesses to them.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;
