//! Snapshot benchmark: `cargo bench -p capsule-evals --bench snapshot`.
//!
//! Owns the measurement of what a fork and a pause of a warmed KVM sandbox cost now that
//! snapshots are shared on disk (each writes an incremental layer; a child restores from a
//! hard-linked copy of its parent's chain), against what they cost before: a FULL snapshot of
//! the same guest's memory, written by a VMM worker. Like every bench here it never fails on a
//! slow number; it prints ratios against that baseline, measured in the same run.
//!
//! - (a) `Machine::fork` of the sandbox running since its create, until the child answers
//!   `true`: time, and the disk bytes each fork adds under the engine's root (allocated blocks,
//!   each inode once, `.templates/` and `.trash/` left out). Each child is killed once measured.
//! - (b) `Machine::pause` of the sandbox (it writes a layer), then `Machine::resume` until
//!   `true` answers.
//! - (c) baseline: a worker restored straight through the VMM API from the sandbox's newest
//!   snapshot (after the first fork) with a sparse copy of its disk, started, paused, then
//!   `snapshot(dir, false)` timed into a fresh directory each time; `memory.bin`'s allocated
//!   bytes. Also the whole fork as it was: that full snapshot, a sparse copy of the disk, and a
//!   child worker restored from the snapshot until its agent answers `true`. Each directory is
//!   deleted once measured.
//! - (d) forks again, after the pauses: the sandbox's worker was restored from its own
//!   snapshot and has written little since.
//!
//! The forks of (a) run interleaved with the full snapshots (one of each per round while both
//! last), so a noisy host loads them alike. The pauses come after them, so that (a) shows
//! repeated forks of a sandbox whose worker has run since its create (a layer holds the pages
//! changed since the worker's previous snapshot) and (d) those of a sandbox restored since.
//! Sizes: `SNAPSHOT_BENCH_FORKS` (default 10, for each of a and d), `SNAPSHOT_BENCH_PAUSES` (5),
//! `SNAPSHOT_BENCH_FULL` (3). The KVM host and a built guest image are needed: otherwise it
//! prints `skipped: …` and why, and never builds the image.
//!
//! It never leaves a VM or a file behind: every sandbox and worker it made is killed before it
//! exits, also on an error, and its temporary directory is deleted.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capsule::engine::kvm::{connect_agent, copy_disk, sync_restored_guest, KvmEngine, AGENT_RESTORED_TIMEOUT};
use capsule::engine::trash::TRASH_DIR;
use capsule::engine::{Engine, Machine};
use capsule::image::ImageInfo;
use capsule_agent::protocol::{Event, Language, Op, Reply, RunCodeRequest};
use capsule_evals::binaries::{capsule_bin, is_debug_build};
use capsule_evals::latency::{ms, ratio, show, Latencies};
use capsule_evals::sandbox::{default_spec, exec_true, kvm_engine, Owned};
use capsule_evals::sizes::env_count;
use capsule_vmm::snapshot::{RestoreOverrides, MEMORY_FILE};
use capsule_vmm::worker::{error_chain, WorkerHandle};

/// Forks timed in (a) and again in (d), unless `SNAPSHOT_BENCH_FORKS` says otherwise.
const DEFAULT_FORKS: usize = 10;
/// Pause and resume cycles timed, unless `SNAPSHOT_BENCH_PAUSES` says otherwise.
const DEFAULT_PAUSES: usize = 5;
/// Full snapshots timed for the baseline, unless `SNAPSHOT_BENCH_FULL` says otherwise.
const DEFAULT_FULL_SNAPSHOTS: usize = 3;
/// The cell that warms the sandbox: it dirties some tens of MiB of guest memory.
const WARM_CELL: &str = "x = list(range(10**6))";
/// How long the warm-up cell may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes in a MiB, for printing.
const MIB_BYTES: f64 = 1024.0 * 1024.0;
/// The directory of the shared templates under the engine's root (private to the KVM engine).
const TEMPLATES_DIR: &str = ".templates";
/// The writable disk's file name in a sandbox directory (see `SandboxFiles::writable_disk`).
const WRITABLE_DISK_FILE: &str = "rw.ext4";
/// Prefix of a sandbox's own snapshot directories (`snapshot-N`, `snapshot-origin`).
const SNAPSHOT_DIR_PREFIX: &str = "snapshot-";
/// How long to let the engine's background deletion finish before deleting the temporary
/// directory again.
const TRASH_SETTLE: Duration = Duration::from_secs(2);
/// The id of the warmed sandbox that is forked and paused.
const PARENT_ID: &str = "parent";

// ---------------------------------------------------------------------------------------------
// Disk usage

/// Allocated bytes of files, split into writable disks and everything else (snapshots, logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DiskUsage {
    disks: u64,
    snapshots: u64,
}

impl DiskUsage {
    fn total(self) -> u64 {
        self.disks + self.snapshots
    }

    /// What `self` holds beyond `before` (0 where it shrank).
    fn since(self, before: DiskUsage) -> DiskUsage {
        DiskUsage {
            disks: self.disks.saturating_sub(before.disks),
            snapshots: self.snapshots.saturating_sub(before.snapshots),
        }
    }
}

/// Allocated bytes (`st_blocks × 512`) of the files of every sandbox under the engine's `root`,
/// each inode counted once (a linked copy of a chain shares its parent's memory files), leaving
/// out what is shared with a template (a sandbox's `snapshot-origin` links the template's).
fn sandboxes_usage(root: &Path) -> Result<DiskUsage> {
    let mut seen = HashSet::new();
    let templates = root.join(TEMPLATES_DIR);
    if templates.exists() {
        add_usage(&templates, &mut seen, &mut DiskUsage::default())?;
    }
    let mut usage = DiskUsage::default();
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry?;
        if entry.file_name() == TEMPLATES_DIR || entry.file_name() == TRASH_DIR {
            continue;
        }
        add_usage(&entry.path(), &mut seen, &mut usage)?;
    }
    Ok(usage)
}

fn add_usage(path: &Path, seen: &mut HashSet<(u64, u64)>, usage: &mut DiskUsage) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Gone between the listing and now (a superseded snapshot moved to the trash).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    if meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", path.display())),
        };
        for entry in entries {
            add_usage(&entry?.path(), seen, usage)?;
        }
    } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
        let bytes = meta.blocks() * 512;
        if path.file_name().is_some_and(|n| n == WRITABLE_DISK_FILE) {
            usage.disks += bytes;
        } else {
            usage.snapshots += bytes;
        }
    }
    Ok(())
}

/// Allocated bytes of one file.
fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.blocks() * 512)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB_BYTES
}

/// The median of byte counts by the nearest-rank method, as [`Latencies::p50`] (the lower
/// middle one of an even count); 0 for none.
fn median_bytes(samples: &[u64]) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted.len().checked_sub(1).map_or(0, |_| sorted[sorted.len().div_ceil(2) - 1])
}

fn mib_list(samples: &[u64]) -> String {
    samples.iter().map(|b| format!("{:.1}", mib(*b))).collect::<Vec<_>>().join(", ")
}

fn ms_list(samples: &[Duration]) -> String {
    samples.iter().map(|d| format!("{:.0}", ms(*d))).collect::<Vec<_>>().join(", ")
}

fn print_bytes_ratio(label: &str, over: u64, base: u64) {
    println!("  {label:<62} median {:>8.3}×", over as f64 / base.max(1) as f64);
}

// ---------------------------------------------------------------------------------------------
// The sandbox under test

/// Runs the warm-up cell in the default Python context (the one the template imported numpy
/// into) and then `true`.
fn warm(machine: &mut dyn Machine) -> Result<Duration> {
    let client = machine.connect()?;
    let started = Instant::now();
    let op = Op::RunCode(RunCodeRequest {
        context: Language::Python.as_str().to_string(),
        language: Language::Python,
        code: WARM_CELL.to_string(),
        output_cap_bytes: None,
        limits: None,
    });
    let (events, reply) = client.call(op, Some(WARM_TIMEOUT)).context("run the warm-up cell")?;
    let took = started.elapsed();
    if let Some(error) = events.iter().find_map(|e| match e {
        Event::Error(error) => Some(error),
        _ => None,
    }) {
        bail!("the warm-up cell {WARM_CELL:?} failed: {error:?}");
    }
    match reply {
        Reply::CodeDone(outcome) if !outcome.timed_out => {}
        other => bail!("the warm-up cell {WARM_CELL:?} did not finish: {other:?}"),
    }
    exec_true(&client)?;
    Ok(took)
}

/// The newest `snapshot-N` of the sandbox in `dir`.
fn newest_snapshot(dir: &Path) -> Result<PathBuf> {
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(generation) = name.to_str().and_then(|n| n.strip_prefix(SNAPSHOT_DIR_PREFIX)?.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(g, _)| generation > *g) {
            newest = Some((generation, entry.path()));
        }
    }
    newest.map(|(_, path)| path).with_context(|| format!("the sandbox in {} has no snapshot-N yet", dir.display()))
}

/// One fork of `parent` until the child answers `true`; the child is killed after its disk
/// usage was read. Returns the time and the bytes the fork added under `root`.
fn time_fork(parent: &mut Owned, root: &Path, id: &str) -> Result<(Duration, DiskUsage)> {
    let before = sandboxes_usage(root)?;
    let started = Instant::now();
    let mut child = Owned(parent.0.fork(&default_spec(id)).with_context(|| format!("fork {id}"))?);
    exec_true(&child.0.connect()?)?;
    let took = started.elapsed();
    let added = sandboxes_usage(root)?.since(before);
    drop(child);
    Ok((took, added))
}

/// One pause to disk (it writes a layer) and the resume after it, until `true` answers.
/// Returns both times and the bytes the pause added under `root`.
fn time_pause(parent: &mut Owned, root: &Path) -> Result<(Duration, Duration, DiskUsage)> {
    let before = sandboxes_usage(root)?;
    let started = Instant::now();
    parent.0.pause().context("pause the sandbox")?;
    let paused = started.elapsed();
    let added = sandboxes_usage(root)?.since(before);
    let started = Instant::now();
    parent.0.resume().context("resume the sandbox")?;
    exec_true(&parent.0.connect()?)?;
    Ok((paused, started.elapsed(), added))
}

/// Times and added bytes of a series of forks.
#[derive(Default)]
struct Forks {
    times: Vec<Duration>,
    bytes: Vec<DiskUsage>,
}

impl Forks {
    fn add(&mut self, parent: &mut Owned, root: &Path, id: &str) -> Result<()> {
        let (took, added) = time_fork(parent, root, id)?;
        self.times.push(took);
        self.bytes.push(added);
        Ok(())
    }

    fn latencies(&self) -> Latencies {
        Latencies::new(self.times.clone())
    }

    fn snapshot_bytes(&self) -> Vec<u64> {
        self.bytes.iter().map(|u| u.snapshots).collect()
    }

    fn disk_bytes(&self) -> Vec<u64> {
        self.bytes.iter().map(|u| u.disks).collect()
    }

    fn total_bytes(&self) -> Vec<u64> {
        self.bytes.iter().map(|u| u.total()).collect()
    }

    fn print(&self, title: &str) {
        println!("\n{title}, until the child answers `true`, {}×", self.times.len());
        show("fork time", &self.latencies());
        println!("    in order, ms: {}", ms_list(&self.times));
        println!(
            "    disk added per fork, median: {:.1} MiB = {:.1} MiB snapshot layer + {:.1} MiB disk copy",
            mib(median_bytes(&self.total_bytes())),
            mib(median_bytes(&self.snapshot_bytes())),
            mib(median_bytes(&self.disk_bytes()))
        );
        println!(
            "    in order, MiB: snapshots {}; disk copies {}",
            mib_list(&self.snapshot_bytes()),
            mib_list(&self.disk_bytes())
        );
    }

    /// Prints the ratios of these forks against full snapshots taking `full_t` and writing
    /// `full_bytes`.
    fn print_ratios(&self, name: &str, full_t: &Latencies, full_bytes: u64) {
        ratio(&format!("{name} time / full snapshot time"), &self.latencies(), full_t);
        print_bytes_ratio(
            &format!("{name} snapshot bytes / full snapshot bytes"),
            median_bytes(&self.snapshot_bytes()),
            full_bytes,
        );
        print_bytes_ratio(
            &format!("{name} all bytes / (full snapshot + disk copy)"),
            median_bytes(&self.total_bytes()),
            full_bytes + median_bytes(&self.disk_bytes()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The baseline: full snapshots through the VMM API

/// Restores a worker from `snapshot` with its sockets, log and writable disk `disk` under `dir`.
fn restore_worker(
    capsule: &Path,
    image: &ImageInfo,
    snapshot: &Path,
    dir: &Path,
    disk: PathBuf,
) -> Result<WorkerHandle> {
    let overrides = RestoreOverrides {
        vsock_uds: Some(dir.join("v.sock")),
        serial_log: Some(dir.join("serial.log")),
        disks: vec![image.rootfs.clone(), disk],
        net_socket: Some(dir.join("n.sock")),
        // As the engine restores a sandbox.
        undo_logs: Some(true),
    };
    WorkerHandle::restore(capsule, snapshot, overrides)
        .with_context(|| format!("restore a worker from {}", snapshot.display()))
}

/// Connects to the agent of the restored worker whose files are in `dir`, sends it the clock
/// and entropy as the engine does after a restore (reconnecting when the guest drops the first
/// connection), and runs `true`.
fn answer_true(worker: &WorkerHandle, dir: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        let alive = || match worker.wait_event(Duration::ZERO) {
            Some(event) => Err(format!("{event:?}")),
            None => Ok(()),
        };
        let left = AGENT_RESTORED_TIMEOUT.saturating_sub(started.elapsed());
        let client = connect_agent(&dir.join("v.sock"), &dir.join("serial.log"), left, alive)
            .map_err(|e| anyhow!(error_chain(&e)))?;
        match sync_restored_guest(&client) {
            Ok(()) => {
                let answered = exec_true(&client);
                client.close();
                return answered;
            }
            Err(e) if started.elapsed() >= AGENT_RESTORED_TIMEOUT => bail!(error_chain(&e)),
            Err(_) => client.close(),
        }
    }
}

/// The baseline: a worker restored from a snapshot of the sandbox, paused, that writes full
/// snapshots into `dir`, as every fork did before snapshots were shared; dropping it kills the
/// worker.
struct FullSnapshotter {
    worker: WorkerHandle,
    capsule: PathBuf,
    image: ImageInfo,
    dir: PathBuf,
    taken: usize,
}

/// One full snapshot of the baseline.
struct FullSample {
    /// `snapshot(dir, false)` alone.
    snapshot: Duration,
    /// The whole fork as it was: the full snapshot, a copy of the disk, a child worker restored
    /// from the snapshot, until it answers `true`.
    fork: Duration,
    /// Allocated bytes of its `memory.bin`.
    memory_bytes: u64,
}

impl FullSnapshotter {
    /// Restores `snapshot` (a snapshot of the sandbox in `sandbox_dir`) with a sparse copy of
    /// the sandbox's writable disk, its own vsock socket and serial log under `dir`; starts it
    /// and pauses it.
    fn start(capsule: &Path, image: &ImageInfo, sandbox_dir: &Path, snapshot: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let disk = dir.join(WRITABLE_DISK_FILE);
        copy_disk(&sandbox_dir.join(WRITABLE_DISK_FILE), &disk).map_err(|e| anyhow!(error_chain(&e)))?;
        let worker = restore_worker(capsule, image, snapshot, dir, disk)?;
        worker.start().context("start the baseline VM")?;
        worker.pause().context("pause the baseline VM")?;
        Ok(FullSnapshotter {
            worker,
            capsule: capsule.to_path_buf(),
            image: image.clone(),
            dir: dir.to_path_buf(),
            taken: 0,
        })
    }

    /// Writes one full snapshot into a fresh directory and forks a child from it as forks did
    /// before; deletes both once measured.
    fn take(&mut self) -> Result<FullSample> {
        let into = self.dir.join(format!("full-{}", self.taken));
        let child_dir = self.dir.join(format!("child-{}", self.taken));
        self.taken += 1;
        std::fs::create_dir_all(&child_dir).with_context(|| format!("cannot create {}", child_dir.display()))?;
        let started = Instant::now();
        self.worker.snapshot(&into, false).context("write a full snapshot")?;
        let snapshot = started.elapsed();
        let child_disk = child_dir.join(WRITABLE_DISK_FILE);
        copy_disk(&self.dir.join(WRITABLE_DISK_FILE), &child_disk).map_err(|e| anyhow!(error_chain(&e)))?;
        let child = restore_worker(&self.capsule, &self.image, &into, &child_dir, child_disk)?;
        child.start().context("start the baseline's child")?;
        answer_true(&child, &child_dir)?;
        let fork = started.elapsed();
        child.stop().context("stop the baseline's child")?;
        let memory_bytes = allocated_bytes(&into.join(MEMORY_FILE))?;
        for done in [&into, &child_dir] {
            std::fs::remove_dir_all(done).with_context(|| format!("cannot delete {}", done.display()))?;
        }
        Ok(FullSample { snapshot, fork, memory_bytes })
    }

    fn stop(self) -> Result<()> {
        self.worker.stop().context("stop the baseline worker")?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// Every sample of one run.
#[derive(Default)]
struct Samples {
    /// (a) forks of the sandbox running since its create.
    forks: Forks,
    /// The sandbox's own files after (a).
    parent_after_forks: DiskUsage,
    /// (b)
    pause_times: Vec<Duration>,
    resume_times: Vec<Duration>,
    pause_bytes: Vec<u64>,
    /// (c)
    full_times: Vec<Duration>,
    old_fork_times: Vec<Duration>,
    full_bytes: Vec<u64>,
    /// (d) forks after the pause/resume cycles.
    forks_after_resume: Forks,
}

fn run(capsule: &Path, engine: &KvmEngine, image: &ImageInfo, root: &Path, scratch: &Path) -> Result<()> {
    let forks = env_count("SNAPSHOT_BENCH_FORKS", DEFAULT_FORKS)?;
    let pauses = env_count("SNAPSHOT_BENCH_PAUSES", DEFAULT_PAUSES)?;
    let fulls = env_count("SNAPSHOT_BENCH_FULL", DEFAULT_FULL_SNAPSHOTS)?;
    let spec = default_spec(PARENT_ID);
    println!(
        "  sandbox: {} vCPU, {} MiB memory, {} MiB disk; image {} ({})",
        spec.vcpus, spec.memory_mib, spec.disk_mib, image.version, image.flavour
    );

    let created = Instant::now();
    let mut parent = Owned(engine.create(&spec).context("create the sandbox")?);
    println!(
        "  first create, which built the template (cold boot + warm-up + snapshot): {:.0} ms",
        ms(created.elapsed())
    );
    let warmed = warm(parent.0.as_mut())?;
    println!("  warm-up cell {WARM_CELL:?}: {:.0} ms", ms(warmed));
    let parent_dir = root.join(PARENT_ID);

    // The pauses come after the forks of (a): a pause restarts the sandbox's worker from its
    // snapshot, which changes what the next fork's layer holds (see the header).
    println!(
        "\nRounds: (a) {forks} forks with (c) {fulls} full snapshots interleaved; (b) {pauses} pause/resume \
         cycles; (d) {forks} forks"
    );
    let mut s = Samples::default();
    let mut baseline: Option<FullSnapshotter> = None;
    for round in 0..forks.max(fulls) {
        if round < forks {
            s.forks.add(&mut parent, root, &format!("fork-{round}"))?;
        }
        if baseline.is_none() {
            // The guest as the first fork saw it: the sandbox's newest snapshot.
            let snapshot = newest_snapshot(&parent_dir)?;
            baseline = Some(FullSnapshotter::start(capsule, image, &parent_dir, &snapshot, &scratch.join("base"))?);
        }
        if round < fulls {
            let sample = baseline.as_mut().context("no baseline worker")?.take()?;
            s.full_times.push(sample.snapshot);
            s.old_fork_times.push(sample.fork);
            s.full_bytes.push(sample.memory_bytes);
        }
    }
    if let Some(baseline) = baseline {
        baseline.stop()?;
    }
    s.parent_after_forks = sandboxes_usage(root)?;
    for _ in 0..pauses {
        let (paused, resumed, added) = time_pause(&mut parent, root)?;
        s.pause_times.push(paused);
        s.resume_times.push(resumed);
        s.pause_bytes.push(added.total());
    }
    for round in 0..forks {
        s.forks_after_resume.add(&mut parent, root, &format!("refork-{round}"))?;
    }
    drop(parent);
    report(&s);
    Ok(())
}

fn report(s: &Samples) {
    let pause_t = Latencies::new(s.pause_times.clone());
    let resume_t = Latencies::new(s.resume_times.clone());
    let full_t = Latencies::new(s.full_times.clone());
    let old_fork_t = Latencies::new(s.old_fork_times.clone());
    let full_b = median_bytes(&s.full_bytes);

    s.forks.print("(a) Machine::fork of the sandbox running since its create (warmed, never paused)");
    println!(
        "    the sandbox's own files after them: {:.1} MiB of snapshots, {:.1} MiB of disk",
        mib(s.parent_after_forks.snapshots),
        mib(s.parent_after_forks.disks)
    );

    println!("\n(b) Machine::pause (writes a layer), then resume until `true` answers, {}×", s.pause_times.len());
    show("pause time", &pause_t);
    println!("    in order, ms: {}", ms_list(&s.pause_times));
    show("resume time", &resume_t);
    println!(
        "    disk added per pause, median: {:.1} MiB; in order: {}",
        mib(median_bytes(&s.pause_bytes)),
        mib_list(&s.pause_bytes)
    );

    println!("\n(c) BASELINE: a full snapshot of the same guest by a VMM worker, {}×", s.full_times.len());
    show("full snapshot time", &full_t);
    println!("    in order, ms: {}", ms_list(&s.full_times));
    show("fork as before: full snapshot, disk copy, restore, `true`", &old_fork_t);
    println!("    in order, ms: {}", ms_list(&s.old_fork_times));
    println!("    memory.bin allocated, median: {:.1} MiB; in order: {}", mib(full_b), mib_list(&s.full_bytes));

    s.forks_after_resume.print("(d) Machine::fork after the pauses (its worker restored from its own snapshot)");

    println!("\nRatios (below 1: cheaper than a full snapshot; with few samples p99 is the slowest)");
    s.forks.print_ratios("(a) fork", &full_t, full_b);
    ratio("(a) fork time / fork time as before", &s.forks.latencies(), &old_fork_t);
    ratio("(b) pause time / full snapshot time", &pause_t, &full_t);
    print_bytes_ratio("(b) bytes per pause / full snapshot bytes", median_bytes(&s.pause_bytes), full_b);
    s.forks_after_resume.print_ratios("(d) fork", &full_t, full_b);
    ratio("(d) fork time / fork time as before", &s.forks_after_resume.latencies(), &old_fork_t);
}

fn main() -> Result<()> {
    let capsule = capsule_bin()?;
    println!("Snapshot benchmark: forks and pauses (layers on a shared chain) against a full snapshot");
    println!("  capsule: {}", capsule.display());
    if is_debug_build(&capsule) {
        println!("  note: capsule is a DEBUG build: build with --release for representative numbers");
    }
    // Short path: vsock sockets live under it and Unix socket paths are limited.
    let scratch = tempfile::Builder::new().prefix("cpsn-").tempdir_in("/tmp")?;
    let root = scratch.path().join("r");
    let (engine, image) = match kvm_engine(&capsule, root.clone())? {
        Ok(found) => found,
        Err(why) => {
            println!("skipped: the kvm engine cannot run here: {why}");
            return Ok(());
        }
    };
    let result = run(&capsule, &engine, &image, &root, scratch.path());
    drop(engine);
    // The engine's trash thread may still be deleting killed sandboxes in there.
    let path = scratch.path().to_path_buf();
    if scratch.close().is_err() {
        std::thread::sleep(TRASH_SETTLE);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot delete {}", path.display()))?;
        }
    }
    result
}
