//! The stack's own epoll, which is the descriptor the virtio-net device waits on: it holds the
//! stack's timer (smoltcp's next deadline and the stack's own), the upstream's descriptor, and
//! each spliced connection's Unix stream with the interest its buffers allow. An epoll
//! descriptor is readable while any descriptor in it is ready, so one descriptor wakes the
//! device-event thread for all of them and [`NetBackend`](crate::devices::virtio::net::NetBackend)
//! needs no second one.
//!
//! It owns the epoll and the timer; it never reads or writes the watched descriptors.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// Token of the timer.
const TIMER_TOKEN: u64 = u64::MAX;
/// Token of the upstream's descriptor.
pub const UPSTREAM_TOKEN: u64 = u64::MAX - 1;
/// Shortest timer armed: a deadline already due fires after this.
const MIN_TIMER: Duration = Duration::from_millis(1);

/// Why the poller could not be made or changed.
#[derive(Debug, Error)]
pub enum PollerError {
    /// Creating the epoll or the timer failed.
    #[error("creating the network stack's epoll or timer failed")]
    Create(#[source] std::io::Error),
    /// Changing what the epoll watches failed.
    #[error("watching descriptor {fd} in the network stack's epoll failed")]
    Watch {
        /// The descriptor.
        fd: RawFd,
        /// The epoll_ctl error.
        #[source]
        source: std::io::Error,
    },
    /// Arming the timer failed.
    #[error("arming the network stack's timer failed")]
    Timer(#[source] std::io::Error),
}

/// The epoll and its timer.
pub struct Poller {
    epoll: Epoll,
    timer: TimerFd,
}

impl Poller {
    /// An epoll watching only its (disarmed) timer.
    pub fn new() -> Result<Self, PollerError> {
        let epoll = Epoll::new().map_err(PollerError::Create)?;
        let timer = TimerFd::new().map_err(|e| PollerError::Create(e.into()))?;
        let poller = Self { epoll, timer };
        poller.watch(poller.timer.as_raw_fd(), TIMER_TOKEN, EventSet::IN)?;
        Ok(poller)
    }

    /// The epoll descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Starts watching `fd` for `events`, reported as `token`.
    pub fn watch(&self, fd: RawFd, token: u64, events: EventSet) -> Result<(), PollerError> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(|source| PollerError::Watch { fd, source })
    }

    /// Makes the interest in `fd` `wanted` (empty: not watched), given it is `current` now;
    /// `current` becomes what is registered.
    pub fn set_interest(&self, fd: RawFd, token: u64, current: &mut EventSet, wanted: EventSet) {
        if *current == wanted {
            return;
        }
        let result = if wanted.is_empty() {
            self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else if current.is_empty() {
            self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(wanted, token))
        } else {
            self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(wanted, token))
        };
        match result {
            Ok(()) => *current = wanted,
            Err(e) => tracing::error!(error = %e, fd, "net stack: could not change a stream's epoll interest"),
        }
    }

    /// Stops watching `fd` (registered with `current`).
    pub fn forget(&self, fd: RawFd, current: &mut EventSet) {
        self.set_interest(fd, 0, current, EventSet::empty());
    }

    /// Arms the timer to fire after `delay` (`None`: disarms it). Either way a timer that had
    /// fired is no longer readable.
    pub fn arm(&mut self, delay: Option<Duration>) -> Result<(), PollerError> {
        match delay {
            Some(delay) => self.timer.reset(delay.max(MIN_TIMER), None),
            None => self.timer.clear(),
        }
        .map_err(|e| PollerError::Timer(e.into()))
    }

    /// Whether any watched descriptor is ready now (for tests and callers that poll).
    pub fn is_ready(&self) -> bool {
        let mut events = [EpollEvent::default(); 1];
        matches!(self.epoll.wait(0, &mut events), Ok(n) if n > 0)
    }
}
