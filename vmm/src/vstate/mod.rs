//! KVM-facing state of one VM: the VM file descriptor, guest memory, vCPUs and the vCPU state a
//! snapshot keeps. Nothing here knows about devices or files.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
