//! Long calls under the tasks extension, in-process against the test engine: a client that
//! declares `io.modelcontextprotocol/tasks` gets `run_command` answered with a task handle at
//! once, polls `tasks/get` to the call's result, and `tasks/cancel` stops the command; other
//! tools, and clients without the extension, get plain results.

mod common;

use std::time::{Duration, Instant};

use capsule::mcp::shaping::Shaping;
use capsule::mcp::CapsuleMcp;
use capsule::sandbox::{Manager, Owner};
use common::{open_manager, Settings};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ClientCapabilities, ClientConfig,
    GetTaskParams, Implementation, TaskPayload, TaskStatus,
};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

async fn tasks_client(manager: &Manager, owner: &str) -> RunningService<RoleClient, ClientConfig> {
    let server = CapsuleMcp::new(manager.clone(), Owner::new(owner), Shaping { output_cap_bytes: 32 * 1024 });
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let config =
        ClientConfig::new(ClientCapabilities::builder().enable_tasks().build(), Implementation::new("tasks-test", "1"));
    config.serve(client_io).await.expect("client connects")
}

fn params(name: &str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_string()).with_arguments(serde_json::from_value(args).unwrap())
}

/// Polls task `id` until it is terminal (at most `within`); its status and payload.
async fn settle(
    client: &RunningService<RoleClient, ClientConfig>,
    id: &str,
    within: Duration,
) -> (TaskStatus, TaskPayload) {
    let deadline = Instant::now() + within;
    loop {
        let info = client.peer().get_task(GetTaskParams::new(id.to_string())).await.expect("tasks/get");
        if info.task.status().is_terminal() {
            return (info.task.status(), info.task.payload);
        }
        assert!(Instant::now() < deadline, "task {id} still {:?} after {within:?}", info.task.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_long_command_runs_as_a_task_polled_to_its_result() {
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &Settings::default());
    let client = tasks_client(&manager, "tasks-a").await;
    let started = Instant::now();
    let response = client
        .call_tool_once(params("run_command", json!({"command": "sleep 1; echo done"})))
        .await
        .expect("tools/call");
    let CallToolResponse::Task(create) = response else { panic!("expected a task, got {response:?}") };
    assert!(started.elapsed() < Duration::from_millis(900), "answered before the command ended");
    assert_eq!(create.task.status, TaskStatus::Working);
    let (status, payload) = settle(&client, &create.task.task_id, Duration::from_secs(60)).await;
    assert_eq!(status, TaskStatus::Completed);
    let TaskPayload::Completed { result } = payload else { panic!("{payload:?}") };
    let result: CallToolResult = serde_json::from_value(Value::Object(result)).unwrap();
    assert_eq!(result.structured_content.unwrap()["stdout"], "done\n");

    // A quick tool is answered as always.
    let listed = client.call_tool_once(params("list_sandboxes", json!({}))).await.expect("tools/call");
    assert!(matches!(listed, CallToolResponse::Complete(_)), "{listed:?}");
    manager.kill_all().await;
}

#[tokio::test]
async fn a_cancelled_task_stops_its_command() {
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &Settings::default());
    let client = tasks_client(&manager, "tasks-b").await;
    let marker = dir.path().join("never");
    // A duration no other process on the host sleeps for: the test engine's commands are host
    // processes, so the test can look for it.
    let command = format!("sleep 37.25; touch {}", marker.display());
    let response = client.call_tool_once(params("run_command", json!({ "command": command }))).await.unwrap();
    let CallToolResponse::Task(create) = response else { panic!("expected a task, got {response:?}") };
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.peer().cancel_task(CancelTaskParams::new(create.task.task_id.clone())).await.expect("tasks/cancel");
    let (status, _) = settle(&client, &create.task.task_id, Duration::from_secs(20)).await;
    assert_eq!(status, TaskStatus::Cancelled);
    // The command was stopped, not left running.
    let sleeping = || {
        let out = std::process::Command::new("pgrep").args(["-f", "sleep 37.25"]).output().expect("pgrep");
        !out.stdout.is_empty()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleeping() {
        assert!(Instant::now() < deadline, "the cancelled command's sleep still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!marker.exists(), "the cancelled command ran to its end");
    // The sandbox takes the next call.
    let next = client.call_tool_once(params("run_code", json!({"code": "1 + 1"}))).await.unwrap();
    let CallToolResponse::Task(next) = next else { panic!("{next:?}") };
    assert_eq!(settle(&client, &next.task.task_id, Duration::from_secs(30)).await.0, TaskStatus::Completed);
    manager.kill_all().await;
}
