//! Commands the agent runs (`Op::Exec`): their table, signals, and the input
//! and output of background ones.
//!
//! Every command runs in its own cgroup under the agent's `workloads/` (see
//! [`crate::cgroup`]; when the agent has none, in its own process group
//! only), born there by `clone3(CLONE_INTO_CGROUP)`, and in its own process
//! group (or terminal session). A timeout, a cancel, the pids limit or
//! `Signal` 9 kill the whole cgroup with `cgroup.kill`, so processes that left
//! the process group die too. Each child is reaped by pid: a foreground one
//! by its request's poll loop ([`foreground`]), a background one by its own
//! thread ([`background`]). This module never calls `waitpid(-1)`, so it
//! cannot steal the exit status of children other modules (language
//! contexts) wait for. Orphans are reaped by PID 1 (see [`crate::init`]).
//!
//! - Foreground: stdout/stderr stream as ordered chunks through a
//!   [`crate::output::CappedOutput`]; when the leader exits, what is left in
//!   its cgroup is killed and counted ([`ExitStatus::escaped_killed`]).
//! - Background: output goes to two files per process under
//!   `<state dir>/processes/`, each a [`crate::output::CappedFile`] of at most
//!   [`MAX_BACKGROUND_OUTPUT_FILE_BYTES`]; the host reads it by offsets.
//!   Input queued by [`Processes::write_input`] goes to its stdin pipe or
//!   terminal. Its cgroup outlives the leader until it is empty or killed.
//!   Finished processes are remembered (with their files) up to
//!   [`MAX_FINISHED_PROCESSES`] and [`MAX_FINISHED_OUTPUT_BYTES`], oldest
//!   forgotten first.
//!
//! A process group is only ever signalled while its leader is unreaped (a
//! zombie still holds the pid), so a pid the kernel reused is never hit.
//!
//! Processes belong to the agent, not to a connection: a dropped connection
//! cancels foreground requests but never touches background processes, and
//! nothing of a background process depends on the connection that started it.

mod background;
mod foreground;
mod launch;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::budget::Protection;
use crate::cgroup::{Cgroup, CgroupTree};
use crate::lock::lock;
use crate::oserror::{agent_error, error};
use crate::output::MAX_OUTPUT_FILE_BYTES;
use crate::protocol::{
    AgentError, Command, ErrorKind, ExitStatus, ProcessInfo, ProcessOutput, PtySize, MAX_FILE_CHUNK_BYTES,
};
use crate::spawn::Child;

pub(crate) use launch::merged_env;
pub use launch::validate_exec;

/// Most bytes kept per stream of a background process; past it a marker line
/// is appended and the rest of the stream is read and dropped (counted only).
pub const MAX_BACKGROUND_OUTPUT_FILE_BYTES: u64 = MAX_OUTPUT_FILE_BYTES;

/// How long after a command exits its output pipes may stay open (held by a
/// child it left behind) before the agent stops waiting for them.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Finished background processes remembered for `ListProcesses`/`ReadProcessOutput`.
pub const MAX_FINISHED_PROCESSES: usize = 256;

/// Total bytes of output files kept for finished background processes.
pub const MAX_FINISHED_OUTPUT_BYTES: u64 = 256 * 1024 * 1024;

/// Largest valid signal number (`SIGRTMAX` on Linux).
const MAX_SIGNAL_NUMBER: i32 = 64;

/// One process the agent started.
#[derive(Debug)]
struct Entry {
    info: ProcessInfo,
    /// Background output files (stdout, stderr).
    files: Option<(PathBuf, PathBuf)>,
    /// Order of start, for pruning the oldest finished entries.
    seq: u64,
    /// Whether the process was reaped (its pid may belong to another process since).
    reaped: bool,
    /// Its cgroup, while it lives.
    cgroup: Option<Arc<Cgroup>>,
    /// Who killed its cgroup and how many others died with it.
    kills: Arc<KillRecord>,
    /// A background process's input, terminal and counters, while its thread runs.
    live: Option<Arc<background::Live>>,
}

/// The agent's process table and spawner. One per agent, shared by all connections.
#[derive(Debug)]
pub struct Processes {
    work_dir: PathBuf,
    state_dir: PathBuf,
    table: Arc<Mutex<HashMap<u32, Entry>>>,
    seq: AtomicU64,
    cgroups: Option<Arc<CgroupTree>>,
    protection: Protection,
    /// Background processes whose thread still runs (see [`crate::budget`]).
    live_background: Arc<AtomicUsize>,
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Reaps an exited child under the table lock, marking its entry reaped, so
/// [`Processes::signal`] (which signals under the same lock) never sends a
/// group signal to a pid that may have been reused.
fn reap(table: &Mutex<HashMap<u32, Entry>>, child: &mut Child) -> io::Result<std::process::ExitStatus> {
    let mut table = lock(table);
    if let Some(entry) = table.get_mut(&child.id()) {
        entry.reaped = true;
    }
    child.wait()
}

/// Kills a whole process group. Errors (the group is already gone) are ignored.
/// Call it only while the group's leader is unreaped.
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Whether a command's cgroup was killed, and how many processes other than
/// its leader died with it (shared by its waiter and `Signal`).
#[derive(Debug, Default)]
struct KillRecord {
    killed: AtomicBool,
    others: AtomicU32,
}

/// Kills everything of a command: its cgroup at once (when it has one) and
/// its process group (while `leader` is unreaped), and notes in `record` how
/// many processes other than the leader were in the cgroup.
fn kill_command(cgroup: Option<&Cgroup>, leader: u32, leader_unreaped: bool, record: &KillRecord) {
    if let Some(cgroup) = cgroup {
        let others = cgroup.pids().iter().filter(|p| **p != leader).count() as u32;
        if let Err(e) = cgroup.kill() {
            eprintln!("capsule-agent: cgroup.kill of {} failed: {e}", cgroup.path().display());
        }
        record.others.fetch_add(others, Ordering::Relaxed);
    }
    record.killed.store(true, Ordering::Relaxed);
    if leader_unreaped {
        kill_group(leader);
    }
}

fn exit_status(status: std::process::ExitStatus, started: Instant, timed_out: bool) -> ExitStatus {
    ExitStatus {
        code: status.code(),
        signal: status.signal(),
        duration_us: started.elapsed().as_micros() as u64,
        timed_out,
        stdout_bytes: 0,
        stderr_bytes: 0,
        limit: None,
        escaped_killed: 0,
    }
}

fn display_command(cmd: &Command) -> String {
    match cmd {
        Command::Shell(s) => s.clone(),
        Command::Argv(v) => v.join(" "),
    }
}

impl Processes {
    /// A table whose commands default to `work_dir`, keep files under
    /// `state_dir`, and run in cgroups of `cgroups` (when there is a tree).
    /// Output files of background processes a previous agent left there
    /// (nothing can read them any more) are deleted.
    pub fn new(work_dir: &Path, state_dir: &Path, cgroups: Option<Arc<CgroupTree>>, protection: Protection) -> Self {
        let stale = state_dir.join("processes");
        if stale.exists() {
            if let Err(e) = std::fs::remove_dir_all(&stale) {
                eprintln!("capsule-agent: cannot clear {}: {e}", stale.display());
            }
        }
        Self {
            work_dir: work_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            table: Arc::new(Mutex::new(HashMap::new())),
            seq: AtomicU64::new(1),
            cgroups,
            protection,
            live_background: Arc::default(),
        }
    }

    /// Where capped foreground output overflows to.
    pub fn output_dir(&self) -> PathBuf {
        self.state_dir.join("output")
    }

    /// A fresh sequence number for file names unique within the agent.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops a foreground process from the table.
    fn forget(&self, pid: u32) {
        lock(&self.table).remove(&pid);
    }

    /// Every process the agent knows: running ones and recent finished background ones.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let table = lock(&self.table);
        let mut entries: Vec<&Entry> = table.values().collect();
        entries.sort_by_key(|e| e.seq);
        entries.into_iter().map(|e| e.info.clone()).collect()
    }

    /// Sends `signal` to a process. A running process the agent started gets
    /// it as a process group (its whole tree), and signal 9 also kills its
    /// whole cgroup; once a background leader exited, what it left running in
    /// its cgroup gets the signal. Any other pid gets it alone.
    pub fn signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        if !(0..=MAX_SIGNAL_NUMBER).contains(&signal) {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("signal {signal} is out of range 0..={MAX_SIGNAL_NUMBER}"),
            ));
        }
        let target = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| error(ErrorKind::InvalidArgument, format!("pid {pid} cannot be signalled")))?;
        let failed = |e: io::Error| agent_error(&format!("signal {signal} to pid {pid}"), &e);
        // The lock is held across kill(2): no reap can slip in between.
        let table = lock(&self.table);
        let Some(entry) = table.get(&pid) else {
            drop(table);
            return send(target, signal).map_err(failed);
        };
        let (cgroup, kills, unreaped) = (entry.cgroup.clone(), Arc::clone(&entry.kills), !entry.reaped);
        if unreaped {
            if let (Some(cgroup), libc::SIGKILL) = (&cgroup, signal) {
                // Counted before anything dies, then the cgroup and the group at once.
                kill_command(Some(cgroup), pid, true, &kills);
                return Ok(());
            }
            // The group, or the leader alone when it left its group.
            return send(-target, signal).or_else(|_| send(target, signal)).map_err(failed);
        }
        drop(table);
        let Some(cgroup) = cgroup else {
            return send(target, signal).map_err(failed);
        };
        // The leader is gone; what it left in its cgroup gets the signal.
        if signal == libc::SIGKILL {
            kill_command(Some(&cgroup), pid, false, &kills);
            return Ok(());
        }
        let pids = cgroup.pids();
        if pids.is_empty() {
            return Err(error(ErrorKind::NotFound, format!("process {pid} exited and left nothing running")));
        }
        for p in pids {
            if let Ok(p) = i32::try_from(p) {
                let _ = send(p, signal);
            }
        }
        Ok(())
    }

    /// Output of a background process from the given offsets.
    pub fn read_output(
        &self,
        pid: u32,
        stdout_offset: u64,
        stderr_offset: u64,
        max_bytes: u64,
    ) -> Result<ProcessOutput, AgentError> {
        let (files, exit) = {
            let table = lock(&self.table);
            let entry = table
                .get(&pid)
                .ok_or_else(|| error(ErrorKind::NotFound, format!("no background process with pid {pid}")))?;
            let files = entry
                .files
                .clone()
                .ok_or_else(|| error(ErrorKind::InvalidArgument, format!("pid {pid} is a foreground process")))?;
            (files, entry.info.exit.clone())
        };
        let max = max_bytes.min(MAX_FILE_CHUNK_BYTES as u64);
        let stdout = read_range(&files.0, stdout_offset, max)?;
        let stderr = read_range(&files.1, stderr_offset, max)?;
        Ok(ProcessOutput {
            next_stdout_offset: stdout_offset + stdout.len() as u64,
            next_stderr_offset: stderr_offset + stderr.len() as u64,
            stdout,
            stderr,
            exit,
        })
    }

    /// The live state of background process `pid`, or why it has none.
    fn live(&self, pid: u32) -> Result<Arc<background::Live>, AgentError> {
        let table = lock(&self.table);
        let entry = table.get(&pid).ok_or_else(|| error(ErrorKind::NotFound, format!("no process with pid {pid}")))?;
        if !entry.info.background {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("pid {pid} is a foreground process; only background processes take input"),
            ));
        }
        entry.live.clone().ok_or_else(|| error(ErrorKind::Closed, format!("process {pid} exited")))
    }

    /// Queues `data` for a background process's stdin (and then closes it
    /// with `close`); returns the bytes queued and not yet written.
    pub fn write_input(&self, pid: u32, data: &[u8], close: bool) -> Result<u64, AgentError> {
        self.live(pid)?.queue_input(pid, data, close)
    }

    /// Sets the size of a background process's terminal.
    pub fn resize_pty(&self, pid: u32, size: PtySize) -> Result<(), AgentError> {
        self.live(pid)?.resize(pid, size)
    }
}

/// kill(2) with a plain result.
fn send(target: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers; no memory is involved.
    if unsafe { libc::kill(target, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Forgets the oldest finished processes (and deletes their files) until at
/// most `max_count` of them with at most `max_bytes` of output files are left.
/// One whose cgroup still holds processes it left running is never forgotten:
/// `Signal` must still reach them.
fn prune_finished(table: &mut HashMap<u32, Entry>, max_count: usize, max_bytes: u64) {
    let mut finished: Vec<(u64, u32, u64)> = table
        .values()
        .filter(|e| e.info.exit.is_some() && e.live.is_none())
        .map(|e| (e.seq, e.info.pid, output_file_bytes(e)))
        .collect();
    // Newest first; keep while both bounds hold.
    finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
    let mut kept_bytes = 0u64;
    for (n, (_, pid, bytes)) in finished.into_iter().enumerate() {
        kept_bytes = kept_bytes.saturating_add(bytes);
        if n < max_count && kept_bytes <= max_bytes {
            continue;
        }
        if let Some(Entry { files: Some((out, err)), .. }) = table.remove(&pid) {
            let _ = std::fs::remove_file(out);
            let _ = std::fs::remove_file(err);
        }
    }
}

/// Bytes on disk of an entry's output files.
fn output_file_bytes(entry: &Entry) -> u64 {
    let Some((out, err)) = &entry.files else {
        return 0;
    };
    [out, err].iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

/// Reads up to `max` bytes of `path` from `offset` (empty past the end).
fn read_range(path: &Path, offset: u64, max: u64) -> Result<Vec<u8>, AgentError> {
    let what = || format!("read {}", path.display());
    let mut file = File::open(path).map_err(|e| agent_error(&what(), &e))?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| agent_error(&what(), &e))?;
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out).map_err(|e| agent_error(&what(), &e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_entry(dir: &Path, pid: u32, seq: u64, bytes: u64) -> Entry {
        let out = dir.join(format!("{pid}-stdout.log"));
        let err = dir.join(format!("{pid}-stderr.log"));
        File::create(&out).unwrap().set_len(bytes).unwrap();
        File::create(&err).unwrap();
        Entry {
            info: ProcessInfo {
                pid,
                command: "x".into(),
                background: true,
                exit: Some(ExitStatus {
                    code: Some(0),
                    signal: None,
                    duration_us: 0,
                    timed_out: false,
                    stdout_bytes: bytes,
                    stderr_bytes: 0,
                    limit: None,
                    escaped_killed: 0,
                }),
                started_unix_ms: 0,
            },
            files: Some((out, err)),
            seq,
            reaped: true,
            cgroup: None,
            kills: Arc::default(),
            live: None,
        }
    }

    #[test]
    fn an_exit_is_seen_without_reaping_so_the_pid_stays_ours() {
        let dir = tempfile::tempdir().unwrap();
        let argv = [std::ffi::OsString::from("true")];
        let spec = crate::spawn::SpawnSpec {
            program: std::ffi::OsStr::new("true"),
            args: &argv,
            env: &[],
            cwd: dir.path(),
            fds: &[],
            session: crate::spawn::Session::NewProcessGroup,
            cgroup: None,
            protection: Protection::default(),
        };
        let mut child = crate::spawn::spawn(&spec).unwrap();
        let pid = child.id();
        assert!(child.has_exited(true).unwrap());
        assert!(child.has_exited(false).unwrap(), "still there to be seen");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        assert_eq!(state, Some("Z"), "a zombie holds the pid until it is reaped");
        let table = Mutex::new(HashMap::new());
        assert!(reap(&table, &mut child).unwrap().success());
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) writes only into `info`.
        let rc = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG) };
        assert!(rc != 0, "reaped: no longer our child");
    }

    #[test]
    fn finished_processes_are_bounded_by_count_and_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = HashMap::new();
        for (pid, seq) in [(10, 1), (11, 2), (12, 3), (13, 4)] {
            table.insert(pid, finished_entry(dir.path(), pid, seq, 100));
        }
        // A running one is never pruned.
        let mut running = finished_entry(dir.path(), 20, 0, 1000);
        running.info.exit = None;
        table.insert(20, running);

        prune_finished(&mut table, 3, 10_000);
        let mut left: Vec<u32> = table.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![11, 12, 13, 20], "the oldest finished one goes first");
        assert!(!dir.path().join("10-stdout.log").exists(), "its files go with it");

        prune_finished(&mut table, 3, 250);
        let mut left: Vec<u32> = table.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![12, 13, 20], "only the newest 250 bytes of output stay");
        assert!(!dir.path().join("11-stdout.log").exists());
        assert!(dir.path().join("12-stdout.log").exists());
    }
}
