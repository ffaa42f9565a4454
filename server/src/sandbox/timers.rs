//! Lifecycle timers: idle auto-pause and deletion after the retention period.
//!
//! One task per server wakes every [`crate::config::Timers::tick`] and asks the
//! manager for one pass. The task only schedules; the decisions and the
//! transitions are the manager's ([`super::Manager::run_timers_once`]).
//! Abort the returned handle to stop it.

use tokio::task::JoinHandle;

use super::Manager;

/// Starts the timer task.
pub fn spawn(manager: Manager) -> JoinHandle<()> {
    let tick = manager.config().timers.tick();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let changed = manager.run_timers_once().await;
            if changed > 0 {
                tracing::debug!(changed, "timers changed sandboxes");
            }
        }
    })
}
