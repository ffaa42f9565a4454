//! Snapshot-chain policy for one sandbox: which generation a pause writes, whether it is an
//! incremental layer or a full snapshot, and which older snapshots a full one makes unnecessary.
//!
//! - Every pause (and every fork of a running parent) writes `snapshot-<generation+1>`. It is a
//!   layer over the snapshot the worker started from, or last wrote, when that snapshot is this
//!   sandbox's own and its chain has fewer than [`MAX_INCREMENTAL_LAYERS`] layers; otherwise,
//!   and when writing the layer fails, it is full.
//! - A layer needs every older snapshot in the directory (they are its chain). A full snapshot
//!   needs none: the older ones are *superseded*, and deleted only once the worker that may map
//!   them has stopped (a worker whose exit drops the last reference to a file pays for freeing
//!   it).
//!
//! Snapshot chains never cross sandbox directories: a sandbox starts from a snapshot it does
//! not own only through a linked copy of its chain (`snapshot-origin`), so deleting one
//! sandbox's directory never breaks another.
//!
//! It decides; the worker writes. It never starts, restores or stops a worker.

use std::path::{Path, PathBuf};

use capsule_vmm::worker::{error_chain, WorkerHandle};

use super::layout::SandboxFiles;
use super::{worker_err, KvmError};

/// Most incremental layers a pause stacks over one full snapshot before it writes a full one
/// again (each layer adds mappings to a restore; the VMM allows
/// [`capsule_vmm::snapshot::MAX_CHAIN_DEPTH`]).
pub const MAX_INCREMENTAL_LAYERS: usize = 16;

/// The chain state of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Chain {
    /// The last snapshot generation used in the sandbox's directory.
    pub generation: u64,
    /// When the snapshot the worker's dirty tracking starts from (the one it was restored from,
    /// or last wrote) is one of this sandbox's own, how many layers its chain has (0: full).
    /// `None`: the next snapshot must be full.
    pub layers: Option<usize>,
    /// Snapshots a full one made unnecessary, to delete once the worker has stopped.
    superseded: Vec<PathBuf>,
}

impl Chain {
    /// A chain whose newest snapshot is `generation`, with `layers` below it.
    pub fn at(generation: u64, layers: Option<usize>) -> Self {
        Self { generation, layers, superseded: Vec::new() }
    }

    /// The worker's next snapshot is of a directory this sandbox does not own (a template): the
    /// one after it cannot be a layer.
    pub fn forget_parent(&mut self) {
        self.layers = None;
    }

    /// Pauses the vCPUs of `worker` and writes this sandbox's next snapshot; the VM stays
    /// paused. Returns the new generation.
    pub fn write_next(&mut self, files: &SandboxFiles, worker: &WorkerHandle) -> Result<u64, KvmError> {
        let generation = self.generation + 1;
        let dir = files.snapshot(generation);
        let _ = std::fs::remove_dir_all(&dir);
        let parent_layers = self.layers.take().filter(|layers| *layers < MAX_INCREMENTAL_LAYERS);
        let layers = write_layer_or_full(worker, &dir, parent_layers)?;
        self.generation = generation;
        self.layers = Some(layers);
        if layers == 0 {
            self.superseded = snapshots_except(files, &dir);
        }
        Ok(generation)
    }

    /// The snapshots to delete now that the worker has stopped.
    pub fn take_superseded(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.superseded)
    }
}

/// Pauses the vCPUs and writes a snapshot into `dir`: a layer over the worker's last snapshot
/// when `parent_layers` says it has `n` layers (the result has `n + 1`), else full (also when
/// the layer fails; the result has 0).
fn write_layer_or_full(worker: &WorkerHandle, dir: &Path, parent_layers: Option<usize>) -> Result<usize, KvmError> {
    worker.pause().map_err(worker_err("pause the VM"))?;
    if let Some(layers) = parent_layers {
        match worker.snapshot(dir, true) {
            Ok(info) => {
                tracing::debug!(
                    dir = %dir.display(),
                    pages = info.pages_written,
                    took_us = info.duration_us,
                    layers = layers + 1,
                    "incremental snapshot"
                );
                return Ok(layers + 1);
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %error_chain(&e),
                "the incremental snapshot failed; writing a full one"
            ),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let info = worker.snapshot(dir, false).map_err(worker_err("write a snapshot"))?;
    tracing::debug!(dir = %dir.display(), pages = info.pages_written, took_us = info.duration_us, "full snapshot");
    Ok(0)
}

/// Every snapshot of the sandbox but `keep`.
fn snapshots_except(files: &SandboxFiles, keep: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(files.dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(SandboxFiles::is_snapshot_name))
        .map(|entry| entry.path())
        .filter(|path| path != keep)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_snapshot_supersedes_every_other_snapshot_of_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        for name in ["snapshot-origin", "snapshot-1", "snapshot-2", "rw.ext4"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let mut others = snapshots_except(&files, &files.snapshot(2));
        others.sort();
        assert_eq!(others, vec![dir.path().join("snapshot-1"), dir.path().join("snapshot-origin")]);
    }
}
