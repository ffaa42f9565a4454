//! Test fixture: a real capsule MCP server over the test engine (the real agent
//! as host processes), and a real rmcp client talking to it in-process over
//! `tokio::io::duplex`. Notifications the client receives are recorded.

#![allow(dead_code, deprecated)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use capsule::config::{Limits, Timers};
use capsule::engine::test_engine::{TestEngine, AGENT_BIN_ENV};
use capsule::mcp::shaping::Shaping;
use capsule::mcp::CapsuleMcp;
use capsule::registry::Registry;
use capsule::sandbox::{Manager, ManagerConfig, Owner};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, LoggingMessageNotificationParam, ProgressNotificationParam,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceExt};
use serde_json::Value;

/// The capsule-agent binary: `$CAPSULE_AGENT_BIN`, else the one next to the test's target
/// dir, built with `cargo build -p capsule-agent` when missing (build it first to refresh it).
pub fn agent_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV) {
        return PathBuf::from(p);
    }
    // Test binaries live in <target>/debug/deps; the agent in <target>/debug.
    let exe = std::env::current_exe().expect("current exe");
    let debug_dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    let bin = debug_dir.join("capsule-agent");
    if bin.is_file() {
        return bin;
    }
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let target_dir = debug_dir.parent().expect("target root").to_path_buf();
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "capsule-agent"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .expect("run cargo build -p capsule-agent");
        assert!(status.success(), "cargo build -p capsule-agent failed");
    });
    assert!(bin.is_file(), "no agent binary at {}", bin.display());
    bin
}

/// What the test client heard.
#[derive(Debug, Default, Clone)]
pub struct Heard {
    pub progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    pub logs: Arc<Mutex<Vec<LoggingMessageNotificationParam>>>,
}

#[derive(Debug, Clone, Default)]
pub struct TestClient {
    pub heard: Heard,
}

impl ClientHandler for TestClient {
    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        self.heard.progress.lock().unwrap().push(params);
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.heard.logs.lock().unwrap().push(params);
    }
}

/// Server settings for one test.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub timers: Timers,
    pub output_cap_bytes: usize,
    /// The server's network policy.
    pub network: capsule::network::NetworkPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            limits: Limits { memory_budget_mib: 64 * 1024, ..Limits::default() },
            timers: Timers::default(),
            output_cap_bytes: 32 * 1024,
            network: capsule::network::NetworkPolicy::default(),
        }
    }
}

/// A server (manager over the test engine) plus one connected client.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub manager: Manager,
    pub client: RunningService<RoleClient, TestClient>,
    pub heard: Heard,
    pub settings: Settings,
}

pub fn open_manager(dir: &std::path::Path, settings: &Settings) -> Manager {
    let engine = TestEngine::new(agent_bin(), dir.join("sandboxes")).expect("test engine");
    let registry = Registry::open(dir).expect("registry");
    let config = ManagerConfig {
        limits: settings.limits.clone(),
        timers: settings.timers.clone(),
        network: settings.network.clone(),
    };
    Manager::open(Arc::new(engine), registry, config).expect("manager")
}

/// Connects a new in-process client as `owner` to a server over `manager`.
pub async fn connect(
    manager: &Manager,
    owner: Owner,
    settings: &Settings,
) -> (RunningService<RoleClient, TestClient>, Heard) {
    let server = CapsuleMcp::new(manager.clone(), owner, Shaping { output_cap_bytes: settings.output_cap_bytes });
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let client = TestClient::default();
    let heard = client.heard.clone();
    let running = client.serve(client_io).await.expect("client connects");
    (running, heard)
}

impl Fixture {
    pub async fn new(settings: Settings) -> Fixture {
        let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").expect("tempdir");
        let manager = open_manager(dir.path(), &settings);
        let (client, heard) = connect(&manager, Owner::new("test-session"), &settings).await;
        Fixture { dir, manager, client, heard, settings }
    }

    pub async fn default() -> Fixture {
        Fixture::new(Settings::default()).await
    }

    /// Calls a tool; panics only on protocol errors.
    pub async fn call(&self, name: &str, args: Value) -> CallToolResult {
        call(&self.client, name, args).await
    }

    /// Starts a tool call on its own task, so that it runs alongside the next ones.
    pub fn spawn_call(&self, name: &str, args: Value) -> tokio::task::JoinHandle<CallToolResult> {
        let (peer, name) = (self.client.peer().clone(), name.to_owned());
        tokio::spawn(async move { call(&peer, &name, args).await })
    }

    /// Runs `long_command` in the default sandbox (made first) and, half a
    /// second into it, calls `tool` with `args`. Returns that call's result and
    /// the long call, still running.
    pub async fn call_during(
        &self,
        long_command: &str,
        tool: &str,
        args: Value,
    ) -> (CallToolResult, tokio::task::JoinHandle<CallToolResult>) {
        ok("run", &self.call("run_command", serde_json::json!({"command": "true"})).await);
        let long = self.spawn_call("run_command", serde_json::json!({ "command": long_command }));
        tokio::time::sleep(Duration::from_millis(500)).await;
        (self.call(tool, args).await, long)
    }

    /// Deletes every sandbox (so no agent process outlives the test).
    pub async fn cleanup(self) {
        self.manager.kill_all().await;
    }
}

impl Drop for Fixture {
    /// A test that panicked never reached `cleanup`: SIGKILL the process group of
    /// every agent still recorded, so no agent outlives its test.
    fn drop(&mut self) {
        for record in self.manager.registry().load_live().unwrap_or_default() {
            if let Some(pid) =
                record.engine_state.get("pid").and_then(Value::as_i64).and_then(|p| i32::try_from(p).ok())
            {
                if pid > 1 {
                    // SAFETY: kill(2) with plain integers; the agent leads its own group.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

pub async fn call(client: &Peer<RoleClient>, name: &str, args: Value) -> CallToolResult {
    let Value::Object(map) = args else { panic!("args must be an object") };
    let params = CallToolRequestParams::new(name.to_string()).with_arguments(map);
    let response = tokio::time::timeout(Duration::from_secs(60), client.call_tool_once(params))
        .await
        .expect("tool call timed out")
        .unwrap_or_else(|e| panic!("{name}: protocol error {e}"));
    match response {
        CallToolResponse::Complete(result) => result,
        other => panic!("{name}: unexpected response {other:?}"),
    }
}

/// The first text content of a result.
pub fn text(result: &CallToolResult) -> String {
    result.content.iter().find_map(|c| c.as_text().map(|t| t.text.clone())).unwrap_or_default()
}

/// The structured content of a result.
pub fn structured(result: &CallToolResult) -> Value {
    result.structured_content.clone().unwrap_or(Value::Null)
}

pub fn is_error(result: &CallToolResult) -> bool {
    result.is_error == Some(true)
}

/// The `sandbox_id` of a sandbox or of a tool's structured result.
pub fn id_of(value: &Value) -> String {
    value["sandbox_id"].as_str().unwrap_or_else(|| panic!("no sandbox_id in {value}")).to_string()
}

/// The pid of the agent process the test engine runs for the live sandbox `id`.
pub fn agent_pid(manager: &Manager, id: &str) -> i32 {
    let records = manager.registry().load_live().expect("registry");
    let record = records.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no live record for {id}"));
    let pid = record.engine_state["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {}", record.engine_state));
    i32::try_from(pid).expect("pid fits in i32")
}

/// Whether `run_code` answered that this agent build has no language
/// contexts; prints why the test skips when it did.
pub fn run_code_unavailable(result: &CallToolResult) -> bool {
    let unavailable = is_error(result) && text(result).contains("not available in this agent build");
    if unavailable {
        eprintln!("SKIP: run_code: this capsule-agent build has no language contexts yet ({})", text(result));
    }
    unavailable
}

/// Asserts success and returns the structured content.
pub fn ok(name: &str, result: &CallToolResult) -> Value {
    assert!(!is_error(result), "{name} failed: {}", text(result));
    structured(result)
}
