//! `capsule serve`: resolve settings, pick an engine, open the registry and
//! the sandbox manager, start the timers, and serve MCP over stdio or HTTP.
//!
//! Logs go to stderr only: stdout is the stdio transport. On shutdown every
//! running sandbox is paused, so a restarted server finds it resumable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capsule_vmm::worker::error_chain;
use rmcp::ServiceExt;

use crate::config::{self, ConfigError, FileConfig, Limits, Timers};
use crate::engine::kvm::{host_refusal, KvmEngine, WarmUp};
use crate::engine::test_engine::{locate_agent_binary, TestEngine};
use crate::engine::{Engine, EngineError};
use crate::image::{current_image, ensure_image, BuildOptions, Flavour, StderrProgress, KERNEL_PATCHES_ENV};
use crate::mcp::http::{self, HttpError, HttpOptions};
use crate::mcp::shaping::Shaping;
use crate::mcp::CapsuleMcp;
use crate::registry::{Registry, RegistryError};
use crate::sandbox::{timers, Manager, ManagerConfig, ManagerError, Owner};

/// The MCP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// MCP over stdin/stdout (for clients that start capsule themselves).
    Stdio,
    /// Streamable HTTP at /mcp.
    Http,
}

/// Which engine runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// The best engine this host supports.
    Auto,
    /// The embedded KVM VMM.
    Kvm,
    /// Test only: the agent as a host process, with NO isolation.
    Test,
}

/// Arguments of `capsule serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// MCP transport.
    #[arg(long, value_enum, default_value = "stdio", env = "CAPSULE_TRANSPORT")]
    pub transport: Transport,
    /// Address for --transport http (loopback by default; off loopback needs --token).
    #[arg(long, default_value = "127.0.0.1:8765", env = "CAPSULE_LISTEN")]
    pub listen: SocketAddr,
    /// Bearer token required on every HTTP request.
    #[arg(long, env = "CAPSULE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Allow this browser Origin (besides loopback ones); repeatable.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Let every HTTP session see every sandbox (default: each session sees its own).
    #[arg(long, env = "CAPSULE_SHARED_SANDBOXES")]
    pub shared_sandboxes: bool,
    /// Sandbox engine.
    #[arg(long, value_enum, env = "CAPSULE_ENGINE")]
    pub engine: Option<EngineChoice>,
    /// Allow the test engine (no isolation) in a release build.
    #[arg(long)]
    pub unsafe_test_engine: bool,
    /// State directory (registry and sandboxes). Default: $XDG_STATE_HOME/capsule or ~/.local/state/capsule.
    #[arg(long, env = "CAPSULE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// TOML config file (limits, timers, engine, state_dir).
    #[arg(long, env = "CAPSULE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Most sandboxes alive at once.
    #[arg(long, env = "CAPSULE_MAX_SANDBOXES")]
    pub max_sandboxes: Option<u32>,
    /// Most vCPUs per sandbox.
    #[arg(long, env = "CAPSULE_MAX_VCPUS")]
    pub max_vcpus: Option<u32>,
    /// Most memory per sandbox, in MiB.
    #[arg(long, env = "CAPSULE_MAX_MEMORY_MIB")]
    pub max_memory_mib: Option<u32>,
    /// Most disk per sandbox, in MiB.
    #[arg(long, env = "CAPSULE_MAX_DISK_MIB")]
    pub max_disk_mib: Option<u32>,
    /// Memory budget of all running sandboxes together, in MiB.
    #[arg(long, env = "CAPSULE_MEMORY_BUDGET_MIB")]
    pub memory_budget_mib: Option<u64>,
    /// Pause a sandbox after this long without calls (e.g. 10m, 30s, 500ms).
    #[arg(long, env = "CAPSULE_IDLE_PAUSE_AFTER")]
    pub idle_pause_after: Option<String>,
    /// Delete a paused sandbox after this long (e.g. 7d).
    #[arg(long, env = "CAPSULE_RETENTION")]
    pub retention: Option<String>,
    /// Most bytes of each output stream placed in one result.
    #[arg(long, env = "CAPSULE_OUTPUT_CAP_BYTES")]
    pub output_cap_bytes: Option<usize>,
}

/// Errors of `capsule serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No engine can run.
    #[error("{0}")]
    NoEngine(String),
    /// The engine could not start.
    #[error("cannot start the sandbox engine")]
    Engine(#[source] EngineError),
    /// The registry could not be opened.
    #[error("cannot open the registry")]
    Registry(#[source] RegistryError),
    /// The manager could not load the registry's sandboxes.
    #[error("cannot load sandboxes")]
    Manager(#[source] ManagerError),
    /// HTTP settings are unsafe or invalid.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// I/O (runtime, socket).
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The MCP transport failed.
    #[error("the MCP transport failed: {0}")]
    Transport(String),
}

/// Everything `serve` resolved from defaults, the config file, env and flags.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// State directory.
    pub state_dir: PathBuf,
    /// Engine choice.
    pub engine: EngineChoice,
    /// Manager settings.
    pub manager: ManagerConfig,
    /// Result shaping.
    pub shaping: Shaping,
}

/// Resolves the settings (flags and env beat the config file, which beats defaults).
pub fn resolve(args: &ServeArgs) -> Result<Resolved, ServeError> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let d = Limits::default();
    let limits = Limits {
        max_sandboxes: args.max_sandboxes.or(file.limits.max_sandboxes).unwrap_or(d.max_sandboxes),
        max_vcpus: args.max_vcpus.or(file.limits.max_vcpus).unwrap_or(d.max_vcpus),
        max_memory_mib: args.max_memory_mib.or(file.limits.max_memory_mib).unwrap_or(d.max_memory_mib),
        max_disk_mib: args.max_disk_mib.or(file.limits.max_disk_mib).unwrap_or(d.max_disk_mib),
        memory_budget_mib: args.memory_budget_mib.or(file.limits.memory_budget_mib).unwrap_or(d.memory_budget_mib),
        max_fork_count: d.max_fork_count,
        default_vcpus: d.default_vcpus,
        default_memory_mib: file.limits.default_memory_mib.unwrap_or(d.default_memory_mib),
        default_disk_mib: file.limits.default_disk_mib.unwrap_or(d.default_disk_mib),
    };
    let t = Timers::default();
    let duration = |flag: &Option<String>, file: &Option<String>, default| -> Result<Duration, ConfigError> {
        match flag.as_ref().or(file.as_ref()) {
            Some(text) => config::parse_duration(text),
            None => Ok(default),
        }
    };
    let timers = Timers {
        idle_pause_after: duration(&args.idle_pause_after, &file.timers.idle_pause_after, t.idle_pause_after)?,
        retention: duration(&args.retention, &file.timers.retention, t.retention)?,
    };
    let engine = match (args.engine, file.engine.as_deref()) {
        (Some(e), _) => e,
        (None, None) => EngineChoice::Auto,
        (None, Some(name)) => <EngineChoice as clap::ValueEnum>::from_str(name, true).map_err(|_| {
            ServeError::NoEngine(format!("unknown engine {name:?} in the config file: use auto, kvm or test"))
        })?,
    };
    Ok(Resolved {
        state_dir: args.state_dir.clone().or(file.state_dir).unwrap_or_else(config::default_state_dir),
        engine,
        manager: ManagerConfig { limits, timers },
        shaping: Shaping {
            output_cap_bytes: args
                .output_cap_bytes
                .or(file.output_cap_bytes)
                .unwrap_or(config::DEFAULT_OUTPUT_CAP_BYTES)
                .max(256),
        },
    })
}

/// Why no engine runs when the KVM engine cannot (`why`), and what would fix it.
fn no_kvm_engine(why: &str) -> ServeError {
    ServeError::NoEngine(format!(
        "no sandbox engine can run here: the KVM engine cannot start: {why}. Run `capsule doctor` to \
         see what this host supports (KVM access, PVM or VT-x/AMD-V). For development only, \
         `--engine test` runs each sandbox as a host process WITHOUT isolation."
    ))
}

/// The KVM engine for `capsule serve`, or why this host cannot run it: checks the host (as
/// `capsule doctor` does), finds the guest image, and runs VM workers from this very executable
/// (`capsule worker`). With `build_missing_image` a missing image is built first (progress on
/// stderr; the first build takes many minutes); without it a missing image is a reason saying how
/// to build one. Sandboxes live under `root`; templates warm the default Python context of
/// `run_code`.
fn kvm_engine(root: PathBuf, build_missing_image: bool) -> Result<KvmEngine, String> {
    let report = capsule_vmm::doctor::probe();
    if let Some(why) = host_refusal(&report) {
        return Err(why);
    }
    let pvm = report.virtualization == capsule_vmm::doctor::Virtualization::Pvm;
    if let Err(missing) = current_image() {
        if !build_missing_image {
            return Err(format!("{}; `--engine kvm` builds it on start", error_chain(&missing)));
        }
        if pvm && std::env::var_os(KERNEL_PATCHES_ENV).is_none() {
            return Err(format!(
                "no guest image is built yet, and this PVM host needs a kernel with the PVM guest \
                 patch: run `capsule image build --kernel-patch \
                 /path/to/pvm-native-guest-6.12.117.patch` (or set {KERNEL_PATCHES_ENV})"
            ));
        }
        eprintln!("capsule: no guest image yet; building it (the first build takes many minutes)");
    }
    let image = ensure_image(&BuildOptions::default(), &StderrProgress::new()).map_err(|e| {
        format!("the guest image is missing and could not be built: {}; run `capsule image build`", error_chain(&e))
    })?;
    if pvm && image.flavour != Flavour::Pvm {
        return Err(format!(
            "the current guest image has a {} kernel, which this PVM host can only emulate (about a \
             thousand times slower); rebuild it with `capsule image build --flavour pvm --kernel-patch \
             /path/to/pvm-native-guest-6.12.117.patch`",
            image.flavour
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the running executable to start VM workers from: {e}"))?;
    KvmEngine::new(exe, image, root, default_warm_up()).map_err(|e| error_chain(&e))
}

/// What templates run before they are saved: the built-in warm-up in the context `run_code`
/// uses when a call names none (the Python language's name in the tool contract), so that every
/// sandbox starts with those libraries imported.
pub fn default_warm_up() -> WarmUp {
    WarmUp::python(capsule_tool_schemas::Language::Python.as_str())
}

/// Whether the test engine may run: always in debug builds, in release builds
/// only with `--unsafe-test-engine`.
pub fn test_engine_allowed(debug_build: bool, unsafe_test_engine: bool) -> Result<(), ServeError> {
    if debug_build || unsafe_test_engine {
        return Ok(());
    }
    Err(ServeError::NoEngine(
        "the test engine runs sandboxes as host processes with NO isolation; a release build \
         only allows it with --unsafe-test-engine"
            .into(),
    ))
}

/// Picks the engine, or says why none can run and what would fix it.
pub fn choose_engine(
    choice: EngineChoice,
    unsafe_test_engine: bool,
    state_dir: &std::path::Path,
) -> Result<Arc<dyn Engine>, ServeError> {
    match choice {
        // Auto takes KVM, the only isolating engine, when an image is built; `--engine kvm`
        // builds a missing image first. The test engine is never picked silently.
        EngineChoice::Kvm | EngineChoice::Auto => {
            match kvm_engine(state_dir.join("sandboxes"), choice == EngineChoice::Kvm) {
                Ok(engine) => Ok(Arc::new(engine)),
                Err(why) => Err(no_kvm_engine(&why)),
            }
        }
        EngineChoice::Test => {
            test_engine_allowed(cfg!(debug_assertions), unsafe_test_engine)?;
            eprintln!(
                "capsule: WARNING: using the TEST engine: sandboxes are plain host processes with NO isolation. \
                 Never use it with untrusted code."
            );
            let agent = locate_agent_binary().map_err(|e| ServeError::Engine(e.into()))?;
            let engine =
                TestEngine::new(agent, state_dir.join("sandboxes")).map_err(|e| ServeError::Engine(e.into()))?;
            Ok(Arc::new(engine))
        }
    }
}

/// Runs `capsule serve`.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG").unwrap_or_else(|_| "capsule=info".into()),
        )
        .try_init();
    let resolved = resolve(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io { what: "cannot start the async runtime".into(), source })?;
    runtime.block_on(serve(args, resolved))
}

async fn serve(args: ServeArgs, resolved: Resolved) -> Result<(), ServeError> {
    let engine = choose_engine(resolved.engine, args.unsafe_test_engine, &resolved.state_dir)?;
    let registry = Registry::open(&resolved.state_dir).map_err(ServeError::Registry)?;
    let manager = Manager::open(engine, registry, resolved.manager.clone()).map_err(ServeError::Manager)?;
    tracing::info!(
        engine = manager.engine_name(),
        state_dir = %resolved.state_dir.display(),
        "capsule serve starting"
    );
    let timer_task = timers::spawn(manager.clone());
    let result = match args.transport {
        Transport::Stdio => serve_stdio(manager.clone(), resolved.shaping).await,
        Transport::Http => {
            let opts = HttpOptions {
                listen: args.listen,
                token: args.token.clone(),
                allowed_origins: args.allow_origins.clone(),
                shared_sandboxes: args.shared_sandboxes,
            };
            serve_http(manager.clone(), resolved.shaping, &opts).await
        }
    };
    timer_task.abort();
    manager.pause_all().await;
    result
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn serve_stdio(manager: Manager, shaping: Shaping) -> Result<(), ServeError> {
    let handler = CapsuleMcp::new(manager, Owner::new("stdio"), shaping);
    let service = handler.serve(rmcp::transport::stdio()).await.map_err(|e| ServeError::Transport(e.to_string()))?;
    tokio::select! {
        r = service.waiting() => { r.map_err(|e| ServeError::Transport(e.to_string()))?; }
        _ = shutdown_signal() => {}
    }
    Ok(())
}

async fn serve_http(manager: Manager, shaping: Shaping, opts: &HttpOptions) -> Result<(), ServeError> {
    let (router, end_sessions) = http::router_with_shutdown(manager, shaping, opts)?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Io { what: format!("cannot listen on {}", opts.listen), source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Io { what: "cannot read the bound address".into(), source })?;
    // The one line on stderr that scripts wait for.
    eprintln!("capsule: serving MCP at http://{local}{}", http::MCP_PATH);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Open SSE streams would keep a graceful shutdown waiting forever.
            end_sessions();
        })
        .await
        .map_err(|source| ServeError::Io { what: "the HTTP server failed".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["capsule"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parse").serve
    }

    #[test]
    fn flags_beat_the_config_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capsule.toml");
        std::fs::write(
            &path,
            "engine = \"test\"\nstate_dir = \"/srv/capsule\"\n[limits]\nmax_sandboxes = 3\nmax_vcpus = 2\n[timers]\nidle_pause_after = \"2m\"\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let r = resolve(&args(&["--config", path, "--max-sandboxes", "5", "--retention", "1h"])).unwrap();
        assert_eq!(r.manager.limits.max_sandboxes, 5, "flag wins");
        assert_eq!(r.manager.limits.max_vcpus, 2, "file wins over default");
        assert_eq!(r.manager.limits.max_memory_mib, config::DEFAULT_MAX_MEMORY_MIB);
        assert_eq!(r.manager.timers.idle_pause_after, Duration::from_secs(120));
        assert_eq!(r.manager.timers.retention, Duration::from_secs(3600));
        assert_eq!(r.engine, EngineChoice::Test);
        assert_eq!(r.state_dir, PathBuf::from("/srv/capsule"));
        assert!(resolve(&args(&["--idle-pause-after", "soon"])).is_err());
    }

    #[test]
    fn release_builds_refuse_the_test_engine_without_the_unsafe_flag() {
        let Err(ServeError::NoEngine(why)) = test_engine_allowed(false, false) else {
            panic!("a release build must refuse the test engine");
        };
        assert!(why.contains("--unsafe-test-engine"), "{why}");
        assert!(test_engine_allowed(false, true).is_ok());
        assert!(test_engine_allowed(true, false).is_ok());
    }

    #[test]
    fn no_engine_means_an_explanation_that_names_capsule_doctor() {
        let ServeError::NoEngine(why) = no_kvm_engine("no /dev/kvm") else {
            panic!("must be NoEngine");
        };
        assert!(why.contains("no /dev/kvm"), "{why}");
        assert!(why.contains("capsule doctor"), "{why}");
        assert!(why.contains("--engine test"), "{why}");
    }
}
