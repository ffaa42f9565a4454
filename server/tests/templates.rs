//! What sandboxes made from a saved template start with, in-process over the test engine:
//! the saved sandbox's environment and network come with the template, a create's own `env`
//! and `network` win over them, `list_templates` shows both, and a template whose network
//! the server no longer allows is refused naming the template and what to do.

#![allow(deprecated)]

mod common;

use capsule::network::NetworkPolicy;
use capsule::sandbox::Owner;
use capsule_tool_schemas::NetworkMode;
use common::*;
use serde_json::{json, Value};

fn listed_network(listed: &Value, id: &str) -> Value {
    let sandboxes = listed["sandboxes"].as_array().unwrap();
    sandboxes.iter().find(|s| s["sandbox_id"] == id).unwrap_or_else(|| panic!("{id} not in {listed}"))["network"]
        .clone()
}

async fn echo(f: &Fixture, id: &str, what: &str) -> String {
    let r = f.call("run_command", json!({"command": format!("echo {what}"), "sandbox_id": id})).await;
    ok("echo", &r)["stdout"].as_str().unwrap().trim_end().to_string()
}

#[tokio::test]
async fn a_template_gives_its_sandboxes_its_env_and_network_unless_their_create_names_others() {
    let f = Fixture::default().await;
    let source = json!({"env": {"GREETING": "hello", "KEEP": "kept"}, "network": {"mode": "none"},
                        "make_default": false});
    let source_id = id_of(&ok("create", &f.call("create_sandbox", source).await)["sandbox"]);
    let saved = ok("save", &f.call("save_template", json!({"sandbox_id": source_id, "name": "envy"})).await);
    assert_eq!(saved["template"]["env"], json!({"GREETING": "hello", "KEEP": "kept"}));
    assert_eq!(saved["template"]["network"]["mode"], "none");
    let listed = ok("list_templates", &f.call("list_templates", json!({})).await);
    let envy = listed["templates"].as_array().unwrap().iter().find(|t| t["name"] == "envy").unwrap().clone();
    assert_eq!(envy["network"]["mode"], "none", "{listed}");
    assert!(listed["templates"][0].get("env").is_none(), "the built-in template sets no env: {listed}");

    let plain = ok("create", &f.call("create_sandbox", json!({"template": "envy", "make_default": false})).await);
    let plain_id = id_of(&plain["sandbox"]);
    assert_eq!(plain["sandbox"]["network"], "none", "the template's network: {plain}");
    assert_eq!(echo(&f, &plain_id, "$GREETING-$KEEP").await, "hello-kept");

    let own = json!({"template": "envy", "env": {"GREETING": "hi", "MORE": "more"},
                     "network": {"mode": "allowlist", "allow": ["*.example.com"]}, "make_default": false});
    let own = ok("create own", &f.call("create_sandbox", own).await);
    let own_id = id_of(&own["sandbox"]);
    assert_eq!(echo(&f, &own_id, "$GREETING-$KEEP-$MORE").await, "hi-kept-more", "the create's env wins");
    let sandboxes = ok("list", &f.call("list_sandboxes", json!({})).await);
    assert_eq!(listed_network(&sandboxes, &own_id), "allowlist", "the create's network wins");
    assert_eq!(listed_network(&sandboxes, &plain_id), "none");

    let records = f.manager.registry().load_live().unwrap();
    let kept = records.iter().find(|r| r.id == plain_id).unwrap();
    assert_eq!(kept.env.get("GREETING").map(String::as_str), Some("hello"), "the record holds the env");
    assert_eq!(kept.settings.network.as_ref().map(|n| n.mode), Some(NetworkMode::None));
    f.cleanup().await;
}

#[tokio::test]
async fn a_template_whose_network_the_server_no_longer_allows_is_refused_naming_it() {
    let settings = Settings::default();
    let dir = tempfile::Builder::new().prefix("capsule-t").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &settings);
    let (client, _) = connect(&manager, Owner::new("test-session"), &settings).await;
    let request = json!({"network": {"mode": "allowlist", "allow": ["*.example.com"]}});
    let id = id_of(&ok("create", &call(&client, "create_sandbox", request).await)["sandbox"]);
    ok("save", &call(&client, "save_template", json!({"sandbox_id": id, "name": "fenced"})).await);
    manager.kill_all().await;
    let _ = client.cancel().await;
    drop(manager);

    let narrowed = Settings { network: NetworkPolicy::new(NetworkMode::None, &[], &[]).unwrap(), ..settings };
    let manager = open_manager(dir.path(), &narrowed);
    let (client, _) = connect(&manager, Owner::new("test-session"), &narrowed).await;
    let r = call(&client, "create_sandbox", json!({"template": "fenced"})).await;
    assert!(is_error(&r), "{}", text(&r));
    let t = text(&r);
    assert!(
        t.contains("template \"fenced\" gives its sandboxes the network it was saved with")
            && t.contains("this server allows no network")
            && t.contains("pass create_sandbox a network that fits"),
        "{t}"
    );
    let made = ok(
        "create none",
        &call(
            &client,
            "create_sandbox",
            json!({"template": "fenced",
                                                                       "network": {"mode": "none"}}),
        )
        .await,
    );
    assert_eq!(made["sandbox"]["network"], "none");
    manager.kill_all().await;
    let _ = client.cancel().await;
}
