//! Forks in the manager: `count` new running sandboxes from one moment of a parent.
//!
//! Every child is admitted (and recorded `creating`) first, so that the limits see all of them;
//! then the engine makes them all from one moment of the parent, and each is recorded running
//! or failed on its own. Like pause, a fork is refused while calls run in the parent: taking the
//! parent's state resets its guest connections, which would cut those calls off.

use std::sync::{Arc, Mutex as StdMutex};

use super::admission::{new_sandbox_id, MAX_NAME_BYTES};
use super::manager::{blocking, refuse_if_busy, unusable, Manager, ManagerError, Owner, Slot};
use crate::engine::MachineSpec;
use crate::record::{SandboxRecord, SandboxState};
use crate::registry::now_ms;

impl Manager {
    /// Forks a running or paused sandbox (the default when `id` is `None`) into `count` new
    /// running ones; returns the parent's id and the children.
    pub async fn fork(
        &self,
        owner: &Owner,
        id: Option<&str>,
        count: u32,
    ) -> Result<(String, Vec<SandboxRecord>), ManagerError> {
        let (owner, id) = (owner.clone(), id.map(str::to_owned));
        self.detached(|m| async move { m.fork_owned(&owner, id.as_deref(), count).await }).await
    }

    async fn fork_owned(
        &self,
        owner: &Owner,
        id: Option<&str>,
        count: u32,
    ) -> Result<(String, Vec<SandboxRecord>), ManagerError> {
        let max = self.inner.config.limits.max_fork_count;
        if count == 0 || count > max {
            return Err(ManagerError::BadParameter(format!("count={count} is out of range: use 1 to {max}")));
        }
        let slot = self.resolve(owner, id, false).await?;
        let mut inner = slot.inner.lock().await;
        match inner.record.state {
            SandboxState::Running | SandboxState::Paused => {}
            _ => return Err(unusable(&slot, &inner.record, "it cannot be forked")),
        }
        refuse_if_busy(&slot, "fork")?;
        // All copies must fit; each is then admitted on its own as it is made.
        self.check_capacity(count as usize, u64::from(inner.record.memory_mib) * u64::from(count))?;
        let machine = self.machine_of(&slot, &mut inner)?;
        // Every child is recorded first; then all are made from one moment of the parent.
        let parent = inner.record.clone();
        let mut slots: Vec<Arc<Slot>> = Vec::new();
        for _ in 0..count {
            let child = Slot::new(child_record(&parent, owner), None);
            let admitted = {
                let child_inner = child.inner.lock().await;
                self.admit(&child, &child_inner.record, &format!("fork of {}", slot.id))
            };
            if let Err(e) = admitted {
                for earlier in &slots {
                    let mut earlier_inner = earlier.inner.lock().await;
                    let _ = self.fail(earlier, &mut earlier_inner, &format!("the fork was abandoned: {e}"));
                }
                return Err(e);
            }
            slots.push(child);
        }
        let specs: Vec<MachineSpec> = slots
            .iter()
            .map(|child| MachineSpec {
                id: child.id.clone(),
                template: parent.template.clone(),
                vcpus: parent.vcpus,
                memory_mib: parent.memory_mib,
                disk_mib: parent.disk_mib,
                env: parent.env.clone(),
            })
            .collect();
        // The children stay locked until they are recorded running or failed.
        let mut locked = Vec::with_capacity(slots.len());
        for child in &slots {
            locked.push(child.inner.lock().await);
        }
        let made = blocking(&machine, move |m| m.fork_many(&specs)).await;
        let mut children = Vec::new();
        let mut first_error = None;
        for ((child, mut child_inner), result) in slots.iter().zip(locked).zip(made) {
            match result {
                Ok(m) => {
                    child_inner.machine = Some(Arc::new(StdMutex::new(m)));
                    if let Err(e) = self.transition(child, &mut child_inner, SandboxState::Running, "forked") {
                        let reason =
                            format!("its start could not be recorded ({})", capsule_vmm::worker::error_chain(&e));
                        self.abandon_new(child, &mut child_inner, &reason).await;
                        first_error.get_or_insert(e);
                        continue;
                    }
                    child.touch();
                    children.push(child_inner.record.clone());
                }
                Err(e) => {
                    let reason = format!("the fork could not start: {}", capsule_vmm::worker::error_chain(&e));
                    let _ = self.fail(child, &mut child_inner, &reason);
                    first_error.get_or_insert(ManagerError::Engine(e));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        slot.touch();
        Ok((slot.id.clone(), children))
    }
}

/// The record of a new child of `parent`, owned by `owner`.
fn child_record(parent: &SandboxRecord, owner: &Owner) -> SandboxRecord {
    let now = now_ms();
    SandboxRecord {
        id: new_sandbox_id(),
        owner: owner.id.clone(),
        name: parent.name.as_ref().map(|n| format!("{n} (fork)")).filter(|n| n.len() <= MAX_NAME_BYTES),
        state: SandboxState::Creating,
        is_default: false,
        parent_id: Some(parent.id.clone()),
        created_ms: now,
        updated_ms: now,
        paused_ms: None,
        failure: None,
        engine_state: serde_json::Value::Null,
        ..parent.clone()
    }
}
