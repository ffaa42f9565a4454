//! A built VM and its lifecycle: start (one thread per vCPU), pause, resume, stop, and the
//! [`VmEvent`] stream. It owns every resource of the VM and frees them on drop; it never
//! decides what to do when the guest exits.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::devices::bus::Bus;
use crate::devices::legacy::serial::SerialLog;
use crate::vstate::memory::{GuestMemoryBacking, GuestMemoryMmap};
use crate::vstate::vcpu::{spawn_vcpu, RunState, Vcpu, VcpuControl, VcpuError, VmEvent};
use crate::vstate::vm::Vm;

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
    /// Keeps device-side work (virtio event thread) alive; dropped after the vCPUs stop.
    device_runtime: Vec<Box<dyn std::any::Any + Send>>,
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
    pub control: Arc<VcpuControl>,
    pub events: Receiver<VmEvent>,
    pub serial: Arc<SerialLog>,
    pub device_runtime: Vec<Box<dyn std::any::Any + Send>>,
}

impl MicroVm {
    /// Assembles a built, not yet started VM.
    pub fn from_parts(parts: MicroVmParts) -> Self {
        Self {
            control: parts.control,
            threads: Vec::new(),
            pending: parts.vcpus,
            pio: Arc::new(parts.pio),
            mmio: Arc::new(parts.mmio),
            events: Some(parts.events),
            serial: parts.serial,
            device_runtime: parts.device_runtime,
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
            let handle = spawn_vcpu(
                vcpu,
                self.control.clone(),
                self.pio.clone(),
                self.mmio.clone(),
            )
            .map_err(MicroVmError::Vcpu)?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Takes every vCPU out of the guest and parks it (state stays in memory).
    pub fn pause(&self) -> Result<(), MicroVmError> {
        self.require_started()?;
        match self.state() {
            RunState::Running | RunState::Paused => {}
            other => return Err(MicroVmError::NotRunning(other)),
        }
        let parked = self.control.pause(PAUSE_TIMEOUT);
        match self.state() {
            // The guest ended (or someone stopped it) while we waited.
            RunState::Stopped => Err(MicroVmError::NotRunning(RunState::Stopped)),
            _ if parked => Ok(()),
            _ => Err(MicroVmError::PauseTimeout),
        }
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), MicroVmError> {
        self.require_started()?;
        match self.state() {
            RunState::Running | RunState::Paused => {
                self.control.resume();
                Ok(())
            }
            other => Err(MicroVmError::NotRunning(other)),
        }
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

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop();
        self.device_runtime.clear();
    }
}
