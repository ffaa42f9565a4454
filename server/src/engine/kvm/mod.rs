//! The KVM engine: each sandbox is a microVM of the guest image, run by our own VMM in a worker
//! process of its own (`capsule worker`), reached over hybrid virtio-vsock.
//!
//! - [`layout`]: the files of one sandbox and the VM that boots the image over them;
//! - [`guest_link`]: connecting to the guest agent, clock and entropy after a restore, the
//!   serial console;
//! - [`host`]: what this host can run (microVMs at all, vCPUs per guest);
//! - [`templates`]: booted, warmed, saved guests that new sandboxes restore from;
//! - [`chain`]: which snapshot a pause writes (incremental layer or full) and what it supersedes;
//! - `machine`: one sandbox's VM, live in a worker or paused to disk;
//! - `fork`: N children from one moment of a parent.
//!
//! Lifecycle: create restores the template of its size (built on first use) with a copy of the
//! template's disk, in tens of milliseconds, sharing the template's memory pages copy-on-write in
//! RAM and on disk; if the template cannot be restored, the image is booted instead. Pause
//! writes a snapshot and stops the worker (its RAM is freed); resume restores the newest
//! snapshot into a new worker; fork shares the parent's snapshot by hard links.
//!
//! Network: every VM has a virtio-net device whose worker listens on `<sandbox>/net.sock`
//! ([`Machine::network_socket`]); the daemon connects after each create, resume, fork, restart
//! and reattach. A sandbox the daemon never connects to has no network (everything is refused),
//! so every sandbox, whatever its network mode, has the same devices and restores from the same
//! templates.
//!
//! The engine is handed its image (the caller builds or locates it) and what templates run
//! before they are saved. It never talks MCP, never touches the registry, and never runs KVM
//! itself (the worker does).

pub mod chain;
mod disk_back;
mod fork;
pub mod guest_link;
pub mod host;
pub mod layout;
mod machine;
pub mod templates;
mod user_templates;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsule_vmm::devices::virtio::block::undo::UndoError;
use capsule_vmm::worker::{WorkerError, WorkerHandle};

use super::trash::Trash;
use super::{detect_host_limits, Engine, EngineError, ErrorKind, HostLimits, Machine, MachineSpec, Reattached};
use crate::image::{create_writable_disk, ImageError, ImageInfo};
use chain::Chain;
pub use chain::MAX_INCREMENTAL_LAYERS;
pub use guest_link::{
    connect_agent, serial_tail, set_guest_clock, sync_restored_guest, wait_for_serial, LinkError, AGENT_READY_MARKER,
    AGENT_READY_TIMEOUT, AGENT_RESTORED_TIMEOUT, SERIAL_TAIL_LINES,
};
pub use host::{check_vcpus, host_refusal, VcpuError};
pub use layout::{boot_config, copy_disk, LayoutError, SandboxFiles, GUEST_CID};
pub use machine::Death;
use machine::KvmMachine;
use templates::Templates;
pub use templates::WarmUp;

/// The fork caveat of this engine, for the model.
const FORK_NOTE: &str = "Forks copy the whole machine: memory, running processes, interpreter \
state and files. Network connections and agent connections are not carried over.";

/// Errors of the KVM engine.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The engine cannot run on this host or with this build.
    #[error("{0}")]
    Unavailable(String),
    /// The host cannot give a guest the vCPUs asked for.
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    /// A file of the sandbox could not be made.
    #[error("a file of the sandbox could not be made")]
    Layout(#[from] LayoutError),
    /// The guest image is unusable.
    #[error("the guest image is unusable")]
    Image(#[source] ImageError),
    /// The worker process failed a request.
    #[error("the VM worker failed to {what}")]
    Worker {
        /// What it was asked.
        what: &'static str,
        /// Why.
        #[source]
        source: WorkerError,
    },
    /// The VM ended.
    #[error("the VM is gone: {0}")]
    Gone(Death),
    /// The machine is paused to disk: it has no worker until it is resumed.
    #[error("the sandbox is paused to disk; resume it first")]
    OnDisk,
    /// The machine was killed.
    #[error("the sandbox's VM was killed")]
    Killed,
    /// The guest agent could not be reached or failed a call.
    #[error("the guest agent is unreachable")]
    Link(#[from] LinkError),
    /// Saved state from the registry cannot be used.
    #[error("saved machine state is unusable: {0}")]
    BadSavedState(String),
    /// A sandbox to boot again has no writable disk any more.
    #[error("its disk {0} is gone, so it cannot be booted again")]
    DiskGone(PathBuf),
    /// The disk's undo log could not take it back to the snapshot.
    #[error("the disk {disk} could not be taken back to its newest snapshot")]
    DiskUndo {
        /// The disk.
        disk: PathBuf,
        /// Why.
        #[source]
        source: UndoError,
    },
    /// The disk changed since the newest snapshot in a way no undo log covers (a restart).
    #[error(
        "the disk {disk} has changed since the sandbox's newest snapshot ({snapshot}; its writes are logged \
         since {since:?}, a later boot), so that snapshot's memory cannot be resumed over it; \
         restart_sandbox boots the sandbox again on its disk"
    )]
    DiskNewerThanSnapshot {
        /// The disk.
        disk: PathBuf,
        /// Since when its writes are logged.
        since: String,
        /// The snapshot rolled back to.
        snapshot: String,
    },
    /// A saved template cannot be used or made.
    #[error("the saved template cannot be used: {0}")]
    BadTemplate(String),
    /// The sandbox directory has no parent to put forks in.
    #[error("the sandbox directory has no parent")]
    NoRoot,
    /// A machine whose VM was lost has no snapshot to roll back to.
    #[error("the sandbox in {0} has no snapshot to roll back to")]
    NoSnapshot(PathBuf),
    /// No child of a fork could be prepared, so the parent's state was not taken.
    #[error("no fork could be prepared")]
    NothingToFork,
    /// The parent's state could not be taken for a fork (every child of it fails alike).
    #[error("cannot take the parent's state for the fork")]
    ForkSource(#[source] Arc<KvmError>),
}

impl KvmError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KvmError::Gone(_)
            | KvmError::Killed
            | KvmError::DiskGone(_)
            | KvmError::NoSnapshot(_)
            | KvmError::DiskNewerThanSnapshot { .. } => ErrorKind::Lost,
            KvmError::Worker { source, .. } if worker_lost(source) => ErrorKind::Lost,
            KvmError::Vcpus(_) => ErrorKind::Limit,
            KvmError::Layout(LayoutError::SocketPathTooLong { .. }) => ErrorKind::Limit,
            KvmError::OnDisk => ErrorKind::Busy,
            KvmError::BadSavedState(_) => ErrorKind::InvalidInput,
            KvmError::ForkSource(source) => source.kind(),
            KvmError::Unavailable(_)
            | KvmError::Layout(_)
            | KvmError::Image(_)
            | KvmError::Worker { .. }
            | KvmError::Link(_)
            | KvmError::DiskUndo { .. }
            | KvmError::BadTemplate(_)
            | KvmError::NoRoot
            | KvmError::NothingToFork => ErrorKind::HostFault,
        }
    }
}

/// Whether a worker error means the worker (and so its VM) is gone.
fn worker_lost(error: &WorkerError) -> bool {
    matches!(error, WorkerError::WorkerDied { .. })
}

fn worker_err(what: &'static str) -> impl FnOnce(WorkerError) -> KvmError {
    move |source| KvmError::Worker { what, source }
}

/// The engine.
#[derive(Debug)]
pub struct KvmEngine {
    worker_exe: PathBuf,
    image: ImageInfo,
    root: PathBuf,
    templates: Templates,
    trash: Arc<Trash>,
}

impl KvmEngine {
    /// An engine that boots `image` in workers started from `worker_exe` (a binary with the
    /// `worker` subcommand: `capsule` itself), with sandboxes under `root`; its templates run
    /// `warm_up` before they are saved.
    pub fn new(worker_exe: PathBuf, image: ImageInfo, root: PathBuf, warm_up: WarmUp) -> Result<Self, EngineError> {
        if !worker_exe.is_file() {
            return Err(
                KvmError::Unavailable(format!("the VM worker binary {} does not exist", worker_exe.display())).into()
            );
        }
        std::fs::create_dir_all(&root).map_err(|source| {
            KvmError::Layout(LayoutError::Io { what: format!("cannot create {}", root.display()), source })
        })?;
        let trash = Arc::new(Trash::new(&root));
        let templates = Templates::open(&root, &image.version, warm_up);
        Ok(Self { worker_exe, image, root, templates, trash })
    }

    /// The image this engine boots.
    pub fn image(&self) -> &ImageInfo {
        &self.image
    }

    /// Boots a fresh guest with its files in `files`, and waits for its agent. A sandbox's
    /// worker outlives the daemon (`outliving`); a template's, which lives only to be saved, does
    /// not.
    fn boot_in(
        &self,
        files: SandboxFiles,
        spec: &MachineSpec,
        vcpus: u8,
        outliving: bool,
    ) -> Result<KvmMachine, KvmError> {
        files.create_dir()?;
        create_writable_disk(&files.writable_disk(), u64::from(spec.disk_mib)).map_err(KvmError::Image)?;
        let rootfs = files.adopt_rootfs(&self.image.rootfs);
        self.start_booted(files, rootfs, spec, vcpus, outliving)
    }

    /// Boots the guest of a sandbox that already has its disk (and its own root filesystem, when
    /// it adopted one), for a restart. Its next snapshot follows the newest one on disk (as a
    /// full one: nothing of the old boot is a parent of the new).
    fn boot_again(&self, spec: &MachineSpec) -> Result<KvmMachine, KvmError> {
        let files = SandboxFiles::new(self.root.join(&spec.id));
        if !files.writable_disk().is_file() {
            return Err(KvmError::DiskGone(files.writable_disk()));
        }
        let vcpus = check_vcpus(spec.vcpus)?;
        let rootfs = files.own_rootfs().unwrap_or_else(|| self.image.rootfs.clone());
        let _ = std::fs::remove_file(files.control().ended);
        let newest = files.newest_snapshot().map_or(0, |(generation, _)| generation);
        let mut machine = self.start_booted(files, rootfs, spec, vcpus, true)?;
        machine.chain = Chain::at(newest, None);
        Ok(machine)
    }

    /// Starts a worker that boots the image with `rootfs` for `files`, and waits for its agent.
    fn start_booted(
        &self,
        files: SandboxFiles,
        rootfs: PathBuf,
        spec: &MachineSpec,
        vcpus: u8,
        outliving: bool,
    ) -> Result<KvmMachine, KvmError> {
        let image = ImageInfo { rootfs, ..self.image.clone() };
        let mut config = boot_config(&image, &files, vcpus, u64::from(spec.memory_mib));
        // A sandbox's disk keeps an undo log, so a roll-back can take it back with the memory;
        // a template's VM lives only to be saved.
        for disk in config.disks.iter_mut().filter(|d| !d.read_only) {
            disk.undo_log = outliving;
        }
        let worker = if outliving {
            WorkerHandle::spawn_outliving(&self.worker_exe, config, &files.control())
        } else {
            WorkerHandle::spawn(&self.worker_exe, config)
        }
        .map_err(worker_err("boot"))?;
        let mut machine = KvmMachine::booted(self.worker_exe.clone(), self.trash.clone(), files, image.rootfs, worker)?;
        let client = machine.connect_within(AGENT_READY_TIMEOUT)?;
        set_guest_clock(&client)?;
        Ok(machine)
    }

    /// A new machine restored from the built-in `template`, with its own copy of its disk.
    fn restore_template(&self, spec: &MachineSpec, template: &SandboxFiles) -> Result<KvmMachine, KvmError> {
        self.restore_from(spec, &template.writable_disk(), &template.snapshot(0), &self.image.rootfs)
    }

    /// A new machine restored from a template's `snapshot` (built-in or saved), with its own
    /// copy of the template's `disk` and its own link to `rootfs`.
    fn restore_from(
        &self,
        spec: &MachineSpec,
        disk: &Path,
        snapshot: &Path,
        rootfs: &Path,
    ) -> Result<KvmMachine, KvmError> {
        let files = SandboxFiles::new(self.root.join(&spec.id));
        files.create_dir()?;
        copy_disk(disk, &files.writable_disk())?;
        let rootfs = files.adopt_rootfs(rootfs);
        KvmMachine::restored_from(self.worker_exe.clone(), self.trash.clone(), files, rootfs, snapshot)
    }

    fn build(&self, spec: &MachineSpec) -> Result<KvmMachine, KvmError> {
        let vcpus = check_vcpus(spec.vcpus)?;
        let template = self.templates.get_or_build(spec, vcpus, |files| self.boot_in(files, spec, vcpus, false))?;
        match self.restore_template(spec, &template) {
            Ok(machine) => Ok(machine),
            Err(e) => {
                // A template that cannot be restored is dropped (the next create builds it
                // again); this sandbox boots the slow way.
                tracing::warn!(
                    template = %template.dir().display(),
                    error = %capsule_vmm::worker::error_chain(&e),
                    "restoring the template failed; booting instead"
                );
                self.templates.discard(&template);
                let _ = std::fs::remove_dir_all(self.root.join(&spec.id));
                self.boot_in(SandboxFiles::new(self.root.join(&spec.id)), spec, vcpus, true)
            }
        }
    }
}

impl Engine for KvmEngine {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn host_limits(&self) -> HostLimits {
        detect_host_limits()
    }

    fn fork_note(&self) -> Option<&'static str> {
        Some(FORK_NOTE)
    }

    fn create(&self, spec: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        match self.build(spec) {
            Ok(machine) => Ok(Box::new(machine)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.root.join(&spec.id));
                Err(e.into())
            }
        }
    }

    fn create_from_template(
        &self,
        spec: &MachineSpec,
        template: &serde_json::Value,
    ) -> Result<Box<dyn Machine>, EngineError> {
        match self.create_from_saved(spec, template) {
            Ok(machine) => Ok(Box::new(machine)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.root.join(&spec.id));
                Err(e.into())
            }
        }
    }

    fn remove_template(&self, template: &serde_json::Value) {
        self.remove_saved(template);
    }

    fn reattach(&self, spec: &MachineSpec, saved: &serde_json::Value, paused: bool) -> Result<Reattached, EngineError> {
        let saved: SavedState =
            serde_json::from_value(saved.clone()).map_err(|e| KvmError::BadSavedState(format!("{e}: {saved}")))?;
        let files = SandboxFiles::new(&saved.dir);
        let (exe, trash) = (self.worker_exe.clone(), self.trash.clone());
        if !paused {
            let lost = match WorkerHandle::attach(&files.control()) {
                Ok(worker) => {
                    let machine = KvmMachine::attached(exe, trash, files, saved.rootfs, worker);
                    return Ok(Reattached { machine: Box::new(machine), rolled_back: None });
                }
                Err(e) => lost_while_down(&files, &e),
            };
            let chain = Chain::at(0, None);
            let mut machine = KvmMachine::on_disk(exe, trash, files, saved.rootfs, chain);
            let rolled_back = machine.roll_back_to_newest(&lost)?;
            return Ok(Reattached { machine: Box::new(machine), rolled_back: Some(rolled_back) });
        }
        let Some(generation) = saved.snapshot_generation else {
            return Err(KvmError::BadSavedState(format!(
                "sandbox {} is recorded paused but names no snapshot",
                spec.id
            ))
            .into());
        };
        if !files.own_snapshot(generation).is_dir() {
            return Err(KvmError::BadSavedState(format!(
                "the snapshot {} is gone",
                files.own_snapshot(generation).display()
            ))
            .into());
        }
        let chain = Chain::at(generation, saved.chain_layers);
        let machine = KvmMachine::on_disk(exe, trash, files, saved.rootfs, chain);
        Ok(Reattached { machine: Box::new(machine), rolled_back: None })
    }

    fn restart(&self, spec: &MachineSpec, old: Option<&mut Box<dyn Machine>>) -> Result<Box<dyn Machine>, EngineError> {
        if let Some(old) = old {
            old.stop();
        } else if let Ok(worker) = WorkerHandle::attach(&SandboxFiles::new(self.root.join(&spec.id)).control()) {
            // A failed sandbox's worker may linger (its VM hung rather than ended).
            let _ = worker.stop();
        }
        Ok(Box::new(self.boot_again(spec)?))
    }

    fn discard(&self, id: &str) {
        let files = SandboxFiles::new(self.root.join(id));
        if let Ok(worker) = WorkerHandle::attach(&files.control()) {
            let _ = worker.stop();
        }
        if files.dir().exists() {
            self.trash.discard(files.dir());
        }
    }
}

/// How the VM of a sandbox recorded running was lost while no server watched it.
fn lost_while_down(files: &SandboxFiles, attach: &WorkerError) -> String {
    let ended = std::fs::read(files.control().ended)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<capsule_vmm::worker::VmEnded>(&bytes).ok());
    match ended {
        Some(ended) => format!("its VM ended ({:?}) while capsule was not running", ended.event),
        None => format!(
            "its VM's worker was gone when capsule started again (the host restarted, or the worker was \
             killed or crashed while capsule was not running: {})",
            capsule_vmm::worker::error_chain(attach)
        ),
    }
}

/// What the registry stores for a KVM machine.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    dir: PathBuf,
    rootfs: PathBuf,
    /// The snapshot it is paused in, if it is paused to disk.
    snapshot_generation: Option<u64>,
    /// Layers of that snapshot's chain (0: full); `None` (also in states saved before chains
    /// existed) makes the next pause full.
    #[serde(default)]
    chain_layers: Option<usize>,
}
