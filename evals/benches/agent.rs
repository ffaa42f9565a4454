//! Agent overhead benchmark: `cargo bench -p capsule-evals --bench agent`.
//!
//! In one run, on this host:
//! (a) N× bare fork+exec of `/bin/true` (std::process::Command, wait);
//! (b) N× `exec /bin/true` (argv form) round trip through the agent over a
//!     Unix socket (the agent's server runs in this process, as in a guest);
//! (c) `run_code "1+1"` in a warm Python context, vs
//! (d) a cold `python3 -c "1+1"` through the same agent exec.
//! (a') is (a) spawned with the agent's settings (pipes, process group, cwd),
//! to separate the cost of those from the cost of the protocol.
//! (e) 64 MiB written and read back through the protocol, in MiB/s.
//! Prints p50 and mean of each and the ratios; the target for b/a is ≤ 1.3×.
//! Set `AGENT_BENCH_N` to change N (default 300).

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{ErrorKind, ExecRequest, Language, Op, Reply, RunCodeRequest};
use capsule_agent::server::{Agent, AgentConfig};
use capsule_evals::timing::interleaved_samples;

const DEFAULT_N: usize = 300;
const WARMUP: usize = 20;
const PYTHON_N: usize = 30;
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
const TARGET_RATIO: f64 = 1.3;
const TRANSFER_BYTES: usize = 64 * 1024 * 1024;

struct Stats {
    p50: Duration,
    mean: Duration,
}

/// Times `n` rounds of `fs`, interleaved (one call of each per round), so a
/// noisy shared host loads every variant alike.
fn measure_interleaved(n: usize, fs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<Stats>> {
    Ok(interleaved_samples(n, WARMUP.min(n), fs)?
        .into_iter()
        .map(|mut s| {
            s.sort_unstable();
            let mean = s.iter().sum::<Duration>() / n as u32;
            Stats { p50: s[n / 2], mean }
        })
        .collect())
}

fn measure(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    let mut stats = measure_interleaved(n, &mut [&mut f])?;
    Ok(stats.remove(0))
}

fn show(label: &str, s: &Stats) {
    println!("{label:<48} p50 {:>9.1} µs   mean {:>9.1} µs", us(s.p50), us(s.mean));
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Result<()> {
    let n: usize = std::env::var("AGENT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_N);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket)?;
    let agent = Agent::new(AgentConfig {
        work_dir: dir.path().to_owned(),
        state_dir: dir.path().join("state"),
        pid1: false,
        cgroup_root: None,
        protection: Default::default(),
    });
    std::thread::spawn(move || agent.serve(|| listener.accept().map(|(s, _)| s)));
    let (client, _) = AgentClient::connect_unix(&socket).context("connect to the in-process agent")?;

    println!("agent overhead, N = {n} (after {WARMUP} warm-up runs each; a, a', b interleaved)");
    let mut bare = || {
        let status = std::process::Command::new("/bin/true").status()?;
        if !status.success() {
            bail!("/bin/true failed: {status}");
        }
        Ok(())
    };
    let mut configured = || {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new("/bin/true")
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .output()?;
        if !out.status.success() {
            bail!("/bin/true failed: {}", out.status);
        }
        Ok(())
    };
    let mut via_agent = || {
        let out = client.exec(ExecRequest::argv(&["/bin/true"]), TIMEOUT)?;
        if out.status.code != Some(0) {
            bail!("agent exec /bin/true: {:?}", out.status);
        }
        Ok(())
    };
    let stats = measure_interleaved(n, &mut [&mut bare, &mut configured, &mut via_agent])?;
    let (bare, configured, via_agent) = (&stats[0], &stats[1], &stats[2]);
    show("(a) bare fork+exec /bin/true", bare);
    show("(a') bare, spawned as the agent does", configured);
    show("(b) agent exec /bin/true round trip", via_agent);
    let ratio_p50 = us(via_agent.p50) / us(bare.p50);
    let ratio_mean = us(via_agent.mean) / us(bare.mean);
    println!(
        "ratio b/a: p50 {ratio_p50:.2}×, mean {ratio_mean:.2}× (target ≤ {TARGET_RATIO}×: {})",
        if ratio_p50 <= TARGET_RATIO { "met" } else { "NOT met" }
    );

    // File transfer through the protocol (chunked writes and reads).
    let payload: Vec<u8> = (0..TRANSFER_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
    let file = dir.path().join("transfer.bin");
    let file = file.to_str().context("utf-8 temp path")?;
    let start = Instant::now();
    client.write_file(file, &payload, None)?;
    let write_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let back = client.read_file(file)?;
    let read_s = start.elapsed().as_secs_f64();
    if back != payload {
        bail!("file transfer came back different");
    }
    let mib = TRANSFER_BYTES as f64 / (1024.0 * 1024.0);
    println!(
        "(e) file transfer of {mib:.0} MiB                          write {:>7.0} MiB/s   read {:>7.0} MiB/s",
        mib / write_s,
        mib / read_s
    );

    let run_code = |code: &str| {
        client.call_reply(
            Op::RunCode(RunCodeRequest {
                context: "bench".into(),
                language: Language::Python,
                code: code.into(),
                output_cap_bytes: None,
                limits: None,
            }),
            TIMEOUT,
        )
    };
    match run_code("1+1") {
        Err(ClientError::Agent(e)) if e.kind == ErrorKind::Unsupported => {
            println!("(c)/(d) skipped: the agent has no language contexts ({})", e.message);
        }
        Err(e) => println!("(c)/(d) skipped: run_code failed: {e:#}"),
        Ok(_) if which_python().is_none() => println!("(c)/(d) skipped: no python3 on this host"),
        Ok(_) => {
            let warm = measure(PYTHON_N, || match run_code("1+1")? {
                Reply::CodeDone(_) => Ok(()),
                other => bail!("unexpected reply {other:?}"),
            })?;
            show("(c) run_code \"1+1\" in a warm Python context", &warm);
            let cold = measure(PYTHON_N, || {
                let out = client.exec(ExecRequest::argv(&["python3", "-c", "1+1"]), TIMEOUT)?;
                if out.status.code != Some(0) {
                    bail!("python3 -c failed: {:?}", out.status);
                }
                Ok(())
            })?;
            show("(d) cold python3 -c \"1+1\" via agent exec", &cold);
            println!("ratio d/c: p50 {:.1}×", us(cold.p50) / us(warm.p50));
        }
    }
    Ok(())
}

fn which_python() -> Option<()> {
    std::process::Command::new("python3").arg("-c").arg("pass").status().ok().filter(|s| s.success()).map(|_| ())
}
