//! Output caps for streamed request output (foreground `Exec` and `RunCode`).
//!
//! [`CappedOutput`] sits between a producer of [`Event`]s and the connection.
//! `Event::Output` chunks pass through until their stream reaches the cap;
//! meanwhile at most `cap` bytes of that stream are kept in memory. At the
//! overflow the whole stream so far goes into a file under the agent's output
//! directory, one `Event::Truncated` names that file, and from then on the
//! stream is appended to the file and no longer streamed. Memory per stream is
//! therefore bounded by the cap, never by what a process prints.
//!
//! It never decides what a request means; other events pass through untouched.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::protocol::{Event, Stream};

/// One stream's state.
#[derive(Debug, Default)]
struct StreamState {
    /// Bytes seen so far (streamed or not).
    total_bytes: u64,
    /// Copy of what was streamed, kept until overflow (at most `cap` bytes).
    streamed: Vec<u8>,
    /// After overflow: the file holding the whole stream (`None` if it could not be written).
    file: Option<File>,
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
    /// A cap of `cap_bytes` per stream; overflow files go to `dir/<tag>-<stream>.log`.
    pub fn new(cap_bytes: u64, dir: &Path, tag: String) -> Self {
        Self {
            cap_bytes,
            dir: dir.to_owned(),
            tag,
            streams: Default::default(),
        }
    }

    /// Total bytes seen on `stream`, streamed or not.
    pub fn total_bytes(&self, stream: Stream) -> u64 {
        self.streams[index(stream)].total_bytes
    }

    /// The file that holds all of `stream`, once it overflowed.
    pub fn overflow_path(&self, stream: Stream) -> PathBuf {
        self.dir
            .join(format!("{}-{}.log", self.tag, stream_name(stream)))
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
        let state = &mut self.streams[index(stream)];
        state.total_bytes += data.len() as u64;
        if state.overflowed {
            if let Some(file) = &mut state.file {
                if let Err(e) = file.write_all(&data) {
                    eprintln!(
                        "capsule-agent: writing {} failed, output dropped: {e}",
                        path.display()
                    );
                    state.file = None;
                }
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
            forward(Event::Output {
                stream,
                data: data[..head].to_vec(),
            });
        }
        state.overflowed = true;
        let streamed = std::mem::take(&mut state.streamed);
        state.file = open_overflow_file(&path, &[&streamed, &data[..head], &data[head..]]);
        let shown_path = if state.file.is_some() {
            path.display().to_string()
        } else {
            String::new()
        };
        forward(Event::Truncated {
            stream,
            cap_bytes: cap,
            path: shown_path,
        });
    }

    /// Flushes overflow files (call when the producer is done).
    pub fn finish(&mut self) {
        for state in &mut self.streams {
            if let Some(file) = &mut state.file {
                let _ = file.flush();
            }
        }
    }
}

/// Creates the overflow file and writes the parts so far; logs and returns
/// `None` when that fails (the stream is then dropped past the cap).
fn open_overflow_file(path: &Path, parts: &[&[u8]]) -> Option<File> {
    let result = (|| -> std::io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = File::create(path)?;
        for part in parts {
            file.write_all(part)?;
        }
        Ok(file)
    })();
    match result {
        Ok(file) => Some(file),
        Err(e) => {
            eprintln!(
                "capsule-agent: cannot keep overflowing output in {}: {e}",
                path.display()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(stream: Stream, data: &[u8]) -> Event {
        Event::Output {
            stream,
            data: data.to_vec(),
        }
    }

    #[test]
    fn output_under_the_cap_passes_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = CappedOutput::new(10, dir.path(), "t".into());
        let mut got = Vec::new();
        capped.push(out(Stream::Stdout, b"hello"), &mut |e| got.push(e));
        capped.push(out(Stream::Stderr, b"0123456789"), &mut |e| got.push(e));
        assert_eq!(
            got,
            vec![
                out(Stream::Stdout, b"hello"),
                out(Stream::Stderr, b"0123456789")
            ]
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "no file below the cap"
        );
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
                Event::Truncated {
                    stream: Stream::Stdout,
                    cap_bytes: 8,
                    path: path.display().to_string()
                },
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
        assert!(matches!(
            got[0],
            Event::Truncated {
                stream: Stream::Stderr,
                cap_bytes: 0,
                ..
            }
        ));
        capped.finish();
        assert_eq!(
            std::fs::read(dir.path().join("z-stderr.log")).unwrap(),
            b"xy"
        );
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
