//! The agent's own budgets: how many threads, file descriptors, processes and
//! how much memory it keeps for itself, so that it always answers `Ping`
//! whatever the commands it runs do.
//!
//! Owns the numbers (every one a named constant with its unit), the
//! compile-time proofs that the caps on connections, requests, background
//! processes and contexts fit the fd and task budgets, and the one-time
//! self-protection at start ([`protect_self`]). It never counts live usage:
//! the caps are enforced where each thing is created (server, workers,
//! processes, contexts), and refused work fails with `ErrorKind::Busy`.

use std::io;

/// Connections served at once; more are refused at the handshake.
pub const MAX_CONNECTIONS: usize = 32;

/// Requests in flight at once across all connections (each holds one worker
/// thread); more are refused with `Busy`. `Ping` never needs one.
pub const MAX_REQUEST_WORKERS: usize = 128;

/// Background processes whose cgroup is still alive (each holds one thread).
pub const MAX_LIVE_BACKGROUND_PROCESSES: usize = 64;

/// Language contexts at once.
pub const MAX_CONTEXTS: usize = 32;

/// The agent's soft `RLIMIT_NOFILE` (raised at start, up to the hard limit).
pub const AGENT_OPEN_FILES_LIMIT: u64 = 8192;

/// The soft `RLIMIT_NOFILE` commands start with: the usual default, so a
/// program using `select(2)` never sees a descriptor past 1023.
pub const CHILD_OPEN_FILES_SOFT_LIMIT: u64 = 1024;

/// Descriptors the agent holds at worst: per connection (socket, its clone),
/// per request (a command's pipes, pidfd, cgroup files, overflow files), per
/// background process (pipes or terminal, input wake-up, pidfd, cgroup files,
/// output files), per context (five pipes, pidfd, cgroup files), plus a base
/// (listener, /dev/null, std streams, state files).
pub const WORST_CASE_OPEN_FILES: usize =
    64 + 4 * MAX_CONNECTIONS + 12 * MAX_REQUEST_WORKERS + 12 * MAX_LIVE_BACKGROUND_PROCESSES + 10 * MAX_CONTEXTS;
const _: () = assert!(WORST_CASE_OPEN_FILES as u64 <= AGENT_OPEN_FILES_LIMIT);

/// Tasks (threads and processes) of the agent at worst: PID 1, the server's
/// main thread, one reader per connection, every worker, one thread per
/// background process, and a few helpers.
pub const WORST_CASE_AGENT_TASKS: usize = 8 + MAX_CONNECTIONS + MAX_REQUEST_WORKERS + MAX_LIVE_BACKGROUND_PROCESSES;

/// Kernel threads a small guest runs (kworkers, ksoftirqd, rcu…), with room to grow.
pub const KERNEL_TASK_ALLOWANCE: usize = 128;

/// Pids kept out of the commands' reach: the sum of every command's and
/// context's processes stays below the kernel's `pid_max` and `threads-max`
/// by this many, so the agent can always start a thread.
pub const AGENT_TASK_RESERVE: u64 = 512;
const _: () = assert!((WORST_CASE_AGENT_TASKS + KERNEL_TASK_ALLOWANCE) as u64 <= AGENT_TASK_RESERVE);

/// Memory the kernel guarantees the agent's cgroup (`memory.min`): it is never
/// reclaimed from the agent to serve commands.
pub const AGENT_MEMORY_MIN_BYTES: u64 = 32 * 1024 * 1024;

/// Least memory kept out of the commands' reach for the kernel and the agent.
pub const MIN_RESERVED_MEMORY_BYTES: u64 = 96 * 1024 * 1024;

/// At least 1/this of the guest's memory is kept out of the commands' reach.
pub const RESERVED_MEMORY_DIVISOR: u64 = 16;

/// `cpu.weight` of the agent's cgroup (commands get the default 100), so it
/// still gets the CPU when a thousand processes want it.
pub const AGENT_CPU_WEIGHT: u32 = 1000;

/// The agent's `oom_score_adj` as PID 1 of a guest: the out-of-memory killer
/// never picks it. Commands start at 0.
pub const AGENT_OOM_SCORE_ADJ: i32 = -1000;

/// Errors of self-protection (each is logged; the agent runs on without it).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// Writing `/proc/self/oom_score_adj` failed.
    #[error("cannot set the agent's oom_score_adj to {AGENT_OOM_SCORE_ADJ}")]
    OomScore(#[source] io::Error),
    /// Raising `RLIMIT_NOFILE` failed.
    #[error("cannot raise the agent's open-files limit to {0}")]
    OpenFiles(u64, #[source] io::Error),
}

/// What self-protection changed, which commands must not inherit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protection {
    /// The agent's `oom_score_adj` is not 0: a child resets its own to 0.
    pub oom_score_adjusted: bool,
    /// The agent's soft open-files limit is above
    /// [`CHILD_OPEN_FILES_SOFT_LIMIT`]: a child lowers it again.
    pub open_files_raised: bool,
}

/// Protects the agent: its soft open-files limit goes up to
/// [`AGENT_OPEN_FILES_LIMIT`], and as PID 1 of a guest (`guest`) its
/// `oom_score_adj` goes to [`AGENT_OOM_SCORE_ADJ`] (inherited by the server
/// process PID 1 forks). Returns what changed, and the errors of the steps
/// that failed.
pub fn protect_self(guest: bool) -> (Protection, Vec<BudgetError>) {
    let mut errors = Vec::new();
    let mut protection = Protection::default();
    if guest {
        match std::fs::write("/proc/self/oom_score_adj", AGENT_OOM_SCORE_ADJ.to_string()) {
            Ok(()) => protection.oom_score_adjusted = true,
            Err(e) => errors.push(BudgetError::OomScore(e)),
        }
    } else {
        protection.oom_score_adjusted =
            std::fs::read_to_string("/proc/self/oom_score_adj").is_ok_and(|s| s.trim() != "0");
    }
    match raise_open_files() {
        Ok(soft) => protection.open_files_raised = soft > CHILD_OPEN_FILES_SOFT_LIMIT,
        Err(e) => errors.push(e),
    }
    (protection, errors)
}

/// Raises the soft open-files limit to [`AGENT_OPEN_FILES_LIMIT`] (or the
/// hard limit, when lower); returns the soft limit now in force.
fn raise_open_files() -> Result<u64, BudgetError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit into `limit`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(BudgetError::OpenFiles(AGENT_OPEN_FILES_LIMIT, io::Error::last_os_error()));
    }
    let wanted = AGENT_OPEN_FILES_LIMIT.min(limit.rlim_max);
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    limit.rlim_cur = wanted;
    // SAFETY: setrlimit(2) reads one valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(BudgetError::OpenFiles(wanted, io::Error::last_os_error()));
    }
    Ok(wanted)
}
