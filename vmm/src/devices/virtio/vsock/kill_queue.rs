//! The muxer's kill queue (Firecracker's `MuxerKillQ`): the deadline by which each host stream
//! or connection that waits on a peer must have moved on, and what it waits for. The muxer
//! expires what is due and arms its timer for the earliest deadline.
//!
//! It owns the deadlines only, ordered and counted by kind; it never looks at a connection
//! and never reads the clock (every time is handed in).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a host stream may take to send its `CONNECT <port>\n` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may wait on the guest: for its RESPONSE to our REQUEST, or to take
/// our RST. Counted from when the packet went out.
pub const GUEST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a half-closed connection may go without a byte moving either way.
pub const HALF_CLOSED_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a deadline guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expiry {
    /// A host stream has not sent its `CONNECT` line ([`CONNECT_LINE_TIMEOUT`]).
    ConnectLine,
    /// A connection waits on the guest ([`GUEST_RESPONSE_TIMEOUT`]).
    GuestResponse,
    /// A half-closed connection moves no bytes ([`HALF_CLOSED_IDLE_TIMEOUT`]).
    HalfClosed,
}

impl Expiry {
    /// How long after it is set (or refreshed) the deadline falls.
    pub fn timeout(self) -> Duration {
        match self {
            Self::ConnectLine => CONNECT_LINE_TIMEOUT,
            Self::GuestResponse => GUEST_RESPONSE_TIMEOUT,
            Self::HalfClosed => HALF_CLOSED_IDLE_TIMEOUT,
        }
    }

    fn slot(self) -> usize {
        match self {
            Self::ConnectLine => 0,
            Self::GuestResponse => 1,
            Self::HalfClosed => 2,
        }
    }
}

/// Deadlines of targets `T` (host streams, connections), at most one per target.
#[derive(Debug)]
pub struct KillQueue<T> {
    by_deadline: BTreeSet<(Instant, T)>,
    entries: HashMap<T, (Instant, Expiry)>,
    counts: [usize; 3],
}

impl<T> Default for KillQueue<T> {
    fn default() -> Self {
        Self { by_deadline: BTreeSet::new(), entries: HashMap::new(), counts: [0; 3] }
    }
}

impl<T: Copy + Ord + Hash> KillQueue<T> {
    /// Gives `target` the deadline `now + kind.timeout()`, replacing any it had.
    pub fn set(&mut self, target: T, kind: Expiry, now: Instant) {
        self.clear(target);
        let deadline = now + kind.timeout();
        self.by_deadline.insert((deadline, target));
        self.entries.insert(target, (deadline, kind));
        self.counts[kind.slot()] += 1;
    }

    /// Drops `target`'s deadline, if it has one.
    pub fn clear(&mut self, target: T) {
        if let Some((deadline, kind)) = self.entries.remove(&target) {
            self.by_deadline.remove(&(deadline, target));
            self.counts[kind.slot()] -= 1;
        }
    }

    /// `target`'s deadline and what it guards.
    pub fn get(&self, target: T) -> Option<(Instant, Expiry)> {
        self.entries.get(&target).copied()
    }

    /// How many targets wait for `kind`.
    pub fn count(&self, kind: Expiry) -> usize {
        self.counts[kind.slot()]
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(deadline, _)| *deadline)
    }

    /// Removes and returns a target whose deadline is at or before `now`, earliest first.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(T, Expiry)> {
        let &(deadline, target) = self.by_deadline.first().filter(|(deadline, _)| *deadline <= now)?;
        let kind = self.entries.get(&target).map(|(_, kind)| *kind)?;
        debug_assert_eq!(self.get(target).map(|(d, _)| d), Some(deadline));
        self.clear(target);
        Some((target, kind))
    }

    /// The target of `kind` whose deadline comes first (the one idle longest).
    pub fn oldest(&self, kind: Expiry) -> Option<T> {
        self.by_deadline
            .iter()
            .map(|(_, target)| *target)
            .find(|t| self.entries.get(t).is_some_and(|(_, k)| *k == kind))
    }

    /// Forgets every deadline.
    pub fn clear_all(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_expire_in_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut q = KillQueue::default();
        q.set(1u32, Expiry::HalfClosed, t0);
        q.set(2, Expiry::ConnectLine, t0);
        q.set(3, Expiry::GuestResponse, t0 + Duration::from_secs(1));
        assert_eq!(q.next_deadline(), Some(t0 + CONNECT_LINE_TIMEOUT));
        assert_eq!(q.pop_expired(t0 + CONNECT_LINE_TIMEOUT - Duration::from_millis(1)), None);
        assert_eq!(q.pop_expired(t0 + HALF_CLOSED_IDLE_TIMEOUT), Some((2, Expiry::ConnectLine)));
        assert_eq!(q.pop_expired(t0 + HALF_CLOSED_IDLE_TIMEOUT), Some((3, Expiry::GuestResponse)));
        assert_eq!(q.pop_expired(t0 + HALF_CLOSED_IDLE_TIMEOUT), Some((1, Expiry::HalfClosed)));
        assert_eq!(q.pop_expired(t0 + HALF_CLOSED_IDLE_TIMEOUT), None);
        assert_eq!(q.next_deadline(), None, "an empty queue arms nothing");
    }

    #[test]
    fn a_refresh_moves_the_deadline_and_counts_stay_right() {
        let t0 = Instant::now();
        let mut q = KillQueue::default();
        q.set(1u32, Expiry::HalfClosed, t0);
        q.set(2, Expiry::HalfClosed, t0 + Duration::from_secs(1));
        assert_eq!(q.count(Expiry::HalfClosed), 2);
        assert_eq!(q.oldest(Expiry::HalfClosed), Some(1));
        q.set(1, Expiry::HalfClosed, t0 + Duration::from_secs(2));
        assert_eq!(q.count(Expiry::HalfClosed), 2, "a refresh is not a second entry");
        assert_eq!(q.oldest(Expiry::HalfClosed), Some(2));
        assert_eq!(q.get(1), Some((t0 + Duration::from_secs(2) + HALF_CLOSED_IDLE_TIMEOUT, Expiry::HalfClosed)));
        q.set(2, Expiry::GuestResponse, t0);
        assert_eq!((q.count(Expiry::HalfClosed), q.count(Expiry::GuestResponse)), (1, 1));
        q.clear(2);
        q.clear(2);
        assert_eq!(q.count(Expiry::GuestResponse), 0);
        assert_eq!(q.oldest(Expiry::GuestResponse), None);
        q.clear_all();
        assert_eq!((q.count(Expiry::HalfClosed), q.next_deadline()), (0, None));
    }
}
