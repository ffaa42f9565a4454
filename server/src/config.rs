//! Settings of `capsule serve`: limits, timers and result shaping.
//!
//! Sources, weakest first: built-in defaults, the TOML config file
//! (`--config`), then environment variables and flags (clap merges those two;
//! a flag beats its variable). This module only parses and resolves values;
//! it never enforces them (the sandbox manager and the result shaper do).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default most sandboxes alive at once (running, paused or being created).
pub const DEFAULT_MAX_SANDBOXES: u32 = 32;
/// Default most vCPUs one sandbox may ask for.
pub const DEFAULT_MAX_VCPUS: u32 = 8;
/// Default most memory one sandbox may ask for, in MiB.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 8192;
/// Default most writable disk one sandbox may ask for, in MiB.
pub const DEFAULT_MAX_DISK_MIB: u32 = 32768;
/// Default memory budget of all running sandboxes together, in MiB.
pub const DEFAULT_MEMORY_BUDGET_MIB: u64 = 16384;
/// Default most children of one fork: what the tool contract allows.
pub const DEFAULT_MAX_FORK_COUNT: u32 = capsule_tool_schemas::MAX_FORK_COUNT;
/// vCPUs a sandbox gets when it asks for none.
pub const DEFAULT_VCPUS: u32 = 1;
/// Memory a sandbox gets when it asks for none, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// Writable disk a sandbox gets when it asks for none, in MiB.
pub const DEFAULT_DISK_MIB: u32 = 2048;
/// Default most templates saved with `save_template`.
pub const DEFAULT_MAX_SAVED_TEMPLATES: u32 = 32;
/// Default most host disk all saved templates take together, in MiB.
pub const DEFAULT_MAX_SAVED_TEMPLATE_MIB: u64 = 64 * 1024;
/// Idle time after which a running sandbox is paused.
pub const DEFAULT_IDLE_PAUSE_AFTER: Duration = Duration::from_secs(10 * 60);
/// Time a paused sandbox is kept before it is deleted.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default per-stream cap on output placed in one tool result, in bytes.
pub const DEFAULT_OUTPUT_CAP_BYTES: usize = 32 * 1024;

/// Errors of reading settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("config file {path} is invalid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// A duration could not be parsed.
    #[error("invalid duration {0:?}: use a number with a unit, e.g. 500ms, 30s, 10m, 2h, 7d")]
    Duration(String),
}

/// Limits on sandboxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most sandboxes alive at once.
    pub max_sandboxes: u32,
    /// Most vCPUs per sandbox.
    pub max_vcpus: u32,
    /// Most memory per sandbox, in MiB.
    pub max_memory_mib: u32,
    /// Most writable disk per sandbox, in MiB.
    pub max_disk_mib: u32,
    /// Memory budget of all running sandboxes together, in MiB (paused ones free theirs).
    pub memory_budget_mib: u64,
    /// Most children of one fork.
    pub max_fork_count: u32,
    /// vCPUs when a request names none.
    pub default_vcpus: u32,
    /// Memory when a request names none, in MiB.
    pub default_memory_mib: u32,
    /// Disk when a request names none, in MiB.
    pub default_disk_mib: u32,
    /// Most templates saved with `save_template` (0 disables the tool).
    pub max_saved_templates: u32,
    /// Most host disk all saved templates may take together, in MiB.
    pub max_saved_template_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            max_vcpus: DEFAULT_MAX_VCPUS,
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            max_disk_mib: DEFAULT_MAX_DISK_MIB,
            memory_budget_mib: DEFAULT_MEMORY_BUDGET_MIB,
            max_fork_count: DEFAULT_MAX_FORK_COUNT,
            default_vcpus: DEFAULT_VCPUS,
            default_memory_mib: DEFAULT_MEMORY_MIB,
            default_disk_mib: DEFAULT_DISK_MIB,
            max_saved_templates: DEFAULT_MAX_SAVED_TEMPLATES,
            max_saved_template_mib: DEFAULT_MAX_SAVED_TEMPLATE_MIB,
        }
    }
}

/// Lifecycle timers.
#[derive(Debug, Clone, PartialEq)]
pub struct Timers {
    /// Default idle time after which a running sandbox is paused.
    pub idle_pause_after: Duration,
    /// Time a paused sandbox is kept before deletion.
    pub retention: Duration,
    /// When a silent agent marks its sandbox unresponsive (not in the config file: the
    /// defaults suit every host; tests shorten them).
    pub liveness: crate::guest::LivenessTimings,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            idle_pause_after: DEFAULT_IDLE_PAUSE_AFTER,
            retention: DEFAULT_RETENTION,
            liveness: crate::guest::LivenessTimings::default(),
        }
    }
}

impl Timers {
    /// How often the timer task looks at sandboxes: a quarter of the shortest
    /// timer, between 10 ms and 5 s.
    pub fn tick(&self) -> Duration {
        let shortest = self.idle_pause_after.min(self.retention);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
    }
}

/// The config file's shape (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory (registry, sandboxes).
    pub state_dir: Option<PathBuf>,
    /// Engine name.
    pub engine: Option<String>,
    /// Per-stream output cap in a result, in bytes.
    pub output_cap_bytes: Option<usize>,
    /// `[limits]` table.
    #[serde(default)]
    pub limits: FileLimits,
    /// `[timers]` table.
    #[serde(default)]
    pub timers: FileTimers,
    /// `[network]` table: the server's network policy, the ceiling of every sandbox's.
    pub network: Option<crate::network::NetworkConfig>,
}

/// `[limits]` of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// See [`Limits::max_sandboxes`].
    pub max_sandboxes: Option<u32>,
    /// See [`Limits::max_vcpus`].
    pub max_vcpus: Option<u32>,
    /// See [`Limits::max_memory_mib`].
    pub max_memory_mib: Option<u32>,
    /// See [`Limits::max_disk_mib`].
    pub max_disk_mib: Option<u32>,
    /// See [`Limits::memory_budget_mib`].
    pub memory_budget_mib: Option<u64>,
    /// See [`Limits::default_memory_mib`].
    pub default_memory_mib: Option<u32>,
    /// See [`Limits::default_disk_mib`].
    pub default_disk_mib: Option<u32>,
    /// See [`Limits::max_saved_templates`].
    pub max_saved_templates: Option<u32>,
    /// See [`Limits::max_saved_template_mib`].
    pub max_saved_template_mib: Option<u64>,
}

/// `[timers]` of the config file; durations as strings such as `"10m"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimers {
    /// See [`Timers::idle_pause_after`].
    pub idle_pause_after: Option<String>,
    /// See [`Timers::retention`].
    pub retention: Option<String>,
}

impl FileConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }
}

/// Parses a duration such as `250ms`, `30s`, `10m`, `2h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| ConfigError::Duration(text.to_string()))?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(ConfigError::Duration(text.to_string())),
    };
    n.checked_mul(ms_per).map(Duration::from_millis).ok_or_else(|| ConfigError::Duration(text.to_string()))
}

/// The default state directory: `$XDG_STATE_HOME/capsule`, else `~/.local/state/capsule`.
pub fn default_state_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("capsule");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/state/capsule")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[limits]\nmax_sandboxes = 3\n[timers]\nidle_pause_after = \"1s\"\n").unwrap();
        let c = FileConfig::load(&path).unwrap();
        assert_eq!(c.limits.max_sandboxes, Some(3));
        assert_eq!(c.timers.idle_pause_after.as_deref(), Some("1s"));
        std::fs::write(&path, "[network]\nmode = \"allowlist\"\nallow = [\"*.example.net:443\"]\n").unwrap();
        let network = FileConfig::load(&path).unwrap().network.expect("a [network] table");
        assert_eq!(network.allow, ["*.example.net:443"]);
        std::fs::write(&path, "[network]\nmodes = \"none\"\n").unwrap();
        assert!(matches!(FileConfig::load(&path), Err(ConfigError::Parse { .. })));
        std::fs::write(&path, "[limits]\nmax_sandbox = 3\n").unwrap();
        assert!(matches!(FileConfig::load(&path), Err(ConfigError::Parse { .. })));
    }
}
