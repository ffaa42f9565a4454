//! MCP-level benchmark: `cargo bench -p capsule-evals --bench mcp_stdio [-- --engine kvm]`.
//!
//! Owns two measurements, each printed as a ratio against a baseline measured in the same run
//! (this is a benchmark, not a timed test: it never fails on a slow number):
//!
//! 1. **Round trip.** `tools/call run_command {"command":"true"}` through a real
//!    `capsule serve` child process over MCP stdio (newline-delimited JSON-RPC spoken here by
//!    hand; `capsule serve` relays it to the daemon it started), and the same call on the
//!    daemon's own Unix socket (no relay), against the same `Exec` of `sh -c true` sent straight
//!    to a machine of the same engine through `capsule::engine` (no MCP, no manager). All run
//!    interleaved, one call of each per round, so a noisy host loads them alike. Prints p50 and
//!    p99 of each, the ratios, and what the relay adds.
//! 2. **Sandbox ready: template against cold boot** (KVM engine only). It times a cold boot
//!    (built from the engine's public boot pieces) and an `Engine::create` that restores the
//!    template, interleaved, each until `true` has answered, plus a resume from a pause
//!    snapshot for comparison. On the test engine it prints `not measured`.
//!
//! Engine: `--engine test|kvm` or `CAPSULE_BENCH_ENGINE` (default `test`). The kvm mode prints
//! `skipped: …` with the reason when this host or build cannot run microVMs.
//! Binaries: `CAPSULE_BIN` and `CAPSULE_AGENT_BIN`, else `capsule` and `capsule-agent` in the
//! bench's own target directory (release first, then debug), as `tests/python/conftest.py` does.
//! Sizes: `MCP_BENCH_N` round trips (default 300 on test, 100 on kvm), `MCP_BENCH_BOOTS` boots.
//!
//! It never leaves a sandbox behind: every sandbox it made is killed before it exits.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capsule::engine::kvm::{boot_config, connect_agent, set_guest_clock, SandboxFiles, AGENT_READY_TIMEOUT};
use capsule::engine::test_engine::{TestEngine, AGENT_BIN_ENV};
use capsule::engine::Engine;
use capsule::image::{create_writable_disk, ImageInfo};
use capsule_evals::binaries::Binaries;
use capsule_evals::latency::{ms, ratio, show, Latencies};
use capsule_evals::sandbox::{default_spec, exec_true, kvm_engine, Owned, TRUE_COMMAND};
use capsule_evals::sizes::env_count;
use capsule_evals::timing::interleaved_samples;
use capsule_vmm::worker::{error_chain, WorkerHandle};
use serde_json::{json, Value};

/// Round trips per variant on the test engine, unless `MCP_BENCH_N` says otherwise.
const DEFAULT_N_TEST: usize = 300;
/// Round trips per variant on the KVM engine (each `true` costs a guest fork+exec).
const DEFAULT_N_KVM: usize = 100;
/// Untimed round trips of each variant before measuring.
const WARMUP_ROUNDS: usize = 20;
/// Cold boots, template creates and snapshot restores timed on kvm, unless `MCP_BENCH_BOOTS` says.
const DEFAULT_BOOTS: usize = 5;
/// How long `capsule serve` may take to end after its stdin closes (it pauses sandboxes first).
const SERVER_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// MCP protocol version offered in `initialize` (the server answers with the one it speaks).
const MCP_PROTOCOL_VERSION: &str = "2025-06-18";
/// The command both variants run.
const COMMAND: &str = TRUE_COMMAND;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Test,
    Kvm,
}

impl EngineKind {
    fn name(self) -> &'static str {
        match self {
            EngineKind::Test => "test",
            EngineKind::Kvm => "kvm",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "test" => Ok(EngineKind::Test),
            "kvm" => Ok(EngineKind::Kvm),
            other => bail!("unknown engine {other:?}: use test or kvm"),
        }
    }
}

/// What to run, from the command line (`--engine X`, `--engine=X`) and the environment.
fn engine_kind() -> Result<EngineKind> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--engine" {
            return EngineKind::parse(&args.next().context("--engine needs a value: test or kvm")?);
        }
        if let Some(value) = arg.strip_prefix("--engine=") {
            return EngineKind::parse(value);
        }
    }
    match std::env::var("CAPSULE_BENCH_ENGINE") {
        Ok(value) if !value.is_empty() => EngineKind::parse(&value),
        _ => Ok(EngineKind::Test),
    }
}

// ---------------------------------------------------------------------------------------------
// Latency statistics

/// Times `n` rounds of every variant, interleaved (one call of each per round) after
/// [`WARMUP_ROUNDS`] untimed rounds, so a noisy shared host loads every variant alike.
fn measure_interleaved(n: usize, variants: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<Latencies>> {
    Ok(interleaved_samples(n, WARMUP_ROUNDS, variants)?.into_iter().map(Latencies::new).collect())
}

// ---------------------------------------------------------------------------------------------
// An MCP client over stdio, by hand

/// An MCP session spoken by hand: to a `capsule serve` child process on its stdin/stdout, or
/// straight to the daemon on its socket.
struct StdioServer {
    child: Option<Child>,
    stdin: Option<Box<dyn Write>>,
    stdout: Box<dyn BufRead>,
    next_id: u64,
    log: PathBuf,
}

impl StdioServer {
    /// An MCP session on the daemon's own socket in `state_dir` (the daemon must run), as the
    /// client `owner`: what `capsule serve` relays to, without the relay.
    fn on_daemon_socket(state_dir: &Path, owner: &str) -> Result<Self> {
        let socket = state_dir.join(capsule::daemon::socket::SOCKET_FILE);
        let stream = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        let hello = capsule::daemon::hello::Hello::Mcp {
            version: capsule::daemon::hello::HELLO_VERSION,
            owner: Some(owner.to_string()),
            settings: String::new(),
        };
        let (reader, welcome) =
            capsule::daemon::client::greet(&stream, &hello).map_err(|e| anyhow!(error_chain(&e)))?;
        let _ = welcome;
        let mut server = StdioServer {
            child: None,
            stdin: Some(Box::new(stream)),
            stdout: Box::new(reader),
            next_id: 1,
            log: state_dir.join(capsule::daemon::socket::LOG_FILE),
        };
        server.initialize()?;
        Ok(server)
    }

    /// Starts `capsule serve --engine ENGINE` with its state under `state_dir` and its stderr
    /// in `state_dir/server.log`, and runs the MCP handshake.
    fn start(bins: &Binaries, engine: EngineKind, state_dir: &Path) -> Result<Self> {
        // A state directory only its owner may enter, as the daemon requires.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let log = state_dir.join("server.log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = std::process::Command::new(&bins.capsule)
            .args(["serve", "--transport", "stdio", "--engine", engine.name()])
            // A release build refuses the test engine without it; the kvm engine ignores it.
            .arg("--unsafe-test-engine")
            .env(AGENT_BIN_ENV, &bins.agent)
            .env("CAPSULE_STATE_DIR", state_dir)
            .env("CAPSULE_LOG", "capsule=warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", bins.capsule.display()))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut server = StdioServer {
            child: Some(child),
            stdin: Some(Box::new(BufWriter::new(stdin))),
            stdout: Box::new(BufReader::new(stdout)),
            next_id: 1,
            log,
        };
        server.initialize()?;
        Ok(server)
    }

    /// The MCP handshake.
    fn initialize(&mut self) -> Result<()> {
        let server = self;
        let init = server.request(
            "initialize",
            json!({
                "protocolVersion": MCP_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "capsule-evals-mcp-stdio", "version": env!("CARGO_PKG_VERSION")},
            }),
        )?;
        if init.get("serverInfo").is_none() {
            bail!("initialize answered without serverInfo: {init}");
        }
        server.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(())
    }

    fn send(&mut self, message: &Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the server's stdin is already closed")?;
        serde_json::to_writer(&mut *stdin, message)?;
        stdin.write_all(b"\n")?;
        stdin.flush().context("cannot write to capsule serve's stdin")?;
        Ok(())
    }

    /// Sends a request and reads until its response; notifications in between are skipped and
    /// requests from the server are refused (this client declares no capabilities).
    fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("capsule serve closed stdout during {method}; see {}", self.log.display());
            }
            let message: Value = serde_json::from_str(line.trim_end())
                .with_context(|| format!("capsule serve wrote a line that is not JSON: {line:?}"))?;
            match (message.get("id"), message.get("method")) {
                (Some(got), None) if got.as_u64() == Some(id) => {
                    if let Some(error) = message.get("error") {
                        bail!("{method} failed: {error}");
                    }
                    return message.get("result").cloned().with_context(|| format!("{method}: no result in {message}"));
                }
                (Some(other), Some(_)) => {
                    let refusal = json!({"jsonrpc": "2.0", "id": other,
                        "error": {"code": -32601, "message": "the benchmark client serves no requests"}});
                    self.send(&refusal)?;
                }
                _ => {} // a notification (log, progress) or a stray response
            }
        }
    }

    /// `tools/call NAME ARGS`; a result with `isError` is an error. Returns `structuredContent`.
    fn call_tool(&mut self, name: &str, arguments: Value) -> Result<Value> {
        let result = self.request("tools/call", json!({"name": name, "arguments": arguments}))?;
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            bail!("{name} returned an error result: {}", result["content"]);
        }
        result.get("structuredContent").cloned().with_context(|| format!("{name}: no structuredContent"))
    }

    /// Closes stdin (the end of the session) and waits for the server to exit, killing it after
    /// [`SERVER_EXIT_TIMEOUT`].
    fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        let deadline = Instant::now() + SERVER_EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    eprintln!("note: capsule serve ended with {status}; see {}", self.log.display());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        child.wait()?;
        bail!("capsule serve did not exit within {SERVER_EXIT_TIMEOUT:?} of its stdin closing; killed it")
    }
}

impl Drop for StdioServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Stops the daemon a benchmark's `capsule serve` started (`capsule shutdown`).
fn shutdown_daemon(bins: &Binaries, state_dir: &Path) -> Result<()> {
    let status = std::process::Command::new(&bins.capsule)
        .args(["shutdown", "--state-dir"])
        .arg(state_dir)
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {} shutdown", bins.capsule.display()))?;
    if !status.success() {
        bail!("capsule shutdown ended with {status}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The direct baseline: a machine of the same engine, no MCP

/// The engine under test, and for the KVM engine the guest image it runs.
struct Target {
    engine: Arc<dyn Engine>,
    image: Option<ImageInfo>,
}

/// The engine for the direct baseline, or why the host cannot run it.
fn direct_engine(kind: EngineKind, bins: &Binaries, root: PathBuf) -> Result<std::result::Result<Target, String>> {
    match kind {
        EngineKind::Test => {
            Ok(Ok(Target { engine: Arc::new(TestEngine::new(bins.agent.clone(), root)?), image: None }))
        }
        EngineKind::Kvm => Ok(kvm_engine(&bins.capsule, root)?
            .map(|(engine, image)| Target { engine: Arc::new(engine) as Arc<dyn Engine>, image: Some(image) })),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip

/// Returns how long the direct sandbox's `Engine::create` took (on kvm the first create of a
/// size builds its template).
fn bench_round_trip(kind: EngineKind, bins: &Binaries, engine: &Arc<dyn Engine>, state_dir: &Path) -> Result<Duration> {
    let n = env_count("MCP_BENCH_N", if kind == EngineKind::Kvm { DEFAULT_N_KVM } else { DEFAULT_N_TEST })?;
    println!("\n1. run_command {COMMAND:?} round trip, N = {n} each after {WARMUP_ROUNDS} warm-up rounds, interleaved");

    let created = Instant::now();
    let mut direct = Owned(engine.create(&default_spec("bench-direct")).context("create the direct sandbox")?);
    let first_create = created.elapsed();

    let serve_dir = state_dir.join("serve");
    let mut server = StdioServer::start(bins, kind, &serve_dir)?;
    // The first run_command creates the default sandbox (on kvm: builds the server's template); untimed.
    let first = server.call_tool("run_command", json!({"command": COMMAND}))?;
    let sandbox_id = first["sandbox_id"].as_str().context("run_command returned no sandbox_id")?.to_string();
    // The same daemon, without the relay (a client of its own, with its own default sandbox).
    let mut socket = StdioServer::on_daemon_socket(&serve_dir, "capsule-evals-socket")?;
    let first = socket.call_tool("run_command", json!({"command": COMMAND}))?;
    let socket_sandbox = first["sandbox_id"].as_str().context("run_command returned no sandbox_id")?.to_string();

    // As the manager does per call: ask the machine for its (live, reused) agent connection.
    let mut via_engine = || exec_true(&direct.0.connect()?);
    let run_true = |session: &mut StdioServer| {
        let r = session.call_tool("run_command", json!({"command": COMMAND}))?;
        if r["exit_code"] != 0 {
            bail!("run_command {COMMAND:?} over MCP: exit_code {}", r["exit_code"]);
        }
        Ok(())
    };
    let mut via_mcp = || run_true(&mut server);
    let mut via_socket = || run_true(&mut socket);
    let measured = measure_interleaved(n, &mut [&mut via_engine, &mut via_mcp, &mut via_socket]);
    let cleanup = server
        .call_tool("kill_sandbox", json!({"sandbox_id": sandbox_id}))
        .and(socket.call_tool("kill_sandbox", json!({"sandbox_id": socket_sandbox})));
    let stopped = server.stop().and(socket.stop()).and(shutdown_daemon(bins, &serve_dir));
    let stats = measured?;
    cleanup.context("kill the MCP default sandboxes")?;
    stopped?;

    let (engine_stats, mcp_stats, socket_stats) = (&stats[0], &stats[1], &stats[2]);
    show(&format!("(a) direct {} engine: Machine::connect + AgentClient::exec", kind.name()), engine_stats);
    show("(b) MCP stdio tools/call run_command (capsule serve relaying to the daemon)", mcp_stats);
    show("(c) the same call on the daemon's own socket (no relay)", socket_stats);
    ratio("ratio b/a (what MCP + manager + the relay + process hops add)", mcp_stats, engine_stats);
    ratio("ratio c/a (what MCP + manager add)", socket_stats, engine_stats);
    println!(
        "  what the relay adds, b−c: {:.3} ms at p50, {:.3} ms at p99",
        ms(mcp_stats.p50()) - ms(socket_stats.p50()),
        ms(mcp_stats.p99()) - ms(socket_stats.p99())
    );
    Ok(first_create)
}

// ---------------------------------------------------------------------------------------------
// 2. Sandbox ready: template against cold boot

/// One cold boot, as the KVM engine boots a template's guest (fresh writable disk, boot the
/// image in a `capsule worker`, wait for the agent, set its clock), until `true` has answered.
/// Built from the engine's public boot pieces, since `Engine::create` now restores a template.
fn time_cold_boot(capsule: &Path, image: &ImageInfo, dir: &Path) -> Result<Duration> {
    let spec = default_spec("cold");
    let files = SandboxFiles::new(dir);
    let started = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    create_writable_disk(&files.writable_disk(), u64::from(spec.disk_mib))?;
    let vcpus = u8::try_from(spec.vcpus).context("vcpus over 255")?;
    let config = boot_config(image, &files, vcpus, u64::from(spec.memory_mib));
    let worker = WorkerHandle::spawn(capsule, config).context("spawn the VM worker")?;
    let booted = (|| -> Result<Duration> {
        worker.start().context("start the VM")?;
        let alive = || match worker.wait_event(Duration::ZERO) {
            Some(event) => Err(format!("{event:?}")),
            None => Ok(()),
        };
        let client = connect_agent(&files.vsock_uds(), &files.serial_log(), AGENT_READY_TIMEOUT, alive)
            .map_err(|e| anyhow!(error_chain(&e)))?;
        set_guest_clock(&client).map_err(|e| anyhow!(error_chain(&e)))?;
        exec_true(&client)?;
        let elapsed = started.elapsed();
        client.close();
        Ok(elapsed)
    })();
    let stopped = worker.stop();
    let elapsed = booted?;
    stopped.context("stop the VM worker")?;
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot delete {}", dir.display()))?;
    Ok(elapsed)
}

/// One `Engine::create` (a template restore once the template exists) until `true` has answered.
fn time_create(engine: &Arc<dyn Engine>, id: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut machine = Owned(engine.create(&default_spec(id))?);
    exec_true(&machine.0.connect()?)?;
    Ok(started.elapsed())
}

/// Times from resuming a paused (snapshotted-to-disk) sandbox to its first command's answer.
fn time_snapshot_restores(engine: &Arc<dyn Engine>, restores: usize) -> Result<Latencies> {
    let mut machine = Owned(engine.create(&default_spec("bench-restore"))?);
    exec_true(&machine.0.connect()?)?;
    let mut samples = Vec::with_capacity(restores);
    for _ in 0..restores {
        machine.0.pause()?;
        let start = Instant::now();
        machine.0.resume()?;
        exec_true(&machine.0.connect()?)?;
        samples.push(start.elapsed());
    }
    Ok(Latencies::new(samples))
}

/// `first_create`: section 1's first `Engine::create`, which built the template.
fn bench_ready(bins: &Binaries, target: &Target, scratch: &Path, first_create: Duration) -> Result<()> {
    println!("\n2. sandbox ready (until `true` has answered): template against cold boot");
    let Some(image) = &target.image else {
        println!("  not measured: templates need the KVM engine (run with --engine kvm)");
        return Ok(());
    };
    let boots = env_count("MCP_BENCH_BOOTS", DEFAULT_BOOTS)?;
    let (mut cold, mut templated) = (Vec::with_capacity(boots), Vec::with_capacity(boots));
    for i in 0..boots {
        cold.push(time_cold_boot(&bins.capsule, image, &scratch.join(format!("cold-{i}")))?);
        templated.push(time_create(&target.engine, &format!("bench-tpl-{i}"))?);
    }
    let (cold, templated) = (Latencies::new(cold), Latencies::new(templated));
    let restored = time_snapshot_restores(&target.engine, boots)?;
    println!(
        "  first create of this size, which built the template (cold boot + snapshot): {:.1} ms",
        ms(first_create)
    );
    show(&format!("(c) cold boot, {boots}× (interleaved with d)"), &cold);
    show(&format!("(d) Engine::create from the template, {boots}×"), &templated);
    show(&format!("(e) resume from own pause snapshot, {boots}×"), &restored);
    ratio("ratio c/d (cold boot against template)", &cold, &templated);
    Ok(())
}

fn main() -> Result<()> {
    let kind = engine_kind()?;
    let bins = Binaries::locate(AGENT_BIN_ENV)?;
    println!("MCP stdio benchmark, engine {}", kind.name());
    println!("  capsule: {}", bins.capsule.display());
    println!("  agent:   {}", bins.agent.display());
    if bins.is_debug_build() {
        println!("  note: capsule is a DEBUG build, the baseline is not: build with --release for fair ratios");
    }
    // Short path: agent and vsock sockets live under it and Unix socket paths are limited.
    let state = tempfile::Builder::new().prefix("cpsb-").tempdir_in("/tmp")?;
    let target = match direct_engine(kind, &bins, state.path().join("direct"))? {
        Ok(target) => target,
        Err(why) => {
            println!("skipped: the {} engine cannot run here: {why}", kind.name());
            return Ok(());
        }
    };
    let first_create = bench_round_trip(kind, &bins, &target.engine, state.path())?;
    bench_ready(&bins, &target, state.path(), first_create)?;
    Ok(())
}
