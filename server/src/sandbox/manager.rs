//! The sandbox manager: every sandbox of this server, its machine and its state.
//!
//! - Transitions of one sandbox are serialized by that sandbox's async lock;
//!   each is checked by [`lifecycle::check`] and written to the registry before
//!   it is reported.
//! - Sandbox ids stay out of the model's way: an omitted id means the owner's
//!   default sandbox, created on first use; an unknown id gets an error that
//!   lists the owner's sandboxes; a paused sandbox resumes on any call.
//! - Limits (count, per-sandbox size, total memory of running sandboxes) are
//!   enforced by [`super::admission`] under one lock.
//! - Every public operation runs on its own task ([`Manager::detached`]): the
//!   engine call and the transition that records it complete together even when
//!   the caller goes away (a cancelled request, a dropped connection, an aborted
//!   timer), so the registry never says `running` while the VM is paused.
//! - Owners: an MCP session over HTTP is a new owner, and MCP sessions do not
//!   survive a server restart (by protocol), so after a restart or a session's
//!   end its sandboxes are orphans: nobody can name them, and the timers
//!   reclaim them like any other (idle pause, then deletion after the retention
//!   period). Owners that see all sandboxes may kill them meanwhile. Per-owner
//!   bookkeeping lives only as long as the owner has a default sandbox or a call
//!   resolving one.
//!
//! Its errors state facts; what a client should do about them is phrased by the
//! front end that reports them. Engine calls block, so they run on
//! `spawn_blocking`. This module never speaks MCP.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use capsule_agent::client::AgentClient;
use capsule_tool_schemas::DEFAULT_PIDS_MAX;
use capsule_vmm::worker::error_chain;
use tokio::sync::Mutex as AsyncMutex;

use super::admission::{self, CreateRequest};
pub use super::error::ManagerError;
use super::lifecycle;
use crate::config::{Limits, Timers};
use crate::engine::{Engine, EngineError, ErrorKind, Machine, MachineSpec};
use crate::network::{NetworkBroker, NetworkPolicy};
use crate::record::{SandboxRecord, SandboxState};
use crate::registry::{now_ms, Registry};

/// How long a machine whose agent connection broke may take to show it died.
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManagerConfig {
    /// Limits.
    pub limits: Limits,
    /// Timers.
    pub timers: Timers,
    /// The server's network policy: the ceiling of every sandbox's.
    pub network: NetworkPolicy,
}

pub(super) type SharedMachine = Arc<StdMutex<Box<dyn Machine>>>;

pub(super) struct SlotInner {
    pub(super) record: SandboxRecord,
    pub(super) machine: Option<SharedMachine>,
}

/// One sandbox: its record (changed only under `inner`'s lock) and its machine.
pub(super) struct Slot {
    pub(super) id: String,
    pub(super) owner: String,
    pub(super) inner: AsyncMutex<SlotInner>,
    /// A copy of the record, readable without waiting for a transition.
    snapshot: StdMutex<SandboxRecord>,
    pub(super) busy: AtomicUsize,
    pub(super) last_used_ms: AtomicU64,
    /// Something its owner has not been told yet (a roll-back while the server was down).
    notice: StdMutex<Option<String>>,
}

impl Slot {
    pub(super) fn new(record: SandboxRecord, machine: Option<SharedMachine>) -> Arc<Slot> {
        Arc::new(Slot {
            id: record.id.clone(),
            owner: record.owner.clone(),
            snapshot: StdMutex::new(record.clone()),
            last_used_ms: AtomicU64::new(now_ms()),
            busy: AtomicUsize::new(0),
            notice: StdMutex::new(None),
            inner: AsyncMutex::new(SlotInner { record, machine }),
        })
    }

    pub(super) fn record(&self) -> SandboxRecord {
        lock(&self.snapshot).clone()
    }

    pub(super) fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

pub(super) fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    pub env: std::collections::BTreeMap<String, String>,
    /// Most processes one command or context in it may run at once.
    pub pids_max: u32,
    /// When its agent counts as silent.
    pub liveness: crate::guest::LivenessTimings,
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

pub(super) struct Inner {
    pub(super) engine: Arc<dyn Engine>,
    pub(super) registry: Registry,
    pub(super) config: ManagerConfig,
    pub(super) slots: StdMutex<HashMap<String, Arc<Slot>>>,
    /// Owner → default sandbox id.
    defaults: StdMutex<HashMap<String, String>>,
    /// Owner → lock held while its default sandbox is being created.
    default_creation: StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Held while new sandboxes are checked against the limits and registered (or memory is
    /// reserved for a resume), so that concurrent requests cannot together pass a limit.
    pub(super) admission: StdMutex<()>,
    /// Memory reserved by resumes in progress, in MiB (their records still say paused).
    pub(super) reserved_mib: AtomicU64,
    /// The daemon's side of every sandbox's network channel (see [`super::network`]).
    pub(super) network: NetworkBroker,
}

/// The sandbox manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("engine", &self.inner.engine.name()).finish()
    }
}

/// Runs `f` on a sandbox's machine on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
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
/// cannot be done).
pub(super) fn unusable(slot: &Slot, record: &SandboxRecord, what: &str) -> ManagerError {
    match record.state {
        SandboxState::Failed => ManagerError::Failed {
            id: slot.id.clone(),
            reason: record.failure.clone().unwrap_or_else(|| "unknown".into()),
        },
        state => ManagerError::WrongState { id: slot.id.clone(), state: state.as_str(), what: what.into() },
    }
}

/// Refuses an operation that would cut off the calls running in a sandbox.
pub(super) fn refuse_if_busy(slot: &Slot, operation: &'static str) -> Result<(), ManagerError> {
    let calls = slot.busy.load(Ordering::Acquire);
    if calls > 0 {
        return Err(ManagerError::Busy { id: slot.id.clone(), calls, operation });
    }
    Ok(())
}

/// The machine spec of a recorded sandbox.
pub(super) fn spec_of(r: &SandboxRecord) -> MachineSpec {
    MachineSpec {
        id: r.id.clone(),
        template: r.template.clone(),
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_mib: r.disk_mib,
        env: r.env.clone(),
    }
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
                reserved_mib: AtomicU64::new(0),
                network: NetworkBroker::new(),
            }),
        };
        for record in manager.inner.registry.load_live()? {
            manager.recover(record)?;
        }
        Ok(manager)
    }

    /// Runs a manager operation on its own task and waits for it. The task runs
    /// to the end even if the caller's future is dropped, so an engine call and
    /// the transition recording it are never separated.
    pub(super) async fn detached<T, F>(&self, op: impl FnOnce(Manager) -> F) -> Result<T, ManagerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ManagerError>> + Send + 'static,
    {
        match tokio::spawn(op(self.clone())).await {
            Ok(result) => result,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Err(ManagerError::ShuttingDown),
        }
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

    /// The slot of sandbox `id`, whoever owns it.
    pub(super) fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        lock(&self.inner.slots).get(id).cloned()
    }

    /// Whether `owner` has a default sandbox.
    pub(super) fn has_default(&self, owner: &Owner) -> bool {
        lock(&self.inner.defaults).contains_key(&owner.id)
    }

    pub(super) fn slots(&self) -> Vec<Arc<Slot>> {
        let mut slots: Vec<_> = lock(&self.inner.slots).values().cloned().collect();
        slots.sort_by(|a, b| {
            let (ra, rb) = (a.record(), b.record());
            (ra.created_ms, &ra.id).cmp(&(rb.created_ms, &rb.id))
        });
        slots
    }

    /// The owner's sandboxes (not deleted) and its default sandbox id.
    pub fn list(&self, owner: &Owner) -> (Vec<SandboxRecord>, Option<String>) {
        let records = self.slots().into_iter().filter(|s| owner.can_see(&s.owner)).map(|s| s.record()).collect();
        (records, lock(&self.inner.defaults).get(&owner.id).cloned())
    }

    /// Whether any sandbox holds a running VM (or is being made).
    pub fn holds_running(&self) -> bool {
        self.slots().iter().any(|s| s.record().holds_memory())
    }

    /// Every sandbox with the host process that runs it, when it can be told without waiting
    /// for an operation in progress (for `capsule ps`).
    pub fn processes(&self) -> Vec<(SandboxRecord, Option<u32>)> {
        self.slots()
            .into_iter()
            .map(|slot| {
                let pid = slot.inner.try_lock().ok().and_then(|inner| {
                    inner.machine.as_ref().and_then(|m| m.try_lock().ok().and_then(|m| m.process_id()))
                });
                (slot.record(), pid)
            })
            .collect()
    }

    fn listing(&self, owner: &Owner) -> String {
        let (records, _) = self.list(owner);
        if records.is_empty() {
            return "This session has no sandboxes yet.".to_string();
        }
        let items: Vec<String> = records
            .iter()
            .map(|r| match &r.name {
                Some(n) => format!("{} ({}, {})", r.id, n, r.state.as_str()),
                None => format!("{} ({})", r.id, r.state.as_str()),
            })
            .collect();
        format!("This session's sandboxes: {}.", items.join(", "))
    }

    pub(super) fn find(&self, owner: &Owner, id: &str) -> Result<Arc<Slot>, ManagerError> {
        let slot = lock(&self.inner.slots).get(id).cloned();
        match slot {
            Some(s) if owner.can_see(&s.owner) => Ok(s),
            _ => Err(ManagerError::UnknownSandbox { id: id.to_string(), listing: self.listing(owner) }),
        }
    }

    /// Applies a transition: checks it, records it, then updates the snapshot.
    pub(super) fn transition(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        to: SandboxState,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let from = inner.record.state;
        lifecycle::check(from, to).map_err(|source| ManagerError::Illegal { id: slot.id.clone(), source })?;
        self.commit_state(slot, inner, to, reason)
    }

    /// Records `inner`'s sandbox in state `to` (checked by the caller) with its machine's
    /// current engine state, in the registry and the slot.
    pub(super) fn commit_state(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        to: SandboxState,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let from = inner.record.state;
        let mut next = inner.record.clone();
        next.state = to;
        next.updated_ms = now_ms();
        next.paused_ms = (to == SandboxState::Paused).then_some(next.updated_ms);
        if to == SandboxState::Deleted {
            next.is_default = false;
            self.inner.network.detach(&slot.id);
        }
        if let Some(m) = &inner.machine {
            next.engine_state = lock(m).saved_state();
        }
        self.inner.registry.record_transition(&next, from, reason)?;
        inner.record = next.clone();
        *lock(&slot.snapshot) = next;
        // Running on a new worker (an unresponsive sandbox that answers again keeps its own).
        if to == SandboxState::Running && from != SandboxState::Unresponsive {
            self.link_network(slot, inner);
        }
        tracing::info!(sandbox = %slot.id, from = from.as_str(), to = to.as_str(), reason, "sandbox transition");
        Ok(())
    }

    pub(super) fn fail(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> ManagerError {
        inner.record.failure = Some(reason.to_string());
        if let Err(e) = self.transition(slot, inner, SandboxState::Failed, reason) {
            tracing::error!(sandbox = %slot.id, error = %error_chain(&e), "cannot record a failure");
        }
        if lock(&self.inner.defaults).get(&slot.owner) == Some(&slot.id) {
            lock(&self.inner.defaults).remove(&slot.owner);
            let _ = self.inner.registry.set_default(&slot.id, false);
        }
        ManagerError::Failed { id: slot.id.clone(), reason: reason.to_string() }
    }

    /// Creates a sandbox for `owner`.
    pub async fn create(&self, owner: &Owner, req: CreateRequest) -> Result<SandboxRecord, ManagerError> {
        let owner = owner.clone();
        self.detached(|m| async move { m.create_owned(&owner, req).await }).await
    }

    /// [`Manager::create`], on the caller's task (which must be a detached one).
    async fn create_owned(&self, owner: &Owner, req: CreateRequest) -> Result<SandboxRecord, ManagerError> {
        let limits = &self.inner.config.limits;
        let mut spec = admission::validate(&req, limits, &self.inner.engine.host_limits())
            .map_err(|bad| ManagerError::BadParameter(bad.0))?;
        let saved_template = self.template_of(owner, &req, &mut spec)?;
        let settings = self.settings_of(&req, saved_template.as_ref())?;
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
            settings,
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
        let created = tokio::task::spawn_blocking(move || match saved_template {
            Some(template) => engine.create_from_template(&spec, &template.engine_state),
            None => engine.create(&spec),
        })
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
        match created {
            Ok(machine) => {
                inner.machine = Some(Arc::new(StdMutex::new(machine)));
                if let Err(e) = self.transition(&slot, &mut inner, SandboxState::Running, "started") {
                    let reason = format!("its start could not be recorded ({})", error_chain(&e));
                    self.abandon_new(&slot, &mut inner, &reason).await;
                    return Err(e);
                }
            }
            Err(e) => {
                let reason = format!("it could not start: {}", error_chain(&e));
                let _ = self.fail(&slot, &mut inner, &reason);
                return Err(ManagerError::Engine(e));
            }
        }
        if make_default {
            self.set_default(owner, &slot, &mut inner)?;
        }
        slot.touch();
        Ok(inner.record.clone())
    }

    /// A new sandbox whose start could not be recorded: its machine is killed
    /// and it is marked failed (if even that cannot be recorded, the timers
    /// retry once it is [`CREATING_ABANDONED_AFTER`] old).
    pub(super) async fn abandon_new(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) {
        if let Some(machine) = inner.machine.take() {
            if let Err(e) = blocking(&machine, |m| m.kill()).await {
                tracing::warn!(sandbox = %slot.id, error = %error_chain(&e), "cannot kill the machine of an abandoned sandbox");
            }
        }
        let _ = self.fail(slot, inner, reason);
    }

    pub(super) fn set_default(&self, owner: &Owner, slot: &Slot, inner: &mut SlotInner) -> Result<(), ManagerError> {
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
    pub(super) async fn resolve(
        &self,
        owner: &Owner,
        id: Option<&str>,
        create_default: bool,
    ) -> Result<Arc<Slot>, ManagerError> {
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
                return Err(ManagerError::NoDefault);
            }
            let record =
                self.create_owned(owner, CreateRequest { make_default: Some(true), ..Default::default() }).await?;
            self.find(owner, &record.id)
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
    pub(super) async fn ensure_running(&self, slot: &Slot, inner: &mut SlotInner) -> Result<AgentClient, ManagerError> {
        match inner.record.state {
            SandboxState::Running => {}
            SandboxState::Paused => self.resume_locked(slot, inner, "resumed by a call").await?,
            SandboxState::Unresponsive => return self.recheck_unresponsive(slot, inner).await,
            _ => return Err(unusable(slot, &inner.record, "it cannot take calls")),
        }
        self.on_machine(slot, inner, |m| m.connect(), "the guest crashed").await
    }

    async fn resume_locked(&self, slot: &Slot, inner: &mut SlotInner, reason: &str) -> Result<(), ManagerError> {
        // Held until the record says running, when it counts against the budget by itself.
        let _reservation = self.reserve_memory(u64::from(inner.record.memory_mib))?;
        self.on_machine(slot, inner, |m| m.resume(), "the guest died while paused").await?;
        self.transition(slot, inner, SandboxState::Running, reason)
    }

    /// The sandbox's machine; a sandbox that has none is failed.
    pub(super) fn machine_of(&self, slot: &Slot, inner: &mut SlotInner) -> Result<SharedMachine, ManagerError> {
        match inner.machine.clone() {
            Some(machine) => Ok(machine),
            None => Err(self.fail(slot, inner, "its machine is missing")),
        }
    }

    /// Runs one engine call on the sandbox's machine. A machine that is missing,
    /// or found lost by the call, fails the sandbox; `died` says what happened
    /// (the engine's reason is appended).
    pub(super) async fn on_machine<T: Send + 'static>(
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
                Err(self.lost(slot, inner, &machine, format!("{died} ({})", error_chain(&e))).await)
            }
            Err(e) => Err(ManagerError::Engine(e)),
        }
    }

    /// Registers a recovered sandbox's slot, with what its owner has not been told yet.
    pub(super) fn insert_recovered(
        &self,
        record: SandboxRecord,
        machine: Option<SharedMachine>,
        notice: Option<String>,
    ) {
        if record.is_default && record.state != SandboxState::Failed {
            lock(&self.inner.defaults).insert(record.owner.clone(), record.id.clone());
        }
        let running = record.state == SandboxState::Running;
        let slot = Slot::new(record, machine);
        *lock(&slot.notice) = notice;
        lock(&self.inner.slots).insert(slot.id.clone(), slot.clone());
        if running {
            // A live worker this daemon attached to: it waits for a daemon on its broker socket.
            if let Ok(inner) = slot.inner.try_lock() {
                self.link_network(&slot, &inner);
            }
        }
    }

    /// What the owner of sandbox `id` has not been told yet, if anything (taken: it is told once).
    pub fn take_notice(&self, id: &str) -> Option<String> {
        let slot = lock(&self.inner.slots).get(id).cloned()?;
        let notice = lock(&slot.notice).take();
        notice
    }

    /// Holds a running sandbox for one call (default sandbox when `id` is `None`,
    /// created on first use; resumed when paused).
    pub async fn acquire(&self, owner: &Owner, id: Option<&str>) -> Result<Lease, ManagerError> {
        let (owner, id) = (owner.clone(), id.map(str::to_owned));
        self.detached(|m| async move {
            let slot = m.resolve(&owner, id.as_deref(), true).await?;
            let mut inner = slot.inner.lock().await;
            let client = m.ensure_running(&slot, &mut inner).await?;
            slot.busy.fetch_add(1, Ordering::AcqRel);
            slot.touch();
            Ok(Lease {
                id: slot.id.clone(),
                client,
                env: inner.record.env.clone(),
                pids_max: inner.record.settings.pids_max.unwrap_or(DEFAULT_PIDS_MAX),
                liveness: m.inner.config.timers.liveness,
                slot: slot.clone(),
            })
        })
        .await
    }

    /// Pauses a sandbox (the default when `id` is `None`).
    pub async fn pause(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxRecord, ManagerError> {
        let (owner, id) = (owner.clone(), id.map(str::to_owned));
        self.detached(|m| async move {
            let slot = m.resolve(&owner, id.as_deref(), false).await?;
            let mut inner = slot.inner.lock().await;
            match inner.record.state {
                SandboxState::Paused => return Ok(inner.record.clone()),
                SandboxState::Running | SandboxState::Unresponsive => {}
                _ => return Err(unusable(&slot, &inner.record, "it cannot be paused")),
            }
            refuse_if_busy(&slot, "pause")?;
            m.pause_locked(&slot, &mut inner, "paused on request").await?;
            Ok(inner.record.clone())
        })
        .await
    }

    pub(super) async fn pause_locked(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        reason: &str,
    ) -> Result<(), ManagerError> {
        self.on_machine(slot, inner, |m| m.pause(), "the guest crashed").await?;
        self.transition(slot, inner, SandboxState::Paused, reason)
    }

    /// Resumes a sandbox (the default when `id` is `None`).
    pub async fn resume(&self, owner: &Owner, id: Option<&str>) -> Result<SandboxRecord, ManagerError> {
        let (owner, id) = (owner.clone(), id.map(str::to_owned));
        self.detached(|m| async move {
            let slot = m.resolve(&owner, id.as_deref(), false).await?;
            let mut inner = slot.inner.lock().await;
            m.ensure_running(&slot, &mut inner).await?;
            slot.touch();
            Ok(inner.record.clone())
        })
        .await
    }

    /// Deletes a sandbox for good.
    pub async fn kill(&self, owner: &Owner, id: &str) -> Result<SandboxRecord, ManagerError> {
        let (owner, id) = (owner.clone(), id.to_owned());
        self.detached(|m| async move {
            let slot = m.find(&owner, &id)?;
            let mut inner = slot.inner.lock().await;
            m.delete_locked(&slot, &mut inner, "killed on request").await?;
            Ok(inner.record.clone())
        })
        .await
    }

    pub(super) async fn delete_locked(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        reason: &str,
    ) -> Result<(), ManagerError> {
        if inner.record.state == SandboxState::Deleted {
            return Ok(());
        }
        match inner.machine.take() {
            Some(machine) => {
                if let Err(e) = blocking(&machine, |m| m.kill()).await {
                    tracing::warn!(sandbox = %slot.id, error = %error_chain(&e), "killing the machine failed; deleting the record anyway");
                }
            }
            // A failed sandbox: whatever it left behind goes too.
            None => {
                let (engine, id) = (self.inner.engine.clone(), slot.id.clone());
                let _ = tokio::task::spawn_blocking(move || engine.discard(&id)).await;
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

    /// Pauses every running sandbox (on server shutdown), so they survive a restart.
    pub async fn pause_all(&self) {
        let _ = self
            .detached(|m| async move {
                for slot in m.slots() {
                    let mut inner = slot.inner.lock().await;
                    if matches!(inner.record.state, SandboxState::Running | SandboxState::Unresponsive) {
                        if let Err(e) = m.pause_locked(&slot, &mut inner, "server shutting down").await {
                            tracing::warn!(sandbox = %slot.id, error = %error_chain(&e), "cannot pause on shutdown");
                        }
                    }
                }
                Ok(())
            })
            .await;
    }

    /// Deletes every sandbox of every owner.
    pub async fn kill_all(&self) {
        let _ = self
            .detached(|m| async move {
                for slot in m.slots() {
                    let mut inner = slot.inner.lock().await;
                    if let Err(e) = m.delete_locked(&slot, &mut inner, "server cleanup").await {
                        tracing::warn!(sandbox = %slot.id, error = %error_chain(&e), "cannot delete");
                    }
                }
                Ok(())
            })
            .await;
    }

    /// Makes the idle timer see a sandbox as unused since `ms_ago` (tests and diagnostics).
    pub fn mark_idle_since(&self, id: &str, ms_ago: u64) {
        if let Some(slot) = lock(&self.inner.slots).get(id) {
            slot.last_used_ms.store(now_ms().saturating_sub(ms_ago), Ordering::Relaxed);
        }
    }
}
