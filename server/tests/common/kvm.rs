//! Helpers of the KVM tests that boot the built guest image: an engine over a root of the
//! test's own (or `None`, with the reason printed, where this host cannot run one), a machine
//! spec, and calls through the guest agent.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsule::engine::kvm::KvmEngine;
use capsule::engine::MachineSpec;
use capsule::image::current_image;
use capsule_agent::client::AgentClient;
use capsule_agent::protocol::{Event, ExecRequest, Language, Op, Reply, RunCodeRequest};

pub const CALL_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

pub fn engine(root: PathBuf) -> Option<KvmEngine> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        capsule::doctor::skip_without_kvm(&format!("/dev/kvm is not usable: {e}"));
        return None;
    }
    let image = match current_image() {
        Ok(image) => image,
        Err(e) => {
            capsule::doctor::skip_without_kvm(&format!("no capsule image built (run `capsule image build`): {e}"));
            return None;
        }
    };
    Some(
        KvmEngine::new(
            PathBuf::from(env!("CARGO_BIN_EXE_capsule")),
            image,
            root,
            capsule::daemon::open::default_warm_up(),
        )
        .expect("engine"),
    )
}

/// A KVM engine over a fresh temporary root (dropped after the engine), or `None`
/// when this host cannot run one (the reason is printed).
pub fn engine_in_tempdir() -> Option<(tempfile::TempDir, KvmEngine)> {
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path().to_path_buf())?;
    Some((root, engine))
}

pub fn spec(id: &str) -> MachineSpec {
    MachineSpec {
        id: id.into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 64,
        env: BTreeMap::new(),
    }
}

/// Starts `command` in the background through the agent; returns its guest pid.
pub fn spawn(client: &AgentClient, command: &str) -> u32 {
    let reply = client
        .call_reply(Op::Exec(ExecRequest { background: true, ..ExecRequest::shell(command) }), CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("background exec {command:?}: {e}"));
    match reply {
        Reply::Started { pid, .. } => pid,
        other => panic!("background exec {command:?}: {other:?}"),
    }
}

/// The context `run_code` uses when the caller names none (the one the template warms).
pub const DEFAULT_PYTHON_CONTEXT: &str = "python";

/// Runs a Python cell in `context`; returns the text of its main result ("" when none).
/// Fails on an exception.
pub fn py_in(client: &AgentClient, context: &str, code: &str) -> String {
    let (events, reply) = client
        .call(
            Op::RunCode(RunCodeRequest {
                context: context.into(),
                language: Language::Python,
                code: code.into(),
                output_cap_bytes: None,
                limits: None,
            }),
            CALL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("run_code {code:?}: {e}"));
    assert!(matches!(reply, Reply::CodeDone(_)), "{code:?}: {reply:?}");
    let mut main = String::new();
    for event in events {
        match event {
            Event::Error(error) => panic!("{code:?} raised {error:?}"),
            Event::Result(result) if result.is_main_result => {
                if let Some((_, text)) = result.data.iter().find(|(mime, _)| mime == "text/plain") {
                    main = String::from_utf8_lossy(text).into_owned();
                }
            }
            _ => {}
        }
    }
    main
}

/// [`py_in`] in the default context.
pub fn py(client: &AgentClient, code: &str) -> String {
    py_in(client, DEFAULT_PYTHON_CONTEXT, code)
}

/// A shell loop that appends a line to `file` twenty times a second.
pub fn ticker(file: &str) -> String {
    format!("while true; do echo t >> {file}; sleep 0.05; done")
}

/// Lines in `file` in the guest.
pub fn lines_of(client: &AgentClient, file: &str) -> u64 {
    sh(client, &format!("wc -l < {file}")).trim().parse().expect("a line count")
}

/// Asserts that the ticker `pid` is alive and `file` keeps growing.
pub fn assert_ticking(client: &AgentClient, pid: u32, file: &str) {
    sh(client, &format!("kill -0 {pid}"));
    let before = lines_of(client, file);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines_of(client, file) <= before {
        assert!(Instant::now() < deadline, "{file} stopped growing at {before} lines");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `command` through `sh -c`: its exit code and stdout (stderr appended).
pub fn sh_status(client: &AgentClient, command: &str) -> (Option<i32>, String) {
    let out =
        client.exec(ExecRequest::shell(command), CALL_TIMEOUT).unwrap_or_else(|e| panic!("exec {command:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code, text)
}

/// Runs `command` through `sh -c` and returns its stdout; fails on a non-zero exit.
pub fn sh(client: &AgentClient, command: &str) -> String {
    let out =
        client.exec(ExecRequest::shell(command), CALL_TIMEOUT).unwrap_or_else(|e| panic!("exec {command:?}: {e}"));
    assert_eq!(
        out.status.code,
        Some(0),
        "{command:?}: {:?} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
