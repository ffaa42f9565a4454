//! What a VM is made of ([`VmConfig`]) and its validation. Validation names the field and the
//! limit; it never touches KVM or the files' contents (only that they exist).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{MAX_DEVICE_GSI, MMIO_DEVICES_FIRST_GSI};
use crate::arch::x86_64::mptable::MPTABLE_MAX_CPUS;
use crate::net::stack::GATEWAY_MAC;

/// Fewest vCPUs.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs (what the MP table can describe).
pub const MAX_VCPUS: u8 = MPTABLE_MAX_CPUS;
/// Smallest guest, in MiB.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest, in MiB (64 GiB).
pub const MAX_MEM_MIB: u64 = 64 << 10;
/// Longest kernel command line, in bytes (the kernel's COMMAND_LINE_SIZE is 2048 on x86).
pub const MAX_CMDLINE_BYTES: usize = 2048;
/// Most virtio devices (disks + vsock + net + rng) the IRQ range can serve.
pub const MAX_VIRTIO_DEVICES: usize = (MAX_DEVICE_GSI - MMIO_DEVICES_FIRST_GSI + 1) as usize;
/// Lowest guest CID (0-2 are reserved by vsock).
pub const MIN_GUEST_CID: u32 = 3;
/// Longest Unix socket path, in bytes (`sockaddr_un.sun_path` minus the NUL). The one
/// definition: the vsock config, the muxer's guest-initiated connects and the server use it.
pub const MAX_UDS_PATH_BYTES: usize = 107;

/// One virtio-blk disk. The first disk is `/dev/vda`, the next `/dev/vdb`, and so on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Keep an undo log of the guest's writes beside a writable disk
    /// ([`crate::devices::virtio::block::undo::undo_log_path`]): a new epoch begins at each
    /// boot, restore and snapshot, so the disk can be taken back to the newest one.
    #[serde(default)]
    pub undo_log: bool,
}

impl DiskConfig {
    /// Where this disk's undo log is kept, when it keeps one (only writable disks do).
    pub fn undo_log_path(&self) -> Option<PathBuf> {
        (self.undo_log && !self.read_only).then(|| crate::devices::virtio::block::undo::undo_log_path(&self.path))
    }
}

/// The virtio-vsock device, backed by host Unix sockets (Firecracker's hybrid vsock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// The virtio-net device, carried by the sandbox's user-space network stack
/// ([`crate::net::stack`]), which reaches the daemon through the broker socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceConfig {
    /// The guest interface's MAC: unicast, not all zeros, not the gateway's.
    pub mac: [u8; 6],
    /// Where the worker listens for the daemon (`SOCK_SEQPACKET`, mode 0600; a stale socket is
    /// replaced). Each worker binds its own, a restored one too.
    pub broker_socket: PathBuf,
}

/// A VM to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// An uncompressed 64-bit ELF `vmlinux` (or any ELF64 payload entered like one).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub vsock: Option<VsockConfig>,
    /// Where the serial console goes (bounded); `None` keeps only the in-memory tail.
    pub serial_log: Option<PathBuf>,
    /// Adds a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Adds a virtio-net device (between vsock and rng in device order).
    #[serde(default)]
    pub net: Option<NetDeviceConfig>,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel: 1 vCPU, 256 MiB, no devices.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            kernel: kernel.into(),
            initrd: None,
            cmdline: cmdline.into(),
            disks: Vec::new(),
            vsock: None,
            serial_log: None,
            rng: false,
            net: None,
        }
    }

    /// Virtio devices this config asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some()) + usize::from(self.rng)
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus { got: self.vcpus });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemMib { got: self.mem_mib });
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES {
            return Err(ConfigError::CmdlineTooLong { got: self.cmdline.len() });
        }
        if self.cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(ConfigError::CmdlineNotAscii);
        }
        require_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            require_file("initrd", initrd)?;
        }
        for (i, disk) in self.disks.iter().enumerate() {
            require_file(if i == 0 { "disks[0].path" } else { "disks[].path" }, &disk.path)
                .map_err(|_| ConfigError::MissingDisk { index: i, path: disk.path.clone() })?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < MIN_GUEST_CID {
                return Err(ConfigError::GuestCid { got: vsock.guest_cid });
            }
            let len = vsock.uds_path.as_os_str().len();
            if len == 0 || len > MAX_UDS_PATH_BYTES {
                return Err(ConfigError::UdsPath { got: len });
            }
        }
        if let Some(net) = &self.net {
            if net.mac == [0; 6] || net.mac[0] & 1 != 0 || net.mac == GATEWAY_MAC {
                return Err(ConfigError::NetMac { mac: net.mac });
            }
            let len = net.broker_socket.as_os_str().len();
            if len == 0 || len > MAX_UDS_PATH_BYTES {
                return Err(ConfigError::BrokerSocketPath { got: len });
            }
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices { got: self.virtio_device_count() });
        }
        Ok(())
    }
}

fn require_file(field: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::MissingFile { field, path: path.to_path_buf() })
    }
}

/// Why a [`VmConfig`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be {MIN_VCPUS}..={MAX_VCPUS}, got {got}")]
    Vcpus { got: u8 },
    #[error("mem_mib must be {MIN_MEM_MIB}..={MAX_MEM_MIB}, got {got}")]
    MemMib { got: u64 },
    #[error("cmdline must be at most {MAX_CMDLINE_BYTES} bytes, got {got}")]
    CmdlineTooLong { got: usize },
    #[error("cmdline must be printable ASCII without NUL bytes")]
    CmdlineNotAscii,
    #[error("{field}: {path} is not a readable file")]
    MissingFile { field: &'static str, path: PathBuf },
    #[error("disks[{index}].path: {path} is not a readable file")]
    MissingDisk { index: usize, path: PathBuf },
    #[error("vsock.guest_cid must be at least {MIN_GUEST_CID}, got {got}")]
    GuestCid { got: u32 },
    #[error("vsock.uds_path must be 1..={MAX_UDS_PATH_BYTES} bytes, got {got}")]
    UdsPath { got: usize },
    #[error("net.mac {mac:02x?} must be a unicast address other than all zeros and the gateway's")]
    NetMac { mac: [u8; 6] },
    #[error("net.broker_socket must be 1..={MAX_UDS_PATH_BYTES} bytes, got {got}")]
    BrokerSocketPath { got: usize },
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices (disks + vsock + net + rng), got {got}")]
    TooManyDevices { got: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uds_limit_is_sun_path_minus_its_nul() {
        // SAFETY: sockaddr_un is plain old data; all-zero bytes are a valid value.
        let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        assert_eq!(MAX_UDS_PATH_BYTES + 1, addr.sun_path.len());
    }

    fn valid() -> (tempfile::NamedTempFile, VmConfig) {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let config = VmConfig::new(kernel.path(), "console=ttyS0");
        (kernel, config)
    }

    #[test]
    fn errors_name_the_field_and_limit() {
        let (_k, mut c) = valid();
        c.validate().unwrap();
        c.vcpus = 0;
        assert_eq!(c.validate().unwrap_err().to_string(), "vcpus must be 1..=32, got 0");
        c.vcpus = 33;
        assert!(c.validate().is_err());
        c.vcpus = 2;
        c.mem_mib = 63;
        assert_eq!(c.validate().unwrap_err().to_string(), "mem_mib must be 64..=65536, got 63");
        c.mem_mib = 128;
        c.cmdline = "x".repeat(MAX_CMDLINE_BYTES + 1);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong { .. })));
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineNotAscii));
        c.cmdline.clear();
        c.vsock = Some(VsockConfig { guest_cid: 2, uds_path: "/tmp/v.sock".into() });
        assert_eq!(c.validate(), Err(ConfigError::GuestCid { got: 2 }));
        c.vsock = None;
        c.net = Some(NetDeviceConfig { mac: [0x03, 0, 0, 0, 0, 1], broker_socket: "/tmp/n.sock".into() });
        assert!(c.validate().unwrap_err().to_string().starts_with("net.mac"));
        c.net = Some(NetDeviceConfig { mac: GATEWAY_MAC, broker_socket: "/tmp/n.sock".into() });
        assert_eq!(c.validate(), Err(ConfigError::NetMac { mac: GATEWAY_MAC }));
        c.net = Some(NetDeviceConfig { mac: [0x02, 0, 0, 0, 0, 1], broker_socket: PathBuf::new() });
        assert_eq!(c.validate(), Err(ConfigError::BrokerSocketPath { got: 0 }));
        c.net = Some(NetDeviceConfig { mac: [0x02, 0, 0, 0, 0, 1], broker_socket: "/tmp/n.sock".into() });
        c.validate().unwrap();
        assert_eq!(c.virtio_device_count(), 1);
        c.net = None;
        c.disks.push(DiskConfig { path: "/nonexistent/disk".into(), read_only: true, undo_log: false });
        assert!(c.validate().unwrap_err().to_string().starts_with("disks[0].path"));
        c.disks.clear();
        c.kernel = "/nonexistent/vmlinux".into();
        assert!(c.validate().unwrap_err().to_string().starts_with("kernel: /nonexistent"));
    }
}
