//! In-process MCP tests: a real rmcp client ↔ capsule's handler over
//! `tokio::io::duplex` ↔ manager ↔ test engine ↔ real agent processes.
//! Covers every tool, the error paths, caps, progress, the default sandbox,
//! unknown ids, auto-resume, timers, crash detection and restart.

#![allow(deprecated)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use capsule::sandbox::Owner;
use common::*;
use rmcp::model::{CallToolRequestParams, NumberOrString, ProgressToken, RequestMetaObject};
use serde_json::json;

const PNG_1X1: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";

#[tokio::test]
async fn tools_list_is_the_checked_in_contract() {
    let f = Fixture::default().await;
    let info = serde_json::to_value(f.client.peer_info().expect("server info")).unwrap();
    assert_eq!(
        info["protocolVersion"], "2025-11-25",
        "initialize settles on the newest version with a handshake: {info}"
    );
    let tools = f.client.list_all_tools().await.expect("tools/list");
    let catalog = capsule_tool_schemas::catalog();
    assert_eq!(tools.len(), catalog.len());
    for (tool, spec) in tools.iter().zip(&catalog) {
        let served = serde_json::to_value(tool).unwrap();
        let golden = spec.definition();
        assert_eq!(served["name"], golden["name"]);
        assert_eq!(served["description"], golden["description"]);
        assert_eq!(served["inputSchema"], golden["inputSchema"], "{}", spec.name);
        assert_eq!(served["outputSchema"], golden["outputSchema"], "{}", spec.name);
        for hint in ["readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"] {
            assert_eq!(served["annotations"][hint], golden["annotations"][hint], "{} {hint}", spec.name);
        }
    }
    f.cleanup().await;
}

#[tokio::test]
async fn run_command_creates_the_default_sandbox_on_first_use_and_reuses_it() {
    let f = Fixture::default().await;
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 0);
    assert!(listed["default_sandbox_id"].is_null());

    let r = f.call("run_command", json!({"command": "echo hello; echo oops >&2; exit 3"})).await;
    let s = ok("run_command", &r);
    assert_eq!(s["exit_code"], 3);
    assert_eq!(s["stdout"], "hello\n");
    assert_eq!(s["stderr"], "oops\n");
    let t = text(&r);
    let (out, err, exit) = (t.find("hello").unwrap(), t.find("oops").unwrap(), t.find("exit code 3").unwrap());
    assert!(out < err && err < exit, "stdout, then stderr, then the ending: {t}");
    let id = id_of(&s);

    let s2 = ok("run_command", &f.call("run_command", json!({"command": "true"})).await);
    assert_eq!(s2["sandbox_id"], id.as_str());
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["default_sandbox_id"], id.as_str());
    assert_eq!(listed["sandboxes"][0]["is_default"], true);
    assert_eq!(listed["sandboxes"][0]["state"], "running");
    f.cleanup().await;
}

#[tokio::test]
async fn run_command_passes_stdin_env_cwd_and_sandbox_env() {
    let f = Fixture::default().await;
    let created = ok("create", &f.call("create_sandbox", json!({"env": {"FROM_SANDBOX": "sb"}, "name": "envy"})).await);
    let id = id_of(&created["sandbox"]);
    ok("mkdir", &f.call("run_command", json!({"command": "mkdir -p sub", "sandbox_id": id})).await);
    let s = ok(
        "run_command",
        &f.call(
            "run_command",
            json!({"command": "cat; echo \"$FROM_SANDBOX $FROM_CALL\"; basename \"$PWD\"", "sandbox_id": id,
                   "stdin": "fed\n", "env": {"FROM_CALL": "call"}, "cwd": "sub"}),
        )
        .await,
    );
    assert_eq!(s["stdout"], "fed\nsb call\nsub\n");
    f.cleanup().await;
}

#[tokio::test]
async fn a_timeout_returns_partial_output_as_an_actionable_error() {
    let f = Fixture::default().await;
    let r = f.call("run_command", json!({"command": "echo partial; sleep 30", "timeout_s": 1})).await;
    assert!(is_error(&r), "timeout must be an error result");
    let s = structured(&r);
    assert_eq!(s["timed_out"], true);
    assert_eq!(s["stdout"], "partial\n");
    let t = text(&r);
    assert!(t.contains("partial") && t.contains("timed out after 1 s") && t.contains("background=true"), "{t}");
    f.cleanup().await;
}

#[tokio::test]
async fn output_over_the_cap_is_cut_with_a_note_naming_the_full_output_file() {
    let f = Fixture::new(Settings { output_cap_bytes: 1000, ..Settings::default() }).await;
    let r = f.call("run_command", json!({"command": "head -c 50000 /dev/zero | tr '\\0' x; echo"})).await;
    let s = ok("run_command", &r);
    assert_eq!(s["stdout"].as_str().unwrap().len(), 1000);
    let cut = &s["truncated"][0];
    assert_eq!(cut["stream"], "stdout");
    assert_eq!(cut["shown_bytes"], 1000);
    assert_eq!(cut["total_bytes"], 50001);
    let t = text(&r);
    assert!(t.contains("stdout truncated: 1000 of 50001 bytes shown, 49001 cut"), "{t}");
    if let Some(path) = cut["full_output_path"].as_str() {
        assert!(t.contains(path), "{t}");
        let full = ok("read_file", &f.call("read_file", json!({"path": path})).await);
        assert_eq!(full["size"], 50001, "the full stream is kept in the sandbox");
    } else {
        eprintln!("note: this agent keeps no full-output file; the note says how to keep one");
    }
    f.cleanup().await;
}

#[tokio::test]
async fn background_processes_are_read_incrementally_and_killed() {
    let f = Fixture::default().await;
    let started = ok(
        "bg",
        &f.call("run_command", json!({"command": "echo one; sleep 0.3; echo two >&2; exit 4", "background": true}))
            .await,
    );
    let pid = started["pid"].as_u64().unwrap();
    let mut out = String::new();
    let mut err = String::new();
    let (mut so, mut se) = (0u64, 0u64);
    let finished = loop {
        let r = ok(
            "read_process",
            &f.call("read_process", json!({"pid": pid, "stdout_offset": so, "stderr_offset": se})).await,
        );
        out.push_str(r["stdout"].as_str().unwrap());
        err.push_str(r["stderr"].as_str().unwrap());
        so = r["next_stdout_offset"].as_u64().unwrap();
        se = r["next_stderr_offset"].as_u64().unwrap();
        if r["running"] == false {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(out, "one\n");
    assert_eq!(err, "two\n");
    assert_eq!(finished["exit_code"], 4);

    let sleeper = ok("bg", &f.call("run_command", json!({"command": "sleep 60", "background": true})).await);
    let pid = sleeper["pid"].as_u64().unwrap();
    let killed = ok("kill", &f.call("kill_process", json!({"pid": pid})).await);
    assert_eq!(killed["signal"], 9);
    let mut state = serde_json::Value::Null;
    for _ in 0..50 {
        state = ok("read_process", &f.call("read_process", json!({"pid": pid})).await);
        if state["running"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state["running"], false);
    assert_eq!(state["signal"], 9);
    assert_eq!(killed["delivered"], true);
    // Killing it again is not an error: it is gone already.
    let again = ok("kill again", &f.call("kill_process", json!({"pid": pid})).await);
    assert_eq!(again["delivered"], false);

    let missing = f.call("read_process", json!({"pid": 999_999})).await;
    assert!(is_error(&missing));
    assert!(text(&missing).contains("read_process failed"), "{}", text(&missing));
    f.cleanup().await;
}

#[tokio::test]
async fn files_round_trip_as_text_base64_and_images() {
    let f = Fixture::default().await;
    ok("write", &f.call("write_file", json!({"path": "dir/a.txt", "content": "hello\n"})).await);
    ok("append", &f.call("write_file", json!({"path": "dir/a.txt", "content": "world\n", "append": true})).await);
    let r = ok("read", &f.call("read_file", json!({"path": "dir/a.txt"})).await);
    assert_eq!(r["content"], "hello\nworld\n");
    assert_eq!(r["encoding"], "text");
    assert_eq!(r["has_more"], false);

    let piece = f.call("read_file", json!({"path": "dir/a.txt", "offset": 2, "limit": 3})).await;
    let p = ok("read piece", &piece);
    assert_eq!(p["content"], "llo");
    assert_eq!(p["has_more"], true);
    assert_eq!(p["next_offset"], 5);
    assert!(text(&piece).contains("offset=5"), "{}", text(&piece));

    ok(
        "script",
        &f.call("write_file", json!({"path": "run.sh", "content": "#!/bin/sh\necho ran\n", "mode": "755"})).await,
    );
    let ran = ok("exec", &f.call("run_command", json!({"command": "./run.sh"})).await);
    assert_eq!(ran["stdout"], "ran\n");

    let bin = base64::engine::general_purpose::STANDARD.encode([0u8, 1, 2, 255]);
    ok("bin", &f.call("write_file", json!({"path": "b.bin", "content": bin, "encoding": "base64"})).await);
    let b = ok("read bin", &f.call("read_file", json!({"path": "b.bin"})).await);
    assert_eq!(b["encoding"], "base64");
    assert_eq!(b["content"], bin.as_str());

    ok("png", &f.call("write_file", json!({"path": "p.png", "content": PNG_1X1, "encoding": "base64"})).await);
    let img = f.call("read_file", json!({"path": "p.png"})).await;
    let s = ok("read png", &img);
    assert_eq!(s["encoding"], "image");
    assert_eq!(s["mime_type"], "image/png");
    let image = img.content.iter().find_map(|c| c.as_image()).expect("image content");
    assert_eq!(image.mime_type, "image/png");
    assert_eq!(image.data, PNG_1X1);

    let listed = ok("list", &f.call("list_files", json!({"depth": 2})).await);
    let paths: Vec<&str> = listed["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    for want in ["dir", "dir/a.txt", "run.sh", "b.bin", "p.png"] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let shallow = ok("list", &f.call("list_files", json!({"path": "dir"})).await);
    assert_eq!(shallow["entries"][0]["path"], "a.txt");
    assert_eq!(shallow["entries"][0]["size"], 12);

    let missing = f.call("read_file", json!({"path": "nope.txt"})).await;
    assert!(is_error(&missing));
    assert!(text(&missing).contains("list_files"), "a missing file says what to do: {}", text(&missing));
    f.cleanup().await;
}

#[tokio::test]
async fn bad_parameters_are_error_results_and_unknown_tools_are_protocol_errors() {
    let f = Fixture::default().await;
    let r = f.call("run_command", json!({"comand": "ls"})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains("invalid parameters for run_command"), "{}", text(&r));
    let r = f.call("run_command", json!({"command": "ls", "timeout_s": 99999})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains("3600"), "{}", text(&r));
    let r = f.call("write_file", json!({"path": "x", "content": "%%%", "encoding": "base64"})).await;
    assert!(text(&r).contains("not valid base64"), "{}", text(&r));
    let r = f.call("write_file", json!({"path": "x", "content": "", "mode": "rwx"})).await;
    assert!(text(&r).contains("octal"), "{}", text(&r));
    let r = f.call("fork", json!({"count": 100})).await;
    assert!(is_error(&r));

    let params = CallToolRequestParams::new("no_such_tool").with_arguments(Default::default());
    let err = f.client.call_tool(params).await.expect_err("unknown tool is a JSON-RPC error");
    assert!(err.to_string().contains("no_such_tool"), "{err}");
    f.cleanup().await;
}

#[tokio::test]
async fn an_unknown_sandbox_id_lists_the_sessions_sandboxes() {
    let f = Fixture::default().await;
    let a = ok("create", &f.call("create_sandbox", json!({"name": "alpha"})).await);
    let a_id = id_of(&a["sandbox"]);
    let r = f.call("run_command", json!({"command": "true", "sandbox_id": "sb-000000000000"})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains("no sandbox \"sb-000000000000\""), "{t}");
    assert!(t.contains(&a_id) && t.contains("alpha"), "lists the session's sandboxes: {t}");
    assert!(t.contains("list_sandboxes"), "{t}");
    f.cleanup().await;
}

#[tokio::test]
async fn sessions_see_only_their_own_sandboxes() {
    let f = Fixture::default().await;
    let mine = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    let my_id = id_of(&mine);
    let (other, _) = connect(&f.manager, Owner::new("other-session"), &f.settings).await;
    let listed = ok("list", &call(&other, "list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 0);
    let r = call(&other, "run_command", json!({"command": "true", "sandbox_id": my_id})).await;
    assert!(is_error(&r), "another session's sandbox is unknown to this one");
    let r = call(&other, "kill_sandbox", json!({"sandbox_id": my_id})).await;
    assert!(is_error(&r));
    let theirs = ok("run", &call(&other, "run_command", json!({"command": "true"})).await);
    assert_ne!(theirs["sandbox_id"], my_id.as_str(), "each session gets its own default sandbox");
    let _ = other.cancel().await;
    f.cleanup().await;
}

#[tokio::test]
async fn a_paused_sandbox_resumes_transparently_on_the_next_call() {
    let f = Fixture::default().await;
    let s = ok("run", &f.call("run_command", json!({"command": "echo 1 > state.txt"})).await);
    let id = id_of(&s);
    let paused = ok("pause", &f.call("pause", json!({})).await);
    assert_eq!(paused["sandbox"]["state"], "paused");
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"][0]["state"], "paused");

    let r = ok("run", &f.call("run_command", json!({"command": "cat state.txt", "sandbox_id": id})).await);
    assert_eq!(r["stdout"], "1\n");
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"][0]["state"], "running");

    ok("pause", &f.call("pause", json!({"sandbox_id": id})).await);
    let resumed = ok("resume", &f.call("resume", json!({"sandbox_id": id})).await);
    assert_eq!(resumed["sandbox"]["state"], "running");

    let t = f.manager.registry().transitions(&id).unwrap();
    let states: Vec<&str> = t.iter().map(|(_, to, _)| to.as_str()).collect();
    assert_eq!(states, ["creating", "running", "paused", "running", "paused", "running"]);
    f.cleanup().await;
}

#[tokio::test]
async fn a_sandbox_cannot_be_paused_while_a_call_runs_in_it() {
    let f = Fixture::default().await;
    let (r, long) = f.call_during("sleep 1.5", "pause", json!({})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains("wait for them to finish"), "{}", text(&r));
    ok("long", &long.await.unwrap());
    f.cleanup().await;
}

#[tokio::test]
async fn fork_copies_files_into_independent_sandboxes() {
    let f = Fixture::default().await;
    let s = ok("run", &f.call("run_command", json!({"command": "echo base > f.txt"})).await);
    let parent = id_of(&s);
    ok("pause", &f.call("pause", json!({})).await);
    let forked = ok("fork", &f.call("fork", json!({"count": 2})).await);
    assert_eq!(forked["parent_id"], parent.as_str());
    let kids: Vec<String> = forked["sandboxes"].as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(kids.len(), 2);
    assert!(forked["note"].as_str().unwrap().contains("test engine"));
    for (i, kid) in kids.iter().enumerate() {
        let r = ok(
            "kid",
            &f.call("run_command", json!({"command": format!("cat f.txt; echo {i} > f.txt"), "sandbox_id": kid})).await,
        );
        assert_eq!(r["stdout"], "base\n");
    }
    let p = ok("parent", &f.call("run_command", json!({"command": "cat f.txt"})).await);
    assert_eq!(p["stdout"], "base\n", "children do not write into the parent");
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    let kid0 = listed["sandboxes"].as_array().unwrap().iter().find(|s| s["sandbox_id"] == kids[0].as_str()).unwrap();
    assert_eq!(kid0["parent_id"], parent.as_str());
    f.cleanup().await;
}

#[tokio::test]
async fn kill_sandbox_deletes_it_and_its_id_becomes_unknown() {
    let f = Fixture::default().await;
    let s = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    let id = id_of(&s);
    let dir = f.dir.path().join("sandboxes").join(&id);
    assert!(dir.exists());
    let killed = ok("kill", &f.call("kill_sandbox", json!({"sandbox_id": id})).await);
    assert_eq!(killed["sandbox"]["state"], "deleted");
    assert!(!dir.exists(), "its files are gone");
    let r = f.call("run_command", json!({"command": "true", "sandbox_id": id})).await;
    assert!(is_error(&r));
    let fresh = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    assert_ne!(fresh["sandbox_id"], id.as_str(), "a new default sandbox replaces the deleted one");
    f.cleanup().await;
}

#[tokio::test]
async fn limits_are_enforced_with_explanations() {
    let mut settings = Settings::default();
    settings.limits.max_sandboxes = 2;
    settings.limits.max_memory_mib = 2048;
    settings.limits.memory_budget_mib = 1536;
    let f = Fixture::new(settings).await;
    ok("one", &f.call("create_sandbox", json!({"memory_mib": 1024})).await);
    let r = f.call("create_sandbox", json!({"memory_mib": 1024})).await;
    assert!(is_error(&r));
    assert!(
        text(&r).contains("memory budget") && text(&r).contains("with pause or delete one with kill_sandbox"),
        "{}",
        text(&r)
    );
    ok("two", &f.call("create_sandbox", json!({"memory_mib": 256})).await);
    let r = f.call("create_sandbox", json!({"memory_mib": 256})).await;
    assert!(text(&r).contains("at most 2 sandboxes") && text(&r).contains("kill_sandbox"), "{}", text(&r));
    let r = f.call("create_sandbox", json!({"memory_mib": 4096})).await;
    assert!(text(&r).contains("128 to 2048"), "{}", text(&r));
    let r = f.call("create_sandbox", json!({"template": "gpu"})).await;
    assert!(text(&r).contains("unknown template"), "{}", text(&r));
    f.cleanup().await;
}

#[tokio::test]
async fn more_vcpus_than_the_host_allows_gets_an_explanation() {
    let f = Fixture::default().await;
    let host = capsule::engine::detect_host_limits();
    let r = f.call("create_sandbox", json!({"vcpus": host.max_vcpus + 1})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains(&format!("vcpus={}", host.max_vcpus + 1)), "{t}");
    if capsule_vmm::host::is_pvm() {
        assert!(t.contains("PVM") && t.contains("exactly one vCPU"), "{t}");
    }
    f.cleanup().await;
}

#[tokio::test]
async fn long_runs_send_progress_and_output_as_logging_notifications() {
    let f = Fixture::default().await;
    let mut params = CallToolRequestParams::new("run_command")
        .with_arguments(json!({"command": "echo first; sleep 2.5; echo second"}).as_object().unwrap().clone());
    params.meta = Some(RequestMetaObject::with_progress_token(ProgressToken(NumberOrString::Number(7))));
    let r = f.client.call_tool(params).await.unwrap();
    assert_eq!(structured(&r)["stdout"], "first\nsecond\n");
    let progress = f.heard.progress.lock().unwrap().clone();
    assert!(progress.len() >= 2, "expected progress every second, got {progress:?}");
    // The client may stamp its own token on the request; all notifications carry the request's one.
    assert!(progress.iter().all(|p| p.progress_token == progress[0].progress_token), "{progress:?}");
    assert!(progress.windows(2).all(|w| w[1].progress > w[0].progress), "progress increases");
    let logs = f.heard.logs.lock().unwrap().clone();
    let texts: String = logs.iter().filter_map(|l| l.data["text"].as_str()).collect();
    assert!(texts.contains("first") && texts.contains("second"), "{logs:?}");
    assert!(logs.iter().all(|l| l.logger.as_deref() == Some("output")));
    f.cleanup().await;
}

#[tokio::test]
async fn a_crashed_guest_is_reported_with_state_lost() {
    let f = Fixture::default().await;
    let s = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    let id = id_of(&s);
    let pid = agent_pid(&f.manager, &id);
    // SAFETY: killing the agent process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = f.call("run_command", json!({"command": "true", "sandbox_id": id})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains("state is lost") && t.contains("kill_sandbox"), "{t}");
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"][0]["state"], "failed");
    assert!(listed["sandboxes"][0]["failure"].as_str().unwrap().contains("crashed"));
    // Omitting the id now gives a fresh default sandbox.
    let fresh = ok("run", &f.call("run_command", json!({"command": "echo ok"})).await);
    assert_ne!(fresh["sandbox_id"], id.as_str());
    f.cleanup().await;
}

#[tokio::test]
async fn idle_sandboxes_pause_and_paused_ones_are_deleted_after_retention() {
    let mut settings = Settings::default();
    settings.timers.idle_pause_after = Duration::from_millis(300);
    settings.timers.retention = Duration::from_millis(900);
    let f = Fixture::new(settings).await;
    let timers = capsule::sandbox::timers::spawn(f.manager.clone());
    let s = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    let id = id_of(&s);
    let state = |f: &Fixture| {
        let (list, _) = f.manager.list(&Owner::new("test-session"));
        list.iter().find(|s| s.id == id).map(|s| s.state.as_str())
    };
    let mut seen_paused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match state(&f) {
            Some("paused") => seen_paused = true,
            None => break,
            _ => {}
        }
    }
    assert!(seen_paused, "the idle sandbox was paused");
    assert_eq!(state(&f), None, "the paused sandbox was deleted after retention");
    let t = f.manager.registry().transitions(&id).unwrap();
    assert!(t.iter().any(|(_, to, why)| to == "paused" && why.starts_with("idle")), "{t:?}");
    assert!(t.iter().any(|(_, to, why)| to == "deleted" && why.contains("retention")), "{t:?}");
    timers.abort();
    f.cleanup().await;
}

#[tokio::test]
async fn after_a_restart_paused_sandboxes_resume_and_dead_ones_are_marked_failed() {
    let settings = Settings::default();
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &settings);
    let (client, _) = connect(&manager, Owner::new("test-session"), &settings).await;
    let a = ok("a", &call(&client, "run_command", json!({"command": "echo kept > k.txt"})).await);
    let a_id = id_of(&a);
    let b = ok("b", &call(&client, "create_sandbox", json!({"name": "doomed"})).await);
    let b_id = id_of(&b["sandbox"]);
    let c = ok("c", &call(&client, "create_sandbox", json!({"name": "left running"})).await);
    let c_id = id_of(&c["sandbox"]);
    ok("pause a", &call(&client, "pause", json!({})).await);
    ok("pause b", &call(&client, "pause", json!({"sandbox_id": b_id})).await);
    let b_pid = agent_pid(&manager, &b_id);
    // The server goes away without cleaning up; b's VM dies while it is down.
    let _ = client.cancel().await;
    drop(manager);
    // SAFETY: killing the agent process this test started.
    unsafe { libc::kill(b_pid, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let manager = open_manager(dir.path(), &settings);
    let (client, _) = connect(&manager, Owner::new("test-session"), &settings).await;
    let listed = ok("list", &call(&client, "list_sandboxes", json!({})).await);
    let find =
        |id: &str| listed["sandboxes"].as_array().unwrap().iter().find(|s| s["sandbox_id"] == id).unwrap().clone();
    assert_eq!(find(&a_id)["state"], "paused");
    assert_eq!(listed["default_sandbox_id"], a_id.as_str(), "the default sandbox survives the restart");
    assert_eq!(find(&b_id)["state"], "failed");
    assert!(find(&b_id)["failure"].as_str().unwrap().contains("lost while the server was down"));
    assert_eq!(find(&c_id)["state"], "running", "a running sandbox whose VM lived on is adopted again");
    let rc = ok(
        "c after restart",
        &call(&client, "run_command", json!({"command": "echo still", "sandbox_id": c_id})).await,
    );
    assert_eq!(rc["stdout"], "still\n");
    let r = ok("resume by call", &call(&client, "run_command", json!({"command": "cat k.txt"})).await);
    assert_eq!(r["stdout"], "kept\n");
    assert_eq!(r["sandbox_id"], a_id.as_str());
    manager.kill_all().await;
    let _ = client.cancel().await;
}

#[tokio::test]
async fn run_code_keeps_state_returns_results_errors_and_plots() {
    let f = Fixture::default().await;
    let r = f.call("run_code", json!({"code": "x = 6 * 7\nx"})).await;
    if run_code_unavailable(&r) {
        f.cleanup().await;
        return;
    }
    let s = ok("run_code", &r);
    assert_eq!(s["results"][0]["text"], "42");
    assert_eq!(s["execution_count"], 1);
    let s = ok("again", &f.call("run_code", json!({"code": "print(x + 1)"})).await);
    assert_eq!(s["stdout"], "43\n", "variables persist between cells");
    let e = f.call("run_code", json!({"code": "1/0"})).await;
    let s = structured(&e);
    assert_eq!(s["error"]["name"], "ZeroDivisionError");
    assert!(text(&e).contains("ZeroDivisionError"), "{}", text(&e));
    let plot = f
        .call(
            "run_code",
            json!({"code": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([1,2,3])\nplt.show()"}),
        )
        .await;
    let have_matplotlib = plot.content.iter().any(|c| c.as_image().is_some());
    if have_matplotlib {
        let img = plot.content.iter().find_map(|c| c.as_image()).unwrap();
        assert_eq!(img.mime_type, "image/png");
    } else {
        eprintln!("SKIP: plot image: matplotlib is not installed on this host ({})", text(&plot));
    }
    let many = f
        .call(
            "run_code",
            json!({"code": "for i in range(10):\n    plt.figure()\n    plt.plot([i, i + 1])\nplt.show()"}),
        )
        .await;
    let shown = many.content.iter().filter(|c| c.as_image().is_some()).count();
    if have_matplotlib {
        assert_eq!(shown, 8, "{}", text(&many));
        assert!(text(&many).contains("2 more image(s) left out"), "{}", text(&many));
        assert_eq!(structured(&many)["images_left_out"], 2);
    }
    assert_eq!(structured(&many)["results_left_out"], 0);
    let js = f.call("run_code", json!({"code": "1 + 2", "language": "javascript"})).await;
    if !is_error(&js) {
        assert_eq!(structured(&js)["results"][0]["text"], "3");
    }
    f.cleanup().await;
}

#[tokio::test]
async fn concurrent_first_calls_share_one_default_sandbox_and_creates_respect_the_limit() {
    let mut settings = Settings::default();
    settings.limits.max_sandboxes = 3;
    let f = Fixture::new(settings).await;
    let calls: Vec<_> = (0..4).map(|_| f.spawn_call("run_command", json!({"command": "true"}))).collect();
    let mut ids = std::collections::HashSet::new();
    for c in calls {
        ids.insert(id_of(&ok("run", &c.await.unwrap())));
    }
    assert_eq!(ids.len(), 1, "one default sandbox, however many first calls race");

    let creates: Vec<_> = (0..4).map(|_| f.spawn_call("create_sandbox", json!({}))).collect();
    let mut made = 0;
    for c in creates {
        let r = c.await.unwrap();
        if is_error(&r) {
            assert!(text(&r).contains("at most 3 sandboxes"), "{}", text(&r));
        } else {
            made += 1;
        }
    }
    assert_eq!(made, 2, "the limit holds under concurrent creates");
    f.cleanup().await;
}

#[tokio::test]
async fn a_guest_that_dies_during_a_call_fails_the_call_with_state_lost() {
    let f = Fixture::default().await;
    let s = ok("run", &f.call("run_command", json!({"command": "true"})).await);
    let id = id_of(&s);
    let pid = agent_pid(&f.manager, &id);
    let running = f.spawn_call("run_command", json!({"command": "sleep 20"}));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SAFETY: killing the agent process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let r = tokio::time::timeout(Duration::from_secs(10), running).await.expect("the call ends").unwrap();
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains("crashed") && t.contains("state is lost"), "{t}");
    ok("kill", &f.call("kill_sandbox", json!({"sandbox_id": id})).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            let fields: Vec<&str> = after.split_whitespace().collect();
            fields.get(3) == Some(&pid.to_string().as_str()) && fields[0] != "Z"
        })
        .collect();
    assert!(left.is_empty(), "kill_sandbox also kills what the dead agent left running: {left:?}");
    f.cleanup().await;
}

#[tokio::test]
async fn a_sandbox_cannot_be_forked_while_a_call_runs_in_it() {
    let f = Fixture::default().await;
    let (r, long) = f.call_during("sleep 1.5; echo survived", "fork", json!({})).await;
    assert!(is_error(&r), "fork must not cut off the running call");
    assert!(text(&r).contains("call(s) are running") && text(&r).contains("then fork"), "{}", text(&r));
    let survived = ok("long", &long.await.unwrap());
    assert_eq!(survived["stdout"], "survived\n");
    let listed = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 1, "no child was made");
    ok("fork after the call", &f.call("fork", json!({})).await);
    f.cleanup().await;
}

/// Polls `fut` exactly once, then drops it, as a caller that goes away does.
/// Returns whether it was still pending. (A timeout of zero is not the same:
/// the timer rounds its deadline up, so it may poll the future again later.)
fn pending_after_one_poll<F: std::future::Future>(fut: F) -> bool {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.as_mut().poll(&mut cx).is_pending()
}

#[tokio::test]
async fn a_pause_or_create_whose_caller_goes_away_still_completes_and_is_recorded() {
    let f = Fixture::default().await;
    let owner = Owner::new("test-session");
    let s = ok("run", &f.call("run_command", json!({"command": "echo 1 > state.txt"})).await);
    let id = id_of(&s);
    // The caller's future is dropped right after its first poll, while the engine pauses the machine.
    assert!(
        pending_after_one_poll(f.manager.pause(&owner, Some(&id))),
        "the pause was still in progress when its caller went away"
    );
    assert!(
        pending_after_one_poll(f.manager.create(&owner, Default::default())),
        "the create was still in progress when its caller went away"
    );
    let mut states = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (list, _) = f.manager.list(&owner);
        states = list.iter().map(|s| (s.id.clone(), s.state.as_str())).collect();
        if states.len() == 2 && states.iter().all(|(_, st)| *st != "creating") && states[0].1 == "paused" {
            break;
        }
    }
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[0], (id.clone(), "paused"), "the paused VM is recorded as paused: {states:?}");
    assert_eq!(states[1].1, "running", "the new sandbox finished starting: {states:?}");
    let transitions = f.manager.registry().transitions(&id).unwrap();
    assert_eq!(transitions.last().map(|(_, to, _)| to.as_str()), Some("paused"));
    let r = ok("resume by call", &f.call("run_command", json!({"command": "cat state.txt", "sandbox_id": id})).await);
    assert_eq!(r["stdout"], "1\n");
    f.cleanup().await;
}

#[tokio::test]
async fn per_session_bookkeeping_is_forgotten_when_sessions_and_their_sandboxes_end() {
    let f = Fixture::default().await;
    for n in 0..5 {
        let (session, _) = connect(&f.manager, Owner::new(format!("http-gone-{n}")), &f.settings).await;
        let s = ok("run", &call(&session, "run_command", json!({"command": "true"})).await);
        let r = call(&session, "pause", json!({})).await;
        assert!(!is_error(&r), "{}", text(&r));
        ok("kill", &call(&session, "kill_sandbox", json!({"sandbox_id": s["sandbox_id"]})).await);
        let _ = session.cancel().await;
    }
    assert_eq!(f.manager.owner_entries(), (0, 0), "no owner keeps an entry once its sandboxes are gone");
    f.cleanup().await;
}

#[tokio::test]
async fn sandboxes_orphaned_by_a_restart_are_seen_by_shared_sessions_and_deleted_after_retention() {
    let mut settings = Settings::default();
    settings.timers.retention = Duration::from_millis(1500);
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &settings);
    // An HTTP session's owner id names the server's boot: no session after a restart has it.
    let (client, _) = connect(&manager, Owner::new("http-18f00000000-0"), &settings).await;
    let s = ok("run", &call(&client, "run_command", json!({"command": "true"})).await);
    let id = id_of(&s);
    let _ = client.cancel().await;
    manager.pause_all().await;
    drop(manager);

    let manager = open_manager(dir.path(), &settings);
    let (fresh, _) = connect(&manager, Owner::new("http-18f00000001-0"), &settings).await;
    let listed = ok("list", &call(&fresh, "list_sandboxes", json!({})).await);
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 0, "a new session does not see the orphan");
    let shared = Owner { id: "http-shared".into(), sees_all: true };
    let (list, _) = manager.list(&shared);
    assert!(list.iter().any(|s| s.id == id && s.state.as_str() == "paused"), "{list:?}");
    let timers = capsule::sandbox::timers::spawn(manager.clone());
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if manager.list(&shared).0.iter().all(|s| s.id != id) {
            gone = true;
            break;
        }
    }
    assert!(gone, "the orphan was deleted after the retention period");
    let t = manager.registry().transitions(&id).unwrap();
    assert!(t.iter().any(|(_, to, why)| to == "deleted" && why.contains("retention")), "{t:?}");
    assert_eq!(manager.owner_entries(), (0, 0));
    timers.abort();
    manager.kill_all().await;
    let _ = fresh.cancel().await;
}

#[tokio::test]
async fn run_code_that_floods_results_and_output_returns_a_bounded_result_with_notes() {
    let f = Fixture::new(Settings { output_cap_bytes: 4000, ..Settings::default() }).await;
    let r = f
        .call("run_code", json!({"code": "for i in range(10000):\n    display(i)\nprint('x' * 200000)\n'done'"}))
        .await;
    if run_code_unavailable(&r) {
        f.cleanup().await;
        return;
    }
    let s = ok("run_code", &r);
    let results = s["results"].as_array().unwrap();
    let max = capsule::mcp::code::MAX_RESULTS_PER_CALL as usize;
    assert_eq!(results.len(), max + 1, "the displays up to the cap, plus the cell's value");
    assert_eq!(results[0]["text"], "0");
    assert_eq!(results[max]["text"], "'done'");
    assert_eq!(results[max]["is_main_result"], true);
    let t = text(&r);
    assert!(t.contains(&format!("[{} more result(s) left out", 10_000 - max)), "{t}");
    assert_eq!(s["results_left_out"], (10_000 - max) as u64, "the count is also in structuredContent");
    assert_eq!(s["images_left_out"], 0);
    assert!(s["stdout"].as_str().unwrap().len() <= 4000);
    assert!(t.contains("stdout truncated"), "{t}");

    let big = f.call("run_code", json!({"code": "'y' * 100000"})).await;
    let value = structured(&big)["results"][0]["text"].as_str().unwrap().to_string();
    assert!(
        value.len() < 4200 && value.contains("[text/plain cut: 4000 of 100002 bytes shown"),
        "{}",
        &value[value.len() - 200..]
    );
    f.cleanup().await;
}
