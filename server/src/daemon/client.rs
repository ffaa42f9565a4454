//! The caller's side of the daemon: reaching the daemon of a state directory (starting it when
//! none runs), the stdio relay that `capsule serve` is, the holder of an HTTP listener that
//! `capsule serve --transport http` is, and `capsule ps` / `capsule shutdown`.
//!
//! Starting: when no daemon answers and none holds the state directory's lock, the caller
//! starts `capsule daemon` with its own settings, detached (a session of its own, stdin and
//! stdout closed, stderr to `daemon.log`), and waits for the daemon's one ready line on a pipe.
//! Two callers racing both start one; the loser finds the lock held and the winner's socket.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::hello::{Hello, Welcome, HELLO_VERSION};
use super::socket::{self, OwnerLock, SocketError};
use crate::settings::{Resolved, SettingsArgs};

/// How long a caller waits for a daemon to start (or to finish stopping).
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two attempts to reach a daemon that is starting.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Errors of reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The state directory or its socket cannot be used.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The daemon could not be started.
    #[error("cannot start the capsule daemon")]
    Spawn(#[source] std::io::Error),
    /// The daemon started but could not serve.
    #[error("the capsule daemon could not start: {0}")]
    DaemonFailed(String),
    /// No daemon answered in time.
    #[error("no capsule daemon answered on {socket} within {waited:?}; see {log}")]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// The daemon's log.
        log: PathBuf,
    },
    /// The daemon refused the request.
    #[error("the capsule daemon refused: {0}")]
    Refused(String),
    /// Talking to the daemon failed.
    #[error("talking to the capsule daemon failed")]
    Io(#[source] std::io::Error),
    /// No daemon runs (for requests that do not start one).
    #[error("no capsule daemon is running for {0}")]
    NotRunning(PathBuf),
}

/// Connects to the daemon of `state_dir` if one is serving.
pub fn connect(state_dir: &Path) -> Result<Option<UnixStream>, ClientError> {
    let path = socket::socket_path(state_dir)?;
    match UnixStream::connect(&path) {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(e) => Err(SocketError::Io { what: "cannot connect to", path, source: e }.into()),
    }
}

/// Connects to the daemon of the resolved state directory, starting one with `settings` when
/// none runs.
pub fn connect_or_start(settings: &SettingsArgs, resolved: &Resolved) -> Result<UnixStream, ClientError> {
    let dir = &resolved.state_dir;
    socket::ensure_private_dir(dir)?;
    let started = Instant::now();
    loop {
        if let Some(stream) = connect(dir)? {
            return Ok(stream);
        }
        if !OwnerLock::is_held(dir) {
            start_daemon(settings, resolved)?;
            continue;
        }
        // A daemon is starting, or stopping (then the next start waits for its lock).
        if started.elapsed() >= DAEMON_START_TIMEOUT {
            return Err(ClientError::Timeout {
                socket: dir.join(socket::SOCKET_FILE),
                waited: started.elapsed(),
                log: dir.join(socket::LOG_FILE),
            });
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

/// Starts a daemon for `resolved.state_dir` and waits for its ready line. A daemon that finds
/// another one owning the directory reports that, which is not an error here.
fn start_daemon(settings: &SettingsArgs, resolved: &Resolved) -> Result<(), ClientError> {
    let exe = std::env::current_exe().map_err(ClientError::Spawn)?;
    let log = socket::open_log(&resolved.state_dir)?;
    let (ready_read, ready_write) = pipe().map_err(ClientError::Spawn)?;
    let settings = SettingsArgs { state_dir: Some(resolved.state_dir.clone()), ..settings.clone() };
    let mut command = Command::new(exe);
    command
        .arg("daemon")
        .args(settings.to_args())
        .args(["--ready-fd", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let write_fd = ready_write.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2(2) and
    // setsid(2), which are async-signal-safe and touch no memory of ours.
    unsafe {
        command.pre_exec(move || {
            // Fd 3 for the ready line (dup2 leaves the copy without FD_CLOEXEC), and a session of
            // its own: the daemon must outlive this process and its process group.
            if libc::dup2(write_fd, 3) < 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(ClientError::Spawn)?;
    drop(ready_write);
    // Reap it whenever it ends, so that a long-lived caller leaves no zombie.
    let _ = std::thread::Builder::new().name("reap-daemon".into()).spawn(move || {
        let _ = child.wait();
    });
    let mut line = String::new();
    let _ = BufReader::new(std::fs::File::from(ready_read)).read_line(&mut line);
    let ready: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    if ready.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
        return Ok(());
    }
    let error = ready.get("error").and_then(serde_json::Value::as_str).unwrap_or("it exited before it was ready");
    if error.contains("another capsule daemon") {
        return Ok(());
    }
    Err(ClientError::DaemonFailed(format!("{error} (log: {})", resolved.state_dir.join(socket::LOG_FILE).display())))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`, which has room for two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just made these descriptors, and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `hello` on `stream` and reads the daemon's welcome. Returns the reader (which may
/// already hold what the daemon sent after the welcome).
pub fn greet(stream: &UnixStream, hello: &Hello) -> Result<(BufReader<UnixStream>, Welcome), ClientError> {
    let mut writer = stream.try_clone().map_err(ClientError::Io)?;
    let line = serde_json::to_string(hello).map_err(|e| ClientError::Io(std::io::Error::other(e)))?;
    writer.write_all(format!("{line}\n").as_bytes()).map_err(ClientError::Io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(ClientError::Io)?);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(ClientError::Io)?;
    let welcome: Welcome = serde_json::from_str(answer.trim())
        .map_err(|e| ClientError::Io(std::io::Error::other(format!("the daemon's answer is not valid: {e}"))))?;
    if !welcome.ok {
        return Err(ClientError::Refused(welcome.message.unwrap_or_default()));
    }
    if let Some(warning) = &welcome.message {
        eprintln!("capsule: {warning}");
    }
    Ok((reader, welcome))
}

/// Relays MCP between this process's stdin/stdout and the daemon (`capsule serve` over stdio)
/// until the client closes stdin and the daemon has answered everything, or the daemon goes.
pub fn relay_stdio(settings: &SettingsArgs, resolved: &Resolved, owner: Option<String>) -> Result<(), ClientError> {
    let stream = connect_or_start(settings, resolved)?;
    let hello = Hello::Mcp { version: HELLO_VERSION, owner, settings: resolved.digest() };
    let (from_daemon, _) = greet(&stream, &hello)?;
    let to_daemon = stream.try_clone().map_err(ClientError::Io)?;
    super::relay::relay(to_daemon, from_daemon).map_err(ClientError::Io)
}

/// Asks the daemon of `state_dir` for every sandbox; `None` when no daemon runs.
pub fn ps(state_dir: &Path) -> Result<Option<Vec<crate::ps::PsRow>>, ClientError> {
    let Some(stream) = connect(state_dir)? else { return Ok(None) };
    let (mut reader, _) = greet(&stream, &Hello::Ps { version: HELLO_VERSION })?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(ClientError::Io)?;
    serde_json::from_str(line.trim()).map(Some).map_err(|e| ClientError::Io(std::io::Error::other(e)))
}

/// Asks the daemon of `state_dir` to pause every running sandbox and exit, and waits until it
/// has.
pub fn shutdown(state_dir: &Path) -> Result<u32, ClientError> {
    let Some(stream) = connect(state_dir)? else { return Err(ClientError::NotRunning(state_dir.into())) };
    let (_, welcome) = greet(&stream, &Hello::Shutdown { version: HELLO_VERSION })?;
    let started = Instant::now();
    while OwnerLock::is_held(state_dir) {
        if started.elapsed() >= DAEMON_START_TIMEOUT {
            return Err(ClientError::Timeout {
                socket: state_dir.join(socket::SOCKET_FILE),
                waited: started.elapsed(),
                log: state_dir.join(socket::LOG_FILE),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(welcome.pid)
}
