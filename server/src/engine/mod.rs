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
//! Engines know nothing about MCP, sessions or the registry.
//!
//! How the KVM engine will fit (wired in by the lead): `create` = restore the
//! template snapshot into a new `capsule_vmm::worker::WorkerHandle` (or boot
//! and snapshot the template on first use); `connect` =
//! `AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT)` then `SetClock`
//! and `AddEntropy`; `pause` = worker pause + snapshot to disk, then stop the
//! worker to free RAM; `resume` = restore that snapshot into a new worker;
//! `fork` = snapshot once, restore N workers from it (memory mapped
//! `MAP_PRIVATE`, shared copy-on-write); `saved_state` = the snapshot path.

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

/// Errors of engines and machines.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot run on this host or build.
    #[error("{0}")]
    Unavailable(String),
    /// Starting the machine failed.
    #[error("cannot start the sandbox: {0}")]
    Start(String),
    /// The machine is gone (its VM or process died); its in-memory state is lost.
    #[error("the sandbox's VM died: {0}")]
    Dead(String),
    /// Connecting to the agent failed.
    #[error("cannot reach the sandbox's agent")]
    Agent(#[source] capsule_agent::client::ClientError),
    /// A host I/O operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Saved state from the registry could not be used.
    #[error("saved machine state is unusable: {0}")]
    BadSavedState(String),
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
    /// Destroys the machine and its files. Idempotent.
    fn kill(&mut self) -> Result<(), EngineError>;
    /// `Err(reason)` when the machine has died.
    fn check_alive(&mut self) -> Result<(), String>;
    /// What the registry stores so that [`Engine::reattach`] can find this machine again.
    fn saved_state(&self) -> serde_json::Value;
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
    /// Finds a machine again after a server restart, from its saved state.
    /// `paused` says whether it was recorded paused (it must stay paused).
    fn reattach(
        &self,
        spec: &MachineSpec,
        saved: &serde_json::Value,
        paused: bool,
    ) -> Result<Box<dyn Machine>, EngineError>;
}

/// Whether this host's KVM is PVM (guests there run with one vCPU).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Host limits common to every engine on this host: PVM allows one vCPU.
pub fn detect_host_limits() -> HostLimits {
    if host_is_pvm() {
        HostLimits {
            max_vcpus: 1,
            why: Some(
                "this host's KVM is PVM (no VT-x/AMD-V), where guests run with exactly one vCPU; \
                 ask for vcpus=1 (or omit it), or run capsule on a host with hardware virtualization \
                 for more"
                    .to_string(),
            ),
        }
    } else {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        HostLimits { max_vcpus: cpus, why: Some(format!("this host has {cpus} CPUs")) }
    }
}
