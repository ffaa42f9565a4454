//! Cancellation and deadlines for one request.
//!
//! A [`CancelToken`] is shared between the connection that received the
//! request (which cancels it on [`crate::protocol::ClientMessage::Cancel`] or
//! when the connection drops) and the worker doing the request (which polls
//! it, or sleeps on it). It also carries the request's deadline, so workers
//! have one thing to ask: "should I stop, and why?".

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why a request should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The host cancelled it, or its connection went away.
    Cancelled,
    /// Its deadline passed.
    TimedOut,
}

#[derive(Debug, Default)]
struct State {
    cancelled: bool,
}

/// A cloneable cancellation flag plus an optional deadline.
#[derive(Debug, Clone)]
pub struct CancelToken {
    inner: Arc<(Mutex<State>, Condvar)>,
    deadline: Option<Instant>,
}

impl CancelToken {
    /// A token that stops only when cancelled.
    pub fn new() -> Self {
        Self { inner: Arc::new((Mutex::new(State::default()), Condvar::new())), deadline: None }
    }

    /// A token that also stops `timeout` from now.
    pub fn with_timeout(timeout: Option<Duration>) -> Self {
        let mut token = Self::new();
        token.deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        token
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the deadline (`None` when there is no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Cancels the request and wakes everyone waiting on the token.
    pub fn cancel(&self) {
        let (lock, cvar) = &*self.inner;
        lock.lock().unwrap_or_else(|e| e.into_inner()).cancelled = true;
        cvar.notify_all();
    }

    /// Whether the request should stop now, and why. Cancellation wins over a deadline.
    pub fn stop_reason(&self) -> Option<StopReason> {
        let (lock, _) = &*self.inner;
        if lock.lock().unwrap_or_else(|e| e.into_inner()).cancelled {
            return Some(StopReason::Cancelled);
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Some(StopReason::TimedOut),
            _ => None,
        }
    }

    /// Sleeps up to `max`, waking early on cancellation or at the deadline.
    /// Returns the stop reason if the request should stop.
    pub fn wait(&self, max: Duration) -> Option<StopReason> {
        let (lock, cvar) = &*self.inner;
        let wait_for = match self.remaining() {
            Some(left) => left.min(max),
            None => max,
        };
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        // The guard must be released before `stop_reason` locks again.
        drop(cvar.wait_timeout_while(guard, wait_for, |s| !s.cancelled).unwrap_or_else(|e| e.into_inner()));
        self.stop_reason()
    }
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_a_waiter_and_wins_over_deadline() {
        let token = CancelToken::with_timeout(Some(Duration::from_secs(60)));
        let t2 = token.clone();
        let h = std::thread::spawn(move || t2.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        token.cancel();
        assert_eq!(h.join().unwrap(), Some(StopReason::Cancelled));
    }

    #[test]
    fn deadline_passes() {
        let token = CancelToken::with_timeout(Some(Duration::from_millis(10)));
        assert_eq!(token.stop_reason(), None);
        assert_eq!(token.wait(Duration::from_secs(5)), Some(StopReason::TimedOut));
    }

    #[test]
    fn no_deadline_waits_the_full_slice() {
        let token = CancelToken::new();
        let start = Instant::now();
        assert_eq!(token.wait(Duration::from_millis(15)), None);
        assert!(start.elapsed() >= Duration::from_millis(15));
    }
}
