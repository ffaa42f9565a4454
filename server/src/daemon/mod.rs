//! The host daemon: the one process that owns a state directory (its registry, its sandboxes,
//! their workers), and serves every MCP client on the host through a Unix socket in that
//! directory.
//!
//! ```text
//! MCP client ─stdio─ capsule serve (relay) ─┐
//! MCP client ─stdio─ capsule serve (relay) ─┼─ <state>/capsule.sock ── capsule daemon ── manager ── workers
//! capsule serve --transport http (holder) ──┘                              │
//! HTTP clients ─────────────────── 127.0.0.1:8765 (a listener of the daemon)┘
//! ```
//!
//! - [`socket`]: the private state directory, the owner lock, the socket and its peer check;
//! - [`hello`]: the first line of each connection (what the caller wants);
//! - [`open`]: the engine the daemon opens;
//! - [`connection`]: serving one connection (MCP, an HTTP listener, `ps`, `shutdown`);
//! - [`client`]: the caller's side: reaching the daemon, starting it when none runs, the
//!   stdio relay and the HTTP holder.
//!
//! The daemon exits on SIGTERM/SIGINT or a `shutdown` hello (pausing every running sandbox
//! first, so that they survive a host reboot), and by itself once it has had no client and no
//! running sandbox for `--idle-exit`. A `kill -9` of the daemon stops no sandbox: workers run on,
//! and the next daemon finds them again.

pub mod client;
pub mod connection;
pub mod hello;
pub mod open;
pub mod relay;
pub mod socket;

use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_vmm::worker::error_chain;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError};
use crate::mcp::shaping::Shaping;
use crate::registry::{Registry, RegistryError};
use crate::sandbox::{timers, Manager, ManagerError};
use crate::settings::{resolve, Resolved, SettingsArgs, SettingsError};
use socket::{OwnerLock, SocketError};

/// How long the daemon stays without clients and without running sandboxes before it exits.
pub const DEFAULT_IDLE_EXIT: &str = "60s";
/// How often the daemon looks whether it is idle.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Arguments of `capsule daemon` (started by `capsule serve`; rarely by hand).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// The settings of the daemon.
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Exit after this long with no client and no running sandbox (e.g. 60s, 10m).
    #[arg(long, default_value = DEFAULT_IDLE_EXIT, env = "CAPSULE_DAEMON_IDLE_EXIT")]
    pub idle_exit: String,
    /// Internal: a descriptor to write one line to once the daemon serves (or cannot).
    #[arg(long, hide = true)]
    pub ready_fd: Option<RawFd>,
}

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The settings are invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// `--idle-exit` is not a duration.
    #[error("invalid --idle-exit")]
    IdleExit(#[source] ConfigError),
    /// The state directory, its lock or its socket cannot be used.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// No engine can run.
    #[error(transparent)]
    Open(#[from] open::OpenError),
    /// The registry could not be opened.
    #[error("cannot open the registry")]
    Registry(#[source] RegistryError),
    /// The manager could not load the registry's sandboxes.
    #[error("cannot load sandboxes")]
    Manager(#[source] ManagerError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// What every connection of the daemon shares.
pub struct Daemon {
    /// The sandboxes.
    pub manager: Manager,
    /// How results look.
    pub shaping: Shaping,
    /// The digest of the daemon's settings.
    pub settings_digest: String,
    /// Connected MCP clients and HTTP holders.
    clients: AtomicUsize,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
}

impl Daemon {
    /// Counts a client for as long as the returned guard lives.
    pub fn client(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::AcqRel);
        ClientGuard(self.clone())
    }
}

/// A connected client (see [`Daemon::client`]).
pub struct ClientGuard(Arc<Daemon>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells the process that started the daemon how its start went (one JSON line on `fd`).
fn report_ready(fd: Option<RawFd>, outcome: Result<(), String>) {
    let Some(fd) = fd else { return };
    // SAFETY: the spawner handed us `fd` as the write end of a pipe for this one line.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let line = match outcome {
        Ok(()) => serde_json::json!({ "ok": true }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let _ = std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes());
}

/// Runs `capsule daemon` until it is told to stop or has been idle for `--idle-exit`.
pub fn run(args: DaemonArgs) -> Result<(), DaemonError> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG").unwrap_or_else(|_| "capsule=info".into()),
        )
        .try_init();
    let started = start(&args);
    let (resolved, lock, idle_exit) = match started {
        Ok(started) => started,
        Err(e) => {
            report_ready(args.ready_fd, Err(error_chain(&e)));
            return Err(e);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
        .inspect_err(|e| report_ready(args.ready_fd, Err(error_chain(e))))?;
    let result = runtime.block_on(serve(resolved, idle_exit, args.ready_fd));
    drop(lock);
    result
}

/// Resolves the settings and takes the state directory's lock.
fn start(args: &DaemonArgs) -> Result<(Resolved, OwnerLock, Duration), DaemonError> {
    let resolved = resolve(&args.settings)?;
    let idle_exit = config::parse_duration(&args.idle_exit).map_err(DaemonError::IdleExit)?;
    socket::ensure_private_dir(&resolved.state_dir)?;
    let lock = OwnerLock::acquire(&resolved.state_dir)?;
    Ok((resolved, lock, idle_exit))
}

async fn serve(resolved: Resolved, idle_exit: Duration, ready_fd: Option<RawFd>) -> Result<(), DaemonError> {
    let opened = async {
        let engine = open::choose_engine(resolved.engine, resolved.unsafe_test_engine, &resolved.state_dir)?;
        let registry = Registry::open(&resolved.state_dir).map_err(DaemonError::Registry)?;
        let manager = Manager::open(engine, registry, resolved.manager.clone()).map_err(DaemonError::Manager)?;
        let listener = socket::bind(&resolved.state_dir)?;
        Ok::<_, DaemonError>((manager, listener))
    }
    .await;
    let (manager, listener) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            report_ready(ready_fd, Err(error_chain(&e)));
            return Err(e);
        }
    };
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .map_err(|source| SocketError::Io { what: "cannot listen on", path: resolved.state_dir.clone(), source })?;
    tracing::info!(
        engine = manager.engine_name(),
        state_dir = %resolved.state_dir.display(),
        pid = std::process::id(),
        "capsule daemon serving"
    );
    report_ready(ready_fd, Ok(()));
    let daemon = Arc::new(Daemon {
        manager: manager.clone(),
        shaping: resolved.shaping,
        settings_digest: resolved.digest(),
        clients: AtomicUsize::new(0),
        shutdown: CancellationToken::new(),
    });
    let timer_task = timers::spawn(manager.clone());
    let mut idle_check = tokio::time::interval(IDLE_CHECK_EVERY);
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move { connection::serve(daemon, stream).await });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a connection failed"),
            },
            _ = idle_check.tick() => {
                let busy = daemon.clients.load(Ordering::Acquire) > 0 || manager.holds_running();
                match (busy, idle_since) {
                    (true, _) => idle_since = None,
                    (false, None) => idle_since = Some(Instant::now()),
                    (false, Some(since)) if since.elapsed() >= idle_exit => {
                        tracing::info!(idle_s = since.elapsed().as_secs(), "no clients and no running sandboxes; exiting");
                        break;
                    }
                    (false, Some(_)) => {}
                }
            }
            _ = daemon.shutdown.cancelled() => break,
            _ = shutdown_signal() => break,
        }
    }
    // New clients start a new daemon, which waits for this one's lock.
    let _ = std::fs::remove_file(resolved.state_dir.join(socket::SOCKET_FILE));
    daemon.shutdown.cancel();
    timer_task.abort();
    manager.pause_all().await;
    tracing::info!("capsule daemon stopped");
    Ok(())
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
