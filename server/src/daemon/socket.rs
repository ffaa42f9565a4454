//! The daemon's door: the state directory it owns (mode 0700, owned by the user), the lock that
//! proves one owner, and the Unix socket clients connect to (mode 0600, peers checked with
//! `SO_PEERCRED`).
//!
//! ```text
//! <state dir>/            0700, owned by the daemon's user
//!   daemon.lock           flock(2)ed by the one daemon for as long as it runs; holds its pid
//!   capsule.sock          0600; only the state directory's owner may connect
//!   daemon.log            the daemon's stderr (rotated once at DAEMON_LOG_MAX_BYTES)
//! ```
//!
//! It owns these files and the checks on them; it never speaks MCP.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use capsule_vmm::config::MAX_UDS_PATH_BYTES;

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "daemon.lock";
/// The socket's name in the state directory.
pub const SOCKET_FILE: &str = "capsule.sock";
/// The daemon log's name in the state directory.
pub const LOG_FILE: &str = "daemon.log";
/// The log is moved aside (to `daemon.log.1`) when a daemon starts and finds it this big.
pub const DAEMON_LOG_MAX_BYTES: u64 = 16 << 20;

/// Errors of the state directory, its lock and its socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state directory belongs to someone else or is open to others.
    #[error(
        "the state directory {path} is owned by uid {owner} with mode {mode:o}; capsule needs it owned by you \
         (uid {me}) with mode 700, because whoever can reach its socket can run code in your sandboxes"
    )]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// Our uid.
        me: u32,
    },
    /// Another daemon holds the lock.
    #[error("another capsule daemon (pid {pid}) owns {dir}")]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The owner's pid, as its lock file says.
        pid: String,
    },
    /// The socket path does not fit a `sockaddr_un`.
    #[error("the socket path {0} is longer than {MAX_UDS_PATH_BYTES} bytes; use a shorter --state-dir")]
    PathTooLong(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io { what, path: path.to_path_buf(), source }
}

/// This process's effective uid.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates the state directory (mode 0700) if it is missing, and checks that it is ours and
/// closed to everyone else.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SocketError> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(SocketError::Io { what: "cannot create the state directory", path: dir.into(), source: e })
        }
    }
    let meta = std::fs::metadata(dir).map_err(io_err("cannot read the state directory", dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    let me = my_uid();
    if meta.uid() != me || mode & 0o077 != 0 {
        return Err(SocketError::Unsafe { path: dir.into(), owner: meta.uid(), mode, me });
    }
    Ok(())
}

/// The socket path of the daemon for `dir`.
pub fn socket_path(dir: &Path) -> Result<PathBuf, SocketError> {
    let path = dir.join(SOCKET_FILE);
    if path.as_os_str().len() > MAX_UDS_PATH_BYTES {
        return Err(SocketError::PathTooLong(path));
    }
    Ok(path)
}

/// The lock that makes a process the one owner of a state directory; released when dropped
/// (or when the process dies, by the kernel).
#[derive(Debug)]
pub struct OwnerLock {
    file: File,
}

impl OwnerLock {
    /// Takes the lock of `dir` without waiting, and writes this process's pid into it.
    pub fn acquire(dir: &Path) -> Result<OwnerLock, SocketError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("cannot open the lock file", &path))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(SocketError::Locked { dir: dir.into(), pid: pid.trim().to_string() });
            }
            return Err(SocketError::Io { what: "cannot lock", path, source: error });
        }
        file.set_len(0).map_err(io_err("cannot write the lock file", &path))?;
        file.rewind().map_err(io_err("cannot write the lock file", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("cannot write the lock file", &path))?;
        Ok(OwnerLock { file })
    }

    /// Whether some process holds the lock of `dir` (without taking it).
    pub fn is_held(dir: &Path) -> bool {
        let Ok(file) = File::open(dir.join(LOCK_FILE)) else { return false };
        // SAFETY: flock(2) on a descriptor we own; a shared lock we take is released at once.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        if taken {
            // SAFETY: as above.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
        !taken
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on the descriptor we own.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Binds the daemon's socket in `dir` (whose lock the caller holds, so a socket file found
/// there is stale) with mode 0600.
pub fn bind(dir: &Path) -> Result<std::os::unix::net::UnixListener, SocketError> {
    let path = socket_path(dir)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::Io { what: "cannot remove the stale socket", path, source: e }),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(io_err("cannot listen on", &path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot set the permissions of", &path))?;
    Ok(listener)
}

/// The uid of the process at the other end of `socket` (`SO_PEERCRED`).
pub fn peer_uid(socket: &impl AsRawFd) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`, which is that big.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Opens the daemon log of `dir` for appending, moving a log past [`DAEMON_LOG_MAX_BYTES`]
/// aside first.
pub fn open_log(dir: &Path) -> Result<File, SocketError> {
    let path = dir.join(LOG_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > DAEMON_LOG_MAX_BYTES) {
        let _ = std::fs::rename(&path, dir.join(format!("{LOG_FILE}.1")));
    }
    OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io_err("cannot open the log", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_owns_a_state_directory_and_others_are_told_who() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        ensure_private_dir(&state).unwrap();
        let lock = OwnerLock::acquire(&state).unwrap();
        assert!(OwnerLock::is_held(&state));
        // flock is per open file description: a second open in this process contends like another process.
        match OwnerLock::acquire(&state) {
            Err(SocketError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("a second owner was allowed: {other:?}"),
        }
        drop(lock);
        assert!(!OwnerLock::is_held(&state));
        OwnerLock::acquire(&state).expect("free again");
    }

    #[test]
    fn a_state_directory_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        match ensure_private_dir(dir.path()) {
            Err(SocketError::Unsafe { mode, .. }) => assert_eq!(mode, 0o755),
            other => panic!("an open directory was accepted: {other:?}"),
        }
    }

    #[test]
    fn the_socket_is_private_and_names_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let listener = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(SOCKET_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = std::os::unix::net::UnixStream::connect(dir.path().join(SOCKET_FILE)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(peer_uid(&server).unwrap(), my_uid());
        assert_eq!(peer_uid(&client).unwrap(), my_uid());
        // A stale socket file is replaced.
        drop(listener);
        bind(dir.path()).expect("rebind over the stale socket");
    }
}
