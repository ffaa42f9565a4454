//! Starting a child process with `clone3`: straight into its cgroup
//! (`CLONE_INTO_CGROUP`), with a pidfd (`CLONE_PIDFD`), and by default
//! vfork-style (`CLONE_VM | CLONE_VFORK` on a stack of its own), so the
//! agent's address space is never copied.
//!
//! Why `CLONE_INTO_CGROUP` rather than the child writing its pid into
//! `cgroup.procs` before `exec`: the child is born in its cgroup, so there is
//! no moment in which it (or anything it forks) runs outside it, nothing has
//! to wait for the move, and the kernel needs no migration (a migration takes
//! the cgroup threadgroup lock for writing, which waits for an RCU grace
//! period). Why vfork-style: copying the page tables of a multi-threaded
//! agent and the copy-on-write faults that follow in the agent are the
//! biggest cost of `fork` (a page fault costs about 100 µs in a PVM guest);
//! the child here touches a few pages of its own stack and then `exec`s.
//!
//! Owns the only code that runs between `clone3` and `execve`. That code
//! (`child_main`) runs in a copy of a multi-threaded process, in vfork mode
//! even in the agent's own memory, so it calls only async-signal-safe system
//! calls, never allocates, never panics, and reports a failure as
//! `(step, errno)` before `_exit(127)`. Everything it needs is prepared
//! beforehand in [`Prepared`]. It never waits for the child to end except
//! when the child failed before `exec`: that is [`Child`]'s caller's.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;

use crate::budget::{Protection, CHILD_OPEN_FILES_SOFT_LIMIT};

/// Most descriptors a child gets (0, 1, 2 and a driver's 3 and 4, with room).
pub const MAX_CHILD_FDS: usize = 8;
/// Size of the stack a vfork-style child runs its set-up on, in bytes.
const CHILD_STACK_BYTES: usize = 64 * 1024;
/// `PATH` used when the environment has none (as glibc's `execvp`).
const DEFAULT_PATH: &[u8] = b"/usr/local/bin:/usr/bin:/bin";
/// uapi `linux/sched.h`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// How the child is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnMode {
    /// `CLONE_VM | CLONE_VFORK` on its own stack: nothing is copied; the
    /// calling thread waits until the child has `exec`ed (x86-64 only).
    Vfork,
    /// A classic fork (copy-on-write copy of the agent); the failure report
    /// comes back through a pipe.
    Fork,
}

impl SpawnMode {
    /// The fastest mode this build supports.
    pub const DEFAULT: SpawnMode = if cfg!(target_arch = "x86_64") { SpawnMode::Vfork } else { SpawnMode::Fork };

    /// The mode [`spawn`] uses: [`Self::DEFAULT`], unless the agent was started
    /// with [`SPAWN_MODE_ENV`]`=fork` (a diagnostic knob, for measuring).
    pub fn configured() -> SpawnMode {
        static MODE: OnceLock<SpawnMode> = OnceLock::new();
        *MODE.get_or_init(|| match std::env::var(SPAWN_MODE_ENV).as_deref() {
            Ok("fork") => SpawnMode::Fork,
            _ => SpawnMode::DEFAULT,
        })
    }
}

/// Environment variable that makes the agent spawn fork-style (`fork`), to
/// compare the two modes in one build.
pub const SPAWN_MODE_ENV: &str = "CAPSULE_AGENT_SPAWN_MODE";

/// Which session and process group the child gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// A new process group led by the child (`setpgid(0, 0)`).
    NewProcessGroup,
    /// A new session whose controlling terminal is the child's stdin (`setsid`, `TIOCSCTTY`).
    NewSessionOnTerminal,
}

/// What to start.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The program: a path when it has a `/`, else looked up in the `PATH` of `env`.
    pub program: &'a OsStr,
    /// The whole argv, `argv[0]` included.
    pub args: &'a [OsString],
    /// The whole environment.
    pub env: &'a [(OsString, OsString)],
    /// Its working directory.
    pub cwd: &'a Path,
    /// `(target, source)`: the child gets `source` as descriptor `target`
    /// (every other descriptor of the agent is closed at `exec`).
    pub fds: &'a [(RawFd, BorrowedFd<'a>)],
    /// Its session and process group.
    pub session: Session,
    /// The cgroup it is born in (a cgroup v2 directory).
    pub cgroup: Option<BorrowedFd<'a>>,
    /// What the agent changed about itself that the child must undo.
    pub protection: Protection,
}

/// Errors of starting a child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// An argument, variable or path holds a NUL byte, or a variable name is empty or has `=`.
    #[error("{what} is not valid for exec: {detail}")]
    Invalid {
        /// Which one.
        what: String,
        /// Why.
        detail: &'static str,
    },
    /// More descriptors than [`MAX_CHILD_FDS`].
    #[error("a child gets at most {MAX_CHILD_FDS} descriptors")]
    TooManyFds,
    /// `clone3` (or a resource it needs) failed.
    #[error("cannot create the process")]
    Clone(#[source] io::Error),
    /// The child failed before its program ran.
    #[error("{step} failed")]
    Child {
        /// The step, e.g. "exec".
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Steps of the child, as reported on failure (index + 1 on the wire).
const STEPS: [&str; 8] = [
    "resetting signals",
    "creating the process group or session",
    "setting up descriptors",
    "taking the controlling terminal",
    "changing to the working directory",
    "resetting oom_score_adj",
    "lowering the open-files limit",
    "exec",
];
const STEP_SESSION: c_int = 2;
const STEP_FDS: c_int = 3;
const STEP_CTTY: c_int = 4;
const STEP_CWD: c_int = 5;
const STEP_OOM: c_int = 6;
const STEP_RLIMIT: c_int = 7;
const STEP_EXEC: c_int = 8;

/// How a child failed before `exec`: which step, and its errno.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Report {
    step: c_int,
    errno: c_int,
}

/// Everything the child reads, in plain C terms; it points into [`Prepared`].
#[repr(C)]
struct ChildCtx {
    candidates: *const *const c_char,
    n_candidates: usize,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    fd_map: [[c_int; 2]; MAX_CHILD_FDS],
    n_fds: usize,
    new_session: bool,
    reset_signals: u64,
    reset_oom_score: bool,
    nofile: Option<libc::rlimit>,
    /// Fork mode: where the report goes (a pipe); -1 in vfork mode.
    report_fd: c_int,
    /// Vfork mode: where the report goes (shared memory).
    report: *mut Report,
}

/// The C strings behind a [`ChildCtx`], built before the child exists.
struct Prepared {
    _strings: Vec<CString>,
    candidates: Vec<*const c_char>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    cwd: CString,
}

fn c_string(bytes: &[u8], what: impl FnOnce() -> String) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Invalid { what: what(), detail: "it contains a NUL byte" })
}

impl Prepared {
    fn new(spec: &SpawnSpec<'_>) -> Result<Prepared, SpawnError> {
        let mut strings = Vec::new();
        let mut argv = Vec::with_capacity(spec.args.len() + 1);
        for (i, arg) in spec.args.iter().enumerate() {
            let s = c_string(arg.as_bytes(), || format!("argument {i}"))?;
            argv.push(s.as_ptr());
            strings.push(s);
        }
        argv.push(std::ptr::null());
        let mut envp = Vec::with_capacity(spec.env.len() + 1);
        let mut path_var: &[u8] = DEFAULT_PATH;
        for (key, value) in spec.env {
            let key = key.as_bytes();
            if key.is_empty() || key.contains(&b'=') {
                let what = format!("environment variable {:?}", String::from_utf8_lossy(key));
                return Err(SpawnError::Invalid { what, detail: "its name is empty or contains '='" });
            }
            if key == b"PATH" {
                path_var = value.as_bytes();
            }
            let mut entry = Vec::with_capacity(key.len() + 1 + value.len());
            entry.extend_from_slice(key);
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            let s = c_string(&entry, || format!("environment variable {}", String::from_utf8_lossy(key)))?;
            envp.push(s.as_ptr());
            strings.push(s);
        }
        envp.push(std::ptr::null());
        let program = spec.program.as_bytes();
        let mut candidates = Vec::new();
        let mut add = |path: &[u8], strings: &mut Vec<CString>| -> Result<(), SpawnError> {
            let s = c_string(path, || format!("program {:?}", String::from_utf8_lossy(program)))?;
            candidates.push(s.as_ptr());
            strings.push(s);
            Ok(())
        };
        if program.contains(&b'/') {
            add(program, &mut strings)?;
        } else if !program.is_empty() {
            for dir in path_var.split(|b| *b == b':') {
                let dir = if dir.is_empty() { &b"."[..] } else { dir };
                let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
                full.extend_from_slice(dir);
                full.push(b'/');
                full.extend_from_slice(program);
                add(&full, &mut strings)?;
            }
        }
        let cwd = c_string(spec.cwd.as_os_str().as_bytes(), || "the working directory".to_owned())?;
        Ok(Prepared { _strings: strings, candidates, argv, envp, cwd })
    }
}

/// A pipe `(read end, write end)`, both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are fresh and nobody else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Signals whose disposition in the agent is not the default (handlers and
/// ignored ones), as a bit set (bit `n - 1` for signal `n`); read once.
fn non_default_signals() -> u64 {
    static SET: OnceLock<u64> = OnceLock::new();
    *SET.get_or_init(|| {
        let mut set = 0u64;
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a query (null new action) that writes into `old`, which outlives the call.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0 && old.sa_sigaction != libc::SIG_DFL {
                set |= 1 << (sig - 1);
            }
        }
        set
    })
}

/// The agent's hard open-files limit, read once.
fn open_files_hard_limit() -> libc::rlim_t {
    static HARD: OnceLock<libc::rlim_t> = OnceLock::new();
    *HARD.get_or_init(|| {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: getrlimit(2) writes into `limit`, which outlives the call.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        limit.rlim_max
    })
}

/// A started child. It is not reaped on drop: its owner waits for it.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

/// Starts a child in [`SpawnMode::configured`].
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Child, SpawnError> {
    spawn_with_mode(spec, SpawnMode::configured())
}

/// Starts a child in `mode`. Returns once its program runs (or it failed
/// before that, which is then the error, and it has been reaped).
pub fn spawn_with_mode(spec: &SpawnSpec<'_>, mode: SpawnMode) -> Result<Child, SpawnError> {
    if spec.fds.len() > MAX_CHILD_FDS {
        return Err(SpawnError::TooManyFds);
    }
    let prepared = Prepared::new(spec)?;
    let mut fd_map = [[0; 2]; MAX_CHILD_FDS];
    for (slot, (target, source)) in fd_map.iter_mut().zip(spec.fds) {
        *slot = [*target, source.as_raw_fd()];
    }
    let nofile = spec.protection.open_files_raised.then(|| libc::rlimit {
        rlim_cur: CHILD_OPEN_FILES_SOFT_LIMIT.min(open_files_hard_limit()),
        rlim_max: open_files_hard_limit(),
    });
    let mut report = Report::default();
    let mut ctx = ChildCtx {
        candidates: prepared.candidates.as_ptr(),
        n_candidates: prepared.candidates.len(),
        argv: prepared.argv.as_ptr(),
        envp: prepared.envp.as_ptr(),
        cwd: prepared.cwd.as_ptr(),
        fd_map,
        n_fds: spec.fds.len(),
        new_session: spec.session == Session::NewSessionOnTerminal,
        reset_signals: non_default_signals(),
        reset_oom_score: spec.protection.oom_score_adjusted,
        nofile,
        report_fd: -1,
        report: &mut report,
    };
    let mut pidfd: c_int = -1;
    let mut args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64 | if spec.cgroup.is_some() { CLONE_INTO_CGROUP } else { 0 },
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: spec.cgroup.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    let pid = match mode {
        SpawnMode::Vfork => clone_vfork(&mut args, &ctx)?,
        SpawnMode::Fork => clone_fork(&mut args, &mut ctx, &mut report)?,
    };
    drop(prepared);
    // SAFETY: CLONE_PIDFD stored a fresh descriptor (or left -1) that nothing else owns.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    let mut child = Child { pid, pidfd, status: None };
    if report.step != 0 {
        let _reaped = child.wait();
        let step = usize::try_from(report.step - 1).ok().and_then(|i| STEPS.get(i)).copied().unwrap_or("set-up");
        return Err(SpawnError::Child { step, source: io::Error::from_raw_os_error(report.errno) });
    }
    Ok(child)
}

/// `struct clone_args` (uapi `linux/sched.h`, version 2 with `cgroup`).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Blocks every signal in the calling thread until dropped, so no handler of
/// the agent can run in a child before it reset them.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask write only into the sets given.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The classic fork: the child returns from `clone3` on a copy of this stack.
fn clone_fork(args: &mut CloneArgs, ctx: &mut ChildCtx, report: &mut Report) -> Result<u32, SpawnError> {
    let (read_end, write_end) = pipe().map_err(SpawnError::Clone)?;
    ctx.report_fd = write_end.as_raw_fd();
    ctx.report = std::ptr::null_mut();
    let blocked = SignalsBlocked::new();
    // SAFETY: clone3 with a valid clone_args of the size given. In the child
    // (0) only `child_main` runs, which never returns and only makes
    // async-signal-safe calls on memory prepared before the clone.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, args as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if rc == 0 {
        child_main(ctx);
    }
    drop(blocked);
    if rc < 0 {
        return Err(SpawnError::Clone(io::Error::last_os_error()));
    }
    drop(write_end);
    let mut buf = [0u8; std::mem::size_of::<Report>()];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the rest of `buf`, which is valid for that many bytes.
        let n = unsafe { libc::read(read_end.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == buf.len() {
        let (step, errno) = buf.split_at(4);
        report.step = c_int::from_ne_bytes(step.try_into().unwrap_or_default());
        report.errno = c_int::from_ne_bytes(errno.try_into().unwrap_or_default());
    }
    Ok(rc as u32)
}

/// A child's set-up stack with a guard page below it, one per thread, reused.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        let page = 4096;
        let len = CHILD_STACK_BYTES + page;
        // SAFETY: an anonymous private mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping just made becomes the guard.
        unsafe { libc::mprotect(base, page, libc::PROT_NONE) };
        Ok(ChildStack { base, len })
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which no child uses any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

thread_local! {
    static CHILD_STACK: std::cell::RefCell<Option<ChildStack>> = const { std::cell::RefCell::new(None) };
}

#[cfg(not(target_arch = "x86_64"))]
fn clone_vfork(args: &mut CloneArgs, ctx: &ChildCtx) -> Result<u32, SpawnError> {
    let _ = (args, ctx);
    Err(SpawnError::Clone(io::Error::from_raw_os_error(libc::ENOSYS)))
}

/// The vfork-style clone: the child shares this memory, runs `child_main` on
/// this thread's [`ChildStack`], and this thread sleeps until it `exec`ed or exited.
#[cfg(target_arch = "x86_64")]
fn clone_vfork(args: &mut CloneArgs, ctx: &ChildCtx) -> Result<u32, SpawnError> {
    CHILD_STACK.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(ChildStack::new().map_err(SpawnError::Clone)?);
        }
        let stack = slot.as_ref().ok_or_else(|| SpawnError::Clone(io::Error::other("no child stack")))?;
        args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
        args.stack = stack.base as u64;
        args.stack_size = stack.len as u64;
        let blocked = SignalsBlocked::new();
        let rc: libc::c_long;
        // SAFETY: clone3 with a valid clone_args. In the parent the syscall
        // returns the pid (or -errno) and nothing else changes but rcx and
        // r11, which are declared clobbered. In the child (rax 0) the kernel
        // has put rsp at the top of `stack` (page-aligned, so the `call`
        // leaves the ABI's alignment); `child_main` runs there and never
        // returns (`ud2` guards it), touching no memory of this thread but
        // `ctx` and the report it points to, while this thread is suspended
        // (CLONE_VFORK) until the child execs or exits.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => rc,
                in("rdi") args as *mut CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") ctx as *const ChildCtx,
                in("r13") child_main as extern "C" fn(*const ChildCtx) -> !,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        drop(blocked);
        if rc < 0 {
            return Err(SpawnError::Clone(io::Error::from_raw_os_error(-rc as i32)));
        }
        Ok(rc as u32)
    })
}

/// The child, from `clone3` to `execve`. Only async-signal-safe calls, no
/// allocation, no panics: it may share the agent's memory.
extern "C" fn child_main(ctx: *const ChildCtx) -> ! {
    // SAFETY: `ctx` points to a ChildCtx (and the strings it points to) that
    // stays valid and unchanged until this child execs or exits: the parent
    // thread waits (vfork) or owns a copy (fork). Every call below is a
    // plain system call wrapper on values from it.
    unsafe {
        let ctx = &*ctx;
        let fail = |step: c_int| -> ! {
            let errno = *libc::__errno_location();
            if ctx.report_fd >= 0 {
                let report = Report { step, errno };
                libc::write(ctx.report_fd, (&report as *const Report).cast(), std::mem::size_of::<Report>());
            } else if !ctx.report.is_null() {
                *ctx.report = Report { step, errno };
            }
            libc::_exit(127)
        };
        for sig in 1..=64 {
            if ctx.reset_signals & (1u64 << (sig - 1)) != 0 {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = libc::SIG_DFL;
                // Errors (glibc's own signals) are harmless: exec resets handlers anyway.
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
        let ok = if ctx.new_session { libc::setsid() >= 0 } else { libc::setpgid(0, 0) == 0 };
        if !ok {
            fail(STEP_SESSION);
        }
        // Move sources out of the way of every target, then put each in place
        // (dup2 clears close-on-exec on the target).
        let n = ctx.n_fds.min(MAX_CHILD_FDS);
        let mut top = 2;
        for pair in &ctx.fd_map[..n] {
            top = top.max(pair[0]);
        }
        let mut sources = [0 as c_int; MAX_CHILD_FDS];
        for (slot, pair) in sources.iter_mut().zip(&ctx.fd_map[..n]) {
            let mut source = pair[1];
            if source <= top {
                source = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, top + 1);
                if source < 0 {
                    fail(STEP_FDS);
                }
            }
            *slot = source;
        }
        for (source, pair) in sources.iter().zip(&ctx.fd_map[..n]) {
            if libc::dup2(*source, pair[0]) < 0 {
                fail(STEP_FDS);
            }
        }
        // Belt and braces: nothing of the agent's above the child's own descriptors survives exec.
        libc::close_range((top + 1) as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as c_int);
        if ctx.new_session && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            fail(STEP_CTTY);
        }
        if libc::chdir(ctx.cwd) != 0 {
            fail(STEP_CWD);
        }
        if ctx.reset_oom_score {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STEP_OOM);
            }
            libc::close(fd);
        }
        if let Some(limit) = &ctx.nofile {
            if libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0 {
                fail(STEP_RLIMIT);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // execvp's search: skip a directory that lacks the program; remember
        // a permission error to report if nothing else runs.
        let mut denied = false;
        for i in 0..ctx.n_candidates {
            libc::execve(*ctx.candidates.add(i), ctx.argv, ctx.envp);
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENAMETOOLONG => {}
                libc::EACCES => denied = true,
                _ => fail(STEP_EXEC),
            }
        }
        *libc::__errno_location() = if denied { libc::EACCES } else { libc::ENOENT };
        fail(STEP_EXEC)
    }
}

impl Child {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Its pidfd (readable once it exited), when the kernel gave one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether it has exited, without reaping it (`waitid` with `WNOWAIT`, so
    /// its pid stays taken); with `block`, waits until it has.
    pub fn has_exited(&self, block: bool) -> io::Result<bool> {
        if self.status.is_some() {
            return Ok(true);
        }
        let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waitid(2) writes only into `info`, which lives for the call.
            let rc = unsafe { libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, flags) };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // SAFETY: after a successful waitid the pid field is set (0: no state change).
        Ok(unsafe { info.si_pid() } != 0)
    }

    /// Waits for it to exit and reaps it (once; later calls return the status).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.reap(0).map(|s| s.unwrap_or_default())
    }

    /// Reaps it if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    fn reap(&mut self, flags: c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid(2) writes the status into `raw`, which outlives the call.
            let rc = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut raw, flags) };
            if rc > 0 {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                self.pidfd = None;
                return Ok(Some(status));
            }
            if rc == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn run(mode: SpawnMode, program: &str, args: &[&str], cwd: &Path) -> Result<(ExitStatus, Vec<u8>), SpawnError> {
        let (r, w) = pipe().unwrap();
        let argv: Vec<OsString> = std::iter::once(program).chain(args.iter().copied()).map(OsString::from).collect();
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin")), ("K".into(), "v".into())];
        let w_fd = w;
        let spec = SpawnSpec {
            program: OsStr::new(program),
            args: &argv,
            env: &env,
            cwd,
            fds: &[(1, w_fd.as_fd())],
            session: Session::NewProcessGroup,
            cgroup: None,
            protection: Protection::default(),
        };
        let mut child = spawn_with_mode(&spec, mode)?;
        drop(w_fd);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut out).unwrap();
        Ok((child.wait().unwrap(), out))
    }

    #[test]
    fn both_modes_run_a_program_with_its_argv_env_cwd_and_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [SpawnMode::Vfork, SpawnMode::Fork] {
            let (status, out) = run(mode, "sh", &["-c", "echo \"$0 $1 $K $(pwd)\"; exit 3", "x"], dir.path()).unwrap();
            assert_eq!(status.code(), Some(3), "{mode:?}");
            assert_eq!(String::from_utf8_lossy(&out), format!("x  v {}\n", dir.path().display()), "{mode:?}");
        }
    }

    #[test]
    fn failures_before_exec_name_their_step_and_errno() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [SpawnMode::Vfork, SpawnMode::Fork] {
            let err = run(mode, "no-such-program-here", &[], dir.path()).unwrap_err();
            assert!(
                matches!(&err, SpawnError::Child { step: "exec", source } if source.raw_os_error() == Some(libc::ENOENT)),
                "{mode:?}: {err:?}"
            );
            let err = run(mode, "true", &[], Path::new("/no/such/dir")).unwrap_err();
            assert!(matches!(&err, SpawnError::Child { step: "changing to the working directory", .. }), "{err:?}");
        }
        let err = run(SpawnMode::Vfork, "a\0b", &[], dir.path()).unwrap_err();
        assert!(matches!(err, SpawnError::Invalid { .. }), "{err:?}");
    }

    #[test]
    fn a_child_gets_a_fresh_process_group_and_a_pidfd() {
        let dir = tempfile::tempdir().unwrap();
        let argv = [OsString::from("sleep"), OsString::from("5")];
        let null = std::fs::File::open("/dev/null").unwrap();
        let spec = SpawnSpec {
            program: OsStr::new("/bin/sleep"),
            args: &argv,
            env: &[],
            cwd: dir.path(),
            fds: &[(0, null.as_fd())],
            session: Session::NewProcessGroup,
            cgroup: None,
            protection: Protection::default(),
        };
        let mut child = spawn(&spec).unwrap();
        // SAFETY: getpgid(2) takes a pid.
        assert_eq!(unsafe { libc::getpgid(child.id() as i32) }, child.id() as i32);
        assert!(child.pidfd().is_some());
        assert!(!child.has_exited(false).unwrap());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
