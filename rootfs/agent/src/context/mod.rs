//! Persistent language contexts behind `run_code`: named, long-lived Python,
//! JavaScript (node) and Bash interpreters, Jupyter-like.
//!
//! Owns the table of contexts, one interpreter process (its own process group
//! and cgroup, with the context's limits) per context, the rule that a context
//! runs one cell at a time, and what the client is told when an interpreter
//! has to be restarted (a timeout, a crash, or a limit of its cgroup). The drivers live in
//! [`driver`], processes in [`interpreter`], the cell wait loop in [`cell`].
//! It never applies output caps (the caller does, on the events it emits) and
//! never touches the protocol stream.

mod cell;
mod driver;
mod interpreter;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::budget::{Protection, MAX_CONTEXTS};
use crate::cancel::{CancelToken, StopReason};
use crate::cgroup::limits::{resolve_request, ResolvedLimits};
use crate::cgroup::{CgroupError, CgroupTree};
use crate::lock::lock;
use crate::protocol::{
    AgentError, CodeError, CodeOutcome, ContextInfo, ErrorKind, Event, Language, LimitHit, ProcessLimits,
    RunCodeRequest,
};

use cell::{Abort, CellReport, Ending, StartupFailure};
pub use cell::{INTERRUPT_GRACE, STARTUP_TIMEOUT};
pub use driver::DriverError;
use interpreter::Interpreter;
pub use interpreter::InterpreterError;

/// Longest context name, in characters.
pub const MAX_CONTEXT_NAME_CHARS: usize = 64;

/// The `name` of the [`CodeError`] emitted when a context's interpreter was lost.
pub const RESTART_ERROR_NAME: &str = "ContextRestarted";

/// Where contexts run and which interpreters they use.
#[derive(Debug, Clone)]
pub struct ContextsConfig {
    /// Working directory every interpreter starts in.
    pub work_dir: PathBuf,
    /// Directory for the agent's own files (the driver scripts go in `drivers/`).
    pub state_dir: PathBuf,
    /// The Python 3 interpreter.
    pub python: PathBuf,
    /// The node interpreter.
    pub node: PathBuf,
    /// The bash shell.
    pub bash: PathBuf,
    /// Where interpreters get their cgroups (`None`: no containment).
    pub cgroups: Option<Arc<CgroupTree>>,
    /// What the agent changed about itself that interpreters must not inherit.
    pub protection: Protection,
}

impl Default for ContextsConfig {
    fn default() -> Self {
        Self {
            work_dir: PathBuf::from("/"),
            state_dir: std::env::temp_dir().join("capsule-agent"),
            python: PathBuf::from("python3"),
            node: PathBuf::from("node"),
            bash: PathBuf::from("/bin/bash"),
            cgroups: None,
            protection: Protection::default(),
        }
    }
}

/// Errors of context operations (converted to [`AgentError`] at the API).
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The name breaks the naming rule.
    #[error("invalid context name {name:?}: a context name is 1 to {MAX_CONTEXT_NAME_CHARS} characters of A-Z, a-z, 0-9, '_', '.' and '-'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A cell's language does not match its context's.
    #[error("context {name:?} is a {has} context; a {asked} cell cannot run in it (use another context name)")]
    LanguageMismatch {
        /// The context.
        name: String,
        /// Its language.
        has: &'static str,
        /// The cell's language.
        asked: &'static str,
    },
    /// A bash cell contains a NUL byte, which bash cannot hold in a string.
    #[error("a bash cell cannot contain a NUL byte (found at byte {at})")]
    NulInBashCell {
        /// Where.
        at: usize,
    },
    /// No such context.
    #[error("no context named {name:?}")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The name is taken.
    #[error("a context named {name:?} already exists (language {language})")]
    AlreadyExists {
        /// The name.
        name: String,
        /// Its language.
        language: &'static str,
    },
    /// The context was removed while the request waited for it.
    #[error("context {name:?} was removed")]
    Removed {
        /// The name.
        name: String,
    },
    /// The agent is shutting down.
    #[error("the agent is shutting down; no new cells run")]
    ShuttingDown,
    /// The driver file could not be installed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The interpreter could not be started or talked to.
    #[error("the {language} interpreter of context {name:?} failed")]
    Interpreter {
        /// The context.
        name: String,
        /// Its language.
        language: &'static str,
        /// What went wrong.
        #[source]
        source: InterpreterError,
    },
    /// The interpreter exited before it was ready.
    #[error("the {language} interpreter of context {name:?} exited while starting ({status}): {stderr}")]
    StartupDied {
        /// The context.
        name: String,
        /// Its language.
        language: &'static str,
        /// How it exited.
        status: String,
        /// The start of its stderr.
        stderr: String,
    },
    /// The interpreter did not become ready in time.
    #[error("the {language} interpreter of context {name:?} did not start within {limit:?}")]
    StartupTooSlow {
        /// The context.
        name: String,
        /// Its language.
        language: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The request was cancelled.
    #[error("the request was cancelled")]
    Cancelled,
    /// The request's deadline passed before the operation could finish.
    #[error("the request timed out while {doing}")]
    Timeout {
        /// What it was doing.
        doing: &'static str,
    },
    /// As many contexts as the agent keeps exist.
    #[error("{MAX_CONTEXTS} contexts exist (the agent's cap); remove one before creating {name:?}")]
    TooMany {
        /// The context that was not created.
        name: String,
    },
    /// A request's limits are not acceptable (or cannot be enforced).
    #[error("{0}")]
    Limits(AgentError),
    /// A cell asked for other limits than its existing context has.
    #[error(
        "context {name:?} already exists with limits {has:?}; it keeps them for its life (remove it and create it \
         again to change them)"
    )]
    LimitsDiffer {
        /// The context.
        name: String,
        /// Its limits.
        has: ProcessLimits,
    },
    /// The interpreter's cgroup could not be made.
    #[error("cannot create the cgroup of context {name:?}")]
    Cgroup {
        /// The context.
        name: String,
        /// Why.
        #[source]
        source: CgroupError,
    },
}

impl ContextError {
    /// The protocol category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ContextError::InvalidName { .. }
            | ContextError::LanguageMismatch { .. }
            | ContextError::NulInBashCell { .. } => ErrorKind::InvalidArgument,
            ContextError::NotFound { .. } | ContextError::Removed { .. } => ErrorKind::NotFound,
            ContextError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            ContextError::ShuttingDown => ErrorKind::Unsupported,
            ContextError::Driver(_) | ContextError::Interpreter { .. } => ErrorKind::Io,
            ContextError::StartupDied { .. } | ContextError::StartupTooSlow { .. } => ErrorKind::Io,
            ContextError::Cancelled => ErrorKind::Cancelled,
            ContextError::Timeout { .. } => ErrorKind::Timeout,
            ContextError::TooMany { .. } => ErrorKind::Busy,
            ContextError::Limits(e) => e.kind,
            ContextError::LimitsDiffer { .. } => ErrorKind::InvalidArgument,
            ContextError::Cgroup { .. } => ErrorKind::Io,
        }
    }
}

impl From<ContextError> for AgentError {
    fn from(e: ContextError) -> Self {
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        AgentError { kind: e.kind(), message }
    }
}

/// Checks a context name against the naming rule.
pub fn validate_name(name: &str) -> Result<(), ContextError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_CONTEXT_NAME_CHARS
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ContextError::InvalidName { name: name.chars().take(MAX_CONTEXT_NAME_CHARS + 8).collect() })
    }
}

/// All contexts of one agent, shared by all connections.
#[derive(Debug)]
pub struct Contexts {
    config: ContextsConfig,
    table: Mutex<HashMap<String, Arc<Context>>>,
    shutting_down: std::sync::atomic::AtomicBool,
}

// One `Contexts` is shared by every connection's threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Contexts>();
};

/// One context: its interpreter (held while a cell runs) and its counters.
#[derive(Debug)]
struct Context {
    name: String,
    language: Language,
    /// The limits of its interpreter's cgroup, for its whole life.
    limits: Option<ResolvedLimits>,
    /// Whether a cell (or reset/remove) holds the context; cells queue on it.
    busy: Mutex<bool>,
    freed: Condvar,
    /// The interpreter; only the holder of `busy` touches it.
    slot: Mutex<Option<Interpreter>>,
    execution_count: AtomicU64,
    /// The interpreter's pid, 0 when none (for [`Contexts::list`] without waiting).
    pid: AtomicU32,
    /// An [`Abort`] for the running cell, set by reset/remove.
    abort: AtomicU8,
}

/// Holding a context: released (and the next waiter woken) on drop.
struct Held<'a> {
    context: &'a Context,
    slot: MutexGuard<'a, Option<Interpreter>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.context.busy);
        *busy = false;
        self.context.freed.notify_one();
    }
}

impl Context {
    fn new(name: &str, language: Language, limits: Option<ResolvedLimits>) -> Self {
        Self {
            name: name.to_string(),
            language,
            limits,
            busy: Mutex::new(false),
            freed: Condvar::new(),
            slot: Mutex::new(None),
            execution_count: AtomicU64::new(0),
            pid: AtomicU32::new(0),
            abort: AtomicU8::new(0),
        }
    }

    /// Waits until no cell runs here, bounded by `cancel`.
    fn hold(&self, cancel: &CancelToken) -> Result<Held<'_>, StopReason> {
        let mut busy = lock(&self.busy);
        while *busy {
            if let Some(reason) = cancel.stop_reason() {
                return Err(reason);
            }
            let slice = cancel.remaining().unwrap_or(cell::POLL_SLICE).min(cell::POLL_SLICE);
            busy = self.freed.wait_timeout(busy, slice).unwrap_or_else(|e| e.into_inner()).0;
        }
        *busy = true;
        drop(busy);
        Ok(Held { context: self, slot: lock(&self.slot) })
    }

    /// Ends the interpreter, if any.
    fn stop_interpreter(&self, slot: &mut Option<Interpreter>) {
        if let Some(mut interp) = slot.take() {
            interp.kill();
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    fn info(&self) -> ContextInfo {
        let pid = self.pid.load(Ordering::SeqCst);
        ContextInfo {
            name: self.name.clone(),
            language: self.language,
            execution_count: self.execution_count.load(Ordering::SeqCst),
            pid: (pid != 0).then_some(pid),
        }
    }
}

impl Contexts {
    /// An empty set of contexts.
    pub fn new(config: ContextsConfig) -> Self {
        Self { config, table: Mutex::new(HashMap::new()), shutting_down: Default::default() }
    }

    /// Runs one cell in context `req.context`, creating it on first use.
    ///
    /// Emits output chunks, rich results and errors in order. A cell that
    /// raises is still `Ok` (the exception came as [`Event::Error`]). On
    /// timeout the cell is interrupted and the outcome says `timed_out`; on
    /// cancel it is interrupted and the request fails with `Cancelled`.
    pub fn run_code(
        &self,
        req: &RunCodeRequest,
        cancel: &CancelToken,
        emit: &mut dyn FnMut(Event),
    ) -> Result<CodeOutcome, AgentError> {
        self.run_code_inner(req, cancel, emit).map_err(AgentError::from)
    }

    /// Creates a context (with `limits`, or the guest's defaults) and starts its interpreter.
    pub fn create(&self, name: &str, language: Language, limits: Option<&ProcessLimits>) -> Result<(), AgentError> {
        self.create_inner(name, language, limits).map_err(AgentError::from)
    }

    /// Restarts a context's interpreter, dropping its state (a running cell is killed).
    pub fn reset(&self, name: &str) -> Result<(), AgentError> {
        self.reset_inner(name).map_err(AgentError::from)
    }

    /// Stops and forgets a context (a running cell is killed).
    pub fn remove(&self, name: &str) -> Result<(), AgentError> {
        self.remove_inner(name).map_err(AgentError::from)
    }

    /// Every context, sorted by name. Never waits for running cells.
    pub fn list(&self) -> Vec<ContextInfo> {
        let mut out: Vec<ContextInfo> = lock(&self.table).values().map(|c| c.info()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Kills every interpreter (running cells end) and forgets all contexts.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all: Vec<Arc<Context>> = lock(&self.table).drain().map(|(_, c)| c).collect();
        for context in &all {
            Abort::Removed.store(&context.abort);
        }
        for context in all {
            if let Ok(mut held) = context.hold(&CancelToken::new()) {
                context.stop_interpreter(&mut held.slot);
            }
        }
    }

    fn check_running(&self) -> Result<(), ContextError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ContextError::ShuttingDown);
        }
        Ok(())
    }

    fn lookup(&self, name: &str) -> Result<Arc<Context>, ContextError> {
        validate_name(name)?;
        lock(&self.table).get(name).cloned().ok_or_else(|| ContextError::NotFound { name: name.to_string() })
    }

    /// The limits `asked` resolves to in this agent.
    fn resolve(&self, asked: Option<&ProcessLimits>) -> Result<Option<ResolvedLimits>, ContextError> {
        resolve_request(self.config.cgroups.as_ref().and_then(|t| t.policy()), asked).map_err(ContextError::Limits)
    }

    fn create_inner(&self, name: &str, language: Language, limits: Option<&ProcessLimits>) -> Result<(), ContextError> {
        validate_name(name)?;
        self.check_running()?;
        let limits = self.resolve(limits)?;
        let context = {
            let mut table = lock(&self.table);
            if let Some(existing) = table.get(name) {
                return Err(ContextError::AlreadyExists {
                    name: name.to_string(),
                    language: existing.language.as_str(),
                });
            }
            if table.len() >= MAX_CONTEXTS {
                return Err(ContextError::TooMany { name: name.to_string() });
            }
            let context = Arc::new(Context::new(name, language, limits));
            table.insert(name.to_string(), context.clone());
            context
        };
        // Start it now, so the first cell is fast and a missing interpreter shows here.
        let cancel = CancelToken::new();
        let mut held = context.hold(&cancel).map_err(|_| ContextError::Cancelled)?;
        if let Err(e) = self.ensure_interpreter(&context, &mut held.slot, &cancel) {
            drop(held);
            self.forget(&context);
            return Err(e);
        }
        Ok(())
    }

    /// Removes `context` from the table, unless the name now means another one.
    fn forget(&self, context: &Arc<Context>) {
        let mut table = lock(&self.table);
        if table.get(&context.name).is_some_and(|c| Arc::ptr_eq(c, context)) {
            table.remove(&context.name);
        }
    }

    fn reset_inner(&self, name: &str) -> Result<(), ContextError> {
        let context = self.lookup(name)?;
        Abort::Reset.store(&context.abort);
        let mut held = context.hold(&CancelToken::new()).map_err(|_| ContextError::Cancelled)?;
        context.abort.store(0, Ordering::SeqCst);
        context.stop_interpreter(&mut held.slot);
        context.execution_count.store(0, Ordering::SeqCst);
        // The fresh interpreter starts with the next cell.
        Ok(())
    }

    fn remove_inner(&self, name: &str) -> Result<(), ContextError> {
        validate_name(name)?;
        let context =
            lock(&self.table).remove(name).ok_or_else(|| ContextError::NotFound { name: name.to_string() })?;
        Abort::Removed.store(&context.abort);
        let mut held = context.hold(&CancelToken::new()).map_err(|_| ContextError::Cancelled)?;
        context.stop_interpreter(&mut held.slot);
        Ok(())
    }

    /// The context for a cell: the existing one (same language, same limits
    /// when the cell names some) or a new one.
    fn context_for(&self, req: &RunCodeRequest) -> Result<Arc<Context>, ContextError> {
        validate_name(&req.context)?;
        self.check_running()?;
        let limits = self.resolve(req.limits.as_ref())?;
        let mut table = lock(&self.table);
        if !table.contains_key(&req.context) && table.len() >= MAX_CONTEXTS {
            return Err(ContextError::TooMany { name: req.context.clone() });
        }
        let context = table
            .entry(req.context.clone())
            .or_insert_with(|| Arc::new(Context::new(&req.context, req.language, limits)))
            .clone();
        if req.limits.is_some() && context.limits != limits {
            return Err(ContextError::LimitsDiffer {
                name: req.context.clone(),
                has: context.limits.map(|l| l.as_request()).unwrap_or_default(),
            });
        }
        if context.language != req.language {
            return Err(ContextError::LanguageMismatch {
                name: req.context.clone(),
                has: context.language.as_str(),
                asked: req.language.as_str(),
            });
        }
        Ok(context)
    }

    /// Makes sure `slot` holds a live, ready interpreter. Returns whether a
    /// previous interpreter had died since the last cell (its state is lost).
    fn ensure_interpreter(
        &self,
        context: &Context,
        slot: &mut Option<Interpreter>,
        cancel: &CancelToken,
    ) -> Result<bool, ContextError> {
        let mut lost = false;
        if let Some(interp) = slot.as_mut() {
            if interp.try_exit().is_none() {
                return Ok(false);
            }
            lost = true;
            context.stop_interpreter(slot);
        }
        let language = context.language.as_str();
        let launch = driver::launch(&self.config, context.language)?;
        let cgroup = match &self.config.cgroups {
            Some(tree) => Some(
                tree.create("ctx", context.limits)
                    .map_err(|source| ContextError::Cgroup { name: context.name.clone(), source })?,
            ),
            None => None,
        };
        let mut interp =
            Interpreter::spawn(&launch, &self.config.work_dir, context.language, cgroup, self.config.protection)
                .map_err(|source| ContextError::Interpreter { name: context.name.clone(), language, source })?;
        match cell::wait_ready(&mut interp, cancel) {
            Ok(()) => {}
            Err(StartupFailure::Stopped(StopReason::Cancelled)) => return Err(ContextError::Cancelled),
            Err(StartupFailure::Stopped(StopReason::TimedOut)) => {
                return Err(ContextError::Timeout { doing: "starting the interpreter" })
            }
            Err(StartupFailure::TooSlow) => {
                return Err(ContextError::StartupTooSlow {
                    name: context.name.clone(),
                    language,
                    limit: STARTUP_TIMEOUT,
                })
            }
            Err(StartupFailure::Died { status, stderr }) => {
                return Err(ContextError::StartupDied {
                    name: context.name.clone(),
                    language,
                    status: status.to_string(),
                    stderr: stderr.trim().to_string(),
                })
            }
            Err(StartupFailure::Io(source)) => {
                return Err(ContextError::Interpreter { name: context.name.clone(), language, source })
            }
        }
        context.pid.store(interp.pid(), Ordering::SeqCst);
        *slot = Some(interp);
        Ok(lost)
    }

    fn run_code_inner(
        &self,
        req: &RunCodeRequest,
        cancel: &CancelToken,
        emit: &mut dyn FnMut(Event),
    ) -> Result<CodeOutcome, ContextError> {
        let started = Instant::now();
        if req.language == Language::Bash {
            if let Some(at) = req.code.bytes().position(|b| b == 0) {
                return Err(ContextError::NulInBashCell { at });
            }
        }
        let context = self.context_for(req)?;
        let mut held = match context.hold(cancel) {
            Ok(held) => held,
            Err(StopReason::Cancelled) => return Err(ContextError::Cancelled),
            Err(StopReason::TimedOut) => {
                let waited = format!("waiting for the previous cell of context {:?} to finish", context.name);
                return Ok(timed_out_before_running(&context, started, &waited, emit));
            }
        };
        if Abort::load(&context.abort) == Some(Abort::Removed) {
            return Err(ContextError::Removed { name: context.name.clone() });
        }
        let lost = match self.ensure_interpreter(&context, &mut held.slot, cancel) {
            Ok(lost) => lost,
            // A run_code timeout is an outcome, not a failure of the request.
            Err(ContextError::Timeout { doing }) => {
                return Ok(timed_out_before_running(&context, started, doing, emit))
            }
            Err(e) => {
                // A context whose interpreter never started is not kept.
                if context.execution_count.load(Ordering::SeqCst) == 0 {
                    drop(held);
                    self.forget(&context);
                }
                return Err(e);
            }
        };
        if lost {
            emit(Event::Error(restart_error(format!(
                "the {} interpreter of this context had exited since the last cell, so this cell runs in a fresh one: \
                 the context's earlier state ({}) was lost",
                context.language.as_str(),
                state_words(context.language)
            ))));
        }
        let count = context.execution_count.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(interp) = held.slot.as_mut() else {
            return Err(ContextError::Interpreter {
                name: context.name.clone(),
                language: context.language.as_str(),
                source: InterpreterError::Io {
                    doing: "starting",
                    source: std::io::Error::other("no interpreter after start"),
                },
            });
        };
        let ooms_before = interp.cgroup().map_or(0, |c| c.oom_kills());
        let report = cell::run(interp, &req.code, count, cancel, &context.abort, emit);
        // Read before the interpreter (and its cgroup) may be stopped below.
        let memory_hit = interp
            .cgroup()
            .filter(|c| c.oom_kills() > ooms_before)
            .and_then(|c| c.limits())
            .map(|l| LimitHit::Memory { max_bytes: l.memory_max_bytes });
        let report = match report {
            Ok(report) => report,
            Err(source) => {
                // The pipes or the driver broke: the interpreter is of no more use.
                context.stop_interpreter(&mut held.slot);
                emit(Event::Error(restart_error(format!(
                    "the {} interpreter of this context failed ({source}) and was stopped: the context's state was lost; \
                     the next cell starts a fresh interpreter",
                    context.language.as_str()
                ))));
                return Ok(CodeOutcome {
                    execution_count: count,
                    duration_us: micros(started),
                    timed_out: cancel.stop_reason() == Some(StopReason::TimedOut),
                    context_restarted: true,
                    exit_code: None,
                    limit: memory_hit,
                });
            }
        };
        let CellReport { ending, stop } = report;
        let mut outcome = CodeOutcome {
            execution_count: count,
            duration_us: 0,
            timed_out: stop == Some(StopReason::TimedOut),
            context_restarted: lost,
            exit_code: None,
            limit: memory_hit,
        };
        let language = context.language.as_str();
        match ending {
            Ending::Done { exit } => outcome.exit_code = exit,
            Ending::Died(status) => {
                context.stop_interpreter(&mut held.slot);
                outcome.context_restarted = true;
                if context.language == Language::Bash {
                    outcome.exit_code = status.code();
                }
                let how = match (memory_hit, status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                    (Some(LimitHit::Memory { max_bytes }), _, _) => format!(
                        "was killed by the out-of-memory killer at {} MiB (the context's memory limit)",
                        max_bytes / (1024 * 1024)
                    ),
                    (_, Some(code), _) => format!("exited with status {code}"),
                    (_, None, Some(signal)) => format!("was killed by signal {signal}"),
                    (_, None, None) => "ended".to_string(),
                };
                emit(Event::Error(restart_error(format!(
                    "the {language} interpreter {how} while running this cell: the context's state ({}) was lost; \
                     the next cell starts a fresh interpreter",
                    state_words(context.language)
                ))));
            }
            Ending::Killed => {
                context.stop_interpreter(&mut held.slot);
                outcome.context_restarted = true;
                let why = match stop {
                    Some(StopReason::Cancelled) => "the request was cancelled",
                    _ => "the request timed out",
                };
                emit(Event::Error(restart_error(format!(
                    "{why} and the cell did not stop within {} s of an interrupt (SIGINT), so the {language} \
                     interpreter was killed: the context's state ({}) was lost; the next cell starts a fresh \
                     interpreter",
                    INTERRUPT_GRACE.as_secs(),
                    state_words(context.language)
                ))));
            }
            Ending::Aborted(Abort::Removed) => {
                context.stop_interpreter(&mut held.slot);
                return Err(ContextError::Removed { name: context.name.clone() });
            }
            Ending::PidsLimit => {
                let max = context.limits.map_or(0, |l| l.pids_max);
                context.stop_interpreter(&mut held.slot);
                outcome.context_restarted = true;
                outcome.limit = Some(LimitHit::Pids { max });
                emit(Event::Error(restart_error(format!(
                    "the cell started more than {max} processes and threads (the context's pids limit), so the \
                     {language} interpreter and everything it started were killed: the context's state ({}) was \
                     lost; the next cell starts a fresh interpreter",
                    state_words(context.language)
                ))));
            }
            Ending::Aborted(Abort::Reset) => {
                context.stop_interpreter(&mut held.slot);
                outcome.context_restarted = true;
                emit(Event::Error(restart_error(format!(
                    "the context was reset while this cell ran: the {language} interpreter was killed and the \
                     context's state was lost"
                ))));
            }
        }
        outcome.duration_us = micros(started);
        drop(held);
        if stop == Some(StopReason::Cancelled) {
            return Err(ContextError::Cancelled);
        }
        Ok(outcome)
    }
}

impl Drop for Contexts {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The outcome of a cell whose request timed out before the cell could start.
fn timed_out_before_running(
    context: &Context,
    started: Instant,
    doing: &str,
    emit: &mut dyn FnMut(Event),
) -> CodeOutcome {
    emit(Event::Error(CodeError {
        name: "TimeoutError".to_string(),
        value: format!(
            "the cell did not run: the request timed out after {} ms while {doing}",
            started.elapsed().as_millis()
        ),
        traceback: Vec::new(),
    }));
    CodeOutcome {
        execution_count: context.execution_count.load(Ordering::SeqCst),
        duration_us: micros(started),
        timed_out: true,
        context_restarted: false,
        exit_code: None,
        limit: None,
    }
}

/// What a context of `language` loses with its interpreter, for messages.
fn state_words(language: Language) -> &'static str {
    match language {
        Language::Python => "variables, imports, definitions",
        Language::JavaScript => "variables, functions, required modules",
        Language::Bash => "variables, functions, working directory",
    }
}

fn restart_error(value: String) -> CodeError {
    CodeError { name: RESTART_ERROR_NAME.to_string(), value, traceback: Vec::new() }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}
