//! Snapshots on disk: the format, the files, saving a paused [`MicroVm`] into a directory,
//! loading and checking one (and the chain of layers under it). Building a VM from a loaded
//! snapshot is a recipe of [`crate::builder`] (`build_microvm_from_snapshot`).
//!
//! A snapshot directory holds `state.bin` (the [`MicrovmState`] tree in the versioned,
//! checksummed container of [`format`](mod@format)) and `memory.bin` (guest RAM, file offset = RAM offset,
//! see [`memory_file`]). It is written under `<dir>.partial-<pid>`, every file is fsynced,
//! then the directory is renamed into place and its parent fsynced: a crash leaves either the
//! old state or a `.partial-*` directory, never a `<dir>` that looks whole but is not. A save
//! that fails removes its partial directory, and the next save into the same parent removes
//! partial directories of processes that no longer exist ([`partial_dir`]).
//! `state.bin` is written last, so a partial directory also fails to load on its own.
//!
//! A restore maps `memory.bin` `MAP_PRIVATE` (pages load lazily from the page cache, writes are
//! copy-on-write and stay in the restoring process), so N restores of one snapshot share its
//! pages and diverge independently (fork).
//!
//! Incremental pause. After a snapshot (or a restore) the VM tracks changed pages: KVM dirty
//! logging on every memory slot for guest writes, and the guest-memory dirty bitmaps for device
//! writes. An incremental snapshot writes only those pages into its own `memory.bin`, a sparse
//! *layer* whose other pages are holes, and records its parent (path and state checksum) and
//! the page runs it holds. The cost of an incremental pause is therefore proportional to the
//! pages dirtied, not to guest memory. A restored guest's snapshots also take every page the
//! host's page tables hold privately (written since the restore) that the dirty log never
//! reported, so a missed write cannot be lost; the worker logs a warning if there ever is one.
//! The filesystems here (ext4) cannot reflink, so copying the parent's file (or writing into it, which would corrupt other VMs mapping it) was
//! rejected. Restore maps the chain's full base file once, `MAP_PRIVATE`, then maps each
//! layer's runs over it (`MAP_FIXED | MAP_PRIVATE`, oldest first): still lazy and copy-on-write,
//! with one extra mapping per contiguous dirty run. Chains are capped at [`MAX_CHAIN_DEPTH`],
//! and a parent must not change once a child refers to it (the checksum check catches a
//! replaced parent).
//!
//! What the state tree holds (`NOTES.md` next to this file says why): every vCPU's CPUID, regs,
//! sregs, XSAVE (or FPU), XCRs, MSRs (index list plus the PVM VIF MSR 0x4b564d10 and
//! kvmclock), LAPIC, events, MP state, debug registers and TSC rate, each optional piece only
//! where the host offers it; the PIC pair, IOAPIC, PIT2 and kvm-clock; the UART; every virtio
//! transport with its queues. The vsock device tells the guest its connections were reset when
//! it is restored; its listeners in the guest survive.
//!
//! This module never runs the guest, never builds a VM and never decides when to snapshot.

pub mod format;
mod legacy;
pub mod linked_copy;
pub mod memory_file;
pub mod partial_dir;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::host;
use crate::microvm::{MachineState, MicroVm, MicroVmError};
use crate::vstate::memory::{MemoryLayer, PageRun};
use crate::vstate::vm::VmError;
use format::FormatError;
use memory_file::MemoryFileError;
use partial_dir::{PartialDir, PartialDirError};

/// The state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Most incremental layers over one full snapshot.
pub const MAX_CHAIN_DEPTH: usize = 32;
/// Bytes per MiB.
const BYTES_PER_MIB: u64 = 1 << 20;

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {0} already exists; snapshots are never overwritten")]
    Exists(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state file {path} is not valid")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("saving the VM")]
    Save(#[source] MicroVmError),
    #[error("preparing the snapshot directory")]
    PartialDir(#[source] PartialDirError),
    #[error("an incremental snapshot needs a previous snapshot of this VM (take a full one first)")]
    NoParent,
    #[error("reading the dirty page log")]
    DirtyLog(#[source] VmError),
    #[error("writing memory file {path}")]
    MemoryFile {
        path: PathBuf,
        #[source]
        source: MemoryFileError,
    },
    #[error("snapshot chain at {dir} is {MAX_CHAIN_DEPTH} layers deep, the most allowed (take a full snapshot)")]
    ChainTooDeep { dir: PathBuf },
    #[error("parent snapshot {parent} of {dir} changed since the child was taken (state checksum {actual:#010x}, expected {expected:#010x})")]
    ParentChanged { dir: PathBuf, parent: PathBuf, expected: u32, actual: u32 },
    #[error("snapshot {dir} does not match its configuration: {what}")]
    Mismatch { dir: PathBuf, what: String },
    #[error("memory file {path} is {actual} bytes, the snapshot says {expected}")]
    MemorySize { path: PathBuf, expected: u64, actual: u64 },
    #[error("snapshot was taken on a {saved} host but this host is {here}")]
    HostKind { saved: &'static str, here: &'static str },
    #[error("restore overrides name {given} disks but the snapshot has {saved}")]
    DiskCount { given: usize, saved: usize },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { what, path: path.to_path_buf(), source }
}

/// How `memory.bin` relates to other snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryState {
    /// The whole of guest RAM (zero pages as holes).
    Full,
    /// Only `runs` (file offset, bytes) are valid; the rest comes from `parent`.
    Layer { parent: PathBuf, parent_crc: u32, runs: Vec<PageRun> },
}

/// The state tree of one snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// What the VM was built from (disk paths and sizes, vsock, memory size).
    pub config: VmConfig,
    /// Guest RAM in bytes (= the memory file's length).
    pub mem_bytes: u64,
    /// Whether the VM ran on a PVM host (its state only restores on one).
    pub pvm_host: bool,
    pub memory: MemoryState,
    pub machine: MachineState,
}

/// A snapshot a later incremental one builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub dir: PathBuf,
    pub crc: u32,
    /// Layers between this snapshot and its full base (0 for a full snapshot).
    pub depth: usize,
}

/// What writing a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub incremental: bool,
    /// Guest pages written to `memory.bin`.
    pub pages_written: u64,
    /// Bytes of `state.bin`.
    pub state_bytes: u64,
    /// From the start of saving to the rename, in microseconds.
    pub duration_us: u64,
}

/// What a restore may change: each fork needs its own sockets, console and writable disks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOverrides {
    /// The vsock device's host Unix socket path.
    pub vsock_uds: Option<PathBuf>,
    /// Where the serial console goes.
    pub serial_log: Option<PathBuf>,
    /// Where the net device's worker listens for the daemon (ignored when the snapshot has no
    /// net device). The MAC is never overridden: the guest read it at boot.
    #[serde(default)]
    pub net_socket: Option<PathBuf>,
    /// Replacement disk images, in disk order (empty: keep the saved paths). Each must have
    /// the saved disk's size.
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Whether the writable disks keep undo logs (`None`: as saved).
    #[serde(default)]
    pub undo_logs: Option<bool>,
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err("fsyncing directory", path))
}

/// Creates the state file `path` (which must not exist) with `bytes`, fsynced.
fn write_state_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("creating state file", path))?;
    std::io::Write::write_all(&mut f, bytes).map_err(io_err("writing state file", path))?;
    f.sync_all().map_err(io_err("fsyncing state file", path))
}

/// Adds to `pages` (bitmaps per region) every page the host's page tables say a restored VM
/// wrote since its restore but the dirty log never reported, so that a snapshot does not
/// depend on dirty logging having seen every write (pages it did report are in `pages` or in an
/// earlier snapshot since the restore). Logged pages are not added again: a layer of a parent
/// that keeps running and forking holds what changed since its previous snapshot, not all it
/// wrote since its restore.
fn add_unlogged_writes(vm: &MicroVm, pages: &mut [Vec<u64>]) -> Result<(), MemoryFileError> {
    let written = memory_file::privately_written_pages(vm.memory())?;
    let logged = vm.logged_since_restore();
    let mut unlogged_pages = 0;
    for (index, (region, extra)) in pages.iter_mut().zip(&written).enumerate() {
        let logged = logged.get(index).map(Vec::as_slice).unwrap_or(&[]);
        for (i, (word, more)) in region.iter_mut().zip(extra).enumerate() {
            let unlogged = more & !logged.get(i).copied().unwrap_or(0);
            unlogged_pages += (unlogged & !*word).count_ones();
            *word |= unlogged;
        }
    }
    if unlogged_pages > 0 {
        tracing::warn!(
            unlogged_pages,
            "pages written since the restore that the dirty log never reported; saved anyway"
        );
    }
    Ok(())
}

/// Saves `vm` (paused, or built and not started) to the new directory `dir`. With `parent`,
/// only pages changed since that snapshot are written (an incremental layer). On success dirty
/// tracking restarts, and the returned [`SnapshotRef`] is what the next incremental builds on.
pub fn save_snapshot(
    vm: &mut MicroVm,
    dir: &Path,
    parent: Option<&SnapshotRef>,
) -> Result<(SnapshotInfo, SnapshotRef), SnapshotError> {
    let started = Instant::now();
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    if parent.is_some() && !vm.dirty_tracking() {
        return Err(SnapshotError::NoParent);
    }
    if let Some(parent) = parent.filter(|p| p.depth >= MAX_CHAIN_DEPTH) {
        return Err(SnapshotError::ChainTooDeep { dir: parent.dir.clone() });
    }
    let machine = vm.save_state().map_err(SnapshotError::Save)?;

    // Removed again on every error path below (the guard's drop).
    let partial = PartialDir::create(dir).map_err(SnapshotError::PartialDir)?;
    let tmp = partial.path().to_path_buf();

    let mem_path = tmp.join(MEMORY_FILE);
    let mem_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&mem_path)
        .map_err(io_err("creating memory file", &mem_path))?;
    let mem_err = |source| SnapshotError::MemoryFile { path: mem_path.clone(), source };
    let (written, memory) = match parent {
        Some(parent) => {
            let mut dirty = vm.take_dirty_pages().map_err(SnapshotError::DirtyLog)?;
            if vm.restored_backing().is_some() {
                add_unlogged_writes(vm, &mut dirty).map_err(mem_err)?;
            }
            let written = memory_file::write_layer(vm.memory(), &dirty, &mem_file).map_err(mem_err)?;
            let memory =
                MemoryState::Layer { parent: parent.dir.clone(), parent_crc: parent.crc, runs: written.runs.clone() };
            (written, memory)
        }
        None => {
            let written = match vm.restored_backing() {
                Some((base, runs)) => {
                    let base_pages = memory_file::snapshot_data_pages(vm.memory(), base, runs).map_err(mem_err)?;
                    let mut candidates =
                        vm.restored_nonzero_candidates(&base_pages).map_err(SnapshotError::DirtyLog)?;
                    add_unlogged_writes(vm, &mut candidates).map_err(mem_err)?;
                    memory_file::write_full_from_candidates(vm.memory(), &candidates, &mem_file)
                }
                None => memory_file::write_full(vm.memory(), vm.memory_backing_file(), &mem_file),
            }
            .map_err(mem_err)?;
            // The VM is still paused: what changes from here on belongs to the next layer.
            vm.reset_dirty_tracking().map_err(SnapshotError::DirtyLog)?;
            (written, MemoryState::Full)
        }
    };
    mem_file.sync_all().map_err(io_err("fsyncing memory file", &mem_path))?;

    let mem_bytes = crate::vstate::memory::ram_bytes(vm.memory());
    let state = MicrovmState { config: vm.config().clone(), mem_bytes, pvm_host: host::is_pvm(), memory, machine };
    let (bytes, crc) =
        format::encode(&state).map_err(|source| SnapshotError::Format { path: tmp.join(STATE_FILE), source })?;
    write_state_file(&tmp.join(STATE_FILE), &bytes)?;
    sync_dir(&tmp)?;
    partial.commit(dir).map_err(SnapshotError::PartialDir)?;
    let dir = std::fs::canonicalize(dir).map_err(io_err("resolving snapshot directory", dir))?;
    if let Some(parent_dir) = dir.parent() {
        sync_dir(parent_dir)?;
    }
    let info = SnapshotInfo {
        dir: dir.clone(),
        incremental: parent.is_some(),
        pages_written: written.pages,
        state_bytes: bytes.len() as u64,
        duration_us: started.elapsed().as_micros() as u64,
    };
    let depth = parent.map_or(0, |p| p.depth + 1);
    Ok((info, SnapshotRef { dir, crc, depth }))
}

/// A snapshot read and checked, with its memory files open.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub crc: u32,
    pub state: MicrovmState,
    /// The chain's full memory file.
    pub base: File,
    /// Layers over `base`, oldest first.
    pub layers: Vec<MemoryLayer>,
}

fn read_state(dir: &Path) -> Result<(MicrovmState, u32), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let file = File::open(&path).map_err(io_err("opening snapshot state file", &path))?;
    let mut bytes = Vec::new();
    file.take(format::MAX_PAYLOAD_BYTES + format::HEADER_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading snapshot state file", &path))?;
    format::decode_or_upgrade::<MicrovmState, legacy::MicrovmStateV2>(&bytes)
        .map_err(|source| SnapshotError::Format { path, source })
}

fn open_memory(dir: &Path, mem_bytes: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io_err("opening snapshot memory file", &path))?;
    let actual = file.metadata().map_err(io_err("reading the size of", &path))?.len();
    if actual != mem_bytes {
        return Err(SnapshotError::MemorySize { path, expected: mem_bytes, actual });
    }
    Ok(file)
}

fn mismatch(dir: &Path, what: String) -> SnapshotError {
    SnapshotError::Mismatch { dir: dir.to_path_buf(), what }
}

fn host_name(pvm: bool) -> &'static str {
    if pvm {
        "PVM"
    } else {
        "hardware-KVM"
    }
}

/// Reads and checks the snapshot at `dir` and the chain under it; opens its memory files.
pub fn load_snapshot(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let (state, crc) = read_state(dir)?;
    let mem_bytes = state.mem_bytes;
    let here = host::is_pvm();
    if state.pvm_host != here {
        return Err(SnapshotError::HostKind { saved: host_name(state.pvm_host), here: host_name(here) });
    }
    if state.config.mem_mib.checked_mul(BYTES_PER_MIB) != Some(mem_bytes) {
        return Err(mismatch(
            dir,
            format!("memory is {mem_bytes} bytes but the config says {} MiB", state.config.mem_mib),
        ));
    }
    let vcpus = &state.machine.vcpus;
    if vcpus.len() != usize::from(state.config.vcpus)
        || vcpus.iter().enumerate().any(|(i, v)| usize::from(v.index) != i)
    {
        return Err(mismatch(
            dir,
            format!("{} saved vCPUs for a {}-vCPU config (or out of order)", vcpus.len(), state.config.vcpus),
        ));
    }

    let below = read_chain_below(dir, &state)?;
    if let Some((parent, parent_state)) = below.iter().find(|(_, s)| s.mem_bytes != mem_bytes) {
        return Err(mismatch(
            parent,
            format!("parent has {} bytes of memory, child {mem_bytes}", parent_state.mem_bytes),
        ));
    }
    // The chain's memory files, full base first: the snapshots below, then this one (every one
    // after the base is a layer).
    let mut chain =
        below.into_iter().map(|(d, s)| (d, s.memory)).chain(std::iter::once((dir.to_path_buf(), state.memory.clone())));
    let (base_dir, _) = chain.next().expect("a chain has at least its top");
    let base = open_memory(&base_dir, mem_bytes)?;
    let mut layers = Vec::new();
    for (layer_dir, memory) in chain {
        if let MemoryState::Layer { runs, .. } = memory {
            let file = open_memory(&layer_dir, mem_bytes)?;
            layers.push(MemoryLayer { path: layer_dir.join(MEMORY_FILE), file, runs });
        }
    }
    Ok(LoadedSnapshot { dir: dir.to_path_buf(), crc, state, base, layers })
}

/// The snapshots below `top` (whose state is `top_state`), full base first, each parent's
/// checksum checked against what its child recorded. Empty when `top` is full.
fn read_chain_below(top: &Path, top_state: &MicrovmState) -> Result<Vec<(PathBuf, MicrovmState)>, SnapshotError> {
    let mut below: Vec<(PathBuf, MicrovmState)> = Vec::new();
    let mut child = (top.to_path_buf(), top_state.memory.clone());
    while let (child_dir, MemoryState::Layer { parent, parent_crc, .. }) = child {
        if below.len() >= MAX_CHAIN_DEPTH {
            return Err(SnapshotError::ChainTooDeep { dir: top.to_path_buf() });
        }
        let (parent_state, actual) = read_state(&parent)?;
        if actual != parent_crc {
            return Err(SnapshotError::ParentChanged { dir: child_dir, parent, expected: parent_crc, actual });
        }
        child = (parent.clone(), parent_state.memory.clone());
        below.push((parent, parent_state));
    }
    below.reverse();
    Ok(below)
}

impl RestoreOverrides {
    /// The `saved` config with these overrides applied.
    pub fn apply(&self, saved: &VmConfig) -> Result<VmConfig, SnapshotError> {
        let mut config = saved.clone();
        if let (Some(vsock), Some(path)) = (config.vsock.as_mut(), &self.vsock_uds) {
            vsock.uds_path = path.clone();
        }
        if let (Some(net), Some(path)) = (config.net.as_mut(), &self.net_socket) {
            net.broker_socket = path.clone();
        }
        if self.serial_log.is_some() {
            config.serial_log = self.serial_log.clone();
        }
        if !self.disks.is_empty() {
            if self.disks.len() != config.disks.len() {
                return Err(SnapshotError::DiskCount { given: self.disks.len(), saved: config.disks.len() });
            }
            for (disk, path) in config.disks.iter_mut().zip(&self.disks) {
                disk.path = path.clone();
            }
        }
        if let Some(undo_log) = self.undo_logs {
            for disk in config.disks.iter_mut().filter(|d| !d.read_only) {
                disk.undo_log = undo_log;
            }
        }
        Ok(config)
    }
}
