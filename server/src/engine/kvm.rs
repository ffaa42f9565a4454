//! The KVM engine: each sandbox is a microVM of the guest image, run by our own VMM in a worker
//! process of its own (`capsule worker`), reached over hybrid virtio-vsock.
//!
//! Owns the per-sandbox directory (writable disk, a hard link to the image's read-only root
//! filesystem so that the image cache can drop it, vsock socket, serial log, snapshots), the
//! boot recipe of the image ([`boot_config`]), waiting for the guest agent, and the lifecycle:
//! - create: restore the template of its size (a guest booted once until its agent answered,
//!   warmed — the default Python context of `run_code` has imported numpy, pandas and
//!   matplotlib — then saved as a snapshot and a writable disk under `.templates/`; built on
//!   first use) with a copy of the template's disk, in tens of milliseconds; memory pages of
//!   the template are shared copy-on-write, in RAM and on disk (the sandbox restores from
//!   `snapshot-origin`, a hard-linked copy of the template's snapshot). If the template cannot
//!   be restored, boot the image instead;
//! - connect: `CONNECT 1024` on the vsock socket and the handshake, retried until the agent
//!   is up; after a restore or fork the host also sends `SetClock` and `AddEntropy`;
//! - pause: pause the vCPUs, write a snapshot `snapshot-N` to disk, stop the worker (its RAM
//!   is freed). The snapshot is an incremental layer (only the pages changed since the
//!   snapshot the worker was restored from) when that snapshot is this sandbox's own and its
//!   chain is shorter than [`MAX_INCREMENTAL_LAYERS`]; otherwise it is full, and then every
//!   older snapshot of the sandbox is deleted;
//! - resume: restore the newest snapshot (with the chain below it) into a new worker;
//! - fork: pause the parent, write its next snapshot (a layer over its chain, like a pause),
//!   copy its writable disk (sparse, reflinked where the filesystem can), let the parent run
//!   again, and restore the child from a hard-linked copy of that snapshot's chain in the
//!   child's own `snapshot-origin`. A parent paused to disk is forked the same way from its
//!   newest snapshot. A fork therefore writes only the pages the parent changed, not its RAM;
//!   `fork_many` takes the parent's state once for all its children.
//!
//! Snapshot chains never cross sandbox directories, so deleting a sandbox's directory can never
//! break another sandbox: a sandbox starts from a snapshot it does not own only through its
//! linked copy ([`link_chain`]), which shares the memory files but not their names. Every
//! snapshot in a sandbox's directory is the newest one or a (transitive) parent of it. Where a
//! copy cannot be made the sandbox restores the foreign snapshot itself and its next pause is
//! full; a restored worker maps the chain's files, so deleting them later does not disturb it.
//!
//! It never talks MCP, never touches the registry, and never runs KVM itself (the worker does).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{Event, Language, Op, Reply, RunCodeRequest, AGENT_VSOCK_PORT};
use capsule_vmm::doctor::{HostReport, PVM_MAX_LINUX_VCPUS};
use capsule_vmm::snapshot::linked_copy::link_chain;
use capsule_vmm::snapshot::RestoreOverrides;
use capsule_vmm::worker::{error_chain, WorkerError, WorkerEvent, WorkerHandle};
use capsule_vmm::{DiskConfig, VmConfig, VsockConfig};

use super::trash::Trash;
use super::{detect_host_limits, Engine, EngineError, HostLimits, Machine, MachineSpec};
use crate::image::{
    create_writable_disk, current_image, ensure_image, BuildOptions, Flavour, ImageError, ImageInfo, StderrProgress,
    KERNEL_PATCHES_ENV,
};

/// What the agent prints on the serial console once it serves on vsock.
pub const AGENT_READY_MARKER: &str = "capsule-agent ready";
/// How long a booting guest may take until its agent answers.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest may take until its agent answers (it was already up).
pub const AGENT_RESTORED_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two attempts to reach the agent.
const AGENT_RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// Deadline of the clock and entropy calls after a restore.
const GUEST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest's vsock CID (each VM has its own vsock device, so all can use the first one).
pub const GUEST_CID: u32 = 3;
/// Bytes of host entropy sent to a restored guest.
const ENTROPY_BYTES: usize = 64;
/// Serial console lines quoted in boot failures.
pub const SERIAL_TAIL_LINES: usize = 40;
/// Where templates live, under the engine's root (sandbox ids never start with a dot).
const TEMPLATES_DIR: &str = ".templates";
/// Version of the template recipe (boot + warm-up), part of each template's directory name:
/// templates of an older recipe are stale and deleted like those of another image.
const TEMPLATE_RECIPE: &str = "w1";
/// The cell a template runs before it is saved, in the context `run_code` uses when the
/// caller names none (the language's name: see the MCP handler), so that every sandbox
/// starts with these libraries imported (they take seconds to import in a guest).
const TEMPLATE_WARM_CELL: &str = "import numpy, pandas, matplotlib\nimport matplotlib.pyplot";
/// How long the warm-up cell may take.
const TEMPLATE_WARM_TIMEOUT: Duration = Duration::from_secs(120);
/// Characters of a template's name kept in its directory name.
const MAX_TEMPLATE_NAME_CHARS: usize = 32;
/// Longest Unix socket path the kernel takes, in bytes.
const MAX_UDS_PATH_BYTES: usize = 107;
/// Most incremental layers a pause stacks over one full snapshot before it writes a full one
/// again (each layer adds mappings to a restore; the VMM allows
/// [`capsule_vmm::snapshot::MAX_CHAIN_DEPTH`]).
pub const MAX_INCREMENTAL_LAYERS: usize = 16;
/// The fork caveat of this engine, for the model.
const FORK_NOTE: &str = "Forks copy the whole machine: memory, running processes, interpreter \
state and files. Network connections and agent connections are not carried over.";

/// Errors of the KVM engine's parts.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The host cannot give this machine what it asks for.
    #[error("{0}")]
    Host(String),
    /// The guest image is missing or unusable.
    #[error("the guest image is unusable")]
    Image(#[source] ImageError),
    /// A file of the sandbox could not be made.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The worker process failed a request.
    #[error("the VM worker failed to {what}")]
    Worker {
        /// What it was asked.
        what: &'static str,
        /// Why.
        #[source]
        source: WorkerError,
    },
    /// The VM ended.
    #[error("the VM is gone: {0}")]
    Gone(String),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {waited:?} (last error: {last_error}); serial console tail:\n{serial_tail}")]
    AgentNotReady {
        /// How long we waited.
        waited: Duration,
        /// The last connection error.
        last_error: String,
        /// The end of the serial log.
        serial_tail: String,
    },
    /// The agent refused a call.
    #[error("the guest agent failed {what}")]
    Agent {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Saved state from the registry cannot be used.
    #[error("saved machine state is unusable: {0}")]
    BadSavedState(String),
    /// The parent's state could not be taken for a fork (every child of it fails alike).
    #[error("cannot take the parent's state for the fork: {0}")]
    ForkSource(String),
}

impl From<KvmError> for EngineError {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::Host(why) => EngineError::Unavailable(why),
            KvmError::Gone(why) => EngineError::Dead(why),
            KvmError::Worker { source: WorkerError::WorkerDied { pid, status }, .. } => {
                EngineError::Dead(format!("worker {pid} died ({status})"))
            }
            KvmError::BadSavedState(why) => EngineError::BadSavedState(why),
            other => EngineError::Start(error_chain(&other)),
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KvmError {
    let what = what.into();
    move |source| KvmError::Io { what, source }
}

fn worker_err(what: &'static str) -> impl FnOnce(WorkerError) -> KvmError {
    move |source| KvmError::Worker { what, source }
}

/// The files of one sandbox, all under its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFiles {
    dir: PathBuf,
}

impl SandboxFiles {
    /// The files under `dir` (nothing is created).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The writable ext4 disk (`/dev/vdb` in the guest).
    pub fn writable_disk(&self) -> PathBuf {
        self.dir.join("rw.ext4")
    }

    /// The host end of the hybrid vsock.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The snapshot of generation `n` (a pause to disk, or a fork taken of this sandbox).
    fn snapshot(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("snapshot-{generation}"))
    }

    /// The sandbox's own name for its read-only root filesystem image.
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// Gives the sandbox its own name (a hard link) for the read-only root filesystem at
    /// `shared` and returns it, so that the image cache may drop that image while the sandbox
    /// still needs it (a paused sandbox resumes on it, a fork inherits it). Where no link can be
    /// made (another filesystem) the sandbox uses `shared` itself.
    fn adopt_rootfs(&self, shared: &Path) -> PathBuf {
        let own = self.rootfs();
        match std::fs::hard_link(shared, &own) {
            Ok(()) => own,
            Err(e) => {
                tracing::debug!(
                    rootfs = %shared.display(),
                    error = %e,
                    "cannot link the root filesystem into the sandbox; using the image cache's copy"
                );
                shared.to_path_buf()
            }
        }
    }

    /// The linked copy of the chain this sandbox was restored from when it was made (the
    /// template's snapshot, or its parent's); its first pause layers over it.
    fn origin(&self) -> PathBuf {
        self.dir.join("snapshot-origin")
    }

    /// Creates the directory and checks the socket path fits a `sockaddr_un`.
    fn create_dir(&self) -> Result<(), KvmError> {
        let uds = self.vsock_uds();
        if uds.as_os_str().len() > MAX_UDS_PATH_BYTES {
            return Err(KvmError::Host(format!(
                "the vsock socket path {} is longer than {MAX_UDS_PATH_BYTES} bytes; use a shorter --state-dir",
                uds.display()
            )));
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err(format!("cannot create {}", self.dir.display())))
    }
}

/// The VM that boots `image` for a sandbox with `files`: the image's read-only root filesystem
/// as `/dev/vda`, the sandbox's writable disk as `/dev/vdb`, vsock, virtio-rng, serial log.
/// The image's command line is passed as is (the VMM appends its device declarations).
pub fn boot_config(image: &ImageInfo, files: &SandboxFiles, vcpus: u8, mem_mib: u64) -> VmConfig {
    let mut config = VmConfig::new(&image.kernel, image.cmdline.clone());
    config.vcpus = vcpus;
    config.mem_mib = mem_mib;
    config.disks = vec![
        DiskConfig { path: image.rootfs.clone(), read_only: true },
        DiskConfig { path: files.writable_disk(), read_only: false },
    ];
    config.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: files.vsock_uds() });
    config.serial_log = Some(files.serial_log());
    config.rng = true;
    config
}

/// The last `lines` lines of the serial log at `path` (empty when there is none).
pub fn serial_tail(path: &Path, lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the serial log at `path` contains `needle`; returns how long that took, or
/// `None` at `timeout`. Polls the file (the worker writes it; the controller cannot see its
/// in-memory console).
pub fn wait_for_serial(path: &Path, needle: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let needle = needle.as_bytes();
    let mut seen = 0usize;
    let mut buffer = Vec::new();
    loop {
        if let Ok(mut file) = std::fs::File::open(path) {
            use std::io::{Seek, SeekFrom};
            if file.seek(SeekFrom::Start(seen as u64)).is_ok() {
                let _ = file.read_to_end(&mut buffer);
                // Search only what is new, plus enough before it to catch a straddling needle.
                let from = seen.saturating_sub(needle.len());
                seen = buffer.len();
                if buffer[from..].windows(needle.len()).any(|w| w == needle) {
                    return Some(started.elapsed());
                }
            }
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connects to the agent on the hybrid vsock at `uds` and shakes hands, retrying until
/// `timeout` while `alive` says the VM still runs. The serial log at `serial` is quoted when
/// the agent never answers.
pub fn connect_agent(
    uds: &Path,
    serial: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<AgentClient, KvmError> {
    let started = Instant::now();
    loop {
        alive().map_err(KvmError::Gone)?;
        let error = match AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT) {
            Ok((client, _hello)) => return Ok(client),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(KvmError::AgentNotReady {
                waited: started.elapsed(),
                last_error: error_chain(&error),
                serial_tail: serial_tail(serial, SERIAL_TAIL_LINES),
            });
        }
        std::thread::sleep(AGENT_RETRY_INTERVAL);
    }
}

/// Tells the guest the host's wall-clock time (after a fresh boot the RTC-less guest starts at
/// the epoch; after a restore its clock stands where it was saved).
pub fn set_guest_clock(client: &AgentClient) -> Result<(), KvmError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let unix_time_ns = u64::try_from(now).unwrap_or(u64::MAX);
    client
        .call_reply(Op::SetClock { unix_time_ns }, Some(GUEST_SYNC_TIMEOUT))
        .map(drop)
        .map_err(|source| KvmError::Agent { what: "SetClock", source })
}

/// Tells a restored or forked guest the host's time and mixes in fresh entropy, so its clock
/// is right and forks never share RNG state.
pub fn sync_restored_guest(client: &AgentClient) -> Result<(), KvmError> {
    set_guest_clock(client)?;
    let mut bytes = vec![0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("cannot read host entropy from /dev/urandom"))?;
    client
        .call_reply(Op::AddEntropy { bytes }, Some(GUEST_SYNC_TIMEOUT))
        .map(drop)
        .map_err(|source| KvmError::Agent { what: "AddEntropy", source })
}

/// Runs [`TEMPLATE_WARM_CELL`] in the default Python context. A failure only costs speed (the
/// sandbox imports on first use instead), so it is logged, not returned.
fn warm_python(client: &AgentClient) {
    let started = Instant::now();
    let op = Op::RunCode(RunCodeRequest {
        context: capsule_tool_schemas::Language::Python.as_str().to_string(),
        language: Language::Python,
        code: TEMPLATE_WARM_CELL.to_string(),
        output_cap_bytes: None,
    });
    match client.call(op, Some(TEMPLATE_WARM_TIMEOUT)) {
        Ok((events, Reply::CodeDone(outcome))) if !outcome.timed_out => {
            match events.iter().find_map(|e| match e {
                Event::Error(error) => Some(error),
                _ => None,
            }) {
                Some(error) => tracing::warn!(?error, "warming the template's Python failed"),
                None => tracing::info!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "template warmed: python has imported numpy, pandas, matplotlib"
                ),
            }
        }
        Ok((_, reply)) => tracing::warn!(?reply, "warming the template's Python did not finish"),
        Err(e) => tracing::warn!(error = %e, "warming the template's Python failed"),
    }
}

/// Checks that the host can give a Linux guest `vcpus` vCPUs.
pub fn check_vcpus(vcpus: u32) -> Result<u8, KvmError> {
    if capsule_vmm::vstate::vm::host_is_pvm() && vcpus > u32::from(PVM_MAX_LINUX_VCPUS) {
        return Err(KvmError::Host(format!(
            "{vcpus} vCPUs asked, but this host's KVM is PVM (no VT-x/AMD-V), where only the boot \
             CPU of a Linux guest opts in to native speed: at most {PVM_MAX_LINUX_VCPUS} vCPU. Ask \
             for vcpus={PVM_MAX_LINUX_VCPUS}, or run capsule on a host with hardware virtualization \
             (see `capsule doctor`)"
        )));
    }
    u8::try_from(vcpus)
        .ok()
        .filter(|v| (capsule_vmm::config::MIN_VCPUS..=capsule_vmm::config::MAX_VCPUS).contains(v))
        .ok_or_else(|| {
            KvmError::Host(format!(
                "vcpus must be {}..={}, got {vcpus}",
                capsule_vmm::config::MIN_VCPUS,
                capsule_vmm::config::MAX_VCPUS
            ))
        })
}

/// Why this host cannot run the KVM engine, from `capsule doctor`'s probe; `None` when it can.
pub fn host_refusal(report: &HostReport) -> Option<String> {
    if report.can_run_vms {
        return None;
    }
    let advice = if report.advice.is_empty() { "KVM is not usable".to_owned() } else { report.advice.join("; ") };
    Some(format!("this host cannot run microVMs ({advice}); run `capsule doctor` for details"))
}

/// The KVM engine for `capsule serve`: checks the host (as `capsule doctor` does), finds the
/// guest image, and runs VM workers from this very executable (`capsule worker`). With
/// `build_missing_image` a missing image is built first (progress on stderr; the first build
/// takes many minutes); without it a missing image is an error saying how to build one.
/// Sandboxes live under `root`.
pub fn open_for_serve(root: PathBuf, build_missing_image: bool) -> Result<KvmEngine, EngineError> {
    let report = capsule_vmm::doctor::probe();
    if let Some(why) = host_refusal(&report) {
        return Err(EngineError::Unavailable(why));
    }
    let pvm = report.virtualization == capsule_vmm::doctor::Virtualization::Pvm;
    if let Err(missing) = current_image() {
        if !build_missing_image {
            return Err(EngineError::Unavailable(format!(
                "{}; `--engine kvm` builds it on start",
                error_chain(&missing)
            )));
        }
        if pvm && std::env::var_os(KERNEL_PATCHES_ENV).is_none() {
            return Err(EngineError::Unavailable(format!(
                "no guest image is built yet, and this PVM host needs a kernel with the PVM guest \
                 patch: run `capsule image build --kernel-patch \
                 /path/to/pvm-native-guest-6.12.117.patch` (or set {KERNEL_PATCHES_ENV})"
            )));
        }
        eprintln!("capsule: no guest image yet; building it (the first build takes many minutes)");
    }
    let image = ensure_image(&BuildOptions::default(), &StderrProgress::new()).map_err(|e| {
        EngineError::Unavailable(format!(
            "the guest image is missing and could not be built: {}; run `capsule image build`",
            error_chain(&e)
        ))
    })?;
    if pvm && image.flavour != Flavour::Pvm {
        return Err(EngineError::Unavailable(format!(
            "the current guest image has a {} kernel, which this PVM host can only emulate (about a \
             thousand times slower); rebuild it with `capsule image build --flavour pvm --kernel-patch \
             /path/to/pvm-native-guest-6.12.117.patch`",
            image.flavour
        )));
    }
    let exe = std::env::current_exe().map_err(|source| EngineError::Io {
        what: "cannot find the running executable to start VM workers from".into(),
        source,
    })?;
    KvmEngine::new(exe, image, root)
}

/// Copies a disk image sparsely (reflinked where the filesystem can), as a fork's writable disk.
pub fn copy_disk(from: &Path, to: &Path) -> Result<(), KvmError> {
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(io_err("cannot run cp to copy the writable disk"))?;
    if status.success() {
        Ok(())
    } else {
        Err(KvmError::Io {
            what: format!("copying {} to {}", from.display(), to.display()),
            source: std::io::Error::other(format!("cp ended with {status}")),
        })
    }
}

/// The engine.
#[derive(Debug)]
pub struct KvmEngine {
    worker_exe: PathBuf,
    image: ImageInfo,
    root: PathBuf,
    /// Held while a template is looked up or built, so that one is built once.
    templates: Mutex<()>,
    trash: Arc<Trash>,
}

impl KvmEngine {
    /// An engine that boots `image` in workers started from `worker_exe` (a binary with the
    /// `worker` subcommand: `capsule` itself), with sandboxes under `root`.
    pub fn new(worker_exe: PathBuf, image: ImageInfo, root: PathBuf) -> Result<Self, EngineError> {
        if !worker_exe.is_file() {
            return Err(EngineError::Unavailable(format!(
                "the VM worker binary {} does not exist",
                worker_exe.display()
            )));
        }
        std::fs::create_dir_all(&root)
            .map_err(|source| EngineError::Io { what: format!("cannot create {}", root.display()), source })?;
        let trash = Arc::new(Trash::new(&root));
        let engine = Self { worker_exe, image, root, templates: Mutex::new(()), trash };
        engine.remove_stale_templates();
        Ok(engine)
    }

    /// Deletes templates of other images (sandboxes restored from them own their memory
    /// mappings; the files can go).
    fn remove_stale_templates(&self) {
        let current = format!("-{}-{TEMPLATE_RECIPE}-", self.image.version);
        let Ok(entries) = std::fs::read_dir(self.root.join(TEMPLATES_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().contains(&current) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The image this engine boots.
    pub fn image(&self) -> &ImageInfo {
        &self.image
    }

    /// Boots a fresh guest with its files in `files`, and waits for its agent.
    fn boot_in(&self, files: SandboxFiles, spec: &MachineSpec, vcpus: u8) -> Result<KvmMachine, KvmError> {
        files.create_dir()?;
        create_writable_disk(&files.writable_disk(), u64::from(spec.disk_mib)).map_err(KvmError::Image)?;
        let image = ImageInfo { rootfs: files.adopt_rootfs(&self.image.rootfs), ..self.image.clone() };
        let config = boot_config(&image, &files, vcpus, u64::from(spec.memory_mib));
        let worker = WorkerHandle::spawn(&self.worker_exe, config).map_err(worker_err("boot"))?;
        let mut machine =
            KvmMachine::new(self.worker_exe.clone(), self.trash.clone(), files, image.rootfs, Some(worker), 0);
        machine.start_worker()?;
        let client = machine.connect_within(AGENT_READY_TIMEOUT)?;
        set_guest_clock(&client)?;
        Ok(machine)
    }

    /// The template for machines like `spec`: a guest booted once until its agent answered,
    /// saved as a snapshot plus its writable disk. Built on first use; never changed after.
    fn template(&self, spec: &MachineSpec, vcpus: u8) -> Result<SandboxFiles, KvmError> {
        let name: String = spec
            .template
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(MAX_TEMPLATE_NAME_CHARS)
            .collect();
        let key =
            format!("{name}-{}-{TEMPLATE_RECIPE}-{}m-{}d-{vcpus}c", self.image.version, spec.memory_mib, spec.disk_mib);
        let files = SandboxFiles::new(self.root.join(TEMPLATES_DIR).join(key));
        let _building = self.templates.lock().unwrap_or_else(|p| p.into_inner());
        if files.snapshot(0).is_dir() {
            return Ok(files);
        }
        let _ = std::fs::remove_dir_all(files.dir());
        let built = self.boot_in(files.clone(), spec, vcpus).and_then(|mut machine| {
            if let Some(client) = &machine.client {
                warm_python(client);
            }
            // The snapshot appears whole or not at all (the VMM renames it into place).
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

    /// A new machine restored from `template`, with its own copy of the template's disk.
    fn restore_template(&self, spec: &MachineSpec, template: &SandboxFiles) -> Result<KvmMachine, KvmError> {
        let files = SandboxFiles::new(self.root.join(&spec.id));
        files.create_dir()?;
        copy_disk(&template.writable_disk(), &files.writable_disk())?;
        let rootfs = files.adopt_rootfs(&self.image.rootfs);
        let mut machine = KvmMachine::new(self.worker_exe.clone(), self.trash.clone(), files, rootfs, None, 0);
        machine.restore_linked(&template.snapshot(0))?;
        machine.connect_within(AGENT_RESTORED_TIMEOUT)?;
        Ok(machine)
    }

    fn build(&self, spec: &MachineSpec) -> Result<KvmMachine, KvmError> {
        let vcpus = check_vcpus(spec.vcpus)?;
        let template = self.template(spec, vcpus)?;
        match self.restore_template(spec, &template) {
            Ok(machine) => Ok(machine),
            Err(e) => {
                // A template that cannot be restored is dropped (the next create builds it
                // again); this sandbox boots the slow way.
                tracing::warn!(
                    template = %template.dir().display(),
                    error = %error_chain(&e),
                    "restoring the template failed; booting instead"
                );
                let _ = std::fs::remove_dir_all(template.dir());
                let _ = std::fs::remove_dir_all(self.root.join(&spec.id));
                self.boot_in(SandboxFiles::new(self.root.join(&spec.id)), spec, vcpus)
            }
        }
    }
}

impl Engine for KvmEngine {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn host_limits(&self) -> HostLimits {
        detect_host_limits()
    }

    fn fork_note(&self) -> Option<&'static str> {
        Some(FORK_NOTE)
    }

    fn create(&self, spec: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        match self.build(spec) {
            Ok(machine) => Ok(Box::new(machine)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.root.join(&spec.id));
                Err(e.into())
            }
        }
    }

    fn reattach(
        &self,
        spec: &MachineSpec,
        saved: &serde_json::Value,
        paused: bool,
    ) -> Result<Box<dyn Machine>, EngineError> {
        let saved: SavedState =
            serde_json::from_value(saved.clone()).map_err(|e| EngineError::BadSavedState(format!("{e}: {saved}")))?;
        let files = SandboxFiles::new(&saved.dir);
        if !paused {
            return Err(EngineError::Dead(format!(
                "sandbox {} was running when the server stopped, and a running VM ends with the \
                 server (only paused sandboxes, saved to disk, come back)",
                spec.id
            )));
        }
        let Some(generation) = saved.snapshot_generation else {
            return Err(EngineError::BadSavedState(format!(
                "sandbox {} is recorded paused but names no snapshot",
                spec.id
            )));
        };
        if !files.snapshot(generation).is_dir() {
            return Err(EngineError::BadSavedState(format!(
                "the snapshot {} is gone",
                files.snapshot(generation).display()
            )));
        }
        let mut machine =
            KvmMachine::new(self.worker_exe.clone(), self.trash.clone(), files, saved.rootfs, None, generation);
        machine.on_disk = Some(generation);
        machine.own_chain_layers = saved.chain_layers;
        Ok(Box::new(machine))
    }
}

/// What the registry stores for a KVM machine.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    dir: PathBuf,
    rootfs: PathBuf,
    /// The snapshot it is paused in, if it is paused to disk.
    snapshot_generation: Option<u64>,
    /// Layers of that snapshot's chain (0: full); `None` (also in states saved before chains
    /// existed) makes the next pause full.
    #[serde(default)]
    chain_layers: Option<usize>,
}

/// One sandbox's VM.
struct KvmMachine {
    worker_exe: PathBuf,
    trash: Arc<Trash>,
    files: SandboxFiles,
    /// The read-only root filesystem it was booted with (restores keep using it).
    rootfs: PathBuf,
    worker: Option<WorkerHandle>,
    events: Option<Receiver<WorkerEvent>>,
    /// Why the VM ended, once it has.
    death: Option<String>,
    client: Option<AgentClient>,
    /// The guest came from a snapshot: the next connection sends clock and entropy.
    restored: bool,
    /// The snapshot generation it is paused in, when paused to disk.
    on_disk: Option<u64>,
    /// The last snapshot generation used in this directory.
    generation: u64,
    /// When the snapshot the worker's dirty tracking starts from (the one it was restored
    /// from, or last wrote) is one of this sandbox's own, how many layers its chain has
    /// (0: full). `None`: the next pause must be full.
    own_chain_layers: Option<usize>,
    /// Snapshots a full one made unnecessary, deleted once the worker (which may map them) has
    /// stopped: a worker whose exit drops the last reference to a file pays for freeing it.
    superseded: Vec<PathBuf>,
}

impl std::fmt::Debug for KvmMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMachine")
            .field("dir", &self.files.dir())
            .field("worker", &self.worker.as_ref().map(WorkerHandle::pid))
            .field("on_disk", &self.on_disk)
            .finish_non_exhaustive()
    }
}

impl KvmMachine {
    fn new(
        worker_exe: PathBuf,
        trash: Arc<Trash>,
        files: SandboxFiles,
        rootfs: PathBuf,
        worker: Option<WorkerHandle>,
        generation: u64,
    ) -> Self {
        let events = worker.as_ref().and_then(WorkerHandle::take_events);
        Self {
            worker_exe,
            trash,
            files,
            rootfs,
            worker,
            events,
            death: None,
            client: None,
            restored: false,
            on_disk: None,
            generation,
            own_chain_layers: None,
            superseded: Vec::new(),
        }
    }

    /// Starts the vCPUs of a freshly built or restored worker.
    fn start_worker(&mut self) -> Result<(), KvmError> {
        let worker = self.live_worker()?;
        worker.start().map_err(worker_err("start the VM"))?;
        Ok(())
    }

    fn live_worker(&mut self) -> Result<&WorkerHandle, KvmError> {
        self.poll_events();
        if let Some(why) = &self.death {
            return Err(KvmError::Gone(why.clone()));
        }
        self.worker.as_ref().ok_or_else(|| KvmError::Gone("the VM is paused to disk and has no worker".into()))
    }

    /// Records an end of the VM reported by its worker.
    fn poll_events(&mut self) {
        let Some(events) = &self.events else { return };
        loop {
            match events.try_recv() {
                Ok(WorkerEvent::Vm(event)) => {
                    self.death = Some(format!(
                        "the guest ended ({event:?}); serial console tail:\n{}",
                        serial_tail(&self.files.serial_log(), SERIAL_TAIL_LINES)
                    ));
                }
                Ok(WorkerEvent::Died { pid, status }) => {
                    self.death.get_or_insert_with(|| format!("the VM worker {pid} died ({status})"));
                }
                Ok(WorkerEvent::Exited { .. }) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }

    fn connect_within(&mut self, timeout: Duration) -> Result<AgentClient, KvmError> {
        if let Some(client) = &self.client {
            if client.closed_reason().is_none() {
                return Ok(client.clone());
            }
        }
        self.client = None;
        self.live_worker()?;
        let uds = self.files.vsock_uds();
        let serial = self.files.serial_log();
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let client = connect_agent(&uds, &serial, left, || {
                self.poll_events();
                match &self.death {
                    Some(why) => Err(why.clone()),
                    None => Ok(()),
                }
            })?;
            if self.restored {
                match sync_restored_guest(&client) {
                    Ok(()) => self.restored = false,
                    // The VMM resets the guest's vsock transport on restore; the guest may act on
                    // that after this connection was made, and drop it. Connect again.
                    Err(KvmError::Agent { source: ClientError::Disconnected(_), .. })
                        if started.elapsed() < timeout =>
                    {
                        tracing::debug!(
                            dir = %self.files.dir().display(),
                            "the restored guest dropped the new agent connection; reconnecting"
                        );
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.client = Some(client.clone());
            return Ok(client);
        }
    }

    fn drop_client(&mut self) {
        if let Some(client) = self.client.take() {
            client.close();
        }
    }

    /// Pauses the vCPUs and writes a full snapshot to `dir` (outside this sandbox's chain: the
    /// template); the VM stays paused.
    fn snapshot_to(&mut self, dir: &Path) -> Result<(), KvmError> {
        self.drop_client();
        // Once the worker has saved into `dir`, its next incremental would build on `dir`,
        // which this sandbox does not own.
        self.own_chain_layers = None;
        let worker = self.live_worker()?;
        worker.pause().map_err(worker_err("pause the VM"))?;
        worker.snapshot(dir, false).map_err(worker_err("write a snapshot"))?;
        Ok(())
    }

    /// Pauses the vCPUs and writes this sandbox's next snapshot `dir`: a layer over the
    /// snapshot the worker started from when [`Self::own_chain_layers`] allows, else full
    /// (also when the layer fails). Returns the new chain's layer count.
    fn snapshot_own(&mut self, dir: &Path) -> Result<usize, KvmError> {
        self.drop_client();
        let layers = self.own_chain_layers.filter(|layers| *layers < MAX_INCREMENTAL_LAYERS);
        self.own_chain_layers = None;
        let worker = self.live_worker()?;
        worker.pause().map_err(worker_err("pause the VM"))?;
        if let Some(layers) = layers {
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
        tracing::debug!(
            dir = %dir.display(),
            pages = info.pages_written,
            took_us = info.duration_us,
            "full snapshot"
        );
        Ok(0)
    }

    /// Restores a new machine (no snapshots of its own yet) from `source`, a snapshot it does
    /// not own, through a linked copy of its chain in this sandbox's directory: no guest RAM is
    /// copied, the source may be deleted later, and the first pause is a layer over the copy.
    /// Where no copy can be made (another filesystem, a link limit) it restores `source`
    /// itself, and its first pause is full.
    fn restore_linked(&mut self, source: &Path) -> Result<(), KvmError> {
        let origin = self.files.origin();
        match link_chain(source, &origin) {
            Ok(copy) => {
                self.restore_from(&copy.dir)?;
                self.own_chain_layers = Some(copy.depth);
            }
            Err(e) => {
                tracing::warn!(
                    source = %source.display(),
                    error = %error_chain(&e),
                    "cannot link the snapshot chain into the sandbox; its first pause will be full"
                );
                self.restore_from(source)?;
                self.own_chain_layers = None;
            }
        }
        Ok(())
    }

    /// Restores the snapshot at `dir` into a new worker and starts it.
    fn restore_from(&mut self, dir: &Path) -> Result<(), KvmError> {
        let overrides = RestoreOverrides {
            vsock_uds: Some(self.files.vsock_uds()),
            serial_log: Some(self.files.serial_log()),
            disks: vec![self.rootfs.clone(), self.files.writable_disk()],
        };
        let worker =
            WorkerHandle::restore(&self.worker_exe, dir, overrides).map_err(worker_err("restore the snapshot"))?;
        self.events = worker.take_events();
        self.worker = Some(worker);
        self.death = None;
        self.restored = true;
        self.start_worker()
    }

    fn stop_worker(&mut self) {
        self.drop_client();
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop();
        }
        self.events = None;
        for path in std::mem::take(&mut self.superseded) {
            self.trash.discard(&path);
        }
    }

    /// Every snapshot of this sandbox but generation `keep`.
    fn snapshots_except(&self, keep: u64) -> Vec<PathBuf> {
        let keep = self.files.snapshot(keep);
        let Ok(entries) = std::fs::read_dir(self.files.dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.starts_with("snapshot-")))
            .map(|entry| entry.path())
            .filter(|path| *path != keep)
            .collect()
    }

    /// Pauses the vCPUs and writes this sandbox's next generation of snapshot (the VM stays
    /// paused); returns the generation.
    fn snapshot_next(&mut self) -> Result<u64, KvmError> {
        let generation = self.generation + 1;
        let dir = self.files.snapshot(generation);
        let _ = std::fs::remove_dir_all(&dir);
        let layers = self.snapshot_own(&dir)?;
        self.generation = generation;
        self.own_chain_layers = Some(layers);
        // A layer needs every older snapshot here (they are its chain); a full one needs none.
        if layers == 0 {
            self.superseded = self.snapshots_except(generation);
        }
        Ok(generation)
    }

    fn pause_to_disk(&mut self) -> Result<(), KvmError> {
        let generation = match self.snapshot_next() {
            Ok(generation) => generation,
            Err(e) => {
                // Leave it running as it was, when it still can.
                if let Some(worker) = &self.worker {
                    let _ = worker.resume();
                }
                return Err(e);
            }
        };
        self.stop_worker();
        self.on_disk = Some(generation);
        Ok(())
    }

    /// The state `children` (their directories made) start from, taken at one moment: each
    /// gets a copy of the writable disk, and the generation of the snapshot to restore is
    /// returned. A running parent writes its next snapshot (a layer over its chain where it can
    /// be) and runs on; a parent paused to disk gives its newest snapshot.
    fn fork_source(&mut self, children: &[SandboxFiles]) -> Result<u64, KvmError> {
        let disk = self.files.writable_disk();
        let copy_disks = || children.iter().try_for_each(|child| copy_disk(&disk, &child.writable_disk()));
        if let Some(generation) = self.on_disk {
            copy_disks()?;
            return Ok(generation);
        }
        let was_paused = self.paused_in_memory()?;
        // The disks must be copied while the parent cannot write to them.
        let taken = self.snapshot_next().and_then(|generation| copy_disks().map(|()| generation));
        if !was_paused {
            if let Some(worker) = &self.worker {
                worker.resume().map_err(worker_err("resume the parent"))?;
            }
        }
        taken
    }

    /// Starts a child prepared by [`Self::fork_source`]: restored from a linked copy of the
    /// parent's snapshot `generation`, in its own directory `files`.
    fn start_fork(&self, files: SandboxFiles, generation: u64) -> Result<KvmMachine, KvmError> {
        let rootfs = files.adopt_rootfs(&self.rootfs);
        let mut machine = KvmMachine::new(self.worker_exe.clone(), self.trash.clone(), files, rootfs, None, 0);
        machine.restore_linked(&self.files.snapshot(generation))?;
        machine.connect_within(AGENT_RESTORED_TIMEOUT)?;
        Ok(machine)
    }

    fn paused_in_memory(&mut self) -> Result<bool, KvmError> {
        let worker = self.live_worker()?;
        let state = worker.status().map_err(worker_err("report its state"))?;
        Ok(state == capsule_vmm::RunState::Paused)
    }
}

impl Machine for KvmMachine {
    fn connect(&mut self) -> Result<AgentClient, EngineError> {
        if self.on_disk.is_some() {
            return Err(EngineError::Start("the sandbox is paused to disk; resume it before connecting".into()));
        }
        Ok(self.connect_within(AGENT_RESTORED_TIMEOUT)?)
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        if self.on_disk.is_some() {
            return Ok(());
        }
        Ok(self.pause_to_disk()?)
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        match self.on_disk {
            Some(generation) => {
                self.restore_from(&self.files.snapshot(generation))?;
                self.on_disk = None;
                Ok(())
            }
            None => {
                let worker = self.live_worker()?;
                worker.resume().map_err(worker_err("resume the VM"))?;
                Ok(())
            }
        }
    }

    fn fork(&mut self, child: &MachineSpec) -> Result<Box<dyn Machine>, EngineError> {
        self.fork_many(std::slice::from_ref(child)).pop().expect("one result per child")
    }

    fn fork_many(&mut self, children: &[MachineSpec]) -> Vec<Result<Box<dyn Machine>, EngineError>> {
        let Some(root) = self.files.dir().parent().map(Path::to_path_buf) else {
            let why = || EngineError::Start("the sandbox directory has no parent".into());
            return children.iter().map(|_| Err(why())).collect();
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
            Err("no fork could be prepared".to_string())
        } else {
            self.fork_source(&ready).map_err(|e| error_chain(&e))
        };
        children
            .iter()
            .zip(prepared)
            .map(|(child, files)| {
                let started = files.and_then(|files| match &source {
                    Ok(generation) => self.start_fork(files, *generation),
                    Err(why) => Err(KvmError::ForkSource(why.clone())),
                });
                started.map(|machine| Box::new(machine) as Box<dyn Machine>).map_err(|e| {
                    let _ = std::fs::remove_dir_all(root.join(&child.id));
                    e.into()
                })
            })
            .collect()
    }

    fn kill(&mut self) -> Result<(), EngineError> {
        self.stop_worker();
        // Gone from the state directory at once; its space is freed in the background.
        self.trash.discard(self.files.dir());
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if self.on_disk.is_some() {
            return Ok(());
        }
        self.poll_events();
        match (&self.death, &self.worker) {
            (Some(why), _) => Err(why.clone()),
            (None, None) => Err("the VM has no worker".into()),
            (None, Some(_)) => Ok(()),
        }
    }

    fn saved_state(&self) -> serde_json::Value {
        serde_json::to_value(SavedState {
            dir: self.files.dir().to_path_buf(),
            rootfs: self.rootfs.clone(),
            snapshot_generation: self.on_disk,
            chain_layers: self.on_disk.and(self.own_chain_layers),
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for KvmMachine {
    fn drop(&mut self) {
        // The worker handle kills its process; nothing else to free.
        self.drop_client();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_config_puts_the_rootfs_first_read_only_and_keeps_the_cmdline() {
        let image = ImageInfo {
            kernel: "/img/vmlinux".into(),
            rootfs: "/img/root.ext4".into(),
            cmdline: "console=ttyS0 nopcid noinvpcid".into(),
            flavour: crate::image::Flavour::Pvm,
            version: "v".into(),
            kernel_build_s: 0.0,
            rootfs_bytes: 0,
        };
        let files = SandboxFiles::new("/state/sb-1");
        let config = boot_config(&image, &files, 1, 1024);
        assert_eq!(config.cmdline, image.cmdline);
        assert_eq!(config.disks[0].path, PathBuf::from("/img/root.ext4"));
        assert!(config.disks[0].read_only);
        assert_eq!(config.disks[1].path, PathBuf::from("/state/sb-1/rw.ext4"));
        assert!(!config.disks[1].read_only);
        let vsock = config.vsock.expect("vsock");
        assert_eq!(vsock.uds_path, PathBuf::from("/state/sb-1/vsock.sock"));
        assert_eq!(vsock.guest_cid, GUEST_CID);
        assert_eq!(config.mem_mib, 1024);
    }

    #[test]
    fn too_many_vcpus_on_pvm_is_refused_with_the_reason() {
        if !capsule_vmm::vstate::vm::host_is_pvm() {
            assert!(check_vcpus(2).is_ok());
            return;
        }
        let err = check_vcpus(2).unwrap_err().to_string();
        assert!(err.contains("PVM") && err.contains("at most 1 vCPU"), "{err}");
        assert_eq!(check_vcpus(1).unwrap(), 1);
    }

    #[test]
    fn a_host_without_kvm_is_refused_with_the_doctors_advice() {
        let mut report = capsule_vmm::doctor::probe();
        report.can_run_vms = false;
        report.advice = vec!["/dev/kvm does not exist: load the kvm module".into()];
        let why = host_refusal(&report).expect("refused");
        assert!(why.contains("/dev/kvm does not exist"), "{why}");
        assert!(why.contains("capsule doctor"), "{why}");
        report.can_run_vms = true;
        assert_eq!(host_refusal(&report), None);
    }

    #[test]
    fn serial_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(serial_tail(&log, 2), "c\nd");
        assert_eq!(serial_tail(&dir.path().join("none"), 2), "");
        assert!(wait_for_serial(&log, "c\nd", Duration::from_millis(50)).is_some());
        assert!(wait_for_serial(&log, "zz", Duration::from_millis(20)).is_none());
    }
}
