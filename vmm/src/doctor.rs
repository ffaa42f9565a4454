//! What this host can run, and why not: /dev/kvm access, the KVM API version and capabilities,
//! and whether KVM is hardware-assisted (VT-x/AMD-V) or PVM, with what follows for guests.
//! It probes by opening /dev/kvm and, for PVM, reading one MSR on a throwaway vCPU; it never
//! runs a guest and never changes the host.

use std::path::Path;

use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::arch::x86_64::msr::{read_msr, MSR_PVM_IDENTIFY, PVM_SIGNATURE};
use crate::host;
use crate::vstate::vm::{KVM_API_VERSION, OPTIONAL_CAPS, PVM_GUEST_CMDLINE_QUIRKS, REQUIRED_CAPS};

/// Kept for callers outside the VMM; the one place is [`crate::host`].
pub use crate::host::PVM_MAX_LINUX_VCPUS;

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// How KVM virtualizes here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Virtualization {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// PVM: pagetable-based virtualization without VT-x/AMD-V.
    Pvm,
    /// Could not tell (no usable /dev/kvm).
    Unknown,
}

/// One KVM capability.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilityCheck {
    pub name: &'static str,
    pub required: bool,
    pub present: bool,
}

/// Everything `capsule doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kvm_device: String,
    /// Whether /dev/kvm could be opened read-write.
    pub kvm_accessible: bool,
    /// Why not, when it could not.
    pub kvm_error: Option<String>,
    pub api_version: Option<i32>,
    pub capabilities: Vec<CapabilityCheck>,
    /// CPU flags: vmx or svm present.
    pub cpu_has_hardware_virtualization: bool,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm_module: bool,
    /// MSR 0x4b564d11 read "PVM" on a probe vCPU (None: not probed).
    pub pvm_msr_signature: Option<bool>,
    pub virtualization: Virtualization,
    /// Whether capsule can run VMs here at all.
    pub can_run_vms: bool,
    /// Most vCPUs a Linux guest should get.
    pub max_linux_vcpus: Option<u8>,
    /// What follows, in sentences.
    pub advice: Vec<String>,
}

/// Probes the host.
pub fn probe() -> HostReport {
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = |name: &str| {
        cpu_flags.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == name))
    };
    let (has_vmx, has_svm) = (flag("vmx"), flag("svm"));
    let kvm_pvm_module = host::is_pvm();
    let mut report = HostReport {
        kvm_device: KVM_DEVICE.into(),
        kvm_accessible: false,
        kvm_error: None,
        api_version: None,
        capabilities: Vec::new(),
        cpu_has_hardware_virtualization: has_vmx || has_svm,
        kvm_pvm_module,
        pvm_msr_signature: None,
        virtualization: Virtualization::Unknown,
        can_run_vms: false,
        max_linux_vcpus: None,
        advice: Vec::new(),
    };
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            report.kvm_error = Some(e.to_string());
            report.advice.push(if Path::new(KVM_DEVICE).exists() {
                format!("{KVM_DEVICE} exists but cannot be opened ({e}): run as a user in the `kvm` group or fix its permissions")
            } else {
                format!("{KVM_DEVICE} does not exist: load the kvm module (kvm_intel/kvm_amd) or enable virtualization in firmware")
            });
            return report;
        }
    };
    report.kvm_accessible = true;
    let version = kvm.get_api_version();
    report.api_version = Some(version);
    for (cap, name, required) in
        REQUIRED_CAPS.iter().map(|(c, n)| (*c, *n, true)).chain(OPTIONAL_CAPS.iter().map(|(c, n)| (*c, *n, false)))
    {
        report.capabilities.push(CapabilityCheck { name, required, present: kvm.check_extension(cap) });
    }
    report.pvm_msr_signature = probe_pvm_msr(&kvm);
    // The verdict is the VMM's own (`host::is_pvm`), so what the doctor says is what the VMM
    // does; the MSR probe only cross-checks it.
    report.virtualization = if kvm_pvm_module {
        Virtualization::Pvm
    } else if has_vmx {
        Virtualization::Vmx
    } else if has_svm {
        Virtualization::Svm
    } else {
        Virtualization::Unknown
    };
    let missing: Vec<&str> = report.capabilities.iter().filter(|c| c.required && !c.present).map(|c| c.name).collect();
    let optional_missing: Vec<&str> =
        report.capabilities.iter().filter(|c| !c.required && !c.present).map(|c| c.name).collect();
    if !optional_missing.is_empty() {
        report.advice.push(format!(
            "KVM here lacks {}: snapshots taken here leave that state out, and a snapshot that holds it \
             is refused here with an error naming it",
            optional_missing.join(", ")
        ));
    }
    report.can_run_vms = version == KVM_API_VERSION && missing.is_empty();
    if version != KVM_API_VERSION {
        report.advice.push(format!("KVM API version {version} is not the expected {KVM_API_VERSION}"));
    }
    if !missing.is_empty() {
        report.advice.push(format!("KVM lacks required capabilities: {}", missing.join(", ")));
    }
    if report.pvm_msr_signature == Some(true) && !kvm_pvm_module {
        report.advice.push(format!(
            "a vCPU reads the PVM signature but {} is missing: capsule treats this host as hardware KVM \
             and will not apply the PVM guest settings",
            host::KVM_PVM_SYSFS
        ));
    }
    match report.virtualization {
        Virtualization::Pvm => {
            report.max_linux_vcpus = host::max_linux_vcpus();
            report.advice.push(
                "KVM here is PVM (no VT-x/AMD-V): only a PVM-enabled guest kernel (CONFIG_PVM_GUEST, \
                 which `capsule image build` builds on a PVM host) runs at native speed; a stock \
                 kernel runs in KVM's instruction emulator at about 1 M instructions/s"
                    .into(),
            );
            report.advice.push(format!(
                "give Linux guests {PVM_MAX_LINUX_VCPUS} vCPU: only the boot CPU opts in to native execution"
            ));
            report.advice.push(format!(
                "guests need `{}` on PVM (the VMM appends them); boot with clocksource=kvm-clock so \
                 snapshots restore without a clock jump",
                PVM_GUEST_CMDLINE_QUIRKS.join(" ")
            ));
        }
        Virtualization::Vmx | Virtualization::Svm => {
            report.advice.push(
                "hardware-assisted KVM: use the standard (unpatched) guest kernel; the PVM kernel \
                 stops on SMEP here unless booted with clearcpuid=smep,smap"
                    .into(),
            );
        }
        Virtualization::Unknown => {
            report.advice.push("could not tell how KVM virtualizes here (no vmx/svm flag, no kvm_pvm module)".into())
        }
    }
    report
}

/// Reads the PVM identification MSR on a throwaway vCPU.
fn probe_pvm_msr(kvm: &Kvm) -> Option<bool> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    Some(read_msr(&vcpu, MSR_PVM_IDENTIFY) == Some(PVM_SIGNATURE))
}

impl HostReport {
    /// A warning if `vcpus` is more than a Linux guest should get here.
    pub fn vcpu_warning(&self, vcpus: u8) -> Option<String> {
        let max = self.max_linux_vcpus?;
        (vcpus > max).then(|| {
            format!("{vcpus} vCPUs requested but this host is PVM: Linux guests get at most {max} vCPU at native speed")
        })
    }

    /// The report as text for people.
    pub fn render_text(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let mut out = String::new();
        out.push_str(&format!("KVM device      {} (accessible: {})\n", self.kvm_device, yes_no(self.kvm_accessible)));
        if let Some(e) = &self.kvm_error {
            out.push_str(&format!("  error         {e}\n"));
        }
        if let Some(v) = self.api_version {
            out.push_str(&format!("KVM API version {v}\n"));
        }
        for cap in &self.capabilities {
            out.push_str(&format!(
                "  {:<40} {}{}\n",
                cap.name,
                if cap.present { "ok" } else { "MISSING" },
                if cap.required { "" } else { " (optional)" }
            ));
        }
        out.push_str(&format!(
            "Virtualization  {:?} (cpu vmx/svm: {}, kvm_pvm module: {}, PVM MSR: {})\n",
            self.virtualization,
            yes_no(self.cpu_has_hardware_virtualization),
            yes_no(self.kvm_pvm_module),
            match self.pvm_msr_signature {
                Some(b) => yes_no(b),
                None => "not probed",
            }
        ));
        out.push_str(&format!("Can run VMs     {}\n", yes_no(self.can_run_vms)));
        if let Some(max) = self.max_linux_vcpus {
            out.push_str(&format!("Linux vCPUs     at most {max}\n"));
        }
        for line in &self.advice {
            out.push_str(&format!("- {line}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_agrees_with_the_kvm_device() {
        let report = probe();
        assert_eq!(report.kvm_accessible, Kvm::new().is_ok());
        if report.kvm_accessible {
            assert_eq!(report.api_version, Some(KVM_API_VERSION));
            assert!(report.capabilities.iter().any(|c| c.name == "irqfd" && c.required));
        }
        if report.virtualization == Virtualization::Pvm {
            assert_eq!(report.vcpu_warning(1), None);
            assert!(report.vcpu_warning(2).unwrap().contains("PVM"));
        }
        assert!(!report.render_text().is_empty());
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("virtualization").is_some());
    }
}
