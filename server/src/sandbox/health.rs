//! Sandbox health: what the manager does when a call finds a sandbox's VM dead or its agent
//! silent, and how a sandbox is brought back.
//!
//! - A call lost its connection ([`Manager::agent_lost`]): the VM is checked; a dead one is
//!   rolled back to its newest snapshot or failed, a live one only reports the broken connection.
//! - A call's agent went silent ([`Manager::agent_unresponsive`]): while the VM runs, the sandbox
//!   is marked `unresponsive`. Every later call pings the agent first and fails fast, naming
//!   `restart_sandbox`, until the agent answers again (then it is `running` once more).
//! - [`Manager::restart`] boots the VM again on the sandbox's own disk: files are kept, whatever
//!   ran is lost. It brings back unresponsive and failed sandboxes alike.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use capsule_agent::client::AgentClient;
use capsule_agent::protocol::{Op, Reply};
use capsule_vmm::worker::error_chain;

use super::manager::{blocking, lock, spec_of, unusable, Manager, ManagerError, Owner, SharedMachine, Slot, SlotInner};
use crate::engine::RollBack;
use crate::guest;
use crate::record::{SandboxRecord, SandboxState};
use crate::registry::now_ms;

/// How long a dying machine may still look alive after its connection broke.
const AGENT_LOSS_SETTLE: Duration = Duration::from_millis(500);

/// How a roll-back reads: what was lost and since when.
pub(super) fn rollback_note(rolled: &RollBack) -> String {
    let age_s = now_ms().saturating_sub(rolled.snapshot_unix_ms) / 1000;
    format!(
        "its VM was lost ({}), so it was rolled back to its newest snapshot, taken {} ago; what it did since then \
         is lost",
        rolled.why,
        human_age(age_s)
    )
}

fn human_age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// Whether the agent behind `client` answers a ping within `within`.
pub async fn answers_ping(client: &AgentClient, within: Duration) -> bool {
    let ping = guest::call(client, Op::Ping, within);
    matches!(tokio::time::timeout(within, ping).await, Ok(Ok(Reply::Pong)))
}

impl Manager {
    /// A sandbox whose VM was lost (`why`): rolled back to its newest snapshot (paused there)
    /// where the engine keeps one, else failed. Returns the error that says which.
    pub(super) async fn lost(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
        machine: &SharedMachine,
        why: String,
    ) -> ManagerError {
        let reason = why.clone();
        let rolled = blocking(machine, move |m| m.roll_back(&reason)).await;
        match rolled {
            Some(Ok(rolled)) => {
                let note = rollback_note(&rolled);
                if let Err(e) = self.transition(slot, inner, SandboxState::Paused, &note) {
                    return e;
                }
                ManagerError::RolledBack { id: slot.id.clone(), note }
            }
            Some(Err(e)) => self.fail(slot, inner, &format!("{why}; rolling it back failed too ({})", error_chain(&e))),
            None => self.fail(slot, inner, &why),
        }
    }

    /// Called when a call lost its agent connection: marks the sandbox failed if
    /// its machine died, and returns the error to report.
    pub async fn agent_lost(&self, id: &str, detail: &str) -> ManagerError {
        let (id, detail) = (id.to_owned(), detail.to_owned());
        let judged = self
            .detached(|m| async move {
                let Some(slot) = m.slot(&id) else {
                    return Ok(ManagerError::Failed { id, reason: detail });
                };
                let mut inner = slot.inner.lock().await;
                let Some(machine) = inner.machine.clone() else {
                    return Ok(m.fail(&slot, &mut inner, "the guest crashed (no machine)"));
                };
                // A dying machine may still look alive for a moment after its connection broke.
                let alive = blocking(&machine, |m| {
                    let deadline = std::time::Instant::now() + AGENT_LOSS_SETTLE;
                    loop {
                        let alive = m.check_alive();
                        if alive.is_err() || std::time::Instant::now() >= deadline {
                            return alive;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .await;
                Ok(match alive {
                    Err(why) => {
                        let why = format!("the guest crashed ({})", error_chain(&why));
                        m.lost(&slot, &mut inner, &machine, why).await
                    }
                    Ok(()) => ManagerError::ConnectionLost { id, detail },
                })
            })
            .await;
        judged.unwrap_or_else(|e| e)
    }

    /// Called when a call's agent stopped answering (`detail` says how long): the sandbox is
    /// marked unresponsive while its VM runs (a dead VM is handled as [`Manager::agent_lost`]
    /// does), and the error to report is returned.
    pub async fn agent_unresponsive(&self, id: &str, detail: &str) -> ManagerError {
        let (id, detail) = (id.to_owned(), detail.to_owned());
        let judged = self
            .detached(|m| async move {
                let Some(slot) = m.slot(&id) else {
                    return Ok(ManagerError::Unresponsive { id, detail });
                };
                let mut inner = slot.inner.lock().await;
                let Some(machine) = inner.machine.clone() else {
                    return Ok(m.fail(&slot, &mut inner, "the guest crashed (no machine)"));
                };
                if let Err(why) = blocking(&machine, |m| m.check_alive()).await {
                    let why = format!("the guest crashed ({})", error_chain(&why));
                    return Ok(m.lost(&slot, &mut inner, &machine, why).await);
                }
                if inner.record.state == SandboxState::Running {
                    if let Err(e) = m.transition(&slot, &mut inner, SandboxState::Unresponsive, &detail) {
                        return Ok(e);
                    }
                }
                Ok(ManagerError::Unresponsive { id, detail })
            })
            .await;
        judged.unwrap_or_else(|e| e)
    }

    /// A call on an unresponsive sandbox: its agent is asked for a sign of life; if it answers,
    /// the sandbox is running again.
    pub(super) async fn recheck_unresponsive(
        &self,
        slot: &Slot,
        inner: &mut SlotInner,
    ) -> Result<AgentClient, ManagerError> {
        let client = self.on_machine(slot, inner, |m| m.connect(), "the guest crashed").await?;
        let within = self.inner.config.timers.liveness.recheck;
        if !answers_ping(&client, within).await {
            return Err(ManagerError::Unresponsive {
                id: slot.id.clone(),
                detail: format!("its agent still did not answer within {} ms", within.as_millis()),
            });
        }
        self.transition(slot, inner, SandboxState::Running, "its agent answers again")?;
        Ok(client)
    }

    /// Boots a sandbox (the default when `id` is `None`) again on its own disk. Returns it
    /// running and the state it came back from.
    pub async fn restart(
        &self,
        owner: &Owner,
        id: Option<&str>,
    ) -> Result<(SandboxRecord, SandboxState), ManagerError> {
        let (owner, id) = (owner.clone(), id.map(str::to_owned));
        self.detached(|m| async move {
            let slot = m.resolve(&owner, id.as_deref(), false).await?;
            let mut inner = slot.inner.lock().await;
            let was = inner.record.state;
            if matches!(was, SandboxState::Creating | SandboxState::Deleted) {
                return Err(unusable(&slot, &inner.record, "it cannot be restarted"));
            }
            // A paused or failed sandbox holds no memory yet; a restarted one will.
            let _reservation = if inner.record.holds_memory() {
                None
            } else {
                Some(m.reserve_memory(u64::from(inner.record.memory_mib))?)
            };
            let (engine, spec, old) = (m.inner.engine.clone(), spec_of(&inner.record), inner.machine.take());
            let restarted = tokio::task::spawn_blocking(move || {
                let mut guard = old.as_ref().map(|machine| lock(machine));
                engine.restart(&spec, guard.as_deref_mut())
            })
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
            let machine = match restarted {
                Ok(machine) => machine,
                Err(e) => {
                    let reason = format!("restarting it failed ({})", error_chain(&e));
                    return Err(if was == SandboxState::Failed {
                        ManagerError::Engine(e)
                    } else {
                        m.fail(&slot, &mut inner, &reason)
                    });
                }
            };
            inner.machine = Some(Arc::new(StdMutex::new(machine)));
            inner.record.failure = None;
            let reason = format!("restarted on request (it was {})", was.as_str());
            if was == SandboxState::Running {
                // Running again, on a new machine: only its engine state changed.
                m.commit_state(&slot, &mut inner, SandboxState::Running, &reason)?;
            } else {
                m.transition(&slot, &mut inner, SandboxState::Running, &reason)?;
            }
            if was == SandboxState::Unresponsive {
                // A new worker, which `transition` does not link from unresponsive.
                m.link_network(&slot, &inner);
            }
            if !m.has_default(&owner) {
                m.set_default(&owner, &slot, &mut inner)?;
            }
            slot.touch();
            Ok((inner.record.clone(), was))
        })
        .await
    }
}
