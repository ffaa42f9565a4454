//! Turning an [`ExecRequest`] into a running child: validation (pure, and
//! fuzzed), the command's cgroup with its limits, its stdio (pipes, or a
//! terminal), its environment, and the table entry.
//!
//! Owns everything between a request and a live pid. It never waits for the
//! child and never reads its output: that is [`super::foreground`] and
//! [`super::background`].

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::cgroup::limits::{resolve_request, LimitPolicy, ResolvedLimits};
use crate::cgroup::{Cgroup, CgroupError};
use crate::lock::lock;
use crate::oserror::{agent_error, error};
use crate::protocol::{AgentError, Command, ErrorKind, ExecRequest, ProcessInfo, MAX_PENDING_INPUT_BYTES};
use crate::pty;
use crate::spawn::{self, Child, Session, SpawnError, SpawnSpec};

use super::{display_command, unix_ms_now, Entry, KillRecord, Processes};

/// The shell that runs [`Command::Shell`].
const SHELL: &str = "/bin/sh";

/// A child's end of the agent's side of its stdio.
#[derive(Debug)]
pub(super) enum ChildIo {
    /// Pipes; `stdin` is `None` when the child got /dev/null.
    Pipes {
        /// The write end of its stdin.
        stdin: Option<OwnedFd>,
        /// The read end of its stdout.
        stdout: OwnedFd,
        /// The read end of its stderr.
        stderr: OwnedFd,
    },
    /// A terminal: output and input both go through the master.
    Terminal {
        /// The master end.
        master: OwnedFd,
    },
}

/// A started command.
#[derive(Debug)]
pub(super) struct Launched {
    pub child: Child,
    pub cgroup: Option<Arc<Cgroup>>,
    pub kills: Arc<KillRecord>,
    /// Its stdio, until the waiter takes it.
    pub io: Option<ChildIo>,
    pub started: Instant,
    pub seq: u64,
}

fn invalid(message: String) -> AgentError {
    error(ErrorKind::InvalidArgument, message)
}

fn nul_free(what: &str, bytes: &[u8]) -> Result<(), AgentError> {
    match bytes.iter().position(|b| *b == 0) {
        Some(at) => Err(invalid(format!("{what} contains a NUL byte (at byte {at}), which exec cannot pass"))),
        None => Ok(()),
    }
}

/// Checks an [`ExecRequest`] before anything is created, and resolves its
/// limits under `policy` (`None`: the agent enforces no limits). Pure: the
/// fuzz target feeds it every decoded request.
pub fn validate_exec(req: &ExecRequest, policy: Option<&LimitPolicy>) -> Result<Option<ResolvedLimits>, AgentError> {
    match &req.command {
        Command::Shell(script) => nul_free("the command", script.as_bytes())?,
        Command::Argv(argv) => {
            if argv.is_empty() {
                return Err(invalid("exec argv is empty".into()));
            }
            for (i, arg) in argv.iter().enumerate() {
                nul_free(&format!("argument {i}"), arg.as_bytes())?;
            }
        }
    }
    if let Some(cwd) = &req.cwd {
        nul_free("cwd", cwd.as_bytes())?;
    }
    for (key, value) in &req.env {
        if key.is_empty() || key.contains('=') {
            return Err(invalid(format!("environment variable name {key:?} is empty or contains '='")));
        }
        nul_free(&format!("environment variable {key}"), key.as_bytes())?;
        nul_free(&format!("the value of {key}"), value.as_bytes())?;
    }
    if let Some(size) = req.pty {
        if !req.background {
            return Err(invalid("pty is for background commands only (set background: true)".into()));
        }
        if let Some(problem) = pty::size_problem(size) {
            return Err(invalid(problem));
        }
    }
    if let (true, Some(stdin)) = (req.background, &req.stdin) {
        if stdin.len() > MAX_PENDING_INPUT_BYTES {
            return Err(error(
                ErrorKind::TooLarge,
                format!(
                    "stdin of a background command is {} bytes, over the {MAX_PENDING_INPUT_BYTES}-byte cap on \
                     queued input (write files with write_file, or feed it in pieces with WriteProcess)",
                    stdin.len()
                ),
            ));
        }
    }
    resolve_request(policy, req.limits.as_ref())
}

/// /dev/null, opened once (close-on-exec) and shared by every child.
fn dev_null() -> Result<BorrowedFd<'static>, AgentError> {
    static NULL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    NULL.get_or_init(|| std::fs::File::options().read(true).write(true).open("/dev/null").ok().map(OwnedFd::from))
        .as_ref()
        .map(|fd| fd.as_fd())
        .ok_or_else(|| error(ErrorKind::Io, "cannot open /dev/null"))
}

/// The agent's environment with `overrides` applied (later ones win).
pub(crate) fn merged_env(overrides: &[(String, String)]) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (key, value) in overrides {
        match env.iter_mut().find(|(k, _)| k.as_bytes() == key.as_bytes()) {
            Some(slot) => slot.1 = value.into(),
            None => env.push((key.into(), value.into())),
        }
    }
    env
}

/// The protocol error for a failed spawn of `what`.
pub(crate) fn spawn_error(what: &str, e: SpawnError) -> AgentError {
    match e {
        SpawnError::Invalid { .. } | SpawnError::TooManyFds => invalid(format!("cannot run {what}: {e}")),
        SpawnError::Clone(source) if source.raw_os_error() == Some(libc::EAGAIN) => error(
            ErrorKind::Busy,
            format!(
                "cannot run {what}: the guest refused a new process ({source}): the commands running now use up \
                 the guest's process budget; wait for some to end or kill them"
            ),
        ),
        SpawnError::Clone(source) | SpawnError::Child { source, .. } => {
            agent_error(&format!("cannot run {what}"), &source)
        }
    }
}

/// The protocol error for a cgroup that could not be made.
pub(crate) fn cgroup_error(what: &str, e: &CgroupError) -> AgentError {
    let mut message = format!("cannot create the cgroup of {what}: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    error(ErrorKind::Io, message)
}

impl Processes {
    /// Validates `req`, creates its cgroup and stdio, starts it, and enters it
    /// in the table. Foreground stdin is a pipe only when `req.stdin` is given;
    /// background stdin is always one (or the terminal).
    pub(super) fn launch(&self, req: &ExecRequest) -> Result<Launched, AgentError> {
        let limits = validate_exec(req, self.cgroups.as_ref().and_then(|t| t.policy()))?;
        let shown = format!("{:?}", display_command(&req.command));
        let (program, args): (&OsStr, Vec<OsString>) = match &req.command {
            Command::Shell(script) => (OsStr::new(SHELL), vec![SHELL.into(), "-c".into(), script.into()]),
            Command::Argv(argv) => (OsStr::new(&argv[0]), argv.iter().map(OsString::from).collect()),
        };
        let cwd: PathBuf = match &req.cwd {
            Some(dir) => self.work_dir.join(dir),
            None => self.work_dir.clone(),
        };
        match std::fs::metadata(&cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(error(ErrorKind::NotADirectory, format!("exec cwd {} is not a directory", cwd.display())))
            }
            Err(e) => return Err(agent_error(&format!("exec cwd {}", cwd.display()), &e)),
        }
        let cgroup = match &self.cgroups {
            Some(tree) => Some(Arc::new(tree.create("exec", limits).map_err(|e| cgroup_error(&shown, &e))?)),
            None => None,
        };
        let pipe = || spawn::pipe().map_err(|e| agent_error("create a pipe", &e));
        let env = merged_env(&req.env);
        let seq = self.next_seq();
        let started = Instant::now();
        let spec = |fds: &[(i32, BorrowedFd<'_>)], session| {
            let spec = SpawnSpec {
                program,
                args: &args,
                env: &env,
                cwd: &cwd,
                fds,
                session,
                cgroup: cgroup.as_ref().map(|c| c.dir_fd()),
                protection: self.protection,
            };
            spawn::spawn(&spec).map_err(|e| spawn_error(&shown, e))
        };
        let (child, io) = match req.pty {
            Some(size) => {
                let pair = pty::open(size).map_err(|e| agent_error("open a pseudo-terminal", &e))?;
                let slave = pair.slave.as_fd();
                let child = spec(&[(0, slave), (1, slave), (2, slave)], Session::NewSessionOnTerminal)?;
                (child, ChildIo::Terminal { master: pair.master })
            }
            None => {
                let stdin = if req.background || req.stdin.is_some() { Some(pipe()?) } else { None };
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                let null = dev_null()?;
                let stdin_child = stdin.as_ref().map_or(null, |(r, _)| r.as_fd());
                let fds = [(0, stdin_child), (1, out_w.as_fd()), (2, err_w.as_fd())];
                let child = spec(&fds, Session::NewProcessGroup)?;
                (child, ChildIo::Pipes { stdin: stdin.map(|(_, w)| w), stdout: out_r, stderr: err_r })
            }
        };
        let pid = child.id();
        let kills = Arc::<KillRecord>::default();
        lock(&self.table).insert(
            pid,
            Entry {
                info: ProcessInfo {
                    pid,
                    command: display_command(&req.command),
                    background: req.background,
                    exit: None,
                    started_unix_ms: unix_ms_now(),
                },
                files: None,
                seq,
                reaped: false,
                cgroup: cgroup.clone(),
                kills: Arc::clone(&kills),
                live: None,
            },
        );
        Ok(Launched { child, cgroup, kills, io: Some(io), started, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ProcessLimits, PtySize};

    #[test]
    fn requests_that_exec_cannot_carry_are_refused_before_anything_starts() {
        let kind = |req: &ExecRequest| validate_exec(req, None).map(|_| ()).map_err(|e| e.kind);
        assert_eq!(kind(&ExecRequest::shell("echo ok")), Ok(()));
        assert_eq!(kind(&ExecRequest::argv(&[])), Err(ErrorKind::InvalidArgument));
        assert_eq!(kind(&ExecRequest::argv(&["a\0b"])), Err(ErrorKind::InvalidArgument));
        let mut env = ExecRequest::shell("true");
        env.env = vec![("A=B".into(), "c".into())];
        assert_eq!(kind(&env), Err(ErrorKind::InvalidArgument));
        let mut pty = ExecRequest::shell("true");
        pty.pty = Some(PtySize { rows: 24, cols: 80 });
        assert_eq!(kind(&pty), Err(ErrorKind::InvalidArgument), "a pty needs background");
        pty.background = true;
        assert_eq!(kind(&pty), Ok(()));
        pty.pty = Some(PtySize { rows: 0, cols: 80 });
        assert_eq!(kind(&pty), Err(ErrorKind::InvalidArgument));
        let mut big = ExecRequest::shell("cat");
        big.background = true;
        big.stdin = Some(vec![0; MAX_PENDING_INPUT_BYTES + 1]);
        assert_eq!(kind(&big), Err(ErrorKind::TooLarge));
        let mut limited = ExecRequest::shell("true");
        limited.limits = Some(ProcessLimits { pids_max: Some(5), memory_max_bytes: None });
        assert_eq!(kind(&limited), Err(ErrorKind::Unsupported), "limits that cannot be enforced are not ignored");
        let policy = LimitPolicy::for_guest(1 << 30, 32768, 32768).unwrap();
        assert_eq!(validate_exec(&limited, Some(&policy)).unwrap().map(|l| l.pids_max), Some(5));
    }
}
