//! The KVM VM file descriptor: capability checks, guest memory slots, the in-kernel irqchip
//! and PIT, TSS address and irqfds. It never runs vCPUs.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemoryMmap;

/// The KVM API version every kernel since 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;
/// `KVM_PIT_SPEAKER_DUMMY`: the PIT's speaker port reads as a dummy.
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

/// Kept for callers outside the VMM; the one place is [`crate::host`].
pub use crate::host::{is_pvm as host_is_pvm, KVM_PVM_SYSFS};

/// Kernel parameters a guest needs on a PVM host: under PVM the guest's `cpuid` runs natively
/// and shows the host's PCID/INVPCID, but the host refuses CR4.PCIDE (the guest takes a #GP
/// in early boot and halts) and cannot emulate INVPCID (KVM_EXIT_INTERNAL_ERROR). Measured on
/// kvm_pvm 6.18.44-fc: without these a PVM guest kernel hangs, with them it boots
/// (`arch/x86_64/PVM.md`).
///
/// `nogbpages`: the guest's native `cpuid` also shows the host's 1 GiB pages (pdpe1gb), so a
/// guest whose RAM holds a whole 1 GiB-aligned GiB (any guest of 2048 MiB or more) maps it
/// with a 1 GiB page, and PVM's shadow paging rejects that PUD (#PF "reserved bit violation"
/// in sparse_init, then "Attempted to kill the idle task"). 2 MiB pages work.
pub const PVM_GUEST_CMDLINE_QUIRKS: &[&str] = &["nopcid", "noinvpcid", "nogbpages"];

/// Capabilities the VMM cannot run without, with a human name. The kvm-clock and vCPU-event
/// ioctls are here too: every x86 KVM since Linux 2.6.33 has them, and a snapshot without them
/// would restore a guest whose clock jumps or whose pending interrupt is lost.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT2"),
    (Cap::ImmediateExit, "immediate exit (pause)"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::AdjustClock, "kvm-clock get/set (snapshots)"),
    (Cap::VcpuEvents, "vCPU events (snapshots)"),
];

/// Capabilities whose state only some hosts have, with a human name that says what a snapshot
/// does without it. [`HostCaps`] holds exactly these; a snapshot leaves out what the host does
/// not offer, and a restore refuses a snapshot that holds what this host cannot take.
pub const OPTIONAL_CAPS: &[(Cap, &str)] = &[
    (Cap::Xsave, "XSAVE state (snapshots keep only the FPU/SSE state without it)"),
    (Cap::Xcrs, "XCRs (snapshots have none without it; no XSAVE, no XCRs)"),
    (Cap::Debugregs, "debug registers (snapshots leave them out without it)"),
    (Cap::GetTscKhz, "TSC frequency read (snapshots leave the rate out without it)"),
    (Cap::TscControl, "TSC frequency control (restores keep the host's rate without it)"),
];

/// Which [`OPTIONAL_CAPS`] a host offers: what vCPU state a snapshot saves, and what a restore
/// can write. Passed in, so that tests can play a host that lacks one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// `KVM_CAP_XSAVE`: the XSAVE area, else the legacy FPU state.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debugregs: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub get_tsc_khz: bool,
    /// `KVM_CAP_TSC_CONTROL`: `KVM_SET_TSC_KHZ` works.
    pub tsc_control: bool,
}

impl HostCaps {
    /// A host that offers every optional capability.
    pub const ALL: Self = Self { xsave: true, xcrs: true, debugregs: true, get_tsc_khz: true, tsc_control: true };

    /// The capabilities `has` says are present (only [`OPTIONAL_CAPS`] are asked).
    pub fn from_fn(has: impl Fn(Cap) -> bool) -> Self {
        Self {
            xsave: has(Cap::Xsave),
            xcrs: has(Cap::Xcrs),
            debugregs: has(Cap::Debugregs),
            get_tsc_khz: has(Cap::GetTscKhz),
            tsc_control: has(Cap::TscControl),
        }
    }

    /// What this host's KVM offers (`KVM_CHECK_EXTENSION`).
    pub fn probe(kvm: &Kvm) -> Self {
        Self::from_fn(|cap| kvm.check_extension(cap))
    }
}

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
        if let Some((_, name)) = REQUIRED_CAPS.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
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

    /// Which optional vCPU state this host's KVM offers.
    pub fn host_caps(&self) -> HostCaps {
        HostCaps::probe(&self.kvm)
    }

    /// Registers every region of `memory` as a KVM memory slot.
    pub fn register_memory(&self, memory: &GuestMemoryMmap) -> Result<(), VmError> {
        self.set_memory_slots(memory, false)
    }

    /// Turns KVM dirty-page logging on or off for every slot of `memory` (re-registers the
    /// slots with `KVM_MEM_LOG_DIRTY_PAGES`). Turning it on starts with a clean log.
    pub fn set_dirty_logging(&self, memory: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
        self.set_memory_slots(memory, on)
    }

    /// The pages KVM saw written in each slot since the last call (and clears the log): one
    /// bitmap per region of `memory`, bit `n` of word `n / 64` for page `n`.
    pub fn take_dirty_log(&self, memory: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd.get_dirty_log(slot as u32, region.len() as usize).map_err(kvm_err("GET_DIRTY_LOG"))
            })
            .collect()
    }

    fn set_memory_slots(&self, memory: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let host = memory.get_host_address(region.start_addr()).map_err(|_| VmError::Kvm {
                ioctl: "SET_USER_MEMORY_REGION",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `userspace_addr` lives in `memory`, which the caller
            // keeps alive as long as this VM (MicroVm owns both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Sets the TSS address and creates the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(kvm_err("SET_TSS_ADDR"))?;
        self.fd.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))
    }

    /// Makes a write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("IRQFD"))
    }

    /// What CPUID KVM can offer.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("GET_SUPPORTED_CPUID"))
    }

    /// Creates vCPU `index` (its APIC id).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd.create_vcpu(u64::from(index)).map_err(kvm_err("CREATE_VCPU"))
    }
}

/// The VM-wide KVM state a snapshot keeps: the in-kernel PIC pair and IOAPIC, the PIT and
/// kvm-clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock", &self.clock.clock).finish_non_exhaustive()
    }
}

impl Vm {
    /// Reads the irqchip, PIT and clock state (vCPUs must be out of `KVM_RUN`).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut chip).map_err(kvm_err("GET_IRQCHIP"))?;
            Ok(chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("GET_CLOCK"))?,
        })
    }

    /// Writes `state` into this VM (after [`Vm::setup_irqchip`], before vCPU state). The clock
    /// is set to the saved kvm-clock value, so the guest sees no jump across the snapshot.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(kvm_err("SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&state.pit).map_err(kvm_err("SET_PIT2"))?;
        let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(kvm_err("SET_CLOCK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_caps_hold_exactly_the_optional_caps() {
        assert_eq!(HostCaps::from_fn(|_| true), HostCaps::ALL);
        // Each optional capability moves exactly one field, and no required one moves any.
        for (cap, name) in OPTIONAL_CAPS {
            let without = HostCaps::from_fn(|c| c != *cap);
            assert_ne!(without, HostCaps::ALL, "{name} is not in HostCaps");
            let only = HostCaps::from_fn(|c| c == *cap);
            assert_ne!(only, HostCaps::from_fn(|_| false), "{name} is not in HostCaps");
        }
        for (cap, name) in REQUIRED_CAPS {
            assert_eq!(HostCaps::from_fn(|c| c != *cap), HostCaps::ALL, "required {name} is in HostCaps");
        }
        let fields = 5;
        assert_eq!(OPTIONAL_CAPS.len(), fields, "a HostCaps field without a doctor line, or the reverse");
    }
}
