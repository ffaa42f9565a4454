//! Payload layouts of [`format::PREVIOUS_FORMAT_VERSION`](super::format::PREVIOUS_FORMAT_VERSION)
//! that this build still reads, and their conversion to today's. Version 2 is version 3 without
//! the net device: its `VmConfig` had no `net` field (postcard is positional, so the old struct
//! is spelled out here), and its device states never hold `DeviceState::Net` (the last variant,
//! so the others kept their tags). It never writes these layouts.

use std::path::PathBuf;

use serde::Deserialize;

use super::{MemoryState, MicrovmState};
use crate::config::{DiskConfig, VmConfig, VsockConfig};
use crate::microvm::MachineState;

/// `VmConfig` as format version 2 saved it.
#[derive(Debug, Deserialize)]
struct VmConfigV2 {
    vcpus: u8,
    mem_mib: u64,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    disks: Vec<DiskConfig>,
    vsock: Option<VsockConfig>,
    serial_log: Option<PathBuf>,
    rng: bool,
}

/// `MicrovmState` as format version 2 saved it.
#[derive(Debug, Deserialize)]
pub(super) struct MicrovmStateV2 {
    config: VmConfigV2,
    mem_bytes: u64,
    pvm_host: bool,
    memory: MemoryState,
    machine: MachineState,
}

impl From<VmConfigV2> for VmConfig {
    fn from(c: VmConfigV2) -> Self {
        VmConfig {
            vcpus: c.vcpus,
            mem_mib: c.mem_mib,
            kernel: c.kernel,
            initrd: c.initrd,
            cmdline: c.cmdline,
            disks: c.disks,
            vsock: c.vsock,
            serial_log: c.serial_log,
            rng: c.rng,
            net: None,
        }
    }
}

impl From<MicrovmStateV2> for MicrovmState {
    fn from(old: MicrovmStateV2) -> Self {
        MicrovmState {
            config: old.config.into(),
            mem_bytes: old.mem_bytes,
            pvm_host: old.pvm_host,
            memory: old.memory,
            machine: old.machine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_2_config_is_todays_without_the_trailing_net_field() {
        let mut config = VmConfig::new("/k", "console=ttyS0");
        config.disks = vec![DiskConfig { path: "/s/rw.ext4".into(), read_only: false, undo_log: false }];
        config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: "/s/v.sock".into() });
        config.rng = true;
        let bytes = postcard::to_stdvec(&config).unwrap();
        // `net: None` is one trailing byte; without it, the bytes are what version 2 wrote.
        assert_eq!(bytes.last(), Some(&0));
        let old: VmConfigV2 = postcard::from_bytes(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(VmConfig::from(old), config);
    }
}
