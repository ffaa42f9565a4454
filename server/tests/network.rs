//! The network of sandboxes through the MCP tools, in-process over the test engine: what
//! `create_sandbox` may ask for under the server's policy, what `list_sandboxes` shows, and
//! that forks and a restarted server keep a sandbox's network.

#![allow(deprecated)]

mod common;

use std::time::Duration;

use capsule::network::NetworkPolicy;
use capsule::sandbox::Owner;
use capsule_tool_schemas::NetworkMode;
use common::*;
use serde_json::{json, Value};

fn with_ceiling(network: NetworkPolicy) -> Settings {
    Settings { network, ..Settings::default() }
}

fn allowlist_ceiling() -> NetworkPolicy {
    NetworkPolicy::new(NetworkMode::Allowlist, &["*.example.com".into()], &[]).unwrap()
}

fn network_of(listed: &Value, id: &str) -> Value {
    let sandboxes = listed["sandboxes"].as_array().unwrap();
    sandboxes.iter().find(|s| s["sandbox_id"] == id).unwrap_or_else(|| panic!("{id} not in {listed}"))["network"]
        .clone()
}

#[tokio::test]
async fn an_allowlist_request_under_a_public_ceiling_is_kept_shown_and_inherited_by_forks() {
    let f = Fixture::default().await;
    let request = json!({"network": {"mode": "allowlist", "allow": ["*.example.com"]}, "make_default": false});
    let created = ok("create", &f.call("create_sandbox", request).await);
    assert_eq!(created["sandbox"]["network"], "allowlist");
    let id = id_of(&created["sandbox"]);
    let plain = ok("create plain", &f.call("create_sandbox", json!({"make_default": false})).await);
    let plain_id = id_of(&plain["sandbox"]);
    let none = ok("create none", &f.call("create_sandbox", json!({"network": {"mode": "none"}})).await);

    let r = f.call("list_sandboxes", json!({})).await;
    let listed = ok("list", &r);
    assert_eq!(network_of(&listed, &id), "allowlist");
    assert_eq!(network_of(&listed, &plain_id), "public", "no request: the server's policy");
    assert_eq!(network_of(&listed, &id_of(&none["sandbox"])), "none");
    assert!(text(&r).contains("network allowlist"), "{}", text(&r));

    let forked = ok("fork", &f.call("fork", json!({"sandbox_id": id})).await);
    assert_eq!(forked["sandboxes"][0]["network"], "allowlist", "a fork keeps its parent's network");
    let kid = id_of(&forked["sandboxes"][0]);
    let records = f.manager.registry().load_live().unwrap();
    let kid_record = records.iter().find(|r| r.id == kid).unwrap();
    let kept = kid_record.settings.network.as_ref().expect("the child's settings hold the network");
    assert_eq!((kept.mode, kept.allow.as_slice()), (NetworkMode::Allowlist, &["*.example.com".to_string()][..]));
    f.cleanup().await;
}

#[tokio::test]
async fn a_public_request_under_an_allowlist_ceiling_is_refused_naming_what_the_server_allows() {
    let f = Fixture::new(with_ceiling(allowlist_ceiling())).await;
    let r = f.call("create_sandbox", json!({"network": {"mode": "public"}})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(t.contains("this server allows only allowlist mode with: *.example.com"), "{t}");
    assert!(t.contains("the request asked for public") && t.contains("omit network"), "{t}");
    let r = f.call("create_sandbox", json!({"network": {"mode": "allowlist", "allow": ["*.example.org"]}})).await;
    assert!(is_error(&r) && text(&r).contains("*.example.org is not inside any of them"), "{}", text(&r));
    let r = f.call("create_sandbox", json!({"network": {"mode": "allowlist", "allow": ["bad rule!"]}})).await;
    assert!(is_error(&r) && text(&r).contains("\"bad rule!\" is not a valid rule"), "{}", text(&r));
    assert_eq!(ok("list", &f.call("list_sandboxes", json!({})).await)["sandboxes"].as_array().unwrap().len(), 0);

    let inside = json!({"network": {"mode": "allowlist", "allow": ["files.example.com:443"]}});
    assert_eq!(ok("inside", &f.call("create_sandbox", inside).await)["sandbox"]["network"], "allowlist");
    let plain = ok("plain", &f.call("create_sandbox", json!({})).await);
    assert_eq!(plain["sandbox"]["network"], "allowlist", "no request: the server's allowlist");
    f.cleanup().await;
}

#[tokio::test]
async fn a_restarted_server_finds_each_sandbox_network_again() {
    let settings = Settings::default();
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &settings);
    let (client, _) = connect(&manager, Owner::new("test-session"), &settings).await;
    let request = json!({"network": {"mode": "allowlist", "allow": ["*.example.com"]}});
    let id = id_of(&ok("create", &call(&client, "create_sandbox", request).await)["sandbox"]);
    ok("pause", &call(&client, "pause", json!({"sandbox_id": id})).await);
    let _ = client.cancel().await;
    drop(manager);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let manager = open_manager(dir.path(), &settings);
    let (client, _) = connect(&manager, Owner::new("test-session"), &settings).await;
    let listed = ok("list", &call(&client, "list_sandboxes", json!({})).await);
    assert_eq!(network_of(&listed, &id), "allowlist");
    let _ = client.cancel().await;
    drop(manager);

    // The admin narrows the server to no network: the sandbox's own layer is kept, the
    // server's bounds it.
    let narrowed = with_ceiling(NetworkPolicy::new(NetworkMode::None, &[], &[]).unwrap());
    let manager = open_manager(dir.path(), &narrowed);
    let (client, _) = connect(&manager, Owner::new("test-session"), &narrowed).await;
    let listed = ok("list", &call(&client, "list_sandboxes", json!({})).await);
    assert_eq!(network_of(&listed, &id), "none");
    let record = manager.registry().load_live().unwrap().into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(manager.network_policy(&record).mode(), NetworkMode::None);
    manager.kill_all().await;
    let _ = client.cancel().await;
}

#[tokio::test]
async fn refusals_of_an_attached_worker_channel_reach_the_next_command_result() {
    use capsule_vmm::net::broker::{self, BrokerToWorker, WorkerToBroker};
    let f = Fixture::default().await;
    let id = id_of(&ok("run", &f.call("run_command", json!({"command": "true"})).await));
    let (daemon, worker) = broker::seqpacket_pair().unwrap();
    f.manager.attach_network(&id, daemon).expect("attached");
    let connect =
        WorkerToBroker::Connect { id: 1, dst: "10.1.2.3:5432".parse().unwrap(), name: None, first_bytes: None };
    let answer = tokio::task::spawn_blocking(move || {
        broker::send(&worker, &connect, None).unwrap();
        broker::receive::<BrokerToWorker>(&worker).unwrap().0
    });
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await.expect("answered").unwrap();
    assert!(matches!(&answer, BrokerToWorker::Refused { id: 1, reason } if reason.contains("private")), "{answer:?}");
    let r = f.call("run_command", json!({"command": "echo hi"})).await;
    let t = text(&r);
    assert!(t.contains("[network refused]\nrefused TCP to 10.1.2.3:5432 ("), "{t}");
    let again = text(&f.call("run_command", json!({"command": "echo hi"})).await);
    assert!(!again.contains("network refused"), "told once: {again}");
    f.cleanup().await;
}
