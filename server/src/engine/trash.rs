//! Deferred deletion of sandbox files. Freeing the blocks of large files can take seconds on a
//! filesystem mounted with online discard (ext4 `-o discard`, as on the machines here: a
//! 16-layer snapshot chain took 6 s), and whoever drops the last reference pays: the thread
//! that unlinks, or a VM worker whose exit unmaps a deleted snapshot. So the engine renames
//! what it deletes into `<root>/.trash/` (instant, same filesystem, and gone from the sandbox at
//! once) and a background thread removes it. What a crash leaves there is removed when the next
//! engine starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory under the engine's root that holds what is being deleted.
pub const TRASH_DIR: &str = ".trash";

/// Where deleted sandbox files wait for a background thread to remove them.
#[derive(Debug)]
pub struct Trash {
    dir: PathBuf,
    next: AtomicU64,
}

/// Removes `path` (a file or a directory tree), logging what it could not.
fn remove_now(path: &Path) {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete");
        }
    }
}

/// Removes `paths` on a thread of its own (or here, if no thread can be started).
fn remove_in_background(paths: Vec<PathBuf>) {
    let spawned = std::thread::Builder::new().name("trash".into()).spawn({
        let paths = paths.clone();
        move || paths.iter().for_each(|p| remove_now(p))
    });
    if spawned.is_err() {
        paths.iter().for_each(|p| remove_now(p));
    }
}

impl Trash {
    /// The trash of the engine rooted at `root`; what an earlier engine left in it is removed
    /// in the background.
    pub fn new(root: &Path) -> Self {
        let dir = root.join(TRASH_DIR);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            remove_in_background(entries.flatten().map(|e| e.path()).collect());
        }
        Self { dir, next: AtomicU64::new(0) }
    }

    /// Deletes `path` (a file or a directory tree): at once from where it was, its space in the
    /// background. A path that does not exist is already deleted.
    pub fn discard(&self, path: &Path) {
        if std::fs::symlink_metadata(path).is_err() {
            return;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let parked = self.dir.join(format!("{}-{n}-{name}", std::process::id()));
        let moved = std::fs::create_dir_all(&self.dir).and_then(|()| std::fs::rename(path, &parked));
        match moved {
            Ok(()) => remove_in_background(vec![parked]),
            // Another filesystem, or no room for the trash: delete in place, in the background.
            Err(_) => remove_in_background(vec![path.to_path_buf()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_until_empty(dir: &Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn discarded_paths_leave_at_once_and_their_space_later() {
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::new(root.path());
        let tree = root.path().join("sandbox");
        std::fs::create_dir_all(tree.join("snapshot-1")).unwrap();
        std::fs::write(tree.join("snapshot-1/memory.bin"), vec![1u8; 1 << 16]).unwrap();
        let file = root.path().join("loose.bin");
        std::fs::write(&file, b"x").unwrap();

        trash.discard(&tree);
        trash.discard(&file);
        trash.discard(&root.path().join("never-existed"));
        assert!(!tree.exists() && !file.exists(), "discarded paths are gone from where they were");
        assert!(wait_until_empty(&root.path().join(TRASH_DIR)), "the trash was not emptied");
    }

    #[test]
    fn a_new_trash_empties_what_an_earlier_one_left() {
        let root = tempfile::tempdir().unwrap();
        let left = root.path().join(TRASH_DIR).join("1-0-sandbox");
        std::fs::create_dir_all(left.join("snapshot-3")).unwrap();
        std::fs::write(left.join("snapshot-3/state.bin"), b"old").unwrap();
        let _trash = Trash::new(root.path());
        assert!(wait_until_empty(&root.path().join(TRASH_DIR)), "leftovers of a crash were kept");
    }
}
