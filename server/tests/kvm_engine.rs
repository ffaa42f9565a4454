//! The KVM engine on real KVM with the built guest image: a machine boots, runs commands,
//! pauses to disk (its worker ends), resumes from the snapshot with its processes and files
//! intact, forks into a child with its own copy of memory and disk, and is killed.
//!
//! Skips only when /dev/kvm is unusable or no image is built (`capsule image build`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsule::engine::kvm::KvmEngine;
use capsule::engine::{Engine, EngineError, MachineSpec};
use capsule::image::current_image;
use capsule_agent::client::AgentClient;
use capsule_agent::protocol::{Command, ExecRequest, Op, Reply};

const CALL_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

fn engine(root: PathBuf) -> Option<KvmEngine> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("SKIP: /dev/kvm is not usable: {e}");
        return None;
    }
    let image = match current_image() {
        Ok(image) => image,
        Err(e) => {
            eprintln!("SKIP: no capsule image built (run `capsule image build`): {e}");
            return None;
        }
    };
    Some(KvmEngine::new(PathBuf::from(env!("CARGO_BIN_EXE_capsule")), image, root).expect("engine"))
}

fn spec(id: &str) -> MachineSpec {
    MachineSpec {
        id: id.into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 64,
        env: BTreeMap::new(),
    }
}

fn shell(command: &str, background: bool) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(command.into()),
        cwd: None,
        env: Vec::new(),
        stdin: None,
        background,
        output_cap_bytes: None,
    }
}

/// Starts `command` in the background through the agent.
fn spawn(client: &AgentClient, command: &str) {
    let reply = client
        .call_reply(Op::Exec(shell(command, true)), CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("background exec {command:?}: {e}"));
    assert!(matches!(reply, Reply::Started { .. }), "{reply:?}");
}

/// How many processes named `sleep` the guest has.
const COUNT_SLEEPERS: &str = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep";

/// Runs `command` through `sh -c` and returns its stdout; fails on a non-zero exit.
fn sh(client: &AgentClient, command: &str) -> String {
    let out = client
        .exec(shell(command, false), CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("exec {command:?}: {e}"));
    assert_eq!(
        out.status.code,
        Some(0),
        "{command:?}: {:?} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn worker_pids_of(dir: &std::path::Path) -> usize {
    // Our worker processes have the sandbox's serial log open; count those that do.
    let needle = dir.join("serial.log");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read_dir(e.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == needle))
        })
        .count()
}

#[test]
fn a_machine_runs_pauses_to_disk_resumes_and_is_killed() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-a")).expect("create");
    let dir = root.path().join("kvm-a");
    let client = machine.connect().expect("connect");
    // A background process and a file, both of which must survive the pause.
    sh(&client, "echo before > /root/marker");
    spawn(&client, "sleep 1000");
    assert_eq!(sh(&client, COUNT_SLEEPERS).trim(), "1");
    assert_eq!(worker_pids_of(&dir), 1, "one worker runs the VM");

    let t = Instant::now();
    machine.pause().expect("pause");
    let paused_in = t.elapsed();
    assert!(
        client.closed_reason().is_some(),
        "pausing drops the agent connection"
    );
    assert_eq!(
        worker_pids_of(&dir),
        0,
        "a paused machine has no worker (RAM freed)"
    );
    assert_eq!(machine.saved_state()["snapshot_generation"], 1);
    machine
        .check_alive()
        .expect("a machine paused to disk is alive");

    let t = Instant::now();
    machine.resume().expect("resume");
    let client = machine.connect().expect("reconnect after resume");
    eprintln!(
        "kvm engine: pause to disk {paused_in:?}, resume + reconnect {:?}",
        t.elapsed()
    );
    assert_eq!(sh(&client, "cat /root/marker"), "before\n");
    assert_eq!(sh(&client, COUNT_SLEEPERS).trim(), "1", "processes survive");
    // The host set the clock after the restore: the guest's time is the host's, within a minute.
    let guest_now: u64 = sh(&client, "date +%s").trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        guest_now.abs_diff(host_now) < 60,
        "guest {guest_now} host {host_now}"
    );

    // Paused twice: the second snapshot replaces the first.
    machine.pause().expect("pause again");
    assert_eq!(machine.saved_state()["snapshot_generation"], 2);
    assert!(
        !dir.join("snapshot-1").exists(),
        "the older snapshot is deleted"
    );
    machine.resume().expect("resume again");
    assert_eq!(sh(&machine.connect().unwrap(), "echo again"), "again\n");

    machine.kill().expect("kill");
    assert!(!dir.exists(), "kill deletes the sandbox directory");
    assert_eq!(worker_pids_of(&dir), 0);
    machine.kill().expect("kill is idempotent");
}

#[test]
fn a_fork_copies_memory_processes_and_disk_and_then_diverges() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let mut parent = engine.create(&spec("kvm-parent")).expect("create");
    let client = parent.connect().expect("connect");
    sh(&client, "echo parent-file > /root/shared");
    spawn(&client, "sleep 1000");
    let parent_boot_id = sh(&client, "cat /proc/sys/kernel/random/boot_id");

    let t = Instant::now();
    let mut child = parent.fork(&spec("kvm-child")).expect("fork");
    let child_client = child.connect().expect("connect to the child");
    eprintln!("kvm engine: fork + connect {:?}", t.elapsed());
    assert_eq!(sh(&child_client, "cat /root/shared"), "parent-file\n");
    assert_eq!(
        sh(&child_client, COUNT_SLEEPERS).trim(),
        "1",
        "the child has the parent's processes"
    );
    // Same boot (memory copied), different futures: writes do not cross.
    assert_eq!(
        sh(&child_client, "cat /proc/sys/kernel/random/boot_id"),
        parent_boot_id
    );
    sh(&child_client, "echo child > /root/shared");
    let parent_client = parent.connect().expect("the parent runs on after the fork");
    assert_eq!(sh(&parent_client, "cat /root/shared"), "parent-file\n");
    assert_eq!(sh(&child_client, "cat /root/shared"), "child\n");
    // Fresh entropy: the two RNGs differ.
    let a = sh(&parent_client, "head -c 16 /dev/urandom | od -An -tx1");
    let b = sh(&child_client, "head -c 16 /dev/urandom | od -An -tx1");
    assert_ne!(a, b);

    child.kill().expect("kill the child");
    parent.kill().expect("kill the parent");
}

#[test]
fn more_vcpus_than_a_pvm_host_allows_is_a_clear_error() {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIP: this host's KVM is not PVM; the limit only applies there");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let mut two = spec("kvm-two");
    two.vcpus = 2;
    let Err(err) = engine.create(&two) else {
        panic!("2 vCPUs must be refused on PVM")
    };
    assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("PVM") && text.contains("at most 1 vCPU"),
        "{text}"
    );
    assert!(
        !root.path().join("kvm-two").exists(),
        "nothing is left behind"
    );
}

#[test]
fn a_paused_machine_is_found_again_by_a_new_engine_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-r")).expect("create");
    sh(&machine.connect().unwrap(), "echo kept > /root/kept");
    machine.pause().expect("pause");
    let saved = machine.saved_state();
    // The server goes away: its machines are dropped (their workers were already stopped).
    drop(machine);
    drop(engine);

    let engine = self::engine(root.path().to_path_buf()).expect("engine again");
    let Err(err) = engine.reattach(&spec("kvm-r"), &saved, false) else {
        panic!("a machine recorded running cannot come back")
    };
    assert!(matches!(err, EngineError::Dead(_)), "{err}");
    let mut machine = engine
        .reattach(&spec("kvm-r"), &saved, true)
        .expect("reattach");
    machine
        .check_alive()
        .expect("paused to disk counts as alive");
    machine.resume().expect("resume from the saved snapshot");
    assert_eq!(sh(&machine.connect().unwrap(), "cat /root/kept"), "kept\n");
    machine.kill().expect("kill");
}

#[test]
fn sandboxes_of_one_size_restore_one_template_and_stay_independent() {
    let root = tempfile::tempdir().unwrap();
    let Some(engine) = engine(root.path().to_path_buf()) else {
        return;
    };
    let t = Instant::now();
    let mut first = engine.create(&spec("kvm-t1")).expect("create the first");
    let first_in = t.elapsed();
    let t = Instant::now();
    let mut second = engine.create(&spec("kvm-t2")).expect("create the second");
    let second_in = t.elapsed();
    eprintln!(
        "kvm engine: create with template build {first_in:?}, create from template {second_in:?}"
    );

    let templates: Vec<_> = std::fs::read_dir(root.path().join(".templates"))
        .expect("templates dir")
        .flatten()
        .collect();
    assert_eq!(
        templates.len(),
        1,
        "one template for one size: {templates:?}"
    );
    // Neither booted: their consoles never saw the agent start (the template's did).
    for id in ["kvm-t1", "kvm-t2"] {
        let console =
            std::fs::read_to_string(root.path().join(id).join("serial.log")).unwrap_or_default();
        assert!(
            !console.contains("capsule-agent: init ok"),
            "{id} booted:\n{console}"
        );
    }
    let template_console = std::fs::read_to_string(templates[0].path().join("serial.log")).unwrap();
    assert!(
        template_console.contains("capsule-agent ready"),
        "{template_console}"
    );
    // Their own files and RNG.
    let (a, b) = (first.connect().unwrap(), second.connect().unwrap());
    sh(&a, "echo first > /root/who");
    sh(&b, "echo second > /root/who");
    assert_eq!(sh(&a, "cat /root/who"), "first\n");
    assert_eq!(sh(&b, "cat /root/who"), "second\n");
    let random = "head -c 16 /dev/urandom | od -An -tx1";
    assert_ne!(sh(&a, random), sh(&b, random));

    first.kill().expect("kill");
    second.kill().expect("kill");
    assert!(
        root.path().join(".templates").read_dir().unwrap().count() == 1,
        "killing sandboxes keeps the template"
    );
}
