//! Containment against the real agent binary run as a host process with its
//! own cgroup subtree (`--cgroup-root`, a test-owned cgroup v2 directory):
//! where commands and contexts run, what dies with a command, and the pids
//! and memory limits with what they report. Tests that need cgroup v2 (and,
//! for limits, the pids and memory controllers) skip with a reason when this
//! host has none; `CAPSULE_REQUIRE_CGROUPS=1` makes those skips failures.

mod fixture;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsule_agent::client::{AgentClient, ClientError, Incoming};
use capsule_agent::context::RESTART_ERROR_NAME;
use capsule_agent::protocol::{
    CodeOutcome, ErrorKind, Event, ExecRequest, Language, LimitHit, Op, ProcessLimits, ProcessOutput, Reply, Request,
    RunCodeRequest,
};
use fixture::cgroups::{cgroup_or_skip, v2_path, Need};
use fixture::{eventually, process_alive, read_pid_file, TestAgent};

const T: Option<Duration> = Some(Duration::from_secs(60));
const MIB: u64 = 1024 * 1024;

fn limits(pids_max: Option<u32>, memory_max_bytes: Option<u64>) -> Option<ProcessLimits> {
    Some(ProcessLimits { pids_max, memory_max_bytes })
}

/// The cgroup a command of `c` runs in, as `/proc/self/cgroup` names it.
fn command_cgroup(c: &AgentClient) -> String {
    let out = c.exec(ExecRequest::shell("cat /proc/self/cgroup"), T).unwrap();
    v2_path(&String::from_utf8(out.stdout).unwrap())
}

fn cell(
    c: &AgentClient,
    context: &str,
    language: Language,
    code: &str,
    limits: Option<ProcessLimits>,
) -> (Vec<Event>, CodeOutcome) {
    let op = Op::RunCode(RunCodeRequest {
        context: context.into(),
        language,
        code: code.into(),
        output_cap_bytes: None,
        limits,
    });
    match c.call(op, Some(Duration::from_secs(120))).unwrap() {
        (events, Reply::CodeDone(outcome)) => (events, outcome),
        other => panic!("unexpected {other:?}"),
    }
}

fn stdout_of(events: &[Event]) -> String {
    let mut out = Vec::new();
    for e in events {
        if let Event::Output { stream: capsule_agent::protocol::Stream::Stdout, data } = e {
            out.extend_from_slice(data);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn main_value(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::Result(r) if r.is_main_result => {
            r.data.iter().find(|(m, _)| m == "text/plain").map(|(_, d)| String::from_utf8_lossy(d).into_owned())
        }
        _ => None,
    })
}

fn python_available() -> bool {
    std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
}

fn started(reply: Reply) -> u32 {
    match reply {
        Reply::Started { pid } => pid,
        other => panic!("unexpected {other:?}"),
    }
}

fn read_output(c: &AgentClient, pid: u32) -> ProcessOutput {
    let op = Op::ReadProcessOutput { pid, stdout_offset: 0, stderr_offset: 0, max_bytes: 1 << 20 };
    match c.call_reply(op, T).unwrap() {
        Reply::ProcessOutput(o) => o,
        other => panic!("unexpected {other:?}"),
    }
}

/// Pids of the processes in a cgroup directory (empty when it is gone).
fn procs(cgroup: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[test]
fn commands_and_contexts_get_their_own_cgroups_beside_the_agents() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let agent = TestAgent::start_in(&cg);
    let (c, hello) = AgentClient::connect_unix(&agent.socket).unwrap();
    assert!(hello.capabilities.iter().any(|c| c == "cgroups"), "{hello:?}");
    let agent_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).unwrap();
    assert_eq!(cg.host_path(&agent_cgroup), cg.path.join("agent"), "the agent moved itself into agent/");
    let first = command_cgroup(&c);
    let second = command_cgroup(&c);
    assert!(cg.host_path(&first).starts_with(cg.path.join("workloads")), "{first}");
    assert_ne!(first, second, "one cgroup per command");
    assert!(!cg.host_path(&first).exists(), "a finished command's cgroup is removed");
    if python_available() {
        let (events, _) = cell(&c, "py", Language::Python, "print(open('/proc/self/cgroup').read().strip())", None);
        let ctx = stdout_of(&events);
        assert!(ctx.contains("/workloads/ctx-"), "{ctx}");
        assert!(cg.host_path(&ctx).exists(), "a context's cgroup lives with its interpreter");
    }
}

#[test]
fn what_a_foreground_command_leaves_running_is_killed_and_counted() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let pid_file = agent.work.join("escaped.pid");
    // setsid leaves the process group, the subshell leaves the shell: both
    // escape a process-group kill, neither escapes the cgroup.
    let script = format!("setsid sleep 300 & echo $! > {f}; (sleep 300 &); echo done", f = pid_file.display());
    let start = Instant::now();
    let out = c.exec(ExecRequest::shell(&script), T).unwrap();
    assert_eq!((out.status.code, &out.stdout[..]), (Some(0), &b"done\n"[..]));
    assert_eq!(out.status.escaped_killed, 2, "{:?}", out.status);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    let escaped = read_pid_file(&pid_file);
    assert!(eventually(Duration::from_secs(5), || !process_alive(escaped)), "the setsid child {escaped} survived");
    let clean = c.exec(ExecRequest::shell("echo quiet"), T).unwrap();
    assert_eq!(clean.status.escaped_killed, 0);
    assert_eq!(clean.status.limit, None);
}

#[test]
fn a_timeout_or_a_cancel_kills_processes_that_left_the_process_group() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let pid_file = agent.work.join("timeout.pid");
    let script = format!("setsid sleep 300 & echo $! > {}; sleep 300", pid_file.display());
    let out = c.exec(ExecRequest::shell(&script), Some(Duration::from_millis(500))).unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.escaped_killed, 2, "the setsid sleep and the shell's own sleep died with it");
    let escaped = read_pid_file(&pid_file);
    assert!(eventually(Duration::from_secs(5), || !process_alive(escaped)), "{escaped} survived the timeout");

    let pid_file = agent.work.join("cancel.pid");
    let script = format!("setsid sleep 300 & echo $! > {}; sleep 300", pid_file.display());
    let (tx, rx) = mpsc::channel();
    let req = Request { timeout_ms: None, op: Op::Exec(ExecRequest::shell(&script)) };
    let handle = c.start(req, Box::new(move |i| drop(tx.send(i)))).unwrap();
    let escaped = read_pid_file(&pid_file);
    handle.cancel().unwrap();
    let last = loop {
        let i = rx.recv_timeout(Duration::from_secs(10)).expect("a final frame");
        if i.is_final() {
            break i;
        }
    };
    assert!(matches!(last, Incoming::Failed(ref e) if e.kind == ErrorKind::Cancelled), "{last:?}");
    assert!(eventually(Duration::from_secs(5), || !process_alive(escaped)), "{escaped} survived the cancel");
}

#[test]
fn a_background_loop_killed_by_signal_leaves_no_process_behind() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let where_file = agent.work.join("where");
    // Slow enough for a host without a pids controller; setsid ones escape the group.
    let script = format!(
        "cat /proc/self/cgroup > {}; while true; do sleep 1 & setsid sleep 300 & sleep 0.05; done",
        where_file.display()
    );
    let pid =
        started(c.call_reply(Op::Exec(ExecRequest { background: true, ..ExecRequest::shell(&script) }), T).unwrap());
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&where_file).is_ok_and(|s| s.ends_with('\n')))
    );
    let cgroup = cg.host_path(&std::fs::read_to_string(&where_file).unwrap());
    assert!(eventually(Duration::from_secs(10), || procs(&cgroup).len() >= 10), "the loop never got going");
    let seen = procs(&cgroup);
    c.call_reply(Op::Signal { pid, signal: 9 }, T).unwrap();
    assert!(eventually(Duration::from_secs(10), || read_output(&c, pid).exit.is_some()), "no exit");
    let exit = read_output(&c, pid).exit.unwrap();
    assert_eq!(exit.signal, Some(9));
    assert!(exit.escaped_killed >= 9, "{exit:?}");
    assert!(eventually(Duration::from_secs(10), || seen.iter().all(|p| !process_alive(*p))), "some survived: {seen:?}");
    assert!(eventually(Duration::from_secs(10), || !cgroup.exists()), "its cgroup was not removed");
}

#[test]
fn a_background_cgroup_outlives_its_leader_until_it_is_killed() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let pid_file = agent.work.join("daemon.pid");
    let script = format!("setsid sleep 300 & echo $! > {}; echo started", pid_file.display());
    let pid =
        started(c.call_reply(Op::Exec(ExecRequest { background: true, ..ExecRequest::shell(&script) }), T).unwrap());
    let daemon = read_pid_file(&pid_file);
    assert!(eventually(Duration::from_secs(10), || read_output(&c, pid).exit.is_some()), "the leader exits");
    std::thread::sleep(Duration::from_millis(500));
    assert!(process_alive(daemon), "what a background leader started lives on");
    // A leader that exited: signal 15 reaches what it left running...
    c.call_reply(Op::Signal { pid, signal: 15 }, T).unwrap();
    assert!(eventually(Duration::from_secs(5), || !process_alive(daemon)), "signal 15 did not reach {daemon}");
    // ...and once nothing is left, there is nothing to signal.
    assert!(eventually(Duration::from_secs(5), || {
        matches!(c.call_reply(Op::Signal { pid, signal: 15 }, T), Err(ClientError::Agent(ref e)) if e.kind == ErrorKind::NotFound)
    }));
}

#[test]
fn the_handshake_states_the_guest_limits_and_requests_are_checked_against_them() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let agent = TestAgent::start_in(&cg);
    let (c, hello) = AgentClient::connect_unix(&agent.socket).unwrap();
    let containment = hello.containment.expect("containment with the controllers on");
    assert_eq!(containment.default_pids_max, 1024);
    assert!(containment.max_memory_max_bytes >= containment.default_memory_max_bytes);
    let workloads = cg.path.join("workloads");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    assert_eq!(read(&workloads.join("pids.max")), containment.max_pids_max.to_string());
    assert_eq!(read(&workloads.join("memory.max")), containment.max_memory_max_bytes.to_string());
    assert_ne!(read(&cg.path.join("agent/memory.min")), "0", "memory is reserved for the agent");

    let mut req = ExecRequest::shell("cat /proc/self/cgroup; sleep 0.2");
    req.limits = limits(Some(77), Some(50 * MIB));
    let (tx, rx) = mpsc::channel();
    c.start(Request { timeout_ms: None, op: Op::Exec(req) }, Box::new(move |i| drop(tx.send(i)))).unwrap();
    let Incoming::Event(Event::Output { data, .. }) = rx.recv_timeout(Duration::from_secs(10)).unwrap() else {
        panic!("no output")
    };
    let dir = cg.host_path(&String::from_utf8(data).unwrap());
    assert_eq!(read(&dir.join("pids.max")), "77");
    assert_eq!(read(&dir.join("memory.max")), (50 * MIB).to_string());
    assert_eq!(read(&dir.join("memory.high")), (50 * MIB * 90 / 100 / 4096 * 4096).to_string(), "90% of max");

    let default = command_cgroup(&c);
    assert!(default.contains("/workloads/exec-"));
    for (bad, kind) in [
        (limits(Some(0), None), ErrorKind::InvalidArgument),
        (limits(Some(containment.max_pids_max + 1), None), ErrorKind::InvalidArgument),
        (limits(None, Some(1)), ErrorKind::InvalidArgument),
        (limits(None, Some(containment.max_memory_max_bytes + 1)), ErrorKind::InvalidArgument),
    ] {
        let mut req = ExecRequest::shell("true");
        req.limits = bad;
        let err = c.exec(req, T).unwrap_err();
        assert!(matches!(err, ClientError::Agent(ref e) if e.kind == kind), "{bad:?}: {err:?}");
    }
}

#[test]
fn a_small_pids_limit_stops_the_command_and_says_so() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let mut req = ExecRequest::shell("for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; wait");
    req.limits = limits(Some(5), None);
    let start = Instant::now();
    let out = c.exec(req, T).unwrap();
    assert_eq!(out.status.limit, Some(LimitHit::Pids { max: 5 }), "{:?}", out.status);
    assert_eq!(out.status.signal, Some(9), "stopped by the agent");
    assert!(!out.status.timed_out);
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
}

#[test]
fn a_fork_bomb_is_stopped_by_the_pids_limit_and_the_agent_answers_at_once() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    // The classic: its shell exits at once, the bomb runs on without it.
    let start = Instant::now();
    let out = c.exec(ExecRequest::shell("bomb(){ bomb|bomb& }; bomb"), Some(Duration::from_secs(20))).unwrap();
    assert!(start.elapsed() < Duration::from_secs(25), "took {:?}", start.elapsed());
    assert!(
        out.status.limit == Some(LimitHit::Pids { max: 1024 }) || out.status.escaped_killed > 0,
        "the bomb was neither stopped at its limit nor killed as escaped: {:?}",
        out.status
    );
    let answered = Instant::now();
    let ok = c.exec(ExecRequest::shell("echo ok"), Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ok.stdout, b"ok\n");
    assert!(answered.elapsed() < Duration::from_secs(5), "echo ok took {:?}", answered.elapsed());
    // A bomb whose shell stays: it reaches the default limit of 1024 and is stopped for it.
    let start = Instant::now();
    let out =
        c.exec(ExecRequest::shell("bomb(){ bomb|bomb& }; bomb; sleep 60"), Some(Duration::from_secs(50))).unwrap();
    assert_eq!(out.status.limit, Some(LimitHit::Pids { max: 1024 }), "{:?}", out.status);
    assert!(!out.status.timed_out, "stopped at the limit, not at the timeout: {:?}", start.elapsed());
    let answered = Instant::now();
    assert_eq!(c.exec(ExecRequest::shell("echo ok"), Some(Duration::from_secs(5))).unwrap().stdout, b"ok\n");
    assert!(answered.elapsed() < Duration::from_secs(5), "echo ok took {:?}", answered.elapsed());
    let workloads = cg.path.join("workloads");
    let children = || std::fs::read_dir(&workloads).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert!(eventually(Duration::from_secs(10), || children() == 0), "workload cgroups are left behind");
}

#[test]
fn the_brief_background_loop_under_a_pids_limit_is_killed_whole_by_signal() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let where_file = agent.work.join("loop-where");
    let script = format!("cat /proc/self/cgroup > {}; while true; do sleep 1 & done", where_file.display());
    let mut req = ExecRequest { background: true, ..ExecRequest::shell(&script) };
    req.limits = limits(Some(256), None);
    let pid = started(c.call_reply(Op::Exec(req), T).unwrap());
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&where_file).is_ok_and(|s| s.ends_with('\n')))
    );
    let cgroup = cg.host_path(&std::fs::read_to_string(&where_file).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    // Either it is still looping (then Signal kills it) or it hit 256 and the agent stopped it.
    let _ = c.call_reply(Op::Signal { pid, signal: 9 }, T);
    assert!(eventually(Duration::from_secs(10), || read_output(&c, pid).exit.is_some()));
    assert!(eventually(Duration::from_secs(10), || !cgroup.exists()), "{} remains", cgroup.display());
    assert_eq!(c.call_reply(Op::Ping, Some(Duration::from_secs(5))).unwrap(), Reply::Pong);
}

#[test]
fn a_memory_hog_is_oom_killed_while_the_agent_and_a_python_context_survive() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    if !python_available() {
        eprintln!("SKIP: no python3");
        return;
    }
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let (_, outcome) = cell(&c, "keep", Language::Python, "kept = 41", None);
    assert!(!outcome.context_restarted);
    let mut req =
        ExecRequest::argv(&["python3", "-c", "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))"]);
    req.limits = limits(None, Some(64 * MIB));
    let out = c.exec(req, Some(Duration::from_secs(120))).unwrap();
    assert_eq!(out.status.limit, Some(LimitHit::Memory { max_bytes: 64 * MIB }), "{:?}", out.status);
    assert_eq!(out.status.signal, Some(9), "the out-of-memory killer's SIGKILL");
    assert_eq!(c.call_reply(Op::Ping, Some(Duration::from_secs(5))).unwrap(), Reply::Pong);
    let (events, outcome) = cell(&c, "keep", Language::Python, "kept + 1", None);
    assert_eq!(main_value(&events).as_deref(), Some("42"), "{events:?}");
    assert!(!outcome.context_restarted && outcome.limit.is_none(), "{outcome:?}");
    // A shell that survives its killed child still reports the kill.
    let mut req = ExecRequest::shell("python3 -c \"x = b'x' * (200 << 20)\"; echo after $?");
    req.limits = limits(None, Some(64 * MIB));
    let out = c.exec(req, Some(Duration::from_secs(120))).unwrap();
    assert_eq!(out.stdout, b"after 137\n");
    assert_eq!((out.status.code, out.status.limit), (Some(0), Some(LimitHit::Memory { max_bytes: 64 * MIB })));
}

#[test]
fn a_cell_that_fork_bombs_is_reported_killed_and_restarts_while_another_context_keeps_its_state() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let has_python = python_available();
    if has_python {
        cell(&c, "other", Language::Python, "y = 7", None);
    }
    let (_, outcome) = cell(&c, "sh", Language::Bash, "z=1", limits(Some(128), None));
    assert!(!outcome.context_restarted);
    let start = Instant::now();
    let (events, outcome) = cell(&c, "sh", Language::Bash, "bomb(){ bomb|bomb& }; bomb; sleep 60", None);
    assert_eq!(outcome.limit, Some(LimitHit::Pids { max: 128 }), "{outcome:?}");
    assert!(outcome.context_restarted);
    assert!(start.elapsed() < Duration::from_secs(50), "took {:?}", start.elapsed());
    let restart = events.iter().find_map(|e| match e {
        Event::Error(e) if e.name == RESTART_ERROR_NAME => Some(e.value.clone()),
        _ => None,
    });
    assert!(restart.as_deref().is_some_and(|v| v.contains("pids limit")), "{events:?}");
    let (events, outcome) = cell(&c, "sh", Language::Bash, "echo ${z:-fresh}", None);
    assert_eq!(stdout_of(&events), "fresh\n", "a fresh interpreter");
    assert!(outcome.limit.is_none());
    // The context keeps its limits across the restart; other limits are refused.
    let err = c.call(
        Op::RunCode(RunCodeRequest {
            context: "sh".into(),
            language: Language::Bash,
            code: "true".into(),
            output_cap_bytes: None,
            limits: limits(Some(64), None),
        }),
        T,
    );
    assert!(matches!(err, Err(ClientError::Agent(ref e)) if e.kind == ErrorKind::InvalidArgument), "{err:?}");
    if has_python {
        let (events, outcome) = cell(&c, "other", Language::Python, "y", None);
        assert_eq!(main_value(&events).as_deref(), Some("7"));
        assert!(!outcome.context_restarted);
        let (events, outcome) = cell(
            &c,
            "bombpy",
            Language::Python,
            "import os\nos.system('bomb(){ bomb|bomb& }; bomb; sleep 60')",
            limits(Some(64), None),
        );
        assert_eq!(outcome.limit, Some(LimitHit::Pids { max: 64 }), "{outcome:?} {events:?}");
        assert!(outcome.context_restarted);
    }
}

#[test]
fn a_cell_that_hogs_memory_is_oom_killed_and_restarts() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    if !python_available() {
        eprintln!("SKIP: no python3");
        return;
    }
    let agent = TestAgent::start_in(&cg);
    let c = agent.connect();
    let small = limits(None, Some(96 * MIB));
    cell(&c, "hog", Language::Python, "state = 'old'", small);
    let (events, outcome) =
        cell(&c, "hog", Language::Python, "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))", None);
    assert_eq!(outcome.limit, Some(LimitHit::Memory { max_bytes: 96 * MIB }), "{outcome:?} {events:?}");
    assert!(outcome.context_restarted);
    let restart = events.iter().find_map(|e| match e {
        Event::Error(e) if e.name == RESTART_ERROR_NAME => Some(e.value.clone()),
        _ => None,
    });
    assert!(restart.as_deref().is_some_and(|v| v.contains("out-of-memory killer at 96 MiB")), "{events:?}");
    let (events, _) = cell(&c, "hog", Language::Python, "'state' in globals()", None);
    assert_eq!(main_value(&events).as_deref(), Some("False"), "the state went with the interpreter");
}

#[test]
fn limits_that_cannot_be_enforced_are_refused_not_ignored() {
    let agent = TestAgent::start();
    let (c, hello) = AgentClient::connect_unix(&agent.socket).unwrap();
    assert!(hello.containment.is_none() && !hello.capabilities.iter().any(|c| c == "cgroups"));
    let mut req = ExecRequest::shell("true");
    req.limits = limits(Some(10), None);
    let err = c.exec(req, T).unwrap_err();
    assert!(matches!(err, ClientError::Agent(ref e) if e.kind == ErrorKind::Unsupported), "{err:?}");
    let mut defaults = ExecRequest::shell("true");
    defaults.limits = limits(None, None);
    assert_eq!(c.exec(defaults, T).unwrap().status.code, Some(0), "asking for the defaults is fine");
}
