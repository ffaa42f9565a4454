//! Capacity: how the manager keeps within its limits (the sandbox count and the memory
//! budget) while creates, resumes and restarts race. The rules are [`super::admission`]'s;
//! this module applies them to the live slots under the admission lock, and holds the memory
//! a resume has reserved until it is recorded running.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::admission::{self, LimitError};
use super::manager::{lock, Manager, ManagerError, Slot};
use crate::record::SandboxRecord;

/// Memory reserved for a resume until the sandbox is recorded running (or the resume failed).
pub(super) struct Reservation<'a> {
    manager: &'a Manager,
    mib: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.manager.inner.reserved_mib.fetch_sub(self.mib, Ordering::AcqRel);
    }
}

impl Manager {
    /// Checks that `extra_count` new sandboxes holding `extra_mib` fit, beside the memory that
    /// resumes in progress have reserved.
    pub(super) fn check_capacity(&self, extra_count: usize, extra_mib: u64) -> Result<(), ManagerError> {
        let records: Vec<SandboxRecord> = self.slots().iter().map(|s| s.record()).collect();
        let config = &self.inner.config;
        let reserved = self.inner.reserved_mib.load(Ordering::Acquire);
        Ok(admission::check_capacity(
            &records,
            &config.limits,
            config.timers.retention,
            extra_count,
            extra_mib + reserved,
        )
        .map_err(|e| match e {
            LimitError::Memory { used_mib, budget_mib, needed_mib } => {
                LimitError::Memory { used_mib: used_mib + reserved, budget_mib, needed_mib: needed_mib - reserved }
            }
            other => other,
        })?)
    }

    /// Reserves `mib` of the memory budget for a resume, atomically with respect to other
    /// admissions and reservations.
    pub(super) fn reserve_memory(&self, mib: u64) -> Result<Reservation<'_>, ManagerError> {
        let _admission = lock(&self.inner.admission);
        self.check_capacity(0, mib)?;
        self.inner.reserved_mib.fetch_add(mib, Ordering::AcqRel);
        Ok(Reservation { manager: self, mib })
    }

    /// Checks the limits for one new sandbox and registers it, atomically with
    /// respect to other admissions (a `creating` record counts against them).
    pub(super) fn admit(&self, slot: &Arc<Slot>, record: &SandboxRecord, reason: &str) -> Result<(), ManagerError> {
        let _admission = lock(&self.inner.admission);
        self.check_capacity(1, u64::from(record.memory_mib))?;
        self.inner.registry.insert(record, reason)?;
        lock(&self.inner.slots).insert(slot.id.clone(), slot.clone());
        Ok(())
    }
}
