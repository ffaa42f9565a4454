//! A worker process's own log. The worker installs [`init`]: tracing to stderr, filtered by
//! `RUST_LOG` (default `warn`), plain text, at most [`MAX_WORKER_LOG_BYTES`] per process (then
//! one line saying so, and silence). The controller points that stderr at a per-VM file beside
//! the serial log ([`worker_log_path`], [`open_worker_log`]); never at its own stdout, which
//! may be an MCP stdio transport. This module never reads the log and never rotates it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most bytes one worker process writes through [`init`]'s subscriber.
pub const MAX_WORKER_LOG_BYTES: u64 = 1 << 20;
/// Filter used when `RUST_LOG` is unset or not valid.
pub const DEFAULT_WORKER_LOG_FILTER: &str = "warn";

/// Bytes written so far by this process's subscriber.
static WRITTEN_BYTES: AtomicU64 = AtomicU64::new(0);

/// Where the stderr of the worker whose serial console goes to `serial_log` is kept:
/// `serial.log` → `serial.worker.log` in the same directory.
pub fn worker_log_path(serial_log: &Path) -> PathBuf {
    serial_log.with_extension("worker.log")
}

/// Opens the worker log at `path` for appending, emptied first when an earlier worker left
/// more than [`MAX_WORKER_LOG_BYTES`] there (so the file stays bounded across workers).
pub fn open_worker_log(path: &Path) -> std::io::Result<File> {
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_WORKER_LOG_BYTES);
    if too_big {
        File::create(path)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Stderr, until [`MAX_WORKER_LOG_BYTES`] were written by this process.
struct BoundedStderr;

impl Write for BoundedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = buf.len() as u64;
        let before = WRITTEN_BYTES.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) <= MAX_WORKER_LOG_BYTES {
            std::io::stderr().write_all(buf)?;
        } else if before <= MAX_WORKER_LOG_BYTES {
            let _ = writeln!(
                std::io::stderr(),
                "worker {}: log limit of {MAX_WORKER_LOG_BYTES} bytes reached; later messages are dropped",
                std::process::id()
            );
        }
        // Dropped bytes count as written: the subscriber must not retry them.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the worker's tracing subscriber (once per process; later calls do nothing).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_WORKER_LOG_FILTER));
    let _ = tracing_subscriber::fmt().with_writer(|| BoundedStderr).with_env_filter(filter).with_ansi(false).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_log_sits_beside_the_serial_log() {
        assert_eq!(worker_log_path(Path::new("/vm/7/serial.log")), Path::new("/vm/7/serial.worker.log"));
        assert_eq!(worker_log_path(Path::new("/vm/7/console")), Path::new("/vm/7/console.worker.log"));
    }

    #[test]
    fn an_oversized_worker_log_is_emptied_before_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.worker.log");
        std::fs::write(&path, vec![b'x'; MAX_WORKER_LOG_BYTES as usize + 1]).unwrap();
        let mut f = open_worker_log(&path).unwrap();
        f.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        // A small one is appended to.
        drop(f);
        open_worker_log(&path).unwrap().write_all(b"more\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\nmore\n");
    }
}
