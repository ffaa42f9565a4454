//! One sandbox's VM: where it resides (a live worker process, or a snapshot on disk), its agent
//! connection, and the `Machine` operations the manager calls.
//!
//! ```text
//!   Live { worker, client, ... } ──pause──▶ OnDisk { generation } ──resume──▶ Live
//!        │   └────roll back (the VM was lost)───────▲   │
//!        └──────────────kill─────────────▶ Killed ◀──────────kill──────┘
//! ```
//! A live VM that ended (guest panic, worker crash) stays `Live` with its [`Death`] recorded
//! until it is rolled back to its newest snapshot (or killed). Restoring a new worker replaces
//! the residence whole, so a worker, its events, its death and its agent client always belong
//! together. Workers outlive the daemon ([`WorkerHandle::restore_outliving`]): a new daemon
//! attaches to them on their control socket.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_agent::client::AgentClient;
use capsule_vmm::snapshot::linked_copy::link_chain;
use capsule_vmm::snapshot::RestoreOverrides;
use capsule_vmm::worker::{error_chain, WorkerEvent, WorkerHandle};
use capsule_vmm::VmEvent;

use super::chain::Chain;
use super::disk_back::disk_back_to;
use super::guest_link::{
    connect_agent, serial_tail, sync_restored_guest, LinkError, AGENT_RESTORED_TIMEOUT, SERIAL_TAIL_LINES,
};
use super::layout::SandboxFiles;
use super::{fork, worker_err, KvmError, SavedState};
use crate::engine::trash::Trash;
use crate::engine::{EngineError, Machine, MachineSpec, RollBack, SavedTemplate};

/// How a live VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Death {
    /// The guest did something that ended it (panic, triple fault, reset, shutdown).
    Guest {
        /// What it did.
        event: VmEvent,
        /// The end of its serial console.
        serial_tail: String,
    },
    /// The worker process died.
    Worker {
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Guest { event, serial_tail } => {
                write!(f, "the guest ended ({event:?}); serial console tail:\n{serial_tail}")
            }
            Death::Worker { pid, status } => write!(f, "the VM worker {pid} died ({status})"),
        }
    }
}

/// A worker running (or holding, paused in memory) the VM.
struct Live {
    worker: WorkerHandle,
    events: Option<Receiver<WorkerEvent>>,
    /// How the VM ended, once it has.
    death: Option<Death>,
    client: Option<AgentClient>,
    /// The guest came from a snapshot and has not yet been told the time and fresh entropy.
    needs_sync: bool,
}

impl Live {
    fn new(worker: WorkerHandle, needs_sync: bool) -> Self {
        let events = worker.take_events();
        Self { worker, events, death: None, client: None, needs_sync }
    }

    /// Records an end of the VM reported by its worker.
    fn poll_events(&mut self, serial_log: &Path) {
        let Some(events) = &self.events else { return };
        loop {
            match events.try_recv() {
                Ok(WorkerEvent::Vm(event)) => {
                    self.death = Some(Death::Guest { event, serial_tail: serial_tail(serial_log, SERIAL_TAIL_LINES) });
                }
                Ok(WorkerEvent::Died { pid, status }) => {
                    self.death.get_or_insert(Death::Worker { pid, status });
                }
                Ok(WorkerEvent::Exited { .. }) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }

    fn drop_client(&mut self) {
        if let Some(client) = self.client.take() {
            client.close();
        }
    }

    /// Stops the worker (its RAM is freed).
    fn stop(mut self) {
        self.drop_client();
        let _ = self.worker.stop();
    }
}

/// Where the VM is.
enum Residence {
    /// A worker holds it.
    Live(Live),
    /// Paused to disk: no worker; snapshot `generation` holds it.
    OnDisk { generation: u64 },
    /// Killed: its files are gone.
    Killed,
}

/// One sandbox's VM.
pub(super) struct KvmMachine {
    pub(super) worker_exe: PathBuf,
    pub(super) trash: Arc<Trash>,
    pub(super) files: SandboxFiles,
    /// The read-only root filesystem it was booted with (restores keep using it).
    pub(super) rootfs: PathBuf,
    residence: Residence,
    pub(super) chain: Chain,
}

impl std::fmt::Debug for KvmMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let residence = match &self.residence {
            Residence::Live(live) => format!("live (worker {})", live.worker.pid()),
            Residence::OnDisk { generation } => format!("on disk (snapshot {generation})"),
            Residence::Killed => "killed".to_string(),
        };
        f.debug_struct("KvmMachine").field("dir", &self.files.dir()).field("residence", &residence).finish()
    }
}

impl KvmMachine {
    /// A machine booted by `worker` (built, not started): starts it.
    pub(super) fn booted(
        worker_exe: PathBuf,
        trash: Arc<Trash>,
        files: SandboxFiles,
        rootfs: PathBuf,
        worker: WorkerHandle,
    ) -> Result<Self, KvmError> {
        let mut machine = Self {
            worker_exe,
            trash,
            files,
            rootfs,
            residence: Residence::Live(Live::new(worker, false)),
            chain: Chain::default(),
        };
        machine.live()?.worker.start().map_err(worker_err("start the VM"))?;
        Ok(machine)
    }

    /// A new machine (no snapshots of its own yet) restored from `source`, a snapshot it does
    /// not own, through a linked copy of its chain in this sandbox's directory: no guest RAM is
    /// copied, the source may be deleted later, and the first pause is a layer over the copy.
    /// Where no copy can be made (another filesystem, a link limit) it restores `source`
    /// itself, and its first pause is full. It is connected to its agent before it is returned.
    pub(super) fn restored_from(
        worker_exe: PathBuf,
        trash: Arc<Trash>,
        files: SandboxFiles,
        rootfs: PathBuf,
        source: &Path,
    ) -> Result<Self, KvmError> {
        let (dir, layers) = match link_chain(source, &files.origin()) {
            Ok(copy) => (copy.dir, Some(copy.depth)),
            Err(e) => {
                tracing::warn!(
                    source = %source.display(),
                    error = %error_chain(&e),
                    "cannot link the snapshot chain into the sandbox; its first pause will be full"
                );
                (source.to_path_buf(), None)
            }
        };
        let mut machine =
            Self { worker_exe, trash, files, rootfs, residence: Residence::Killed, chain: Chain::at(0, layers) };
        machine.restore(&dir)?;
        machine.connect_within(AGENT_RESTORED_TIMEOUT)?;
        Ok(machine)
    }

    /// A machine found again after a server restart, paused to disk in snapshot `generation`.
    pub(super) fn on_disk(
        worker_exe: PathBuf,
        trash: Arc<Trash>,
        files: SandboxFiles,
        rootfs: PathBuf,
        chain: Chain,
    ) -> Self {
        let residence = Residence::OnDisk { generation: chain.generation };
        Self { worker_exe, trash, files, rootfs, residence, chain }
    }

    /// A machine whose worker (running it since before a server restart) it attached to. Its
    /// chain is what is on disk now: forks may have written snapshots the registry never heard
    /// of, so the newest one on disk is the one its next pause follows (a full one: the
    /// worker's dirty tracking may start from any of them).
    pub(super) fn attached(
        worker_exe: PathBuf,
        trash: Arc<Trash>,
        files: SandboxFiles,
        rootfs: PathBuf,
        worker: WorkerHandle,
    ) -> Self {
        let generation = files.newest_snapshot().map_or(0, |(generation, _)| generation);
        let residence = Residence::Live(Live::new(worker, false));
        Self { worker_exe, trash, files, rootfs, residence, chain: Chain::at(generation, None) }
    }

    /// Rolls the machine back to its newest snapshot, paused there (its worker, if any, is
    /// stopped). The VM was lost as `why` says.
    pub(super) fn roll_back_to_newest(&mut self, why: &str) -> Result<RollBack, KvmError> {
        self.stop_worker();
        let Some((generation, written)) = self.files.newest_snapshot() else {
            return Err(KvmError::NoSnapshot(self.files.dir().to_path_buf()));
        };
        let disk = disk_back_to(&self.files, generation)?;
        let _ = std::fs::remove_file(self.files.control().ended);
        self.chain = Chain::at(generation, None);
        self.residence = Residence::OnDisk { generation };
        let snapshot_unix_ms =
            written.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
        tracing::warn!(dir = %self.files.dir().display(), generation, why, ?disk, "rolled back to the newest snapshot");
        Ok(RollBack { why: why.to_string(), snapshot_unix_ms })
    }

    /// The live worker's state, with its events read; an error when the VM ended or is not live.
    fn live(&mut self) -> Result<&mut Live, KvmError> {
        match &mut self.residence {
            Residence::Live(live) => {
                live.poll_events(&self.files.serial_log());
                match &live.death {
                    Some(death) => Err(KvmError::Gone(death.clone())),
                    None => Ok(live),
                }
            }
            Residence::OnDisk { .. } => Err(KvmError::OnDisk),
            Residence::Killed => Err(KvmError::Killed),
        }
    }

    /// The live worker.
    pub(super) fn worker(&mut self) -> Result<&WorkerHandle, KvmError> {
        Ok(&self.live()?.worker)
    }

    /// The agent client of a live machine, if one is connected.
    pub(super) fn live_client(&self) -> Option<AgentClient> {
        match &self.residence {
            Residence::Live(live) => live.client.clone(),
            _ => None,
        }
    }

    /// Snapshot generation the machine is paused to disk in, if it is.
    pub(super) fn disk_generation(&self) -> Option<u64> {
        match self.residence {
            Residence::OnDisk { generation } => Some(generation),
            _ => None,
        }
    }

    /// Restores the snapshot at `dir` into a new worker and starts it; the old residence is
    /// replaced.
    fn restore(&mut self, dir: &Path) -> Result<(), KvmError> {
        let overrides = RestoreOverrides {
            vsock_uds: Some(self.files.vsock_uds()),
            net_socket: Some(self.files.net_socket()),
            serial_log: Some(self.files.serial_log()),
            disks: vec![self.rootfs.clone(), self.files.writable_disk()],
            undo_logs: Some(true),
        };
        let worker = WorkerHandle::restore_outliving(&self.worker_exe, dir, overrides, &self.files.control())
            .map_err(worker_err("restore the snapshot"))?;
        self.residence = Residence::Live(Live::new(worker, true));
        self.live()?.worker.start().map_err(worker_err("start the VM"))?;
        Ok(())
    }

    /// Stops the worker, if there is one, and deletes the snapshots it no longer needs. The
    /// machine is then killed unless the caller gives it another residence.
    pub(super) fn stop_worker(&mut self) {
        if let Residence::Live(live) = std::mem::replace(&mut self.residence, Residence::Killed) {
            live.stop();
        }
        for path in self.chain.take_superseded() {
            self.trash.discard(&path);
        }
    }

    /// Closes the agent connection (snapshots reset vsock; a stale client would only fail).
    fn drop_client(&mut self) {
        if let Residence::Live(live) = &mut self.residence {
            live.drop_client();
        }
    }

    /// A connected agent client: the live one, or a new connection made within `timeout`. After
    /// a restore the first connection also tells the guest the time and fresh entropy.
    pub(super) fn connect_within(&mut self, timeout: Duration) -> Result<AgentClient, KvmError> {
        let uds = self.files.vsock_uds();
        let serial = self.files.serial_log();
        let dir = self.files.dir().to_path_buf();
        let live = self.live()?;
        if let Some(client) = &live.client {
            if client.closed_reason().is_none() {
                return Ok(client.clone());
            }
        }
        live.client = None;
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let connected = connect_agent(&uds, &serial, left, || {
                live.poll_events(&serial);
                live.death.as_ref().map_or(Ok(()), |death| Err(death.to_string()))
            });
            let client = match connected {
                Ok(client) => client,
                Err(LinkError::VmEnded(_)) => {
                    let death = live.death.clone().expect("the VM ended");
                    return Err(KvmError::Gone(death));
                }
                Err(e) => return Err(e.into()),
            };
            if live.needs_sync {
                match sync_restored_guest(&client) {
                    Ok(()) => live.needs_sync = false,
                    // The VMM resets the guest's vsock transport on restore; the guest may act on
                    // that after this connection was made, and drop it. Connect again.
                    Err(e) if e.is_disconnect() && started.elapsed() < timeout => {
                        tracing::debug!(
                            dir = %dir.display(),
                            "the restored guest dropped the new agent connection; reconnecting"
                        );
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            live.client = Some(client.clone());
            return Ok(client);
        }
    }

    /// Pauses the vCPUs and writes a full snapshot to `dir` (outside this sandbox's chain: the
    /// template); the VM stays paused.
    pub(super) fn snapshot_to(&mut self, dir: &Path) -> Result<(), KvmError> {
        self.drop_client();
        // Once the worker has saved into `dir`, its next incremental would build on `dir`,
        // which this sandbox does not own.
        self.chain.forget_parent();
        let worker = self.worker()?;
        worker.pause().map_err(worker_err("pause the VM"))?;
        worker.snapshot(dir, false).map_err(worker_err("write a snapshot"))?;
        Ok(())
    }

    /// Pauses the vCPUs and writes this sandbox's next snapshot (the VM stays paused); returns
    /// its generation.
    pub(super) fn snapshot_next(&mut self) -> Result<u64, KvmError> {
        self.drop_client();
        let files = self.files.clone();
        let live = match &mut self.residence {
            Residence::Live(live) => live,
            Residence::OnDisk { .. } => return Err(KvmError::OnDisk),
            Residence::Killed => return Err(KvmError::Killed),
        };
        live.poll_events(&files.serial_log());
        if let Some(death) = &live.death {
            return Err(KvmError::Gone(death.clone()));
        }
        self.chain.write_next(&files, &live.worker)
    }

    fn pause_to_disk(&mut self) -> Result<(), KvmError> {
        let generation = match self.snapshot_next() {
            Ok(generation) => generation,
            Err(e) => {
                // Leave it running as it was, when it still can.
                if let Residence::Live(live) = &self.residence {
                    let _ = live.worker.resume();
                }
                return Err(e);
            }
        };
        self.stop_worker();
        self.residence = Residence::OnDisk { generation };
        Ok(())
    }

    /// Whether the live VM's vCPUs are paused (in memory).
    pub(super) fn paused_in_memory(&mut self) -> Result<bool, KvmError> {
        let state = self.worker()?.status().map_err(worker_err("report its state"))?;
        Ok(state == capsule_vmm::RunState::Paused)
    }
}

impl Machine for KvmMachine {
    fn connect(&mut self) -> Result<AgentClient, EngineError> {
        Ok(self.connect_within(AGENT_RESTORED_TIMEOUT)?)
    }

    fn save_template(&mut self, key: &str) -> Result<SavedTemplate, EngineError> {
        Ok(super::user_templates::save(self, key)?)
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        if self.disk_generation().is_some() {
            return Ok(());
        }
        Ok(self.pause_to_disk()?)
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        match self.disk_generation() {
            Some(generation) => {
                let dir = self.files.own_snapshot(generation);
                if let Err(e) = self.restore(&dir) {
                    // Still on disk: the snapshot is untouched, so a later resume can try again.
                    self.residence = Residence::OnDisk { generation };
                    return Err(e.into());
                }
                Ok(())
            }
            None => {
                self.worker()?.resume().map_err(worker_err("resume the VM"))?;
                Ok(())
            }
        }
    }

    fn fork(&mut self, child: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        self.fork_many(std::slice::from_ref(child)).pop().expect("one result per child")
    }

    fn fork_many(&mut self, children: &[MachineSpec]) -> Vec<Result<Box<dyn Machine>, EngineError>> {
        fork::fork_many(self, children)
    }

    fn kill(&mut self) -> Result<(), EngineError> {
        self.stop_worker();
        // Gone from the state directory at once; its space is freed in the background.
        self.trash.discard(self.files.dir());
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), EngineError> {
        if self.disk_generation().is_some() {
            return Ok(());
        }
        self.live().map(drop).map_err(EngineError::from)
    }

    fn release(mut self: Box<Self>) {
        if let Residence::Live(live) = std::mem::replace(&mut self.residence, Residence::Killed) {
            live.worker.detach();
        }
    }

    fn stop(&mut self) {
        self.stop_worker();
    }

    fn roll_back(&mut self, why: &str) -> Option<Result<RollBack, EngineError>> {
        Some(self.roll_back_to_newest(why).map_err(EngineError::from))
    }

    fn network_socket(&self) -> Option<PathBuf> {
        match &self.residence {
            // A VM restored from a snapshot without a net device (taken before VMs had one)
            // has no socket: it has no network.
            Residence::Live(_) => Some(self.files.net_socket()).filter(|path| path.exists()),
            Residence::OnDisk { .. } | Residence::Killed => None,
        }
    }

    fn process_id(&self) -> Option<u32> {
        match &self.residence {
            Residence::Live(live) => Some(live.worker.pid()),
            Residence::OnDisk { .. } | Residence::Killed => None,
        }
    }

    fn saved_state(&self) -> serde_json::Value {
        let generation = self.disk_generation();
        serde_json::to_value(SavedState {
            dir: self.files.dir().to_path_buf(),
            rootfs: self.rootfs.clone(),
            snapshot_generation: generation,
            chain_layers: generation.and(self.chain.layers),
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for KvmMachine {
    fn drop(&mut self) {
        // The worker handle kills its process; nothing else to free.
        self.drop_client();
    }
}
