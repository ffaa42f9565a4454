//! What this host lets the KVM engine run: whether it can run microVMs at all (from `capsule
//! doctor`'s probe) and how many vCPUs a Linux guest may have.
//!
//! It reads the host; it never changes it.

use capsule_vmm::config::{MAX_VCPUS, MIN_VCPUS};
use capsule_vmm::doctor::HostReport;
use capsule_vmm::host::is_pvm;
use capsule_vmm::host::PVM_MAX_LINUX_VCPUS;

/// A vCPU count this host cannot give a guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuError {
    /// PVM runs only the boot CPU of a Linux guest natively.
    #[error(
        "{asked} vCPUs asked, but this host's KVM is PVM (no VT-x/AMD-V), where only the boot CPU of a \
         Linux guest opts in to native speed: at most {PVM_MAX_LINUX_VCPUS} vCPU. Ask for \
         vcpus={PVM_MAX_LINUX_VCPUS}, or run capsule on a host with hardware virtualization (see `capsule doctor`)"
    )]
    Pvm {
        /// What was asked.
        asked: u32,
    },
    /// Outside what the VMM supports.
    #[error("vcpus must be {MIN_VCPUS}..={MAX_VCPUS}, got {asked}")]
    OutOfRange {
        /// What was asked.
        asked: u32,
    },
}

/// Checks that the host can give a Linux guest `vcpus` vCPUs.
pub fn check_vcpus(vcpus: u32) -> Result<u8, VcpuError> {
    if is_pvm() && vcpus > u32::from(PVM_MAX_LINUX_VCPUS) {
        return Err(VcpuError::Pvm { asked: vcpus });
    }
    u8::try_from(vcpus)
        .ok()
        .filter(|v| (MIN_VCPUS..=MAX_VCPUS).contains(v))
        .ok_or(VcpuError::OutOfRange { asked: vcpus })
}

/// Why this host cannot run the KVM engine, from `capsule doctor`'s probe; `None` when it can.
pub fn host_refusal(report: &HostReport) -> Option<String> {
    if report.can_run_vms {
        return None;
    }
    let advice = if report.advice.is_empty() { "KVM is not usable".to_owned() } else { report.advice.join("; ") };
    Some(format!("this host cannot run microVMs ({advice}); run `capsule doctor` for details"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_vcpus_on_pvm_is_refused_with_the_reason() {
        if !is_pvm() {
            assert!(check_vcpus(2).is_ok());
            return;
        }
        let err = check_vcpus(2).unwrap_err().to_string();
        assert!(err.contains("PVM") && err.contains("at most 1 vCPU"), "{err}");
        assert_eq!(check_vcpus(1).unwrap(), 1);
    }

    #[test]
    fn a_host_without_kvm_is_refused_with_the_doctors_advice() {
        let mut report = capsule_vmm::doctor::probe();
        report.can_run_vms = false;
        report.advice = vec!["/dev/kvm does not exist: load the kvm module".into()];
        let why = host_refusal(&report).expect("refused");
        assert!(why.contains("/dev/kvm does not exist"), "{why}");
        assert!(why.contains("capsule doctor"), "{why}");
        report.can_run_vms = true;
        assert_eq!(host_refusal(&report), None);
    }
}
