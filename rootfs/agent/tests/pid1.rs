//! PID 1 mode, for real, inside a fresh pid + mount + uts namespace
//! (`unshare`): the agent mounts the API filesystems, builds the overlay root
//! over the (host's) read-only-used root and pivots into it, prints its
//! console lines, reaps orphans, and powers "off" (reboot(2) in a child pid
//! namespace ends that namespace's init). The host reaches the agent's Unix
//! socket through `/proc/<pid>/root/...`. Machine-wide SetClock is not tested:
//! a pid namespace does not isolate the wall clock.

mod fixture;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{ExecRequest, Op, Reply};
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

#[test]
fn pid1_mode_builds_a_writable_overlay_root_reaps_orphans_and_shuts_down() {
    if let Err(why) = unshare_usable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let mut child = Command::new("unshare")
        .args(["--pid", "--mount", "--uts", "--kill-child", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_capsule-agent"))
        .args(["--listen-unix", "/run/agent.sock"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let stdout = child.stdout.take().unwrap();
    let unshare_pid = child.id();
    let mut ns = Namespace(child);
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
    let init_ok = console.iter().position(|l| l == "capsule-agent: init ok");
    assert!(init_ok.is_some(), "console: {console:#?}");

    let children = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children")).unwrap();
    let agent_pid: u32 = children.split_whitespace().next().expect("agent pid").parse().unwrap();
    let socket = PathBuf::from(format!("/proc/{agent_pid}/root/run/agent.sock"));
    let (c, hello) = AgentClient::connect_unix(&socket).expect("connect into the namespace");
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
