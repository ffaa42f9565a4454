//! The stdio relay (`capsule serve` over stdio): newline-delimited JSON-RPC between the MCP
//! client on stdin/stdout and the daemon's socket, message by message.
//!
//! It passes every message on at once, whole (the two directions never interleave inside a
//! line on stdout), and it answers for the daemon what the daemon would silently drop: a
//! message over [`MAX_MESSAGE_BYTES`] gets a JSON-RPC error naming the limit, with the
//! request's id (found by a streaming scan of the line, so the oversized line is never held in
//! memory), instead of a call that never returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Largest JSON-RPC message (one line, without its newline) the relay passes on: what the
/// daemon's MCP transport takes (rmcp's `DEFAULT_MAX_LINE_LENGTH`, 16 MiB, newline included).
pub const MAX_MESSAGE_BYTES: usize = rmcp::transport::async_rw::DEFAULT_MAX_LINE_LENGTH - 1;
/// JSON-RPC "Invalid Request".
const INVALID_REQUEST: i64 = -32600;

/// Relays until the client closes stdin and the daemon has answered everything, or the daemon
/// goes. `from_daemon` may already hold bytes the daemon sent.
pub fn relay(to_daemon: UnixStream, from_daemon: BufReader<UnixStream>) -> std::io::Result<()> {
    relay_streams(std::io::stdin(), to_daemon, from_daemon, std::io::stdout())
}

/// [`relay`] over any streams (tests use pipes).
pub fn relay_streams(
    client_in: impl Read + Send + 'static,
    to_daemon: UnixStream,
    mut from_daemon: impl BufRead,
    client_out: impl Write + Send + 'static,
) -> std::io::Result<()> {
    let client_out = Arc::new(Mutex::new(client_out));
    let out = client_out.clone();
    let upstream = std::thread::Builder::new().name("relay-in".into()).spawn(move || {
        let mut to_daemon = to_daemon;
        let _ = forward_client(client_in, &mut to_daemon, &out);
        let _ = to_daemon.shutdown(std::net::Shutdown::Write);
    })?;
    let mut line = Vec::new();
    let copied = loop {
        line.clear();
        match from_daemon.read_until(b'\n', &mut line) {
            Ok(0) => break Ok(()),
            Ok(_) => {
                let mut out = client_out.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    drop(upstream);
    copied
}

/// Passes the client's messages to the daemon, answering oversized ones itself.
fn forward_client(
    client_in: impl Read,
    to_daemon: &mut impl Write,
    client_out: &Mutex<impl Write>,
) -> std::io::Result<()> {
    let mut input = BufReader::with_capacity(256 * 1024, client_in);
    let mut line: Vec<u8> = Vec::new();
    let mut oversized: Option<IdScanner> = None;
    loop {
        let available = match input.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let newline = available.iter().position(|b| *b == b'\n');
        let take = newline.map_or(available.len(), |i| i + 1);
        let chunk = &available[..take];
        match &mut oversized {
            Some(scanner) => scanner.feed(chunk),
            None if line.len() + chunk.len() > MAX_MESSAGE_BYTES + 1 => {
                let mut scanner = IdScanner::default();
                scanner.feed(&line);
                scanner.feed(chunk);
                scanner.bytes = line.len() + chunk.len();
                line = Vec::new();
                oversized = Some(scanner);
            }
            None => line.extend_from_slice(chunk),
        }
        input.consume(take);
        if newline.is_none() {
            continue;
        }
        match oversized.take() {
            Some(scanner) => {
                let size = scanner.bytes;
                if let Some(id) = scanner.id() {
                    let answer = refusal(&id, size);
                    let mut out = client_out.lock().unwrap_or_else(|p| p.into_inner());
                    out.write_all(answer.as_bytes())?;
                    out.flush()?;
                } else {
                    eprintln!(
                        "capsule: dropped a {size}-byte notification over the {MAX_MESSAGE_BYTES}-byte message limit"
                    );
                }
            }
            None => {
                to_daemon.write_all(&line)?;
                to_daemon.flush()?;
                line.clear();
            }
        }
    }
}

/// The JSON-RPC error for a request `id` (its JSON text) of `size` bytes.
fn refusal(id: &str, size: usize) -> String {
    let message = format!(
        "the request is {size} bytes, over this server's limit of {MAX_MESSAGE_BYTES} bytes per JSON-RPC message \
         ({} MiB); send less per call (for big files, write_file in pieces with append: true)",
        (MAX_MESSAGE_BYTES + 1) >> 20
    );
    let error = serde_json::json!({"code": INVALID_REQUEST, "message": message});
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{error}}}\n")
}

/// Finds the top-level `"id"` of a JSON object streamed through it, holding only a few bytes.
#[derive(Debug, Default)]
struct IdScanner {
    /// Bytes seen (the message's size).
    bytes: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1: the key being read, and whether the next value is the id's.
    key: Vec<u8>,
    reading_key: bool,
    after_id_key: bool,
    /// The id's text, once found (a number, a string with its quotes, or null).
    value: Vec<u8>,
    reading_value: bool,
    found: Option<String>,
}

/// Longest id text kept.
const MAX_ID_BYTES: usize = 256;

impl IdScanner {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
        }
    }

    fn step(&mut self, b: u8) {
        if self.reading_value {
            let ends_bare = !self.value.starts_with(b"\"") && matches!(b, b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t');
            if ends_bare {
                self.finish_value();
            } else {
                if self.value.len() < MAX_ID_BYTES {
                    self.value.push(b);
                }
                if self.value.starts_with(b"\"") && self.value.len() > 1 {
                    if self.escaped {
                        self.escaped = false;
                        return;
                    }
                    if b == b'\\' {
                        self.escaped = true;
                        return;
                    }
                    if b == b'"' {
                        self.finish_value();
                    }
                }
                return;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    self.after_id_key = self.key == b"id";
                }
            } else if self.reading_key && self.key.len() < 8 {
                self.key.push(b);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && !self.after_id_key {
                    self.reading_key = true;
                    self.key.clear();
                } else if self.depth == 1 && self.after_id_key && self.found.is_none() {
                    // A string id: read it as a value.
                    self.in_string = false;
                    self.after_id_key = false;
                    self.reading_value = true;
                    self.value = vec![b'"'];
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.after_id_key = false;
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
            }
            b':' if self.depth == 1 && self.after_id_key => {}
            b' ' | b'\n' | b'\r' | b'\t' => {}
            b',' => self.after_id_key = false,
            _ if self.depth == 1 && self.after_id_key && self.found.is_none() => {
                self.after_id_key = false;
                self.reading_value = true;
                self.value = vec![b];
            }
            _ => {}
        }
    }

    fn finish_value(&mut self) {
        self.reading_value = false;
        let text = String::from_utf8_lossy(&self.value).into_owned();
        // Only ids that are valid JSON on their own are echoed back.
        if self.found.is_none() && serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| !v.is_object()) {
            self.found = Some(text);
        }
        self.value.clear();
    }

    /// The id's JSON text, if the message had one.
    fn id(mut self) -> Option<String> {
        if self.reading_value {
            self.finish_value();
        }
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(text: &str) -> Option<String> {
        let mut scanner = IdScanner::default();
        scanner.feed(text.as_bytes());
        scanner.id()
    }

    #[test]
    fn the_top_level_id_is_found_wherever_it_is() {
        assert_eq!(id_of(r#"{"jsonrpc":"2.0","id":5,"method":"tools/call"}"#).as_deref(), Some("5"));
        assert_eq!(id_of(r#"{"method":"x","params":{"id":1,"a":[{"id":2}]},"id":"abc"}"#).as_deref(), Some("\"abc\""));
        assert_eq!(id_of(r#"{"id": "a\"b", "x": 1}"#).as_deref(), Some(r#""a\"b""#));
        assert_eq!(id_of(r#"{"params":{"content":"\"id\":9"},"id":12}"#).as_deref(), Some("12"));
        assert_eq!(id_of(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), None);
    }

    #[test]
    fn an_oversized_request_is_answered_with_its_id_and_the_limit_and_others_pass() {
        let small = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n".to_vec();
        let mut big = b"{\"jsonrpc\":\"2.0\",\"id\":42,\"method\":\"tools/call\",\"params\":{\"content\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE_BYTES + 10));
        big.extend_from_slice(b"\"}}\n");
        let mut input = small.clone();
        input.extend_from_slice(&big);
        input.extend_from_slice(&small);
        let (mut daemon_end, relay_end) = UnixStream::pair().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let out_writer = SharedVec(out.clone());
        let forwarded = std::thread::spawn(move || {
            let mut got = Vec::new();
            daemon_end.read_to_end(&mut got).unwrap();
            got
        });
        let mut relay_end = relay_end;
        forward_client(&input[..], &mut relay_end, &Mutex::new(out_writer)).unwrap();
        drop(relay_end);
        let forwarded = forwarded.join().unwrap();
        let mut both = small.clone();
        both.extend_from_slice(&small);
        assert_eq!(forwarded, both, "the small messages went on, the big one did not");
        let answer: serde_json::Value = serde_json::from_slice(&out.lock().unwrap()).unwrap();
        assert_eq!(answer["id"], 42);
        assert_eq!(answer["error"]["code"], INVALID_REQUEST);
        assert!(answer["error"]["message"].as_str().unwrap().contains("16 MiB"), "{answer}");
    }

    struct SharedVec(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
