//! PID 1 mode, for real, inside a fresh pid + mount + uts namespace
//! (`unshare`): the agent mounts the API filesystems, builds the overlay root
//! over the (host's) read-only-used root and pivots into it, prints its
//! console lines, reaps orphans, and powers "off" (reboot(2) in a child pid
//! namespace ends that namespace's init). The host reaches the agent's Unix
//! socket through `/proc/<pid>/root/...`. Machine-wide SetClock is not tested:
//! a pid namespace does not isolate the wall clock.
//!
//! Its cgroups: the agent mounts cgroup2 at /sys/fs/cgroup as in a guest
//! (there the whole hierarchy of the host), and is given a test-owned
//! directory under its root as its cgroup root (`--cgroup-root`), so PID 1
//! lives in `<test dir>/agent` and can be frozen there.

mod fixture;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsule_agent::client::{AgentClient, ClientError, Incoming};
use capsule_agent::protocol::{ExecRequest, LimitHit, Op, Reply, Request};
use fixture::cgroups::{cgroup_or_skip, v2_path, Need, TestCgroup};
use fixture::eventually;

const T: Option<Duration> = Some(Duration::from_secs(30));
const BOOT_DEADLINE: Duration = Duration::from_secs(20);

struct Namespace(Child);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unshare_usable() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: cannot create mount and pid namespaces".into());
    }
    let ok = Command::new("unshare")
        .args(["--pid", "--mount", "--uts", "--fork", "--propagation", "private", "true"])
        .status()
        .map_err(|e| format!("unshare not runnable: {e}"))?;
    if !ok.success() {
        return Err(format!("unshare --pid --mount --uts failed here ({ok})"));
    }
    Ok(())
}

/// The agent booted as PID 1 of a namespace.
struct Booted {
    ns: Namespace,
    /// Its pid on the host.
    agent_pid: u32,
    client: AgentClient,
    hello: capsule_agent::protocol::HelloReply,
    console: Vec<String>,
}

/// The cgroup root argument for an agent in the namespace: the test's own
/// directory (inside, cgroup2 is mounted at /sys/fs/cgroup, the hierarchy's
/// root), or a path that does not exist so it never touches the host's root.
fn cgroup_root_arg(cgroup: Option<&TestCgroup>) -> String {
    match cgroup {
        Some(cg) => format!("/sys/fs/cgroup/{}", cg.name()),
        None => "/nonexistent-capsule-test-cgroup-root".into(),
    }
}

/// Boots the agent as PID 1 of a new pid + mount + uts namespace, or `None` (skip).
fn boot(cgroup: Option<&TestCgroup>) -> Option<Booted> {
    if let Err(why) = unshare_usable() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let mut child = Command::new("unshare")
        .args(["--pid", "--mount", "--uts", "--kill-child", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_capsule-agent"))
        .args(["--listen-unix", "/run/agent.sock", "--cgroup-root", &cgroup_root_arg(cgroup)])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let stdout = child.stdout.take().unwrap();
    let unshare_pid = child.id();
    let ns = Namespace(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut console = Vec::new();
    while !console.iter().any(|l| l == "capsule-agent ready") {
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => console.push(line),
            Err(_) => {
                panic!("no `capsule-agent ready` within {BOOT_DEADLINE:?}; console: {console:#?}")
            }
        }
    }
    let children = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children")).unwrap();
    let agent_pid: u32 = children.split_whitespace().next().expect("agent pid").parse().unwrap();
    let socket = PathBuf::from(format!("/proc/{agent_pid}/root/run/agent.sock"));
    let (client, hello) = AgentClient::connect_unix(&socket).expect("connect into the namespace");
    Some(Booted { ns, agent_pid, client, hello, console })
}

#[test]
fn pid1_mode_builds_a_writable_overlay_root_reaps_orphans_and_shuts_down() {
    let cgroup = TestCgroup::create(Need::Cgroup2).ok();
    let Some(Booted { mut ns, agent_pid, client: c, hello, console }) = boot(cgroup.as_ref()) else { return };
    let init_ok = console.iter().position(|l| l == "capsule-agent: init ok");
    assert!(init_ok.is_some(), "console: {console:#?}");
    assert!(hello.pid1);
    assert!(hello.capabilities.iter().any(|c| c == "clock-and-entropy"));

    let out = c.exec(ExecRequest::shell("hostname; echo $HOME; cat /proc/1/comm; pwd"), T).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "capsule\n/root\ncapsule-agent\n/root\n");

    // `/` is writable (the overlay), and writes never reach the lower layer.
    let marker = format!("/usr/capsule-pid1-test-{agent_pid}");
    let out = c.exec(ExecRequest::shell(&format!("echo hi > {marker} && cat {marker} && touch /etc/x")), T).unwrap();
    assert_eq!(
        (out.status.code, &out.stdout[..]),
        (Some(0), &b"hi\n"[..]),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!std::path::Path::new(&marker).exists(), "a guest write leaked into the lower layer");

    // Orphans reparent to PID 1, which reaps them.
    let out = c
        .exec(ExecRequest::shell("for i in 1 2 3 4 5; do (sleep 0.05 &); done; sleep 1; grep -l '^State:.*zombie' /proc/[0-9]*/status; true"), T)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "zombies left unreaped");

    // Power-off: in a child pid namespace reboot(2) ends the namespace's init.
    match c.call_reply(Op::Shutdown { reboot: false }, T) {
        Ok(Reply::Unit) | Err(ClientError::Disconnected(_)) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        eventually(Duration::from_secs(10), || matches!(ns.0.try_wait(), Ok(Some(_)))),
        "the namespace's init did not end after Shutdown"
    );
}

/// Reads lines of `/proc/<pid>/cgroup`-style text for the v2 path.
fn v2(text: &[u8]) -> String {
    v2_path(&String::from_utf8_lossy(text))
}

#[test]
fn pid1_lives_in_its_own_cgroup_and_a_command_can_freeze_and_thaw_it() {
    let Some(cg) = cgroup_or_skip(Need::Cgroup2) else { return };
    let Some(booted) = boot(Some(&cg)) else { return };
    let c = &booted.client;
    assert!(booted.hello.capabilities.iter().any(|c| c == "cgroups"), "{:?}", booted.hello);
    let agent_cgroup = cg.path.join("agent");
    let out = c.exec(ExecRequest::shell("cat /proc/1/cgroup"), T).unwrap();
    assert_eq!(v2(&out.stdout), format!("/{}/agent", cg.name()), "PID 1 is in the agent's cgroup");
    let out = c.exec(ExecRequest::shell("cat /proc/self/cgroup"), T).unwrap();
    assert!(v2(&out.stdout).starts_with(&format!("/{}/workloads/exec-", cg.name())), "{:?}", v2(&out.stdout));
    let members = std::fs::read_to_string(agent_cgroup.join("cgroup.procs")).unwrap();
    assert!(members.lines().any(|l| l == booted.agent_pid.to_string()), "PID 1 ({}) in {members}", booted.agent_pid);

    // The hook: a command freezes the agent, and a helper it left behind thaws it 3 s later.
    let freeze = format!("/sys/fs/cgroup/{}/agent/cgroup.freeze", cg.name());
    let script = format!("(sleep 3; echo 0 > {freeze}) & echo 1 > {freeze}; echo frozen");
    let (tx, rx) = mpsc::channel();
    let sink = move |i| drop(tx.send(i));
    c.start(Request { timeout_ms: Some(30_000), op: Op::Exec(ExecRequest::shell(&script)) }, Box::new(sink)).unwrap();
    let events = agent_cgroup.join("cgroup.events");
    let frozen = || std::fs::read_to_string(&events).is_ok_and(|e| e.contains("frozen 1"));
    assert!(eventually(Duration::from_secs(2), frozen), "the kernel never reported agent/ (PID 1 included) frozen");
    let (ptx, prx) = mpsc::channel();
    let sink = move |i| drop(ptx.send(i));
    let asked = Instant::now();
    c.start(Request { timeout_ms: None, op: Op::Ping }, Box::new(sink)).unwrap();
    assert!(prx.recv_timeout(Duration::from_millis(1000)).is_err(), "a frozen agent answered Ping");
    let pong = prx.recv_timeout(Duration::from_secs(10)).expect("no Pong after the thaw");
    assert_eq!(pong, Incoming::Done(Reply::Pong));
    assert!(asked.elapsed() >= Duration::from_millis(1500), "thawed too early: {:?}", asked.elapsed());
    let mut output = Vec::new();
    let exit = loop {
        match rx.recv_timeout(Duration::from_secs(10)).expect("the frozen request's end") {
            Incoming::Event(capsule_agent::protocol::Event::Output { data, .. }) => output.extend(data),
            Incoming::Event(_) => {}
            Incoming::Done(Reply::Exit(status)) => break status,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((exit.code, &output[..]), (Some(0), &b"frozen\n"[..]), "the request finished after the thaw");

    // From outside, the same: frozen, no answer; thawed, answers.
    std::fs::write(agent_cgroup.join("cgroup.freeze"), "1").unwrap();
    assert!(eventually(Duration::from_secs(2), frozen));
    let (ptx, prx) = mpsc::channel();
    c.start(Request { timeout_ms: None, op: Op::Ping }, Box::new(move |i| drop(ptx.send(i)))).unwrap();
    assert!(prx.recv_timeout(Duration::from_millis(500)).is_err(), "a frozen agent answered Ping");
    std::fs::write(agent_cgroup.join("cgroup.freeze"), "0").unwrap();
    assert_eq!(prx.recv_timeout(Duration::from_secs(10)).unwrap(), Incoming::Done(Reply::Pong));
    drop(booted);
}

#[test]
fn pid1_stops_a_fork_bomb_at_its_pids_limit_and_answers_within_five_seconds() {
    let Some(cg) = cgroup_or_skip(Need::Limits) else { return };
    let Some(booted) = boot(Some(&cg)) else { return };
    let c = &booted.client;
    assert!(booted.hello.containment.is_some(), "{:?}", booted.hello);
    let start = Instant::now();
    let out = c.exec(ExecRequest::shell("bomb(){ bomb|bomb& }; bomb"), Some(Duration::from_secs(20))).unwrap();
    assert!(start.elapsed() < Duration::from_secs(25), "took {:?}", start.elapsed());
    assert!(
        out.status.limit == Some(LimitHit::Pids { max: 1024 }) || out.status.escaped_killed > 0,
        "{:?}",
        out.status
    );
    let answered = Instant::now();
    assert_eq!(c.exec(ExecRequest::shell("echo ok"), Some(Duration::from_secs(5))).unwrap().stdout, b"ok\n");
    assert!(answered.elapsed() < Duration::from_secs(5));
    let out =
        c.exec(ExecRequest::shell("bomb(){ bomb|bomb& }; bomb; sleep 60"), Some(Duration::from_secs(50))).unwrap();
    assert_eq!(out.status.limit, Some(LimitHit::Pids { max: 1024 }), "{:?}", out.status);
    let answered = Instant::now();
    assert_eq!(c.exec(ExecRequest::shell("echo ok"), Some(Duration::from_secs(5))).unwrap().stdout, b"ok\n");
    assert!(answered.elapsed() < Duration::from_secs(5));
    drop(booted);
}
