//! The guest kernel: Debian's `linux-source-6.12`, `make tinyconfig`, our
//! fragments from `rootfs/kernel/` merged on top, `make olddefconfig`, a check
//! that every option the fragments ask for survived, then `make vmlinux`.
//! The pvm flavour first applies the PVM guest patch(es) and adds `pvm.config`; both flavours
//! then get our own patches from `rootfs/kernel/patches/`.
//!
//! The result (the uncompressed `vmlinux` ELF, its `.config`, the build time) is
//! cached under a key made of every input: the source tarball's identity, the
//! fragments, the flavour and every patch's contents. Never touches `/usr/src`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::cache::{io_error, publish, read_json, remove_any, write_json, Cache, CacheError, KeyHasher};
use super::host::{build_jobs, require_file, require_tool, HostError};
use super::progress::{format_duration, run_logged, CommandError, Progress};
use super::Flavour;

/// Debian's kernel source tarball (package `linux-source-6.12`).
pub const LINUX_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
const LINUX_SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The fragment both flavours use.
const BASE_FRAGMENT: Fragment =
    Fragment { name: "capsule.config", text: include_str!("../../../rootfs/kernel/capsule.config") };
/// Added for the pvm flavour.
const PVM_FRAGMENT: Fragment = Fragment { name: "pvm.config", text: include_str!("../../../rootfs/kernel/pvm.config") };
/// Our own patches, applied to both flavours after the given ones. `clear_bss()` skips the
/// unused PMD alignment in front of `.bss..decrypted` (1.8 of the 2.1 MiB it cleared): under
/// PVM it runs before the guest goes native, where KVM emulates every store.
const OWN_PATCHES: &[Fragment] = &[Fragment {
    name: "clear-bss-skip-decrypted-padding.patch",
    text: include_str!("../../../rootfs/kernel/patches/clear-bss-skip-decrypted-padding.patch"),
}];
/// Bumped when the build recipe changes in a way the other inputs do not show.
const KERNEL_RECIPE_VERSION: &str = "capsule-kernel-1";
const MAKE_ARCH: &str = "ARCH=x86_64";

/// Errors of building the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A tool or file is missing.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Cache I/O failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A kernel patch file does not exist.
    #[error("kernel patch {path} cannot be read")]
    PatchUnreadable {
        /// The patch.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A patch did not apply.
    #[error("kernel patch {patch} does not apply to {tarball} (is it for this kernel version?)")]
    PatchFailed {
        /// The patch.
        patch: PathBuf,
        /// The tarball.
        tarball: &'static str,
        /// The `patch` failure.
        #[source]
        source: CommandError,
    },
    /// The unpacked tarball has no source directory.
    #[error("{tarball} did not unpack into a linux-source-* directory under {work}")]
    NoSourceDir {
        /// The tarball.
        tarball: &'static str,
        /// Where it was unpacked.
        work: PathBuf,
    },
    /// A build step failed.
    #[error("kernel build step failed")]
    Step(#[source] CommandError),
    /// Options the fragments require are not in the final config.
    #[error("the {flavour} kernel .config lacks required options after `make olddefconfig` (their dependencies are unmet or the option does not exist in this source{pvm_hint}): {missing}; config: {config}")]
    MissingOptions {
        /// The flavour.
        flavour: Flavour,
        /// The missing lines, comma separated.
        missing: String,
        /// The resulting .config.
        config: PathBuf,
        /// Extra hint for the pvm flavour.
        pvm_hint: &'static str,
    },
    /// `make vmlinux` produced something that is not an ELF file.
    #[error("{path} is not an ELF file")]
    NotElf {
        /// The file.
        path: PathBuf,
    },
}

/// What the kernel build is asked for.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// The flavour.
    pub flavour: Flavour,
    /// Guest patches applied in order with `patch -p1` (pvm flavour).
    pub patches: Vec<PathBuf>,
}

/// A built kernel.
#[derive(Debug, Clone)]
pub struct KernelArtifact {
    /// The uncompressed `vmlinux`.
    pub vmlinux: PathBuf,
    /// Seconds `make vmlinux` took when it was built.
    pub build_s: f64,
    /// Its content key.
    pub key: String,
}

/// `kernel.json` in a kernel's cache directory.
#[derive(Debug, Serialize, Deserialize)]
struct KernelManifest {
    flavour: Flavour,
    build_s: f64,
    source: String,
    patches: Vec<PathBuf>,
}

/// One file of `rootfs/kernel/` built into capsule: a config fragment or a patch.
#[derive(Debug, Clone, Copy)]
struct Fragment {
    name: &'static str,
    text: &'static str,
}

fn fragments(flavour: Flavour) -> Vec<Fragment> {
    match flavour {
        Flavour::Standard => vec![BASE_FRAGMENT],
        Flavour::Pvm => vec![BASE_FRAGMENT, PVM_FRAGMENT],
    }
}

/// Returns the cached kernel for `spec`, building it first if needed.
pub fn ensure(cache: &Cache, spec: &KernelSpec, progress: &dyn Progress) -> Result<KernelArtifact, KernelError> {
    let key = kernel_key(spec)?;
    let dir = cache.kernel_dir(&key);
    let vmlinux = dir.join("vmlinux");
    if let Some(manifest) = read_json::<KernelManifest>(&dir.join("kernel.json"))? {
        if vmlinux.is_file() {
            progress.line(&format!("kernel ({}): cached {key}", spec.flavour));
            return Ok(KernelArtifact { vmlinux, build_s: manifest.build_s, key });
        }
    }
    build(cache, spec, &key, progress)
}

fn kernel_key(spec: &KernelSpec) -> Result<String, KernelError> {
    let tarball = Path::new(LINUX_SOURCE_TARBALL);
    require_file(tarball, LINUX_SOURCE_PACKAGE)?;
    let meta = std::fs::metadata(tarball).map_err(io_error("cannot stat", tarball))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let mut key = KeyHasher::new(KERNEL_RECIPE_VERSION);
    key.field(LINUX_SOURCE_TARBALL.as_bytes())
        .field(&meta.len().to_le_bytes())
        .field(&mtime.to_le_bytes())
        .field(spec.flavour.to_string().as_bytes());
    for fragment in fragments(spec.flavour) {
        key.field(fragment.text.as_bytes());
    }
    for patch in &spec.patches {
        let bytes =
            std::fs::read(patch).map_err(|source| KernelError::PatchUnreadable { path: patch.clone(), source })?;
        key.field(&bytes);
    }
    for patch in OWN_PATCHES {
        key.field(patch.text.as_bytes());
    }
    Ok(key.finish())
}

fn build(cache: &Cache, spec: &KernelSpec, key: &str, progress: &dyn Progress) -> Result<KernelArtifact, KernelError> {
    for (tool, package) in [
        ("make", "make"),
        ("gcc", "gcc"),
        ("flex", "flex"),
        ("bison", "bison"),
        ("bc", "bc"),
        ("tar", "tar"),
        ("xz", "xz-utils"),
        ("perl", "perl"),
    ] {
        require_tool(tool, package)?;
    }
    require_file(Path::new("/usr/include/libelf.h"), "libelf-dev")?;
    require_tool("patch", "patch")?;

    let work = cache.fresh_tmp(&format!("kernel-{key}"))?;
    std::fs::create_dir_all(&work).map_err(io_error("cannot create", &work))?;
    let built = build_in(cache, spec, key, &work, progress);
    // The unpacked tree is about 1.5 GB: never leave it behind, even on failure.
    let cleaned = remove_any(&work);
    let artifact = built?;
    cleaned?;
    Ok(artifact)
}

fn build_in(
    cache: &Cache,
    spec: &KernelSpec,
    key: &str,
    work: &Path,
    progress: &dyn Progress,
) -> Result<KernelArtifact, KernelError> {
    let flavour = spec.flavour;
    let log = cache.log(&format!("kernel-{flavour}-{key}"));
    remove_any(&log)?;
    let step =
        |label: &str, command: &mut Command| run_logged(progress, label, command, &log).map_err(KernelError::Step);

    progress.line(&format!("kernel ({flavour}): unpacking {LINUX_SOURCE_TARBALL} (log: {})", log.display()));
    step("kernel: unpack", Command::new("tar").arg("-xf").arg(LINUX_SOURCE_TARBALL).arg("-C").arg(work))?;
    let src = source_dir(work)?;

    let mut patches = spec.patches.clone();
    for own in OWN_PATCHES {
        let path = work.join(own.name);
        std::fs::write(&path, own.text).map_err(io_error("cannot write", &path))?;
        patches.push(path);
    }
    for patch in &patches {
        progress.line(&format!("kernel ({flavour}): applying {}", patch.display()));
        let absolute = std::path::absolute(patch).unwrap_or_else(|_| patch.clone());
        run_logged(
            progress,
            "kernel: patch",
            Command::new("patch").current_dir(&src).args(["-p1", "--forward", "--batch", "-i"]).arg(&absolute),
            &log,
        )
        .map_err(|source| KernelError::PatchFailed {
            patch: patch.clone(),
            tarball: LINUX_SOURCE_TARBALL,
            source,
        })?;
    }

    progress.line(&format!("kernel ({flavour}): tinyconfig + rootfs/kernel fragments"));
    let make = || {
        let mut make = Command::new("make");
        make.current_dir(&src)
            .arg(MAKE_ARCH)
            .env("KBUILD_BUILD_USER", "capsule")
            .env("KBUILD_BUILD_HOST", "capsule")
            .env("KBUILD_BUILD_TIMESTAMP", "2024-01-01");
        make
    };
    step("kernel: tinyconfig", make().arg("tinyconfig"))?;
    let mut merge = Command::new("bash");
    merge.current_dir(&src).args(["scripts/kconfig/merge_config.sh", "-m", ".config"]);
    for fragment in fragments(flavour) {
        let path = work.join(fragment.name);
        std::fs::write(&path, fragment.text).map_err(io_error("cannot write", &path))?;
        merge.arg(path);
    }
    step("kernel: merge fragments", &mut merge)?;
    step("kernel: olddefconfig", make().arg("olddefconfig"))?;
    let config_path = src.join(".config");
    let config = std::fs::read_to_string(&config_path).map_err(io_error("cannot read", &config_path))?;
    let missing = missing_options(&config, &fragments(flavour));
    if !missing.is_empty() {
        return Err(KernelError::MissingOptions {
            flavour,
            missing: missing.join(", "),
            config: config_path,
            pvm_hint: match flavour {
                Flavour::Pvm => "; for pvm, check that the PVM guest patch was given and applied",
                Flavour::Standard => "",
            },
        });
    }

    let jobs = build_jobs();
    progress.line(&format!("kernel ({flavour}): make -j{jobs} vmlinux (several minutes; progress every 15 s)"));
    let took = step("kernel: make vmlinux", make().arg(format!("-j{jobs}")).arg("vmlinux"))?;
    let built = src.join("vmlinux");
    let head = std::fs::read(&built).map_err(io_error("cannot read", &built))?;
    if !head.starts_with(b"\x7fELF") {
        return Err(KernelError::NotElf { path: built });
    }
    progress.line(&format!("kernel ({flavour}): vmlinux built in {}", format_duration(took)));

    let out = cache.fresh_tmp(&format!("kernel-out-{key}"))?;
    std::fs::create_dir_all(&out).map_err(io_error("cannot create", &out))?;
    std::fs::rename(&built, out.join("vmlinux")).map_err(io_error("cannot move", &built))?;
    std::fs::copy(&config_path, out.join("config")).map_err(io_error("cannot copy", &config_path))?;
    let build_s = took.as_secs_f64();
    write_json(
        &out.join("kernel.json"),
        &KernelManifest { flavour, build_s, source: LINUX_SOURCE_TARBALL.to_owned(), patches: spec.patches.clone() },
    )?;
    let dir = cache.kernel_dir(key);
    publish(&out, &dir)?;
    Ok(KernelArtifact { vmlinux: dir.join("vmlinux"), build_s, key: key.to_owned() })
}

fn source_dir(work: &Path) -> Result<PathBuf, KernelError> {
    std::fs::read_dir(work)
        .map_err(io_error("cannot list", work))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("linux-source")))
        .ok_or_else(|| KernelError::NoSourceDir { tarball: LINUX_SOURCE_TARBALL, work: work.to_path_buf() })
}

/// The option lines the fragments require, in order, without duplicates.
fn required_options(fragments: &[Fragment]) -> Vec<&'static str> {
    let mut lines: Vec<&'static str> = Vec::new();
    for line in fragments.iter().flat_map(|f| f.text.lines()).map(str::trim) {
        let is_option = line.starts_with("CONFIG_") || (line.starts_with("# CONFIG_") && line.ends_with(" is not set"));
        if is_option && !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines
}

/// Required lines that `config` does not satisfy. `CONFIG_X=v` must appear
/// verbatim; `# CONFIG_X is not set` is satisfied when no `CONFIG_X=` line exists.
fn missing_options(config: &str, fragments: &[Fragment]) -> Vec<&'static str> {
    required_options(fragments)
        .into_iter()
        .filter(|required| match required.strip_prefix("# ") {
            Some(unset) => {
                let name = unset.trim_end_matches(" is not set");
                let assigned = format!("{name}=");
                config.lines().any(|l| l.starts_with(&assigned))
            }
            None => !config.lines().any(|l| l.trim() == *required),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_require_what_the_guest_needs() {
        let required = required_options(&fragments(Flavour::Standard));
        for option in [
            "CONFIG_64BIT=y",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_BLK=y",
            "CONFIG_VSOCKETS=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_HW_RANDOM_VIRTIO=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_EXT4_FS=y",
            "CONFIG_OVERLAY_FS=y",
            "CONFIG_TMPFS=y",
            "CONFIG_DEVTMPFS_MOUNT=y",
            "CONFIG_PVH=y",
            "CONFIG_KVM_GUEST=y",
            "CONFIG_PARAVIRT=y",
            "CONFIG_UNIX=y",
            "CONFIG_INET=y",
            "CONFIG_FUTEX=y",
            "CONFIG_EPOLL=y",
            "CONFIG_SHMEM=y",
            "CONFIG_SIGNALFD=y",
            "CONFIG_TIMERFD=y",
            "CONFIG_EVENTFD=y",
            "CONFIG_FILE_LOCKING=y",
            "CONFIG_SYSVIPC=y",
            "CONFIG_UNIX98_PTYS=y",
            "CONFIG_BINFMT_SCRIPT=y",
            "# CONFIG_MODULES is not set",
        ] {
            assert!(required.contains(&option), "{option} not required");
        }
        let pvm = required_options(&fragments(Flavour::Pvm));
        for option in ["CONFIG_PVM_GUEST=y", "CONFIG_HYPERVISOR_GUEST=y", "CONFIG_MITIGATION_PAGE_TABLE_ISOLATION=y"] {
            assert!(pvm.contains(&option), "{option} not required for pvm");
            assert!(
                option == "CONFIG_HYPERVISOR_GUEST=y" || !required.contains(&option),
                "{option} must not be forced on the standard flavour"
            );
        }
    }

    #[test]
    fn missing_options_names_each_unsatisfied_line() {
        let fragment = Fragment {
            name: "t.config",
            text: "# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_M is not set\n# CONFIG_N is not set\n",
        };
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=y\n";
        assert_eq!(missing_options(config, &[fragment]), vec!["CONFIG_B=y", "# CONFIG_N is not set"]);
        let satisfied = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_M is not set\n";
        assert!(missing_options(satisfied, &[fragment]).is_empty());
    }
}
