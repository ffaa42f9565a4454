//! The guest's disks. The read-only base: Debian via `debootstrap`, the
//! language packages installed with apt inside the tree, trimmed and tuned
//! (matplotlib on Agg with a prebuilt font cache), then packed with the agent
//! into an ext4 image by `mkfs.ext4 -d`. The per-sandbox writable disk: a
//! sparse file formatted ext4.
//!
//! Two cache levels: the customised tree (keyed by suite and package list; the
//! minutes-long part) and the packed image (keyed by the tree and the agent's
//! hash; seconds). Never mounts anything and never uses loop devices; root is
//! needed only for debootstrap and chroot.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::agent::AgentBinary;
use super::cache::{io_error, publish, read_json, remove_any, write_json, Cache, CacheError, KeyHasher};
use super::host::{require_root, require_tool, HostError};
use super::progress::{format_duration, run_logged, CommandError, Progress};

/// The Debian release of the guest.
pub const DEBIAN_SUITE: &str = "bookworm";
/// Where the agent lives in the guest (the kernel's `init=`).
pub const AGENT_GUEST_PATH: &str = "usr/local/sbin/capsule-agent";
/// The guest's host name.
pub const GUEST_HOSTNAME: &str = "capsule";
/// What the guest runs code with: the built-in template's `apt` packages
/// (`templates/default.toml`). bash and coreutils are essential, so always there.
fn packages() -> Vec<&'static str> {
    crate::builtin_template::apt_packages().collect()
}
/// Installed first so that apt takes them for `a | b` dependencies instead of
/// the heavy first alternatives: python3-fonttools depends on
/// `python3-scipy | python3-munkres`, and scipy drags in gcc, g++ and boost (~700 MB).
const LIGHT_ALTERNATIVES: &[&str] = &["python3-munkres", "python3-ufolib2", "python3-unicodedata2"];
/// Python packages whose bytecode is precompiled and whose test suites are dropped.
const PYTHON_DIST_PACKAGES: &[&str] = &["numpy", "pandas", "matplotlib"];
/// Bumped when the base recipe changes in a way the package list does not show.
const BASE_RECIPE_VERSION: &str = "capsule-base-2";
/// Bumped when packing changes.
const PACK_RECIPE_VERSION: &str = "capsule-pack-1";
/// Filesystem block size of both disks.
const EXT4_BLOCK_BYTES: u64 = 4096;
/// Free space in the base image beyond its content: 20 % plus this.
const BASE_IMAGE_SLACK_BYTES: u64 = 32 << 20;
const MIB_BYTES: u64 = 1 << 20;
/// Bounds of a writable disk.
pub const MIN_WRITABLE_DISK_MIB: u64 = 16;
/// Bounds of a writable disk.
pub const MAX_WRITABLE_DISK_MIB: u64 = 1 << 20;
/// `apt-get` arguments (no pty: the chroot has no /dev/pts).
const APT_INSTALL_ARGS: &[&str] = &["-o", "Dpkg::Use-Pty=0", "install", "-y", "--no-install-recommends"];
/// PATH inside the chroot.
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of building the guest disks.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A tool is missing or root is needed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Cache I/O failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A build step failed.
    #[error("root filesystem build step failed")]
    Step(#[source] CommandError),
    /// A writable disk size out of range.
    #[error(
        "writable disk size {size_mib} MiB is out of range ({MIN_WRITABLE_DISK_MIB}..={MAX_WRITABLE_DISK_MIB} MiB)"
    )]
    DiskSize {
        /// The requested size.
        size_mib: u64,
    },
    /// Formatting a writable disk failed.
    #[error("mkfs.ext4 on {path} failed: {stderr}")]
    Mkfs {
        /// The disk.
        path: PathBuf,
        /// What mkfs said.
        stderr: String,
    },
}

/// A customised Debian tree in the cache.
#[derive(Debug, Clone)]
pub struct BaseTree {
    /// The tree's root directory.
    pub root: PathBuf,
    /// Its content key.
    pub key: String,
}

/// A packed root filesystem image.
#[derive(Debug, Clone)]
pub struct RootfsArtifact {
    /// The ext4 image.
    pub image: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its content key.
    pub key: String,
}

/// `base.json` in a base tree's cache directory.
#[derive(Debug, Serialize, Deserialize)]
struct BaseManifest {
    suite: String,
    mirror: String,
    packages: Vec<String>,
    build_s: f64,
}

fn base_key() -> String {
    let mut key = KeyHasher::new(BASE_RECIPE_VERSION);
    key.field(DEBIAN_SUITE.as_bytes());
    for package in LIGHT_ALTERNATIVES.iter().chain(&packages()) {
        key.field(package.as_bytes());
    }
    key.finish()
}

/// Returns the cached customised Debian tree, debootstrapping it first if needed.
pub fn ensure_base(cache: &Cache, mirror: &str, progress: &dyn Progress) -> Result<BaseTree, RootfsError> {
    let key = base_key();
    let dir = cache.base_dir(&key);
    let root = dir.join("root");
    if read_json::<BaseManifest>(&dir.join("base.json"))?.is_some() && root.is_dir() {
        progress.line(&format!("rootfs: cached Debian tree {key}"));
        return Ok(BaseTree { root, key });
    }
    require_root("debootstrap")?;
    require_tool("debootstrap", "debootstrap")?;
    require_tool("chroot", "coreutils")?;

    let work = cache.fresh_tmp(&format!("base-{key}"))?;
    let built = build_base_in(cache, mirror, &key, &work, progress);
    // A failed debootstrap leaves hundreds of MB: never keep it (on success it was moved away).
    let cleaned = remove_any(&work);
    built?;
    cleaned?;
    Ok(BaseTree { root, key })
}

/// Debootstraps and customises a tree in `work`, then publishes it as `base/<key>`.
fn build_base_in(
    cache: &Cache,
    mirror: &str,
    key: &str,
    work: &Path,
    progress: &dyn Progress,
) -> Result<(), RootfsError> {
    let started = std::time::Instant::now();
    let log = cache.log(&format!("rootfs-base-{key}"));
    remove_any(&log)?;
    let tree = work.join("root");
    std::fs::create_dir_all(&tree).map_err(io_error("cannot create", &tree))?;
    let step =
        |label: &str, command: &mut Command| run_logged(progress, label, command, &log).map_err(RootfsError::Step);

    progress.line(&format!("rootfs: debootstrap {DEBIAN_SUITE} from {mirror} (log: {})", log.display()));
    step(
        "rootfs: debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", "--include=ca-certificates", DEBIAN_SUITE])
            .arg(&tree)
            .arg(mirror),
    )?;
    progress.line(&format!("rootfs: apt-get install {}", packages().join(" ")));
    step(
        "rootfs: apt-get install (alternatives)",
        chroot(&tree, "apt-get").args(APT_INSTALL_ARGS).args(LIGHT_ALTERNATIVES),
    )?;
    step("rootfs: apt-get install", chroot(&tree, "apt-get").args(APT_INSTALL_ARGS).args(packages()))?;

    configure_guest_files(&tree)?;
    progress.line("rootfs: precompiling python bytecode and the matplotlib font cache");
    let mut compileall = chroot(&tree, "python3");
    compileall.args(["-m", "compileall", "-q", "-j0"]);
    for package in PYTHON_DIST_PACKAGES {
        compileall.arg(format!("/usr/lib/python3/dist-packages/{package}"));
    }
    step("rootfs: compileall", &mut compileall)?;
    step(
        "rootfs: matplotlib font cache",
        chroot(&tree, "python3").args([
            "-c",
            "import matplotlib.pyplot as plt, matplotlib.font_manager; assert plt.get_backend().lower() == 'agg', plt.get_backend()",
        ]),
    )?;
    step("rootfs: apt-get clean", chroot(&tree, "apt-get").arg("clean"))?;
    trim(&tree)?;

    write_json(
        &work.join("base.json"),
        &BaseManifest {
            suite: DEBIAN_SUITE.to_owned(),
            mirror: mirror.to_owned(),
            packages: LIGHT_ALTERNATIVES.iter().chain(&packages()).map(|p| (*p).to_owned()).collect(),
            build_s: started.elapsed().as_secs_f64(),
        },
    )?;
    publish(work, &cache.base_dir(key))?;
    progress.line(&format!("rootfs: Debian tree ready in {}", format_duration(started.elapsed())));
    Ok(())
}

/// A command run inside `tree` with a clean, predictable environment.
fn chroot(tree: &Path, program: &str) -> Command {
    let mut command = Command::new("chroot");
    command
        .arg(tree)
        .arg(program)
        .env_clear()
        .env("PATH", CHROOT_PATH)
        .env("HOME", "/root")
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    command
}

/// Files the guest needs that debootstrap does not write.
fn configure_guest_files(tree: &Path) -> Result<(), RootfsError> {
    let write = |relative: &str, text: &str| {
        let path = tree.join(relative);
        std::fs::write(&path, text).map_err(io_error("cannot write", &path))
    };
    write("etc/matplotlibrc", "backend: Agg\n")?;
    write("etc/hostname", &format!("{GUEST_HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!("127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    )?;
    // The sandbox's resolver is its network stack's gateway (see capsule_vmm::net::stack).
    write("etc/resolv.conf", "nameserver 10.0.2.2\n")?;
    // The sandbox is the user's own machine: `pip install` as root must just work (PEP 668's
    // "externally-managed-environment" guards a system the sandbox does not have).
    let marker = tree.join("usr/lib/python3.11/EXTERNALLY-MANAGED");
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(io_error("cannot remove", &marker))?;
    }
    write("etc/pip.conf", "[global]\nbreak-system-packages = true\nroot-user-action = ignore\n")?;
    Ok(())
}

/// Drops what a sandbox never reads: docs, man pages, translations, apt
/// indexes, logs, and the test suites of the big python packages.
fn trim(tree: &Path) -> Result<(), RootfsError> {
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log",
    ] {
        clear_dir(&tree.join(dir), &[])?;
    }
    // glibc reads locale.alias; the translations are the bulk.
    clear_dir(&tree.join("usr/share/locale"), &["locale.alias"])?;
    for package in PYTHON_DIST_PACKAGES {
        remove_dirs_named(&tree.join("usr/lib/python3/dist-packages").join(package), "tests")?;
    }
    Ok(())
}

/// Removes everything inside `dir` except the entries named in `keep`.
fn clear_dir(dir: &Path, keep: &[&str]) -> Result<(), RootfsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("cannot list", dir)(e).into()),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("cannot list", dir))?;
        if !keep.iter().any(|k| entry.file_name() == **k) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_dirs_named(dir: &Path, name: &str) -> Result<(), RootfsError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir {
            continue;
        }
        if entry.file_name() == name {
            remove_any(&entry.path())?;
        } else {
            remove_dirs_named(&entry.path(), name)?;
        }
    }
    Ok(())
}

/// Returns the packed image of `base` with `agent` installed, packing it if needed.
pub fn ensure_packed(
    cache: &Cache,
    base: &BaseTree,
    agent: &AgentBinary,
    progress: &dyn Progress,
) -> Result<RootfsArtifact, RootfsError> {
    let mut hasher = KeyHasher::new(PACK_RECIPE_VERSION);
    hasher.field(base.key.as_bytes()).field(agent.sha256.as_bytes()).field(GUEST_HOSTNAME.as_bytes());
    let key = hasher.finish();
    let image = cache.rootfs_image(&key);
    if let Ok(meta) = std::fs::metadata(&image) {
        progress.line(&format!("rootfs: cached image {key}"));
        return Ok(RootfsArtifact { image, bytes: meta.len(), key });
    }
    require_tool("mkfs.ext4", "e2fsprogs")?;
    let started = std::time::Instant::now();
    install_agent(&base.root, &agent.path)?;

    let (content_bytes, inodes) = tree_usage(&base.root)?;
    let size_bytes = (content_bytes + content_bytes / 5 + BASE_IMAGE_SLACK_BYTES).div_ceil(MIB_BYTES) * MIB_BYTES;
    let inode_count = inodes + inodes / 5 + 1024;
    let tmp = cache.fresh_tmp(&format!("rootfs-{key}.ext4"))?;
    let file = std::fs::File::create(&tmp).map_err(io_error("cannot create", &tmp))?;
    file.set_len(size_bytes).map_err(io_error("cannot size", &tmp))?;
    drop(file);
    progress.line(&format!(
        "rootfs: packing {} MiB of files into a {} MiB ext4 image",
        content_bytes / MIB_BYTES,
        size_bytes / MIB_BYTES
    ));
    let log = cache.log(&format!("rootfs-pack-{key}"));
    remove_any(&log)?;
    run_logged(
        progress,
        "rootfs: mkfs.ext4 -d",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-b"])
            .arg(EXT4_BLOCK_BYTES.to_string())
            .args(["-m", "0", "-O", "^has_journal", "-L", "capsule-root", "-N"])
            .arg(inode_count.to_string())
            .arg("-d")
            .arg(&base.root)
            .arg(&tmp),
        &log,
    )
    .map_err(RootfsError::Step)?;
    publish(&tmp, &image)?;
    progress.line(&format!("rootfs: image packed in {}", format_duration(started.elapsed())));
    Ok(RootfsArtifact { image, bytes: size_bytes, key })
}

/// Copies the agent to its guest path, mode 0755, replacing any previous one atomically.
fn install_agent(tree: &Path, agent: &Path) -> Result<(), RootfsError> {
    let dest = tree.join(AGENT_GUEST_PATH);
    let tmp = dest.with_extension("new");
    std::fs::copy(agent, &tmp).map_err(io_error("cannot copy the agent to", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io_error("cannot chmod", &tmp))?;
    std::fs::rename(&tmp, &dest).map_err(io_error("cannot move into place", &dest))?;
    Ok(())
}

/// Bytes the tree needs in whole blocks (hard links counted once per name,
/// which only overestimates) and its number of inodes.
fn tree_usage(root: &Path) -> Result<(u64, u64), RootfsError> {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        inodes += 1;
        bytes += EXT4_BLOCK_BYTES;
        for entry in std::fs::read_dir(&dir).map_err(io_error("cannot list", &dir))? {
            let entry = entry.map_err(io_error("cannot list", &dir))?;
            let meta = std::fs::symlink_metadata(entry.path()).map_err(io_error("cannot stat", &entry.path()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                inodes += 1;
                bytes += meta.len().div_ceil(EXT4_BLOCK_BYTES) * EXT4_BLOCK_BYTES;
            }
        }
    }
    Ok((bytes, inodes))
}

/// Creates a sandbox's writable disk: a sparse file of `size_mib` MiB, formatted ext4
/// with lazy initialisation so that it takes milliseconds and no space up front.
pub fn create_writable_disk(path: &Path, size_mib: u64) -> Result<(), RootfsError> {
    if !(MIN_WRITABLE_DISK_MIB..=MAX_WRITABLE_DISK_MIB).contains(&size_mib) {
        return Err(RootfsError::DiskSize { size_mib });
    }
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs")?;
    let file = std::fs::File::create(path).map_err(io_error("cannot create", path))?;
    file.set_len(size_mib * MIB_BYTES).map_err(io_error("cannot size", path))?;
    drop(file);
    let output = Command::new(mkfs)
        .args(["-q", "-F", "-b"])
        .arg(EXT4_BLOCK_BYTES.to_string())
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1", "-L", "capsule-rw"])
        .arg(path)
        .output()
        .map_err(io_error("cannot run mkfs.ext4 on", path))?;
    if !output.status.success() {
        return Err(RootfsError::Mkfs {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::progress::SilentProgress;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writable_disk_is_sparse_ext4_with_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("rw.ext4");
        create_writable_disk(&disk, 64).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 64 * MIB_BYTES);
        assert!(meta.blocks() * 512 < 16 * MIB_BYTES, "not sparse: {} blocks", meta.blocks());
        let bytes = std::fs::read(&disk).unwrap();
        // ext4 superblock at 1024: magic 0xEF53 at offset 0x38, volume name at 0x78.
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        assert_eq!(&bytes[1024 + 0x78..1024 + 0x78 + 10], b"capsule-rw");
    }

    #[test]
    fn packing_installs_the_agent_and_repacks_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::locate(Some(&dir.path().join("cache"))).unwrap();
        cache.create_dirs().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("usr/local/sbin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "capsule\n").unwrap();
        let base = BaseTree { root: root.clone(), key: "testbase".into() };
        let agent_path = dir.path().join("agent-v1");
        std::fs::write(&agent_path, b"agent one").unwrap();
        let agent = AgentBinary { path: agent_path, sha256: "one".into() };

        let first = ensure_packed(&cache, &base, &agent, &SilentProgress).unwrap();
        let bytes = std::fs::read(&first.image).unwrap();
        // ext4 superblock at 1024: magic at 0x38, volume name at 0x78.
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        assert_eq!(&bytes[1024 + 0x78..1024 + 0x78 + 12], b"capsule-root");
        let stat = Command::new("debugfs")
            .args(["-R", "stat /usr/local/sbin/capsule-agent"])
            .arg(&first.image)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&stat.stdout);
        assert!(stat.contains("Mode:  0755"), "{stat}");
        assert_eq!(first.bytes, std::fs::metadata(&first.image).unwrap().len());

        let again = ensure_packed(&cache, &base, &agent, &SilentProgress).unwrap();
        assert_eq!(again.image, first.image);

        let agent_two = AgentBinary { sha256: "two".into(), ..agent };
        let second = ensure_packed(&cache, &base, &agent_two, &SilentProgress).unwrap();
        assert_ne!(second.image, first.image);
    }

    #[test]
    fn writable_disk_size_out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_writable_disk(&dir.path().join("d"), 1).unwrap_err();
        assert_eq!(err.to_string(), "writable disk size 1 MiB is out of range (16..=1048576 MiB)");
        assert!(!dir.path().join("d").exists());
    }

    #[test]
    fn trim_keeps_locale_alias_and_drops_python_tests() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        for d in [
            "usr/share/locale/de/LC_MESSAGES",
            "usr/share/doc/bash",
            "usr/lib/python3/dist-packages/pandas/tests/io",
            "usr/lib/python3/dist-packages/pandas/core",
        ] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::write(tree.join("usr/share/locale/locale.alias"), "x").unwrap();
        trim(tree).unwrap();
        assert!(tree.join("usr/share/locale/locale.alias").is_file());
        assert!(!tree.join("usr/share/locale/de").exists());
        assert!(tree.join("usr/share/doc").is_dir());
        assert!(!tree.join("usr/share/doc/bash").exists());
        assert!(!tree.join("usr/lib/python3/dist-packages/pandas/tests").exists());
        assert!(tree.join("usr/lib/python3/dist-packages/pandas/core").is_dir());
    }
}
