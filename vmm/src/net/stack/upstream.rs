//! What the stack asks of the world outside the sandbox: the [`Upstream`] trait. The real one
//! is [`super::BrokerUpstream`] (the daemon, over the broker channel); tests use a double that
//! connects on loopback.
//!
//! Every call is asynchronous: a request returns at once (or fails at once with the reason it
//! is refused), and its answer comes later from [`Upstream::take_answers`], after the
//! upstream's [`Upstream::event_fd`] turned readable. Nothing here may block the stack.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use crate::net::broker::{Family, FirstBytes};

/// A TCP connection the guest wants opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Names the answer ([`Answer::Connected`] or [`Answer::Refused`] with the same id).
    pub id: u64,
    /// Where the guest connected to.
    pub dst: SocketAddr,
    /// The name the guest resolved `dst` from through the stack's resolver, if it did.
    pub name: Option<String>,
    /// For ports 80 and 443: what the guest sent first.
    pub first_bytes: Option<FirstBytes>,
}

/// The answer to a request.
#[derive(Debug)]
pub enum Answer {
    /// The connection of `ConnectRequest { id }` is open; `stream` carries its bytes.
    Connected {
        /// The request's id.
        id: u64,
        /// The connection's bytes, both ways.
        stream: UnixStream,
    },
    /// The connection of `ConnectRequest { id }` is refused, for `reason`.
    Refused {
        /// The request's id.
        id: u64,
        /// Why, in words the model reads.
        reason: String,
    },
    /// The addresses for the resolution `id`, cacheable for `ttl_s` seconds.
    Resolved {
        /// The request's id.
        id: u64,
        /// The addresses (any family; the stack keeps those asked for).
        addrs: Vec<IpAddr>,
        /// How long the guest may cache them, in seconds.
        ttl_s: u32,
    },
    /// The resolution `id` has no answer: the name does not exist (`nxdomain`), or it is
    /// refused or failed (`reason`).
    NotResolved {
        /// The request's id.
        id: u64,
        /// Whether the name does not exist (else: refused or failed).
        nxdomain: bool,
        /// Why, in words.
        reason: String,
    },
}

/// What leaves the sandbox, asked for by the stack.
pub trait Upstream: Send {
    /// Asks for a TCP connection. `Err(reason)`: refused at once (no answer follows).
    fn connect(&mut self, request: ConnectRequest) -> Result<(), String>;

    /// Asks to resolve `name` for `family`. `Err(reason)`: failed at once (no answer follows).
    fn resolve(&mut self, id: u64, name: &str, family: Family) -> Result<(), String>;

    /// Reports something the stack refused by itself (for the daemon to tell the model).
    fn report_blocked(&mut self, what: &str);

    /// Moves the answers that arrived into `answers`, without blocking.
    fn take_answers(&mut self, answers: &mut Vec<Answer>);

    /// A descriptor that is readable (level-triggered) while answers may be waiting; the same
    /// for the upstream's whole life. `None`: answers are only looked for when the stack runs.
    fn event_fd(&self) -> Option<RawFd>;
}
