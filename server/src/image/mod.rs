//! `capsule image`: builds, caches and locates the guest image, meaning the
//! kernel (`vmlinux`), the read-only root filesystem (ext4 with the agent as
//! `init`) and the command line that boots them.
//!
//! This module is the recipe and the public contract (`ImageInfo`,
//! `current_image`, `ensure_image`, `create_writable_disk`); the steps live in
//! its submodules. It never boots anything: that is the engine's job.

mod agent;
mod archive;
mod cache;
mod host;
mod kernel;
pub mod progress;
mod rootfs;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use agent::AgentError;
pub use archive::{ArchiveError, ARCHIVE_FORMAT_VERSION};
pub use cache::CacheError;
pub use host::HostError;
pub use kernel::KernelError;
pub use progress::{Progress, SilentProgress, StderrProgress};
pub use rootfs::{RootfsError, MAX_WRITABLE_DISK_MIB, MIN_WRITABLE_DISK_MIB};

use cache::{read_json, write_json, Cache, KeyHasher};
use host::HostVirt;
use progress::format_duration;

/// What the image needs on the kernel command line beyond the VMM's own device
/// declarations. `clocksource=kvm-clock` keeps the guest clock continuous across
/// snapshot and restore on PVM hosts.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/usr/local/sbin/capsule-agent panic=-1 reboot=k quiet clocksource=kvm-clock";
/// Added for the pvm flavour. Under PVM the guest kernel's CPUID is not filtered by
/// the VMM, so it sees the host CPU's PCID and INVPCID: setting CR4.PCIDE then
/// faults (#GP in `init_mem_mapping`) and KVM cannot emulate INVPCID. Measured on
/// this host under qemu microvm (2026-11-21).
pub const PVM_EXTRA_CMDLINE: &str = "nopcid noinvpcid";

/// The full command line the image of `flavour` needs.
pub fn kernel_cmdline(flavour: Flavour) -> String {
    match flavour {
        Flavour::Standard => KERNEL_CMDLINE.to_owned(),
        Flavour::Pvm => format!("{KERNEL_CMDLINE} {PVM_EXTRA_CMDLINE}"),
    }
}
/// Environment variable listing kernel patches, colon separated.
pub const KERNEL_PATCHES_ENV: &str = "CAPSULE_KERNEL_PATCHES";
/// What to tell a PVM host's user to pass.
const PVM_PATCH_HINT: &str = "--kernel-patch /path/to/pvm-native-guest-6.12.117.patch";
const IMAGE_VERSION_DOMAIN: &str = "capsule-image-1";
/// Packed root filesystems kept in the cache, the current one included (each is
/// hundreds of MiB). Sandboxes hold their own hard link to theirs where the state
/// directory shares the cache's filesystem, so dropping one does not strand them.
const ROOTFS_IMAGES_KEPT: usize = 3;

/// Which guest kernel to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// An unpatched kernel, for hosts with VT-x or AMD-V.
    Standard,
    /// A kernel with the PVM guest patch, for PVM hosts (`kvm_pvm`).
    Pvm,
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavour::Standard => "standard",
            Flavour::Pvm => "pvm",
        })
    }
}

/// `capsule image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build the guest kernel and root filesystem (cached by content hash; a no-op when nothing changed).
    Build(BuildArgs),
    /// Print where the current image is.
    Info(InfoArgs),
    /// Write the current image (kernel and root filesystem, with checksums) to one file, for
    /// `capsule image import` on another machine.
    Export(ArchiveArgs),
    /// Make the image in a file written by `capsule image export` the current one (no build
    /// toolchain, root or Debian needed); a corrupt file or another format is refused.
    Import(ArchiveArgs),
}

/// Arguments of `capsule image export` and `capsule image import`.
#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// The archive file (a tar).
    pub file: PathBuf,
    /// Cache directory (default: as for `capsule image build`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Arguments of `capsule image build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Kernel flavour. Default: `pvm` on a PVM host given a patch, else `standard`.
    #[arg(long, value_enum)]
    pub flavour: Option<Flavour>,
    /// Guest kernel patch for the pvm flavour, applied with `patch -p1` (repeatable;
    /// default: $CAPSULE_KERNEL_PATCHES, colon separated).
    #[arg(long = "kernel-patch", value_name = "PATH")]
    pub kernel_patches: Vec<PathBuf>,
    /// Static guest agent binary (default: $CAPSULE_AGENT_BIN, capsule-agent next to
    /// this executable, or a fresh build from the source checkout).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Cache directory (default: $CAPSULE_CACHE_DIR, $XDG_CACHE_HOME/capsule or ~/.cache/capsule).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Debian mirror (default: $CAPSULE_DEBIAN_MIRROR, else this host's apt sources).
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
}

/// Arguments of `capsule image info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print the image as one JSON object (the contract other tools read).
    #[arg(long)]
    pub json: bool,
    /// Cache directory (default: as for `capsule image build`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// What to build; every `None` or empty field falls back to its environment variable or default.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Kernel flavour (default: detected from the host).
    pub flavour: Option<Flavour>,
    /// PVM guest kernel patches (default: `$CAPSULE_KERNEL_PATCHES`).
    pub kernel_patches: Vec<PathBuf>,
    /// Agent binary (default: see [`BuildArgs::agent`]).
    pub agent: Option<PathBuf>,
    /// Cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Debian mirror.
    pub mirror: Option<String>,
}

impl From<BuildArgs> for BuildOptions {
    fn from(args: BuildArgs) -> Self {
        Self {
            flavour: args.flavour,
            kernel_patches: args.kernel_patches,
            agent: args.agent,
            cache_dir: args.cache_dir,
            mirror: args.mirror,
        }
    }
}

/// A built image: the contract `capsule image info --json` prints and the engine boots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    /// The read-only ext4 root filesystem (`/dev/vda`).
    pub rootfs: PathBuf,
    /// Kernel command line the image needs (the VMM adds its device declarations).
    pub cmdline: String,
    /// The kernel flavour.
    pub flavour: Flavour,
    /// Content hash of kernel, rootfs and command line.
    pub version: String,
    /// Seconds the kernel's `make vmlinux` took.
    pub kernel_build_s: f64,
    /// Size of the rootfs image in bytes.
    pub rootfs_bytes: u64,
}

/// Errors of `capsule image`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Nothing built yet.
    #[error("no image built yet; run `capsule image build` (no manifest at {manifest})")]
    NotBuilt {
        /// Where the manifest was looked for.
        manifest: PathBuf,
    },
    /// The manifest names a file that is gone.
    #[error("the current image is incomplete ({missing} is gone); run `capsule image build`")]
    Incomplete {
        /// The missing file.
        missing: PathBuf,
    },
    /// The pvm flavour was asked for without a patch.
    #[error("the pvm kernel flavour needs the PVM guest patch: pass `{PVM_PATCH_HINT}` or set {KERNEL_PATCHES_ENV}")]
    PvmWithoutPatch,
    /// A build thread panicked.
    #[error("the {step} build thread panicked")]
    Panicked {
        /// Which step.
        step: &'static str,
    },
    /// Writing to stdout failed.
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The agent could not be found or is unfit.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The kernel build failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The root filesystem build failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// An image archive could not be written or read.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

/// Runs a `capsule image` subcommand.
pub fn run(command: ImageCommand) -> Result<(), ImageError> {
    let mut stdout = std::io::stdout().lock();
    match command {
        ImageCommand::Build(args) => {
            let info = build(&args.into(), &StderrProgress::new())?;
            print_human(&mut stdout, &info).map_err(ImageError::Stdout)
        }
        ImageCommand::Export(args) => {
            let info = archive::export(&Cache::locate(args.cache_dir.as_deref())?, &args.file, &StderrProgress::new())?;
            writeln!(stdout, "exported image {} ({}) to {}", info.version, info.flavour, args.file.display())
                .map_err(ImageError::Stdout)
        }
        ImageCommand::Import(args) => {
            let info = archive::import(&Cache::locate(args.cache_dir.as_deref())?, &args.file, &StderrProgress::new())?;
            let host_flavour = if host::detect_virt() == HostVirt::Pvm { Flavour::Pvm } else { Flavour::Standard };
            if info.flavour != host_flavour {
                eprintln!(
                    "capsule: warning: this image's kernel is the {} flavour, and this host needs {} \
                     (`capsule doctor` says why); build or export one of that flavour",
                    info.flavour, host_flavour
                );
            }
            print_human(&mut stdout, &info).map_err(ImageError::Stdout)
        }
        ImageCommand::Info(args) => {
            let info = current_image_in(&Cache::locate(args.cache_dir.as_deref())?)?;
            if args.json {
                let json = serde_json::to_string_pretty(&info).map_err(|e| ImageError::Stdout(e.into()))?;
                writeln!(stdout, "{json}").map_err(ImageError::Stdout)
            } else {
                print_human(&mut stdout, &info).map_err(ImageError::Stdout)
            }
        }
    }
}

fn print_human(out: &mut impl Write, info: &ImageInfo) -> std::io::Result<()> {
    writeln!(out, "version  {}", info.version)?;
    writeln!(out, "flavour  {}", info.flavour)?;
    writeln!(out, "kernel   {} (make vmlinux took {:.0} s)", info.kernel.display(), info.kernel_build_s)?;
    writeln!(out, "rootfs   {} ({} MiB)", info.rootfs.display(), info.rootfs_bytes >> 20)?;
    writeln!(out, "cmdline  {}", info.cmdline)
}

/// The current image, without building anything.
pub fn current_image() -> Result<ImageInfo, ImageError> {
    current_image_in(&Cache::locate(None)?)
}

fn current_image_in(cache: &Cache) -> Result<ImageInfo, ImageError> {
    let manifest = cache.current_manifest();
    let info: ImageInfo = read_json(&manifest)?.ok_or(ImageError::NotBuilt { manifest })?;
    for file in [&info.kernel, &info.rootfs] {
        if !file.is_file() {
            return Err(ImageError::Incomplete { missing: file.clone() });
        }
    }
    Ok(info)
}

/// The current image, building it first when there is none (what `capsule serve` calls on first use).
pub fn ensure_image(opts: &BuildOptions, progress: &dyn Progress) -> Result<ImageInfo, ImageError> {
    match current_image_in(&Cache::locate(opts.cache_dir.as_deref())?) {
        Err(ImageError::NotBuilt { .. } | ImageError::Incomplete { .. }) => build(opts, progress),
        other => other,
    }
}

/// Creates a sandbox's writable disk (`/dev/vdb`): a sparse ext4 file of `size_mib` MiB.
pub fn create_writable_disk(path: &Path, size_mib: u64) -> Result<(), ImageError> {
    Ok(rootfs::create_writable_disk(path, size_mib)?)
}

/// Builds (or finds in the cache) every part of the image and makes it current.
pub fn build(opts: &BuildOptions, progress: &dyn Progress) -> Result<ImageInfo, ImageError> {
    let started = Instant::now();
    let cache = Cache::locate(opts.cache_dir.as_deref())?;
    cache.create_dirs()?;
    let lock = cache.lock(progress)?;
    cache.clear_tmp(&lock)?;

    let spec = kernel_spec(opts.flavour, requested_patches(opts), host::detect_virt(), progress)?;
    let agent = agent::locate(opts.agent.as_deref(), &cache, progress)?;
    let mirror = opts.mirror.clone().unwrap_or_else(|| host::debian_mirror(rootfs::DEBIAN_SUITE));

    // The kernel is CPU-bound and debootstrap mostly waits on the network: overlap them.
    let (kernel, rootfs) = std::thread::scope(|scope| {
        let kernel = scope.spawn(|| {
            kernel::ensure(&cache, &spec, progress).inspect_err(|e| {
                progress.line(&format!("kernel: FAILED: {e}"));
            })
        });
        let rootfs = rootfs::ensure_base(&cache, &mirror, progress)
            .and_then(|base| rootfs::ensure_packed(&cache, &base, &agent, progress))
            .inspect_err(|e| {
                progress.line(&format!("rootfs: FAILED (waiting for the kernel step to end): {e}"));
            });
        (kernel.join(), rootfs)
    });
    let kernel = kernel.map_err(|_| ImageError::Panicked { step: "kernel" })??;
    let rootfs = rootfs?;

    let cmdline = kernel_cmdline(spec.flavour);
    let version = KeyHasher::new(IMAGE_VERSION_DOMAIN)
        .field(kernel.key.as_bytes())
        .field(rootfs.key.as_bytes())
        .field(cmdline.as_bytes())
        .finish();
    let info = ImageInfo {
        kernel: kernel.vmlinux,
        rootfs: rootfs.image,
        cmdline,
        flavour: spec.flavour,
        version,
        kernel_build_s: kernel.build_s,
        rootfs_bytes: rootfs.bytes,
    };
    write_json(&cache.current_manifest(), &info)?;
    for old in cache.prune_rootfs_images(&lock, &info.rootfs, ROOTFS_IMAGES_KEPT)? {
        progress.line(&format!("pruned old rootfs image {}", old.display()));
    }
    progress.line(&format!(
        "image {} ({}) ready in {}",
        info.version,
        info.flavour,
        format_duration(started.elapsed())
    ));
    Ok(info)
}

/// The kernel patches: the options' list, else `$CAPSULE_KERNEL_PATCHES`.
fn requested_patches(opts: &BuildOptions) -> Vec<PathBuf> {
    if !opts.kernel_patches.is_empty() {
        return opts.kernel_patches.clone();
    }
    std::env::var(KERNEL_PATCHES_ENV)
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Picks the flavour and its patches from the request and the host.
fn kernel_spec(
    requested: Option<Flavour>,
    patches: Vec<PathBuf>,
    virt: HostVirt,
    progress: &dyn Progress,
) -> Result<kernel::KernelSpec, ImageError> {
    let flavour = match (requested, virt) {
        (Some(flavour), _) => flavour,
        (None, HostVirt::Pvm) if patches.is_empty() => {
            progress.line(&format!(
                "WARNING: this host's KVM is PVM (kvm_pvm) and no PVM guest patch was given, so the \
                 standard kernel is built; here it runs only through KVM's instruction emulator, far \
                 too slow to use. Pass `{PVM_PATCH_HINT}` (or set {KERNEL_PATCHES_ENV}) to build the pvm flavour."
            ));
            Flavour::Standard
        }
        (None, HostVirt::Pvm) => Flavour::Pvm,
        (None, HostVirt::Hardware) => Flavour::Standard,
        (None, HostVirt::None) => {
            progress.line(
                "WARNING: this host has neither PVM nor VT-x/AMD-V; building the standard kernel, \
                 which needs a host with hardware virtualization to run at speed",
            );
            Flavour::Standard
        }
    };
    match flavour {
        Flavour::Pvm if patches.is_empty() => return Err(ImageError::PvmWithoutPatch),
        Flavour::Pvm if virt == HostVirt::Hardware => progress
            .line("WARNING: the pvm kernel on a VT-x/AMD-V host stops when SMEP is on; use --flavour standard there"),
        Flavour::Standard if !patches.is_empty() => progress
            .line("WARNING: kernel patches are only applied to the pvm flavour; ignoring them for the standard kernel"),
        _ => {}
    }
    let patches = if flavour == Flavour::Pvm { patches } else { Vec::new() };
    Ok(kernel::KernelSpec { flavour, patches })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Collects progress lines.
    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl Progress for Lines {
        fn line(&self, text: &str) {
            self.0.lock().unwrap().push(text.to_owned());
        }
    }

    fn paths(patches: &[&str]) -> Vec<PathBuf> {
        patches.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn pvm_host_without_patch_warns_with_the_exact_flag_and_builds_standard() {
        let lines = Lines::default();
        let spec = kernel_spec(None, paths(&[]), HostVirt::Pvm, &lines).unwrap();
        assert_eq!(spec.flavour, Flavour::Standard);
        let lines = lines.0.into_inner().unwrap();
        assert!(lines[0].starts_with("WARNING"), "{lines:?}");
        assert!(lines[0].contains(PVM_PATCH_HINT), "{lines:?}");
    }

    #[test]
    fn pvm_host_with_patch_builds_pvm_and_hardware_host_builds_standard() {
        let lines = Lines::default();
        let spec = kernel_spec(None, paths(&["/p.patch"]), HostVirt::Pvm, &lines).unwrap();
        assert_eq!(spec.flavour, Flavour::Pvm);
        assert_eq!(spec.patches, vec![PathBuf::from("/p.patch")]);
        let spec = kernel_spec(None, paths(&[]), HostVirt::Hardware, &lines).unwrap();
        assert_eq!(spec.flavour, Flavour::Standard);
        assert!(lines.0.lock().unwrap().is_empty());
    }

    #[test]
    fn explicit_pvm_without_patch_is_an_error_naming_the_flag() {
        let err = kernel_spec(Some(Flavour::Pvm), paths(&[]), HostVirt::Pvm, &SilentProgress).unwrap_err();
        assert!(err.to_string().contains(PVM_PATCH_HINT), "{err}");
    }

    #[test]
    fn info_without_a_build_says_how_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::locate(Some(dir.path())).unwrap();
        let err = current_image_in(&cache).unwrap_err();
        assert!(err.to_string().starts_with("no image built yet; run `capsule image build`"), "{err}");
    }

    #[test]
    fn manifest_json_has_the_contract_fields() {
        let info = ImageInfo {
            kernel: "/k".into(),
            rootfs: "/r".into(),
            cmdline: KERNEL_CMDLINE.into(),
            flavour: Flavour::Pvm,
            version: "abc".into(),
            kernel_build_s: 1.5,
            rootfs_bytes: 7,
        };
        let value = serde_json::to_value(&info).unwrap();
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["cmdline", "flavour", "kernel", "kernel_build_s", "rootfs", "rootfs_bytes", "version"]);
        assert_eq!(value["flavour"], "pvm");
        for flavour in [Flavour::Standard, Flavour::Pvm] {
            let cmdline = kernel_cmdline(flavour);
            assert!(cmdline.contains("clocksource=kvm-clock"), "{cmdline}");
            assert!(cmdline.contains("init=/usr/local/sbin/capsule-agent"), "{cmdline}");
        }
        assert!(kernel_cmdline(Flavour::Pvm).ends_with(" nopcid noinvpcid"));
        assert!(!kernel_cmdline(Flavour::Standard).contains("nopcid"));
    }

    #[test]
    fn incomplete_image_is_reported_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::locate(Some(dir.path())).unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let info = ImageInfo {
            kernel,
            rootfs: dir.path().join("gone.ext4"),
            cmdline: KERNEL_CMDLINE.into(),
            flavour: Flavour::Standard,
            version: "v".into(),
            kernel_build_s: 0.0,
            rootfs_bytes: 0,
        };
        write_json(&cache.current_manifest(), &info).unwrap();
        assert!(matches!(
            current_image_in(&cache),
            Err(ImageError::Incomplete { missing }) if missing.ends_with("gone.ext4")
        ));
    }
}
