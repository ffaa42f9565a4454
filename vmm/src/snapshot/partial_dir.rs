//! The `<dir>.partial-<pid>` directory a snapshot is written into before it is renamed into
//! place. It owns that directory's lifetime: a [`PartialDir`] that is dropped without
//! [`PartialDir::commit`] removes what was written (every error path of a save), and creating
//! one first removes stale `.partial-<pid>` siblings left by processes that no longer exist
//! (a worker killed mid-save). It never touches a sibling whose writer may still be alive, nor
//! anything not named `*.partial-<pid>`.

use std::path::{Path, PathBuf};

/// Infix of a directory being written: `<name>.partial-<pid>`.
const PARTIAL_INFIX: &str = ".partial-";

/// Why a partial directory could not be made or put in place.
#[derive(Debug, thiserror::Error)]
pub enum PartialDirError {
    #[error("removing stale partial snapshot {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating snapshot directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("renaming the snapshot into place at {path}")]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A snapshot directory being written; removed on drop unless committed.
#[derive(Debug)]
pub struct PartialDir {
    path: PathBuf,
    committed: bool,
}

/// `<dir>.partial-<this pid>`.
fn partial_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into());
    dir.with_file_name(format!("{name}{PARTIAL_INFIX}{}", std::process::id()))
}

/// The writer's pid of a `*.partial-<pid>` name.
fn partial_pid(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(PARTIAL_INFIX)?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists. Through `/proc` (a stat), not `kill(pid, 0)`: the confined
/// worker may not send signals.
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes every `*.partial-<pid>` directory in `parent` whose writer process is gone.
/// Failures are logged, not returned: a stale leftover must not stop a new snapshot.
pub fn remove_stale_partials(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(partial_pid) else {
            continue;
        };
        if pid == me || process_alive(pid) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(error = %e, path = %path.display(), "snapshot: removing a stale partial snapshot failed");
        }
    }
}

impl PartialDir {
    /// Creates `<dir>.partial-<pid>` (replacing this process's own leftover), after clearing
    /// stale siblings of dead processes.
    pub fn create(dir: &Path) -> Result<Self, PartialDirError> {
        if let Some(parent) = dir.parent() {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            remove_stale_partials(parent);
        }
        let path = partial_path(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .map_err(|source| PartialDirError::RemoveStale { path: path.clone(), source })?;
        }
        std::fs::create_dir(&path).map_err(|source| PartialDirError::Create { path: path.clone(), source })?;
        Ok(Self { path, committed: false })
    }

    /// Where files are written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the directory to `dir`; from then on it is no longer removed on drop.
    pub fn commit(mut self, dir: &Path) -> Result<(), PartialDirError> {
        std::fs::rename(&self.path, dir)
            .map_err(|source| PartialDirError::Rename { path: dir.to_path_buf(), source })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(error = %e, path = %self.path.display(), "snapshot: removing a failed partial snapshot failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that belonged to a process that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
        pid
    }

    #[test]
    fn a_dropped_partial_dir_is_removed_and_a_committed_one_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        let partial = PartialDir::create(&dir).unwrap();
        let written = partial.path().to_path_buf();
        std::fs::write(written.join("memory.bin"), b"half").unwrap();
        drop(partial);
        assert!(!written.exists(), "failed save left {}", written.display());

        let partial = PartialDir::create(&dir).unwrap();
        std::fs::write(partial.path().join("state.bin"), b"whole").unwrap();
        partial.commit(&dir).unwrap();
        assert!(dir.join("state.bin").exists());
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("snap")]);
    }

    #[test]
    fn stale_partials_of_dead_writers_are_removed_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join(format!("old{PARTIAL_INFIX}{}", dead_pid()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("memory.bin"), b"x").unwrap();
        // pid 1 is always alive.
        let live = root.path().join(format!("busy{PARTIAL_INFIX}1"));
        std::fs::create_dir(&live).unwrap();
        let unrelated = root.path().join("notes.partial-draft");
        std::fs::create_dir(&unrelated).unwrap();

        let partial = PartialDir::create(&root.path().join("new")).unwrap();
        assert!(!dead.exists(), "stale partial of a dead writer was kept");
        assert!(live.exists(), "partial of a live writer was removed");
        assert!(unrelated.exists(), "a directory not named .partial-<pid> was removed");
        assert!(partial.path().exists());
    }

    #[test]
    fn partial_names_parse_only_with_a_numeric_pid() {
        assert_eq!(partial_pid("snap.partial-42"), Some(42));
        assert_eq!(partial_pid("a.partial-b.partial-7"), Some(7));
        assert_eq!(partial_pid("snap.partial-"), None);
        assert_eq!(partial_pid("snap.partial-4x"), None);
        assert_eq!(partial_pid("snap"), None);
    }
}
