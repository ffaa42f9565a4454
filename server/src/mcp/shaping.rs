//! Result shaping: what a model reads back from a tool.
//!
//! - Concise text first: stdout, then stderr, then the error, then notes.
//! - `structuredContent` carries the typed result (the tool's output schema);
//!   images follow as MCP image content.
//! - Output caps: each stream keeps at most `output_cap_bytes` in a result,
//!   with an explicit note of how much was cut and where the whole stream
//!   lives in the sandbox.
//!
//! Pure functions over results; no I/O, no sandbox logic.

use capsule_agent::protocol::{Event, Stream};
use capsule_tool_schemas::{LimitHit, OutputStream, Truncation};
use rmcp::model::{CallToolResult, ContentBlock};
use serde::Serialize;

/// Result shaping settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shaping {
    /// Most bytes of each stream placed in one result.
    pub output_cap_bytes: usize,
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping { output_cap_bytes: crate::config::DEFAULT_OUTPUT_CAP_BYTES }
    }
}

/// One output stream, kept up to a cap.
#[derive(Debug, Default, Clone)]
pub struct StreamBuf {
    kept: Vec<u8>,
    seen_bytes: u64,
    cap_bytes: usize,
    full_path: Option<String>,
    cut_by_agent: bool,
}

impl StreamBuf {
    fn new(cap_bytes: usize) -> StreamBuf {
        StreamBuf { cap_bytes, ..Default::default() }
    }

    fn push(&mut self, data: &[u8]) {
        self.seen_bytes += data.len() as u64;
        let room = self.cap_bytes.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }

    /// How the stream was cut, if it was. `total_bytes` is the whole stream's size when known.
    pub fn truncation(&self, stream: OutputStream, total_bytes: Option<u64>) -> Option<Truncation> {
        let total = total_bytes.unwrap_or(self.seen_bytes).max(self.seen_bytes);
        let cut = self.cut_by_agent || total > self.kept.len() as u64;
        cut.then(|| Truncation {
            stream,
            shown_bytes: self.kept.len() as u64,
            total_bytes: (total_bytes.is_some() || !self.cut_by_agent).then_some(total),
            full_output_path: self.full_path.clone(),
        })
    }
}

/// Collects stdout and stderr of a request from its events.
#[derive(Debug, Clone)]
pub struct OutputCollector {
    /// Standard output.
    pub stdout: StreamBuf,
    /// Standard error.
    pub stderr: StreamBuf,
}

impl OutputCollector {
    /// A collector that keeps `cap_bytes` per stream.
    pub fn new(cap_bytes: usize) -> OutputCollector {
        OutputCollector { stdout: StreamBuf::new(cap_bytes), stderr: StreamBuf::new(cap_bytes) }
    }

    fn buf(&mut self, stream: Stream) -> &mut StreamBuf {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    /// Takes an output or truncation event; returns whether it was one.
    pub fn on_event(&mut self, event: &Event) -> bool {
        match event {
            Event::Output { stream, data } => {
                self.buf(*stream).push(data);
                true
            }
            Event::Truncated { stream, path, .. } => {
                let buf = self.buf(*stream);
                buf.full_path = Some(path.clone());
                buf.cut_by_agent = true;
                true
            }
            _ => false,
        }
    }

    /// Counts output that never reached the collector (dropped on the way by
    /// the call's event budget), so that totals and notes stay true.
    pub fn count_dropped(&mut self, stdout_bytes: u64, stderr_bytes: u64) {
        self.stdout.seen_bytes += stdout_bytes;
        self.stderr.seen_bytes += stderr_bytes;
    }

    /// Truncation info for both streams, given their total sizes when known.
    pub fn truncations(&self, stdout_total: Option<u64>, stderr_total: Option<u64>) -> Vec<Truncation> {
        [
            self.stdout.truncation(OutputStream::Stdout, stdout_total),
            self.stderr.truncation(OutputStream::Stderr, stderr_total),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// What a limit cost, as the model reads it; `what` is "the command" or "the cell".
pub fn limit_note(limit: &LimitHit, what: &str) -> String {
    match limit {
        LimitHit::Pids { max } => format!(
            "[{what} started more than {max} processes and was stopped (pids limit): all of its processes were \
             killed. A sandbox created with a larger pids_max allows more]"
        ),
        LimitHit::Memory { max_mib } => format!(
            "[a process of {what} was killed by the out-of-memory killer at {max_mib} MiB (memory limit). Use \
             less memory, or create a sandbox with more memory_mib]"
        ),
    }
}

/// What the end of a command cost the processes it left behind.
pub fn left_running_note(killed: u32) -> String {
    format!(
        "[{killed} process(es) it left running were killed when it ended; start long-lived processes with \
         run_command background=true]"
    )
}
/// The note a model reads about a cut stream.
pub fn truncation_note(t: &Truncation) -> String {
    let name = match t.stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    };
    let total = match t.total_bytes {
        Some(total) => format!("{} of {total} bytes shown, {} cut", t.shown_bytes, total.saturating_sub(t.shown_bytes)),
        None => format!("only the first {} bytes shown", t.shown_bytes),
    };
    match &t.full_output_path {
        Some(path) => format!(
            "[{name} truncated: {total}. The full {name} is in {path} inside the sandbox: read it with read_file (offset/limit) or grep it with run_command.]"
        ),
        None => format!("[{name} truncated: {total}. Redirect the output to a file and read it in pieces with read_file.]"),
    }
}

/// `text` cut to at most `cap_bytes` (on a character boundary), with a note
/// saying how much of how much is shown; unchanged when it fits.
pub fn cap_text(text: &str, cap_bytes: usize, what: &str) -> String {
    if text.len() <= cap_bytes {
        return text.to_string();
    }
    let mut end = cap_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[{what} cut: {end} of {} bytes shown. Save large values to a file and read it in pieces with read_file.]",
        &text[..end],
        text.len()
    )
}

/// Appends a labelled section to `out` when `body` is not empty.
pub fn push_section(out: &mut String, label: Option<&str>, body: &str) {
    if body.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if let Some(label) = label {
        out.push_str(label);
        out.push('\n');
    }
    out.push_str(body);
}

/// Builds a tool result: concise text, then images, with `structured` as `structuredContent`.
pub fn tool_result<T: Serialize>(
    structured: &T,
    text: String,
    images: Vec<(String, String)>,
    is_error: bool,
) -> CallToolResult {
    let mut content = vec![ContentBlock::text(if text.is_empty() { "(no output)".to_string() } else { text })];
    for (data, mime) in images {
        content.push(ContentBlock::image(data, mime));
    }
    let mut result = if is_error { CallToolResult::error(content) } else { CallToolResult::success(content) };
    result.structured_content = serde_json::to_value(structured).ok();
    result
}

/// An error result: text only (no structured content), for the model to act on.
pub fn error_result(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_notes_name_the_limit_and_what_to_do() {
        let pids = limit_note(&LimitHit::Pids { max: 64 }, "the command");
        assert!(pids.starts_with("[the command started more than 64 processes and was stopped (pids limit)"), "{pids}");
        assert!(pids.contains("pids_max"), "{pids}");
        let memory = limit_note(&LimitHit::Memory { max_mib: 300 }, "the cell");
        assert!(memory.contains("out-of-memory killer at 300 MiB (memory limit)"), "{memory}");
        assert!(left_running_note(3).starts_with("[3 process(es) it left running were killed"));
    }

    #[test]
    fn streams_are_capped_and_the_note_says_how_much_and_where() {
        let mut c = OutputCollector::new(10);
        c.on_event(&Event::Output { stream: Stream::Stdout, data: b"0123456789abcdef".to_vec() });
        c.on_event(&Event::Truncated { stream: Stream::Stdout, cap_bytes: 10, path: "/tmp/out".into() });
        c.on_event(&Event::Output { stream: Stream::Stderr, data: b"err".to_vec() });
        assert_eq!(c.stdout.text(), "0123456789");
        assert_eq!(c.stderr.text(), "err");
        let t = c.truncations(Some(100), Some(3));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].shown_bytes, 10);
        assert_eq!(t[0].total_bytes, Some(100));
        let note = truncation_note(&t[0]);
        assert!(note.contains("10 of 100 bytes shown, 90 cut"), "{note}");
        assert!(note.contains("/tmp/out"), "{note}");
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_with_a_note() {
        assert_eq!(cap_text("short", 10, "x"), "short");
        let cut = cap_text("ééééé", 5, "text/plain");
        assert!(cut.starts_with("éé\n[text/plain cut: 4 of 10 bytes shown"), "{cut}");
    }

    #[test]
    fn dropped_output_counts_toward_the_total() {
        let mut c = OutputCollector::new(4);
        c.on_event(&Event::Output { stream: Stream::Stdout, data: b"abcd".to_vec() });
        c.count_dropped(96, 0);
        let t = c.truncations(None, None);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].total_bytes, Some(100));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let mut c = OutputCollector::new(100);
        c.on_event(&Event::Output { stream: Stream::Stdout, data: vec![b'a', 0xff, b'b'] });
        assert_eq!(c.stdout.text(), "a\u{fffd}b");
    }
}
