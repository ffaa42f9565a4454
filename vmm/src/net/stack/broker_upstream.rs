//! The real [`Upstream`]: the daemon, over the broker channel ([`crate::net::broker`]), a
//! nonblocking `SOCK_SEQPACKET` connection. Requests are sent and return at once; answers are
//! read when the channel is readable (this upstream's own epoll, which the stack watches, holds
//! the channel, the listening socket the daemon connects to, and a wake-up for answers made
//! here). Nothing ever waits on the daemon.
//!
//! Fail closed: with no daemon connected, every request is refused at once with a reason; when
//! the channel closes or breaks, every request waiting on it is answered as refused. A daemon
//! that connects again (after an attach) replaces the old channel. A request the channel cannot
//! take right now (its buffer is full) is refused, not queued. Answers to ids that are not
//! waiting are dropped, with their streams. Exposed ports (`Inbound`) are not handled yet: the
//! stream is closed.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::upstream::{Answer, ConnectRequest, Upstream};
use crate::net::broker::{self, BrokerError, BrokerToWorker, Family, WorkerToBroker};

/// Most requests waiting for the daemon at once (past it, new ones are refused).
pub const MAX_WAITING_REQUESTS: usize = 1024;
/// Epoll token of the listening socket.
const LISTENER_TOKEN: u64 = 1;
/// Epoll token of the channel.
const CHANNEL_TOKEN: u64 = 2;
/// Epoll token of the wake-up.
const WAKE_TOKEN: u64 = 3;
/// The reason given while no daemon is connected.
const NO_BROKER: &str = "no network broker is connected, so the sandbox's network is closed";

/// Why the broker upstream could not be set up.
#[derive(Debug, Error)]
pub enum BrokerUpstreamError {
    /// Creating its epoll or wake-up descriptor failed.
    #[error("creating the broker upstream's epoll or eventfd failed")]
    Create(#[source] std::io::Error),
    /// Watching the listener or channel failed.
    #[error("watching the broker socket failed")]
    Watch(#[source] std::io::Error),
    /// Making the channel or listener nonblocking failed.
    #[error("making the broker socket nonblocking failed")]
    Nonblocking(#[source] std::io::Error),
}

/// The daemon as the stack's upstream.
pub struct BrokerUpstream {
    epoll: Epoll,
    wake: EventFd,
    listener: Option<OwnedFd>,
    channel: Option<OwnedFd>,
    connects: HashSet<u64>,
    resolves: HashSet<u64>,
    /// Answers made here (for requests the lost channel left waiting).
    local: VecDeque<Answer>,
}

impl BrokerUpstream {
    /// No daemon, and none can come: everything is refused.
    pub fn disconnected() -> Result<Self, BrokerUpstreamError> {
        let epoll = Epoll::new().map_err(BrokerUpstreamError::Create)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(BrokerUpstreamError::Create)?;
        epoll
            .ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))
            .map_err(BrokerUpstreamError::Watch)?;
        Ok(Self {
            epoll,
            wake,
            listener: None,
            channel: None,
            connects: HashSet::new(),
            resolves: HashSet::new(),
            local: VecDeque::new(),
        })
    }

    /// Over `channel`, an already connected `SOCK_SEQPACKET` socket to the daemon.
    pub fn connected(channel: OwnedFd) -> Result<Self, BrokerUpstreamError> {
        let mut upstream = Self::disconnected()?;
        set_nonblocking(&channel).map_err(BrokerUpstreamError::Nonblocking)?;
        upstream.attach(channel).map_err(BrokerUpstreamError::Watch)?;
        Ok(upstream)
    }

    /// Accepting the daemon on `listener`, a bound, listening `SOCK_SEQPACKET` socket; refuses
    /// everything until the daemon connects.
    pub fn listening(listener: OwnedFd) -> Result<Self, BrokerUpstreamError> {
        let mut upstream = Self::disconnected()?;
        set_nonblocking(&listener).map_err(BrokerUpstreamError::Nonblocking)?;
        upstream
            .epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))
            .map_err(BrokerUpstreamError::Watch)?;
        upstream.listener = Some(listener);
        Ok(upstream)
    }

    /// Whether a daemon is connected.
    pub fn is_connected(&self) -> bool {
        self.channel.is_some()
    }

    /// Makes `channel` (nonblocking) the channel, dropping any old one.
    fn attach(&mut self, channel: OwnedFd) -> std::io::Result<()> {
        self.detach("the network broker reconnected");
        self.epoll.ctl(ControlOperation::Add, channel.as_raw_fd(), EpollEvent::new(EventSet::IN, CHANNEL_TOKEN))?;
        self.channel = Some(channel);
        Ok(())
    }

    /// Drops the channel; every request waiting on it is answered as refused for `reason`.
    fn detach(&mut self, reason: &str) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        let _ = self.epoll.ctl(ControlOperation::Delete, channel.as_raw_fd(), EpollEvent::default());
        for id in self.connects.drain() {
            self.local.push_back(Answer::Refused { id, reason: reason.to_owned() });
        }
        for id in self.resolves.drain() {
            self.local.push_back(Answer::NotResolved { id, nxdomain: false, reason: reason.to_owned() });
        }
        if !self.local.is_empty() {
            let _ = self.wake.write(1);
        }
    }

    /// Sends `message`, or says why it was not sent (and drops a broken channel).
    fn send(&mut self, message: &WorkerToBroker) -> Result<(), String> {
        broker::validate(message).map_err(|e| e.to_string())?;
        let Some(channel) = &self.channel else {
            return Err(NO_BROKER.to_owned());
        };
        if self.connects.len() + self.resolves.len() >= MAX_WAITING_REQUESTS {
            return Err("too many requests are waiting for the network broker".to_owned());
        }
        match broker::send(channel, message, None) {
            Ok(()) => Ok(()),
            Err(BrokerError::Send(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err("the network broker is not keeping up".to_owned())
            }
            Err(e) => {
                tracing::warn!(error = %e, "net stack: the broker channel broke");
                self.detach("the network broker went away");
                Err(format!("the network broker went away ({e})"))
            }
        }
    }

    /// Accepts a daemon waiting on the listener, if one is.
    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        // SAFETY: accept4(2) with null address pointers writes nothing; the result is checked.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return;
        }
        // SAFETY: accept4 just returned this descriptor, owned by nothing else.
        let channel = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = self.attach(channel) {
            tracing::error!(error = %e, "net stack: could not watch the broker channel");
        }
    }

    /// One message from the daemon, as an answer to a waiting request.
    fn answer(&mut self, message: BrokerToWorker, fd: Option<OwnedFd>) -> Option<Answer> {
        match message {
            BrokerToWorker::Connected { id } if self.connects.remove(&id) => match fd {
                Some(fd) => Some(Answer::Connected { id, stream: UnixStream::from(fd) }),
                None => Some(Answer::Refused { id, reason: "the network broker sent no stream".into() }),
            },
            BrokerToWorker::Refused { id, reason } if self.connects.remove(&id) => Some(Answer::Refused { id, reason }),
            BrokerToWorker::Resolved { id, addrs, ttl_s } if self.resolves.remove(&id) => {
                Some(Answer::Resolved { id, addrs, ttl_s })
            }
            BrokerToWorker::NotResolved { id, nxdomain, reason } if self.resolves.remove(&id) => {
                Some(Answer::NotResolved { id, nxdomain, reason })
            }
            BrokerToWorker::Inbound { guest_port } => {
                tracing::warn!(guest_port, "net stack: exposed ports are not supported yet; inbound stream closed");
                None
            }
            other => {
                tracing::debug!(message = ?other, "net stack: a broker answer to no waiting request, dropped");
                None
            }
        }
    }
}

impl Upstream for BrokerUpstream {
    fn connect(&mut self, request: ConnectRequest) -> Result<(), String> {
        let ConnectRequest { id, dst, name, first_bytes } = request;
        self.send(&WorkerToBroker::Connect { id, dst, name, first_bytes })?;
        self.connects.insert(id);
        Ok(())
    }

    fn resolve(&mut self, id: u64, name: &str, family: Family) -> Result<(), String> {
        self.send(&WorkerToBroker::Resolve { id, name: name.to_owned(), family })?;
        self.resolves.insert(id);
        Ok(())
    }

    fn report_blocked(&mut self, what: &str) {
        if self.channel.is_some() {
            let _ = self.send(&WorkerToBroker::Blocked { what: what.to_owned() });
        }
    }

    fn take_answers(&mut self, answers: &mut Vec<Answer>) {
        let _ = self.wake.read();
        self.accept();
        while let Some(channel) = &self.channel {
            match broker::receive::<BrokerToWorker>(channel) {
                Ok((message, fd)) => {
                    let fd = if message.carries_stream() { fd } else { None };
                    answers.extend(self.answer(message, fd));
                }
                Err(BrokerError::Receive(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(BrokerError::Receive(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "net stack: the broker channel closed");
                    self.detach("the network broker went away");
                }
            }
        }
        answers.extend(self.local.drain(..));
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
}

/// Sets `O_NONBLOCK` on `fd`.
fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
