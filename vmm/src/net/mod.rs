//! Guest networking: the protocol between a VM's worker and the daemon that brokers what the
//! guest may reach ([`broker`]), and the reading of what the guest sends first on a web
//! connection ([`first_bytes`]: the TLS server name, the HTTP `Host`). (The virtio-net device
//! and the user-space stack that ends the guest's connections in the worker come next.)

pub mod broker;
pub mod first_bytes;
