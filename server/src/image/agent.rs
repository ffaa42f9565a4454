//! The guest agent binary that goes into the root filesystem: where to find it
//! (or how to build it from a source checkout), and the proof that it is a
//! static x86-64 ELF executable, since it runs as PID 1 with no loader to lean on.
//!
//! Never installs anything: it only hands the rootfs step a verified path and hash.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cache::{file_sha256, Cache, CacheError};
use super::progress::{run_logged, CommandError, Progress};

/// Environment variable naming a prebuilt agent binary.
pub const AGENT_BIN_ENV: &str = "CAPSULE_AGENT_BIN";
/// The agent's file name, next to `capsule` in an installation.
const AGENT_FILE_NAME: &str = "capsule-agent";
/// The Rust target the agent is built for (explicit, so RUSTFLAGS stay off proc-macros).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// ELF constants (see `<elf.h>`).
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
/// Size of an ELF64 file header and of one ELF64 program header.
const ELF64_EHDR_BYTES: usize = 64;
const ELF64_PHDR_BYTES: usize = 56;

/// Errors of finding and checking the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An explicitly given agent does not exist.
    #[error("agent binary {path} (from {origin}) does not exist")]
    NotFound {
        /// The path.
        path: PathBuf,
        /// `--agent` or the environment variable.
        origin: &'static str,
    },
    /// No agent anywhere.
    #[error("no capsule-agent binary found: pass `--agent PATH` or set CAPSULE_AGENT_BIN, install capsule-agent next to {exe}, or run from a source checkout")]
    Unavailable {
        /// The running executable.
        exe: PathBuf,
    },
    /// The agent is not a static executable.
    #[error("agent binary {path} is not a static x86-64 executable: {reason}; build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p capsule-agent")]
    NotStatic {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Building the agent failed.
    #[error("building the guest agent from source failed")]
    Build(#[source] CommandError),
    /// Reading or hashing failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A verified agent binary.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    /// Where it is.
    pub path: PathBuf,
    /// SHA-256 of its contents.
    pub sha256: String,
}

/// Finds the agent: `explicit` (from `--agent`), else `$CAPSULE_AGENT_BIN`, else a
/// static `capsule-agent` next to the running executable, else a fresh build from
/// the source checkout this binary was compiled from.
pub fn locate(explicit: Option<&Path>, cache: &Cache, progress: &dyn Progress) -> Result<AgentBinary, AgentError> {
    let from_env = std::env::var_os(AGENT_BIN_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let given = match (explicit, from_env) {
        (Some(path), _) => Some((path.to_path_buf(), "--agent")),
        (None, Some(path)) => Some((path, AGENT_BIN_ENV)),
        (None, None) => None,
    };
    if let Some((path, origin)) = given {
        if !path.is_file() {
            return Err(AgentError::NotFound { path, origin });
        }
        return verified(path);
    }

    let exe = std::env::current_exe().unwrap_or_default();
    if let Some(beside) = exe.parent().map(|dir| dir.join(AGENT_FILE_NAME)) {
        // A dynamically linked agent next to us is what a plain `cargo build`
        // leaves in target/debug; skip it when we can build a static one.
        if beside.is_file() && (check_static(&beside).is_ok() || source_workspace().is_none()) {
            return verified(beside);
        }
    }

    let Some(workspace) = source_workspace() else {
        return Err(AgentError::Unavailable { exe });
    };
    progress.line("agent: building capsule-agent (static) from the source checkout");
    let target_dir = workspace.join("target");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&workspace)
        .args(["build", "--release", "--target", AGENT_TARGET, "-p", "capsule-agent"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir);
    run_logged(progress, "agent", &mut cargo, &cache.log("agent-build")).map_err(AgentError::Build)?;
    verified(target_dir.join(AGENT_TARGET).join("release").join(AGENT_FILE_NAME))
}

/// The workspace root of the source checkout this binary was built from, if it still exists.
fn source_workspace() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    workspace.join("rootfs/agent/Cargo.toml").is_file().then_some(workspace)
}

fn verified(path: PathBuf) -> Result<AgentBinary, AgentError> {
    check_static(&path)?;
    let sha256 = file_sha256(&path)?;
    Ok(AgentBinary { path, sha256 })
}

/// Fails unless `path` is a 64-bit little-endian x86-64 ELF with no `PT_INTERP`.
pub fn check_static(path: &Path) -> Result<(), AgentError> {
    let bytes = std::fs::read(path).map_err(|source| CacheError::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    })?;
    static_elf_problem(&bytes).map_or(Ok(()), |reason| Err(AgentError::NotStatic { path: path.to_path_buf(), reason }))
}

/// What keeps `bytes` from being a static x86-64 ELF executable, if anything.
fn static_elf_problem(bytes: &[u8]) -> Option<String> {
    if bytes.len() < ELF64_EHDR_BYTES || bytes[..4] != ELF_MAGIC {
        return Some("not an ELF file".to_owned());
    }
    if bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB {
        return Some("not a 64-bit little-endian ELF".to_owned());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let machine = u16_at(0x12);
    if machine != EM_X86_64 {
        return Some(format!("machine {machine} is not x86-64 ({EM_X86_64})"));
    }
    let mut phoff_bytes = [0u8; 8];
    phoff_bytes.copy_from_slice(&bytes[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff_bytes);
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    if phnum == 0 {
        return Some("no program headers (not an executable)".to_owned());
    }
    if phentsize < ELF64_PHDR_BYTES {
        return Some(format!("program header size {phentsize} is below {ELF64_PHDR_BYTES}"));
    }
    let table_end = usize::try_from(phoff).ok().and_then(|start| phentsize.checked_mul(phnum)?.checked_add(start));
    let Some(table_end) = table_end.filter(|end| *end <= bytes.len()) else {
        return Some("program header table lies outside the file".to_owned());
    };
    let table_start = table_end - phentsize * phnum;
    let has_interp = bytes[table_start..table_end]
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    has_interp.then(|| "it has a PT_INTERP (dynamic loader) program header".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with `types` as its program header types.
    fn elf_with_program_headers(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; ELF64_EHDR_BYTES];
        bytes[..4].copy_from_slice(&ELF_MAGIC);
        bytes[4] = ELFCLASS64;
        bytes[5] = ELFDATA2LSB;
        bytes[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        bytes[0x20..0x28].copy_from_slice(&(ELF64_EHDR_BYTES as u64).to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&(ELF64_PHDR_BYTES as u16).to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; ELF64_PHDR_BYTES];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            bytes.extend(ph);
        }
        bytes
    }

    #[test]
    fn static_elf_passes_and_dynamic_elf_is_named() {
        const PT_LOAD: u32 = 1;
        assert_eq!(static_elf_problem(&elf_with_program_headers(&[PT_LOAD])), None);
        let problem = static_elf_problem(&elf_with_program_headers(&[PT_LOAD, PT_INTERP]));
        assert!(problem.unwrap().contains("PT_INTERP"));
    }

    #[test]
    fn truncated_or_foreign_files_are_rejected_without_panicking() {
        assert!(static_elf_problem(b"#!/bin/sh\n").is_some());
        let mut elf = elf_with_program_headers(&[1, 1]);
        elf.truncate(ELF64_EHDR_BYTES + 10);
        assert_eq!(static_elf_problem(&elf).as_deref(), Some("program header table lies outside the file"));
        let mut huge = elf_with_program_headers(&[1]);
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(static_elf_problem(&huge).is_some());
    }

    #[test]
    fn the_host_shell_is_dynamic() {
        let err = check_static(Path::new("/bin/sh")).unwrap_err();
        assert!(err.to_string().contains("PT_INTERP"), "{err}");
    }
}
