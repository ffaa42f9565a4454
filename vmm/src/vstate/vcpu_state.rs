//! The KVM state of one vCPU as plain serde facts ([`VcpuState`]): what a snapshot saves and a
//! restore writes back into a fresh vCPU, and the order that takes.
//!
//! Some pieces exist only on some hosts ([`HostCaps`]): the XSAVE area (else the legacy FPU
//! state), the XCRs, the debug registers and the TSC rate. A piece the host does not offer is
//! saved as absent; a restore writes a piece only when it was saved, and refuses a snapshot that
//! holds a piece this host cannot take, naming it. See `../snapshot/NOTES.md` for the facts
//! behind the list and the order.
//!
//! It talks to KVM only through [`VcpuStateFd`] (implemented by `VcpuFd`, and by a fake host in
//! the tests); it never runs a vCPU and never reads guest memory.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::vstate::vm::HostCaps;

/// PVM: the VIF MSR (virtual IF page GPA and flags). Required vCPU state on a PVM host and not
/// in `KVM_GET_MSR_INDEX_LIST` (`../snapshot/NOTES.md`, "The PVM VIF MSR"). Restored last.
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;
/// MSRs saved beyond the index list: the PVM VIF MSR, kvmclock's system time and wall clock
/// (new and legacy numbers). Unreadable ones are skipped.
const EXTRA_SAVED_MSRS: &[u32] = &[MSR_PVM_VIF, 0x4b56_4d00, 0x4b56_4d01, 0x11, 0x12];
/// Most MSRs one `KVM_GET_MSRS`/`KVM_SET_MSRS` call carries (KVM's own limit is 255).
const MSRS_PER_IOCTL: usize = 64;

/// What one vCPU ioctl returns.
pub type KvmResult<T> = Result<T, kvm_ioctls::Error>;

/// The vCPU ioctls that saving and restoring state use. `VcpuFd` is the real one; the seam
/// lets a test play a host that lacks a capability.
pub trait VcpuStateFd {
    fn get_cpuid2(&self, max_entries: usize) -> KvmResult<CpuId>;
    fn set_cpuid2(&self, cpuid: &CpuId) -> KvmResult<()>;
    fn get_mp_state(&self) -> KvmResult<kvm_mp_state>;
    fn set_mp_state(&self, mp_state: kvm_mp_state) -> KvmResult<()>;
    fn get_regs(&self) -> KvmResult<kvm_regs>;
    fn set_regs(&self, regs: &kvm_regs) -> KvmResult<()>;
    fn get_sregs(&self) -> KvmResult<kvm_sregs>;
    fn set_sregs(&self, sregs: &kvm_sregs) -> KvmResult<()>;
    fn get_fpu(&self) -> KvmResult<kvm_fpu>;
    fn set_fpu(&self, fpu: &kvm_fpu) -> KvmResult<()>;
    fn get_xsave(&self) -> KvmResult<kvm_xsave>;
    /// `KVM_SET_XSAVE` with a legacy-sized (4 KiB) area, as `get_xsave` returns it.
    fn set_xsave(&self, xsave: &kvm_xsave) -> KvmResult<()>;
    fn get_xcrs(&self) -> KvmResult<kvm_xcrs>;
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> KvmResult<()>;
    fn get_lapic(&self) -> KvmResult<kvm_lapic_state>;
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> KvmResult<()>;
    fn get_debug_regs(&self) -> KvmResult<kvm_debugregs>;
    fn set_debug_regs(&self, debug_regs: &kvm_debugregs) -> KvmResult<()>;
    fn get_tsc_khz(&self) -> KvmResult<u32>;
    fn set_tsc_khz(&self, khz: u32) -> KvmResult<()>;
    fn get_msrs(&self, msrs: &mut Msrs) -> KvmResult<usize>;
    fn set_msrs(&self, msrs: &Msrs) -> KvmResult<usize>;
    fn get_vcpu_events(&self) -> KvmResult<kvm_vcpu_events>;
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> KvmResult<()>;
}

/// Implements the [`VcpuStateFd`] methods listed, each by calling `VcpuFd`'s own.
macro_rules! forward_to_vcpu_fd {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> KvmResult<$ret> {
            VcpuFd::$name(self, $($arg),*)
        })*
    };
}

impl VcpuStateFd for VcpuFd {
    forward_to_vcpu_fd! {
        get_cpuid2(max_entries: usize) -> CpuId;
        set_cpuid2(cpuid: &CpuId) -> ();
        get_mp_state() -> kvm_mp_state;
        set_mp_state(mp_state: kvm_mp_state) -> ();
        get_regs() -> kvm_regs;
        set_regs(regs: &kvm_regs) -> ();
        get_sregs() -> kvm_sregs;
        set_sregs(sregs: &kvm_sregs) -> ();
        get_fpu() -> kvm_fpu;
        set_fpu(fpu: &kvm_fpu) -> ();
        get_xsave() -> kvm_xsave;
        get_xcrs() -> kvm_xcrs;
        set_xcrs(xcrs: &kvm_xcrs) -> ();
        get_lapic() -> kvm_lapic_state;
        set_lapic(lapic: &kvm_lapic_state) -> ();
        get_debug_regs() -> kvm_debugregs;
        set_debug_regs(debug_regs: &kvm_debugregs) -> ();
        get_tsc_khz() -> u32;
        set_tsc_khz(khz: u32) -> ();
        get_msrs(msrs: &mut Msrs) -> usize;
        set_msrs(msrs: &Msrs) -> usize;
        get_vcpu_events() -> kvm_vcpu_events;
        set_vcpu_events(events: &kvm_vcpu_events) -> ();
    }

    fn set_xsave(&self, xsave: &kvm_xsave) -> KvmResult<()> {
        // SAFETY: `xsave` is a complete `kvm_xsave` (4 KiB, the legacy size KVM_GET_XSAVE
        // returns), so KVM reads only within it.
        unsafe { VcpuFd::set_xsave(self, xsave) }
    }
}

/// `struct kvm_fpu` (arch/x86/include/uapi/asm/kvm.h) in serde form: the legacy x87/SSE state,
/// what a host without XSAVE offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The floating-point and vector registers: the XSAVE area where the host has XSAVE (it
/// covers what `KVM_GET_FPU` reports), else the legacy FPU state.
#[derive(Serialize, Deserialize)]
pub enum FloatState {
    /// Boxed, like the FPU state, because both are large.
    Xsave(Box<kvm_xsave>),
    Fpu(Box<FpuState>),
}

impl std::fmt::Debug for FloatState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Xsave(_) => f.write_str("Xsave(..)"),
            Self::Fpu(fpu) => f.debug_tuple("Fpu").field(fpu).finish(),
        }
    }
}

/// Everything KVM holds for one vCPU, as plain serde facts. `None` marks a piece the saving
/// host did not offer.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub float: FloatState,
    /// Absent without `KVM_CAP_XCRS` (a host without XSAVE has no XCRs).
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// Absent without `KVM_CAP_DEBUGREGS`.
    pub debug_regs: Option<kvm_debugregs>,
    /// The guest TSC rate; absent when KVM could not report it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("xsave", &matches!(self.float, FloatState::Xsave(_)))
            .field("xcrs", &self.xcrs.is_some())
            .finish_non_exhaustive()
    }
}

/// Errors from saving or restoring a vCPU's KVM state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM_{ioctl} on vCPU {index}")]
    Kvm {
        ioctl: &'static str,
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("building a KVM list for vCPU {index}")]
    Fam {
        index: u8,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("the vCPU {index} thread did not hand back its state")]
    ThreadGone { index: u8 },
    #[error(
        "vCPU {index}: the snapshot holds {piece}, but this host's KVM lacks {cap}, so it cannot be restored here"
    )]
    HostLacks { index: u8, piece: &'static str, cap: &'static str },
}

fn state_err(ioctl: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { ioctl, index, source }
}

/// The MSR numbers worth saving: KVM's index list plus `EXTRA_SAVED_MSRS`.
pub fn saved_msr_indices(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm.get_msr_index_list().map_err(state_err("GET_MSR_INDEX_LIST", 0))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    for extra in EXTRA_SAVED_MSRS {
        if !indices.contains(extra) {
            indices.push(*extra);
        }
    }
    Ok(indices)
}

impl VcpuState {
    /// Reads the state of vCPU `index` (out of `KVM_RUN`) on a host offering `caps`;
    /// `msr_indices` from [`saved_msr_indices`]. MSRs KVM refuses to read are left out.
    pub fn save(
        fd: &impl VcpuStateFd,
        index: u8,
        msr_indices: &[u32],
        caps: &HostCaps,
    ) -> Result<Self, VcpuStateError> {
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(state_err("GET_CPUID2", index))?
            .as_slice()
            .to_vec();
        let mp_state = fd.get_mp_state().map_err(state_err("GET_MP_STATE", index))?;
        let regs = fd.get_regs().map_err(state_err("GET_REGS", index))?;
        let sregs = fd.get_sregs().map_err(state_err("GET_SREGS", index))?;
        let float = if caps.xsave {
            FloatState::Xsave(Box::new(fd.get_xsave().map_err(state_err("GET_XSAVE", index))?))
        } else {
            FloatState::Fpu(Box::new(FpuState::from(&fd.get_fpu().map_err(state_err("GET_FPU", index))?)))
        };
        let xcrs = if caps.xcrs { Some(fd.get_xcrs().map_err(state_err("GET_XCRS", index))?) } else { None };
        let lapic = fd.get_lapic().map_err(state_err("GET_LAPIC", index))?;
        let debug_regs =
            if caps.debugregs { Some(fd.get_debug_regs().map_err(state_err("GET_DEBUGREGS", index))?) } else { None };
        // A rate KVM cannot report is left out rather than failing the snapshot: it is advisory.
        let tsc_khz = if caps.get_tsc_khz { fd.get_tsc_khz().ok().filter(|&khz| khz != 0) } else { None };
        let msrs = read_msrs(fd, index, msr_indices)?;
        let events = fd.get_vcpu_events().map_err(state_err("GET_VCPU_EVENTS", index))?;
        Ok(Self { index, cpuid, regs, sregs, float, xcrs, msrs, lapic, events, mp_state, debug_regs, tsc_khz })
    }

    /// Checks that a host offering `caps` can take every piece this state holds; the error
    /// names the first one it cannot.
    pub fn check_host(&self, caps: &HostCaps) -> Result<(), VcpuStateError> {
        let lacks = |piece, cap| VcpuStateError::HostLacks { index: self.index, piece, cap };
        if matches!(self.float, FloatState::Xsave(_)) && !caps.xsave {
            return Err(lacks("an XSAVE area", "KVM_CAP_XSAVE"));
        }
        if self.xcrs.is_some() && !caps.xcrs {
            return Err(lacks("XCRs", "KVM_CAP_XCRS"));
        }
        if self.debug_regs.is_some() && !caps.debugregs {
            return Err(lacks("debug registers", "KVM_CAP_DEBUGREGS"));
        }
        Ok(())
    }

    /// Writes this state into a fresh vCPU on a host offering `caps`: CPUID, TSC rate, sregs,
    /// regs, XSAVE (or FPU), XCRs, LAPIC, MSRs (the PVM VIF MSR last), debug registers, MP
    /// state, events. A piece that was not saved is not written. The order is free on PVM
    /// except for the VIF MSR; the LAPIC must precede the TSC-deadline MSR.
    pub fn restore(&self, fd: &impl VcpuStateFd, caps: &HostCaps) -> Result<(), VcpuStateError> {
        self.check_host(caps)?;
        let index = self.index;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| VcpuStateError::Fam { index, source })?;
        fd.set_cpuid2(&cpuid).map_err(state_err("SET_CPUID2", index))?;
        // The rate is advisory (the guest's clock is kvm-clock, which follows whatever rate is
        // in effect): set it where KVM can, else keep the host's.
        match self.tsc_khz {
            Some(khz) if caps.tsc_control => {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::debug!(error = %e, khz, "KVM_SET_TSC_KHZ refused; keeping the host rate");
                }
            }
            Some(khz) => tracing::debug!(khz, "no KVM_CAP_TSC_CONTROL; keeping the host's TSC rate"),
            None => {}
        }
        fd.set_sregs(&self.sregs).map_err(state_err("SET_SREGS", index))?;
        fd.set_regs(&self.regs).map_err(state_err("SET_REGS", index))?;
        match &self.float {
            FloatState::Xsave(xsave) => fd.set_xsave(xsave).map_err(state_err("SET_XSAVE", index))?,
            FloatState::Fpu(fpu) => fd.set_fpu(&kvm_fpu::from(&**fpu)).map_err(state_err("SET_FPU", index))?,
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(state_err("SET_XCRS", index))?;
        }
        // The LAPIC before the MSRs: setting the LAPIC's timer mode to TSC-deadline clears the
        // deadline, and a deadline written while the fresh LAPIC is in one-shot mode is
        // ignored. Either way the guest's timer would never fire again.
        fd.set_lapic(&self.lapic).map_err(state_err("SET_LAPIC", index))?;
        let (vif, rest): (Vec<_>, Vec<_>) = self.msrs.iter().copied().partition(|m| m.index == MSR_PVM_VIF);
        write_msrs(fd, index, &rest)?;
        write_msrs(fd, index, &vif)?;
        if let Some(debug_regs) = &self.debug_regs {
            fd.set_debug_regs(debug_regs).map_err(state_err("SET_DEBUGREGS", index))?;
        }
        fd.set_mp_state(self.mp_state).map_err(state_err("SET_MP_STATE", index))?;
        fd.set_vcpu_events(&self.events).map_err(state_err("SET_VCPU_EVENTS", index))?;
        Ok(())
    }
}

/// Reads `indices` in batches; an MSR KVM will not read is skipped.
fn read_msrs(fd: &impl VcpuStateFd, index: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut next = 0;
    while next < indices.len() {
        let batch = &indices[next..indices.len().min(next + MSRS_PER_IOCTL)];
        let entries: Vec<_> = batch.iter().map(|&i| kvm_msr_entry { index: i, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuStateError::Fam { index, source })?;
        let read = fd.get_msrs(&mut msrs).map_err(state_err("GET_MSRS", index))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        next += read + usize::from(read < batch.len());
    }
    Ok(out)
}

/// Writes `entries`; an MSR KVM refuses is logged and skipped (it belongs to the saving host's
/// KVM, and the guest can do without it).
fn write_msrs(fd: &impl VcpuStateFd, index: u8, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let mut next = 0;
    while next < entries.len() {
        let batch = &entries[next..entries.len().min(next + MSRS_PER_IOCTL)];
        let msrs = Msrs::from_entries(batch).map_err(|source| VcpuStateError::Fam { index, source })?;
        let written = fd.set_msrs(&msrs).map_err(state_err("SET_MSRS", index))?;
        if written < batch.len() {
            tracing::warn!(
                vcpu = index,
                msr = format_args!("{:#x}", batch[written].index),
                "KVM_SET_MSRS refused a saved MSR; skipping it"
            );
        }
        next += written + usize::from(written < batch.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A vCPU of a host whose CPU lacks XSAVE, as KVM presents it: `KVM_GET_XCRS` reports no
    /// XCRs and `KVM_SET_XCRS` fails with EINVAL; everything else succeeds. It records the
    /// ioctls it was asked for.
    #[derive(Default)]
    struct HostWithoutXsave {
        calls: RefCell<Vec<&'static str>>,
    }

    impl HostWithoutXsave {
        fn ok<T>(&self, ioctl: &'static str, value: T) -> KvmResult<T> {
            self.calls.borrow_mut().push(ioctl);
            Ok(value)
        }
        fn einval<T>(&self, ioctl: &'static str) -> KvmResult<T> {
            self.calls.borrow_mut().push(ioctl);
            Err(kvm_ioctls::Error::new(libc::EINVAL))
        }
        fn called(&self, ioctl: &'static str) -> bool {
            self.calls.borrow().contains(&ioctl)
        }
    }

    /// Implements fake ioctls that record their name and answer `Ok(value)` (`ok`) or EINVAL
    /// (`einval`).
    macro_rules! fake_ioctls {
        ($($name:ident($($ty:ty),*) -> $ret:ty = $how:ident($ioctl:literal $(, $value:expr)?);)*) => {
            $(fn $name(&self, $(_: $ty),*) -> KvmResult<$ret> {
                self.$how($ioctl $(, $value)?)
            })*
        };
    }

    impl VcpuStateFd for HostWithoutXsave {
        fake_ioctls! {
            get_cpuid2(usize) -> CpuId = ok("GET_CPUID2", CpuId::new(1).expect("cpuid"));
            set_cpuid2(&CpuId) -> () = ok("SET_CPUID2", ());
            get_mp_state() -> kvm_mp_state = ok("GET_MP_STATE", kvm_mp_state::default());
            set_mp_state(kvm_mp_state) -> () = ok("SET_MP_STATE", ());
            get_regs() -> kvm_regs = ok("GET_REGS", kvm_regs { rip: 0x10_0000, ..Default::default() });
            set_regs(&kvm_regs) -> () = ok("SET_REGS", ());
            get_sregs() -> kvm_sregs = ok("GET_SREGS", kvm_sregs::default());
            set_sregs(&kvm_sregs) -> () = ok("SET_SREGS", ());
            get_fpu() -> kvm_fpu = ok("GET_FPU", kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() });
            set_fpu(&kvm_fpu) -> () = ok("SET_FPU", ());
            get_xsave() -> kvm_xsave = ok("GET_XSAVE", kvm_xsave::default());
            set_xsave(&kvm_xsave) -> () = ok("SET_XSAVE", ());
            // KVM without XSAVE: "no XCRs", not an error, but setting any fails.
            get_xcrs() -> kvm_xcrs = ok("GET_XCRS", kvm_xcrs::default());
            set_xcrs(&kvm_xcrs) -> () = einval("SET_XCRS");
            get_lapic() -> kvm_lapic_state = ok("GET_LAPIC", kvm_lapic_state::default());
            set_lapic(&kvm_lapic_state) -> () = ok("SET_LAPIC", ());
            get_debug_regs() -> kvm_debugregs = ok("GET_DEBUGREGS", kvm_debugregs::default());
            set_debug_regs(&kvm_debugregs) -> () = ok("SET_DEBUGREGS", ());
            get_tsc_khz() -> u32 = ok("GET_TSC_KHZ", 2_100_000);
            set_tsc_khz(u32) -> () = ok("SET_TSC_KHZ", ());
            get_vcpu_events() -> kvm_vcpu_events = ok("GET_VCPU_EVENTS", kvm_vcpu_events::default());
            set_vcpu_events(&kvm_vcpu_events) -> () = ok("SET_VCPU_EVENTS", ());
        }

        fn get_msrs(&self, msrs: &mut Msrs) -> KvmResult<usize> {
            self.ok("GET_MSRS", msrs.as_slice().len())
        }
        fn set_msrs(&self, msrs: &Msrs) -> KvmResult<usize> {
            self.ok("SET_MSRS", msrs.as_slice().len())
        }
    }

    /// What a host without XSAVE reports: no XSAVE, no XCRs.
    const CAPS_WITHOUT_XSAVE: HostCaps = HostCaps { xsave: false, xcrs: false, ..HostCaps::ALL };

    #[test]
    fn a_host_without_xsave_restores_its_own_snapshot() {
        let host = HostWithoutXsave::default();
        let state = VcpuState::save(&host, 0, &[0x174], &CAPS_WITHOUT_XSAVE).expect("save");
        // Before the fix this failed with "KVM_SET_XCRS on vCPU 0: Invalid argument".
        if let Err(e) = state.restore(&host, &CAPS_WITHOUT_XSAVE) {
            panic!("restore on the same kind of host: {e}: {:?}", std::error::Error::source(&e));
        }
        assert!(state.xcrs.is_none(), "no XCRs saved where the host has none");
        assert!(matches!(state.float, FloatState::Fpu(_)), "the FPU state stands in for XSAVE");
        assert!(!host.called("SET_XCRS") && !host.called("SET_XSAVE"), "calls: {:?}", host.calls.borrow());
        assert!(host.called("SET_FPU"));
    }

    #[test]
    fn a_state_without_xcrs_restores_where_the_host_has_them() {
        let host = HostWithoutXsave::default();
        let mut state = VcpuState::save(&host, 0, &[], &CAPS_WITHOUT_XSAVE).expect("save");
        state.xcrs = None;
        state.restore(&host, &HostCaps::ALL).expect("restore");
        assert!(!host.called("SET_XCRS"), "nothing saved, nothing written");
    }

    #[test]
    fn a_snapshot_with_state_the_host_cannot_take_is_refused_by_name() {
        let host = HostWithoutXsave::default();
        let state = VcpuState::save(&host, 0, &[], &HostCaps::ALL).expect("save with every piece");
        let err = state.restore(&host, &HostCaps { xsave: true, ..CAPS_WITHOUT_XSAVE }).unwrap_err();
        assert!(matches!(err, VcpuStateError::HostLacks { piece: "XCRs", .. }), "{err}");
        assert!(err.to_string().contains("XCRs") && err.to_string().contains("KVM_CAP_XCRS"), "{err}");
        let err = state.restore(&host, &CAPS_WITHOUT_XSAVE).unwrap_err();
        assert!(err.to_string().contains("XSAVE"), "{err}");
        let err = state.restore(&host, &HostCaps { debugregs: false, ..HostCaps::ALL }).unwrap_err();
        assert!(err.to_string().contains("debug registers"), "{err}");
        assert!(!host.called("SET_CPUID2"), "a refused state writes nothing");
    }

    /// A configured vCPU of a fresh VM, or None (printing SKIP) without usable KVM.
    fn real_vcpu() -> Option<(crate::vstate::vm::Vm, crate::vstate::vcpu::Vcpu)> {
        let vm = match crate::vstate::vm::Vm::new() {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIP: no usable KVM: {e}");
                return None;
            }
        };
        vm.setup_irqchip().expect("irqchip");
        let fd = vm.create_vcpu(0).expect("vCPU");
        let cpuid = vm.supported_cpuid().expect("cpuid");
        let vcpu = crate::vstate::vcpu::Vcpu::configure(fd, 0, 1, &cpuid, 0x10_0000, false).expect("configure");
        Some((vm, vcpu))
    }

    #[test]
    fn a_real_vcpu_takes_a_state_without_xcrs_and_one_from_a_host_without_them() {
        let (Some((vm, source)), Some((_vm2, target))) = (real_vcpu(), real_vcpu()) else {
            return;
        };
        let caps = vm.host_caps();
        let indices = saved_msr_indices(vm.kvm()).expect("MSR list");
        let mut state = VcpuState::save(&source.fd, 0, &indices, &caps).expect("save");
        state.xcrs = None;
        state.restore(&target.fd, &caps).expect("a state without XCRs restores");
        let lacking = HostCaps { xcrs: false, ..caps };
        let from_host_without = VcpuState::save(&source.fd, 0, &indices, &lacking).expect("save");
        assert!(from_host_without.xcrs.is_none());
        from_host_without.restore(&target.fd, &lacking).expect("restore where the host lacks XCRs");
        let back = VcpuState::save(&target.fd, 0, &indices, &caps).expect("save again");
        assert_eq!(
            (back.regs.rip, back.sregs.cr0, back.sregs.efer),
            (state.regs.rip, state.sregs.cr0, state.sregs.efer)
        );
    }

    #[test]
    fn fpu_state_round_trips_through_serde() {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, last_ip: 7, xmm: [[3; 16]; 16], ..Default::default() };
        let state = FpuState::from(&fpu);
        let bytes = postcard::to_stdvec(&state).expect("encode");
        let back: FpuState = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, state);
        let again = kvm_fpu::from(&back);
        assert_eq!((again.fcw, again.mxcsr, again.last_ip, again.xmm), (fpu.fcw, fpu.mxcsr, fpu.last_ip, fpu.xmm));
    }
}
