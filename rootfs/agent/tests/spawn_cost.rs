//! Measurements, not checks (ignored by default; run with
//! `cargo test -p capsule-agent --release --test spawn_cost -- --ignored --nocapture`):
//!
//! - `exec /bin/true` round trips through the agent binary, p50 over
//!   [`ROUNDS`] runs each, interleaved in one run: without cgroups, with a
//!   cgroup per command (and its limits, when the controllers are on), and
//!   the same two with the agent spawning fork-style instead of vfork-style;
//! - in this process, one spawn + wait of `/bin/true` per mode (vfork-style,
//!   fork-style, std's `Command`), and the same into a fresh cgroup.
//!
//! Timings on these machines are noisy: compare the columns of one run.

mod fixture;

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use capsule_agent::budget::Protection;
use capsule_agent::protocol::ExecRequest;
use capsule_agent::spawn::{spawn_with_mode, Session, SpawnMode, SpawnSpec, SPAWN_MODE_ENV};
use fixture::cgroups::{Need, TestCgroup};
use fixture::TestAgent;

const ROUNDS: usize = 200;
const T: Option<Duration> = Some(Duration::from_secs(30));

fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<44} n={:<4} min {:>8.0} µs  p50 {:>8.0} µs  p90 {:>8.0} µs",
        samples.len(),
        us(samples[0]),
        us(at(0.5)),
        us(at(0.9))
    );
    at(0.5)
}

#[test]
#[ignore = "a measurement; run it explicitly with --ignored --nocapture"]
fn exec_true_round_trip_with_and_without_cgroups() {
    let cgroup = TestCgroup::create(Need::Limits).or_else(|_| TestCgroup::create(Need::Cgroup2));
    let cgroup = match cgroup {
        Ok(cg) => Some(cg),
        Err(why) => {
            println!("no cgroup v2 here ({why}): measuring without cgroups only");
            None
        }
    };
    let limits_on = cgroup.as_ref().is_some_and(|cg| {
        std::fs::read_to_string(cg.mount.join("cgroup.subtree_control")).is_ok_and(|s| s.contains("pids"))
    });
    let mut agents: Vec<(String, TestAgent)> = Vec::new();
    for (mode, env) in [("vfork", &[][..]), ("fork", &[(SPAWN_MODE_ENV, "fork")][..])] {
        agents.push((format!("{mode}, no cgroup"), TestAgent::launch(&[], env)));
        if let Some(cg) = &cgroup {
            let what = if limits_on { "cgroup + pids/memory limits" } else { "cgroup (no controllers here)" };
            // One tree per agent (two agents cannot share a root), both in the test's cgroup.
            let sub = cg.path.join(mode);
            std::fs::create_dir(&sub).unwrap();
            if limits_on {
                std::fs::write(cg.path.join("cgroup.subtree_control"), "+memory +pids").unwrap();
            }
            let args = [OsStr::new("--cgroup-root"), sub.as_os_str()];
            agents.push((format!("{mode}, {what}"), TestAgent::launch(&args, env)));
        }
    }
    let clients: Vec<_> = agents.iter().map(|(_, a)| a.connect()).collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); agents.len()];
    for c in &clients {
        c.exec(ExecRequest::argv(&["/bin/true"]), T).unwrap(); // warm up
    }
    for _ in 0..ROUNDS {
        for (i, c) in clients.iter().enumerate() {
            let start = Instant::now();
            let out = c.exec(ExecRequest::argv(&["/bin/true"]), T).unwrap();
            samples[i].push(start.elapsed());
            assert_eq!(out.status.code, Some(0));
        }
    }
    println!("exec /bin/true through the agent ({ROUNDS} rounds, interleaved):");
    let p50s: Vec<Duration> = agents.iter().zip(samples).map(|((name, _), s)| summary(name, s)).collect();
    if cgroup.is_some() {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "cgroup cost at p50: vfork {:+.0} µs, fork {:+.0} µs",
            us(p50s[1]) - us(p50s[0]),
            us(p50s[3]) - us(p50s[2])
        );
    }
    drop(clients);
    drop(agents);
}

fn spawn_true(mode: SpawnMode, cgroup: Option<&OwnedFd>, null: &std::fs::File) -> Duration {
    let argv = [OsString::from("/bin/true")];
    let spec = SpawnSpec {
        program: OsStr::new("/bin/true"),
        args: &argv,
        env: &[],
        cwd: std::path::Path::new("/"),
        fds: &[(0, null.as_fd()), (1, null.as_fd()), (2, null.as_fd())],
        session: Session::NewProcessGroup,
        cgroup: cgroup.map(|fd| fd.as_fd()),
        protection: Protection::default(),
    };
    let start = Instant::now();
    let mut child = spawn_with_mode(&spec, mode).unwrap();
    assert!(child.wait().unwrap().success());
    start.elapsed()
}

#[test]
#[ignore = "a measurement; run it explicitly with --ignored --nocapture"]
fn spawn_and_wait_per_mode_in_process() {
    let null = std::fs::File::options().read(true).write(true).open("/dev/null").unwrap();
    // Make this process look more like the agent: a few threads and some touched memory.
    let ballast: Vec<u8> = vec![1; 32 << 20];
    let threads: Vec<_> = (0..8).map(|_| std::thread::spawn(|| std::thread::sleep(Duration::from_secs(60)))).collect();
    let cgroup = TestCgroup::create(Need::Cgroup2).ok();
    let mut rows: Vec<(&str, Vec<Duration>)> =
        vec![("vfork-style clone3", vec![]), ("fork-style clone3", vec![]), ("std::process::Command", vec![])];
    if cgroup.is_some() {
        rows.push(("vfork-style + mkdir/CLONE_INTO_CGROUP/rmdir", vec![]));
        rows.push(("fork-style + mkdir/CLONE_INTO_CGROUP/rmdir", vec![]));
    }
    for round in 0..ROUNDS {
        rows[0].1.push(spawn_true(SpawnMode::Vfork, None, &null));
        rows[1].1.push(spawn_true(SpawnMode::Fork, None, &null));
        let start = Instant::now();
        assert!(std::process::Command::new("/bin/true").status().unwrap().success());
        rows[2].1.push(start.elapsed());
        if let Some(cg) = &cgroup {
            for (row, mode) in [(3, SpawnMode::Vfork), (4, SpawnMode::Fork)] {
                let start = Instant::now();
                let dir = cg.path.join(format!("r{round}-{row}"));
                std::fs::create_dir(&dir).unwrap();
                let fd = OwnedFd::from(std::fs::File::open(&dir).unwrap());
                spawn_true(mode, Some(&fd), &null);
                drop(fd);
                std::fs::remove_dir(&dir).unwrap();
                rows[row].1.push(start.elapsed());
            }
        }
    }
    println!("spawn + wait of /bin/true in this process ({ROUNDS} rounds, 32 MiB touched, 9 threads):");
    for (name, samples) in rows {
        summary(name, samples);
    }
    drop(ballast);
    drop(threads);
}
