//! The on-disk image cache: where it lives, its layout, its lock, and atomic
//! writes. Everything the build produces is keyed by a content hash and only
//! ever appears in its final place by `rename`, so a crash or a concurrent
//! build never leaves a half-written artifact that looks whole.
//!
//! Layout under the cache root:
//! ```text
//! lock                   flock(2) held for the whole of a build
//! current.json           the ImageInfo of the last image built (what `image info` shows)
//! kernel/<key>/          vmlinux, config, kernel.json
//! base/<key>/            root/ (the customised debootstrap tree), base.json
//! rootfs/<key>.ext4      packed root filesystem images
//! logs/                  full output of every build step
//! tmp/                   work in progress, renamed into place when complete
//! ```
//!
//! This module never decides *what* to build; it only stores it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::progress::Progress;

/// Environment variable that overrides the cache root.
pub const CACHE_DIR_ENV: &str = "CAPSULE_CACHE_DIR";
/// Hex characters of a content hash used in file names.
const KEY_HEX_CHARS: usize = 16;

/// Errors of the image cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No cache directory could be derived from the environment.
    #[error("cannot find a cache directory: set CAPSULE_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A filesystem operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A directory to delete has something mounted inside it.
    #[error("refusing to delete {path}: {mount} is mounted inside it (an interrupted debootstrap?); run `umount -R {mount}` and retry")]
    MountedInside {
        /// The directory.
        path: PathBuf,
        /// The mount point inside it.
        mount: PathBuf,
    },
    /// A manifest could not be parsed.
    #[error("corrupt manifest {path} (delete it and rebuild)")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Shorthand for an I/O error on a path.
pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}

/// The cache root and its layout.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Holds the cache's build lock until dropped.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl Cache {
    /// The cache root: `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
    /// `explicit` (from the command line) wins over all of them.
    pub fn locate(explicit: Option<&Path>) -> Result<Self, CacheError> {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let root = if let Some(path) = explicit {
            path.to_path_buf()
        } else if let Some(dir) = non_empty(CACHE_DIR_ENV) {
            PathBuf::from(dir)
        } else if let Some(xdg) = non_empty("XDG_CACHE_HOME") {
            PathBuf::from(xdg).join("capsule")
        } else if let Some(home) = non_empty("HOME") {
            PathBuf::from(home).join(".cache").join("capsule")
        } else {
            return Err(CacheError::NoCacheDir);
        };
        Ok(Self { root })
    }

    /// Creates the layout's directories.
    pub fn create_dirs(&self) -> Result<(), CacheError> {
        for dir in ["kernel", "base", "rootfs", "logs", "tmp"] {
            let path = self.root.join(dir);
            std::fs::create_dir_all(&path).map_err(io_error("cannot create", &path))?;
        }
        Ok(())
    }

    /// The manifest of the current image.
    pub fn current_manifest(&self) -> PathBuf {
        self.root.join("current.json")
    }

    /// A finished kernel's directory.
    pub fn kernel_dir(&self, key: &str) -> PathBuf {
        self.root.join("kernel").join(key)
    }

    /// A finished base tree's directory.
    pub fn base_dir(&self, key: &str) -> PathBuf {
        self.root.join("base").join(key)
    }

    /// A finished root filesystem image.
    pub fn rootfs_image(&self, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.ext4"))
    }

    /// A step's log file.
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    /// A fresh, empty work path under `tmp/` (removed first if a crashed build left it).
    pub fn fresh_tmp(&self, name: &str) -> Result<PathBuf, CacheError> {
        let path = self.root.join("tmp").join(format!("{name}-{}", std::process::id()));
        remove_any(&path)?;
        Ok(path)
    }

    /// Takes the build lock, waiting (and saying so) while another build holds it.
    pub fn lock(&self, progress: &dyn Progress) -> Result<CacheLock, CacheError> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("cannot open lock file", &path))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            progress.line(&format!("waiting for another `capsule image build` to finish (lock {})", path.display()));
            flock(&file, libc::LOCK_EX).map_err(io_error("cannot lock", &path))?;
        }
        Ok(CacheLock { _file: file })
    }
}

fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock only reads the descriptor number, which `file` keeps open
    // for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Cache {
    /// Removes what crashed or interrupted builds left in `tmp/`. Call only while
    /// holding the lock: then no other build is using it.
    pub fn clear_tmp(&self, _lock: &CacheLock) -> Result<(), CacheError> {
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_error("cannot list", &tmp))? {
            remove_any(&entry.map_err(io_error("cannot list", &tmp))?.path())?;
        }
        Ok(())
    }

    /// Deletes all but the `keep` newest packed root filesystems (each is hundreds of
    /// MiB, and every agent change makes a new one). `current` is never deleted.
    pub fn prune_rootfs_images(
        &self,
        _lock: &CacheLock,
        current: &Path,
        keep: usize,
    ) -> Result<Vec<PathBuf>, CacheError> {
        let dir = self.root.join("rootfs");
        let mut images: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
            .map_err(io_error("cannot list", &dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|ext| ext == "ext4") && p != current)
            .map(|p| {
                let modified = std::fs::metadata(&p).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                (modified, p)
            })
            .collect();
        images.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        let doomed: Vec<PathBuf> = images.into_iter().skip(keep.saturating_sub(1)).map(|(_, p)| p).collect();
        for path in &doomed {
            remove_any(path)?;
        }
        Ok(doomed)
    }
}

/// Removes a file or directory tree if it exists. Refuses a tree with a mount
/// inside it (an interrupted debootstrap can leave `proc` or `dev` mounted in
/// its chroot), since deleting through a mount would delete the host's files.
pub fn remove_any(path: &Path) -> Result<(), CacheError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            if let Some(mount) = mount_inside(&mountinfo, path) {
                return Err(CacheError::MountedInside { path: path.to_path_buf(), mount });
            }
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(io_error("cannot remove", path))
}

/// The first mount point (from `/proc/self/mountinfo` text) at or below `dir`.
fn mount_inside(mountinfo: &str, dir: &Path) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_mountinfo(escaped)))
        .find(|mount| mount.starts_with(dir))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves a finished artifact into its final place, replacing what was there.
pub fn publish(from: &Path, to: &Path) -> Result<(), CacheError> {
    remove_any(to)?;
    std::fs::rename(from, to).map_err(io_error("cannot move into place", to))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsync, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = File::create(&tmp).map_err(io_error("cannot create", &tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("cannot move into place", path))
}

/// Writes a serde value as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), CacheError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| CacheError::Manifest { path: path.to_path_buf(), source })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Reads a JSON manifest; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read", path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| CacheError::Manifest { path: path.to_path_buf(), source })
}

/// Accumulates the inputs of one artifact into its content key.
#[derive(Debug, Clone, Default)]
pub struct KeyHasher {
    hasher: Sha256,
}

impl KeyHasher {
    /// A hasher for the artifact kind `domain` (so equal inputs of different kinds differ).
    pub fn new(domain: &str) -> Self {
        let mut key = Self::default();
        key.field(domain.as_bytes());
        key
    }

    /// Adds one length-prefixed input.
    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }

    /// The key: the first [`KEY_HEX_CHARS`] hex characters of the SHA-256.
    pub fn finish(&self) -> String {
        let digest = self.hasher.clone().finalize();
        let mut hex = hex_string(&digest);
        hex.truncate(KEY_HEX_CHARS);
        hex
    }
}

/// Lowercase hex of `bytes`.
pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's contents, as hex.
pub fn file_sha256(path: &Path) -> Result<String, CacheError> {
    let mut file = File::open(path).map_err(io_error("cannot open", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error("cannot read", path))?;
    Ok(hex_string(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::progress::SilentProgress;

    #[test]
    fn keys_depend_on_every_field_and_its_boundaries() {
        let key = |fields: &[&str]| {
            let mut k = KeyHasher::new("t");
            for f in fields {
                k.field(f.as_bytes());
            }
            k.finish()
        };
        assert_eq!(key(&["a", "b"]), key(&["a", "b"]));
        assert_ne!(key(&["a", "b"]), key(&["ab"]));
        assert_ne!(key(&["a", "b"]), key(&["a", "c"]));
        assert_eq!(key(&["a"]).len(), KEY_HEX_CHARS);
    }

    #[test]
    fn atomic_json_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json(&path, &vec![1u32, 2]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![1, 2]));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(read_json::<Vec<u32>>(&path), Err(CacheError::Manifest { .. })));
    }

    #[test]
    fn pruning_keeps_the_current_and_newest_images() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::locate(Some(dir.path())).unwrap();
        cache.create_dirs().unwrap();
        let lock = cache.lock(&SilentProgress).unwrap();
        let now = std::time::SystemTime::now();
        let mut paths = Vec::new();
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let path = cache.rootfs_image(name);
            let file = File::create(&path).unwrap();
            file.set_modified(now - std::time::Duration::from_secs(100 * (i as u64 + 1))).unwrap();
            paths.push(path);
        }
        // "d" is the oldest but current; "a" is the newest other one.
        let removed = cache.prune_rootfs_images(&lock, &paths[3], 2).unwrap();
        assert_eq!(removed, vec![paths[1].clone(), paths[2].clone()]);
        assert!(paths[0].exists() && paths[3].exists());
        std::fs::create_dir_all(dir.path().join("tmp/kernel-x-1/deep")).unwrap();
        cache.clear_tmp(&lock).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn mounts_inside_a_tree_are_found_and_protect_it() {
        let mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                         40 22 0:5 / /c/tmp/base-1/root/proc rw - proc proc rw\n\
                         41 22 0:6 / /c/with\\040space rw - tmpfs t rw\n";
        assert_eq!(mount_inside(mountinfo, Path::new("/c/tmp/base-1")), Some(PathBuf::from("/c/tmp/base-1/root/proc")));
        assert_eq!(mount_inside(mountinfo, Path::new("/c/tmp/base-10")), None);
        assert_eq!(mount_inside(mountinfo, Path::new("/c/with space")), Some(PathBuf::from("/c/with space")));
        // The real mount table parses: `/proc` is a mount point in it.
        let real = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(mount_inside(&real, Path::new("/proc")), Some(PathBuf::from("/proc")));
    }

    #[test]
    fn second_lock_waits_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::locate(Some(dir.path())).unwrap();
        cache.create_dirs().unwrap();
        let first = cache.lock(&SilentProgress).unwrap();
        let lock_path = dir.path().join("lock");
        let probe = File::open(&lock_path).unwrap();
        assert!(flock(&probe, libc::LOCK_EX | libc::LOCK_NB).is_err());
        drop(first);
        assert!(flock(&probe, libc::LOCK_EX | libc::LOCK_NB).is_ok());
    }
}
