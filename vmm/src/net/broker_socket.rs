//! The broker socket: the `SOCK_SEQPACKET` Unix socket in the sandbox directory through which
//! the daemon reaches a VM's network stack ([`crate::net::broker`] is what travels on it).
//!
//! The worker binds and listens on it ([`listen`]) while it builds or restores its VM, before it
//! is confined: a restored or forked VM gets a listener of its own, bound by the worker that
//! runs it. The daemon connects ([`connect`]) after every boot, restore, fork or attach; the
//! stack takes the newest connection and refuses everything while none is there. It never
//! reads or writes messages (the broker module does) and never opens anything but a Unix
//! socket.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::MAX_UDS_PATH_BYTES;

/// How many daemon connections may wait to be accepted (one daemon; a second replaces it).
const LISTEN_BACKLOG: libc::c_int = 4;

/// Why the broker socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum BrokerSocketError {
    /// The path does not fit a `sockaddr_un`.
    #[error("the broker socket path {path} must be 1..={MAX_UDS_PATH_BYTES} bytes")]
    PathLength {
        /// The path.
        path: PathBuf,
    },
    /// Creating the socket failed.
    #[error("creating a SEQPACKET Unix socket failed")]
    Socket(#[source] std::io::Error),
    /// A stale socket file could not be removed.
    #[error("removing the stale broker socket {path} failed")]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Binding, restricting or listening failed.
    #[error("listening on the broker socket {path} failed")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed (no worker listens there).
    #[error("connecting to the broker socket {path} failed")]
    Connect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A `sockaddr_un` for `path`, and its length.
fn address(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), BrokerSocketError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_UDS_PATH_BYTES || bytes.contains(&0) {
        return Err(BrokerSocketError::PathLength { path: path.to_path_buf() });
    }
    // SAFETY: sockaddr_un is plain old data; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A new blocking, close-on-exec `SOCK_SEQPACKET` Unix socket.
fn seqpacket_socket() -> Result<OwnedFd, BrokerSocketError> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(BrokerSocketError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: socket just returned this descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a listening `SOCK_SEQPACKET` socket at `path` (mode 0600), replacing a stale socket
/// file left there by an earlier worker.
pub fn listen(path: &Path) -> Result<OwnedFd, BrokerSocketError> {
    let (addr, len) = address(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(BrokerSocketError::RemoveStale { path: path.to_path_buf(), source }),
    }
    let socket = seqpacket_socket()?;
    let failed = |source| BrokerSocketError::Listen { path: path.to_path_buf(), source };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    if unsafe { libc::bind(socket.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    // SAFETY: listen(2) on a socket we own; no memory is passed.
    if unsafe { libc::listen(socket.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(socket)
}

/// Connects to the worker listening at `path` (blocking; the worker accepts at once, from its
/// device-event thread). The daemon's end of the broker channel.
pub fn connect(path: &Path) -> Result<OwnedFd, BrokerSocketError> {
    let (addr, len) = address(path)?;
    let socket = seqpacket_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    if unsafe { libc::connect(socket.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) } != 0 {
        return Err(BrokerSocketError::Connect { path: path.to_path_buf(), source: std::io::Error::last_os_error() });
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::broker::{self, WorkerToBroker};

    #[test]
    fn a_stale_socket_is_replaced_and_the_new_one_is_private_and_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.sock");
        let first = listen(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the old socket file stays behind");
        let listener = listen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let daemon = connect(&path).unwrap();
        // SAFETY: accept4 with null address pointers writes nothing; the result is checked.
        let fd = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        assert!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
        // SAFETY: accept4 just returned this descriptor.
        let worker = unsafe { OwnedFd::from_raw_fd(fd) };
        let message = WorkerToBroker::Blocked { what: "x".into() };
        broker::send(&worker, &message, None).unwrap();
        let (got, _) = broker::receive::<WorkerToBroker>(&daemon).unwrap();
        assert_eq!(got, message);
    }

    #[test]
    fn paths_that_do_not_fit_are_refused_and_nobody_listening_is_an_error() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(MAX_UDS_PATH_BYTES)));
        assert!(matches!(listen(&long), Err(BrokerSocketError::PathLength { .. })));
        assert!(matches!(listen(Path::new("")), Err(BrokerSocketError::PathLength { .. })));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(connect(&dir.path().join("none.sock")), Err(BrokerSocketError::Connect { .. })));
    }
}
