//! KVM-facing state of one VM: the VM file descriptor, guest memory and vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
