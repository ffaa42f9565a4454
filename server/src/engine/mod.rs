//! The seam between the sandbox manager and a VM: the [`Engine`] and [`Machine`] traits.
//!
//! An engine makes machines; a machine is one sandbox's VM (or, for the test
//! engine, one agent host process). Every call is blocking: the manager runs
//! them on `spawn_blocking`, which suits the KVM engine's worker processes
//! (a control socket per VM) as well as the test engine's signals.
//!
//! What a machine must give the manager:
//! - a connected [`AgentClient`] ([`Machine::connect`]), fresh after every
//!   resume, restore or fork (vsock connections do not survive snapshots);
//! - pause/resume, fork into a new machine, kill;
//! - a JSON [`Machine::saved_state`] that the registry stores, from which
//!   [`Engine::reattach`] rebuilds the machine after a server restart (for KVM:
//!   the snapshot directory; for the test engine: the agent's pid and dir).
//!
//! Engines know nothing about MCP, sessions or the registry. Their errors carry their causes and
//! a [`ErrorKind`] that the manager acts on (a lost machine fails its sandbox; the rest are
//! reported and retried).

pub mod kvm;
pub mod test_engine;
pub mod trash;

use std::collections::BTreeMap;

use capsule_agent::client::AgentClient;

/// What a new machine looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineSpec {
    /// The sandbox id (engines name files and processes after it).
    pub id: String,
    /// Template name.
    pub template: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u32,
    /// Writable disk, in MiB.
    pub disk_mib: u32,
    /// Environment for everything run in the sandbox.
    pub env: BTreeMap<String, String>,
}

/// What the host lets guests have.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLimits {
    /// Most vCPUs a guest can have on this host.
    pub max_vcpus: u32,
    /// Why there is a limit, when it is lower than the configured one.
    pub why: Option<String>,
}

/// What kind of failure an engine error is: what the manager does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The machine is gone (its VM or process died); its in-memory state is lost.
    Lost,
    /// The machine is in the middle of something else; retry later.
    Busy,
    /// The host cannot give what was asked (vCPUs, sockets).
    Limit,
    /// What was asked, or the saved state handed in, is not valid.
    InvalidInput,
    /// The host failed: I/O, KVM, a worker process that misbehaved.
    HostFault,
}

/// Errors of engines and machines: each engine's own error, with its causes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The KVM engine failed.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// The test engine failed.
    #[error(transparent)]
    Test(#[from] test_engine::TestEngineError),
}

impl EngineError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Kvm(e) => e.kind(),
            EngineError::Test(e) => e.kind(),
        }
    }
}

/// A machine rolled back to its newest snapshot after its VM was lost: it is paused there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollBack {
    /// How the VM was lost.
    pub why: String,
    /// When the snapshot it is back at was written (ms since the Unix epoch).
    pub snapshot_unix_ms: u64,
}

/// A machine found again after a server restart.
pub struct Reattached {
    /// The machine.
    pub machine: Box<dyn Machine>,
    /// Set when the machine was recorded running but its VM was gone (the host restarted, or
    /// its worker ended while no server watched it): it was rolled back to its newest snapshot
    /// and is paused there.
    pub rolled_back: Option<RollBack>,
}

/// A template saved from a machine ([`Machine::save_template`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTemplate {
    /// Where the engine keeps its files (handed back to [`Engine::create_from_template`] and
    /// [`Engine::remove_template`]).
    pub engine_state: serde_json::Value,
    /// Bytes its files take on the host (some may be shared by hard links).
    pub bytes: u64,
}

/// A VM (or stand-in) for one sandbox. All calls block.
pub trait Machine: Send {
    /// A connected, handshaken agent client; reuses the live connection when there is one.
    fn connect(&mut self) -> Result<AgentClient, EngineError>;
    /// Freezes the machine. Drops the agent connection first.
    fn pause(&mut self) -> Result<(), EngineError>;
    /// Thaws the machine; the next [`Machine::connect`] reconnects.
    fn resume(&mut self) -> Result<(), EngineError>;
    /// Makes a new running machine from this one's current state.
    fn fork(&mut self, child: &MachineSpec) -> Result<Box<dyn Machine>, EngineError>;
    /// Makes one new running machine per spec in `children`, all from this one's state at one
    /// moment where the engine can (the default forks them one after the other). One result per
    /// child, in order.
    fn fork_many(&mut self, children: &[MachineSpec]) -> Vec<Result<Box<dyn Machine>, EngineError>> {
        children.iter().map(|child| self.fork(child)).collect()
    }
    /// Saves the machine's current state as a template named after `name` (its memory too,
    /// where the engine keeps memory: taken at one moment, like a fork), leaving the machine as
    /// it was, running or paused.
    fn save_template(&mut self, name: &str) -> Result<SavedTemplate, EngineError>;
    /// Destroys the machine and its files. Idempotent.
    fn kill(&mut self) -> Result<(), EngineError>;
    /// An error of kind [`ErrorKind::Lost`] (saying why) when the machine has died.
    fn check_alive(&mut self) -> Result<(), EngineError>;
    /// What the registry stores so that [`Engine::reattach`] can find this machine again.
    fn saved_state(&self) -> serde_json::Value;
    /// Where the machine's network stack takes the daemon's broker (a `SOCK_SEQPACKET` Unix
    /// socket; connect with `capsule_vmm::net::broker_socket::connect`), while a process runs
    /// it; `None` for machines without one (the test engine, a machine paused to disk). Each new
    /// worker listens anew and drops what the old one had, so the daemon connects after every
    /// create, resume, fork (each child), restart and reattach; until it does, the guest's
    /// network refuses everything. A sandbox without network is simply never connected.
    fn network_socket(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The host process that runs the machine (a VM worker, an agent), while one does.
    fn process_id(&self) -> Option<u32> {
        None
    }
    /// Lets the machine go without stopping it, as a crash of this process would: an engine
    /// whose machines outlive it reattaches to it after a restart. (The default drops it.)
    fn release(self: Box<Self>) {}
    /// Stops the machine but keeps its files (its disk), for [`Engine::restart`]. Idempotent.
    fn stop(&mut self);
    /// Rolls a machine whose VM was lost (`why`) back to its newest snapshot, paused there;
    /// `None` when the engine keeps no snapshots to roll back to.
    fn roll_back(&mut self, why: &str) -> Option<Result<RollBack, EngineError>> {
        let _ = why;
        None
    }
}

/// A kind of machine.
pub trait Engine: Send + Sync + 'static {
    /// The engine's name, as `--engine` takes it.
    fn name(&self) -> &'static str;
    /// What the host lets guests have.
    fn host_limits(&self) -> HostLimits;
    /// What a fork copies on this engine, for the model to read; `None` when it copies everything.
    fn fork_note(&self) -> Option<&'static str>;
    /// Creates and starts a machine.
    fn create(&self, spec: &MachineSpec) -> Result<Box<dyn Machine>, EngineError>;
    /// Creates and starts a machine from the saved template whose files `template` names
    /// ([`SavedTemplate::engine_state`]), with its size.
    fn create_from_template(
        &self,
        spec: &MachineSpec,
        template: &serde_json::Value,
    ) -> Result<Box<dyn Machine>, EngineError>;
    /// Deletes a saved template's files. Sandboxes made from it keep working. Best effort.
    fn remove_template(&self, template: &serde_json::Value);
    /// Finds a machine again after a server restart, from its saved state. `paused` says
    /// whether it was recorded paused (it must stay paused).
    fn reattach(&self, spec: &MachineSpec, saved: &serde_json::Value, paused: bool) -> Result<Reattached, EngineError>;
    /// Boots sandbox `spec` again on its own disk: its files are kept, whatever ran in it is
    /// lost. `old` is its machine, stopped first, when it still has one (a failed sandbox has
    /// none).
    fn restart(&self, spec: &MachineSpec, old: Option<&mut Box<dyn Machine>>) -> Result<Box<dyn Machine>, EngineError>;
    /// Frees whatever a sandbox `id` that has no machine any more (it failed, or was being made
    /// when the server stopped) may have left: a process, files. Best effort.
    fn discard(&self, id: &str) {
        let _ = id;
    }
}

/// Bytes the files under `dir` take on disk.
pub(crate) fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Host limits common to every engine on this host: PVM allows one vCPU.
pub fn detect_host_limits() -> HostLimits {
    if capsule_vmm::host::is_pvm() {
        let max = u32::from(capsule_vmm::host::PVM_MAX_LINUX_VCPUS);
        HostLimits {
            max_vcpus: max,
            why: Some(format!(
                "this host's KVM is PVM (no VT-x/AMD-V), where guests run with exactly one vCPU; \
                 ask for vcpus={max} (or omit it), or run capsule on a host with hardware virtualization \
                 for more"
            )),
        }
    } else {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        HostLimits { max_vcpus: cpus, why: Some(format!("this host has {cpus} CPUs")) }
    }
}
