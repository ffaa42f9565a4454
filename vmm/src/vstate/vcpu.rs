//! vCPUs: their boot configuration, the per-vCPU run loop (one OS thread each) and
//! [`VcpuControl`], the shared switch that runs, parks (pause) and stops them. Pausing takes
//! every vCPU out of `KVM_RUN` with `immediate_exit` plus a signal, as KVM documents. The run
//! loop routes exits to the buses and turns guest resets, shutdowns and crashes into
//! [`VmEvent`]s; it never decides policy (restart, cleanup) itself.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::{ResetSource, StopRequest};
use crate::devices::legacy::serial::SerialLog;

/// Errors from configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_SET_CPUID2 on vCPU {index}")]
    SetCpuid {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("setting vCPU {index} registers")]
    Regs {
        index: u8,
        #[source]
        source: regs::RegsError,
    },
    #[error("setting vCPU {index} MSRs")]
    Msrs {
        index: u8,
        #[source]
        source: msr::MsrError,
    },
    #[error("setting vCPU {index} LAPIC LINT0/LINT1")]
    Lapic {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MP_STATE on vCPU {index}")]
    MpState {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("installing the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("spawning the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Something the guest did that ends the VM (or a failure running it). Pushed once per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmEvent {
    /// The guest powered off (ACPI/PSCI-style shutdown system event or `hlt` without irqchip).
    Shutdown,
    /// The guest asked for a reset (Linux `reboot`; with `panic=-1 reboot=k` also a panic that
    /// the serial log did not show).
    Reset { source: ResetSource },
    /// The guest kernel panicked (seen on the serial console, or a crash system event). A
    /// panic that does not reboot is reported as soon as its "end Kernel panic" line is out.
    Panic,
    /// The vCPU hit a triple fault (`KVM_EXIT_SHUTDOWN`).
    TripleFault { vcpu: u8 },
    /// KVM could not run the vCPU.
    Crashed { vcpu: u8, reason: String },
}

/// What the vCPUs are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

/// One vCPU, configured, not yet running.
#[derive(Debug)]
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
}

impl Vcpu {
    /// Configures the vCPU for 64-bit entry at `entry`: CPUID for `index` of `count`, MSRs,
    /// registers and LAPIC. With `start_runnable`, an AP starts at `entry` too instead of
    /// waiting for INIT/SIPI (for payloads that are not Linux).
    pub fn configure(
        fd: VcpuFd,
        index: u8,
        count: u8,
        supported_cpuid: &CpuId,
        entry: u64,
        start_runnable: bool,
    ) -> Result<Self, VcpuError> {
        let mut cpuid: CpuId = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::setup_msrs(&fd).map_err(|source| VcpuError::Msrs { index, source })?;
        regs::setup_regs(&fd, entry).map_err(|source| VcpuError::Regs { index, source })?;
        regs::setup_sregs(&fd).map_err(|source| VcpuError::Regs { index, source })?;
        regs::setup_fpu(&fd).map_err(|source| VcpuError::Regs { index, source })?;
        interrupts::set_lint(&fd).map_err(|source| VcpuError::Lapic { index, source })?;
        if start_runnable && index != 0 {
            fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })
                .map_err(|source| VcpuError::MpState { index, source })?;
        }
        Ok(Self { fd, index })
    }
}

/// How a parked vCPU can be pulled out of `KVM_RUN`: its `immediate_exit` byte and thread.
#[derive(Debug, Default)]
struct Kicker {
    /// Points into the vCPU's `kvm_run` mapping; null once the vCPU thread is gone.
    immediate_exit: Mutex<usize>,
    thread: Mutex<Option<libc::pthread_t>>,
}

#[derive(Debug)]
struct ControlState {
    want: RunState,
    /// vCPU threads currently parked in the pause gate.
    parked: usize,
    /// vCPU threads still alive.
    live: usize,
}

/// The switch shared by the VM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    kickers: Vec<Kicker>,
    events: Mutex<Sender<VmEvent>>,
    exit_reported: AtomicBool,
    stop_request: Arc<StopRequest>,
    serial: Arc<SerialLog>,
    /// Work a parked vCPU thread runs on its own vCPU (snapshot save), one slot per vCPU.
    jobs: Mutex<Vec<Option<VcpuJob>>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl").field("state", &*self.lock()).finish_non_exhaustive()
    }
}

/// Work handed to a parked vCPU thread; it runs on that thread with the vCPU in hand.
pub type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static KICK_HANDLER: Once = Once::new();

fn install_kick_handler() -> Result<(), VcpuError> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

/// Writes the `immediate_exit` byte at `addr` (0 = none).
fn write_immediate_exit(addr: usize, value: u8) {
    if addr != 0 {
        // SAFETY: `addr` points at the `immediate_exit` byte of a live `kvm_run` mapping; the
        // owner clears it (under the same lock the callers hold) before unmapping. The byte is
        // shared with the kernel and another thread, so it is accessed atomically.
        let byte = unsafe { &*(addr as *const AtomicU8) };
        byte.store(value, Ordering::SeqCst);
    }
}

impl VcpuControl {
    /// A control for `count` vCPUs that reports to `events`.
    pub fn new(count: usize, events: Sender<VmEvent>, stop_request: Arc<StopRequest>, serial: Arc<SerialLog>) -> Self {
        Self {
            state: Mutex::new(ControlState { want: RunState::Running, parked: 0, live: 0 }),
            changed: Condvar::new(),
            kickers: (0..count).map(|_| Kicker::default()).collect(),
            events: Mutex::new(events),
            exit_reported: AtomicBool::new(false),
            stop_request,
            serial,
            jobs: Mutex::new((0..count).map(|_| None).collect()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the vCPUs are told to do now.
    pub fn state(&self) -> RunState {
        self.lock().want
    }

    /// Tells every vCPU to move to `want` and kicks them out of `KVM_RUN`.
    fn set(&self, want: RunState) {
        {
            let mut s = self.lock();
            if s.want == RunState::Stopped {
                return;
            }
            s.want = want;
        }
        self.changed.notify_all();
        if want != RunState::Running {
            self.kick_all();
        }
    }

    fn kick_all(&self) {
        for kicker in &self.kickers {
            let addr = kicker.immediate_exit.lock().unwrap_or_else(|p| p.into_inner());
            write_immediate_exit(*addr, 1);
            if let Some(thread) = *kicker.thread.lock().unwrap_or_else(|p| p.into_inner()) {
                if *addr != 0 {
                    // SAFETY: `thread` is alive while `addr` is non-zero (cleared on exit,
                    // under the lock we hold), so the signal reaches a live thread.
                    unsafe { libc::pthread_kill(thread, kick_signal()) };
                }
            }
        }
    }

    /// Parks every vCPU; returns once all live ones are parked, or false after `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.set(RunState::Paused);
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.want == RunState::Paused && s.parked < s.live {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // A kick can land just before a vCPU re-enters KVM_RUN; immediate_exit covers
            // that, but kick again on each wake-up to be safe against lost signals.
            s = self
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if s.parked < s.live {
                drop(s);
                self.kick_all();
                s = self.lock();
            }
        }
        true
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.set(RunState::Running);
    }

    /// Tells every vCPU to exit its thread.
    pub fn stop(&self) {
        self.set(RunState::Stopped);
    }

    /// Reports `event` (first one only) and stops every vCPU.
    fn finish(&self, event: VmEvent) {
        // Stop first, so that whoever receives the event sees the VM stopped.
        self.stop();
        if !self.exit_reported.swap(true, Ordering::SeqCst) {
            let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
            // The receiver may be gone (VM dropped); nothing to report to then.
            let _ = tx.send(event);
        }
    }

    /// How many vCPUs this control drives.
    pub fn vcpu_count(&self) -> u8 {
        self.kickers.len() as u8
    }

    /// Hands `job` to parked vCPU `index`; it runs on that vCPU's thread while it stays parked.
    /// Returns false (and drops the job) when no such vCPU slot exists.
    pub fn run_on_parked(&self, index: u8, job: VcpuJob) -> bool {
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            match jobs.get_mut(usize::from(index)) {
                Some(slot) => *slot = Some(job),
                None => return false,
            }
        }
        // Take the state lock so a vCPU between its job check and its wait sees the notify.
        drop(self.lock());
        self.changed.notify_all();
        true
    }

    fn take_job(&self, index: u8) -> Option<VcpuJob> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get_mut(usize::from(index)).and_then(Option::take)
    }

    /// Blocks while paused (running any job handed to this vCPU); returns false when the vCPU
    /// must exit.
    fn gate(&self, vcpu: &mut Vcpu) -> bool {
        let mut s = self.lock();
        if s.want == RunState::Paused {
            s.parked += 1;
            self.changed.notify_all();
            while s.want == RunState::Paused {
                if let Some(job) = self.take_job(vcpu.index) {
                    drop(s);
                    job(vcpu);
                    s = self.lock();
                    continue;
                }
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        s.want != RunState::Stopped
    }
}

/// Runs `vcpu` on a new thread until the VM stops.
pub fn spawn_vcpu(
    vcpu: Vcpu,
    control: Arc<VcpuControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
) -> Result<std::thread::JoinHandle<()>, VcpuError> {
    install_kick_handler()?;
    let index = vcpu.index;
    control.lock().live += 1;
    let thread_control = control.clone();
    let spawned = std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
        let control = thread_control;
        let mut vcpu = vcpu;
        let kicker = &control.kickers[usize::from(index)];
        // SAFETY: pthread_self has no preconditions.
        *kicker.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { libc::pthread_self() });
        let addr = std::ptr::addr_of_mut!(vcpu.fd.get_kvm_run().immediate_exit) as usize;
        *kicker.immediate_exit.lock().unwrap_or_else(|p| p.into_inner()) = addr;
        run_loop(&mut vcpu, &control, &pio, &mmio, addr);
        *kicker.immediate_exit.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        let mut s = control.lock();
        s.live -= 1;
        drop(s);
        control.changed.notify_all();
    });
    spawned.map_err(|source| {
        control.lock().live -= 1;
        VcpuError::Spawn { index, source }
    })
}

/// What one exit means for the loop.
enum Step {
    Continue,
    Exit(VmEvent),
}

fn run_loop(vcpu: &mut Vcpu, control: &VcpuControl, pio: &Bus, mmio: &Bus, immediate_exit: usize) {
    let index = vcpu.index;
    while control.gate(vcpu) {
        let step = match vcpu.fd.run() {
            Ok(exit) => handle_exit(exit, index, control, pio, mmio),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the request before looking at the state again (see gate()).
                write_immediate_exit(immediate_exit, 0);
                Step::Continue
            }
            Err(e) => Step::Exit(VmEvent::Crashed { vcpu: index, reason: format!("KVM_RUN: {e}") }),
        };
        if let Step::Exit(event) = step {
            control.finish(event);
            break;
        }
    }
}

fn handle_exit(exit: VcpuExit<'_>, index: u8, control: &VcpuControl, pio: &Bus, mmio: &Bus) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            if let Some(source) = control.stop_request.take() {
                return Step::Exit(reset_event(control, source));
            }
            // A panic that did not reboot (too early for `panic=`, or `panic=0`) leaves the
            // guest spinning forever once it printed its end line: stop it now.
            if control.serial.panic_ended() {
                return Step::Exit(VmEvent::Panic);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
        }
        VcpuExit::Hlt => return Step::Exit(VmEvent::Shutdown),
        VcpuExit::Shutdown => return Step::Exit(VmEvent::TripleFault { vcpu: index }),
        VcpuExit::SystemEvent(kind, _) => {
            return Step::Exit(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => reset_event(control, ResetSource::ResetControl),
                KVM_SYSTEM_EVENT_CRASH => VmEvent::Panic,
                other => VmEvent::Crashed { vcpu: index, reason: format!("system event {other}") },
            });
        }
        VcpuExit::Intr => {}
        VcpuExit::FailEntry(reason, cpu) => {
            return Step::Exit(VmEvent::Crashed {
                vcpu: index,
                reason: format!("KVM_EXIT_FAIL_ENTRY reason {reason:#x} on host cpu {cpu}"),
            });
        }
        VcpuExit::InternalError => {
            return Step::Exit(VmEvent::Crashed {
                vcpu: index,
                reason: "KVM_EXIT_INTERNAL_ERROR (KVM could not emulate an instruction)".into(),
            });
        }
        other => {
            return Step::Exit(VmEvent::Crashed { vcpu: index, reason: format!("unexpected exit {other:?}") });
        }
    }
    Step::Continue
}

/// A reset is a panic if the console showed one (`panic=-1` turns a panic into a reset).
fn reset_event(control: &VcpuControl, source: ResetSource) -> VmEvent {
    if control.serial.panic_seen() {
        VmEvent::Panic
    } else {
        VmEvent::Reset { source }
    }
}

/// Completes an I/O exit the vCPU left pending: KVM finishes it on the next `KVM_RUN`, which
/// `immediate_exit` turns back before guest code runs. Harmless when nothing is pending.
pub fn complete_pending_io(vcpu: &mut Vcpu) {
    vcpu.fd.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; an exit here would be a KVM quirk we cannot act on.
    let _ = vcpu.fd.run();
    vcpu.fd.set_kvm_immediate_exit(0);
}
