//! Rate limiting for warnings the guest can trigger at will (bad register accesses, malformed
//! descriptor chains, protocol violations). Each device owns one [`GuestWarnLimiter`] and logs
//! through [`guest_warn!`](crate::guest_warn): in every [`GUEST_WARN_INTERVAL`] the first
//! [`GUEST_WARN_BURST`] warnings are logged, the rest only counted, and the next warning
//! logged says how many were suppressed before it. A hostile guest therefore costs the host
//! log at most [`GUEST_WARN_BURST`] lines per interval per device. This module never decides
//! what is worth a warning, and is not for host-side failures (those are logged in full).

use std::time::{Duration, Instant};

/// Warnings logged per device in one interval before the rest are only counted.
pub const GUEST_WARN_BURST: u32 = 10;
/// Length of one rate-limiting window.
pub const GUEST_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// One device's budget of guest-triggered warnings.
#[derive(Debug, Default)]
pub struct GuestWarnLimiter {
    window_start: Option<Instant>,
    logged_in_window: u32,
    suppressed: u64,
}

impl GuestWarnLimiter {
    /// A limiter with its whole budget.
    pub const fn new() -> Self {
        Self { window_start: None, logged_in_window: 0, suppressed: 0 }
    }

    /// Whether a warning happening now may be logged: `Some(n)` with the number of warnings
    /// suppressed since the last one logged, or `None` (counted, not logged).
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`GuestWarnLimiter::admit`] at time `now`.
    pub fn admit_at(&mut self, now: Instant) -> Option<u64> {
        let expired = self.window_start.is_none_or(|start| now.saturating_duration_since(start) >= GUEST_WARN_INTERVAL);
        if expired {
            self.window_start = Some(now);
            self.logged_in_window = 0;
        }
        if self.logged_in_window < GUEST_WARN_BURST {
            self.logged_in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

/// `tracing::warn!` through a [`GuestWarnLimiter`]: `guest_warn!(limiter, fields.., "message")`.
/// A logged line carries `suppressed`, the warnings dropped since the previous one.
#[macro_export]
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::devices::guest_log::GuestWarnLimiter::admit(&mut $limiter) {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_counted_then_reported_with_the_next_window() {
        let mut limiter = GuestWarnLimiter::new();
        let t0 = Instant::now();
        for _ in 0..GUEST_WARN_BURST {
            assert_eq!(limiter.admit_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limiter.admit_at(t0 + Duration::from_secs(1)), None);
        }
        // Still inside the window.
        assert_eq!(limiter.admit_at(t0 + GUEST_WARN_INTERVAL / 2), None);
        // The next window's first line reports what was dropped, once.
        assert_eq!(limiter.admit_at(t0 + GUEST_WARN_INTERVAL), Some(1001));
        assert_eq!(limiter.admit_at(t0 + GUEST_WARN_INTERVAL), Some(0));
    }
}
