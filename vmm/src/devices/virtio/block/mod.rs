//! virtio-blk (device ID 2) over a host file: IN, OUT, FLUSH and GET_ID
//! requests on one queue, read-only or read-write, sparse files welcome.
//!
//! Owns request parsing ([`parse_request`], also the fuzz entry point) and
//! execution against the backing file. It never trusts the guest: every
//! descriptor is checked, every sector range is bounds-checked against the
//! capacity, and a malformed chain is completed with length 0, never a panic.
//! It advertises seg_max ([`MAX_DATA_SEGMENTS`]) and size_max ([`MAX_SEGMENT_BYTES`]), which
//! Linux honours; a request with a larger data descriptor completes with IOERR, so a request
//! never moves more than [`MAX_REQUEST_DATA_BYTES`] and its used length always fits 32 bits.
//! A disk configured with an undo log ([`undo`]) has the old contents of each block logged
//! before the guest's first write to it in an epoch; a write that cannot be logged is refused
//! (IOERR), never made unlogged.

pub mod undo;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Address, Bytes, GuestMemory};

use super::chain::{total_len, Chain, ChainError, Segment};
use super::device::{read_config_bytes, DeviceMemory, VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1_BIT};
use crate::devices::guest_log::GuestWarnLimiter;
use crate::persist::Persist;
use undo::{UndoError, UndoLog};

/// Device ID (include/uapi/linux/virtio_ids.h).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Bytes per sector, fixed by the virtio spec.
pub const SECTOR_BYTES: u64 = 512;
/// Size of the request header (type, reserved, sector).
pub const REQUEST_HEADER_BYTES: u32 = 16;
/// Most data descriptors per request (advertised as seg_max).
pub const MAX_DATA_SEGMENTS: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Largest data descriptor, in bytes (advertised as size_max; Linux caps each segment at it).
/// A request with a larger data descriptor completes with IOERR.
pub const MAX_SEGMENT_BYTES: u32 = 1 << 20;
/// Largest data length of one request, in bytes: what seg_max segments of size_max bytes hold
/// (254 MiB). Well below 4 GiB, so a used length always fits the ring's 32 bits.
pub const MAX_REQUEST_DATA_BYTES: u64 = MAX_DATA_SEGMENTS as u64 * MAX_SEGMENT_BYTES as u64;
const _: () = assert!(MAX_REQUEST_DATA_BYTES < u32::MAX as u64);
/// Length of the GET_ID answer.
pub const DISK_ID_BYTES: usize = 20;
/// Bounce-buffer size for copying between the file and guest memory.
const COPY_CHUNK_BYTES: usize = 64 * 1024;

/// Why a block device could not be opened.
#[derive(Debug, Error)]
pub enum BlockError {
    /// Opening the backing file failed.
    #[error("opening block backing file {path} failed")]
    Open {
        /// The file.
        path: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the backing file's size failed.
    #[error("reading size of block backing file {path} failed")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The stat error.
        #[source]
        source: std::io::Error,
    },
    /// A restore found a backing file of another size than the saved disk.
    #[error("block backing file {path} holds {actual} bytes but the saved disk held {saved}")]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// The saved disk's size (whole sectors).
        saved: u64,
        /// The file's size (whole sectors).
        actual: u64,
    },
    /// The undo log could not be opened.
    #[error("opening the disk's undo log failed")]
    UndoLog(#[source] UndoError),
}

/// What is wrong with a request's descriptor chain (the request is then
/// completed with used length 0 and no status).
#[derive(Debug, Error)]
pub enum RequestError {
    /// The chain itself is bad (outside memory, too long).
    #[error("bad descriptor chain")]
    Chain(#[source] ChainError),
    /// Fewer than two descriptors: no room for header and status.
    #[error("request chain has {0} descriptors; header and status need at least 2")]
    TooFewDescriptors(usize),
    /// The header descriptor is device-writable.
    #[error("request header descriptor is writable, must be readable")]
    HeaderNotReadable,
    /// The header descriptor is shorter than 16 bytes.
    #[error("request header descriptor has {0} bytes, needs {REQUEST_HEADER_BYTES}")]
    HeaderTooShort(u32),
    /// The status descriptor is read-only.
    #[error("request status descriptor is read-only, must be writable")]
    StatusNotWritable,
    /// The status descriptor has length 0.
    #[error("request status descriptor has length 0, needs 1")]
    StatusEmpty,
    /// A data descriptor points the wrong way for the request type.
    #[error("data descriptor {index} has the wrong direction for request type {request_type}")]
    DataDirection {
        /// Position among the data descriptors.
        index: usize,
        /// The request type.
        request_type: u32,
    },
    /// More data descriptors than seg_max.
    #[error("request has {0} data descriptors, seg_max is {MAX_DATA_SEGMENTS}")]
    TooManySegments(usize),
    /// Reading the header from guest memory failed.
    #[error("reading the request header failed")]
    HeaderRead,
}

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read sectors into guest buffers.
    In,
    /// VIRTIO_BLK_T_OUT: write guest buffers to sectors.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the 20-byte disk ID.
    GetId,
    /// Anything else: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// A parsed, structurally valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub request_type: RequestType,
    /// First sector.
    pub sector: u64,
    /// Data descriptors (direction already checked for IN/OUT/GET_ID).
    pub data: Vec<Segment>,
    /// The 1-byte (at least) writable status descriptor.
    pub status: Segment,
}

/// Parses one request chain: header readable ≥16 bytes, data descriptors in
/// the direction the type needs, final status descriptor writable ≥1 byte.
pub fn parse_request<M: GuestMemory>(mem: &M, chain: &Chain) -> Result<Request, RequestError> {
    let segs = &chain.segments;
    if segs.len() < 2 {
        return Err(RequestError::TooFewDescriptors(segs.len()));
    }
    let header = segs[0];
    let status = segs[segs.len() - 1];
    let data = &segs[1..segs.len() - 1];
    if header.writable {
        return Err(RequestError::HeaderNotReadable);
    }
    if header.len < REQUEST_HEADER_BYTES {
        return Err(RequestError::HeaderTooShort(header.len));
    }
    if !status.writable {
        return Err(RequestError::StatusNotWritable);
    }
    if status.len == 0 {
        return Err(RequestError::StatusEmpty);
    }
    if data.len() > MAX_DATA_SEGMENTS as usize {
        return Err(RequestError::TooManySegments(data.len()));
    }
    let mut raw = [0u8; REQUEST_HEADER_BYTES as usize];
    mem.read_slice(&mut raw, header.addr).map_err(|_| RequestError::HeaderRead)?;
    let type_raw = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
    let request_type = RequestType::from(type_raw);
    let needs_writable = match request_type {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        RequestType::Flush | RequestType::Unsupported(_) => None,
    };
    if let Some(writable) = needs_writable {
        if let Some(index) = data.iter().position(|s| s.writable != writable) {
            return Err(RequestError::DataDirection { index, request_type: type_raw });
        }
    }
    Ok(Request { request_type, sector, data: data.to_vec(), status })
}

/// Serde description of a block device, for configuration and snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Disk ID returned by GET_ID (truncated to 20 bytes).
    pub disk_id: String,
    /// Keep an undo log of the guest's writes here ([`undo`]); only for writable disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_log: Option<PathBuf>,
}

/// A virtio block device over a host file.
pub struct Block<M> {
    config: BlockConfig,
    file: File,
    capacity_sectors: u64,
    config_space: Vec<u8>,
    undo: Option<UndoLog>,
    common: VirtioCommon<M>,
}

impl<M> Block<M> {
    /// Opens the backing file; capacity is its size in whole sectors.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open { path: config.path.clone(), source })?;
        let size = file.metadata().map_err(|source| BlockError::Metadata { path: config.path.clone(), source })?.len();
        let capacity_sectors = size / SECTOR_BYTES;
        let undo = match &config.undo_log {
            Some(path) if !config.read_only => {
                Some(UndoLog::open(path, capacity_sectors * SECTOR_BYTES).map_err(BlockError::UndoLog)?)
            }
            _ => None,
        };
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config_space = Vec::with_capacity(16);
        config_space.extend_from_slice(&capacity_sectors.to_le_bytes());
        config_space.extend_from_slice(&MAX_SEGMENT_BYTES.to_le_bytes());
        config_space.extend_from_slice(&MAX_DATA_SEGMENTS.to_le_bytes());
        let mut features = VIRTIO_F_VERSION_1_BIT
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let common = VirtioCommon::new(VIRTIO_ID_BLOCK, features, &[BLOCK_QUEUE_SIZE]);
        Ok(Self { config, file, capacity_sectors, config_space, undo, common })
    }

    /// Starts a new undo epoch tagged `tag` (see [`undo`]): the disk is now at the state of
    /// that moment. Call only while the device serves no requests (before the VM starts, or with
    /// the device-event thread parked). Nothing to do without an undo log.
    pub fn begin_undo_epoch(&mut self, tag: &str) -> Result<(), UndoError> {
        self.undo.as_mut().map_or(Ok(()), |log| log.begin(tag))
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The device's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.config.path
    }
}

/// What a snapshot keeps of a block device: what the guest saw of it. The backing file is
/// handed in on restore (a fork gets its own copy) and must have the saved size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Disk size in bytes (whole sectors).
    pub bytes: u64,
    /// Whether the guest was told the disk is read-only.
    pub read_only: bool,
    /// The GET_ID answer.
    pub disk_id: String,
}

/// The host files a restored block device works on (a fork has its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockBacking {
    /// The backing file; it must have the saved size.
    pub path: PathBuf,
    /// Where to keep its undo log, if anywhere.
    pub undo_log: Option<PathBuf>,
}

impl<M> Persist for Block<M> {
    type State = BlockState;
    /// The backing file and where to keep its undo log.
    type ConstructorArgs = BlockBacking;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            bytes: self.capacity_sectors * SECTOR_BYTES,
            read_only: self.config.read_only,
            disk_id: self.config.disk_id.clone(),
        }
    }

    fn restore(backing: BlockBacking, state: &BlockState) -> Result<Self, BlockError> {
        let BlockBacking { path, undo_log } = backing;
        let block =
            Self::new(BlockConfig { path, read_only: state.read_only, disk_id: state.disk_id.clone(), undo_log })?;
        let actual = block.capacity_sectors * SECTOR_BYTES;
        if actual != state.bytes {
            return Err(BlockError::SizeChanged { path: block.config.path, saved: state.bytes, actual });
        }
        Ok(block)
    }
}

impl<M: DeviceMemory> Block<M> {
    /// Serves every pending request; returns how many were completed.
    pub fn process_queue(&mut self) -> usize {
        let disk = Disk { file: &self.file, config: &self.config, capacity_sectors: self.capacity_sectors };
        let undo = &mut self.undo;
        self.common.serve_queue(0, "virtio-blk", |mem, desc_chain, warnings| {
            let request =
                Chain::collect(desc_chain).map_err(RequestError::Chain).and_then(|chain| parse_request(mem, &chain));
            Some(match request {
                Ok(req) => {
                    let (status, data_len) = execute(&disk, undo.as_mut(), mem, &req, warnings);
                    match mem.write_obj(status, req.status.addr) {
                        Ok(()) => data_len.saturating_add(1),
                        Err(e) => {
                            crate::guest_warn!(*warnings, error = %e, "virtio-blk: writing status failed");
                            0
                        }
                    }
                }
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "virtio-blk: malformed request rejected");
                    0
                }
            })
        })
    }
}

/// What a request runs against.
struct Disk<'a> {
    file: &'a File,
    config: &'a BlockConfig,
    capacity_sectors: u64,
}

/// Runs `req` (logging what a write overwrites first, with `undo`); returns the status byte and
/// the bytes written to guest data buffers.
fn execute<M: GuestMemory>(
    disk: &Disk<'_>,
    undo: Option<&mut UndoLog>,
    mem: &M,
    req: &Request,
    warnings: &mut GuestWarnLimiter,
) -> (u8, u32) {
    let Disk { file, config, capacity_sectors } = *disk;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    match req.request_type {
        RequestType::In | RequestType::Out => {
            if let Some(seg) = req.data.iter().find(|s| s.len > MAX_SEGMENT_BYTES) {
                crate::guest_warn!(
                    *warnings,
                    segment_bytes = seg.len,
                    max_segment_bytes = MAX_SEGMENT_BYTES,
                    "virtio-blk: data descriptor larger than size_max"
                );
                return (IOERR, 0);
            }
            let len = total_len(&req.data);
            if len > MAX_REQUEST_DATA_BYTES {
                crate::guest_warn!(
                    *warnings,
                    len,
                    max_request_data_bytes = MAX_REQUEST_DATA_BYTES,
                    "virtio-blk: request data longer than the device accepts"
                );
                return (IOERR, 0);
            }
            let in_range = len % SECTOR_BYTES == 0
                && req.sector.checked_add(len / SECTOR_BYTES).is_some_and(|end| end <= capacity_sectors);
            if !in_range {
                crate::guest_warn!(
                    *warnings,
                    sector = req.sector,
                    len,
                    capacity_sectors,
                    "virtio-blk: request beyond capacity or not whole sectors"
                );
                return (IOERR, 0);
            }
            if req.request_type == RequestType::Out && config.read_only {
                crate::guest_warn!(*warnings, sector = req.sector, "virtio-blk: write to read-only disk refused");
                return (IOERR, 0);
            }
            let write = req.request_type == RequestType::Out;
            if let (true, Some(undo)) = (write, undo) {
                if let Err(e) = undo.before_write(file, req.sector * SECTOR_BYTES, len) {
                    tracing::error!(error = %e, sector = req.sector, len, "virtio-blk: cannot log the overwritten blocks; the write is refused");
                    return (IOERR, 0);
                }
            }
            match copy_data(file, mem, &req.data, req.sector * SECTOR_BYTES, write) {
                Ok(()) if write => (OK, 0),
                // At most MAX_REQUEST_DATA_BYTES, checked above.
                Ok(()) => (OK, u32::try_from(len).unwrap_or(u32::MAX)),
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "virtio-blk: I/O failed");
                    (IOERR, 0)
                }
            }
        }
        RequestType::Flush => match file.sync_data() {
            Ok(()) => (OK, 0),
            Err(e) => {
                crate::guest_warn!(*warnings, error = %e, "virtio-blk: flush failed");
                (IOERR, 0)
            }
        },
        RequestType::GetId => {
            let mut id = [0u8; DISK_ID_BYTES];
            let src = config.disk_id.as_bytes();
            let n = src.len().min(DISK_ID_BYTES);
            id[..n].copy_from_slice(&src[..n]);
            match super::chain::write_segments(mem, &req.data, &id) {
                Ok(n) => (OK, n as u32),
                Err(e) => {
                    crate::guest_warn!(*warnings, error = %e, "virtio-blk: writing disk id failed");
                    (IOERR, 0)
                }
            }
        }
        RequestType::Unsupported(t) => {
            crate::guest_warn!(*warnings, request_type = t, "virtio-blk: unsupported request type");
            (VIRTIO_BLK_S_UNSUPP as u8, 0)
        }
    }
}

/// Errors of one data copy.
#[derive(Debug, Error)]
enum CopyError {
    #[error("file I/O at offset {offset} failed")]
    File {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Copies between the file (from `offset`) and the data segments.
fn copy_data<M: GuestMemory>(
    file: &File,
    mem: &M,
    segments: &[Segment],
    mut offset: u64,
    to_file: bool,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    for seg in segments {
        let mut done = 0u64;
        while done < u64::from(seg.len) {
            let n = (u64::from(seg.len) - done).min(COPY_CHUNK_BYTES as u64) as usize;
            let addr = seg
                .addr
                .checked_add(done)
                .ok_or(CopyError::Memory(vm_memory::GuestMemoryError::InvalidGuestAddress(seg.addr)))?;
            let chunk = &mut buf[..n];
            if to_file {
                mem.read_slice(chunk, addr).map_err(CopyError::Memory)?;
                file.write_all_at(chunk, offset).map_err(|source| CopyError::File { offset, source })?;
            } else {
                read_at_zero_fill(file, chunk, offset).map_err(|source| CopyError::File { offset, source })?;
                mem.write_slice(chunk, addr).map_err(CopyError::Memory)?;
            }
            done += n as u64;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; bytes past end of file read as zero
/// (the file may have been truncated under us).
pub(super) fn read_at_zero_fill(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<M: DeviceMemory> VirtioDevice<M> for Block<M> {
    crate::virtio_common_accessors!();

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn queue_notify(&mut self, _queue_index: u32) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{activate, guest_memory, read_bytes, write_bytes, Driver, Mem};
    use crate::persist::test_util::round_trip;

    const DISK_BYTES: u64 = 64 * SECTOR_BYTES;

    fn disk(dir: &tempfile::TempDir, name: &str, bytes: u64) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
        path
    }

    #[test]
    fn a_disk_round_trips_onto_a_copy_and_still_answers_get_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockConfig {
            path: disk(&dir, "a.img", DISK_BYTES),
            read_only: true,
            disk_id: "capsule-vdq".into(),
            undo_log: None,
        };
        let block: Block<Mem> = Block::new(config).unwrap();
        let copy = disk(&dir, "copy.img", DISK_BYTES);
        let mut restored = round_trip(&block, BlockBacking { path: copy.clone(), undo_log: None });
        assert_eq!(restored.path(), copy);
        assert_eq!(restored.avail_features(), block.avail_features(), "still read-only");

        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0);
        let _irq = activate(&mut restored, &mem, vec![driver.queue()]);
        let (hdr, data, status) = (0x10_0000, 0x10_1000, 0x10_2000);
        write_bytes(&mem, hdr, &[VIRTIO_BLK_T_GET_ID as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        driver.add_chain(&[(hdr, REQUEST_HEADER_BYTES, false), (data, DISK_ID_BYTES as u32, true), (status, 1, true)]);
        assert_eq!(restored.process_queue(), 1);
        assert_eq!(driver.used(0).1, DISK_ID_BYTES as u32 + 1);
        assert_eq!(&read_bytes(&mem, data, 11), b"capsule-vdq");
        assert_eq!(read_bytes(&mem, status, 1), [VIRTIO_BLK_S_OK as u8]);
    }

    #[test]
    fn guest_writes_through_an_undo_log_can_be_taken_back_to_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = disk(&dir, "rw.img", DISK_BYTES);
        std::fs::write(&path, vec![0x5a; DISK_BYTES as usize]).unwrap();
        let log = undo::undo_log_path(&path);
        let config =
            BlockConfig { path: path.clone(), read_only: false, disk_id: "d".into(), undo_log: Some(log.clone()) };
        let mut block: Block<Mem> = Block::new(config).unwrap();
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0);
        let _irq = activate(&mut block, &mem, vec![driver.queue()]);
        let (hdr, data, status) = (0x10_0000, 0x10_1000, 0x10_4000);
        let write = |driver: &mut Driver, sector: u8| {
            write_bytes(&mem, hdr, &[VIRTIO_BLK_T_OUT as u8, 0, 0, 0, 0, 0, 0, 0, sector, 0, 0, 0, 0, 0, 0, 0]);
            write_bytes(&mem, data, &[0xee; 1024]);
            driver.add_chain(&[(hdr, REQUEST_HEADER_BYTES, false), (data, 1024, false), (status, 1, true)]);
        };
        // Before an epoch began, nothing may be written (the log could not take it back).
        write(&mut driver, 1);
        assert_eq!(block.process_queue(), 1);
        assert_eq!(read_bytes(&mem, status, 1), [VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; DISK_BYTES as usize]);

        block.begin_undo_epoch("snapshot-1").unwrap();
        write(&mut driver, 1);
        assert_eq!(block.process_queue(), 1);
        write(&mut driver, 9);
        assert_eq!(block.process_queue(), 1);
        assert_eq!(read_bytes(&mem, status, 1), [VIRTIO_BLK_S_OK as u8]);
        assert_ne!(std::fs::read(&path).unwrap(), vec![0x5a; DISK_BYTES as usize]);
        let undone = undo::undo_disk(&path, &log).unwrap().unwrap();
        assert_eq!((undone.tag.as_str(), undone.records), ("snapshot-1", 2), "two 4 KiB blocks were touched");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; DISK_BYTES as usize]);
    }

    #[test]
    fn a_disk_restores_only_onto_a_file_of_the_saved_size() {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockConfig {
            path: disk(&dir, "a.img", DISK_BYTES),
            read_only: false,
            disk_id: "d".into(),
            undo_log: None,
        };
        let state = Block::<Mem>::new(config).unwrap().save();
        let bigger = disk(&dir, "big.img", 2 * DISK_BYTES);
        let err = Block::<Mem>::restore(BlockBacking { path: bigger, undo_log: None }, &state).map(|_| ()).unwrap_err();
        assert!(matches!(err, BlockError::SizeChanged { saved: DISK_BYTES, .. }), "{err}");
    }
}
