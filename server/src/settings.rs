//! The daemon's settings as `capsule serve` and `capsule daemon` take them: the engine, the
//! state directory, the config file, limits, timers, the network policy and result shaping, resolved from defaults,
//! the TOML file, environment variables and flags (flags and env beat the file, which beats the
//! defaults).
//!
//! A `capsule serve` that has to start the daemon hands its settings on as flags
//! ([`SettingsArgs::to_args`]); a digest of the resolved settings ([`Resolved::digest`]) lets a
//! client see that the daemon it reached runs with other settings than its own.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use capsule_tool_schemas::NetworkMode;

use crate::config::{self, ConfigError, FileConfig, Limits, Timers};
use crate::mcp::shaping::Shaping;
use crate::network::{NetworkConfig, NetworkPolicy, PolicyError};
use crate::sandbox::ManagerConfig;

/// Which engine runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum EngineChoice {
    /// The best engine this host supports.
    Auto,
    /// The embedded KVM VMM.
    Kvm,
    /// Test only: the agent as a host process, with NO isolation.
    Test,
}

/// The network mode of the server's policy, as a flag takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum NetworkModeChoice {
    /// Public internet addresses (and the private ranges the config file's `allow` lists).
    Public,
    /// Only the names and ranges the config file's `allow` lists.
    Allowlist,
    /// No network for any sandbox.
    None,
}

impl From<NetworkModeChoice> for NetworkMode {
    fn from(choice: NetworkModeChoice) -> NetworkMode {
        match choice {
            NetworkModeChoice::Public => NetworkMode::Public,
            NetworkModeChoice::Allowlist => NetworkMode::Allowlist,
            NetworkModeChoice::None => NetworkMode::None,
        }
    }
}

/// The settings of the daemon that owns a state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct SettingsArgs {
    /// Sandbox engine.
    #[arg(long, value_enum, env = "CAPSULE_ENGINE")]
    pub engine: Option<EngineChoice>,
    /// Allow the test engine (no isolation) in a release build.
    #[arg(long)]
    pub unsafe_test_engine: bool,
    /// State directory (registry, sandboxes, the daemon's socket). Default: $XDG_STATE_HOME/capsule or ~/.local/state/capsule.
    #[arg(long, env = "CAPSULE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// TOML config file (limits, timers, network, engine, state_dir).
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
    /// Most templates `save_template` may keep (0 disables the tool).
    #[arg(long, env = "CAPSULE_MAX_SAVED_TEMPLATES")]
    pub max_saved_templates: Option<u32>,
    /// Pause a sandbox after this long without calls (e.g. 10m, 30s, 500ms).
    #[arg(long, env = "CAPSULE_IDLE_PAUSE_AFTER")]
    pub idle_pause_after: Option<String>,
    /// Delete a paused sandbox after this long (e.g. 7d).
    #[arg(long, env = "CAPSULE_RETENTION")]
    pub retention: Option<String>,
    /// Most bytes of each output stream placed in one result.
    #[arg(long, env = "CAPSULE_OUTPUT_CAP_BYTES")]
    pub output_cap_bytes: Option<usize>,
    /// The network mode of this server's policy, the most any sandbox gets (beats the config
    /// file's [network] mode; its allow and deny rules still apply). Default: public.
    #[arg(long, value_enum, env = "CAPSULE_NETWORK_MODE")]
    pub network_mode: Option<NetworkModeChoice>,
}

impl SettingsArgs {
    /// The flags that give a `capsule daemon` these settings.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: Option<OsString>| {
            if let Some(value) = value {
                args.push(format!("--{name}").into());
                args.push(value);
            }
        };
        flag("engine", self.engine.map(|e| format!("{e:?}").to_lowercase().into()));
        flag("state-dir", self.state_dir.clone().map(Into::into));
        flag("config", self.config.clone().map(Into::into));
        flag("max-sandboxes", self.max_sandboxes.map(|v| v.to_string().into()));
        flag("max-vcpus", self.max_vcpus.map(|v| v.to_string().into()));
        flag("max-memory-mib", self.max_memory_mib.map(|v| v.to_string().into()));
        flag("max-disk-mib", self.max_disk_mib.map(|v| v.to_string().into()));
        flag("memory-budget-mib", self.memory_budget_mib.map(|v| v.to_string().into()));
        flag("max-saved-templates", self.max_saved_templates.map(|v| v.to_string().into()));
        flag("idle-pause-after", self.idle_pause_after.clone().map(Into::into));
        flag("retention", self.retention.clone().map(Into::into));
        flag("output-cap-bytes", self.output_cap_bytes.map(|v| v.to_string().into()));
        flag("network-mode", self.network_mode.map(|m| NetworkMode::from(m).as_str().into()));
        if self.unsafe_test_engine {
            args.push("--unsafe-test-engine".into());
        }
        args
    }
}

/// Everything resolved from defaults, the config file, env and flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// State directory.
    pub state_dir: PathBuf,
    /// Engine choice.
    pub engine: EngineChoice,
    /// Whether a release build may run the test engine.
    pub unsafe_test_engine: bool,
    /// Manager settings.
    pub manager: ManagerConfig,
    /// Result shaping.
    pub shaping: Shaping,
}

impl Resolved {
    /// A short digest of the settings that shape sandboxes (not where they live).
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let text = format!("{:?}|{:?}|{:?}", self.engine, self.manager, self.shaping);
        let hash = sha2::Sha256::digest(text.as_bytes());
        hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// Settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file or a value in it is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config file names an engine that does not exist.
    #[error("unknown engine {0:?} in the config file: use auto, kvm or test")]
    UnknownEngine(String),
    /// The network policy (the config file's `[network]`, with `--network-mode`) is invalid.
    #[error("invalid network policy (the config file's [network] table, with --network-mode)")]
    Network(#[source] PolicyError),
}

/// Resolves the settings (flags and env beat the config file, which beats defaults).
pub fn resolve(args: &SettingsArgs) -> Result<Resolved, SettingsError> {
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
        max_saved_templates: args
            .max_saved_templates
            .or(file.limits.max_saved_templates)
            .unwrap_or(d.max_saved_templates),
        max_saved_template_mib: file.limits.max_saved_template_mib.unwrap_or(d.max_saved_template_mib),
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
        liveness: t.liveness,
    };
    let engine = match (args.engine, file.engine.as_deref()) {
        (Some(e), _) => e,
        (None, None) => EngineChoice::Auto,
        (None, Some(name)) => <EngineChoice as clap::ValueEnum>::from_str(name, true)
            .map_err(|_| SettingsError::UnknownEngine(name.to_string()))?,
    };
    let mut network = file.network.unwrap_or_default();
    if let Some(mode) = args.network_mode.map(NetworkMode::from) {
        network.mode = Some(mode);
        if mode == NetworkMode::None {
            network.allow.clear(); // `none` reaches nothing: the file's allow rules do not apply
        }
    }
    let network = network_policy(&network)?;
    Ok(Resolved {
        state_dir: args.state_dir.clone().or(file.state_dir).unwrap_or_else(config::default_state_dir),
        engine,
        unsafe_test_engine: args.unsafe_test_engine,
        manager: ManagerConfig { limits, timers, network },
        shaping: Shaping {
            output_cap_bytes: args
                .output_cap_bytes
                .or(file.output_cap_bytes)
                .unwrap_or(config::DEFAULT_OUTPUT_CAP_BYTES)
                .max(256),
        },
    })
}

/// The server's policy from its `[network]` table (with the flag's mode).
fn network_policy(config: &NetworkConfig) -> Result<NetworkPolicy, SettingsError> {
    NetworkPolicy::from_config(config).map_err(SettingsError::Network)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: SettingsArgs,
    }

    fn args(extra: &[&str]) -> SettingsArgs {
        let mut argv = vec!["capsule"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parse").settings
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
    fn settings_survive_the_trip_to_a_daemon_command_line() {
        let given = args(&[
            "--engine",
            "test",
            "--state-dir",
            "/tmp/s",
            "--max-sandboxes",
            "4",
            "--idle-pause-after",
            "300ms",
            "--output-cap-bytes",
            "1000",
            "--unsafe-test-engine",
            "--network-mode",
            "none",
        ]);
        let mut argv: Vec<OsString> = vec!["capsule".into()];
        argv.extend(given.to_args());
        let back = Cli::try_parse_from(argv).expect("parse").settings;
        assert_eq!(back, given);
        let (a, b) = (resolve(&given).unwrap(), resolve(&back).unwrap());
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), resolve(&args(&["--max-sandboxes", "5"])).unwrap().digest());
    }

    #[test]
    fn the_network_ceiling_comes_from_the_file_and_the_flag_and_bad_rules_are_named() {
        assert_eq!(resolve(&args(&[])).unwrap().manager.network, NetworkPolicy::default(), "default: public");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capsule.toml");
        std::fs::write(&path, "[network]\nmode = \"allowlist\"\nallow = [\"*.example.com\", \"10.1.0.0/16:5432\"]\n")
            .unwrap();
        let path = path.to_str().unwrap();
        let r = resolve(&args(&["--config", path])).unwrap();
        assert_eq!(r.manager.network.mode, NetworkMode::Allowlist);
        assert_eq!(r.manager.network.allow.len(), 2);
        let r = resolve(&args(&["--config", path, "--network-mode", "none"])).unwrap();
        assert_eq!((r.manager.network.mode, r.manager.network.allow.len()), (NetworkMode::None, 0), "flag wins");
        let err = resolve(&args(&["--config", path, "--network-mode", "public"])).unwrap_err();
        assert!(capsule_vmm::worker::error_chain(&err).contains("*.example.com is a name"), "{err:?}");

        std::fs::write(path, "[network]\nmode = \"allowlist\"\nallow = [\"*.example.com\", \"10.1.0.0/33\"]\n")
            .unwrap();
        let err = resolve(&args(&["--config", path])).unwrap_err();
        let text = capsule_vmm::worker::error_chain(&err);
        assert!(text.contains("[network]") && text.contains("\"10.1.0.0/33\" is not a valid rule"), "{text}");
    }
}
