//! Recovery: what a manager opened over an existing registry finds of each recorded sandbox.
//!
//! A paused sandbox is found on disk and stays paused; a running (or unresponsive) one is
//! reattached to its VM, which outlived the server, or, when that VM is gone, rolled back to its
//! newest snapshot (its owner is told on the next call); anything else that cannot come back is
//! marked failed with the reason, its files kept for `restart_sandbox` until it is killed.

use std::sync::{Arc, Mutex as StdMutex};

use capsule_vmm::worker::error_chain;

use super::health::rollback_note;
use super::manager::{lock, spec_of, Manager, ManagerError, SharedMachine};
use crate::engine::{Reattached, RollBack};
use crate::record::{SandboxRecord, SandboxState};
use crate::registry::now_ms;

/// What a restarted manager found of a recorded sandbox.
enum Found {
    /// Its machine, as it was.
    Machine(SharedMachine),
    /// Its machine, rolled back to its newest snapshot because its VM was lost.
    RolledBack(SharedMachine, RollBack),
    /// Nothing usable: why.
    Lost(String),
    /// Nothing, and none was expected (failed or deleted).
    Nothing,
}

impl Manager {
    /// Finds `record`'s sandbox again, records what changed, and registers it.
    pub(super) fn recover(&self, mut record: SandboxRecord) -> Result<(), ManagerError> {
        let from = record.state;
        let mut notice = None;
        let (machine, change) = match self.reattach(&record) {
            Found::Machine(m) => (Some(m), None),
            Found::RolledBack(m, rolled) => {
                let note = rollback_note(&rolled);
                notice = Some(format!("Sandbox {}: {note}.", record.id));
                (Some(m), Some((SandboxState::Paused, format!("restart: {note}"))))
            }
            Found::Lost(reason) => {
                if from == SandboxState::Creating {
                    // Half made: nothing in it to restart.
                    self.inner.engine.discard(&record.id);
                }
                record.failure = Some(reason.clone());
                (None, Some((SandboxState::Failed, format!("restart: {reason}"))))
            }
            Found::Nothing => (None, None),
        };
        if let Some((state, reason)) = change {
            record.state = state;
            record.updated_ms = now_ms();
            record.paused_ms = (state == SandboxState::Paused).then_some(record.updated_ms);
            if let Some(m) = &machine {
                record.engine_state = lock(m).saved_state();
            }
            self.inner.registry.record_transition(&record, from, &reason)?;
        }
        self.insert_recovered(record, machine, notice);
        Ok(())
    }

    /// The machine of a sandbox recorded before a restart, or why it is lost.
    fn reattach(&self, record: &SandboxRecord) -> Found {
        let engine = &self.inner.engine;
        match record.state {
            SandboxState::Creating => Found::Lost("the server stopped while it was being created".to_string()),
            SandboxState::Running | SandboxState::Paused | SandboxState::Unresponsive
                if record.engine != engine.name() =>
            {
                Found::Lost(format!(
                    "it was made by the {} engine, but this server runs the {} engine",
                    record.engine,
                    engine.name()
                ))
            }
            SandboxState::Running | SandboxState::Paused | SandboxState::Unresponsive => {
                let paused = record.state == SandboxState::Paused;
                match engine.reattach(&spec_of(record), &record.engine_state, paused) {
                    Ok(Reattached { machine, rolled_back: None }) => Found::Machine(Arc::new(StdMutex::new(machine))),
                    Ok(Reattached { machine, rolled_back: Some(rolled) }) => {
                        Found::RolledBack(Arc::new(StdMutex::new(machine)), rolled)
                    }
                    Err(e) => Found::Lost(format!("its VM was lost while the server was down ({})", error_chain(&e))),
                }
            }
            SandboxState::Failed | SandboxState::Deleted => Found::Nothing,
        }
    }
}
