//! Lifecycle timers: idle auto-pause, deletion after the retention period, and failing
//! sandboxes whose creation was abandoned.
//!
//! One task per server wakes every [`crate::config::Timers::tick`] and runs one pass
//! ([`Manager::run_timers_once`]). A sandbox that is busy, or whose lock is held (an operation in
//! progress), is skipped until the next pass. Abort the returned handle to stop the task.

use std::sync::atomic::Ordering;

use capsule_vmm::worker::error_chain;
use tokio::task::JoinHandle;

use super::manager::{Manager, ManagerError, CREATING_ABANDONED_AFTER};
use crate::record::SandboxState;
use crate::registry::now_ms;

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

impl Manager {
    /// One pass of the timers: pauses idle running sandboxes, deletes paused
    /// (and failed) ones past retention, fails abandoned `creating` ones.
    /// Returns how many it changed.
    pub async fn run_timers_once(&self) -> usize {
        self.detached(|m| async move { Ok(m.run_timers_pass().await) }).await.unwrap_or(0)
    }

    async fn run_timers_pass(&self) -> usize {
        let now = now_ms();
        let retention_ms = self.config().timers.retention.as_millis() as u64;
        let mut changed = 0;
        for slot in self.slots() {
            if slot.busy.load(Ordering::Acquire) > 0 {
                continue;
            }
            let Ok(mut inner) = slot.inner.try_lock() else { continue };
            let record = inner.record.clone();
            let idle_ms = now.saturating_sub(slot.last_used_ms.load(Ordering::Relaxed));
            let result = match record.state {
                SandboxState::Running
                    if idle_ms >= record.idle_timeout_ms && slot.busy.load(Ordering::Acquire) == 0 =>
                {
                    let reason = format!("idle for {} ms", idle_ms);
                    Some(self.pause_locked(&slot, &mut inner, &reason).await)
                }
                SandboxState::Paused
                    if now.saturating_sub(record.paused_ms.unwrap_or(record.updated_ms)) >= retention_ms =>
                {
                    Some(self.delete_locked(&slot, &mut inner, "retention period passed while paused").await)
                }
                SandboxState::Failed if now.saturating_sub(record.updated_ms) >= retention_ms => {
                    Some(self.delete_locked(&slot, &mut inner, "retention period passed while failed").await)
                }
                // Its lock is free, so nobody is creating it any more.
                SandboxState::Creating
                    if now.saturating_sub(record.created_ms) >= CREATING_ABANDONED_AFTER.as_millis() as u64 =>
                {
                    let reason = format!(
                        "its creation never finished (abandoned after {} s)",
                        CREATING_ABANDONED_AFTER.as_secs()
                    );
                    self.abandon_new(&slot, &mut inner, &reason).await;
                    Some(match inner.record.state {
                        SandboxState::Failed => Ok(()),
                        state => Err(ManagerError::WrongState {
                            id: slot.id.clone(),
                            state: state.as_str(),
                            what: "it was abandoned while creating, but its failure could not be recorded".into(),
                        }),
                    })
                }
                _ => None,
            };
            match result {
                Some(Ok(())) => changed += 1,
                Some(Err(e)) => tracing::warn!(sandbox = %slot.id, error = %error_chain(&e), "timer transition failed"),
                None => {}
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::engine::test_engine::TestEngine;
    use crate::engine::Engine;
    use crate::record::SandboxRecord;
    use crate::registry::Registry;
    use crate::sandbox::admission::{self, CreateRequest};
    use crate::sandbox::manager::{ManagerConfig, Slot};

    #[tokio::test]
    async fn an_abandoned_creating_sandbox_is_failed_by_the_timers_and_frees_its_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No machine is ever started here, so the agent binary is never run.
        let engine = TestEngine::new(dir.path().join("no-agent"), dir.path().join("sandboxes")).expect("engine");
        let registry = Registry::open(dir.path()).expect("registry");
        let mut config = ManagerConfig::default();
        config.limits.max_sandboxes = 1;
        let spec = admission::validate(&CreateRequest::default(), &config.limits, &engine.host_limits()).expect("spec");
        let manager = Manager::open(Arc::new(engine), registry, config).expect("manager");
        let long_ago = now_ms() - CREATING_ABANDONED_AFTER.as_millis() as u64 - 1000;
        let record = SandboxRecord {
            id: spec.id.clone(),
            owner: "someone".into(),
            name: None,
            state: SandboxState::Creating,
            template: spec.template,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            idle_timeout_ms: 60_000,
            env: BTreeMap::new(),
            settings: Default::default(),
            is_default: false,
            parent_id: None,
            created_ms: long_ago,
            updated_ms: long_ago,
            paused_ms: None,
            failure: None,
            engine: "test".into(),
            engine_state: serde_json::Value::Null,
        };
        // What a creation that went away leaves behind: admitted, never finished, unlocked.
        let slot = Slot::new(record, None);
        manager.admit(&slot, &slot.record(), "create requested").expect("admitted");
        assert!(matches!(manager.check_capacity(1, 0), Err(ManagerError::Limit(_))), "it holds the only place");

        assert_eq!(manager.run_timers_once().await, 1);
        let record = slot.record();
        assert_eq!(record.state, SandboxState::Failed);
        assert!(record.failure.as_deref().unwrap_or_default().contains("creation never finished"), "{record:?}");
        manager.check_capacity(1, 0).expect("its place is free again");

        // A fresh `creating` sandbox (one being made right now) is left alone.
        let mut fresh = slot.record();
        fresh.id = admission::new_sandbox_id();
        fresh.state = SandboxState::Creating;
        fresh.created_ms = now_ms();
        let fresh_slot = Slot::new(fresh, None);
        manager.admit(&fresh_slot, &fresh_slot.record(), "create requested").expect("admitted");
        assert_eq!(manager.run_timers_once().await, 0);
        assert_eq!(fresh_slot.record().state, SandboxState::Creating);
    }
}
