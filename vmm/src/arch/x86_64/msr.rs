//! Initial MSR values for a booting vCPU, and the PVM identification MSR. It never saves or
//! restores the MSRs of a running vCPU (`vstate::vcpu_state` does).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// PVM: reads `PVM_SIGNATURE` on a PVM host (see `PVM.md` in this directory).
pub const MSR_PVM_IDENTIFY: u32 = 0x4b56_4d11;
/// Value of [`MSR_PVM_IDENTIFY`] on a PVM host: "PVM".
pub const PVM_SIGNATURE: u64 = 0x4d_5650;

/// Errors from MSR setup.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("building the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS wrote {written} of {wanted} MSRs; MSR {first_rejected:#x} was refused")]
    Partial { written: usize, wanted: usize, first_rejected: u32 },
}

/// The MSRs a booting vCPU starts with (as Firecracker and QEMU set them).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    ]
}

/// Writes [`boot_msr_entries`] to `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let written = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if written != entries.len() {
        return Err(MsrError::Partial { written, wanted: entries.len(), first_rejected: entries[written].index });
    }
    Ok(())
}

/// Reads one MSR; `None` if KVM refuses it.
pub fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}
