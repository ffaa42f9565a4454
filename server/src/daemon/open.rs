//! What a daemon opens before it serves: the engine (KVM when the host and the image allow it,
//! the test engine only when asked), with the reasons when none can run.
//!
//! A missing guest image is built here only when `--engine kvm` asks for it (progress on
//! stderr); `capsule serve` does that in the foreground before it starts a daemon, so the user
//! sees the progress.

use std::path::PathBuf;
use std::sync::Arc;

use capsule_vmm::worker::error_chain;

use crate::engine::kvm::{host_refusal, KvmEngine, WarmUp};
use crate::engine::test_engine::{locate_agent_binary, TestEngine};
use crate::engine::{Engine, EngineError};
use crate::image::{current_image, ensure_image, BuildOptions, Flavour, StderrProgress, KERNEL_PATCHES_ENV};
use crate::settings::EngineChoice;

/// Why no engine can run.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No engine can run here, and what would fix it.
    #[error("{0}")]
    NoEngine(String),
    /// The engine could not start.
    #[error("cannot start the sandbox engine")]
    Engine(#[source] EngineError),
}

/// Why no engine runs when the KVM engine cannot (`why`), and what would fix it.
fn no_kvm_engine(why: &str) -> OpenError {
    OpenError::NoEngine(format!(
        "no sandbox engine can run here: the KVM engine cannot start: {why}. Run `capsule doctor` to \
         see what this host supports (KVM access, PVM or VT-x/AMD-V). For development only, \
         `--engine test` runs each sandbox as a host process WITHOUT isolation."
    ))
}

/// The KVM engine for `capsule serve`, or why this host cannot run it: checks the host (as
/// `capsule doctor` does), finds the guest image, and runs VM workers from this very executable
/// (`capsule worker`). With `build_missing_image` a missing image is built first (progress on
/// stderr; the first build takes many minutes); without it a missing image is a reason saying how
/// to build one. Sandboxes live under `root`; templates warm the default Python context of
/// `run_code`.
fn kvm_engine(root: PathBuf, build_missing_image: bool) -> Result<KvmEngine, String> {
    let report = capsule_vmm::doctor::probe();
    if let Some(why) = host_refusal(&report) {
        return Err(why);
    }
    let pvm = report.virtualization == capsule_vmm::doctor::Virtualization::Pvm;
    if let Err(missing) = current_image() {
        if !build_missing_image {
            return Err(format!("{}; `--engine kvm` builds it on start", error_chain(&missing)));
        }
        if pvm && std::env::var_os(KERNEL_PATCHES_ENV).is_none() {
            return Err(format!(
                "no guest image is built yet, and this PVM host needs a kernel with the PVM guest \
                 patch: run `capsule image build --kernel-patch \
                 /path/to/pvm-native-guest-6.12.117.patch` (or set {KERNEL_PATCHES_ENV})"
            ));
        }
        eprintln!("capsule: no guest image yet; building it (the first build takes many minutes)");
    }
    let image = ensure_image(&BuildOptions::default(), &StderrProgress::new()).map_err(|e| {
        format!("the guest image is missing and could not be built: {}; run `capsule image build`", error_chain(&e))
    })?;
    if pvm && image.flavour != Flavour::Pvm {
        return Err(format!(
            "the current guest image has a {} kernel, which this PVM host can only emulate (about a \
             thousand times slower); rebuild it with `capsule image build --flavour pvm --kernel-patch \
             /path/to/pvm-native-guest-6.12.117.patch`",
            image.flavour
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the running executable to start VM workers from: {e}"))?;
    KvmEngine::new(exe, image, root, default_warm_up()).map_err(|e| error_chain(&e))
}

/// What templates run before they are saved: the built-in warm-up in the context `run_code`
/// uses when a call names none (the Python language's name in the tool contract), so that every
/// sandbox starts with those libraries imported.
pub fn default_warm_up() -> WarmUp {
    WarmUp::python(capsule_tool_schemas::Language::Python.as_str())
}

/// Whether the test engine may run: always in debug builds, in release builds
/// only with `--unsafe-test-engine`.
pub fn test_engine_allowed(debug_build: bool, unsafe_test_engine: bool) -> Result<(), OpenError> {
    if debug_build || unsafe_test_engine {
        return Ok(());
    }
    Err(OpenError::NoEngine(
        "the test engine runs sandboxes as host processes with NO isolation; a release build \
         only allows it with --unsafe-test-engine"
            .into(),
    ))
}

/// Builds the guest image if none is built yet (progress on stderr; the first build takes
/// minutes), or says why it cannot be built.
pub fn build_missing_image() -> Result<(), OpenError> {
    if current_image().is_ok() {
        return Ok(());
    }
    let report = capsule_vmm::doctor::probe();
    let pvm = report.virtualization == capsule_vmm::doctor::Virtualization::Pvm;
    if pvm && std::env::var_os(KERNEL_PATCHES_ENV).is_none() {
        return Err(no_kvm_engine(&format!(
            "no guest image is built yet, and this PVM host needs a kernel with the PVM guest patch: run \
             `capsule image build --kernel-patch /path/to/pvm-native-guest-6.12.117.patch` (or set \
             {KERNEL_PATCHES_ENV})"
        )));
    }
    eprintln!("capsule: no guest image yet; building it (the first build takes many minutes)");
    ensure_image(&BuildOptions::default(), &StderrProgress::new()).map(drop).map_err(|e| {
        no_kvm_engine(&format!(
            "the guest image is missing and could not be built: {}; run `capsule image build`",
            error_chain(&e)
        ))
    })
}

/// Picks the engine, or says why none can run and what would fix it.
pub fn choose_engine(
    choice: EngineChoice,
    unsafe_test_engine: bool,
    state_dir: &std::path::Path,
) -> Result<Arc<dyn Engine>, OpenError> {
    match choice {
        // Auto takes KVM, the only isolating engine, when an image is built; `--engine kvm`
        // builds a missing image first. The test engine is never picked silently.
        EngineChoice::Kvm | EngineChoice::Auto => {
            match kvm_engine(state_dir.join("sandboxes"), choice == EngineChoice::Kvm) {
                Ok(engine) => Ok(Arc::new(engine)),
                Err(why) => Err(no_kvm_engine(&why)),
            }
        }
        EngineChoice::Test => {
            test_engine_allowed(cfg!(debug_assertions), unsafe_test_engine)?;
            eprintln!(
                "capsule: WARNING: using the TEST engine: sandboxes are plain host processes with NO isolation. \
                 Never use it with untrusted code."
            );
            let agent = locate_agent_binary().map_err(|e| OpenError::Engine(e.into()))?;
            let engine =
                TestEngine::new(agent, state_dir.join("sandboxes")).map_err(|e| OpenError::Engine(e.into()))?;
            Ok(Arc::new(engine))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_builds_refuse_the_test_engine_without_the_unsafe_flag() {
        let Err(OpenError::NoEngine(why)) = test_engine_allowed(false, false) else {
            panic!("a release build must refuse the test engine");
        };
        assert!(why.contains("--unsafe-test-engine"), "{why}");
        assert!(test_engine_allowed(false, true).is_ok());
        assert!(test_engine_allowed(true, false).is_ok());
    }

    #[test]
    fn no_engine_means_an_explanation_that_names_capsule_doctor() {
        let OpenError::NoEngine(why) = no_kvm_engine("no /dev/kvm") else {
            panic!("must be NoEngine");
        };
        assert!(why.contains("no /dev/kvm"), "{why}");
        assert!(why.contains("capsule doctor"), "{why}");
        assert!(why.contains("--engine test"), "{why}");
    }
}
