//! The sandbox manager: every sandbox of this server, its machine and its state.
//!
//! - Transitions of one sandbox are serialized by that sandbox's async lock;
//!   each is checked by [`lifecycle::check`] and written to the registry before
//!   it is reported.
//! - Sandbox ids stay out of the model's way: an omitted id means the owner's
//!   default sandbox, created on first use; an unknown id gets an error that
//!   lists the owner's sandboxes; a paused sandbox resumes on any call.
//! - Limits (count, per-sandbox size, total memory of running sandboxes) are
//!   enforced here, with errors that say what to do next.
//!
//! - Every public operation runs on its own task ([`detached`]): the engine
//!   call and the transition that records it complete together even when the
//!   caller goes away (a cancelled MCP request, a dropped connection, an
//!   aborted timer), so the registry never says `running` while the VM is paused.
//! - Owners: an MCP session over HTTP is a new owner, and MCP sessions do not
//!   survive a server restart (by protocol), so after a restart or a session's
//!   end its sandboxes are orphans: nobody can name them, and the timers
//!   reclaim them like any other (idle pause, then deletion after the retention
//!   period). `--shared-sandboxes` sessions see and may kill them meanwhile.
//!   Per-owner bookkeeping lives only as long as the owner has a default
//!   sandbox or a call resolving one.
//!
//! Engine calls block, so they run on `spawn_blocking`. This module never
//! speaks MCP.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use capsule_agent::client::AgentClient;
use tokio::sync::Mutex as AsyncMutex;

use super::lifecycle::{self, IllegalTransition};
use super::{SandboxInfo, SandboxRecord, SandboxState};
use crate::config::{Limits, Timers};
use crate::engine::{Engine, EngineError, ErrorKind, Machine, MachineSpec};
use crate::registry::{now_ms, Registry, RegistryError};
use capsule_vmm::worker::error_chain;

/// The template every sandbox uses unless told otherwise.
pub const DEFAULT_TEMPLATE: &str = "default";
/// Longest sandbox name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most environment variables per sandbox.
pub const MAX_ENV_VARS: usize = 256;
/// How long a machine whose agent connection broke may take to show it died.
const AGENT_LOSS_SETTLE: Duration = Duration::from_millis(500);
/// A sandbox still `creating` this long after it was admitted, with nobody
/// working on it, is marked failed by the timers and stops counting against
/// the limits. (An engine call in progress holds the sandbox's lock, so it is
/// never reaped; the engines bound their own start times.)
pub const CREATING_ABANDONED_AFTER: Duration = Duration::from_secs(120);

/// Who is asking: an MCP session, or everyone when sessions share sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner key stored with each sandbox.
    pub id: String,
    /// Sees (and may use) every sandbox, not only its own.
    pub sees_all: bool,
}

impl Owner {
    /// An owner that sees only its own sandboxes.
    pub fn new(id: impl Into<String>) -> Owner {
        Owner { id: id.into(), sees_all: false }
    }

    fn can_see(&self, record_owner: &str) -> bool {
        self.sees_all || self.id == record_owner
    }
}

/// Settings of the manager.
#[derive(Debug, Clone, Default)]
pub struct ManagerConfig {
    /// Limits.
    pub limits: Limits,
    /// Timers.
    pub timers: Timers,
}

/// What `create` is asked for (all optional; defaults come from the config).
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Template name.
    pub template: Option<String>,
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Disk in MiB.
    pub disk_mib: Option<u32>,
    /// Idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Name.
    pub name: Option<String>,
    /// Make it the owner's default (`None`: only if the owner has none).
    pub make_default: Option<bool>,
}

/// Errors of the manager. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such sandbox for this owner.
    #[error("no sandbox {id:?} in this session. {listing} Omit sandbox_id to use the default sandbox, or call list_sandboxes.")]
    UnknownSandbox {
        /// The id asked for.
        id: String,
        /// The owner's sandboxes, as a sentence.
        listing: String,
    },
    /// The sandbox failed; its state is lost.
    #[error("sandbox {id} has failed: {reason}. Its in-memory state is lost. Delete it with kill_sandbox and create a new one (or omit sandbox_id to get a fresh default sandbox).")]
    Failed {
        /// The sandbox.
        id: String,
        /// Why.
        reason: String,
    },
    /// A limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    BadParameter(String),
    /// The sandbox is in the wrong state for the operation.
    #[error("sandbox {id} is {state}: {what}")]
    WrongState {
        /// The sandbox.
        id: String,
        /// Its state.
        state: &'static str,
        /// What cannot be done and what to do instead.
        what: String,
    },
    /// A call lost its connection to a sandbox that is still alive.
    #[error("the connection to sandbox {id} broke ({detail}); the sandbox is still running, so retry the call")]
    ConnectionLost {
        /// The sandbox.
        id: String,
        /// What broke.
        detail: String,
    },
    /// The engine failed.
    #[error("the sandbox engine failed: {0}. Try again; if it keeps failing, kill_sandbox it and create a new one.")]
    Engine(#[source] EngineError),
    /// The registry failed.
    #[error("the sandbox registry failed, so the operation was not applied; retry, and if it persists check the server's state directory (disk full or read-only?)")]
    Registry(#[source] RegistryError),
    /// The operation's task could not finish (the server is shutting down).
    #[error("the server is shutting down, so the operation did not finish; retry once it is back")]
    ShuttingDown,
    /// A transition that the state machine forbids (a race, or a bug).
    #[error("sandbox {id}: {source}")]
    Illegal {
        /// The sandbox.
        id: String,
        /// The transition.
        #[source]
        source: IllegalTransition,
    },
}

impl From<RegistryError> for ManagerError {
    fn from(e: RegistryError) -> Self {
        ManagerError::Registry(e)
    }
}

type SharedMachine = Arc<StdMutex<Box<dyn Machine>>>;

struct SlotInner {
    record: SandboxRecord,
    machine: Option<SharedMachine>,
}

struct Slot {
    id: String,
    owner: String,
    inner: AsyncMutex<SlotInner>,
    /// A copy of the record, readable without waiting for a transition.
    snapshot: StdMutex<SandboxRecord>,
    busy: AtomicUsize,
    last_used_ms: AtomicU64,
}

impl Slot {
    fn new(record: SandboxRecord, machine: Option<SharedMachine>) -> Arc<Slot> {
        Arc::new(Slot {
            id: record.id.clone(),
            owner: record.owner.clone(),
            snapshot: StdMutex::new(record.clone()),
            last_used_ms: AtomicU64::new(now_ms()),
            busy: AtomicUsize::new(0),
            inner: AsyncMutex::new(SlotInner { record, machine }),
        })
    }

    fn record(&self) -> SandboxRecord {
        lock(&self.snapshot).clone()
    }

    fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sandbox held for one call: it is running, and it will not be paused
/// by the idle timer until the lease is dropped.
pub struct Lease {
    /// The sandbox id.
    pub id: String,
    /// A connected agent client.
    pub client: AgentClient,
    /// The sandbox's environment (merged into every command).
    pub env: BTreeMap<String, String>,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.touch();
        self.slot.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    engine: Arc<dyn Engine>,
    registry: Registry,
    config: ManagerConfig,
    slots: StdMutex<HashMap<String, Arc<Slot>>>,
    /// Owner → default sandbox id.
    defaults: StdMutex<HashMap<String, String>>,
    /// Owner → lock held while its default sandbox is being created.
    default_creation: StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Held while new sandboxes are checked against the limits and registered,
    /// so that concurrent creates cannot together pass a limit.
    admission: StdMutex<()>,
}

/// The sandbox manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("engine", &self.inner.engine.name()).finish()
    }
}

/// A fresh sandbox id.
fn new_sandbox_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = now_ms() ^ (COUNTER.fetch_add(1, Ordering::Relaxed) << 40) ^ u64::from(std::process::id());
        bytes.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sb-{hex}")
}

async fn blocking<T: Send + 'static>(
    machine: &SharedMachine,
    f: impl FnOnce(&mut Box<dyn Machine>) -> T + Send + 'static,
) -> T {
    let machine = machine.clone();
    match tokio::task::spawn_blocking(move || f(&mut lock(&machine))).await {
        Ok(v) => v,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// The error for an operation that `record`'s state does not allow: a failed
/// sandbox reports why it failed; any other state is named with `what` (what
/// cannot be done and what to do instead).
fn unusable(slot: &Slot, record: &SandboxRecord, what: &str) -> ManagerError {
    match record.state {
        SandboxState::Failed => ManagerError::Failed {
            id: slot.id.clone(),
            reason: record.failure.clone().unwrap_or_else(|| "unknown".into()),
        },
        state => ManagerError::WrongState { id: slot.id.clone(), state: state.as_str(), what: what.into() },
    }
}

/// Runs a manager operation on its own task and waits for it. The task runs
/// to the end even if the caller's future is dropped, so an engine call and
/// the transition recording it are never separated.
async fn detached<T: Send + 'static>(
    op: impl Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ManagerError> {
    match tokio::spawn(op).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(ManagerError::ShuttingDown),
    }
}

/// Refuses an operation that would cut off the calls running in a sandbox.
fn refuse_if_busy(slot: &Slot, operation: &str) -> Result<(), ManagerError> {
    let calls = slot.busy.load(Ordering::Acquire);
    if calls > 0 {
        return Err(ManagerError::WrongState {
            id: slot.id.clone(),
            state: "busy",
            what: format!(
                "{calls} call(s) are running in it; wait for them to finish (or kill their processes), then {operation}"
            ),
        });
    }
    Ok(())
}

impl Manager {
    /// Opens the manager over the registry: every sandbox recorded there is
    /// found again (paused ones stay paused and resumable) or marked failed
    /// with the reason.
    pub fn open(engine: Arc<dyn Engine>, registry: Registry, config: ManagerConfig) -> Result<Manager, ManagerError> {
        let manager = Manager {
            inner: Arc::new(Inner {
                engine,
                registry,
                config,
                slots: StdMutex::new(HashMap::new()),
                defaults: StdMutex::new(HashMap::new()),
                default_creation: StdMutex::new(HashMap::new()),
                admission: StdMutex::new(()),
            }),
        };
        for mut record in manager.inner.registry.load_live()? {
            let from = record.state;
            let mut machine = None;
            let failure = match record.state {
                SandboxState::Creating => Some("the server stopped while it was being created".to_string()),
                SandboxState::Running | SandboxState::Paused if record.engine != manager.inner.engine.name() => {
                    Some(format!(
                        "it was made by the {} engine, but this server runs the {} engine",
                        record.engine,
                        manager.inner.engine.name()
                    ))
                }
                SandboxState::Running | SandboxState::Paused => {
                    let spec = spec_of(&record);
                    let paused = record.state == SandboxState::Paused;
                    match manager.inner.engine.reattach(&spec, &record.engine_state, paused) {
                        Ok(m) => {
                            machine = Some(Arc::new(StdMutex::new(m)));
                            None
                        }
                        Err(e) => Some(format!("its VM was lost while the server was down ({e})")),
                    }
                }
                SandboxState::Failed | SandboxState::Deleted => None,
            };
            if let Some(reason) = failure {
                record.state = SandboxState::Failed;
                record.failure = Some(reason.clone());
                record.updated_ms = now_ms();
                manager.inner.registry.record_transition(&record, from, &format!("restart: {reason}"))?;
            }
            if record.is_default && record.state != SandboxState::Failed {
                lock(&manager.inner.defaults).insert(record.owner.clone(), record.id.clone());
            }
            let slot = Slot::new(record, machine);
            lock(&manager.inner.slots).insert(slot.id.clone(), slot);
        }
        Ok(manager)
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// The engine's note about forks.
    pub fn fork_note(&self) -> Option<&'static str> {
        self.inner.engine.fork_note()
    }

    /// The settings.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The registry (read-only uses, e.g. tests and diagnostics).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        let mut slots: Vec<_> = lock(&self.inner.slots).values().cloned().collect();
        slots.sort_by(|a, b| {
            let (ra, rb) = (a.record(), b.record());
            (ra.created_ms, &ra.id).cmp(&(rb.created_ms, &rb.id))
        });
        slots
    }

    /// The owner's sandboxes (not deleted) and its default sandbox id.
    pub fn list(&self, owner: &Owner) -> (Vec<SandboxInfo>, Option<String>) {
        let infos = self.slots().into_iter().filter(|s| owner.can_see(&s.owner)).map(|s| s.record().info()).collect();
        (infos, lock(&self.inner.defaults).get(&owner.id).cloned())
    }

    fn listing(&self, owner: &Owner) -> String {
        let (infos, _) = self.list(owner);
        if infos.is_empty() {
            return "This session has no sandboxes yet.".to_string();
        }
        let items: Vec<String> = infos
            .iter()
            .map(|i| match &i.name {
                Some(n) => format!("{} ({}, {})", i.sandbox_id, n, i.state.as_str()),
                None => format!("{} ({})", i.sandbox_id, i.state.as_str()),
            })
            .collect();
        format!("This session's sandboxes: {}.", items.join(", "))
    }

    fn find(&self, owner: &Owner, id: &str) -> Result<Arc<Slot>, ManagerError> {
        let slot = lock(&self.inner.slots).get(id).cloned();
        match slot {
            Some(s) if owner.can_see(&s.owner) => Ok(s),
            _ => Err(ManagerError::UnknownSandbox { id: id.to_string(), listing: self.listing(owner) }),
        }
    }

    /// Applies a transition: checks it, records it, then updates the snapshot.
    fn transition(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        to: SandboxState,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let from = inner.record.state;
        lifecycle::check(from, to).map_err(|source| ManagerError::Illegal { id: slot.id.clone(), source })?;
        let mut next = inner.record.clone();
        next.state = to;
        next.updated_ms = now_ms();
        next.paused_ms = (to == SandboxState::Paused).then_some(next.updated_ms);
        if to == SandboxState::Deleted {
            next.is_default = false;
        }
        if let Some(m) = &inner.machine {
            next.engine_state = lock(m).saved_state();
        }
        self.inner.registry.record_transition(&next, from, reason)?;
        inner.record = next.clone();
        *lock(&slot.snapshot) = next;
        tracing::info!(sandbox = %slot.id, from = from.as_str(), to = to.as_str(), reason, "sandbox transition");
        Ok(())
    }

    fn fail(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> ManagerError {
        inner.record.failure = Some(reason.to_string());
        if let Err(e) = self.transition(slot, inner, SandboxState::Failed, reason) {
            tracing::error!(sandbox = %slot.id, error = %e, "cannot record a failure");
        }
        if lock(&self.inner.defaults).get(&slot.owner) == Some(&slot.id) {
            lock(&self.inner.defaults).remove(&slot.owner);
            let _ = self.inner.registry.set_default(&slot.id, false);
        }
        ManagerError::Failed { id: slot.id.clone(), reason: reason.to_string() }
    }

    fn validate(&self, req: &CreateRequest) -> Result<MachineSpec, ManagerError> {
        let limits = &self.inner.config.limits;
        let vcpus = req.vcpus.unwrap_or(limits.default_vcpus);
        let memory_mib = req.memory_mib.unwrap_or(limits.default_memory_mib);
        let disk_mib = req.disk_mib.unwrap_or(limits.default_disk_mib);
        if vcpus == 0 {
            return Err(ManagerError::BadParameter("vcpus must be at least 1".into()));
        }
        let host = self.inner.engine.host_limits();
        if vcpus > host.max_vcpus {
            return Err(ManagerError::BadParameter(format!(
                "vcpus={vcpus} is more than this host can give one guest ({}): {}",
                host.max_vcpus,
                host.why.unwrap_or_default()
            )));
        }
        if vcpus > limits.max_vcpus {
            return Err(ManagerError::BadParameter(format!(
                "vcpus={vcpus} is over this server's limit of {} per sandbox; ask for {} or fewer",
                limits.max_vcpus, limits.max_vcpus
            )));
        }
        if memory_mib < 128 || memory_mib > limits.max_memory_mib {
            return Err(ManagerError::BadParameter(format!(
                "memory_mib={memory_mib} is out of range: use 128 to {} MiB",
                limits.max_memory_mib
            )));
        }
        if disk_mib < 64 || disk_mib > limits.max_disk_mib {
            return Err(ManagerError::BadParameter(format!(
                "disk_mib={disk_mib} is out of range: use 64 to {} MiB",
                limits.max_disk_mib
            )));
        }
        if let Some(name) = &req.name {
            if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
                return Err(ManagerError::BadParameter(format!(
                    "name must be 1 to {MAX_NAME_BYTES} bytes of printable text"
                )));
            }
        }
        if req.env.len() > MAX_ENV_VARS {
            return Err(ManagerError::BadParameter(format!("at most {MAX_ENV_VARS} environment variables")));
        }
        for key in req.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ManagerError::BadParameter(format!("environment variable name {key:?} is invalid")));
            }
        }
        let template = req.template.clone().unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        if template != DEFAULT_TEMPLATE {
            return Err(ManagerError::BadParameter(format!(
                "unknown template {template:?}; the templates are: {DEFAULT_TEMPLATE}"
            )));
        }
        Ok(MachineSpec { id: new_sandbox_id(), template, vcpus, memory_mib, disk_mib, env: req.env.clone() })
    }

    /// Checks the count and memory limits for `extra_count` new sandboxes holding `extra_mib`.
    fn check_capacity(&self, extra_count: usize, extra_mib: u64) -> Result<(), ManagerError> {
        let limits = &self.inner.config.limits;
        let records: Vec<SandboxRecord> = self.slots().iter().map(|s| s.record()).collect();
        let live = records.iter().filter(|r| r.is_live()).count();
        if live + extra_count > limits.max_sandboxes as usize {
            let paused = records.iter().filter(|r| r.state == SandboxState::Paused).count();
            return Err(ManagerError::Limit(format!(
                "this server allows at most {} sandboxes and {live} exist ({paused} paused). Delete ones you no longer need with kill_sandbox (list_sandboxes shows them). Sandboxes of ended sessions (HTTP sessions do not survive a server restart) are paused when idle and deleted after the retention period ({} s); a server started with --shared-sandboxes lists and can kill them sooner.",
                limits.max_sandboxes,
                self.inner.config.timers.retention.as_secs()
            )));
        }
        let used: u64 = records.iter().filter(|r| r.holds_memory()).map(|r| u64::from(r.memory_mib)).sum();
        if used + extra_mib > limits.memory_budget_mib {
            return Err(ManagerError::Limit(format!(
                "running sandboxes use {used} MiB of this server's {} MiB memory budget and this needs {extra_mib} MiB more. Pause another sandbox with pause or delete one with kill_sandbox, or ask for less memory_mib.",
                limits.memory_budget_mib
            )));
        }
        Ok(())
    }

    /// Checks the limits for one new sandbox and registers it, atomically with
    /// respect to other admissions (a `creating` record counts against them).
    fn admit(&self, slot: &Arc<Slot>, record: &SandboxRecord, reason: &str) -> Result<(), ManagerError> {
        let _admission = lock(&self.inner.admission);
        self.check_capacity(1, u64::from(record.memory_mib))?;
        self.inner.registry.insert(record, reason)?;
        lock(&self.inner.slots).insert(slot.id.clone(), slot.clone());
        Ok(())
    }

    /// Creates a sandbox for `owner`.
    pub async fn create(&self, owner: &Owner, req: CreateRequest) -> Result<SandboxInfo, ManagerError> {
        let (this, owner) = (self.clone(), owner.clone());
        detached(async move { this.create_now(&owner, req).await }).await
    }

    async fn create_now(&self, owner: &Owner, req: CreateRequest) -> Result<SandboxInfo, ManagerError> {
        let spec = self.validate(&req)?;
        let make_default = match req.make_default {
            Some(v) => v,
            None => !lock(&self.inner.defaults).contains_key(&owner.id),
        };
        let now = now_ms();
        let record = SandboxRecord {
            id: spec.id.clone(),
            owner: owner.id.clone(),
            name: req.name.clone(),
            state: SandboxState::Creating,
            template: spec.template.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            idle_timeout_ms: req
                .idle_timeout
                .unwrap_or(self.inner.config.timers.idle_pause_after)
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            env: spec.env.clone(),
            is_default: false,
            parent_id: None,
            created_ms: now,
            updated_ms: now,
            paused_ms: None,
            failure: None,
            engine: self.inner.engine.name().to_string(),
            engine_state: serde_json::Value::Null,
        };
        let slot = Slot::new(record, None);
        let mut inner = slot.inner.lock().await;
        self.admit(&slot, &inner.record, "create requested")?;
        let engine = self.inner.engine.clone();
        let spec2 = spec.clone();
        let created = tokio::task::spawn_blocking(move || engine.create(&spec2))
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
        match created {
            Ok(machine) => {
                inner.machine = Some(Arc::new(StdMutex::new(machine)));
                if let Err(e) = self.transition(&slot, &mut inner, SandboxState::Running, "started") {
                    self.abandon_new(&slot, &mut inner, &format!("its start could not be recorded ({e})")).await;
                    return Err(e);
                }
            }
            Err(e) => {
                let reason = format!("it could not start: {e}");
                let _ = self.fail(&slot, &mut inner, &reason);
                return Err(ManagerError::Engine(e));
            }
        }
        if make_default {
            self.set_default(owner, &slot, &mut inner)?;
        }
        slot.touch();
        Ok(inner.record.info())
    }

    /// A new sandbox whose start could not be recorded: its machine is killed
    /// and it is marked failed (if even that cannot be recorded, the timers
    /// retry once it is [`CREATING_ABANDONED_AFTER`] old).
    async fn abandon_new(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) {
        if let Some(machine) = inner.machine.take() {
            if let Err(e) = blocking(&machine, |m| m.kill()).await {
                tracing::warn!(sandbox = %slot.id, error = %e, "cannot kill the machine of an abandoned sandbox");
            }
        }
        let _ = self.fail(slot, inner, reason);
    }

    fn set_default(&self, owner: &Owner, slot: &Slot, inner: &mut SlotInner) -> Result<(), ManagerError> {
        let previous = lock(&self.inner.defaults).insert(owner.id.clone(), slot.id.clone());
        if let Some(prev) = previous.filter(|p| p != &slot.id) {
            self.inner.registry.set_default(&prev, false)?;
            if let Some(prev_slot) = lock(&self.inner.slots).get(&prev) {
                lock(&prev_slot.snapshot).is_default = false;
            }
        }
        self.inner.registry.set_default(&slot.id, true)?;
        inner.record.is_default = true;
        lock(&slot.snapshot).is_default = true;
        Ok(())
    }

    /// Resolves `id` (or the owner's default, created on first use when `create_default`).
    async fn resolve(&self, owner: &Owner, id: Option<&str>, create_default: bool) -> Result<Arc<Slot>, ManagerError> {
        if let Some(id) = id {
            return self.find(owner, id);
        }
        let creation = lock(&self.inner.default_creation).entry(owner.id.clone()).or_default().clone();
        let result = async {
            let _guard = creation.lock().await;
            let existing = lock(&self.inner.defaults).get(&owner.id).cloned();
            if let Some(id) = existing {
                return self.find(owner, &id);
            }
            if !create_default {
                return Err(ManagerError::WrongState {
                    id: "(default)".into(),
                    state: "absent",
                    what: "this session has no default sandbox yet; run_code or run_command creates it".into(),
                });
            }
            let info = self.create_now(owner, CreateRequest { make_default: Some(true), ..Default::default() }).await?;
            self.find(owner, &info.sandbox_id)
        }
        .await;
        // Forget the owner's creation lock once nobody holds it, so that the
        // map does not grow with every session the server has seen.
        drop(creation);
        let mut creations = lock(&self.inner.default_creation);
        if creations.get(&owner.id).is_some_and(|c| Arc::strong_count(c) == 1) {
            creations.remove(&owner.id);
        }
        result
    }

    /// How many owners the manager keeps bookkeeping for: (owners with a
    /// default sandbox, owners with a default-sandbox creation in progress).
    pub fn owner_entries(&self) -> (usize, usize) {
        (lock(&self.inner.defaults).len(), lock(&self.inner.default_creation).len())
    }

    /// Brings a sandbox to `running` (resuming it if paused) and connects to its agent.
    async fn ensure_running(&self, slot: &Slot, inner: &mut SlotInner) -> Result<AgentClient, ManagerError> {
        match inner.record.state {
            SandboxState::Running => {}
            SandboxState::Paused => self.resume_locked(slot, inner, "resumed by a call").await?,
            _ => return Err(unusable(slot, &inner.record, "it cannot take calls")),
        }
        self.on_machine(slot, inner, |m| m.connect(), "the guest crashed").await
    }

    async fn resume_locked(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> Result<(), ManagerError> {
        self.check_capacity(0, u64::from(inner.record.memory_mib))?;
        self.on_machine(slot, inner, |m| m.resume(), "the guest died while paused").await?;
        self.transition(slot, inner, SandboxState::Running, reason)
    }

    /// The sandbox's machine; a sandbox that has none is failed.
    fn machine_of(&self, slot: &Slot, inner: &mut SlotInner) -> Result<SharedMachine, ManagerError> {
        match inner.machine.clone() {
            Some(machine) => Ok(machine),
            None => Err(self.fail(slot, inner, "its machine is missing")),
        }
    }

    /// Runs one engine call on the sandbox's machine. A machine that is missing,
    /// or found dead by the call, fails the sandbox; `died` says what happened
    /// (the engine's reason is appended).
    async fn on_machine<T: Send + 'static>(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        op: impl FnOnce(&mut Box<dyn Machine>) -> Result<T, EngineError> + Send + 'static,
        died: &str,
    ) -> Result<T, ManagerError> {
        let machine = self.machine_of(slot, inner)?;
        match blocking(&machine, op).await {
            Ok(value) => Ok(value),
            Err(e) if e.kind() == ErrorKind::Lost => {
                Err(self.fail(slot, inner, &format!("{died} ({})", error_chain(&e))))
            }
            Err(e) => Err(ManagerError::Engine(e)),
        }
    }

    /// Holds a running sandbox for one call (default sandbox when `id` is `None`,
    /// created on first use; resumed when paused).
    pub async fn acquire(&self, owner: &Owner, id: Option<&str>) -> Result<Lease, ManagerError> {
        let (this, owner, id) = (self.clone(), owner.clone(), id.map(str::to_owned));
        detached(async move { this.acquire_now(&owner, id.as_deref()).await }).await
    }

    async fn acquire_now(&self, owner: &Owner, id: Option<&str>) -> Result<Lease, ManagerError> {
        let slot = self.resolve(owner, id, true).await?;
        let mut inner = slot.inner.lock().await;
        let client = self.ensure_running(&slot, &mut inner).await?;
        slot.busy.fetch_add(1, Ordering::AcqRel);
        slot.touch();
        Ok(Lease { id: slot.id.clone(), client, env: inner.record.env.clone(), slot: slot.clone() })
    }

    /// Called when a call lost its agent connection: marks the sandbox failed if
    /// its machine died, and returns the error to report.
    pub async fn agent_lost(&self, id: &str, detail: &str) -> ManagerError {
        let (this, id, detail) = (self.clone(), id.to_owned(), detail.to_owned());
        detached(async move { Ok(this.agent_lost_now(&id, &detail).await) }).await.unwrap_or_else(|e| e)
    }

    async fn agent_lost_now(&self, id: &str, detail: &str) -> ManagerError {
        let Some(slot) = lock(&self.inner.slots).get(id).cloned() else {
            return ManagerError::Failed { id: id.into(), reason: detail.into() };
        };
        let mut inner = slot.inner.lock().await;
        // A dying machine may still look alive for a moment after its connection broke.
        let alive = match inner.machine.clone() {
            Some(m) => {
                blocking(&m, |m| {
                    let deadline = std::time::Instant::now() + AGENT_LOSS_SETTLE;
                    loop {
                        let alive = m.check_alive();
                        if alive.is_err() || std::time::Instant::now() >= deadline {
                            return alive;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .await
            }
            None => Ok(()),
        };
        match alive {
            Err(why) => self.fail(&slot, &mut inner, &format!("the guest crashed ({})", error_chain(&why))),
            Ok(()) if inner.machine.is_none() => self.fail(&slot, &mut inner, "the guest crashed (no machine)"),
            Ok(()) => ManagerError::ConnectionLost { id: id.to_string(), detail: detail.to_string() },
        }
    }

    /// Pauses a sandbox (the default when `id` is `None`).
    pub async fn pause(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxInfo, ManagerError> {
        let (this, owner, id) = (self.clone(), owner.clone(), id.map(str::to_owned));
        detached(async move { this.pause_now(&owner, id.as_deref()).await }).await
    }

    async fn pause_now(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxInfo, ManagerError> {
        let slot = self.resolve(owner, id, false).await?;
        let mut inner = slot.inner.lock().await;
        match inner.record.state {
            SandboxState::Paused => return Ok(inner.record.info()),
            SandboxState::Running => {}
            _ => return Err(unusable(&slot, &inner.record, "it cannot be paused")),
        }
        refuse_if_busy(&slot, "pause")?;
        self.pause_locked(&slot, &mut inner, "paused on request").await?;
        Ok(inner.record.info())
    }

    async fn pause_locked(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> Result<(), ManagerError> {
        self.on_machine(slot, inner, |m| m.pause(), "the guest crashed").await?;
        self.transition(slot, inner, SandboxState::Paused, reason)
    }

    /// Resumes a sandbox (the default when `id` is `None`).
    pub async fn resume(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxInfo, ManagerError> {
        let (this, owner, id) = (self.clone(), owner.clone(), id.map(str::to_owned));
        detached(async move { this.resume_now(&owner, id.as_deref()).await }).await
    }

    async fn resume_now(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxInfo, ManagerError> {
        let slot = self.resolve(owner, id, false).await?;
        let mut inner = slot.inner.lock().await;
        self.ensure_running(&slot, &mut inner).await?;
        slot.touch();
        Ok(inner.record.info())
    }

    /// Forks a running or paused sandbox into `count` new running ones. Like
    /// pause, it is refused while calls run in the parent: taking the parent's
    /// state resets its guest connections, which would cut those calls off.
    pub async fn fork(
        &self,
        owner: &Owner,
        id: Option<&str>,
        count: u32,
    ) -> Result<(String, Vec<SandboxInfo>), ManagerError> {
        let (this, owner, id) = (self.clone(), owner.clone(), id.map(str::to_owned));
        detached(async move { this.fork_now(&owner, id.as_deref(), count).await }).await
    }

    async fn fork_now(
        &self,
        owner: &Owner,
        id: Option<&str>,
        count: u32,
    ) -> Result<(String, Vec<SandboxInfo>), ManagerError> {
        let max = capsule_tool_schemas::MAX_FORK_COUNT;
        if count == 0 || count > max {
            return Err(ManagerError::BadParameter(format!("count={count} is out of range: use 1 to {max}")));
        }
        let slot = self.resolve(owner, id, false).await?;
        let mut inner = slot.inner.lock().await;
        match inner.record.state {
            SandboxState::Running | SandboxState::Paused => {}
            _ => return Err(unusable(&slot, &inner.record, "it cannot be forked")),
        }
        refuse_if_busy(&slot, "fork")?;
        // All copies must fit; each is then admitted on its own as it is made.
        self.check_capacity(count as usize, u64::from(inner.record.memory_mib) * u64::from(count))?;
        let machine = self.machine_of(&slot, &mut inner)?;
        // Every child is recorded first; then all are made from one moment of the parent.
        let parent = inner.record.clone();
        let mut slots: Vec<Arc<Slot>> = Vec::new();
        for _ in 0..count {
            let now = now_ms();
            let record = SandboxRecord {
                id: new_sandbox_id(),
                owner: owner.id.clone(),
                name: parent.name.as_ref().map(|n| format!("{n} (fork)")).filter(|n| n.len() <= MAX_NAME_BYTES),
                state: SandboxState::Creating,
                is_default: false,
                parent_id: Some(parent.id.clone()),
                created_ms: now,
                updated_ms: now,
                paused_ms: None,
                failure: None,
                engine_state: serde_json::Value::Null,
                ..parent.clone()
            };
            let child = Slot::new(record, None);
            let admitted = {
                let child_inner = child.inner.lock().await;
                self.admit(&child, &child_inner.record, &format!("fork of {}", slot.id))
            };
            if let Err(e) = admitted {
                for earlier in &slots {
                    let mut earlier_inner = earlier.inner.lock().await;
                    let _ = self.fail(earlier, &mut earlier_inner, &format!("the fork was abandoned: {e}"));
                }
                return Err(e);
            }
            slots.push(child);
        }
        let specs: Vec<MachineSpec> = slots
            .iter()
            .map(|child| MachineSpec {
                id: child.id.clone(),
                template: parent.template.clone(),
                vcpus: parent.vcpus,
                memory_mib: parent.memory_mib,
                disk_mib: parent.disk_mib,
                env: parent.env.clone(),
            })
            .collect();
        // The children stay locked until they are recorded running or failed.
        let mut locked = Vec::with_capacity(slots.len());
        for child in &slots {
            locked.push(child.inner.lock().await);
        }
        let made = blocking(&machine, move |m| m.fork_many(&specs)).await;
        let mut children = Vec::new();
        let mut first_error = None;
        for ((child, mut child_inner), result) in slots.iter().zip(locked).zip(made) {
            match result {
                Ok(m) => {
                    child_inner.machine = Some(Arc::new(StdMutex::new(m)));
                    if let Err(e) = self.transition(child, &mut child_inner, SandboxState::Running, "forked") {
                        self.abandon_new(child, &mut child_inner, &format!("its start could not be recorded ({e})"))
                            .await;
                        first_error.get_or_insert(e);
                        continue;
                    }
                    child.touch();
                    children.push(child_inner.record.info());
                }
                Err(e) => {
                    let _ = self.fail(child, &mut child_inner, &format!("the fork could not start: {e}"));
                    first_error.get_or_insert(ManagerError::Engine(e));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        slot.touch();
        Ok((slot.id.clone(), children))
    }

    /// Deletes a sandbox for good.
    pub async fn kill(&self, owner: &Owner, id: &str) -> Result<SandboxInfo, ManagerError> {
        let (this, owner, id) = (self.clone(), owner.clone(), id.to_owned());
        detached(async move { this.kill_now(&owner, &id).await }).await
    }

    async fn kill_now(&self, owner: &Owner, id: &str) -> Result<SandboxInfo, ManagerError> {
        let slot = self.find(owner, id)?;
        let mut inner = slot.inner.lock().await;
        self.delete_locked(&slot, &mut inner, "killed on request").await?;
        Ok(inner.record.info())
    }

    async fn delete_locked(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> Result<(), ManagerError> {
        if inner.record.state == SandboxState::Deleted {
            return Ok(());
        }
        if let Some(machine) = inner.machine.take() {
            if let Err(e) = blocking(&machine, |m| m.kill()).await {
                tracing::warn!(sandbox = %slot.id, error = %e, "killing the machine failed; deleting the record anyway");
            }
        }
        self.transition(slot, inner, SandboxState::Deleted, reason)?;
        lock(&self.inner.slots).remove(&slot.id);
        let mut defaults = lock(&self.inner.defaults);
        if defaults.get(&slot.owner) == Some(&slot.id) {
            defaults.remove(&slot.owner);
        }
        Ok(())
    }

    /// One pass of the timers: pauses idle running sandboxes, deletes paused
    /// (and failed) ones past retention, fails abandoned `creating` ones.
    /// Returns how many it changed.
    pub async fn run_timers_once(&self) -> usize {
        let this = self.clone();
        detached(async move { Ok(this.run_timers_now().await) }).await.unwrap_or(0)
    }

    async fn run_timers_now(&self) -> usize {
        let now = now_ms();
        let retention_ms = self.inner.config.timers.retention.as_millis() as u64;
        let mut changed = 0;
        for slot in self.slots() {
            if slot.busy.load(Ordering::Acquire) > 0 {
                continue;
            }
            let Ok(mut inner) = slot.inner.try_lock() else { continue };
            let record = inner.record.clone();
            let idle_ms = now.saturating_sub(slot.last_used_ms.load(Ordering::Relaxed));
            let result = match record.state {
                SandboxState::Running
                    if idle_ms >= record.idle_timeout_ms && slot.busy.load(Ordering::Acquire) == 0 =>
                {
                    let reason = format!("idle for {} ms", idle_ms);
                    Some(self.pause_locked(&slot, &mut inner, &reason).await)
                }
                SandboxState::Paused
                    if now.saturating_sub(record.paused_ms.unwrap_or(record.updated_ms)) >= retention_ms =>
                {
                    Some(self.delete_locked(&slot, &mut inner, "retention period passed while paused").await)
                }
                SandboxState::Failed if now.saturating_sub(record.updated_ms) >= retention_ms => {
                    Some(self.delete_locked(&slot, &mut inner, "retention period passed while failed").await)
                }
                // Its lock is free, so nobody is creating it any more.
                SandboxState::Creating
                    if now.saturating_sub(record.created_ms) >= CREATING_ABANDONED_AFTER.as_millis() as u64 =>
                {
                    let reason = format!(
                        "its creation never finished (abandoned after {} s)",
                        CREATING_ABANDONED_AFTER.as_secs()
                    );
                    self.abandon_new(&slot, &mut inner, &reason).await;
                    Some(match inner.record.state {
                        SandboxState::Failed => Ok(()),
                        state => Err(ManagerError::WrongState {
                            id: slot.id.clone(),
                            state: state.as_str(),
                            what: "it was abandoned while creating, but its failure could not be recorded".into(),
                        }),
                    })
                }
                _ => None,
            };
            match result {
                Some(Ok(())) => changed += 1,
                Some(Err(e)) => tracing::warn!(sandbox = %slot.id, error = %e, "timer transition failed"),
                None => {}
            }
        }
        changed
    }

    /// Pauses every running sandbox (on server shutdown), so they survive a restart.
    pub async fn pause_all(&self) {
        let this = self.clone();
        let _ = detached(async move {
            this.pause_all_now().await;
            Ok(())
        })
        .await;
    }

    async fn pause_all_now(&self) {
        for slot in self.slots() {
            let mut inner = slot.inner.lock().await;
            if inner.record.state == SandboxState::Running {
                if let Err(e) = self.pause_locked(&slot, &mut inner, "server shutting down").await {
                    tracing::warn!(sandbox = %slot.id, error = %e, "cannot pause on shutdown");
                }
            }
        }
    }

    /// Deletes every sandbox of every owner.
    pub async fn kill_all(&self) {
        let this = self.clone();
        let _ = detached(async move {
            this.kill_all_now().await;
            Ok(())
        })
        .await;
    }

    async fn kill_all_now(&self) {
        for slot in self.slots() {
            let mut inner = slot.inner.lock().await;
            if let Err(e) = self.delete_locked(&slot, &mut inner, "server cleanup").await {
                tracing::warn!(sandbox = %slot.id, error = %e, "cannot delete");
            }
        }
    }

    /// Makes the idle timer see a sandbox as unused since `ms_ago` (tests and diagnostics).
    pub fn mark_idle_since(&self, id: &str, ms_ago: u64) {
        if let Some(slot) = lock(&self.inner.slots).get(id) {
            slot.last_used_ms.store(now_ms().saturating_sub(ms_ago), Ordering::Relaxed);
        }
    }
}

fn spec_of(r: &SandboxRecord) -> MachineSpec {
    MachineSpec {
        id: r.id.clone(),
        template: r.template.clone(),
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_mib: r.disk_mib,
        env: r.env.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_engine::TestEngine;

    #[tokio::test]
    async fn an_abandoned_creating_sandbox_is_failed_by_the_timers_and_frees_its_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No machine is ever started here, so the agent binary is never run.
        let engine = TestEngine::new(dir.path().join("no-agent"), dir.path().join("sandboxes")).expect("engine");
        let registry = Registry::open(dir.path()).expect("registry");
        let mut config = ManagerConfig::default();
        config.limits.max_sandboxes = 1;
        let manager = Manager::open(Arc::new(engine), registry, config).expect("manager");
        let spec = manager.validate(&CreateRequest::default()).expect("spec");
        let long_ago = now_ms() - CREATING_ABANDONED_AFTER.as_millis() as u64 - 1000;
        let record = SandboxRecord {
            id: spec.id.clone(),
            owner: "someone".into(),
            name: None,
            state: SandboxState::Creating,
            template: spec.template,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            idle_timeout_ms: 60_000,
            env: BTreeMap::new(),
            is_default: false,
            parent_id: None,
            created_ms: long_ago,
            updated_ms: long_ago,
            paused_ms: None,
            failure: None,
            engine: "test".into(),
            engine_state: serde_json::Value::Null,
        };
        // What a creation that went away leaves behind: admitted, never finished, unlocked.
        let slot = Slot::new(record, None);
        manager.admit(&slot, &slot.record(), "create requested").expect("admitted");
        assert!(matches!(manager.check_capacity(1, 0), Err(ManagerError::Limit(_))), "it holds the only place");

        assert_eq!(manager.run_timers_once().await, 1);
        let record = slot.record();
        assert_eq!(record.state, SandboxState::Failed);
        assert!(record.failure.as_deref().unwrap_or_default().contains("creation never finished"), "{record:?}");
        manager.check_capacity(1, 0).expect("its place is free again");

        // A fresh `creating` sandbox (one being made right now) is left alone.
        let mut fresh = slot.record();
        fresh.id = new_sandbox_id();
        fresh.state = SandboxState::Creating;
        fresh.created_ms = now_ms();
        let fresh_slot = Slot::new(fresh, None);
        manager.admit(&fresh_slot, &fresh_slot.record(), "create requested").expect("admitted");
        assert_eq!(manager.run_timers_once().await, 0);
        assert_eq!(fresh_slot.record().state, SandboxState::Creating);
    }
}
