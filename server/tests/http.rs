//! Streamable HTTP at /mcp: a real rmcp HTTP client and raw HTTP requests
//! against capsule's router on a real loopback socket, over the test engine.
//! Pins session isolation, the bearer token and the Origin check.

#![allow(deprecated)]

mod common;

use capsule::mcp::http::{router, HttpOptions, MCP_PATH};
use capsule::mcp::shaping::Shaping;
use common::*;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";

struct Server {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn start(manager: &capsule::sandbox::Manager, token: Option<&str>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = HttpOptions {
        listen: addr,
        token: token.map(str::to_string),
        token_owner: None,
        allowed_origins: vec!["https://app.example.com".into()],
        shared_sandboxes: false,
    };
    let app = router(manager.clone(), Shaping::default(), &opts).unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, task }
}

async fn client(
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> rmcp::service::RunningService<rmcp::RoleClient, TestClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}{MCP_PATH}"));
    if let Some(t) = token {
        config = config.auth_header(t);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    TestClient::default().serve(transport).await.expect("http client connects")
}

/// Sends one raw HTTP/1.1 POST of an initialize request and returns the status code.
async fn raw_post(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> u16 {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    .to_string();
    let mut req = format!(
        "POST {MCP_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn http_sessions_see_only_their_own_sandboxes() {
    let dir = tempfile::Builder::new().prefix("capsule-h").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &Settings::default());
    let server = start(&manager, None).await;
    let a = client(server.addr, None).await;
    let b = client(server.addr, None).await;
    let ra = ok("a", &call(&a, "run_command", json!({"command": "echo a"})).await);
    let a_id = ra["sandbox_id"].as_str().unwrap().to_string();
    let listed_b = ok("b list", &call(&b, "list_sandboxes", json!({})).await);
    assert_eq!(listed_b["sandboxes"].as_array().unwrap().len(), 0, "b sees none of a's sandboxes");
    let r = call(&b, "read_file", json!({"path": "x", "sandbox_id": a_id})).await;
    assert!(is_error(&r) && text(&r).contains("no sandbox"), "{}", text(&r));
    let rb = ok("b", &call(&b, "run_command", json!({"command": "echo b"})).await);
    assert_ne!(rb["sandbox_id"], a_id.as_str());
    let listed_a = ok("a list", &call(&a, "list_sandboxes", json!({})).await);
    assert_eq!(listed_a["sandboxes"].as_array().unwrap().len(), 1);
    let _ = a.cancel().await;
    let _ = b.cancel().await;
    manager.kill_all().await;
    server.task.abort();
}

#[tokio::test]
async fn the_bearer_token_is_required_when_set() {
    let dir = tempfile::Builder::new().prefix("capsule-h").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &Settings::default());
    let server = start(&manager, Some(TOKEN)).await;
    assert_eq!(raw_post(server.addr, &[]).await, 401, "no token");
    assert_eq!(raw_post(server.addr, &[("Authorization", "Bearer wrong-token-0123456789abc")]).await, 401);
    assert_eq!(raw_post(server.addr, &[("Authorization", TOKEN)]).await, 401, "the Bearer scheme is required");
    assert_eq!(raw_post(server.addr, &[("Authorization", &format!("Bearer {TOKEN}"))]).await, 200);
    let c = client(server.addr, Some(TOKEN)).await;
    let tools = c.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), capsule_tool_schemas::catalog().len());
    let _ = c.cancel().await;
    server.task.abort();
}

#[tokio::test]
async fn foreign_origins_are_refused_and_loopback_or_allowed_ones_pass() {
    let dir = tempfile::Builder::new().prefix("capsule-h").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &Settings::default());
    let server = start(&manager, None).await;
    assert_eq!(raw_post(server.addr, &[("Origin", "https://evil.example")]).await, 403);
    assert_eq!(raw_post(server.addr, &[("Origin", "http://localhost.evil.example")]).await, 403);
    assert_eq!(raw_post(server.addr, &[("Origin", "null")]).await, 403);
    assert_eq!(raw_post(server.addr, &[("Origin", "http://localhost:3000")]).await, 200);
    assert_eq!(raw_post(server.addr, &[("Origin", "https://app.example.com")]).await, 200, "--allow-origin");
    assert_eq!(raw_post(server.addr, &[]).await, 200, "no Origin (not a browser)");
    server.task.abort();
}
