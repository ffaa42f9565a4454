//! Templates: a guest booted once until its agent answered, warmed (a cell of code run in one
//! of its interpreter contexts, e.g. the libraries every sandbox imports), then saved as a
//! snapshot plus its writable disk under `<root>/.templates/`. New sandboxes restore from it.
//!
//! A template is keyed by its name, the image version, the recipe version, a hash of its warm-up,
//! the snapshot format and the machine's size, built on first use, and never changed after: the
//! snapshot appears whole or not at all (the VMM renames it into place). Templates of another
//! image, recipe, warm-up or format are stale and deleted when the engine opens.
//!
//! A template is booted with every device a sandbox has, the net device included (see
//! [`boot_config`](super::layout::boot_config)), so every sandbox restored from it has the same
//! devices and its own broker socket; the guest MAC is the template's (the guest read it at
//! boot), which is harmless: each sandbox is alone on its network with the gateway. Templates
//! saved before VMs had a net device carry an older snapshot format in their name and are stale.
//!
//! What the warm-up runs, and in which context, is handed in ([`WarmUp`]): the engine does not
//! know which context a tool call uses by default.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capsule_agent::client::AgentClient;
use capsule_agent::protocol::{Event, Language, Op, Reply, RunCodeRequest};
use sha2::{Digest, Sha256};

use super::layout::SandboxFiles;
use super::machine::KvmMachine;
use super::KvmError;
use crate::engine::MachineSpec;

/// Where templates live, under the engine's root (sandbox ids never start with a dot).
pub(super) const TEMPLATES_DIR: &str = ".templates";
/// Version of the template recipe (boot + warm-up), part of each template's directory name
/// together with the VMM's snapshot format: templates of an older recipe or format are stale and
/// deleted like those of another image.
const TEMPLATE_RECIPE: &str = "w1";
/// How long the warm-up cell may take.
const TEMPLATE_WARM_TIMEOUT: Duration = Duration::from_secs(120);
/// Characters of a template's name kept in its directory name.
const MAX_TEMPLATE_NAME_CHARS: usize = 32;

/// What a template runs before it is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmUp {
    /// The interpreter context the code runs in; sandboxes find its state there.
    pub context: String,
    /// The context's language.
    pub language: Language,
    /// The code.
    pub code: String,
}

impl WarmUp {
    /// The built-in template's warm-up (`warm` in `templates/default.toml`) in the Python
    /// context named `context`.
    pub fn python(context: impl Into<String>) -> Self {
        let code = crate::builtin_template::warm_code().to_string();
        Self { context: context.into(), language: Language::Python, code }
    }

    /// A short hash of what the warm-up runs, part of every template's directory name: a
    /// template warmed otherwise is stale.
    fn digest(&self) -> String {
        let mut hash = Sha256::new();
        for part in [self.context.as_str(), self.language.as_str(), self.code.as_str()] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().iter().take(4).map(|b| format!("{b:02x}")).collect()
    }
}

/// The engine's templates.
#[derive(Debug)]
pub(super) struct Templates {
    dir: PathBuf,
    image_version: String,
    warm_up: WarmUp,
    /// Held while a template is looked up or built, so that one is built once.
    building: Mutex<()>,
}

impl Templates {
    /// The templates under `root` for the image `image_version`; stale ones are deleted
    /// (sandboxes restored from them own their memory mappings, so the files can go).
    pub fn open(root: &Path, image_version: &str, warm_up: WarmUp) -> Self {
        let templates = Self {
            dir: root.join(TEMPLATES_DIR),
            image_version: image_version.to_string(),
            warm_up,
            building: Mutex::new(()),
        };
        templates.remove_stale();
        templates
    }

    /// What every current template's directory name holds: the image, the recipe, the warm-up
    /// and the snapshot format.
    fn generation(&self) -> String {
        format!(
            "{}-{TEMPLATE_RECIPE}w{}s{}",
            self.image_version,
            self.warm_up.digest(),
            capsule_vmm::snapshot::format::FORMAT_VERSION
        )
    }

    fn remove_stale(&self) {
        let current = format!("-{}-", self.generation());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().contains(&current) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The files of the template for machines like `spec`.
    fn files_for(&self, spec: &MachineSpec, vcpus: u8) -> SandboxFiles {
        let name: String = spec
            .template
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(MAX_TEMPLATE_NAME_CHARS)
            .collect();
        let key = format!("{name}-{}-{}m-{}d-{vcpus}c", self.generation(), spec.memory_mib, spec.disk_mib);
        SandboxFiles::new(self.dir.join(key))
    }

    /// The template for machines like `spec`, built on first use by `boot` (which boots a fresh
    /// guest with the files it is given), warmed and saved.
    pub fn get_or_build(
        &self,
        spec: &MachineSpec,
        vcpus: u8,
        boot: impl FnOnce(SandboxFiles) -> Result<KvmMachine, KvmError>,
    ) -> Result<SandboxFiles, KvmError> {
        let files = self.files_for(spec, vcpus);
        let _building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        if files.snapshot(0).is_dir() {
            return Ok(files);
        }
        let _ = std::fs::remove_dir_all(files.dir());
        let built = boot(files.clone()).and_then(|mut machine| {
            if let Some(client) = machine.live_client() {
                warm(&client, &self.warm_up);
            }
            let saved = machine.snapshot_to(&files.snapshot(0));
            machine.stop_worker();
            saved
        });
        match built {
            Ok(()) => Ok(files),
            Err(e) => {
                let _ = std::fs::remove_dir_all(files.dir());
                Err(e)
            }
        }
    }

    /// Deletes the template at `files` (it could not be restored; the next create builds it
    /// again).
    pub fn discard(&self, files: &SandboxFiles) {
        let _ = std::fs::remove_dir_all(files.dir());
    }
}

/// Runs the warm-up. A failure only costs speed (the sandbox imports on first use instead), so
/// it is logged, not returned.
fn warm(client: &AgentClient, warm_up: &WarmUp) {
    let started = Instant::now();
    let op = Op::RunCode(RunCodeRequest {
        context: warm_up.context.clone(),
        language: warm_up.language,
        code: warm_up.code.clone(),
        output_cap_bytes: None,
        limits: None,
    });
    match client.call(op, Some(TEMPLATE_WARM_TIMEOUT)) {
        Ok((events, Reply::CodeDone(outcome))) if !outcome.timed_out => {
            match events.iter().find_map(|e| match e {
                Event::Error(error) => Some(error),
                _ => None,
            }) {
                Some(error) => tracing::warn!(?error, "warming the template failed"),
                None => tracing::info!(
                    took_ms = started.elapsed().as_millis() as u64,
                    context = %warm_up.context,
                    "template warmed"
                ),
            }
        }
        Ok((_, reply)) => tracing::warn!(?reply, "warming the template did not finish"),
        Err(e) => tracing::warn!(error = %e, "warming the template failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            id: "sb-1".into(),
            template: "default".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
            env: Default::default(),
        }
    }

    fn built(templates: &Templates) -> PathBuf {
        let dir = templates.files_for(&spec(), 1).dir().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_template_survives_reopening_and_goes_with_another_image_or_warm_up() {
        let root = tempfile::tempdir().unwrap();
        let warm = WarmUp::python("python");
        let dir = built(&Templates::open(root.path(), "img1", warm.clone()));
        assert!(Templates::open(root.path(), "img1", warm.clone()).files_for(&spec(), 1).dir() == dir);
        assert!(dir.is_dir(), "the same image and warm-up keep it: {}", dir.display());

        let other = WarmUp { code: "import json".into(), ..warm.clone() };
        let dir = built(&Templates::open(root.path(), "img1", other));
        assert!(dir.is_dir());
        Templates::open(root.path(), "img1", warm.clone());
        assert!(!dir.exists(), "a template warmed otherwise is stale");

        let dir = built(&Templates::open(root.path(), "img1", warm.clone()));
        Templates::open(root.path(), "img2", warm);
        assert!(!dir.exists(), "a template of another image is stale");
    }

    #[test]
    fn the_built_in_warm_up_is_the_specs() {
        assert_eq!(WarmUp::python("python").code, crate::builtin_template::warm_code());
        assert!(WarmUp::python("python").code.contains("import numpy"));
    }
}
