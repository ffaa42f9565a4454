//! Copies of a snapshot chain that cost no guest RAM: [`link_chain`] puts the chain ending at
//! one snapshot into a new directory of its own. Every memory file is shared by a hard link
//! (snapshot files are never written once their directory is renamed into place, and restores
//! map them copy-on-write), and only the small state files are rewritten, so that each layer of
//! the copy names its parent inside the copy, with that parent's new checksum.
//!
//! The copy and the original are independent: deleting either (a sandbox killed, a template
//! replaced) never breaks the other. A VM restored from the copy writes its next incremental
//! layers over the copy, so a sandbox that starts from a snapshot it does not own (a template,
//! its parent's) gets a chain of its own for the price of a few small files.
//!
//! Layout of a copy of an n-layer chain: `<into>/0` (the full base) up to `<into>/n` (the
//! snapshot that was copied). The copy is written under `<into>.partial-<pid>` and renamed into
//! place whole, like a snapshot.

use std::path::{Path, PathBuf};

use super::partial_dir::PartialDir;
use super::{
    format, io_err, read_chain_below, read_state, sync_dir, write_state_file, MemoryState, SnapshotError, MEMORY_FILE,
    STATE_FILE,
};

/// A linked copy of a snapshot chain, as [`link_chain`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedChain {
    /// The copy of the snapshot that was copied (the top of the copied chain).
    pub dir: PathBuf,
    /// Layers between `dir` and the copy's full base (0: it is full).
    pub depth: usize,
}

/// `path` made absolute through its (existing) parent directory.
fn absolute_new_path(path: &Path) -> Result<PathBuf, SnapshotError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| SnapshotError::Io {
        what: "naming the chain copy",
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let parent = std::fs::canonicalize(parent).map_err(io_err("resolving the directory of", path))?;
    Ok(parent.join(name))
}

/// Copies the chain ending at the snapshot `top` into the new directory `into` (see the module
/// header): memory files hard-linked, state files rewritten to point inside the copy. Fails
/// (leaving nothing behind) where a hard link cannot be made, e.g. across filesystems or past
/// the filesystem's link limit.
pub fn link_chain(top: &Path, into: &Path) -> Result<LinkedChain, SnapshotError> {
    if into.exists() {
        return Err(SnapshotError::Exists(into.to_path_buf()));
    }
    let (top_state, _) = read_state(top)?;
    let mut chain = read_chain_below(top, &top_state)?;
    chain.push((top.to_path_buf(), top_state));
    let target = absolute_new_path(into)?;
    let partial = PartialDir::create(&target).map_err(SnapshotError::PartialDir)?;
    let depth = chain.len() - 1;

    let mut parent_crc = None;
    for (level, (dir, mut state)) in chain.into_iter().enumerate() {
        let written = partial.path().join(level.to_string());
        std::fs::create_dir(&written).map_err(io_err("creating chain copy directory", &written))?;
        let memory = written.join(MEMORY_FILE);
        std::fs::hard_link(dir.join(MEMORY_FILE), &memory).map_err(io_err("hard-linking memory file", &memory))?;
        if let (MemoryState::Layer { parent, parent_crc: recorded, .. }, Some(crc)) = (&mut state.memory, parent_crc) {
            *parent = target.join((level - 1).to_string());
            *recorded = crc;
        }
        let state_path = written.join(STATE_FILE);
        let (bytes, crc) =
            format::encode(&state).map_err(|source| SnapshotError::Format { path: state_path.clone(), source })?;
        write_state_file(&state_path, &bytes)?;
        sync_dir(&written)?;
        parent_crc = Some(crc);
    }
    sync_dir(partial.path())?;
    partial.commit(&target).map_err(SnapshotError::PartialDir)?;
    if let Some(parent) = target.parent() {
        sync_dir(parent)?;
    }
    Ok(LinkedChain { dir: target.join(depth.to_string()), depth })
}
