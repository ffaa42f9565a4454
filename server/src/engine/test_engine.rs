//! The test engine: each sandbox is the real guest agent running as a host process.
//!
//! It exists so that everything above the VMM (manager, registry, MCP tools,
//! transports) is tested fast, against the real agent and protocol, on any
//! Linux host. It is NOT isolation: the "sandbox" runs as the server's user on
//! the host. Release builds refuse it unless `--unsafe-test-engine` is given.
//!
//! - create: start `capsule-agent --listen-unix DIR/agent.sock --work-dir DIR/work
//!   --state-dir DIR/state` in its own session, then connect.
//! - pause: drop the connection, SIGSTOP the agent and every descendant.
//! - resume: SIGCONT them, reconnect on next use.
//! - fork: copy the work directory and start a new agent. Only files are
//!   copied: running interpreters and processes are not (the KVM engine
//!   restores the whole memory image instead).
//! - save_template: copy the work directory under `.user-templates/`; a
//!   sandbox made from it starts an agent on a copy of it (files only, as a fork).
//! - kill: SIGKILL the agent and its descendants, delete the directory.
//! - restart: the saved state is the agent's pid and directory; a stopped
//!   agent stays stopped while the server is down and is found again.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_agent::client::AgentClient;

use capsule_agent::client::ClientError;
use capsule_vmm::config::MAX_UDS_PATH_BYTES;

use super::{
    allocated_bytes, detect_host_limits, Engine, EngineError, ErrorKind, HostLimits, Machine, MachineSpec, Reattached,
    SavedTemplate,
};

/// How long a new agent may take to listen and answer the handshake.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(15);
/// The environment variable that names the agent binary.
pub const AGENT_BIN_ENV: &str = "CAPSULE_AGENT_BIN";

/// The fork caveat of this engine, for the model.
const FORK_NOTE: &str = "This server runs the test engine: forks copy the sandbox's files, but not \
its running processes or interpreter variables (the KVM engine copies the whole memory).";

/// Errors of the test engine.
#[derive(Debug, thiserror::Error)]
pub enum TestEngineError {
    /// The engine cannot run: the agent binary is missing.
    #[error("{0}")]
    NoAgentBinary(String),
    /// The agent's socket path does not fit a `sockaddr_un`.
    #[error("the agent socket path {path} is longer than {MAX_UDS_PATH_BYTES} bytes; use a shorter --state-dir")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A host file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Copying the work directory for a fork failed.
    #[error("copying the work directory failed: cp ended with {0}")]
    Copy(std::process::ExitStatus),
    /// The agent did not answer its handshake in time.
    #[error("the agent did not answer within {waited:?}")]
    Agent {
        /// How long it was given.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: ClientError,
    },
    /// The agent process is gone; what it held in memory is lost.
    #[error("{0}")]
    Gone(String),
    /// Saved state from the registry cannot be used.
    #[error("saved machine state is unusable: no {missing} in {saved}")]
    BadSavedState {
        /// The field that is missing.
        missing: &'static str,
        /// The saved state.
        saved: serde_json::Value,
    },
}

impl TestEngineError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TestEngineError::Gone(_) => ErrorKind::Lost,
            TestEngineError::SocketPathTooLong { .. } => ErrorKind::Limit,
            TestEngineError::BadSavedState { .. } => ErrorKind::InvalidInput,
            TestEngineError::NoAgentBinary(_)
            | TestEngineError::Io { .. }
            | TestEngineError::Copy(_)
            | TestEngineError::Agent { .. } => ErrorKind::HostFault,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestEngineError {
    let what = what.into();
    move |source| TestEngineError::Io { what, source }
}

/// Finds the agent binary: `$CAPSULE_AGENT_BIN`, else `capsule-agent` next to the running executable
/// (or one directory up, for test binaries under `deps/`).
pub fn locate_agent_binary() -> Result<PathBuf, TestEngineError> {
    if let Some(path) = std::env::var_os(AGENT_BIN_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(TestEngineError::NoAgentBinary(format!(
            "{AGENT_BIN_ENV}={} is not a file; build the agent with `cargo build -p capsule-agent`",
            path.display()
        )));
    }
    let exe = std::env::current_exe().map_err(io_err("cannot find the running executable"))?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        if let Some(d) = dir {
            let candidate = d.join("capsule-agent");
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent();
        }
    }
    Err(TestEngineError::NoAgentBinary(format!(
        "the test engine needs the capsule-agent binary: build it with `cargo build -p capsule-agent` \
         (it is looked for next to {}) or set {AGENT_BIN_ENV}",
        exe.display()
    )))
}

/// The engine.
#[derive(Debug)]
pub struct TestEngine {
    agent_bin: PathBuf,
    root: PathBuf,
}

impl TestEngine {
    /// An engine whose sandboxes live under `root` (one directory each).
    pub fn new(agent_bin: PathBuf, root: PathBuf) -> Result<TestEngine, TestEngineError> {
        std::fs::create_dir_all(&root).map_err(io_err(format!("cannot create {}", root.display())))?;
        Ok(TestEngine { agent_bin, root })
    }

    fn spawn_agent(
        &self,
        dir: &Path,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<AgentProcess, TestEngineError> {
        let socket = dir.join("agent.sock");
        if socket.as_os_str().len() > MAX_UDS_PATH_BYTES {
            return Err(TestEngineError::SocketPathTooLong { path: socket });
        }
        let _ = std::fs::remove_file(&socket);
        for sub in ["work", "state"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("cannot create {}", dir.join(sub).display())))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(io_err("cannot open the agent log"))?;
        let log2 = log.try_clone().map_err(io_err("cannot dup the agent log"))?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("--listen-unix")
            .arg(&socket)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .current_dir(dir.join("work"))
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // A session of its own: the agent (and what it starts) never gets the
        // terminal's or the server's signals, and its group is orphaned from the
        // start, so the server dying while it is stopped does not SIGHUP it
        // (POSIX sends SIGHUP+SIGCONT to a stopped group that *becomes* orphaned).
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setsid(2), which is async-signal-safe and touches no memory of ours.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err(format!("cannot start {}", self.agent_bin.display())))?;
        let pid = child.id();
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        // Reap it when it exits, so it never lingers as a zombie (and its pid is not reused unseen).
        let _ = std::thread::Builder::new().name(format!("reap-agent-{pid}")).spawn(move || {
            let _ = child.wait();
            flag.store(true, Ordering::Release);
        });
        Ok(AgentProcess {
            pid,
            dir: dir.to_path_buf(),
            agent_bin: self.agent_bin.clone(),
            client: None,
            paused: false,
            exited: Some(exited),
        })
    }
}

impl TestEngine {
    /// Starts an agent in `dir` (its work directory already there, or made) and connects.
    fn start_in(
        &self,
        dir: &Path,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<Box<dyn Machine>, EngineError> {
        let mut machine = self.spawn_agent(dir, env).map_err(EngineError::Test)?;
        if let Err(e) = machine.connect() {
            let _ = machine.kill();
            return Err(e);
        }
        Ok(Box::new(machine))
    }
}

/// Where saved templates' work directories are kept, under the engine's root.
const USER_TEMPLATES_DIR: &str = ".user-templates";

/// Copies the work directory of the machine in `from` into `to` (made).
fn copy_work(from: &Path, to: &Path) -> Result<(), TestEngineError> {
    std::fs::create_dir_all(to).map_err(io_err(format!("cannot create {}", to.display())))?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(from.join("work"))
        .arg(to.join("work"))
        .status()
        .map_err(io_err("cannot run cp to copy the work dir"))?;
    if !status.success() {
        return Err(TestEngineError::Copy(status));
    }
    Ok(())
}

impl Engine for TestEngine {
    fn name(&self) -> &'static str {
        "test"
    }

    fn create_from_template(
        &self,
        spec: &MachineSpec,
        template: &serde_json::Value,
    ) -> Result<Box<dyn Machine>, EngineError> {
        let from = template.get("dir").and_then(|d| d.as_str()).map(PathBuf::from).filter(|d| d.is_dir());
        let Some(from) = from else {
            return Err(TestEngineError::Io {
                what: format!("the saved template's files are gone ({template})"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into());
        };
        let dir = self.root.join(&spec.id);
        copy_work(&from, &dir)?;
        self.start_in(&dir, &spec.env)
    }

    fn remove_template(&self, template: &serde_json::Value) {
        let dir = template.get("dir").and_then(|d| d.as_str()).map(PathBuf::from);
        if let Some(dir) = dir.filter(|d| d.starts_with(self.root.join(USER_TEMPLATES_DIR))) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn host_limits(&self) -> HostLimits {
        detect_host_limits()
    }

    fn fork_note(&self) -> Option<&'static str> {
        Some(FORK_NOTE)
    }

    fn create(&self, spec: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        self.start_in(&self.root.join(&spec.id), &spec.env)
    }

    fn reattach(
        &self,
        _spec: &MachineSpec,
        saved: &serde_json::Value,
        paused: bool,
    ) -> Result<Reattached, EngineError> {
        let pid = saved
            .get("pid")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| TestEngineError::BadSavedState { missing: "pid", saved: saved.clone() })?;
        let dir = saved
            .get("dir")
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| TestEngineError::BadSavedState { missing: "dir", saved: saved.clone() })?;
        let mut machine =
            AgentProcess { pid, dir, agent_bin: self.agent_bin.clone(), client: None, paused, exited: None };
        machine.check_alive()?;
        Ok(Reattached { machine: Box::new(machine), rolled_back: None })
    }

    fn restart(&self, spec: &MachineSpec, old: Option<&mut Box<dyn Machine>>) -> Result<Box<dyn Machine>, EngineError> {
        if let Some(old) = old {
            old.stop();
        }
        let dir = self.root.join(&spec.id);
        if !dir.join("work").is_dir() {
            return Err(
                TestEngineError::Gone(format!("its work directory {} is gone", dir.join("work").display())).into()
            );
        }
        let mut machine = self.spawn_agent(&dir, &spec.env).map_err(EngineError::Test)?;
        if let Err(e) = machine.connect() {
            machine.stop();
            return Err(e);
        }
        Ok(Box::new(machine))
    }
}

/// One agent host process.
#[derive(Debug)]
struct AgentProcess {
    pid: u32,
    dir: PathBuf,
    agent_bin: PathBuf,
    client: Option<AgentClient>,
    paused: bool,
    /// Set by the reaper thread when we started the process; `None` after a
    /// restart (then the pid is checked against the command line instead).
    exited: Option<Arc<AtomicBool>>,
}

impl AgentProcess {
    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The engine's root: the directory that holds this sandbox's.
    fn root(&self) -> PathBuf {
        self.dir.parent().map_or_else(|| self.dir.clone(), Path::to_path_buf)
    }

    /// The agent, its descendants, and everything else in its session (the
    /// agent is a session leader, so orphans it left behind still count), agent
    /// first. When the agent is gone (`agent_alive` false) its pid may belong to
    /// someone else: then only its session is walked (a session id stays
    /// reserved while any member lives, so it cannot have been reused).
    fn process_tree(&self, agent_alive: bool) -> Vec<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut in_session = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some((ppid, session)) = read_parent_and_session(pid) {
                    children.entry(ppid).or_default().push(pid);
                    if session == self.pid && pid != self.pid {
                        in_session.push(pid);
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut queue: VecDeque<u32> = VecDeque::new();
        if agent_alive {
            queue.push_back(self.pid);
        }
        queue.extend(in_session);
        while let Some(p) = queue.pop_front() {
            if !out.contains(&p) {
                out.push(p);
            }
            for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                if !out.contains(&c) {
                    out.push(c);
                    queue.push_back(c);
                }
            }
        }
        out
    }

    fn signal_tree(&self, signal: i32) {
        for pid in self.process_tree(true) {
            send_signal(pid, signal);
        }
    }
}

fn send_signal(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The parent pid and session id of `pid`, from `/proc/PID/stat` (fields 4
/// and 6, after the parenthesised command name, which may contain spaces).
fn read_parent_and_session(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let ppid = fields.nth(1)?.parse().ok()?;
    let session = fields.nth(1)?.parse().ok()?;
    Some((ppid, session))
}

/// The one-letter state of `pid` from `/proc/PID/stat`.
fn read_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

impl Machine for AgentProcess {
    fn connect(&mut self) -> Result<AgentClient, EngineError> {
        if let Some(client) = &self.client {
            if client.closed_reason().is_none() {
                return Ok(client.clone());
            }
        }
        self.client = None;
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            self.check_alive()?;
            match AgentClient::connect_unix(&self.socket()) {
                Ok((client, _hello)) => {
                    self.client = Some(client.clone());
                    return Ok(client);
                }
                Err(source) if Instant::now() >= deadline => {
                    return Err(TestEngineError::Agent { waited: AGENT_START_TIMEOUT, source }.into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        if let Some(client) = self.client.take() {
            client.close();
        }
        self.check_alive()?;
        self.signal_tree(libc::SIGSTOP);
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.check_alive()?;
        self.signal_tree(libc::SIGCONT);
        self.paused = false;
        Ok(())
    }

    fn fork(&mut self, child: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        let root = self.root();
        let dir = root.join(&child.id);
        copy_work(&self.dir, &dir)?;
        TestEngine { agent_bin: self.agent_bin.clone(), root }.start_in(&dir, &child.env)
    }

    fn save_template(&mut self, key: &str) -> Result<SavedTemplate, EngineError> {
        let dir = self.root().join(USER_TEMPLATES_DIR).join(key);
        if let Err(e) = copy_work(&self.dir, &dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let bytes = allocated_bytes(&dir);
        Ok(SavedTemplate { engine_state: serde_json::json!({ "dir": dir }), bytes })
    }

    fn stop(&mut self) {
        if let Some(client) = self.client.take() {
            client.close();
        }
        let alive = self.check_alive().is_ok();
        // Also when the agent is gone: what it started may live on in its session.
        for pid in self.process_tree(alive) {
            send_signal(pid, libc::SIGKILL);
        }
        if alive {
            // A stopped process dies on SIGKILL too; wait briefly for the agent to go.
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.check_alive().is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn kill(&mut self) -> Result<(), EngineError> {
        self.stop();
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_err(format!("cannot delete {}", self.dir.display()))(source).into()),
        }
    }

    fn check_alive(&mut self) -> Result<(), EngineError> {
        let gone = |why: String| Err(EngineError::Test(TestEngineError::Gone(why)));
        if let Some(exited) = &self.exited {
            // Our own child: the reaper knows; its pid cannot be reused before it is reaped.
            return if exited.load(Ordering::Acquire) {
                gone(format!("the agent process {} has exited", self.pid))
            } else {
                Ok(())
            };
        }
        match read_state(self.pid) {
            None | Some('Z') | Some('X') => {
                return gone(format!("the agent process {} has exited", self.pid));
            }
            Some(_) => {}
        }
        // Guard against pid reuse: the process must be our agent for this directory.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let socket = self.socket();
        let needle = socket.as_os_str().as_encoded_bytes();
        if !cmdline.windows(needle.len().max(1)).any(|w| w == needle) {
            return gone(format!("process {} is no longer this sandbox's agent", self.pid));
        }
        Ok(())
    }

    fn saved_state(&self) -> serde_json::Value {
        serde_json::json!({ "pid": self.pid, "dir": self.dir.display().to_string() })
    }

    fn process_id(&self) -> Option<u32> {
        Some(self.pid)
    }
}
