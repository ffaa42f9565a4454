//! The language drivers: their embedded sources, how each interpreter is
//! launched, and the agent↔driver wire (cells in on fd 3, messages out on fd 4).
//!
//! Owns the driver scripts (`rootfs/agent/drivers/*`, compiled into the agent so
//! it is self-contained) and the parsing of what a driver says. It never runs a
//! process or touches a cell's output streams: that is [`super::interpreter`]
//! and [`super::cell`].
//!
//! Wire, all languages: the driver writes one JSON object per line on fd 4:
//! `{"t":"ready"}` once started, then per cell any number of
//! `{"t":"result","main":bool,"data":{mime: text or base64},"ack":bool?}` and
//! `{"t":"error","name","value","traceback"}`, and finally
//! `{"t":"done","exit":int?}`.
//! Python and node read cells from fd 3 as one JSON line `{"code","count"}`;
//! a result with `"ack":true` (a figure shown mid-cell) makes the driver wait
//! for [`ACK`] on fd 3, which the agent sends once it has emitted the output
//! before that result, so the order of output and figures is kept.
//! Bash reads the cell's source from fd 3 up to a NUL byte, while the command
//! that reads and runs it comes on the shell's stdin (see [`BASH_CELL_COMMAND`]).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use serde::Deserialize;

use crate::protocol::{CodeError, Language, RichResult};

use super::ContextsConfig;

/// The Python driver, run as `python3 -u <file>`.
pub const PYTHON_DRIVER: &str = include_str!("../../drivers/python_driver.py");
/// The JavaScript driver, run as `node <file>`.
pub const NODE_DRIVER: &str = include_str!("../../drivers/node_driver.js");
/// The bash set-up, written to an interactive shell's stdin at start.
pub const BASH_DRIVER: &str = include_str!("../../drivers/bash_driver.sh");

/// What the agent writes on an interactive bash's stdin to run one cell.
///
/// Interactive bash aborts the whole current command line on SIGINT and goes
/// back to reading stdin, keeping its state: the first line is then abandoned
/// with `__capsule_status` still 130, and the second line still reports it.
/// The cell runs with stdin from /dev/null and without the driver's fds 3/4,
/// so neither the user's commands nor their background jobs hold them.
pub const BASH_CELL_COMMAND: &str = "__capsule_status=130; IFS= read -r -d '' -u 3 __capsule_code && \
eval \"$__capsule_code\" </dev/null 3<&- 4>&-; __capsule_status=$?\n\
printf '{\"t\":\"done\",\"exit\":%d}\\n' \"$__capsule_status\" >&4\n";

/// What the agent writes on fd 3 to let a driver go on after a message that wants an ack.
pub const ACK: &[u8] = b"\n";

/// Most bytes of one driver message line (a PNG of a big figure fits; a runaway does not).
pub const MAX_DRIVER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Errors of installing a driver or understanding what it said.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver file could not be written to the state directory.
    #[error("cannot write the {language} driver to {path}")]
    Install {
        /// Which driver.
        language: &'static str,
        /// Where it was going.
        path: PathBuf,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// The driver sent a line that is not one of its messages.
    #[error("the driver sent a malformed message ({snippet:?})")]
    Malformed {
        /// The start of the line.
        snippet: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A result's image was not valid base64.
    #[error("the driver sent a {mime} result that is not valid base64")]
    BadBase64 {
        /// The MIME type.
        mime: String,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
}

/// One message from a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverMessage {
    /// The interpreter finished starting.
    Ready,
    /// A rich result (value of the last expression, or a figure).
    Result {
        /// The MIME bundle.
        result: RichResult,
        /// The driver waits for [`ACK`] on fd 3 before it goes on, so that
        /// output it writes next cannot overtake this result.
        wants_ack: bool,
    },
    /// An exception of the cell.
    Error(CodeError),
    /// The cell ended; for bash, with its exit status.
    Done {
        /// Bash's `$?` after the cell.
        exit: Option<i32>,
    },
}

#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Wire {
    Ready,
    Result {
        main: bool,
        data: serde_json::Map<String, serde_json::Value>,
        #[serde(default)]
        ack: bool,
    },
    Error {
        name: String,
        value: String,
        #[serde(default)]
        traceback: Vec<String>,
    },
    Done {
        #[serde(default)]
        exit: Option<i32>,
    },
}

/// Parses one line (without its newline) from a driver.
pub fn parse_message(line: &[u8]) -> Result<DriverMessage, DriverError> {
    let wire: Wire = serde_json::from_slice(line).map_err(|source| DriverError::Malformed {
        snippet: String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned(),
        source,
    })?;
    Ok(match wire {
        Wire::Ready => DriverMessage::Ready,
        Wire::Done { exit } => DriverMessage::Done { exit },
        Wire::Error { name, value, traceback } => DriverMessage::Error(bound_error(name, value, traceback)),
        Wire::Result { main, data, ack } => {
            let mut bundle = Vec::with_capacity(data.len());
            for (mime, value) in data {
                let text = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                let bytes = if mime.starts_with("image/") && mime != "image/svg+xml" {
                    base64::engine::general_purpose::STANDARD
                        .decode(text.as_bytes())
                        .map_err(|source| DriverError::BadBase64 { mime: mime.clone(), source })?
                } else {
                    text.into_bytes()
                };
                bundle.push((mime, bytes));
            }
            // text/plain first: clients that show one representation pick the first.
            bundle.sort_by_key(|(mime, _)| mime != "text/plain");
            DriverMessage::Result {
                result: RichResult { data: bound_bundle(bundle), is_main_result: main },
                wants_ack: ack,
            }
        }
    })
}

/// Most bytes of one rich result (all its representations together), so that
/// it fits one protocol frame with room to spare.
pub const MAX_RESULT_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes of an error's name plus value.
pub const MAX_ERROR_VALUE_BYTES: usize = 64 * 1024;
/// Most bytes of an error's traceback lines together.
pub const MAX_TRACEBACK_BYTES: usize = 256 * 1024;

/// Keeps a MIME bundle under [`MAX_RESULT_BYTES`]: representations that do not
/// fit are dropped (text/plain, first, is cut instead), and text/plain says so.
fn bound_bundle(bundle: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let total: usize = bundle.iter().map(|(m, d)| m.len() + d.len()).sum();
    if total <= MAX_RESULT_BYTES {
        return bundle;
    }
    let mut kept = Vec::with_capacity(bundle.len());
    let mut dropped = Vec::new();
    let mut used = 0;
    for (mime, mut data) in bundle {
        if used + mime.len() + data.len() <= MAX_RESULT_BYTES {
            used += mime.len() + data.len();
            kept.push((mime, data));
        } else if mime == "text/plain" {
            data.truncate(cut_point(&data, MAX_RESULT_BYTES / 2));
            used += mime.len() + data.len();
            kept.push((mime, data));
            dropped.push("text/plain (cut)".to_string());
        } else {
            dropped.push(format!("{mime} ({} bytes)", data.len()));
        }
    }
    let note = format!(
        "\n[capsule: this result was over the {MAX_RESULT_BYTES}-byte cap on one result; left out: {}]",
        dropped.join(", ")
    );
    match kept.iter_mut().find(|(m, _)| m == "text/plain") {
        Some((_, data)) => data.extend_from_slice(note.as_bytes()),
        None => kept.insert(0, ("text/plain".to_string(), note.trim_start().as_bytes().to_vec())),
    }
    kept
}

/// Keeps an error's value and traceback under their caps, saying where it cut.
fn bound_error(name: String, mut value: String, mut traceback: Vec<String>) -> CodeError {
    if name.len() + value.len() > MAX_ERROR_VALUE_BYTES {
        let keep = cut_point(value.as_bytes(), MAX_ERROR_VALUE_BYTES.saturating_sub(name.len()));
        let over = value.len() - keep;
        value.truncate(keep);
        value.push_str(&format!(" [capsule: {over} more bytes cut; cap {MAX_ERROR_VALUE_BYTES} bytes]"));
    }
    let mut used = 0;
    if let Some(cut) = traceback.iter().position(|line| {
        used += line.len();
        used > MAX_TRACEBACK_BYTES
    }) {
        // Keep the head and the last line (the exception itself).
        let last = traceback.pop();
        let omitted = traceback.len().saturating_sub(cut);
        traceback.truncate(cut.min(traceback.len()));
        traceback.push(format!("[capsule: {omitted} traceback lines cut; cap {MAX_TRACEBACK_BYTES} bytes]"));
        traceback.extend(last.map(|l| l.chars().take(MAX_ERROR_VALUE_BYTES).collect::<String>()));
    }
    CodeError { name, value, traceback }
}

/// The largest length <= `max` that does not split a UTF-8 character of `data`.
fn cut_point(data: &[u8], max: usize) -> usize {
    if data.len() <= max {
        return data.len();
    }
    let mut at = max;
    // A UTF-8 continuation byte is 0b10xx_xxxx.
    while at > 0 && data[at] & 0xC0 == 0x80 {
        at -= 1;
    }
    at
}

/// The bytes that hand one cell to a running driver on fd 3.
pub fn encode_cell(language: Language, code: &str, count: u64) -> Vec<u8> {
    match language {
        Language::Bash => {
            let mut out = Vec::with_capacity(code.len() + 1);
            out.extend_from_slice(code.as_bytes());
            out.push(0);
            out
        }
        Language::Python | Language::JavaScript => {
            let mut out = serde_json::json!({ "code": code, "count": count }).to_string().into_bytes();
            out.push(b'\n');
            out
        }
    }
}

/// How to start one language's interpreter.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(&'static str, &'static str)>,
    /// Bytes written to its stdin at start (bash's set-up); `None` gives /dev/null.
    pub stdin_preamble: Option<&'static [u8]>,
}

/// Writes the driver for `language` under `state_dir/drivers/` (if its content
/// changed) and says how to launch it.
pub fn launch(config: &ContextsConfig, language: Language) -> Result<Launch, DriverError> {
    match language {
        Language::Python => {
            let file = install(&config.state_dir, "python_driver.py", PYTHON_DRIVER, "python")?;
            Ok(Launch {
                program: config.python.clone(),
                // -u: unbuffered, so print() streams. -q: no banner. -X utf8 keeps
                // output encodable whatever the guest locale is.
                args: vec!["-u".into(), "-X".into(), "utf8".into(), file.into_os_string()],
                env: vec![("MPLBACKEND", "Agg"), ("PYTHONUNBUFFERED", "1")],
                stdin_preamble: None,
            })
        }
        Language::JavaScript => {
            let file = install(&config.state_dir, "node_driver.js", NODE_DRIVER, "javascript")?;
            Ok(Launch {
                program: config.node.clone(),
                args: vec![file.into_os_string()],
                env: Vec::new(),
                stdin_preamble: None,
            })
        }
        Language::Bash => Ok(Launch {
            program: config.bash.clone(),
            // Interactive (so SIGINT aborts the cell, not the shell), without
            // rc files, line editing or job control.
            args: vec!["--norc".into(), "--noprofile".into(), "--noediting".into(), "-i".into(), "+m".into()],
            env: vec![("PS1", ""), ("PS2", ""), ("TERM", "dumb")],
            stdin_preamble: Some(BASH_DRIVER.as_bytes()),
        }),
    }
}

fn install(state_dir: &Path, name: &str, content: &str, language: &'static str) -> Result<PathBuf, DriverError> {
    let dir = state_dir.join("drivers");
    let path = dir.join(name);
    if fs::read(&path).is_ok_and(|old| old == content.as_bytes()) {
        return Ok(path);
    }
    let err = |source| DriverError::Install { language, path: path.clone(), source };
    fs::create_dir_all(&dir).map_err(err)?;
    // Write beside, then rename: a concurrent start never reads half a driver.
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{unique}", std::process::id()));
    fs::write(&tmp, content).map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_decodes_png_and_puts_text_first() {
        let line = br#"{"t":"result","main":false,"data":{"image/png":"iVBORw==","text/plain":"<Figure>"}}"#;
        let DriverMessage::Result { result: r, wants_ack } = parse_message(line).unwrap() else {
            panic!("not a result")
        };
        assert!(!wants_ack);
        assert_eq!(r.data[0], ("text/plain".to_string(), b"<Figure>".to_vec()));
        assert_eq!(r.data[1], ("image/png".to_string(), vec![0x89, b'P', b'N', b'G']));
        assert!(!r.is_main_result);
    }

    #[test]
    fn oversized_results_and_errors_are_cut_and_say_so() {
        let big = "x".repeat(MAX_RESULT_BYTES);
        let line = format!(r#"{{"t":"result","main":true,"data":{{"text/plain":"small","text/html":"{big}"}}}}"#);
        let DriverMessage::Result { result, .. } = parse_message(line.as_bytes()).unwrap() else {
            panic!("not a result")
        };
        assert_eq!(result.data.len(), 1);
        let text = String::from_utf8(result.data[0].1.clone()).unwrap();
        assert!(text.starts_with("small") && text.contains("text/html"), "{text}");

        let value = "é".repeat(MAX_ERROR_VALUE_BYTES);
        let lines: Vec<String> = (0..100_000).map(|i| format!("line {i}")).collect();
        let line = serde_json::json!({"t": "error", "name": "E", "value": value, "traceback": lines}).to_string();
        let DriverMessage::Error(e) = parse_message(line.as_bytes()).unwrap() else { panic!("not an error") };
        assert!(e.value.len() < MAX_ERROR_VALUE_BYTES + 100 && e.value.contains("cut"), "{}", e.value.len());
        assert!(e.traceback.iter().map(String::len).sum::<usize>() < MAX_TRACEBACK_BYTES + 200);
        assert_eq!(e.traceback.last().map(String::as_str), Some("line 99999"));
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        assert!(parse_message(b"{").is_err());
        assert!(parse_message(br#"{"t":"nope"}"#).is_err());
        assert!(parse_message(br#"{"t":"result","main":true,"data":{"image/png":"@@@"}}"#).is_err());
        assert_eq!(parse_message(br#"{"t":"done","exit":3}"#).unwrap(), DriverMessage::Done { exit: Some(3) });
    }
}
