//! The guest side of vsock: a listening `AF_VSOCK` stream socket.
//!
//! Owns the raw socket calls only. Accepted connections are handed out as
//! [`UnixStream`]s: std's Unix stream methods (read, write, try_clone,
//! shutdown) are plain fd operations that work on any stream socket, and the
//! server needs nothing address-specific. Every fd is close-on-exec, so
//! commands the agent runs never inherit the listener or a connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Connections waiting to be accepted.
const LISTEN_BACKLOG: i32 = 128;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for any CID. Fails (e.g. `EAFNOSUPPORT`) when the
    /// kernel has no vsock transport.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) takes plain integers.
        let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a socket fd we own.
        if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            // SAFETY: accept4(2) with null address pointers is allowed; the fd is ours.
            let raw = unsafe {
                libc::accept4(self.fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
            };
            if raw >= 0 {
                // SAFETY: `raw` is a fresh connected stream socket that nothing else owns.
                return Ok(unsafe { UnixStream::from_raw_fd(raw) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
