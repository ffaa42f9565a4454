//! The network broker protocol: how a VM's worker (which runs the guest's user-space TCP/IP
//! stack) asks the daemon for what the guest wants to reach, and how the daemon, which alone
//! decides under the sandbox's policy and alone holds internet sockets, answers.
//!
//! The worker never gets an internet socket. For each guest TCP connection the daemon allows,
//! it connects upstream itself and hands the worker one end of a Unix stream socket pair
//! (`SCM_RIGHTS`) that carries the connection's bytes both ways; the daemon splices the other
//! end to the upstream socket. So the worker's seccomp filter keeps `socket` to `AF_UNIX`, and
//! nothing the guest does can widen what it reaches. Exposed ports go the other way: the daemon
//! accepts on the host and hands the worker a stream to connect into the guest.
//!
//! Transport: a `SOCK_SEQPACKET` connection. The worker listens on it (a socket in the sandbox
//! directory, bound before the worker is confined) and the daemon connects, after each spawn or
//! attach; with no daemon connected the worker refuses what the guest asks ("fail closed").
//! Each packet is one JSON message of at most [`MAX_BROKER_MESSAGE_BYTES`], with at most one file
//! descriptor attached, and only on the messages that say so. Anything else closes the channel.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// Largest broker message, in bytes.
pub const MAX_BROKER_MESSAGE_BYTES: usize = 16 * 1024;
/// Longest DNS name a message may carry (RFC 1035: 253 characters in text form).
pub const MAX_DNS_NAME_BYTES: usize = 253;
/// Most addresses one `Resolved` carries.
pub const MAX_RESOLVED_ADDRS: usize = 32;

/// What the guest sent first on a connection to port 80 or 443, for the daemon to check against
/// the name it may reach (so that an allowed address cannot front for another name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirstBytes {
    /// The server name of a TLS ClientHello.
    TlsServerName(String),
    /// The `Host` header of an HTTP/1.x request.
    HttpHost(String),
    /// Neither could be found in what the guest sent first (it is not TLS or HTTP, or it hid them).
    Unrecognized,
}

/// Address families a resolution asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// IPv4 (DNS type A).
    V4,
    /// IPv6 (DNS type AAAA).
    V6,
}

/// Worker → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerToBroker {
    /// Open a TCP connection to `dst` for the guest. `name`: the name the guest resolved `dst`
    /// from through the sandbox's resolver, if it did; `first_bytes`: for ports 80 and 443, what
    /// the guest sent first (the worker completes the guest's handshake and reads them before it
    /// asks). Answered by `Connected` (with a stream) or `Refused`.
    Connect { id: u64, dst: SocketAddr, name: Option<String>, first_bytes: Option<FirstBytes> },
    /// Resolve `name` for the guest's DNS query. Answered by `Resolved` or `NotResolved`.
    Resolve { id: u64, name: String, family: Family },
    /// The worker refused something by itself (a UDP datagram that is not DNS, an ICMP echo):
    /// for the daemon to report to the model.
    Blocked { what: String },
}

/// Daemon → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerToWorker {
    /// The connection of `Connect { id }` is open; a Unix stream carrying its bytes is attached.
    Connected { id: u64 },
    /// The connection of `Connect { id }` is not allowed or could not be made: why, in words the
    /// model reads ("private address; this server's policy is public").
    Refused { id: u64, reason: String },
    /// The answer to `Resolve { id }`: the addresses the guest may use, and how long (seconds)
    /// it may cache them.
    Resolved { id: u64, addrs: Vec<IpAddr>, ttl_s: u32 },
    /// `Resolve { id }` has no answer: the name does not exist (`nxdomain`), or the policy
    /// refuses it, or the host's resolver failed (`reason` says which).
    NotResolved { id: u64, nxdomain: bool, reason: String },
    /// A host client connected to the exposed guest port `guest_port`; a Unix stream carrying
    /// its bytes is attached, for the worker to connect into the guest.
    Inbound { guest_port: u16 },
}

impl BrokerToWorker {
    /// Whether this message comes with a stream.
    pub fn carries_stream(&self) -> bool {
        matches!(self, BrokerToWorker::Connected { .. } | BrokerToWorker::Inbound { .. })
    }
}

/// Errors of the broker channel.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("sending on the broker channel")]
    Send(#[source] std::io::Error),
    #[error("receiving on the broker channel")]
    Receive(#[source] std::io::Error),
    #[error("a broker message of {0} bytes is over the limit of {MAX_BROKER_MESSAGE_BYTES}")]
    TooLong(usize),
    #[error("a broker message is not valid: {0}")]
    Invalid(String),
    #[error("a broker message came with {got} file descriptors; it may carry {allowed}")]
    Descriptors { got: usize, allowed: usize },
    #[error("the broker channel is closed")]
    Closed,
}

/// Space for one `SCM_RIGHTS` control message with one descriptor.
const CONTROL_BYTES: usize = 64;

/// Sends `message` on the SEQPACKET socket `socket`, with `fd` attached when given.
pub fn send<T: Serialize>(socket: &impl AsRawFd, message: &T, fd: Option<&OwnedFd>) -> Result<(), BrokerError> {
    let bytes = serde_json::to_vec(message).map_err(|e| BrokerError::Invalid(e.to_string()))?;
    if bytes.len() > MAX_BROKER_MESSAGE_BYTES {
        return Err(BrokerError::TooLong(bytes.len()));
    }
    let iov = [IoSlice::new(&bytes)];
    let mut control = [0u8; CONTROL_BYTES];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iov.as_ptr() as *mut libc::iovec;
    header.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: msg_control points at `control`, which has room for one cmsghdr with one fd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: sendmsg(2) reads the buffers `header` points at, which outlive the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(BrokerError::Send(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Receives one message on the SEQPACKET socket `socket`, with the descriptor attached to it
/// (if any). A message past the size limit, with more than one descriptor, or not valid JSON
/// for `T` is an error (and any descriptors that came with it are closed).
pub fn receive<T: for<'de> Deserialize<'de>>(socket: &impl AsRawFd) -> Result<(T, Option<OwnedFd>), BrokerError> {
    let mut bytes = vec![0u8; MAX_BROKER_MESSAGE_BYTES + 1];
    let mut control = [0u8; CONTROL_BYTES];
    let mut iov = [IoSliceMut::new(&mut bytes)];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iov.as_mut_ptr().cast();
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = CONTROL_BYTES;
    // SAFETY: recvmsg(2) writes at most the buffer sizes given in `header`; MSG_CMSG_CLOEXEC
    // makes received descriptors close-on-exec.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(BrokerError::Receive(std::io::Error::last_os_error()));
    }
    let fds = received_descriptors(&header);
    if got == 0 {
        return Err(BrokerError::Closed);
    }
    let len = got as usize;
    if len > MAX_BROKER_MESSAGE_BYTES || header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(BrokerError::TooLong(len));
    }
    if fds.len() > 1 {
        return Err(BrokerError::Descriptors { got: fds.len(), allowed: 1 });
    }
    let message = serde_json::from_slice(&bytes[..len]).map_err(|e| BrokerError::Invalid(e.to_string()))?;
    Ok((message, fds.into_iter().next()))
}

/// The descriptors an `SCM_RIGHTS` control message of `header` carried, now owned.
fn received_descriptors(header: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg(2) wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    fds
}

/// A connected pair of `SOCK_SEQPACKET` sockets (for tests, and for a daemon that spawns a worker).
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two descriptors into `fds`.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair just made these, and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Checks what a `Resolve` or `Connect` carries from the guest side before anything acts on it.
pub fn validate(message: &WorkerToBroker) -> Result<(), BrokerError> {
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= MAX_DNS_NAME_BYTES
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    match message {
        WorkerToBroker::Resolve { name, .. } if !name_ok(name) => {
            Err(BrokerError::Invalid(format!("{name:?} is not a DNS name")))
        }
        WorkerToBroker::Connect { name: Some(name), .. } if !name_ok(name) => {
            Err(BrokerError::Invalid(format!("{name:?} is not a DNS name")))
        }
        WorkerToBroker::Connect {
            first_bytes: Some(FirstBytes::TlsServerName(host) | FirstBytes::HttpHost(host)),
            ..
        } if host.len() > MAX_DNS_NAME_BYTES + 6 => {
            Err(BrokerError::Invalid("the first bytes name a host too long".into()))
        }
        WorkerToBroker::Blocked { what } if what.len() > 512 => Err(BrokerError::Invalid("a report too long".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_message_and_its_stream_cross_together() {
        let (daemon, worker) = seqpacket_pair().unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&daemon, &BrokerToWorker::Connected { id: 7 }, Some(&OwnedFd::from(theirs))).unwrap();
        let (message, fd) = receive::<BrokerToWorker>(&worker).unwrap();
        assert_eq!(message, BrokerToWorker::Connected { id: 7 });
        assert!(message.carries_stream());
        let mut stream = std::os::unix::net::UnixStream::from(fd.expect("a stream came with it"));
        let mut ours = ours;
        ours.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn oversized_garbled_and_closed_channels_are_errors() {
        let (a, b) = seqpacket_pair().unwrap();
        let huge = WorkerToBroker::Blocked { what: "x".repeat(MAX_BROKER_MESSAGE_BYTES) };
        assert!(matches!(send(&a, &huge, None), Err(BrokerError::TooLong(_))));
        let garbage = b"{not json";
        // SAFETY: write(2) of a buffer we own to a socket we own.
        let written = unsafe { libc::write(a.as_raw_fd(), garbage.as_ptr().cast(), garbage.len()) };
        assert_eq!(written, garbage.len() as isize);
        assert!(matches!(receive::<WorkerToBroker>(&b), Err(BrokerError::Invalid(_))));
        drop(a);
        assert!(matches!(receive::<WorkerToBroker>(&b), Err(BrokerError::Closed)));
    }

    #[test]
    fn names_from_the_guest_are_checked() {
        let resolve = |name: &str| WorkerToBroker::Resolve { id: 1, name: name.into(), family: Family::V4 };
        assert!(validate(&resolve("pkgs.example.test")).is_ok());
        for bad in ["", "a b", "evil\n.com", &"a".repeat(300)] {
            assert!(validate(&resolve(bad)).is_err(), "{bad:?}");
        }
    }
}
