//! Output caps: streamed request output (foreground `Exec` and `RunCode`) and
//! the files that keep output in the guest.
//!
//! [`CappedOutput`] sits between a producer of [`Event`]s and the connection.
//! `Event::Output` chunks pass through until their stream reaches the cap;
//! meanwhile at most `cap` bytes of that stream are kept in memory. At the
//! overflow the stream so far goes into a file under the agent's output
//! directory, one `Event::Truncated` names that file, and from then on the
//! stream is appended to the file and no longer streamed. Memory per stream is
//! therefore bounded by the cap, never by what a process prints.
//!
//! Disk is bounded too: every output file (these overflow files and the
//! background process files of [`crate::process`]) is a [`CappedFile`] that
//! keeps at most [`MAX_OUTPUT_FILE_BYTES`] and then one marker line, and each
//! new overflow file first prunes the oldest ones in its directory down to
//! [`MAX_OVERFLOW_FILES`] files and [`MAX_OVERFLOW_DIR_BYTES`].
//!
//! It never decides what a request means; other events pass through untouched.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::protocol::{Event, Stream};

/// Most bytes kept in one output file (per stream); past it a marker line is
/// appended and the rest of the stream is dropped (still counted).
pub const MAX_OUTPUT_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Overflow files kept in the output directory; creating one deletes the oldest past this.
pub const MAX_OVERFLOW_FILES: usize = 32;

/// Total bytes of overflow files kept in the output directory (older files go first).
pub const MAX_OVERFLOW_DIR_BYTES: u64 = 256 * 1024 * 1024;

/// The line that ends an output file cut at `cap_bytes`.
pub fn truncation_marker(cap_bytes: u64) -> String {
    format!("\n[capsule-agent: output truncated at {cap_bytes} bytes]\n")
}

/// A file that keeps the first `cap_bytes` written to it, then the
/// [`truncation_marker`]; what comes later is dropped. A failed write is
/// logged once and the file stops taking data.
#[derive(Debug)]
pub struct CappedFile {
    file: Option<File>,
    path: PathBuf,
    stored_bytes: u64,
    cap_bytes: u64,
}

impl CappedFile {
    /// Wraps an open, empty `file` (named `path` in logs).
    pub fn new(file: File, path: &Path, cap_bytes: u64) -> Self {
        Self { file: Some(file), path: path.to_owned(), stored_bytes: 0, cap_bytes }
    }

    /// Appends what fits under the cap; the first byte past it adds the marker.
    pub fn write(&mut self, data: &[u8]) {
        let Some(file) = &mut self.file else { return };
        let room = self.cap_bytes - self.stored_bytes;
        let take = (data.len() as u64).min(room) as usize;
        let mut result = file.write_all(&data[..take]);
        self.stored_bytes += take as u64;
        let full = take < data.len();
        if result.is_ok() && full {
            result = file.write_all(truncation_marker(self.cap_bytes).as_bytes());
        }
        if let Err(e) = &result {
            eprintln!("capsule-agent: writing {} failed, output dropped: {e}", self.path.display());
        }
        if full || result.is_err() {
            self.file = None;
        }
    }

    /// Flushes what was written.
    pub fn flush(&mut self) {
        if let Some(file) = &mut self.file {
            let _ = file.flush();
        }
    }
}

/// Bounds on the files [`CappedOutput`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverflowLimits {
    /// Most bytes kept per overflow file.
    pub file_bytes: u64,
    /// Most overflow files kept in the directory.
    pub dir_files: usize,
    /// Most bytes of overflow files kept in the directory.
    pub dir_bytes: u64,
}

impl Default for OverflowLimits {
    fn default() -> Self {
        Self { file_bytes: MAX_OUTPUT_FILE_BYTES, dir_files: MAX_OVERFLOW_FILES, dir_bytes: MAX_OVERFLOW_DIR_BYTES }
    }
}

/// One stream's state.
#[derive(Debug, Default)]
struct StreamState {
    /// Bytes seen so far (streamed or not).
    total_bytes: u64,
    /// Copy of what was streamed, kept until overflow (at most `cap` bytes).
    streamed: Vec<u8>,
    /// After overflow: the file keeping the stream (`None` if it could not be created).
    file: Option<CappedFile>,
    /// Whether the stream passed its cap.
    overflowed: bool,
}

/// Applies a per-stream cap to streamed output (see the module docs).
#[derive(Debug)]
pub struct CappedOutput {
    cap_bytes: u64,
    dir: PathBuf,
    /// File name prefix, unique within the agent (e.g. `exec-17`).
    tag: String,
    limits: OverflowLimits,
    streams: [StreamState; 2],
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

impl CappedOutput {
    /// A cap of `cap_bytes` per stream; overflow files go to `dir/<tag>-<stream>.log`,
    /// bounded by the default [`OverflowLimits`].
    pub fn new(cap_bytes: u64, dir: &Path, tag: String) -> Self {
        Self { cap_bytes, dir: dir.to_owned(), tag, limits: OverflowLimits::default(), streams: Default::default() }
    }

    /// The same with other bounds on the overflow files.
    pub fn with_limits(mut self, limits: OverflowLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Total bytes seen on `stream`, streamed or not.
    pub fn total_bytes(&self, stream: Stream) -> u64 {
        self.streams[index(stream)].total_bytes
    }

    /// The file that keeps `stream`, once it overflowed.
    pub fn overflow_path(&self, stream: Stream) -> PathBuf {
        self.dir.join(format!("{}-{}.log", self.tag, stream_name(stream)))
    }

    /// Takes one event; forwards what should reach the host, in order.
    pub fn push(&mut self, event: Event, forward: &mut dyn FnMut(Event)) {
        match event {
            Event::Output { stream, data } => self.push_output(stream, data, forward),
            other => forward(other),
        }
    }

    fn push_output(&mut self, stream: Stream, data: Vec<u8>, forward: &mut dyn FnMut(Event)) {
        let cap = self.cap_bytes;
        let path = self.overflow_path(stream);
        let limits = self.limits;
        let state = &mut self.streams[index(stream)];
        state.total_bytes += data.len() as u64;
        if state.overflowed {
            if let Some(file) = &mut state.file {
                file.write(&data);
            }
            return;
        }
        let room = cap.saturating_sub(state.streamed.len() as u64);
        if (data.len() as u64) <= room {
            state.streamed.extend_from_slice(&data);
            forward(Event::Output { stream, data });
            return;
        }
        // This chunk crosses the cap: stream up to the cap, then switch to the file.
        let head = room as usize;
        if head > 0 {
            forward(Event::Output { stream, data: data[..head].to_vec() });
        }
        state.overflowed = true;
        let streamed = std::mem::take(&mut state.streamed);
        state.file = open_overflow_file(&path, limits);
        if let Some(file) = &mut state.file {
            file.write(&streamed);
            file.write(&data);
        }
        let shown_path = if state.file.is_some() { path.display().to_string() } else { String::new() };
        forward(Event::Truncated { stream, cap_bytes: cap, path: shown_path });
    }

    /// Flushes overflow files (call when the producer is done).
    pub fn finish(&mut self) {
        for state in &mut self.streams {
            if let Some(file) = &mut state.file {
                file.flush();
            }
        }
    }
}

/// Prunes the directory, then creates the overflow file; logs and returns
/// `None` when that fails (the stream is then dropped past the cap).
fn open_overflow_file(path: &Path, limits: OverflowLimits) -> Option<CappedFile> {
    let result = (|| -> std::io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            // Room for the new file: one slot and its worst-case size.
            prune_dir(dir, limits.dir_files.saturating_sub(1), limits.dir_bytes.saturating_sub(limits.file_bytes));
        }
        File::create(path)
    })();
    match result {
        Ok(file) => Some(CappedFile::new(file, path, limits.file_bytes)),
        Err(e) => {
            eprintln!("capsule-agent: cannot keep overflowing output in {}: {e}", path.display());
            None
        }
    }
}

/// Deletes the oldest regular files of `dir` (by modification time) until at
/// most `max_files` files of at most `max_bytes` in total are left.
pub fn prune_dir(dir: &Path, max_files: usize, max_bytes: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(|m| m.is_file())?;
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            Some((modified, meta.len(), entry.path()))
        })
        .collect();
    // Newest first; keep while both bounds hold, delete the rest.
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.2.cmp(&a.2)));
    let mut kept_bytes = 0u64;
    for (n, (_, len, path)) in files.into_iter().enumerate() {
        kept_bytes = kept_bytes.saturating_add(len);
        if n >= max_files || kept_bytes > max_bytes {
            if let Err(e) = std::fs::remove_file(&path) {
                eprintln!("capsule-agent: cannot prune {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn out(stream: Stream, data: &[u8]) -> Event {
        Event::Output { stream, data: data.to_vec() }
    }

    #[test]
    fn output_under_the_cap_passes_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = CappedOutput::new(10, dir.path(), "t".into());
        let mut got = Vec::new();
        capped.push(out(Stream::Stdout, b"hello"), &mut |e| got.push(e));
        capped.push(out(Stream::Stderr, b"0123456789"), &mut |e| got.push(e));
        assert_eq!(got, vec![out(Stream::Stdout, b"hello"), out(Stream::Stderr, b"0123456789")]);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no file below the cap");
    }

    #[test]
    fn overflow_streams_exactly_the_cap_then_keeps_everything_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = CappedOutput::new(8, dir.path(), "exec-1".into());
        let mut got = Vec::new();
        capped.push(out(Stream::Stdout, b"abcde"), &mut |e| got.push(e));
        capped.push(out(Stream::Stdout, b"fghij"), &mut |e| got.push(e));
        capped.push(out(Stream::Stderr, b"err"), &mut |e| got.push(e));
        capped.push(out(Stream::Stdout, b"klm"), &mut |e| got.push(e));
        capped.finish();
        let path = dir.path().join("exec-1-stdout.log");
        assert_eq!(
            got,
            vec![
                out(Stream::Stdout, b"abcde"),
                out(Stream::Stdout, b"fgh"),
                Event::Truncated { stream: Stream::Stdout, cap_bytes: 8, path: path.display().to_string() },
                out(Stream::Stderr, b"err"),
            ]
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdefghijklm");
        assert_eq!(capped.total_bytes(Stream::Stdout), 13);
        assert_eq!(capped.total_bytes(Stream::Stderr), 3);
    }

    #[test]
    fn zero_cap_streams_nothing_but_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = CappedOutput::new(0, dir.path(), "z".into());
        let mut got = Vec::new();
        capped.push(out(Stream::Stderr, b"xy"), &mut |e| got.push(e));
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Event::Truncated { stream: Stream::Stderr, cap_bytes: 0, .. }));
        capped.finish();
        assert_eq!(std::fs::read(dir.path().join("z-stderr.log")).unwrap(), b"xy");
    }

    #[test]
    fn overflow_files_keep_at_most_the_file_cap_then_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let limits = OverflowLimits { file_bytes: 10, ..OverflowLimits::default() };
        let mut capped = CappedOutput::new(4, dir.path(), "y".into()).with_limits(limits);
        let mut got = Vec::new();
        for _ in 0..1000 {
            capped.push(out(Stream::Stdout, b"y\n"), &mut |e| got.push(e));
        }
        capped.finish();
        assert_eq!(capped.total_bytes(Stream::Stdout), 2000);
        let mut want = b"y\ny\ny\ny\ny\n".to_vec();
        want.extend_from_slice(truncation_marker(10).as_bytes());
        assert_eq!(std::fs::read(dir.path().join("y-stdout.log")).unwrap(), want);
        assert!(got.iter().any(|e| matches!(e, Event::Truncated { path, .. } if path.ends_with("y-stdout.log"))));
    }

    #[test]
    fn a_new_overflow_file_prunes_the_oldest_ones() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for (i, name) in ["a.log", "b.log", "c.log"].iter().enumerate() {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64)).unwrap();
        }
        let limits = OverflowLimits { file_bytes: 10, dir_files: 2, dir_bytes: 1000 };
        let mut capped = CappedOutput::new(0, dir.path(), "new".into()).with_limits(limits);
        capped.push(out(Stream::Stdout, b"x"), &mut |_| {});
        capped.finish();
        assert_eq!(names_in(dir.path()), vec!["c.log", "new-stdout.log"]);
    }

    #[test]
    fn pruning_keeps_the_total_bytes_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_len(100).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(10 - i as u64)).unwrap();
        }
        prune_dir(dir.path(), 10, 250);
        assert_eq!(names_in(dir.path()), vec!["mid", "new"]);
    }

    #[test]
    fn rich_results_pass_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = CappedOutput::new(0, dir.path(), "r".into());
        let mut got = Vec::new();
        let ev = Event::Result(crate::protocol::RichResult {
            data: vec![("text/plain".into(), b"2".to_vec())],
            is_main_result: true,
        });
        capped.push(ev.clone(), &mut |e| got.push(e));
        assert_eq!(got, vec![ev]);
    }
}
