//! The agent's cgroup v2 tree and the one cgroup of each workload.
//!
//! Layout under the cgroup root (`/sys/fs/cgroup` in a guest; a test-owned
//! directory on a host):
//!
//! ```text
//! <root>/agent/        PID 1 and the server: memory.min, a high cpu.weight
//! <root>/workloads/    memory.max and pids.max for all commands together
//!     exec-<n>/        one per Exec: pids.max, memory.max, memory.high
//!     ctx-<n>/         one per context interpreter (per start)
//! ```
//!
//! Owns setting that tree up ([`CgroupTree::establish`], idempotent: PID 1
//! runs it before it forks the server, the server again), creating a
//! workload's cgroup with its limits ([`CgroupTree::create`]), and what is
//! asked of one ([`Cgroup`]): its directory fd for `clone3(CLONE_INTO_CGROUP)`,
//! its event counters, `cgroup.kill`, and its removal once empty. It never
//! spawns or reaps a process, and never decides when to kill: that is
//! [`crate::process`] and [`crate::context`].
//!
//! Containment protects the agent from runaway workloads (fork bombs, memory
//! hogs, escaped children). Commands run as root and can still leave their
//! cgroup on purpose (writing another `cgroup.procs`); the freeze hook
//! documented in [`crate::protocol`] relies on exactly that freedom.

pub mod events;
pub mod limits;

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::budget::{AGENT_CPU_WEIGHT, AGENT_MEMORY_MIN_BYTES};
use crate::lock::lock;
use crate::protocol::LimitHit;

use events::{EventsError, MAX_CGROUP_FILE_BYTES};
use limits::{LimitError, LimitPolicy, ResolvedLimits};

/// The agent's own cgroup, under the root.
pub const AGENT_CGROUP: &str = "agent";
/// The parent of every workload's cgroup, under the root.
pub const WORKLOADS_CGROUP: &str = "workloads";
/// How long a killed cgroup may take to empty before it is left for later removal.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// `statfs` magic of a cgroup2 mount (`CGROUP2_SUPER_MAGIC`, uapi `linux/magic.h`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Most bytes of `cgroup.procs` read (about 100 000 pids).
const MAX_PROCS_READ_BYTES: u64 = 1024 * 1024;
/// Deepest nesting below a workload's cgroup that removal descends into.
const MAX_REMOVE_DEPTH: usize = 16;
/// Controllers the agent uses, in the order it enables them.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Errors of the cgroup tree.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The root is not on a cgroup v2 mount.
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 {
        /// The root given.
        path: PathBuf,
    },
    /// The kernel lacks `cgroup.kill` (Linux 5.14+).
    #[error("{path} has no cgroup.kill (Linux 5.14 or later is needed)")]
    NoKill {
        /// The cgroup checked.
        path: PathBuf,
    },
    /// A cgroup file or directory operation failed.
    #[error("cannot {doing} {path}")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A cgroup file held something the agent cannot read.
    #[error("unexpected content in {path}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: EventsError,
    },
    /// The guest's size could not be read from `/proc`.
    #[error("cannot read the guest's {what} from /proc")]
    GuestSize {
        /// Which number.
        what: &'static str,
    },
    /// The guest is too small for the limits policy.
    #[error(transparent)]
    Policy(#[from] LimitError),
}

fn io_err<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { doing, path: path.to_owned(), source }
}

/// Reads a cgroup file of at most [`MAX_CGROUP_FILE_BYTES`] (one more byte is
/// read so that an oversized one is seen as such).
fn read_small(path: &Path) -> Result<Vec<u8>, CgroupError> {
    let mut out = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_CGROUP_FILE_BYTES as u64 + 1).read_to_end(&mut out))
        .map_err(io_err("read", path))?;
    Ok(out)
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("write", path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("create", path)(e)),
        _ => Ok(()),
    }
}

/// The controllers named in a `cgroup.controllers` or `cgroup.subtree_control` file.
fn controllers(path: &Path) -> Result<Vec<String>, CgroupError> {
    let text = read_small(path)?;
    Ok(String::from_utf8_lossy(&text).split_whitespace().map(str::to_owned).collect())
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `fs` is valid for writes; both outlive the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut fs) };
    rc == 0 && fs.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// A number from a `/proc` file: the first decimal field (of `key` in meminfo, in KiB).
fn proc_number(path: &str, key: Option<&str>, what: &'static str) -> Result<u64, CgroupError> {
    let text = std::fs::read_to_string(path).map_err(|_| CgroupError::GuestSize { what })?;
    let line = match key {
        Some(key) => text.lines().find(|l| l.starts_with(key)),
        None => text.lines().next(),
    };
    let number = line.and_then(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()));
    number.ok_or(CgroupError::GuestSize { what })
}

/// The agent's cgroup tree (one per agent).
#[derive(Debug)]
pub struct CgroupTree {
    workloads: PathBuf,
    policy: Option<LimitPolicy>,
    /// Why limits are off, when they are.
    no_limits_reason: Option<String>,
    next: AtomicU64,
    /// Workload cgroups that did not empty in time, removed later.
    lingering: Arc<Mutex<Vec<PathBuf>>>,
}

impl CgroupTree {
    /// Sets up `root/agent` (and moves the calling process into it),
    /// `root/workloads` with the controllers and the guest-wide limits, and
    /// removes workload cgroups a previous server left (killing what runs
    /// there: nothing can reach those processes any more). Idempotent.
    /// Fails when `root` is not cgroup v2 or lacks `cgroup.kill`; missing
    /// controllers only turn limits off ([`Self::policy`] is `None`).
    pub fn establish(root: &Path) -> Result<CgroupTree, CgroupError> {
        if !is_cgroup2(root) {
            return Err(CgroupError::NotCgroup2 { path: root.to_owned() });
        }
        let agent = root.join(AGENT_CGROUP);
        mkdir(&agent)?;
        if !agent.join("cgroup.kill").exists() {
            return Err(CgroupError::NoKill { path: agent });
        }
        // First out of the root: a non-root cgroup with processes cannot enable controllers.
        write_file(&agent.join("cgroup.procs"), "0")?;
        let available = controllers(&root.join("cgroup.controllers"))?;
        let mut problems = Vec::new();
        for c in CONTROLLERS.iter().filter(|c| available.iter().any(|a| a == *c)) {
            if let Err(e) = write_file(&root.join("cgroup.subtree_control"), &format!("+{c}")) {
                problems.push(format!("enabling {c}: {}", chain(&e)));
            }
        }
        let workloads = root.join(WORKLOADS_CGROUP);
        mkdir(&workloads)?;
        let at_root = controllers(&root.join("cgroup.subtree_control"))?;
        for c in CONTROLLERS.iter().filter(|c| at_root.iter().any(|a| a == *c)) {
            if let Err(e) = write_file(&workloads.join("cgroup.subtree_control"), &format!("+{c}")) {
                problems.push(format!("enabling {c} for workloads: {}", chain(&e)));
            }
        }
        let enabled = controllers(&workloads.join("cgroup.subtree_control"))?;
        let has = |c: &str| enabled.iter().any(|e| e == c);
        if has("memory") {
            if let Err(e) = write_file(&agent.join("memory.min"), &AGENT_MEMORY_MIN_BYTES.to_string()) {
                problems.push(chain(&e));
            }
        }
        if has("cpu") {
            if let Err(e) = write_file(&agent.join("cpu.weight"), &AGENT_CPU_WEIGHT.to_string()) {
                problems.push(chain(&e));
            }
        }
        for problem in &problems {
            eprintln!("capsule-agent: cgroups: {problem}");
        }
        let (policy, no_limits_reason) = if has("memory") && has("pids") {
            let memory_bytes = proc_number("/proc/meminfo", Some("MemTotal:"), "memory size")?.saturating_mul(1024);
            let pid_max = proc_number("/proc/sys/kernel/pid_max", None, "pid_max")?;
            let threads_max = proc_number("/proc/sys/kernel/threads-max", None, "threads-max")?;
            let policy = LimitPolicy::for_guest(memory_bytes, pid_max, threads_max)?;
            write_file(&workloads.join("memory.max"), &policy.memory_ceiling_bytes.to_string())?;
            write_file(&workloads.join("pids.max"), &policy.pids_ceiling.to_string())?;
            (Some(policy), None)
        } else {
            let reason = format!(
                "the pids and memory controllers are not available under {} (available: {:?})",
                root.display(),
                available
            );
            (None, Some(reason))
        };
        let tree =
            CgroupTree { workloads, policy, no_limits_reason, next: AtomicU64::new(1), lingering: Arc::default() };
        tree.remove_stale();
        Ok(tree)
    }

    /// The limits policy, when the pids and memory controllers are on.
    pub fn policy(&self) -> Option<&LimitPolicy> {
        self.policy.as_ref()
    }

    /// Why limits are off (for logs and error messages), when they are.
    pub fn no_limits_reason(&self) -> Option<&str> {
        self.no_limits_reason.as_deref()
    }

    /// Kills and removes every cgroup under `workloads/` (a previous server's).
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.workloads) else { return };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let path = entry.path();
                eprintln!("capsule-agent: removing a previous server's cgroup {}", path.display());
                if !kill_and_remove(&path) {
                    lock(&self.lingering).push(path);
                }
            }
        }
    }

    /// Creates a workload's cgroup named `<prefix>-<n>`, with `limits` when
    /// the controllers are on (pass `None` otherwise).
    pub fn create(&self, prefix: &str, limits: Option<ResolvedLimits>) -> Result<Cgroup, CgroupError> {
        lock(&self.lingering).retain(|path| !remove_empty_tree(path, 0));
        let path = self.workloads.join(format!("{prefix}-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        let made = Self::configure(&path, limits);
        if made.is_err() {
            let _ = std::fs::remove_dir(&path);
        }
        let (dir, events) = made?;
        let (pids_events, memory_events) = events.unzip();
        Ok(Cgroup { path, dir, pids_events, memory_events, limits, lingering: Arc::clone(&self.lingering) })
    }

    /// Writes the limits and opens what is kept open: the directory, and with
    /// limits `pids.events` and `memory.events`.
    fn configure(path: &Path, limits: Option<ResolvedLimits>) -> Result<(OwnedFd, Option<(File, File)>), CgroupError> {
        let mut events = None;
        if let Some(l) = limits {
            write_file(&path.join("pids.max"), &l.pids_max.to_string())?;
            write_file(&path.join("memory.max"), &l.memory_max_bytes.to_string())?;
            write_file(&path.join("memory.high"), &l.memory_high_bytes.to_string())?;
            let open = |name: &str| {
                let file = path.join(name);
                File::open(&file).map_err(io_err("open", &file))
            };
            events = Some((open("pids.events")?, open("memory.events")?));
        }
        let dir = File::open(path).map_err(io_err("open", path))?;
        Ok((OwnedFd::from(dir), events))
    }
}

/// Kills everything in the cgroup at `path` (and below), waits up to
/// [`KILL_WAIT`] for it to empty, and removes it; whether it is gone.
fn kill_and_remove(path: &Path) -> bool {
    let _ = write_file(&path.join("cgroup.kill"), "1");
    wait_empty(path, KILL_WAIT);
    remove_empty_tree(path, 0)
}

/// Removes an empty cgroup and its empty descendants; whether it is gone.
/// One `rmdir` when it has no child cgroups (the usual case).
fn remove_empty_tree(path: &Path, depth: usize) -> bool {
    let rmdir = || match std::fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    if rmdir() {
        return true;
    }
    if depth >= MAX_REMOVE_DEPTH {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(path) else { return false };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_tree(&entry.path(), depth + 1);
        }
    }
    rmdir()
}

/// Waits until `cgroup.events` of `path` says unpopulated, up to `limit`
/// (woken by the kernel's notification on the file); whether it emptied.
fn wait_empty(path: &Path, limit: Duration) -> bool {
    let events_path = path.join("cgroup.events");
    let Ok(file) = File::open(&events_path) else {
        return true; // the cgroup is gone
    };
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; MAX_CGROUP_FILE_BYTES];
    loop {
        // Reading re-arms the notification, so nothing is missed between read and poll.
        let populated = match file.read_at(&mut buf, 0) {
            Ok(n) => events::parse_cgroup_events(&buf[..n]).map(|e| e.populated).unwrap_or(true),
            Err(_) => return true,
        };
        if !populated {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        poll_priority(file.as_fd(), left);
    }
}

/// Waits up to `limit` for a kernfs notification (`POLLPRI`) on `fd`.
pub(crate) fn poll_priority(fd: BorrowedFd<'_>, limit: Duration) {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLPRI, revents: 0 };
    let millis = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, millis) };
}

fn chain(e: &CgroupError) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// One workload's cgroup. Dropping it kills what is left in it and removes it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    dir: OwnedFd,
    /// `pids.events`, kept open to be polled (`POLLPRI`) for a fork refused at the limit.
    pids_events: Option<File>,
    /// `memory.events`, kept open: one `pread` per look.
    memory_events: Option<File>,
    limits: Option<ResolvedLimits>,
    lingering: Arc<Mutex<Vec<PathBuf>>>,
}

impl Cgroup {
    /// Its directory, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits written into it (`None` without the controllers).
    pub fn limits(&self) -> Option<ResolvedLimits> {
        self.limits
    }

    /// `pids.events`, to poll for `POLLPRI`: it fires when a fork fails at
    /// `pids.max` (then [`Self::pids_limit_hit`] re-arms it).
    pub fn pids_events_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pids_events.as_ref().map(|f| f.as_fd())
    }

    /// Whether a fork in this cgroup failed at its `pids.max`. Reading re-arms
    /// the notification on [`Self::pids_events_fd`].
    pub fn pids_limit_hit(&self) -> bool {
        let Some(file) = &self.pids_events else { return false };
        let mut buf = [0u8; MAX_CGROUP_FILE_BYTES];
        match file.read_at(&mut buf, 0) {
            Ok(n) => events::parse_pids_events(&buf[..n]).is_ok_and(|hits| hits > 0),
            Err(_) => false,
        }
    }

    /// How many of its processes the out-of-memory killer killed.
    pub fn oom_kills(&self) -> u64 {
        let Some(file) = &self.memory_events else { return 0 };
        let mut buf = [0u8; MAX_CGROUP_FILE_BYTES];
        match file.read_at(&mut buf, 0) {
            Ok(n) => events::parse_oom_kills(&buf[..n]).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// The limit this cgroup hit, if any: the pids limit first (the agent
    /// stops a cgroup at it), then an out-of-memory kill.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        let limits = self.limits?;
        if self.pids_limit_hit() {
            return Some(LimitHit::Pids { max: limits.pids_max });
        }
        (self.oom_kills() > 0).then_some(LimitHit::Memory { max_bytes: limits.memory_max_bytes })
    }

    /// The pids of its live processes (thread-group leaders), up to about 100 000.
    pub fn pids(&self) -> Vec<u32> {
        let mut text = Vec::new();
        let path = self.path.join("cgroup.procs");
        if File::open(&path).and_then(|f| f.take(MAX_PROCS_READ_BYTES).read_to_end(&mut text)).is_err() {
            return Vec::new();
        }
        // A read cut at the cap may end in half a pid: drop the last partial line.
        if text.len() as u64 == MAX_PROCS_READ_BYTES {
            let end = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            text.truncate(end);
        }
        let mut pids = Vec::new();
        let _ = events::for_each_pid(&text, |p| pids.push(p));
        pids
    }

    /// Whether any live process is in it.
    pub fn populated(&self) -> bool {
        read_small(&self.path.join("cgroup.events"))
            .ok()
            .and_then(|t| events::parse_cgroup_events(&t).ok())
            .is_none_or(|e| e.populated)
    }

    /// Kills every process in it at once (`cgroup.kill`; forks racing with it die too).
    pub fn kill(&self) -> Result<(), CgroupError> {
        write_file(&self.path.join("cgroup.kill"), "1")
    }

    /// Waits up to `limit` for it to be empty; whether it is.
    pub fn wait_empty(&self, limit: Duration) -> bool {
        wait_empty(&self.path, limit)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if remove_empty_tree(&self.path, 0) {
            return;
        }
        if !kill_and_remove(&self.path) {
            eprintln!(
                "capsule-agent: cgroup {} did not empty in {KILL_WAIT:?}; removing it later",
                self.path.display()
            );
            lock(&self.lingering).push(self.path.clone());
        }
    }
}
