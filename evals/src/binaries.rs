//! Finding the binaries a bench drives, as `tests/python/conftest.py` finds them: `capsule`
//! from `CAPSULE_BIN`, else the bench's own target directory (`release/`, then `debug/`), and
//! `capsule-agent` from its variable, else beside `capsule`. It only locates files; it never
//! builds or runs them.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The variable that names the `capsule` binary.
pub const CAPSULE_BIN_ENV: &str = "CAPSULE_BIN";

/// `capsule` and `capsule-agent`.
pub struct Binaries {
    /// The `capsule` binary (server and VM worker).
    pub capsule: PathBuf,
    /// The `capsule-agent` binary (the test engine runs it on the host).
    pub agent: PathBuf,
}

impl Binaries {
    /// Both binaries; `agent_env` is the variable that names the agent (capsule's
    /// `AGENT_BIN_ENV`).
    pub fn locate(agent_env: &str) -> Result<Self> {
        let capsule = capsule_bin()?;
        let agent = match std::env::var_os(agent_env).filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => capsule.with_file_name("capsule-agent"),
        };
        if !agent.is_file() {
            bail!(
                "no capsule-agent at {}: run `cargo build --release -p capsule-agent` or set {agent_env}",
                agent.display()
            );
        }
        Ok(Binaries { capsule, agent })
    }

    /// Whether `capsule` is a debug build (then ratios against in-process baselines are unfair).
    pub fn is_debug_build(&self) -> bool {
        is_debug_build(&self.capsule)
    }
}

/// The `capsule` binary: `CAPSULE_BIN`, else `<target>/release/capsule`, else
/// `<target>/debug/capsule`.
pub fn capsule_bin() -> Result<PathBuf> {
    let capsule = match std::env::var_os(CAPSULE_BIN_ENV).filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => in_target_dir("capsule")?,
    };
    if !capsule.is_file() {
        bail!("{CAPSULE_BIN_ENV}={} is not a file", capsule.display());
    }
    Ok(capsule)
}

/// Whether `binary` lies in a `debug/` directory.
pub fn is_debug_build(binary: &Path) -> bool {
    binary.parent().and_then(Path::file_name).is_some_and(|d| d == "debug")
}

/// `<target>/release/NAME`, else `<target>/debug/NAME`; the bench itself runs from
/// `<target>/release/deps/`.
fn in_target_dir(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the bench executable")?;
    let target = exe.ancestors().nth(3).context("the bench executable is not under <target>/<profile>/deps")?;
    let candidates = [target.join("release").join(name), target.join("debug").join(name)];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow!(
            "no {name} binary at {} or {}: run `cargo build --release -p capsule -p capsule-agent` \
             first, or set {CAPSULE_BIN_ENV}",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}
