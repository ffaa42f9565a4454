//! The capsule guest agent binary.
//!
//! - `capsule-agent --listen-unix PATH [--work-dir DIR] [--state-dir DIR] [--cgroup-root DIR]`:
//!   serves the protocol on a Unix socket as an ordinary host process (tests,
//!   the fake engine). Machine-wide operations answer `Unsupported`. With
//!   `--cgroup-root` (a cgroup v2 directory the caller owns) it contains its
//!   commands as in a guest, moving itself into `DIR/agent`.
//! - As PID 1 of a guest (or with `--pid1`, which must never be used on a
//!   host: it mounts over `/`): protects itself (`oom_score_adj`, open-files
//!   limit), sets up the filesystems, the overlay root and its cgroups (under
//!   `/sys/fs/cgroup`, or `--cgroup-root`), prints `capsule-agent: init ok`,
//!   then serves on vsock port [`AGENT_VSOCK_PORT`] and prints
//!   `capsule-agent ready`. Arguments it does not know are ignored there (the
//!   kernel passes its own to init). With `--listen-unix PATH` it serves there
//!   instead of vsock (PID 1 tests in a pid + mount namespace).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsule_agent::budget::{protect_self, Protection};
use capsule_agent::cgroup::CgroupTree;
use capsule_agent::init;
use capsule_agent::protocol::AGENT_VSOCK_PORT;
use capsule_agent::server::{Agent, AgentConfig};
use capsule_agent::vsock::VsockListener;

/// What the agent prints once it serves.
const READY_LINE: &str = "capsule-agent ready";
/// Default working directory in a guest.
const GUEST_WORK_DIR: &str = "/root";
/// Default state directory in a guest: on the writable overlay root (disk
/// backed), so output files do not live in guest RAM.
const GUEST_STATE_DIR: &str = "/var/lib/capsule";
/// State directory when the overlay root is missing (`/` is read-only): a tmpfs.
const GUEST_FALLBACK_STATE_DIR: &str = "/run/capsule";
/// Pause between attempts to listen on vsock.
const VSOCK_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often a persisting vsock failure is repeated on the console.
const VSOCK_FAILURE_REPEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Args {
    listen_unix: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    pid1: bool,
}

fn parse_args(strict: bool) -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().map(PathBuf::from).ok_or(format!("{name} needs a value"));
        match arg.to_str() {
            Some("--listen-unix") => args.listen_unix = Some(value("--listen-unix")?),
            Some("--work-dir") => args.work_dir = Some(value("--work-dir")?),
            Some("--state-dir") => args.state_dir = Some(value("--state-dir")?),
            Some("--cgroup-root") => args.cgroup_root = Some(value("--cgroup-root")?),
            Some("--pid1") => args.pid1 = true,
            _ if !strict => {}
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(args)
}

const USAGE: &str = "usage: capsule-agent --listen-unix PATH [--work-dir DIR] [--state-dir DIR] [--cgroup-root DIR]   \
                     (as PID 1: no arguments needed)";

fn main() {
    // SAFETY: getpid(2) has no preconditions.
    let is_pid1 = unsafe { libc::getpid() } == 1;
    let args = match parse_args(!is_pid1) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("capsule-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if is_pid1 || args.pid1 {
        pid1_main(args)
    } else {
        host_main(args)
    }
}

fn host_main(args: Args) {
    let Some(path) = args.listen_unix else {
        eprintln!("capsule-agent: --listen-unix is required outside a guest\n{USAGE}");
        std::process::exit(2);
    };
    let work_dir = args.work_dir.unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| "/".into()));
    let state_dir =
        args.state_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("capsule-agent-{}", std::process::id())));
    let protection = protected(false);
    let config = AgentConfig { work_dir, state_dir, pid1: false, cgroup_root: args.cgroup_root, protection };
    serve_unix(Agent::new(config), &path)
}

/// [`protect_self`], logging what failed.
fn protected(guest: bool) -> Protection {
    let (protection, errors) = protect_self(guest);
    for e in errors {
        let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
        init::console(&format!("capsule-agent: {e}{cause}"));
    }
    protection
}

fn pid1_main(args: Args) -> ! {
    init::install_panic_hook();
    let overlay_ok = init::setup_filesystems();
    // After /proc is mounted: oom_score_adj lives there.
    let protection = protected(true);
    if overlay_ok {
        init::console(init::INIT_OK_LINE);
    } else {
        init::console("capsule-agent: init incomplete: no writable overlay root (see above)");
    }
    init::setup_identity();
    init::setup_network();
    let work_dir = args.work_dir.unwrap_or_else(|| GUEST_WORK_DIR.into());
    let default_state_dir = if overlay_ok { GUEST_STATE_DIR } else { GUEST_FALLBACK_STATE_DIR };
    let state_dir = args.state_dir.unwrap_or_else(|| default_state_dir.into());
    let listen_unix = args.listen_unix;
    let cgroup_root = args.cgroup_root.unwrap_or_else(|| init::CGROUP_MOUNT.into());
    // PID 1 moves itself into the agent's cgroup before it forks the server
    // (which inherits it and sets the tree up again, idempotently).
    if let Err(e) = CgroupTree::establish(&cgroup_root) {
        init::console(&format!("capsule-agent: no containment: {}", capsule_agent::frame::error_chain(&e)));
    }
    init::init_loop(move || {
        let config = AgentConfig {
            work_dir: work_dir.clone(),
            state_dir: state_dir.clone(),
            pid1: true,
            cgroup_root: Some(cgroup_root.clone()),
            protection,
        };
        let agent = Agent::new(config);
        match &listen_unix {
            // Tests of PID 1 mode in a namespace reach it through /proc/<pid>/root/<path>.
            Some(path) => serve_unix(agent, path),
            None => serve_vsock(agent),
        }
    })
}

/// Listens on a Unix socket and serves (host mode, and PID 1 tests).
fn serve_unix(agent: std::sync::Arc<Agent>, path: &std::path::Path) -> ! {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("capsule-agent: cannot listen on {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    init::console(READY_LINE);
    agent.serve(|| listener.accept().map(|(stream, _)| stream))
}

/// The server child of PID 1: listens on vsock (retrying while it is missing) and serves.
fn serve_vsock(agent: std::sync::Arc<Agent>) -> ! {
    let mut last_report: Option<Instant> = None;
    let listener = loop {
        match VsockListener::bind(AGENT_VSOCK_PORT) {
            Ok(l) => break l,
            Err(e) => {
                if last_report.is_none_or(|t| t.elapsed() >= VSOCK_FAILURE_REPEAT) {
                    init::console(&format!(
                        "capsule-agent: cannot listen on vsock port {AGENT_VSOCK_PORT}: {e}; retrying every second"
                    ));
                    last_report = Some(Instant::now());
                }
                std::thread::sleep(VSOCK_RETRY_PAUSE);
            }
        }
    };
    init::console(READY_LINE);
    agent.serve(|| listener.accept())
}
