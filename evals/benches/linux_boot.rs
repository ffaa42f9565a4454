//! Linux boot benchmark: `cargo bench -p capsule-evals --bench linux_boot`.
//!
//! Boots the current guest image (`capsule image build`) with our own VMM in a worker process,
//! as the KVM engine does (1 vCPU, 1024 MiB, read-only rootfs + fresh writable disk, vsock),
//! and measures, from the worker's spawn:
//! - until `capsule-agent ready` appears on the serial console;
//! - until the first agent reply (the vsock handshake is done).
//!
//! Both are measured in one boot: a thread watches the serial log while the main thread keeps
//! trying to connect. After the handshake it reads the guest's own `/proc/uptime`. Prints
//! median and min over `LINUX_BOOT_BENCH_RUNS` runs (default 5). `LINUX_BOOT_BENCH_EXTRA_CMDLINE`
//! appends kernel parameters to the image's command line and `LINUX_BOOT_BENCH_MEM_MIB` sets the
//! guest memory (default 1024), to measure boot tweaks.
//!
//! Then, through the KVM engine (`capsule::engine::kvm::KvmEngine`): creating a sandbox from
//! its template (a snapshot of a booted guest, built by the first create) until the agent
//! answered, and forking a running sandbox, each over the same number of runs.
//!
//! This binary is also its own VM worker (`linux_boot worker --control-fd N`), so it needs no
//! `capsule` binary.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule::engine::kvm::KvmEngine;
use capsule::engine::kvm::{
    boot_config, connect_agent, serial_tail, wait_for_serial, SandboxFiles, AGENT_READY_MARKER, AGENT_READY_TIMEOUT,
    SERIAL_TAIL_LINES,
};
use capsule::engine::{Engine, EngineError, Machine, MachineSpec};
use capsule::image::{create_writable_disk, current_image, ImageInfo};
use capsule_agent::protocol::ExecRequest;
use capsule_vmm::worker::{control_fd_from_args, error_chain, worker_main, WorkerHandle};

const DEFAULT_RUNS: usize = 5;
const DEFAULT_GUEST_MEMORY_MIB: u64 = 1024;
const WRITABLE_DISK_MIB: u64 = 64;
const GUEST_VCPUS: u8 = 1;
const CALL_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

/// One boot's timings.
struct Sample {
    /// Until the worker has built its VM (spawn returned) and the vCPU runs.
    to_started: Duration,
    to_ready_marker: Duration,
    to_handshake: Duration,
    guest_uptime_at_handshake: Option<Duration>,
}

/// What each boot of a run looks like.
struct Setup {
    extra_cmdline: String,
    mem_mib: u64,
}

fn boot_once(exe: &Path, image: &ImageInfo, setup: &Setup) -> Result<Sample> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let files = SandboxFiles::new(dir.path());
    create_writable_disk(&files.writable_disk(), WRITABLE_DISK_MIB).context("writable disk")?;
    let mut config = boot_config(image, &files, GUEST_VCPUS, setup.mem_mib);
    if !setup.extra_cmdline.is_empty() {
        config.cmdline = format!("{} {}", config.cmdline, setup.extra_cmdline);
    }
    let log = files.serial_log();

    let started = Instant::now();
    let worker = WorkerHandle::spawn(exe, config).context("spawn the worker")?;
    worker.start().context("start the VM")?;
    let to_started = started.elapsed();
    let watcher = {
        let log = log.clone();
        std::thread::spawn(move || wait_for_serial(&log, AGENT_READY_MARKER, AGENT_READY_TIMEOUT))
    };
    let client =
        connect_agent(&files.vsock_uds(), &log, AGENT_READY_TIMEOUT, || match worker.wait_event(Duration::ZERO) {
            Some(event) => Err(format!("{event:?}")),
            None => Ok(()),
        })
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .context("connect to the agent")?;
    let to_handshake = started.elapsed();
    let Some(ready_after) = watcher.join().map_err(|_| anyhow::anyhow!("watcher panicked"))? else {
        bail!("no `{AGENT_READY_MARKER}` on the serial console\n{}", serial_tail(&log, SERIAL_TAIL_LINES));
    };
    // The watcher started a moment after the spawn; its clock is close enough (it polls every 2 ms).
    let to_ready_marker = ready_after.min(to_handshake);

    let uptime = client
        .exec(ExecRequest::argv(&["cat", "/proc/uptime"]), CALL_TIMEOUT)
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace().next()?.parse::<f64>().ok()
        })
        .map(Duration::from_secs_f64);
    client.close();
    worker.stop().context("stop the worker")?;
    Ok(Sample { to_started, to_ready_marker, to_handshake, guest_uptime_at_handshake: uptime })
}

/// Creates from the template and forks through the engine; returns (creates, forks).
fn engine_runs(exe: &Path, image: &ImageInfo, mem_mib: u64, runs: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let root = tempfile::tempdir().context("temp dir")?;
    let engine = KvmEngine::new(
        exe.to_path_buf(),
        image.clone(),
        root.path().join("sandboxes"),
        capsule::daemon::open::default_warm_up(),
    )
    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let spec = |id: String| MachineSpec {
        id,
        template: "bench".into(),
        vcpus: u32::from(GUEST_VCPUS),
        memory_mib: u32::try_from(mem_mib).unwrap_or(u32::MAX),
        disk_mib: u32::try_from(WRITABLE_DISK_MIB).unwrap_or(u32::MAX),
        env: Default::default(),
    };
    let engine_err = |e: EngineError| anyhow::anyhow!(error_chain(&e));
    let started = Instant::now();
    let mut parent = engine.create(&spec("parent".into())).map_err(engine_err)?;
    println!("  first create (boots and saves the template): {:.1} ms", ms(started.elapsed()));
    let (mut creates, mut forks) = (Vec::new(), Vec::new());
    for run in 0..runs {
        creates.push(time_to_agent(|| engine.create(&spec(format!("create-{run}"))))?);
        forks.push(time_to_agent(|| parent.fork(&spec(format!("fork-{run}"))))?);
    }
    parent.kill().map_err(engine_err)?;
    Ok((creates, forks))
}

/// Times `make` up to the new machine's first agent connection, then kills it.
fn time_to_agent(make: impl FnOnce() -> Result<Box<dyn Machine>, EngineError>) -> Result<Duration> {
    let engine_err = |e: EngineError| anyhow::anyhow!(error_chain(&e));
    let started = Instant::now();
    let mut machine = make().map_err(engine_err)?;
    machine.connect().map_err(engine_err)?;
    let elapsed = started.elapsed();
    machine.kill().map_err(engine_err)?;
    Ok(elapsed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(label: &str, mut values: Vec<Duration>) {
    if values.is_empty() {
        println!("{label:<44} (no samples)");
        return;
    }
    values.sort_unstable();
    println!(
        "{label:<44} median {:>8.1} ms   min {:>8.1} ms   ({} runs)",
        ms(values[values.len() / 2]),
        ms(values[0]),
        values.len()
    );
}

fn bench() -> Result<()> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        println!("SKIP: /dev/kvm is not usable: {e}");
        return Ok(());
    }
    let image = match current_image() {
        Ok(image) => image,
        Err(e) => {
            println!("SKIP: no capsule image built (run `capsule image build`): {e}");
            return Ok(());
        }
    };
    let runs = std::env::var("LINUX_BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(DEFAULT_RUNS);
    let setup = Setup {
        extra_cmdline: std::env::var("LINUX_BOOT_BENCH_EXTRA_CMDLINE").unwrap_or_default(),
        mem_mib: std::env::var("LINUX_BOOT_BENCH_MEM_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_GUEST_MEMORY_MIB),
    };
    let exe = std::env::current_exe().context("locate this benchmark binary")?;
    println!(
        "linux_boot: image {} ({}), {GUEST_VCPUS} vCPU, {} MiB, {runs} runs, extra cmdline {:?}",
        image.version, image.flavour, setup.mem_mib, setup.extra_cmdline
    );
    let mut samples = Vec::with_capacity(runs);
    for run in 1..=runs {
        let sample = boot_once(&exe, &image, &setup).with_context(|| format!("run {run}"))?;
        println!(
            "  run {run}: vCPU started {:>6.1} ms, ready marker {:>7.1} ms, first reply {:>7.1} ms, guest uptime {}",
            ms(sample.to_started),
            ms(sample.to_ready_marker),
            ms(sample.to_handshake),
            sample.guest_uptime_at_handshake.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        );
        samples.push(sample);
    }
    report("spawn -> VM built and vCPU started", samples.iter().map(|s| s.to_started).collect());
    report("spawn -> `capsule-agent ready` on serial", samples.iter().map(|s| s.to_ready_marker).collect());
    report("spawn -> first agent reply (handshake)", samples.iter().map(|s| s.to_handshake).collect());
    report(
        "guest /proc/uptime just after the handshake",
        samples.iter().filter_map(|s| s.guest_uptime_at_handshake).collect(),
    );
    let (creates, forks) = engine_runs(&exe, &image, setup.mem_mib, runs)?;
    report("engine: create from template -> agent answers", creates);
    report("engine: fork a running sandbox -> agent answers", forks);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if control_fd_from_args(&args).is_some() {
        worker_main("linux_boot");
    }
    bench()
}
