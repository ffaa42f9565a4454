//! The files of one sandbox, all under its directory, and the VM that boots the image over them.
//!
//! ```text
//! <root>/<sandbox id>/
//!   rw.ext4            the writable disk (/dev/vdb in the guest)
//!   rw.ext4.undo       what the guest overwrote on it since its newest snapshot (see `disk_back`)
//!   rootfs.ext4        a hard link to the image's read-only root filesystem (/dev/vda)
//!   vsock.sock         the host end of the hybrid vsock
//!   net.sock           where the VM's worker takes the daemon's network broker (SOCK_SEQPACKET)
//!   control.sock       where the VM's worker takes a new controller (it outlives the daemon)
//!   vm-ended.json      how the VM ended, left by a worker no controller was there to tell
//!   serial.log         the serial console
//!   snapshot-origin/   a linked copy of the chain the sandbox was made from
//!   snapshot-<N>/      its own snapshots, newest last (see `chain`)
//! ```
//!
//! It owns names and the two copies a sandbox makes of shared files (the root filesystem link and
//! the writable disk copy); it never decides when a file is made or deleted.

use std::path::{Path, PathBuf};
use std::process::Command;

use capsule_vmm::config::MAX_UDS_PATH_BYTES;
use capsule_vmm::net::stack::{GATEWAY_MAC, GUEST_KERNEL_IP_PARAM};
use capsule_vmm::snapshot::STATE_FILE;
use capsule_vmm::worker::ControlSocket;
use capsule_vmm::{DiskConfig, NetDeviceConfig, VmConfig, VsockConfig};

use crate::image::ImageInfo;

/// The guest's vsock CID (each VM has its own vsock device, so all can use the first one).
pub const GUEST_CID: u32 = 3;

/// Errors of a sandbox's files.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A socket path of the sandbox does not fit a `sockaddr_un`.
    #[error("the socket path {path} is longer than {MAX_UDS_PATH_BYTES} bytes; use a shorter --state-dir")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `cp` could not copy a disk.
    #[error("copying {from} to {to} failed: cp ended with {status}")]
    Copy {
        /// The source.
        from: PathBuf,
        /// The destination.
        to: PathBuf,
        /// How `cp` ended.
        status: std::process::ExitStatus,
    },
}

/// The files of one sandbox, all under its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFiles {
    dir: PathBuf,
}

impl SandboxFiles {
    /// The files under `dir` (nothing is created).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The writable ext4 disk (`/dev/vdb` in the guest).
    pub fn writable_disk(&self) -> PathBuf {
        self.dir.join("rw.ext4")
    }

    /// The host end of the hybrid vsock.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Where the VM's worker listens for the daemon's network broker.
    pub fn net_socket(&self) -> PathBuf {
        self.dir.join("net.sock")
    }

    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The snapshot of generation `n` (a pause to disk, or a fork taken of this sandbox).
    pub(super) fn snapshot(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("snapshot-{generation}"))
    }

    /// Where the sandbox's worker listens for a new controller, and leaves word of its VM's end.
    pub(super) fn control(&self) -> ControlSocket {
        ControlSocket { path: self.dir.join("control.sock"), ended: self.dir.join("vm-ended.json") }
    }

    /// The sandbox's own snapshot of `generation`; generation 0 is the copy it was made from
    /// ([`SandboxFiles::origin`]).
    pub(super) fn own_snapshot(&self, generation: u64) -> PathBuf {
        if generation == 0 {
            self.origin()
        } else {
            self.snapshot(generation)
        }
    }

    /// The newest whole snapshot of the sandbox (its generation, 0 for its origin) and when it
    /// was written.
    pub(super) fn newest_snapshot(&self) -> Option<(u64, std::time::SystemTime)> {
        let written = |dir: &Path| std::fs::metadata(dir.join(STATE_FILE)).and_then(|m| m.modified()).ok();
        let newest = std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.strip_prefix("snapshot-")?.parse::<u64>().ok())
            .filter(|generation| *generation > 0)
            .filter_map(|generation| Some((generation, written(&self.snapshot(generation))?)))
            .max_by_key(|(generation, _)| *generation);
        newest.or_else(|| Some((0, written(&self.origin())?)))
    }

    /// Whether `name` (a directory entry of this sandbox) is one of its own snapshots.
    pub(super) fn is_snapshot_name(name: &str) -> bool {
        name.starts_with("snapshot-")
    }

    /// The sandbox's own name for its read-only root filesystem image.
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// The sandbox's own root filesystem, when it adopted one.
    pub(super) fn own_rootfs(&self) -> Option<PathBuf> {
        Some(self.rootfs()).filter(|own| own.is_file())
    }

    /// Gives the sandbox its own name (a hard link) for the read-only root filesystem at
    /// `shared` and returns it, so that the image cache may drop that image while the sandbox
    /// still needs it (a paused sandbox resumes on it, a fork inherits it). Where no link can be
    /// made (another filesystem) the sandbox uses `shared` itself.
    pub(super) fn adopt_rootfs(&self, shared: &Path) -> PathBuf {
        let own = self.rootfs();
        match std::fs::hard_link(shared, &own) {
            Ok(()) => own,
            Err(e) => {
                tracing::debug!(
                    rootfs = %shared.display(),
                    error = %e,
                    "cannot link the root filesystem into the sandbox; using the image cache's copy"
                );
                shared.to_path_buf()
            }
        }
    }

    /// The linked copy of the chain this sandbox was restored from when it was made (the
    /// template's snapshot, or its parent's); its first pause layers over it.
    pub(super) fn origin(&self) -> PathBuf {
        self.dir.join("snapshot-origin")
    }

    /// Creates the directory and checks that its socket paths fit a `sockaddr_un`.
    pub(super) fn create_dir(&self) -> Result<(), LayoutError> {
        for uds in [self.vsock_uds(), self.net_socket(), self.control().path] {
            if uds.as_os_str().len() > MAX_UDS_PATH_BYTES {
                return Err(LayoutError::SocketPathTooLong { path: uds });
            }
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| LayoutError::Io { what: format!("cannot create {}", self.dir.display()), source })
    }
}

/// The guest MAC of sandbox `id`: locally administered and unicast (`02:` then five bytes of a
/// hash of the id), never the gateway's. Each sandbox is alone on its network with the gateway,
/// so the MAC only has to differ from the gateway's; deriving it keeps it stable per sandbox.
/// A VM restored from a snapshot (a template, a parent, its own pause) keeps the MAC it was
/// saved with: the guest read it at boot.
pub fn guest_mac(id: &str) -> [u8; 6] {
    // FNV-1a, 64-bit: stable across builds and hosts (std's hasher is not).
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let b = hash.to_be_bytes();
    let mut mac = [0x02, b[3], b[4], b[5], b[6], b[7]];
    if mac == GATEWAY_MAC {
        mac[5] ^= 1;
    }
    mac
}

/// The VM that boots `image` for a sandbox with `files`: the image's read-only root filesystem
/// as `/dev/vda`, the sandbox's writable disk as `/dev/vdb`, vsock, virtio-net, virtio-rng,
/// serial log. The image's command line gets the guest's static address
/// ([`GUEST_KERNEL_IP_PARAM`]); the VMM appends its device declarations.
///
/// Every VM has the net device, whatever its sandbox's network mode: templates are saved with
/// it, so every sandbox restored from one has the same devices. A sandbox without network
/// simply never gets a broker connected to `net.sock`, and its stack refuses everything (fails
/// closed).
pub fn boot_config(image: &ImageInfo, files: &SandboxFiles, vcpus: u8, mem_mib: u64) -> VmConfig {
    let mut cmdline = image.cmdline.clone();
    if !cmdline.split_whitespace().any(|p| p.starts_with("ip=")) {
        cmdline.push(' ');
        cmdline.push_str(GUEST_KERNEL_IP_PARAM);
    }
    let mut config = VmConfig::new(&image.kernel, cmdline);
    config.vcpus = vcpus;
    config.mem_mib = mem_mib;
    config.disks = vec![
        DiskConfig { path: image.rootfs.clone(), read_only: true, undo_log: false },
        DiskConfig { path: files.writable_disk(), read_only: false, undo_log: false },
    ];
    config.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: files.vsock_uds() });
    config.serial_log = Some(files.serial_log());
    config.rng = true;
    let id = files.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    config.net = Some(NetDeviceConfig { mac: guest_mac(&id), broker_socket: files.net_socket() });
    config
}

/// Copies a disk image sparsely (reflinked where the filesystem can), as a fork's writable disk.
pub fn copy_disk(from: &Path, to: &Path) -> Result<(), LayoutError> {
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(|source| LayoutError::Io { what: "cannot run cp to copy the writable disk".into(), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(LayoutError::Copy { from: from.to_path_buf(), to: to.to_path_buf(), status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_whole_snapshot_is_the_highest_generation_else_the_origin() {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        assert_eq!(files.newest_snapshot(), None);
        let whole = |path: PathBuf| {
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join(STATE_FILE), b"x").unwrap();
        };
        whole(files.origin());
        assert_eq!(files.newest_snapshot().map(|(g, _)| g), Some(0));
        whole(files.snapshot(2));
        whole(files.snapshot(10));
        // A partial one (no state file yet) does not count.
        std::fs::create_dir_all(files.snapshot(11)).unwrap();
        assert_eq!(files.newest_snapshot().map(|(g, _)| g), Some(10));
        assert_eq!(files.own_snapshot(0), files.origin());
        assert_eq!(files.own_snapshot(10), files.snapshot(10));
    }

    #[test]
    fn boot_config_puts_the_rootfs_first_read_only_and_adds_the_network() {
        let image = ImageInfo {
            kernel: "/img/vmlinux".into(),
            rootfs: "/img/root.ext4".into(),
            cmdline: "console=ttyS0 nopcid noinvpcid".into(),
            flavour: crate::image::Flavour::Pvm,
            version: "v".into(),
            kernel_build_s: 0.0,
            rootfs_bytes: 0,
        };
        let files = SandboxFiles::new("/state/sb-1");
        let config = boot_config(&image, &files, 1, 1024);
        assert_eq!(config.cmdline, format!("{} {GUEST_KERNEL_IP_PARAM}", image.cmdline));
        assert_eq!(config.disks[0].path, PathBuf::from("/img/root.ext4"));
        assert!(config.disks[0].read_only);
        assert_eq!(config.disks[1].path, PathBuf::from("/state/sb-1/rw.ext4"));
        assert!(!config.disks[1].read_only);
        let vsock = config.vsock.expect("vsock");
        assert_eq!(vsock.uds_path, PathBuf::from("/state/sb-1/vsock.sock"));
        assert_eq!(vsock.guest_cid, GUEST_CID);
        assert_eq!(config.mem_mib, 1024);
        let net = config.net.expect("net");
        assert_eq!(net.broker_socket, PathBuf::from("/state/sb-1/net.sock"));
        assert_eq!(net.mac, guest_mac("sb-1"));
    }

    #[test]
    fn guest_macs_are_unicast_locally_administered_stable_and_differ_per_sandbox() {
        let (a, b) = (guest_mac("sb-1"), guest_mac("sb-2"));
        assert_ne!(a, b);
        assert_eq!(a, guest_mac("sb-1"));
        for mac in [a, b, guest_mac("")] {
            assert_eq!(mac[0] & 0b11, 0b10, "{mac:02x?}");
            assert_ne!(mac, GATEWAY_MAC);
        }
    }
}
