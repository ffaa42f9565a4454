//! The KVM VM file descriptor: capability checks, guest memory slots, the in-kernel irqchip
//! and PIT, TSS address and irqfds. It never runs vCPUs.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemoryMmap;

/// The KVM API version every kernel since 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;
/// `KVM_PIT_SPEAKER_DUMMY`: the PIT's speaker port reads as a dummy.
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

/// Where the PVM KVM module shows itself.
pub const KVM_PVM_SYSFS: &str = "/sys/module/kvm_pvm";

/// Whether /dev/kvm is PVM (pagetable-based, no VT-x/AMD-V) rather than hardware KVM.
pub fn host_is_pvm() -> bool {
    std::path::Path::new(KVM_PVM_SYSFS).exists()
}

/// Kernel parameters a guest needs on a PVM host: under PVM the guest's `cpuid` runs natively
/// and shows the host's PCID/INVPCID, but the host refuses CR4.PCIDE (the guest takes a #GP
/// in early boot and halts) and cannot emulate INVPCID (KVM_EXIT_INTERNAL_ERROR). Measured on
/// kvm_pvm 6.18.44-fc: without these the reference kernel hangs, with them it boots.
pub const PVM_GUEST_CMDLINE_QUIRKS: &[&str] = &["nopcid", "noinvpcid"];

/// Capabilities the VMM cannot run without, with a human name.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT2"),
    (Cap::ImmediateExit, "immediate exit (pause)"),
    (Cap::ExtCpuid, "extended CPUID"),
];

/// Capabilities that later features (snapshots) use, with a human name.
pub const OPTIONAL_CAPS: &[(Cap, &str)] = &[
    (Cap::AdjustClock, "kvm-clock adjust (snapshot restore)"),
    (Cap::VcpuEvents, "vCPU events (snapshot)"),
    (Cap::Xsave, "XSAVE state (snapshot)"),
    (Cap::Xcrs, "XCRs (snapshot)"),
    (Cap::Debugregs, "debug registers (snapshot)"),
    (Cap::TscControl, "TSC frequency control"),
];

/// Errors from creating and setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version is {got}, expected {KVM_API_VERSION}")]
    ApiVersion { got: i32 },
    #[error("KVM lacks the {name} capability")]
    MissingCap { name: &'static str },
    #[error("KVM_CREATE_VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_{ioctl}")]
    Kvm {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { ioctl, source }
}

/// A KVM VM.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm, checks the API version and required capabilities, creates a VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion { got: version });
        }
        if let Some((_, name)) = REQUIRED_CAPS
            .iter()
            .find(|(cap, _)| !kvm.check_extension(*cap))
        {
            return Err(VmError::MissingCap { name });
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Self { kvm, fd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Registers every region of `memory` as a KVM memory slot.
    pub fn register_memory(&self, memory: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Kvm {
                    ioctl: "SET_USER_MEMORY_REGION",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `userspace_addr` lives in `memory`, which the caller
            // keeps alive as long as this VM (MicroVm owns both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Sets the TSS address and creates the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))
    }

    /// Makes a write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("IRQFD"))
    }

    /// What CPUID KVM can offer.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))
    }

    /// Creates vCPU `index` (its APIC id).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("CREATE_VCPU"))
    }
}
