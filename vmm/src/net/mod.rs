//! Guest networking: the protocol between a VM's worker and the daemon that brokers what the
//! guest may reach ([`broker`]). (The virtio-net device and the user-space stack that ends the
//! guest's connections in the worker come next.)

pub mod broker;
