//! What the benches need from capsule's engines: a KVM engine when this host and build can run
//! microVMs (never building the guest image, which takes many minutes), the sandbox spec with
//! the server's default sizes, the `true` every bench runs to see a machine answer, and
//! [`Owned`], which kills a machine when dropped so that no bench leaves a VM behind on an
//! early error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Result};
use capsule::config::{Limits, DEFAULT_OUTPUT_CAP_BYTES};
use capsule::engine::kvm::{host_refusal, KvmEngine};
use capsule::engine::{Machine, MachineSpec};
use capsule::image::{current_image, Flavour, ImageInfo};
use capsule_agent::client::AgentClient;
use capsule_agent::protocol::ExecRequest;
use capsule_vmm::doctor::Virtualization;

/// The command a bench runs to see that a machine answers.
pub const TRUE_COMMAND: &str = "true";
/// Deadline of one guest command.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A KVM engine with sandboxes under `root` whose workers run `capsule`, and the image it
/// boots; or, as `Ok(Err(why))`, why this host cannot run it (no usable KVM, no built image).
pub fn kvm_engine(capsule: &Path, root: PathBuf) -> Result<std::result::Result<(KvmEngine, ImageInfo), String>> {
    let report = capsule_vmm::doctor::probe();
    if let Some(why) = host_refusal(&report) {
        return Ok(Err(why));
    }
    // Never build the image here (that takes many minutes): only use a built one.
    let image = match current_image() {
        Ok(image) => image,
        Err(e) => return Ok(Err(format!("no usable guest image: {e}"))),
    };
    if report.virtualization == Virtualization::Pvm && image.flavour != Flavour::Pvm {
        return Ok(Err(format!("this PVM host needs a pvm-flavour guest image; the current one is {}", image.flavour)));
    }
    let engine = KvmEngine::new(capsule.to_path_buf(), image.clone(), root, capsule::daemon::open::default_warm_up())?;
    Ok(Ok((engine, image)))
}

/// A sandbox spec `id` with the server's default sizes and template.
pub fn default_spec(id: &str) -> MachineSpec {
    let limits = Limits::default();
    MachineSpec {
        id: id.into(),
        template: "default".into(),
        vcpus: limits.default_vcpus,
        memory_mib: limits.default_memory_mib,
        disk_mib: limits.default_disk_mib,
        env: BTreeMap::new(),
    }
}

/// The `Exec` that capsule's `run_command` handler sends for `command`.
pub fn run_command_exec(command: &str) -> ExecRequest {
    ExecRequest { output_cap_bytes: Some(DEFAULT_OUTPUT_CAP_BYTES as u64), ..ExecRequest::shell(command) }
}

/// Runs [`TRUE_COMMAND`] as `run_command` would, and checks that it exited 0.
pub fn exec_true(client: &AgentClient) -> Result<()> {
    let out = client.exec(run_command_exec(TRUE_COMMAND), Some(CALL_TIMEOUT))?;
    if out.status.code != Some(0) {
        bail!("exec of {TRUE_COMMAND:?} ended with {:?}", out.status);
    }
    Ok(())
}

/// Kills a machine when dropped, so an early error leaves no VM or agent behind.
pub struct Owned(pub Box<dyn Machine>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("note: killing a benchmark sandbox failed: {e}");
        }
    }
}
