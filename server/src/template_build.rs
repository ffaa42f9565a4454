//! `capsule template build FILE`: a template declared in a TOML spec, built by booting its base
//! in a sandbox of the host's daemon, running the spec's steps there with progress shown, and
//! saving the result the way `save_template` saves a sandbox (memory and disk).
//!
//! ```toml
//! name = "data-science"
//! base = "default"                  # another template; default `default`
//! description = "scikit-learn and seaborn, imported"
//! apt = ["jq"]                      # apt-get install
//! pip = ["scikit-learn", "seaborn"] # pip install
//! npm = ["typescript"]              # npm install -g
//! files = [{ from = "data/iris.csv", to = "/root/iris.csv" }]   # from: relative to the spec
//! run = ["python3 -c 'import sklearn; print(sklearn.__version__)'"]
//! env = { MPLBACKEND = "Agg" }      # for the build and the sandboxes made from it
//! warm = "import sklearn, seaborn"  # run in the default Python context just before saving
//! network = { mode = "public" }     # the build's and its sandboxes' network (create_sandbox's)
//! memory_mib = 1024                 # the template's size (fixed by its memory image)
//! disk_mib = 4096
//! vcpus = 1
//! ```
//!
//! The template is keyed by a content hash of the spec, its files and its base (the image
//! version for `default`, the saved template's own hash or time otherwise): a rebuild with
//! nothing changed does nothing. A failing step stops the build with that step's output and
//! exit code, and its sandbox is deleted, so nothing is half-built; an older template of the
//! same name is replaced only once the new one is ready. Built templates belong to the host
//! (every client lists them).
//!
//! It speaks MCP to the daemon (starting it as `capsule serve` would), so the daemon stays the
//! one owner of the state directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::registry::Registry;
use crate::sandbox::admission::DEFAULT_TEMPLATE;
use crate::sandbox::templates::bad_template_name;
use crate::settings::SettingsArgs;

/// The owner name the builder acts as.
pub const BUILDER_OWNER: &str = "capsule-template-build";
/// Longest file a spec may copy in (what one `write_file` takes).
const MAX_FILE_BYTES: u64 = capsule_tool_schemas::MAX_WRITE_BYTES;
/// How often a long step says it is still running.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Time limit of one step, in seconds (the tools' largest).
const STEP_TIMEOUT_S: u64 = capsule_tool_schemas::MAX_TIMEOUT_S;

/// Errors of `capsule template build`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The spec file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spec is not valid TOML for a template.
    #[error("{path} is not a template spec")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// A field of the spec is wrong.
    #[error("{field}: {why}")]
    Field {
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Settings could not be resolved.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// The daemon could not be reached.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::client::ClientError),
    /// The old template of the name could not be replaced.
    #[error(transparent)]
    Replace(#[from] crate::template_cli::TemplateCliError),
    /// An MCP call failed at the protocol level.
    #[error("the daemon's MCP call {what} failed: {why}")]
    Mcp {
        /// The call.
        what: String,
        /// Why.
        why: String,
    },
    /// A step failed; its output was printed.
    #[error("step {step} failed: {why}; nothing was saved")]
    Step {
        /// Which step.
        step: String,
        /// How it ended.
        why: String,
    },
}

/// One file a spec copies in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// The host file, relative to the spec's directory (or absolute).
    pub from: PathBuf,
    /// The absolute guest path.
    pub to: String,
}

/// A template spec, as the TOML file declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The template's name.
    pub name: String,
    /// The template it starts from (default `default`).
    #[serde(default)]
    pub base: Option<String>,
    /// What it holds.
    #[serde(default)]
    pub description: Option<String>,
    /// Debian packages.
    #[serde(default)]
    pub apt: Vec<String>,
    /// Python packages.
    #[serde(default)]
    pub pip: Vec<String>,
    /// npm packages, installed globally.
    #[serde(default)]
    pub npm: Vec<String>,
    /// Files copied in from the host.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Shell commands, in order.
    #[serde(default)]
    pub run: Vec<String>,
    /// Environment of the build's commands and, kept by the template, of its sandboxes.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Python run in the default context just before the template is saved.
    #[serde(default)]
    pub warm: Option<String>,
    /// The network of the build sandbox and, kept by the template, of its sandboxes (as
    /// `create_sandbox` takes it).
    #[serde(default)]
    pub network: Option<Value>,
    /// Memory, in MiB.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Writable disk, in MiB.
    #[serde(default)]
    pub disk_mib: Option<u32>,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
}

fn field(field: &str, why: impl Into<String>) -> BuildError {
    BuildError::Field { field: field.to_string(), why: why.into() }
}

/// Parses and checks the spec in `text` (from a file in `dir`).
pub fn parse_spec(path: &Path, text: &str) -> Result<TemplateSpec, BuildError> {
    let spec: TemplateSpec =
        toml::from_str(text).map_err(|source| BuildError::Parse { path: path.to_path_buf(), source })?;
    validate(&spec, path.parent().unwrap_or(Path::new(".")))?;
    Ok(spec)
}

/// Checks every field of `spec`; file paths are relative to `dir`.
pub fn validate(spec: &TemplateSpec, dir: &Path) -> Result<(), BuildError> {
    if spec.name == DEFAULT_TEMPLATE {
        return Err(field(
            "name",
            "\"default\" is the built-in template: `capsule image build` installs its apt packages \
             (templates/default.toml) and the server warms it; give this template another name",
        ));
    }
    if let Some(why) = bad_template_name(&spec.name) {
        return Err(field("name", why));
    }
    if spec.base.as_deref() == Some(spec.name.as_str()) {
        return Err(field("base", "a template cannot be built on itself"));
    }
    let package = |kind: &str, list: &[String]| -> Result<(), BuildError> {
        for (i, p) in list.iter().enumerate() {
            let bad = p.is_empty() || p.starts_with('-') || p.chars().any(|c| c.is_whitespace() || c == '\'');
            if bad {
                return Err(field(
                    &format!("{kind}[{i}]"),
                    format!("{p:?} is not a package name (no spaces, quotes or leading '-')"),
                ));
            }
        }
        Ok(())
    };
    package("apt", &spec.apt)?;
    package("pip", &spec.pip)?;
    package("npm", &spec.npm)?;
    for (i, f) in spec.files.iter().enumerate() {
        let from = dir.join(&f.from);
        let meta = std::fs::metadata(&from)
            .map_err(|e| field(&format!("files[{i}].from"), format!("{}: {e}", from.display())))?;
        if !meta.is_file() {
            return Err(field(&format!("files[{i}].from"), format!("{} is not a file", from.display())));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(field(
                &format!("files[{i}].from"),
                format!("{} is larger than {MAX_FILE_BYTES} bytes", from.display()),
            ));
        }
        if !f.to.starts_with('/') {
            return Err(field(&format!("files[{i}].to"), format!("{:?} is not an absolute guest path", f.to)));
        }
    }
    if let Some(i) = spec.run.iter().position(|r| r.trim().is_empty()) {
        return Err(field(&format!("run[{i}]"), "an empty command"));
    }
    if let Some(key) = spec.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(field("env", format!("{key:?} is not an environment variable name")));
    }
    if spec.warm.as_ref().is_some_and(|w| w.trim().is_empty()) {
        return Err(field("warm", "empty code"));
    }
    if let Some(net) = &spec.network {
        if serde_json::from_value::<capsule_tool_schemas::NetworkRequest>(net.clone()).is_err() {
            return Err(field("network", format!("{net} is not a network policy (see create_sandbox's network)")));
        }
    }
    for (name, value, min, max) in [
        ("memory_mib", spec.memory_mib, 128, u32::MAX),
        ("disk_mib", spec.disk_mib, 64, u32::MAX),
        ("vcpus", spec.vcpus, 1, 256),
    ] {
        if value.is_some_and(|v| v < min || v > max) {
            return Err(field(name, format!("{} is out of range (at least {min})", value.unwrap_or_default())));
        }
    }
    Ok(())
}

/// The content hash of `spec`, its files (read from `dir`) and its base's identity.
pub fn spec_hash(spec: &TemplateSpec, dir: &Path, base_identity: &str) -> Result<String, BuildError> {
    let mut hasher = Sha256::new();
    let canonical = serde_json::to_vec(spec).unwrap_or_default();
    for part in [b"capsule-template-1".as_slice(), &canonical, base_identity.as_bytes()] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    for (i, f) in spec.files.iter().enumerate() {
        let bytes = std::fs::read(dir.join(&f.from))
            .map_err(|e| field(&format!("files[{i}].from"), format!("{}: {e}", f.from.display())))?;
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// One step of a build: what it shows, and the tool call that does it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What the progress line says.
    pub label: String,
    /// The tool.
    pub tool: &'static str,
    /// Its arguments (without the sandbox).
    pub args: Value,
}

/// The steps of `spec` (files read from `dir`), in order: files (so that packages may use them:
/// a requirements file, a certificate), apt, pip, npm, run, warm.
pub fn steps(spec: &TemplateSpec, dir: &Path) -> Result<Vec<Step>, BuildError> {
    let mut steps = Vec::new();
    let command = |label: String, command: String| Step {
        label,
        tool: "run_command",
        args: json!({ "command": command, "timeout_s": STEP_TIMEOUT_S }),
    };
    for (i, f) in spec.files.iter().enumerate() {
        let bytes = std::fs::read(dir.join(&f.from))
            .map_err(|e| field(&format!("files[{i}].from"), format!("{}: {e}", f.from.display())))?;
        steps.push(Step {
            label: format!("file: {} -> {}", f.from.display(), f.to),
            tool: "write_file",
            args: json!({
                "path": f.to,
                "content": base64::engine::general_purpose::STANDARD.encode(bytes),
                "encoding": "base64",
            }),
        });
    }
    if !spec.apt.is_empty() {
        let (pkgs, quoted) = (spec.apt.join(" "), shell_words(&spec.apt));
        steps.push(command(
            format!("apt: {pkgs}"),
            format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                 {quoted}"
            ),
        ));
    }
    if !spec.pip.is_empty() {
        let (pkgs, quoted) = (spec.pip.join(" "), shell_words(&spec.pip));
        steps.push(command(
            format!("pip: {pkgs}"),
            format!("python3 -m pip install --no-input --progress-bar off {quoted}"),
        ));
    }
    if !spec.npm.is_empty() {
        let (pkgs, quoted) = (spec.npm.join(" "), shell_words(&spec.npm));
        steps.push(command(format!("npm: {pkgs}"), format!("npm install -g --no-fund --no-audit {quoted}")));
    }
    for (i, r) in spec.run.iter().enumerate() {
        steps.push(command(format!("run[{i}]: {r}"), r.clone()));
    }
    if let Some(code) = &spec.warm {
        steps.push(Step {
            label: "warm".to_string(),
            tool: "run_code",
            args: json!({ "code": code, "timeout_s": STEP_TIMEOUT_S }),
        });
    }
    Ok(steps)
}

/// `words` as one shell command line, each single-quoted (a package spec such as `numpy>=2` is
/// then not a redirection; validation refused single quotes in them).
fn shell_words(words: &[String]) -> String {
    words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ")
}

/// Why a step's result is a failure (`None`: it succeeded), and the output to show.
fn step_outcome(result: &CallToolResult) -> (Option<String>, String) {
    let text: String = result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect();
    if result.is_error == Some(true) {
        return (Some("the tool refused it".into()), text);
    }
    let s = result.structured_content.clone().unwrap_or(Value::Null);
    let output = format!(
        "{}{}",
        s.get("stdout").and_then(Value::as_str).unwrap_or_default(),
        s.get("stderr").and_then(Value::as_str).unwrap_or_default()
    );
    if let Some(error) = s.get("error").filter(|e| !e.is_null()) {
        return (
            Some(format!("it raised {}", error.get("ename").and_then(Value::as_str).unwrap_or("an error"))),
            format!("{output}{text}"),
        );
    }
    if s.get("timed_out").and_then(Value::as_bool) == Some(true) {
        return (Some(format!("it ran past {STEP_TIMEOUT_S} s")), output);
    }
    match s.get("exit_code").and_then(Value::as_i64) {
        Some(0) | None => (None, output),
        Some(code) => (Some(format!("exit code {code}")), output),
    }
}

/// The last non-empty line of `text`, shortened.
fn last_line(text: &str) -> String {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    line.chars().take(160).collect()
}

/// Builds the template of the spec at `path` (unless one of the same hash exists); returns a
/// sentence saying what was done.
pub fn build(path: &Path, settings: &SettingsArgs) -> Result<String, BuildError> {
    let text = std::fs::read_to_string(path).map_err(|source| BuildError::Read { path: path.to_path_buf(), source })?;
    let spec = parse_spec(path, &text)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let resolved = crate::settings::resolve(settings)?;
    let registry = Registry::open(&resolved.state_dir)?;
    let base = spec.base.clone().unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    let base_identity = match registry.template(&base)? {
        Some(t) => t.spec_hash.clone().unwrap_or_else(|| format!("saved {}", t.created_ms)),
        None => crate::image::current_image().map(|i| i.version).unwrap_or_else(|_| "no image yet".into()),
    };
    let hash = spec_hash(&spec, &dir, &base_identity)?;
    if registry.template(&spec.name)?.is_some_and(|t| t.spec_hash.as_deref() == Some(hash.as_str())) {
        return Ok(format!("template {:?} is up to date (spec {hash}); nothing to build\n", spec.name));
    }
    let steps = steps(&spec, &dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BuildError::Mcp { what: "start".into(), why: e.to_string() })?;
    runtime.block_on(run_build(&spec, &base, &steps, settings, &resolved, &registry, &hash))
}

async fn run_build(
    spec: &TemplateSpec,
    base: &str,
    steps: &[Step],
    settings: &SettingsArgs,
    resolved: &crate::settings::Resolved,
    registry: &Registry,
    hash: &str,
) -> Result<String, BuildError> {
    let started = Instant::now();
    let client = connect(settings, resolved).await?;
    let mut create = json!({ "template": base, "make_default": false, "name": format!("build of {}", spec.name) });
    for (key, value) in [("memory_mib", spec.memory_mib), ("disk_mib", spec.disk_mib), ("vcpus", spec.vcpus)] {
        if let Some(v) = value {
            create[key] = json!(v);
        }
    }
    if !spec.env.is_empty() {
        create["env"] = json!(spec.env);
    }
    if let Some(net) = &spec.network {
        create["network"] = net.clone();
    }
    eprintln!("capsule template build {}: booting {base}", spec.name);
    let made = call(&client, "create_sandbox", create).await?;
    let (failed, text) = step_outcome(&made);
    if let Some(why) = failed {
        return Err(BuildError::Step { step: "create_sandbox".into(), why: format!("{why}: {text}") });
    }
    let sandbox = made
        .structured_content
        .as_ref()
        .and_then(|s| s["sandbox"]["sandbox_id"].as_str())
        .unwrap_or_default()
        .to_string();
    let outcome = run_steps(&client, &sandbox, steps).await;
    let saved = match outcome {
        Ok(()) => save(&client, registry, resolved, spec, &sandbox, hash).await,
        Err(e) => Err(e),
    };
    let _ = call(&client, "kill_sandbox", json!({ "sandbox_id": sandbox })).await;
    let _ = client.cancel().await;
    saved?;
    Ok(format!(
        "built template {:?} (spec {hash}) in {:.1} s; start sandboxes from it with create_sandbox {{\"template\": {:?}}}\n",
        spec.name,
        started.elapsed().as_secs_f64(),
        spec.name
    ))
}

async fn run_steps(
    client: &RunningService<RoleClient, ClientConfig>,
    sandbox: &str,
    steps: &[Step],
) -> Result<(), BuildError> {
    for (i, step) in steps.iter().enumerate() {
        eprintln!("[{}/{}] {}", i + 1, steps.len(), step.label);
        let mut args = step.args.clone();
        args["sandbox_id"] = json!(sandbox);
        let step_started = Instant::now();
        let running = call(client, step.tool, args);
        tokio::pin!(running);
        let result = loop {
            tokio::select! {
                result = &mut running => break result?,
                () = tokio::time::sleep(HEARTBEAT) => {
                    eprintln!("      ... still running ({} s)", step_started.elapsed().as_secs());
                }
            }
        };
        let (failed, output) = step_outcome(&result);
        if let Some(why) = failed {
            eprintln!("      FAILED ({why}); its output:");
            for line in output.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev() {
                eprintln!("      | {line}");
            }
            return Err(BuildError::Step { step: format!("{} ({})", i + 1, step.label), why });
        }
        let line = last_line(&output);
        eprintln!(
            "      ok in {:.1} s{}",
            step_started.elapsed().as_secs_f64(),
            if line.is_empty() { String::new() } else { format!(": {line}") }
        );
    }
    Ok(())
}

async fn save(
    client: &RunningService<RoleClient, ClientConfig>,
    registry: &Registry,
    resolved: &crate::settings::Resolved,
    spec: &TemplateSpec,
    sandbox: &str,
    hash: &str,
) -> Result<(), BuildError> {
    // The new template is ready to be saved: only now does an older one of the name go.
    if registry.template(&spec.name)?.is_some() {
        crate::template_cli::remove(registry, &resolved.state_dir, &spec.name, true)?;
    }
    eprintln!("saving template {}", spec.name);
    let mut args = json!({ "sandbox_id": sandbox, "name": spec.name });
    if let Some(d) = &spec.description {
        args["description"] = json!(d);
    }
    let saved = call(client, "save_template", args).await?;
    if let (Some(why), text) = step_outcome(&saved) {
        return Err(BuildError::Step { step: "save_template".into(), why: format!("{why}: {text}") });
    }
    registry.mark_template_built(&spec.name, hash)?;
    Ok(())
}

async fn connect(
    settings: &SettingsArgs,
    resolved: &crate::settings::Resolved,
) -> Result<RunningService<RoleClient, ClientConfig>, BuildError> {
    use crate::daemon::client::{connect_or_start, greet};
    use crate::daemon::hello::{Hello, HELLO_VERSION};
    let stream = connect_or_start(settings, resolved)?;
    let hello = Hello::Mcp { version: HELLO_VERSION, owner: Some(BUILDER_OWNER.into()), settings: resolved.digest() };
    let (reader, _) = greet(&stream, &hello)?;
    if !reader.buffer().is_empty() {
        return Err(BuildError::Mcp { what: "connect".into(), why: "the daemon spoke before the client".into() });
    }
    stream.set_nonblocking(true).map_err(|e| BuildError::Mcp { what: "connect".into(), why: e.to_string() })?;
    let stream = tokio::net::UnixStream::from_std(stream)
        .map_err(|e| BuildError::Mcp { what: "connect".into(), why: e.to_string() })?;
    let (read, write) = stream.into_split();
    let config =
        ClientConfig::new(ClientCapabilities::default(), Implementation::new(BUILDER_OWNER, env!("CARGO_PKG_VERSION")));
    config.serve((read, write)).await.map_err(|e| BuildError::Mcp { what: "initialize".into(), why: e.to_string() })
}

async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    tool: &str,
    args: Value,
) -> Result<CallToolResult, BuildError> {
    let params =
        CallToolRequestParams::new(tool.to_string()).with_arguments(serde_json::from_value(args).unwrap_or_default());
    client.peer().call_tool(params).await.map_err(|e| BuildError::Mcp { what: tool.to_string(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_in(dir: &Path, text: &str) -> Result<TemplateSpec, BuildError> {
        let path = dir.join("t.toml");
        std::fs::write(&path, text).unwrap();
        parse_spec(&path, text)
    }

    #[test]
    fn a_complete_spec_parses_into_its_steps_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.csv"), b"a,b\n1,2\n").unwrap();
        let spec = spec_in(
            dir.path(),
            r#"
            name = "ds"
            description = "d"
            apt = ["jq"]
            pip = ["requests>=2.32"]
            npm = ["left-pad"]
            files = [{ from = "data.csv", to = "/root/data.csv" }]
            run = ["echo one", "echo two"]
            env = { A = "1" }
            warm = "import json"
            network = { mode = "none" }
            memory_mib = 1024
            "#,
        )
        .unwrap();
        let steps = steps(&spec, dir.path()).unwrap();
        let pip = steps.iter().find(|s| s.label.starts_with("pip")).unwrap();
        assert!(pip.args["command"]
            .as_str()
            .unwrap()
            .ends_with("install --no-input --progress-bar off 'requests>=2.32'"));
        let labels: Vec<String> = steps.into_iter().map(|s| s.label).collect();
        assert_eq!(
            labels,
            [
                "file: data.csv -> /root/data.csv",
                "apt: jq",
                "pip: requests>=2.32",
                "npm: left-pad",
                "run[0]: echo one",
                "run[1]: echo two",
                "warm"
            ]
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        for (text, names) in [
            (r#"name = "Bad Name""#, "name:"),
            (r#"name = "default""#, "name: \"default\" is the built-in template: `capsule image build`"),
            (
                r#"name = "ok"
            base = "ok""#,
                "base:",
            ),
            (
                r#"name = "ok"
            pip = ["-e /x"]"#,
                "pip[0]:",
            ),
            (
                r#"name = "ok"
            apt = ["jq", "a b"]"#,
                "apt[1]:",
            ),
            (
                r#"name = "ok"
            files = [{ from = "missing", to = "/x" }]"#,
                "files[0].from:",
            ),
            (
                r#"name = "ok"
            files = [{ from = "big", to = "/x" }]"#,
                "files[0].from:",
            ),
            (
                r#"name = "ok"
            run = [" "]"#,
                "run[0]:",
            ),
            (
                r#"name = "ok"
            env = { "A=B" = "1" }"#,
                "env:",
            ),
            (
                r#"name = "ok"
            warm = """#,
                "warm:",
            ),
            (
                r#"name = "ok"
            network = { mode = "everything" }"#,
                "network:",
            ),
            (
                r#"name = "ok"
            memory_mib = 1"#,
                "memory_mib:",
            ),
        ] {
            let err = spec_in(dir.path(), text).unwrap_err().to_string();
            assert!(err.starts_with(names), "{text}: {err}");
        }
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let err = spec_in(dir.path(), "name = \"ok\"\nfiles = [{ from = \"f\", to = \"rel\" }]").unwrap_err();
        assert!(err.to_string().starts_with("files[0].to:"), "{err}");
        let err = spec_in(dir.path(), "name = \"ok\"\nsurprise = 1").unwrap_err();
        assert!(matches!(err, BuildError::Parse { .. }), "{err}");
    }

    #[test]
    fn the_specs_in_the_repository_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("templates/") {
            let path = entry.unwrap().path();
            // The built-in one is checked by `builtin_template`'s tests: it is not built here.
            if path.extension().is_some_and(|e| e == "toml") && !path.ends_with("default.toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                parse_spec(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 1);
    }

    #[test]
    fn the_hash_follows_the_spec_its_files_and_its_base() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let spec = spec_in(dir.path(), "name = \"h\"\nfiles = [{ from = \"f\", to = \"/f\" }]").unwrap();
        let first = spec_hash(&spec, dir.path(), "image-1").unwrap();
        assert_eq!(first, spec_hash(&spec, dir.path(), "image-1").unwrap(), "stable");
        assert_ne!(first, spec_hash(&spec, dir.path(), "image-2").unwrap(), "another base");
        std::fs::write(dir.path().join("f"), b"two").unwrap();
        assert_ne!(first, spec_hash(&spec, dir.path(), "image-1").unwrap(), "another file content");
        let other =
            spec_in(dir.path(), "name = \"h\"\nrun = [\"true\"]\nfiles = [{ from = \"f\", to = \"/f\" }]").unwrap();
        assert_ne!(spec_hash(&other, dir.path(), "image-1").unwrap(), spec_hash(&spec, dir.path(), "image-1").unwrap());
    }

    #[test]
    fn a_failed_command_a_raised_error_and_a_refusal_are_failures() {
        let result = |structured: Value, is_error: bool| {
            let mut r = CallToolResult::success(vec![]);
            r.structured_content = Some(structured);
            r.is_error = Some(is_error);
            r
        };
        assert_eq!(step_outcome(&result(json!({"exit_code": 0, "stdout": "fine\n"}), false)).0, None);
        assert_eq!(step_outcome(&result(json!({"exit_code": 3}), false)).0.as_deref(), Some("exit code 3"));
        let raised = step_outcome(&result(json!({"error": {"ename": "ImportError"}}), false)).0;
        assert_eq!(raised.as_deref(), Some("it raised ImportError"));
        assert!(step_outcome(&result(json!({}), true)).0.is_some());
        assert_eq!(last_line("a\nlast one\n\n"), "last one");
    }
}
