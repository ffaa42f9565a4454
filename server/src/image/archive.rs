//! `capsule image export FILE` and `capsule image import FILE`: the current image as one file,
//! so that one machine builds it and others use it without debootstrap, root or a kernel
//! build (hosts that are not Debian included).
//!
//! The file is a plain tar (`tar tf` lists it) of three entries, in this order:
//! ```text
//! capsule-image.json   the manifest: format version, the image (version, flavour, command
//!                      line) and each file's size and SHA-256
//! vmlinux              the kernel
//! rootfs.ext4          the read-only root filesystem
//! ```
//! An import checks the format version first, streams each file into the cache's `tmp/` while
//! hashing it, and refuses the whole archive (nothing is made current) when a size or checksum
//! differs, an entry is missing or extra, or the manifest is not one it knows. Only then are the
//! files renamed into the cache and the image made current, under the cache's build lock.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::{io_error, write_json, Cache, CacheError};
use super::progress::Progress;
use super::{current_image_in, Flavour, ImageError, ImageInfo};

/// Version of the archive layout; an archive of another version is refused.
pub const ARCHIVE_FORMAT_VERSION: u32 = 1;
const MANIFEST_NAME: &str = "capsule-image.json";
const KERNEL_NAME: &str = "vmlinux";
const ROOTFS_NAME: &str = "rootfs.ext4";

/// Errors of exporting or importing an image.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing the archive failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a capsule image archive.
    #[error("{path} is not a capsule image archive: {why}")]
    NotAnArchive {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The archive has a layout this capsule does not know.
    #[error(
        "{path} is a capsule image archive of format {found}, and this capsule reads format \
         {ARCHIVE_FORMAT_VERSION}; export it again with this capsule's version"
    )]
    WrongVersion {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: u32,
    },
    /// A file in the archive is not what its manifest says.
    #[error("{path}: {entry} is corrupt ({why}); nothing was imported")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// What differs.
        why: String,
    },
}

/// The archive's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    version: String,
    flavour: Flavour,
    cmdline: String,
    kernel_build_s: f64,
    files: Vec<ArchivedFile>,
}

/// One file of the archive, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ArchivedFile {
    name: String,
    bytes: u64,
    sha256: String,
}

/// Writes the current image of `cache` to `file`; returns it.
pub fn export(cache: &Cache, file: &Path, progress: &dyn Progress) -> Result<ImageInfo, ImageError> {
    let info = current_image_in(cache)?;
    let io = |what| move |source| ArchiveError::Io { what, path: file.to_path_buf(), source };
    let mut files = Vec::new();
    for (name, path) in [(KERNEL_NAME, &info.kernel), (ROOTFS_NAME, &info.rootfs)] {
        progress.line(&format!("export: hashing {}", path.display()));
        let (bytes, sha256) = hash_file(path).map_err(io_error("cannot read", path))?;
        files.push(ArchivedFile { name: name.to_string(), bytes, sha256 });
    }
    let manifest = Manifest {
        format_version: ARCHIVE_FORMAT_VERSION,
        version: info.version.clone(),
        flavour: info.flavour,
        cmdline: info.cmdline.clone(),
        kernel_build_s: info.kernel_build_s,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let out = File::create(file).map_err(io("cannot create"))?;
    let mut tar = tar::Builder::new(BufWriter::new(out));
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, MANIFEST_NAME, json.as_slice()).map_err(io("cannot write"))?;
    for (name, path) in [(KERNEL_NAME, &info.kernel), (ROOTFS_NAME, &info.rootfs)] {
        progress.line(&format!("export: writing {name}"));
        tar.append_path_with_name(path, name).map_err(io("cannot write"))?;
    }
    let mut out = tar.into_inner().map_err(io("cannot finish"))?;
    out.flush().map_err(io("cannot write"))?;
    out.get_ref().sync_all().map_err(io("cannot sync"))?;
    Ok(info)
}

/// Imports the image in `file` into `cache` and makes it current; returns it.
pub fn import(cache: &Cache, file: &Path, progress: &dyn Progress) -> Result<ImageInfo, ImageError> {
    cache.create_dirs()?;
    let lock = cache.lock(progress)?;
    cache.clear_tmp(&lock)?;
    let staging = cache.fresh_tmp("import")?;
    std::fs::create_dir_all(&staging).map_err(io_error("cannot create", &staging))?;
    let unpacked = unpack(file, &staging, progress);
    let placed = unpacked.and_then(|manifest| place(cache, &staging, &manifest));
    let _ = std::fs::remove_dir_all(&staging);
    let info = placed?;
    progress.line(&format!("image {} ({}) imported from {}", info.version, info.flavour, file.display()));
    Ok(info)
}

/// Reads the archive into `staging`, checking every entry; returns its manifest.
fn unpack(file: &Path, staging: &Path, progress: &dyn Progress) -> Result<Manifest, ImageError> {
    let path = file.to_path_buf();
    let io = |what| {
        let path = path.clone();
        move |source| ArchiveError::Io { what, path, source }
    };
    let not_archive = |why: String| ArchiveError::NotAnArchive { path: path.clone(), why };
    let input = File::open(file).map_err(io("cannot open"))?;
    let mut tar = tar::Archive::new(BufReader::new(input));
    let mut entries = tar.entries().map_err(io("cannot read"))?;
    let mut manifest: Option<Manifest> = None;
    let mut seen = Vec::new();
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(|e| not_archive(format!("a damaged tar entry ({e})")))?;
        let name = entry.path().map_err(|e| not_archive(format!("a bad entry name ({e})")))?.display().to_string();
        let Some(m) = &manifest else {
            if name != MANIFEST_NAME {
                return Err(not_archive(format!("it starts with {name:?}, not {MANIFEST_NAME}")).into());
            }
            let mut json = Vec::new();
            entry.by_ref().take(1 << 20).read_to_end(&mut json).map_err(io("cannot read"))?;
            manifest = Some(parse_manifest(file, &json)?);
            continue;
        };
        let Some(expected) = m.files.iter().find(|f| f.name == name) else {
            return Err(not_archive(format!("it holds {name:?}, which its manifest does not list")).into());
        };
        progress.line(&format!("import: checking {name} ({} MiB)", expected.bytes >> 20));
        let target = staging.join(&name);
        let (bytes, sha256) = copy_hashing(&mut entry, &target).map_err(io("cannot unpack"))?;
        let corrupt = |why: String| ArchiveError::Corrupt { path: path.clone(), entry: name.clone(), why };
        if bytes != expected.bytes {
            return Err(corrupt(format!("{bytes} bytes where the manifest says {}", expected.bytes)).into());
        }
        if sha256 != expected.sha256 {
            return Err(corrupt("its SHA-256 differs from the manifest's".into()).into());
        }
        seen.push(name);
    }
    let manifest = manifest.ok_or_else(|| not_archive("it is empty".into()))?;
    for wanted in [KERNEL_NAME, ROOTFS_NAME] {
        if !seen.iter().any(|s| s == wanted) {
            return Err(not_archive(format!("it has no {wanted}")).into());
        }
    }
    Ok(manifest)
}

fn parse_manifest(file: &Path, json: &[u8]) -> Result<Manifest, ArchiveError> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| ArchiveError::NotAnArchive {
        path: file.to_path_buf(),
        why: format!("its manifest is not JSON ({e})"),
    })?;
    let found = value.get("format_version").and_then(serde_json::Value::as_u64).unwrap_or(0);
    if found != u64::from(ARCHIVE_FORMAT_VERSION) {
        return Err(ArchiveError::WrongVersion {
            path: file.to_path_buf(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
        });
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| ArchiveError::NotAnArchive {
        path: file.to_path_buf(),
        why: format!("its manifest is incomplete ({e})"),
    })?;
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if names != [KERNEL_NAME, ROOTFS_NAME] {
        return Err(ArchiveError::NotAnArchive {
            path: file.to_path_buf(),
            why: format!("its manifest lists {names:?}, not [{KERNEL_NAME:?}, {ROOTFS_NAME:?}]"),
        });
    }
    if manifest.version.is_empty() || !manifest.version.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ArchiveError::NotAnArchive {
            path: file.to_path_buf(),
            why: format!("its image version {:?} is not a content hash", manifest.version),
        });
    }
    Ok(manifest)
}

/// Moves the checked files from `staging` into the cache and makes them the current image.
fn place(cache: &Cache, staging: &Path, m: &Manifest) -> Result<ImageInfo, ImageError> {
    let key = format!("imported-{}", m.version);
    let kernel_dir = cache.kernel_dir(&key);
    let kernel = kernel_dir.join(KERNEL_NAME);
    let rootfs = cache.rootfs_image(&key);
    if !kernel.is_file() {
        let _ = std::fs::remove_dir_all(&kernel_dir);
        std::fs::create_dir_all(&kernel_dir).map_err(io_error("cannot create", &kernel_dir))?;
        rename(&staging.join(KERNEL_NAME), &kernel)?;
    }
    if !rootfs.is_file() {
        rename(&staging.join(ROOTFS_NAME), &rootfs)?;
    }
    let rootfs_bytes = m.files.iter().find(|f| f.name == ROOTFS_NAME).map_or(0, |f| f.bytes);
    let info = ImageInfo {
        kernel,
        rootfs,
        cmdline: m.cmdline.clone(),
        flavour: m.flavour,
        version: m.version.clone(),
        kernel_build_s: m.kernel_build_s,
        rootfs_bytes,
    };
    write_json(&cache.current_manifest(), &info)?;
    Ok(info)
}

fn rename(from: &Path, to: &Path) -> Result<(), CacheError> {
    std::fs::rename(from, to).map_err(io_error("cannot move into the cache", to))
}

/// Copies `from` into a new file `to` (synced); returns its size and SHA-256 (hex).
fn copy_hashing(from: &mut impl Read, to: &Path) -> std::io::Result<(u64, String)> {
    let mut out = BufWriter::new(File::create(to)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok((total, hex(&hasher.finalize())))
}

/// The size and SHA-256 (hex) of the file at `path`.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = BufReader::new(File::open(path)?);
    let mut hasher = Sha256::new();
    let total = std::io::copy(&mut file, &mut hasher)?;
    Ok((total, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::SilentProgress;

    /// A cache whose current image is a small fake kernel and root filesystem.
    fn built_cache(dir: &Path) -> (Cache, ImageInfo) {
        let cache = Cache::locate(Some(dir)).unwrap();
        cache.create_dirs().unwrap();
        let kernel = cache.kernel_dir("k1").join("vmlinux");
        std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
        std::fs::write(&kernel, b"\x7fELF a kernel").unwrap();
        let rootfs = cache.rootfs_image("r1");
        std::fs::write(&rootfs, vec![7u8; 3 << 20]).unwrap();
        let info = ImageInfo {
            kernel,
            rootfs,
            cmdline: "console=ttyS0".into(),
            flavour: Flavour::Pvm,
            version: "0123456789abcdef".into(),
            kernel_build_s: 12.5,
            rootfs_bytes: 3 << 20,
        };
        write_json(&cache.current_manifest(), &info).unwrap();
        (cache, info)
    }

    #[test]
    fn an_exported_image_imports_as_the_same_image() {
        let (a, b, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, info) = built_cache(a.path());
        let file = out.path().join("image.tar");
        export(&from, &file, &SilentProgress).unwrap();
        let into = Cache::locate(Some(b.path())).unwrap();
        let imported = import(&into, &file, &SilentProgress).unwrap();
        assert_eq!(current_image_in(&into).unwrap(), imported);
        assert_eq!((imported.version.as_str(), imported.flavour), (info.version.as_str(), info.flavour));
        assert_eq!((imported.cmdline.as_str(), imported.rootfs_bytes), (info.cmdline.as_str(), info.rootfs_bytes));
        assert_eq!(std::fs::read(&imported.kernel).unwrap(), std::fs::read(&info.kernel).unwrap());
        assert_eq!(std::fs::read(&imported.rootfs).unwrap(), std::fs::read(&info.rootfs).unwrap());
        // Importing it again changes nothing.
        assert_eq!(import(&into, &file, &SilentProgress).unwrap(), imported);
    }

    #[test]
    fn a_corrupt_archive_is_refused_and_nothing_becomes_current() {
        let (a, b, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, _) = built_cache(a.path());
        let file = out.path().join("image.tar");
        export(&from, &file, &SilentProgress).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        // Flip a byte inside the root filesystem's data (the last entry, before the tar's end).
        let at = bytes.len() - 4096;
        bytes[at] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let into = Cache::locate(Some(b.path())).unwrap();
        let err = import(&into, &file, &SilentProgress).unwrap_err().to_string();
        assert!(err.contains("rootfs.ext4 is corrupt") && err.contains("SHA-256"), "{err}");
        assert!(matches!(current_image_in(&into), Err(ImageError::NotBuilt { .. })), "nothing became current");
        // A truncated one too.
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        assert!(import(&into, &file, &SilentProgress).is_err());
        assert!(matches!(current_image_in(&into), Err(ImageError::NotBuilt { .. })));
    }

    #[test]
    fn another_format_version_or_a_foreign_file_is_refused_with_what_it_is() {
        let (b, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let into = Cache::locate(Some(b.path())).unwrap();
        let file = out.path().join("future.tar");
        let manifest = br#"{"format_version": 99, "version": "ab"}"#;
        let mut tar = tar::Builder::new(File::create(&file).unwrap());
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest.len() as u64);
        header.set_cksum();
        tar.append_data(&mut header, MANIFEST_NAME, &manifest[..]).unwrap();
        tar.finish().unwrap();
        let err = import(&into, &file, &SilentProgress).unwrap_err().to_string();
        assert!(err.contains("format 99") && err.contains("reads format 1"), "{err}");

        let foreign = out.path().join("notes.txt");
        std::fs::write(&foreign, b"not a tar at all").unwrap();
        let err = import(&into, &foreign, &SilentProgress).unwrap_err().to_string();
        assert!(err.contains("is not a capsule image archive"), "{err}");
        assert!(matches!(current_image_in(&into), Err(ImageError::NotBuilt { .. })));
    }
}
