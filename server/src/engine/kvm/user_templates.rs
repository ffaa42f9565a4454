//! Templates saved from sandboxes (`save_template`): a sandbox's state at one moment, memory
//! and disk, kept under `<root>/.user-templates/<key>/` in the same layout as a built-in
//! template, so that new sandboxes restore from it the same way.
//!
//! ```text
//! <root>/.user-templates/<key>/
//!   snapshot-0/    a linked copy of the sandbox's snapshot chain (hard links: no memory copied;
//!                  its layers in `0/`, `1/`, ..., the newest on top)
//!   rw.ext4        a copy of its writable disk at that moment
//!   rootfs.ext4    a hard link to the root filesystem it runs on (the image cache may drop it)
//! ```
//!
//! The state is taken as a fork takes it (a running sandbox writes its next snapshot and runs
//! on; a paused one gives its newest), so saving costs what a fork of one child costs. Nothing
//! of a template is shared with a sandbox made from it but hard links, so deleting the template
//! never breaks one. The manager owns names and the catalogue (the registry); this module only
//! makes, restores and deletes the files.

use std::path::{Path, PathBuf};

use capsule_vmm::snapshot::linked_copy::link_chain;

use super::fork::take_state;
use super::layout::SandboxFiles;
use super::machine::KvmMachine;
use super::{KvmEngine, KvmError};
use crate::engine::{allocated_bytes, MachineSpec, SavedTemplate};

/// Where saved templates live, under the engine's root (not under `.templates`, whose stale
/// entries are deleted when the image changes: a saved template keeps its own root filesystem).
pub(super) const USER_TEMPLATES_DIR: &str = ".user-templates";

/// Where a saved template's files are, as the registry keeps it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TemplateState {
    dir: PathBuf,
    /// The top of its linked chain (what a sandbox restores).
    snapshot: PathBuf,
    rootfs: PathBuf,
}

/// Saves `machine`'s state now as the template `key` (a file name unique among templates).
pub(super) fn save(machine: &mut KvmMachine, key: &str) -> Result<SavedTemplate, KvmError> {
    let root = machine.files.dir().parent().ok_or(KvmError::NoRoot)?.to_path_buf();
    let files = SandboxFiles::new(root.join(USER_TEMPLATES_DIR).join(key));
    if files.dir().exists() {
        return Err(KvmError::BadTemplate(format!("{} already exists", files.dir().display())));
    }
    let saved = save_into(machine, &files);
    if saved.is_err() {
        let _ = std::fs::remove_dir_all(files.dir());
    }
    saved
}

fn save_into(machine: &mut KvmMachine, files: &SandboxFiles) -> Result<SavedTemplate, KvmError> {
    files.create_dir()?;
    let generation = take_state(machine, std::slice::from_ref(files))?;
    let linked = link_chain(&machine.files.own_snapshot(generation), &files.snapshot(0))
        .map_err(|e| KvmError::BadTemplate(format!("cannot link the snapshot into the template: {e}")))?;
    let rootfs = files.adopt_rootfs(&machine.rootfs);
    // The root filesystem is the image's, shared with every sandbox: not the template's cost.
    let bytes = allocated_bytes(files.dir()).saturating_sub(allocated_bytes_of(&rootfs));
    let state = TemplateState { dir: files.dir().to_path_buf(), snapshot: linked.dir, rootfs };
    Ok(SavedTemplate { engine_state: serde_json::to_value(&state).unwrap_or_default(), bytes })
}

impl KvmEngine {
    /// A new machine `spec` restored from the saved template `template`.
    pub(super) fn create_from_saved(
        &self,
        spec: &MachineSpec,
        template: &serde_json::Value,
    ) -> Result<KvmMachine, KvmError> {
        let state: TemplateState = serde_json::from_value(template.clone())
            .map_err(|e| KvmError::BadTemplate(format!("its saved state is unusable ({e}): {template}")))?;
        let template = SandboxFiles::new(&state.dir);
        if !state.snapshot.is_dir() || !template.writable_disk().is_file() {
            return Err(KvmError::BadTemplate(format!("its files in {} are gone", state.dir.display())));
        }
        self.restore_from(spec, &template.writable_disk(), &state.snapshot, &state.rootfs)
    }

    /// Deletes a saved template's files.
    pub(super) fn remove_saved(&self, template: &serde_json::Value) {
        match serde_json::from_value::<TemplateState>(template.clone()) {
            Ok(state) if state.dir.starts_with(self.root.join(USER_TEMPLATES_DIR)) => {
                if state.dir.exists() {
                    self.trash.discard(&state.dir);
                }
            }
            _ => tracing::warn!(%template, "not a saved template of this engine; nothing deleted"),
        }
    }
}

/// Bytes the file at `path` takes on disk, if it is inside a template (0 for the image's own).
fn allocated_bytes_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if path.file_name().is_some_and(|n| n == "rootfs.ext4") {
        std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
    } else {
        0
    }
}
