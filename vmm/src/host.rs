//! Facts about the host that every layer asks the same way: whether its KVM is PVM, and the
//! limit that follows for Linux guests (one vCPU). The server calls these too, so that the
//! VMM, `capsule doctor` and the sandbox manager never disagree.
//!
//! It reads sysfs only; it never opens /dev/kvm (the doctor's MSR probe does that) and never
//! caches an answer.

use std::path::Path;

/// Where the PVM KVM module shows itself.
pub const KVM_PVM_SYSFS: &str = "/sys/module/kvm_pvm";

/// vCPUs a Linux guest should get on a PVM host: only the boot CPU of the PVM-patched kernel
/// opts in to native execution (`arch/x86_64/PVM.md`).
pub const PVM_MAX_LINUX_VCPUS: u8 = 1;

/// Whether /dev/kvm is PVM (pagetable-based, no VT-x/AMD-V) rather than hardware KVM.
pub fn is_pvm() -> bool {
    Path::new(KVM_PVM_SYSFS).exists()
}

/// Most vCPUs a Linux guest should get here: `Some(1)` on PVM, `None` (no limit beyond the
/// VMM's own) elsewhere.
pub fn max_linux_vcpus() -> Option<u8> {
    is_pvm().then_some(PVM_MAX_LINUX_VCPUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vcpu_limit_follows_the_pvm_verdict() {
        assert_eq!(max_linux_vcpus().is_some(), is_pvm());
        assert_eq!(is_pvm(), Path::new(KVM_PVM_SYSFS).exists());
    }
}
