//! capsule-vmm: a microVM monitor over KVM. It knows nothing of sandboxes or MCP, and never
//! reads files outside what a [`config::VmConfig`] or a snapshot names.
//!
//! [`builder`] turns a [`config::VmConfig`] ([`build_microvm_for_boot`]) or a snapshot
//! ([`build_microvm_from_snapshot`]) into a [`microvm::MicroVm`];
//! [`worker`] runs one VM per OS process and gives the controller a handle to it (confined by
//! [`confinement`] once built); [`snapshot`] saves a paused VM to a directory and restores or
//! forks it in a new process, with incremental (dirty-page) snapshots; [`doctor`] tells what
//! the host can run.

pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod confinement;
pub mod devices;
pub mod doctor;
pub mod host;
pub mod microvm;
pub mod net;
pub mod persist;
pub mod snapshot;
pub mod virtio_wiring;
pub mod vstate;
pub mod worker;
pub mod worker_log;

pub use builder::{build_microvm, build_microvm_for_boot, build_microvm_from_snapshot, BootOptions, BuildError};
pub use config::{ConfigError, DiskConfig, NetDeviceConfig, VmConfig, VsockConfig};
pub use microvm::{MicroVm, MicroVmError};
pub use vstate::vcpu::{RunState, VmEvent};
