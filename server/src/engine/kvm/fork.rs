//! Forks: N new machines from one moment of a parent.
//!
//! The parent's state is taken once for all children: a running parent writes its next snapshot
//! (a layer over its chain where it can be, like a pause) and runs on; a parent paused to disk
//! gives its newest snapshot. While the parent cannot write, its writable disk is copied once
//! per child. Each child then restores from a linked copy of that snapshot's chain in its own
//! directory, so a fork writes only the pages the parent changed, never its RAM, and deleting
//! the parent never breaks a child. A child that cannot be prepared or started fails alone.

use std::path::Path;
use std::sync::Arc;

use super::host::check_vcpus;
use super::layout::{copy_disk, SandboxFiles};
use super::machine::KvmMachine;
use super::{worker_err, KvmError};
use crate::engine::{EngineError, Machine, MachineSpec};

/// Makes one child per spec from `parent`'s state at one moment; one result per child, in order.
pub(super) fn fork_many(
    parent: &mut KvmMachine,
    children: &[MachineSpec],
) -> Vec<Result<Box<dyn Machine>, EngineError>> {
    let Some(root) = parent.files.dir().parent().map(Path::to_path_buf) else {
        return children.iter().map(|_| Err(KvmError::NoRoot.into())).collect();
    };
    let prepared: Vec<Result<SandboxFiles, KvmError>> = children
        .iter()
        .map(|child| {
            check_vcpus(child.vcpus)?;
            let files = SandboxFiles::new(root.join(&child.id));
            files.create_dir()?;
            Ok(files)
        })
        .collect();
    let ready: Vec<SandboxFiles> = prepared.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
    let source = if ready.is_empty() {
        Err(Arc::new(KvmError::NothingToFork))
    } else {
        take_state(parent, &ready).map_err(Arc::new)
    };
    children
        .iter()
        .zip(prepared)
        .map(|(child, files)| {
            let started = files.and_then(|files| match &source {
                Ok(generation) => start_child(parent, files, *generation),
                Err(why) => Err(KvmError::ForkSource(why.clone())),
            });
            started.map(|machine| Box::new(machine) as Box<dyn Machine>).map_err(|e| {
                let _ = std::fs::remove_dir_all(root.join(&child.id));
                e.into()
            })
        })
        .collect()
}

/// The state `children` (their directories made) start from, taken at one moment: each gets a
/// copy of the writable disk, and the generation of the snapshot to restore is returned.
pub(super) fn take_state(parent: &mut KvmMachine, children: &[SandboxFiles]) -> Result<u64, KvmError> {
    let disk = parent.files.writable_disk();
    let copy_disks = || children.iter().try_for_each(|child| copy_disk(&disk, &child.writable_disk()));
    if let Some(generation) = parent.disk_generation() {
        copy_disks()?;
        return Ok(generation);
    }
    let was_paused = parent.paused_in_memory()?;
    // The disks must be copied while the parent cannot write to them.
    let taken = parent.snapshot_next().and_then(|generation| Ok(copy_disks().map(|()| generation)?));
    if !was_paused {
        parent.worker()?.resume().map_err(worker_err("resume the parent"))?;
    }
    taken
}

/// Starts a child prepared by [`take_state`]: restored from a linked copy of the parent's
/// snapshot `generation`, in its own directory `files`.
fn start_child(parent: &KvmMachine, files: SandboxFiles, generation: u64) -> Result<KvmMachine, KvmError> {
    let rootfs = files.adopt_rootfs(&parent.rootfs);
    KvmMachine::restored_from(
        parent.worker_exe.clone(),
        parent.trash.clone(),
        files,
        rootfs,
        &parent.files.own_snapshot(generation),
    )
}
