//! Guest networking: the protocol between a VM's worker and the daemon that brokers what the
//! guest may reach ([`broker`]), and the reading of what the guest sends first on a web
//! connection ([`first_bytes`]: the TLS server name, the HTTP `Host`). The guest's interface is
//! the virtio-net device ([`crate::devices::virtio::net`]); the user-space stack that ends the
//! guest's connections in the worker is that device's
//! [`NetBackend`](crate::devices::virtio::net::NetBackend) ([`stack`]); the daemon reaches it on
//! the broker socket in the sandbox directory ([`broker_socket`]).

pub mod broker;
pub mod broker_socket;
pub mod first_bytes;
pub mod stack;
