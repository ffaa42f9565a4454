//! A built VM and its lifecycle: start (one thread per vCPU), pause (vCPUs and the
//! device-event thread), resume, stop, the [`VmEvent`] stream, saving its KVM and device state
//! ([`MachineState`]) and tracking which pages change (for incremental snapshots). It owns
//! every resource of the VM and frees them on drop; it never decides what to do when the guest
//! exits, and never writes files (see `snapshot`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::StopRequest;
use crate::devices::legacy::serial::SerialLog;
use crate::devices::legacy::{LegacyDevices, LegacyDevicesState};
use crate::virtio_wiring::{VirtioDeviceState, VirtioDevices};
use crate::vstate::memory::{take_device_dirty, BackingKind, GuestMemoryBacking, GuestMemoryMmap};
use crate::vstate::vcpu::{complete_pending_io, spawn_vcpu, RunState, Vcpu, VcpuControl, VcpuError, VmEvent};
use crate::vstate::vcpu_state::{saved_msr_indices, VcpuState, VcpuStateError};
use crate::vstate::vm::{Vm, VmError, VmState};

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("the VM is not running (it is {0:?})")]
    NotRunning(RunState),
    #[error("the VM has not been started")]
    NotStarted,
    #[error("vCPUs did not all park within {PAUSE_TIMEOUT:?}")]
    PauseTimeout,
    #[error("starting vCPUs")]
    Vcpu(#[source] VcpuError),
    #[error("the VM must be paused (or not yet started) to save it; it is {0:?} (a pause that timed out resumes the VM: pause it again)")]
    NotPaused(RunState),
    #[error("the device-event thread did not park within {PAUSE_TIMEOUT:?}")]
    DevicePauseTimeout,
    #[error("saving vCPU state")]
    VcpuState(#[source] VcpuStateError),
    #[error("parked vCPU threads did not hand back their state within {PAUSE_TIMEOUT:?}")]
    SaveTimeout,
    #[error("saving VM state")]
    VmState(#[source] VmError),
    #[error("starting a new undo epoch on the disks")]
    UndoLog(#[source] crate::devices::virtio::block::undo::UndoError),
}

/// Everything of a paused VM except its memory, as plain serde facts.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// The UART, the i8042 and the reset-control register.
    pub legacy: LegacyDevicesState,
    pub virtio: Vec<VirtioDeviceState>,
}

/// A VM: KVM state, guest memory, devices and vCPU threads.
pub struct MicroVm {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    pending: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Option<Receiver<VmEvent>>,
    serial: Arc<SerialLog>,
    legacy: LegacyDevices,
    /// The virtio transports and their device-event thread; dropped after the vCPUs stop.
    virtio: VirtioDevices,
    config: VmConfig,
    dirty_logging: bool,
    /// Set only by a [`MicroVm::pause`] that parked every vCPU and the device-event thread;
    /// cleared by resume and by a pause that failed. Saving requires it.
    quiesced: AtomicBool,
    /// Restored guests: every page the dirty logs reported since the restore (bitmaps per region).
    written_since_restore: Vec<Vec<u64>>,
    // Declared last: dropped after everything that uses them, VM before memory.
    vm: Vm,
    memory: GuestMemoryBacking,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("state", &self.state())
            .field("vcpus", &(self.threads.len() + self.pending.len()))
            .finish_non_exhaustive()
    }
}

/// The parts [`crate::builder`] assembles into a [`MicroVm`].
pub struct MicroVmParts {
    pub vm: Vm,
    pub memory: GuestMemoryBacking,
    pub vcpus: Vec<Vcpu>,
    pub pio: Bus,
    pub mmio: Bus,
    /// Where the i8042 reset line asks the vCPUs to stop.
    pub stop_request: Arc<StopRequest>,
    pub serial: Arc<SerialLog>,
    /// The port-I/O devices (on `pio`), kept for saving.
    pub legacy: LegacyDevices,
    pub virtio: VirtioDevices,
    /// What the VM was built from (as restored, with overrides applied).
    pub config: VmConfig,
}

impl MicroVm {
    /// Assembles a built (or restored), not yet started VM: the one place that wires the
    /// vCPU control to the event stream, for boot and restore alike.
    pub fn from_parts(parts: MicroVmParts) -> Self {
        let (events_tx, events) = channel();
        let control =
            Arc::new(VcpuControl::new(parts.vcpus.len(), events_tx, parts.stop_request, parts.serial.clone()));
        Self {
            control,
            threads: Vec::new(),
            pending: parts.vcpus,
            pio: Arc::new(parts.pio),
            mmio: Arc::new(parts.mmio),
            events: Some(events),
            serial: parts.serial,
            legacy: parts.legacy,
            virtio: parts.virtio,
            config: parts.config,
            dirty_logging: false,
            quiesced: AtomicBool::new(false),
            written_since_restore: Vec::new(),
            vm: parts.vm,
            memory: parts.memory,
        }
    }

    /// Starts every vCPU on its own thread.
    pub fn start(&mut self) -> Result<(), MicroVmError> {
        if self.pending.is_empty() {
            return Err(MicroVmError::AlreadyStarted);
        }
        for vcpu in self.pending.drain(..) {
            let handle = spawn_vcpu(vcpu, self.control.clone(), self.pio.clone(), self.mmio.clone())
                .map_err(MicroVmError::Vcpu)?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Takes every vCPU out of the guest and parks it, then parks the device-event thread:
    /// once this returns, nothing writes guest memory (state stays in memory). If either does
    /// not park within [`PAUSE_TIMEOUT`], whatever was paused is resumed and the VM is not
    /// saveable.
    pub fn pause(&self) -> Result<(), MicroVmError> {
        self.pause_within(PAUSE_TIMEOUT)
    }

    /// [`MicroVm::pause`] with its own limit on how long the vCPUs and the device-event thread
    /// may each take to park.
    pub fn pause_within(&self, timeout: Duration) -> Result<(), MicroVmError> {
        self.require_started()?;
        match self.state() {
            RunState::Running | RunState::Paused => {}
            other => return Err(MicroVmError::NotRunning(other)),
        }
        self.quiesced.store(false, Ordering::SeqCst);
        let parked = self.control.pause(timeout);
        let result = match self.state() {
            // The guest ended (or someone stopped it) while we waited.
            RunState::Stopped => return Err(MicroVmError::NotRunning(RunState::Stopped)),
            _ if !parked => Err(MicroVmError::PauseTimeout),
            _ if !self.virtio.pause(timeout) => Err(MicroVmError::DevicePauseTimeout),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.quiesced.store(true, Ordering::SeqCst),
            Err(ref e) => {
                // Half paused is neither running nor quiet: let everything run again.
                tracing::warn!(error = %e, "pause failed; resuming the VM");
                self.virtio.resume();
                self.control.resume();
            }
        }
        result
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), MicroVmError> {
        self.require_started()?;
        match self.state() {
            RunState::Running | RunState::Paused => {
                self.quiesced.store(false, Ordering::SeqCst);
                self.virtio.resume();
                self.control.resume();
                Ok(())
            }
            other => Err(MicroVmError::NotRunning(other)),
        }
    }

    /// Whether the VM is quiet enough to save: built and never started, or paused by a
    /// [`MicroVm::pause`] that parked every vCPU and the device-event thread.
    pub fn is_saveable(&self) -> bool {
        if self.threads.is_empty() {
            !self.pending.is_empty()
        } else {
            self.state() == RunState::Paused && self.quiesced.load(Ordering::SeqCst)
        }
    }

    /// Saves every vCPU, the VM-wide KVM state and the devices of a paused (or never started)
    /// VM. Pending I/O exits are completed first, so the saved registers are consistent.
    pub fn save_state(&mut self) -> Result<MachineState, MicroVmError> {
        if !self.is_saveable() {
            return Err(MicroVmError::NotPaused(self.state()));
        }
        let msr_indices = Arc::new(saved_msr_indices(self.vm.kvm()).map_err(MicroVmError::VcpuState)?);
        let caps = self.vm.host_caps();
        let mut vcpus = Vec::new();
        if self.threads.is_empty() {
            for vcpu in &self.pending {
                vcpus
                    .push(VcpuState::save(&vcpu.fd, vcpu.index, &msr_indices, &caps).map_err(MicroVmError::VcpuState)?);
            }
        } else {
            let count = self.control.vcpu_count();
            let (tx, rx) = channel();
            for index in 0..count {
                let tx = tx.clone();
                let msr_indices = msr_indices.clone();
                let job = Box::new(move |vcpu: &mut Vcpu| {
                    complete_pending_io(vcpu);
                    let _ = tx.send((vcpu.index, VcpuState::save(&vcpu.fd, vcpu.index, &msr_indices, &caps)));
                });
                self.control.run_on_parked(index, job);
            }
            drop(tx);
            let mut got: Vec<Option<VcpuState>> = (0..count).map(|_| None).collect();
            for _ in 0..count {
                let (index, state) = rx.recv_timeout(PAUSE_TIMEOUT).map_err(|_| MicroVmError::SaveTimeout)?;
                let state = state.map_err(MicroVmError::VcpuState)?;
                if let Some(slot) = got.get_mut(usize::from(index)) {
                    *slot = Some(state);
                }
            }
            for (index, state) in got.into_iter().enumerate() {
                vcpus.push(state.ok_or(MicroVmError::VcpuState(VcpuStateError::ThreadGone { index: index as u8 }))?);
            }
        }
        let vm = self.vm.save_state().map_err(MicroVmError::VmState)?;
        Ok(MachineState { vcpus, vm, legacy: self.legacy.save(), virtio: self.virtio.save() })
    }

    /// Starts a new undo epoch tagged `tag` on every disk that keeps an undo log: the disks are
    /// now at the state of that moment (a boot, a restore, a snapshot just written). Only while
    /// the VM is saveable (never started, or paused with its devices parked), so no write races
    /// it.
    pub fn begin_disk_epoch(&self, tag: &str) -> Result<(), MicroVmError> {
        if !self.is_saveable() {
            return Err(MicroVmError::NotPaused(self.state()));
        }
        self.virtio.begin_undo_epochs(tag).map_err(MicroVmError::UndoLog)
    }

    /// Starts (or restarts) tracking which pages change: KVM dirty logging on every slot for
    /// guest writes, the memory bitmaps for device writes. Both logs start empty.
    pub fn reset_dirty_tracking(&mut self) -> Result<(), VmError> {
        if !self.dirty_logging {
            self.vm.set_dirty_logging(&self.memory.memory, true)?;
            self.dirty_logging = true;
        }
        // Through take_dirty_pages, so a restored guest's record of written pages stays whole.
        self.take_dirty_pages()?;
        Ok(())
    }

    /// Records that the memory slots were registered with dirty logging on (a restore), without
    /// clearing what devices already wrote (restoring them may have written guest memory).
    pub fn assume_dirty_tracking(&mut self) {
        self.dirty_logging = true;
    }

    /// Whether dirty tracking is on.
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_logging
    }

    /// The pages written since tracking last started or was taken (guest and device writes),
    /// one bitmap per region; clears both logs.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut pages = self.vm.take_dirty_log(&self.memory.memory)?;
        or_bitmaps(&mut pages, &take_device_dirty(&self.memory.memory));
        if self.memory.kind == BackingKind::PrivateSnapshot {
            if self.written_since_restore.is_empty() {
                self.written_since_restore = pages.iter().map(|r| vec![0; r.len()]).collect();
            }
            or_bitmaps(&mut self.written_since_restore, &pages);
        }
        Ok(pages)
    }

    /// For a restored guest: every page the dirty logs reported since the restore (bitmaps per
    /// region; empty before the first report).
    pub fn logged_since_restore(&self) -> &[Vec<u64>] {
        &self.written_since_restore
    }

    /// For a restored guest: every page that may differ from zero, as bitmaps per region. That
    /// is the pages the guest or devices wrote since the restore, plus the data of the snapshot
    /// files mapped under it (`base_pages`: the base file's data extents and layer runs, which
    /// the caller derives from [`MicroVm::restored_backing`]). Consumes the dirty log.
    pub fn restored_nonzero_candidates(&mut self, base_pages: &[Vec<u64>]) -> Result<Vec<Vec<u64>>, VmError> {
        self.take_dirty_pages()?;
        let mut pages = self.written_since_restore.clone();
        if pages.is_empty() {
            pages = base_pages.iter().map(|r| vec![0; r.len()]).collect();
        }
        or_bitmaps(&mut pages, base_pages);
        Ok(pages)
    }

    /// For a restored guest: the snapshot's base memory file and the layer runs mapped over it.
    pub fn restored_backing(&self) -> Option<(&std::fs::File, &[crate::vstate::memory::PageRun])> {
        (self.memory.kind == BackingKind::PrivateSnapshot)
            .then_some((&self.memory.file, self.memory.layer_runs.as_slice()))
    }

    /// The memfd behind a booted guest's memory (for hole-skipping dumps); None once restored.
    pub fn memory_backing_file(&self) -> Option<&std::fs::File> {
        (self.memory.kind == BackingKind::SharedMemfd).then_some(&self.memory.file)
    }

    /// What the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// How guest memory is backed.
    pub fn memory_kind(&self) -> BackingKind {
        self.memory.kind
    }

    /// Stops every vCPU and waits for their threads. Idempotent.
    pub fn stop(&mut self) {
        self.control.stop();
        for handle in self.threads.drain(..) {
            // A vCPU thread that panicked has nothing left to clean.
            let _ = handle.join();
        }
    }

    fn require_started(&self) -> Result<(), MicroVmError> {
        if self.threads.is_empty() {
            Err(MicroVmError::NotStarted)
        } else {
            Ok(())
        }
    }

    /// What the vCPUs are doing.
    pub fn state(&self) -> RunState {
        self.control.state()
    }

    /// Takes the stream of guest exit events (one event per VM) to consume it elsewhere;
    /// afterwards [`MicroVm::wait_event`] returns `None`.
    pub fn take_events(&mut self) -> Option<Receiver<VmEvent>> {
        self.events.take()
    }

    /// Waits up to `timeout` for the guest's exit event.
    pub fn wait_event(&self, timeout: Duration) -> Option<VmEvent> {
        self.events.as_ref()?.recv_timeout(timeout).ok()
    }

    /// The serial console log.
    pub fn serial(&self) -> &Arc<SerialLog> {
        &self.serial
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory.memory
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }
}

/// `into |= from`, word by word (bitmaps per region).
fn or_bitmaps(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop();
        self.virtio = VirtioDevices::default();
    }
}
