//! A guest that stops answering, in-process: a real rmcp client ↔ capsule's handler ↔ manager
//! ↔ test engine ↔ a real agent process, which the test freezes with `SIGSTOP` (what a fork
//! bomb or a memory storm does to the agent of a real VM). The liveness watch must mark the
//! sandbox unresponsive within its timings, every later call must fail fast naming
//! `restart_sandbox`, and the sandbox must come back by itself (agent thawed) or through
//! `restart_sandbox` (a fresh agent on the same files).

#![allow(deprecated)]

mod common;

use std::time::{Duration, Instant};

use capsule::guest::LivenessTimings;
use common::*;
use serde_json::json;

/// Short timings, so that a silent agent is found in about a second.
fn quick_liveness() -> Settings {
    let mut settings = Settings::default();
    settings.timers.liveness = LivenessTimings {
        every: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(300),
        misses: 2,
        recheck: Duration::from_millis(300),
    };
    settings
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: signalling the agent process this test's engine started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to agent {pid}");
}

async fn state_of(f: &Fixture, id: &str) -> String {
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    let entry = listed["sandboxes"].as_array().unwrap().iter().find(|s| s["sandbox_id"] == id).cloned();
    entry.unwrap_or_else(|| panic!("{id} not listed: {listed}"))["state"].as_str().unwrap().to_owned()
}

/// Freezes the agent of a new sandbox in the middle of a long call; returns the sandbox id,
/// the agent's pid, and the text of the call's result.
async fn freeze_during_a_call(f: &Fixture) -> (String, i32, String) {
    let made = ok("run", &f.call("run_command", json!({"command": "echo hi > /tmp/kept"})).await);
    let id = id_of(&made);
    let pid = agent_pid(&f.manager, &id);
    let running = f.spawn_call("run_command", json!({"command": "sleep 30", "sandbox_id": id}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(pid, libc::SIGSTOP);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), running).await.expect("the call ends").unwrap();
    assert!(is_error(&r), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "found silent after {:?}", started.elapsed());
    (id, pid, text(&r))
}

#[tokio::test]
async fn a_frozen_agent_marks_its_sandbox_unresponsive_and_it_recovers_when_thawed() {
    let f = Fixture::new(quick_liveness()).await;
    let (id, pid, t) = freeze_during_a_call(&f).await;
    assert!(t.contains("unresponsive") && t.contains("restart_sandbox"), "{t}");
    assert_eq!(state_of(&f, &id).await, "unresponsive");

    // Every later call fails fast and says what to do.
    let started = Instant::now();
    let r = f.call("run_command", json!({"command": "true", "sandbox_id": id})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains("unresponsive") && t.contains("restart_sandbox"), "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a call on an unresponsive sandbox took {:?}",
        started.elapsed()
    );
    let r = f.call("read_file", json!({"path": "/tmp/kept", "sandbox_id": id})).await;
    assert!(is_error(&r) && text(&r).contains("restart_sandbox"), "{}", text(&r));

    // Once the agent answers again, the sandbox is running again with what it had.
    signal(pid, libc::SIGCONT);
    let back = ok("run", &f.call("run_command", json!({"command": "cat /tmp/kept", "sandbox_id": id})).await);
    assert_eq!(back["stdout"], "hi\n");
    assert_eq!(state_of(&f, &id).await, "running");
    f.cleanup().await;
}

#[tokio::test]
async fn restart_sandbox_brings_an_unresponsive_sandbox_back_with_its_files_and_a_fresh_agent() {
    let f = Fixture::new(quick_liveness()).await;
    let (id, pid, _) = freeze_during_a_call(&f).await;
    assert_eq!(state_of(&f, &id).await, "unresponsive");

    let restarted = ok("restart", &f.call("restart_sandbox", json!({"sandbox_id": id})).await);
    assert_eq!(restarted["sandbox"]["state"], "running", "{restarted}");
    let note = restarted["note"].as_str().unwrap_or_default();
    assert!(note.contains("unresponsive"), "the note says what it came back from: {note}");
    let fresh = agent_pid(&f.manager, &id);
    assert_ne!(fresh, pid, "a fresh agent");
    let back = ok("run", &f.call("run_command", json!({"command": "cat /tmp/kept", "sandbox_id": id})).await);
    assert_eq!(back["stdout"], "hi\n", "files are kept");
    assert_eq!(state_of(&f, &id).await, "running");

    // The frozen agent is gone, not left behind stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let alive = stat.rfind(')').map(|i| !stat[i + 1..].trim_start().starts_with('Z')).unwrap_or(false);
    assert!(!alive, "the old agent {pid} still runs: {stat}");
    f.cleanup().await;
}

#[tokio::test]
async fn restart_sandbox_on_a_running_sandbox_reboots_it_and_on_an_unknown_id_names_the_known_ones() {
    let f = Fixture::new(quick_liveness()).await;
    let made = ok("run", &f.call("run_command", json!({"command": "echo kept > /tmp/f"})).await);
    let id = id_of(&made);
    let pid = agent_pid(&f.manager, &id);
    let restarted = ok("restart", &f.call("restart_sandbox", json!({"sandbox_id": id})).await);
    assert_eq!(restarted["sandbox"]["state"], "running");
    assert_ne!(agent_pid(&f.manager, &id), pid);
    let back = ok("run", &f.call("run_command", json!({"command": "cat /tmp/f", "sandbox_id": id})).await);
    assert_eq!(back["stdout"], "kept\n");

    let r = f.call("restart_sandbox", json!({"sandbox_id": "sb-nope"})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains(&id), "the error lists the session's sandboxes: {}", text(&r));
    f.cleanup().await;
}
