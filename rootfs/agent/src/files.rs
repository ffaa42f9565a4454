//! File operations of the protocol: write chunks, read ranges, list, stat,
//! mkdir -p, remove, rename.
//!
//! Relative paths resolve against the agent's working directory. Every OS
//! error maps to a precise [`ErrorKind`] through [`crate::oserror`], with the
//! path in the message. Sizes are checked against [`MAX_FILE_CHUNK_BYTES`]
//! before any I/O. It never follows a final symlink when describing a path
//! (`lstat`), never walks into symlinked directories when listing, and never
//! blocks opening a FIFO: reads take regular files only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::oserror::{agent_error, error};
use crate::protocol::{
    AgentError, DirEntry, ErrorKind, FileKind, FileStat, WriteFileRequest, WritePosition, MAX_FILE_CHUNK_BYTES,
};

/// Most entries one `ListDir` returns; deeper or wider trees fail with `TooLarge`.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Deepest `ListDir` recursion allowed.
pub const MAX_LIST_DEPTH: u32 = 64;

/// Mode of files created without an explicit one.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Mode of directories created without an explicit one.
const DEFAULT_DIR_MODE: u32 = 0o755;

/// File operations rooted at a working directory.
#[derive(Debug, Clone)]
pub struct Files {
    work_dir: PathBuf,
}

fn describe(what: &str, path: &Path) -> String {
    format!("{what} {}", path.display())
}

/// Checks a permission-bits argument.
fn check_mode(mode: Option<u32>, default: u32) -> Result<u32, AgentError> {
    match mode {
        None => Ok(default),
        Some(m) if m <= 0o7777 => Ok(m),
        Some(m) => Err(error(ErrorKind::InvalidArgument, format!("mode {m:#o} has bits beyond 0o7777"))),
    }
}

/// Opens `path` for reading without blocking on what it is (a FIFO with no
/// writer would block `open` forever), and refuses anything but a regular
/// file: a directory with `IsADirectory`, any other type with
/// `InvalidArgument` naming it.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), AgentError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| agent_error(&describe("open", path), &e))?;
    let meta = file.metadata().map_err(|e| agent_error(&describe("stat", path), &e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(error(ErrorKind::IsADirectory, format!("{} is a directory", path.display())));
    }
    if !ft.is_file() {
        return Err(error(
            ErrorKind::InvalidArgument,
            format!("{} is a {}, not a regular file", path.display(), special_file_type(&ft)),
        ));
    }
    clear_nonblocking(&file).map_err(|e| agent_error(&describe("fcntl", path), &e))?;
    Ok((file, meta))
}

/// The name of a file type that is neither a regular file nor a directory.
fn special_file_type(ft: &fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Clears `O_NONBLOCK` on an open file.
fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor `file` owns; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Converts metadata (from `lstat`) into the protocol's description.
pub fn file_stat(path: &Path, meta: &fs::Metadata) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let symlink_target =
        if ft.is_symlink() { fs::read_link(path).ok().map(|t| t.to_string_lossy().into_owned()) } else { None };
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        modified_unix_ms: meta.mtime().saturating_mul(1000) + meta.mtime_nsec() / 1_000_000,
        symlink_target,
    }
}

impl Files {
    /// File operations whose relative paths resolve against `work_dir`.
    pub fn new(work_dir: &Path) -> Self {
        Self { work_dir: work_dir.to_owned() }
    }

    /// Resolves a request path; empty paths are refused.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, AgentError> {
        if path.is_empty() {
            return Err(error(ErrorKind::InvalidArgument, "path is empty"));
        }
        if path.contains('\0') {
            return Err(error(ErrorKind::InvalidArgument, "path contains a NUL byte"));
        }
        Ok(self.work_dir.join(path))
    }

    /// Writes one chunk.
    pub fn write(&self, req: &WriteFileRequest) -> Result<(), AgentError> {
        if req.data.len() > MAX_FILE_CHUNK_BYTES {
            return Err(error(
                ErrorKind::TooLarge,
                format!("write chunk of {} bytes exceeds the limit of {MAX_FILE_CHUNK_BYTES} bytes", req.data.len()),
            ));
        }
        let path = self.resolve(&req.path)?;
        let mode = check_mode(req.mode, DEFAULT_FILE_MODE)?;
        if req.create_parents {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| agent_error(&describe("create parents of", &path), &e))?;
            }
        }
        let mut opts = OpenOptions::new();
        opts.write(true).mode(mode);
        match req.position {
            WritePosition::Truncate => opts.create(true).truncate(true),
            WritePosition::At(_) => &mut opts,
            WritePosition::Append => opts.create(true).append(true),
        };
        let existed = fs::symlink_metadata(&path).is_ok();
        let mut file = opts.open(&path).map_err(|e| agent_error(&describe("open", &path), &e))?;
        if !existed && req.mode.is_some() {
            // The umask narrowed the mode at creation; the host asked for exactly this one.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| agent_error(&describe("chmod", &path), &e))?;
        }
        if let WritePosition::At(offset) = req.position {
            file.seek(SeekFrom::Start(offset)).map_err(|e| agent_error(&describe("seek", &path), &e))?;
        }
        file.write_all(&req.data).map_err(|e| agent_error(&describe("write", &path), &e))?;
        // On the disk before the answer: what write_file reported written survives a lost VM
        // and restart_sandbox.
        file.sync_data().map_err(|e| agent_error(&describe("sync", &path), &e))
    }

    /// Reads up to `length` bytes (capped at [`MAX_FILE_CHUNK_BYTES`]) from
    /// `offset`; returns them and the file's whole size.
    pub fn read(&self, path: &str, offset: u64, length: u64) -> Result<(Vec<u8>, u64), AgentError> {
        let path = self.resolve(path)?;
        let (mut file, meta) = open_regular(&path)?;
        let length = length.min(MAX_FILE_CHUNK_BYTES as u64);
        file.seek(SeekFrom::Start(offset)).map_err(|e| agent_error(&describe("seek", &path), &e))?;
        let mut data = Vec::new();
        (&mut file).take(length).read_to_end(&mut data).map_err(|e| agent_error(&describe("read", &path), &e))?;
        Ok((data, meta.len()))
    }

    /// Describes a path without following a final symlink.
    pub fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        let path = self.resolve(path)?;
        let meta = fs::symlink_metadata(&path).map_err(|e| agent_error(&describe("stat", &path), &e))?;
        Ok(file_stat(&path, &meta))
    }

    /// Lists a directory down to `depth` levels (1 = direct entries), sorted by path.
    pub fn list(&self, path: &str, depth: u32) -> Result<Vec<DirEntry>, AgentError> {
        if depth == 0 || depth > MAX_LIST_DEPTH {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("list depth {depth} is outside 1..={MAX_LIST_DEPTH}"),
            ));
        }
        let root = self.resolve(path)?;
        let meta = fs::metadata(&root).map_err(|e| agent_error(&describe("list", &root), &e))?;
        if !meta.is_dir() {
            return Err(error(ErrorKind::NotADirectory, format!("{} is not a directory", root.display())));
        }
        let mut out = Vec::new();
        list_into(&root, "", depth, &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Creates a directory and its missing parents.
    pub fn make_dir(&self, path: &str, mode: Option<u32>) -> Result<(), AgentError> {
        let path = self.resolve(path)?;
        let mode = check_mode(mode, DEFAULT_DIR_MODE)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&path)
            .map_err(|e| agent_error(&describe("mkdir", &path), &e))?;
        // create_dir_all succeeds on an existing non-directory in some races; be exact.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(error(ErrorKind::AlreadyExists, format!("{} exists and is not a directory", path.display()))),
            Err(e) => Err(agent_error(&describe("mkdir", &path), &e)),
        }
    }

    /// Removes a file or symlink, an empty directory, or (with `recursive`) a tree.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        let path = self.resolve(path)?;
        let meta = fs::symlink_metadata(&path).map_err(|e| agent_error(&describe("remove", &path), &e))?;
        let result = if !meta.is_dir() {
            fs::remove_file(&path)
        } else if recursive {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_dir(&path)
        };
        result.map_err(|e| agent_error(&describe("remove", &path), &e))
    }

    /// Renames `from` to `to` (replacing a file at `to`, as rename(2) does).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), AgentError> {
        let from = self.resolve(from)?;
        let to = self.resolve(to)?;
        fs::rename(&from, &to).map_err(|e| agent_error(&format!("rename {} to {}", from.display(), to.display()), &e))
    }
}

/// Appends the entries of `dir` (shown under `prefix`) down to `depth` levels.
fn list_into(dir: &Path, prefix: &str, depth: u32, out: &mut Vec<DirEntry>) -> Result<(), AgentError> {
    let read = fs::read_dir(dir).map_err(|e| agent_error(&describe("list", dir), &e))?;
    for entry in read {
        let entry = entry.map_err(|e| agent_error(&describe("list", dir), &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let shown = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let path = entry.path();
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Gone between readdir and lstat: skip it rather than fail the whole listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(agent_error(&describe("stat", &path), &e)),
        };
        if out.len() >= MAX_LIST_ENTRIES {
            return Err(error(
                ErrorKind::TooLarge,
                format!("listing has more than {MAX_LIST_ENTRIES} entries; use a smaller depth"),
            ));
        }
        let is_dir = meta.is_dir();
        out.push(DirEntry { path: shown.clone(), stat: file_stat(&path, &meta) });
        if is_dir && depth > 1 {
            list_into(&path, &shown, depth - 1, out)?;
        }
    }
    Ok(())
}
