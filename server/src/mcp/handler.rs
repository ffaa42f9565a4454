//! The tools: each takes its params from `capsule-tool-schemas`, holds a
//! sandbox through the manager, talks to the guest agent and shapes the result.
//!
//! Failures the model should read are [`ToolError`]s, rendered as `isError`
//! results that say what to do next. This module holds no VM logic and no
//! lifecycle logic (that is the manager's).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use capsule_agent::protocol::{
    self as proto, Command, Event, ExecRequest, Op, Reply, RunCodeRequest, WriteFileRequest, WritePosition,
};
use capsule_tool_schemas::*;
use rmcp::model::{CallToolResult, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::RoleServer;

use super::shaping::{cap_text, push_section, tool_result, truncation_note, OutputCollector};
use super::tool_error::{hint_for, ToolError};
use super::CapsuleMcp;
use crate::guest::{self, EventBudget, GuestCall, GuestError, Overflow, Step, QUICK_OP_TIMEOUT};
use crate::sandbox::Lease;

/// Longest code cell or command line, in bytes.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// How often a long call sends a progress notification.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Most output bytes of one call forwarded as logging notifications (the guest is not trusted to stop).
pub const MAX_LOGGED_OUTPUT_BYTES: u64 = 1024 * 1024;
/// Most images one `run_code` result carries.
pub const MAX_IMAGES_PER_RESULT: usize = 8;
/// Most image bytes (before base64) one `run_code` result carries.
pub const MAX_IMAGE_BYTES_PER_RESULT: usize = 16 * 1024 * 1024;

/// Most rich results (`display()` calls, figures) one `run_code` result
/// carries, besides the cell's value; the rest are dropped and counted, and
/// the result's text says how many. (Each result's text/plain and text/html
/// are cut at the per-stream output cap, with a note.)
pub const MAX_RESULTS_PER_CALL: u64 = 64;
/// Most rich-result bytes (all representations together, before base64) one
/// `run_code` call keeps on the host.
pub const MAX_RESULT_BYTES_PER_CALL: u64 = 24 * 1024 * 1024;

fn timeout_of(timeout_s: Option<u64>) -> Result<Duration, ToolError> {
    match timeout_s.unwrap_or(DEFAULT_TIMEOUT_S) {
        0 => Err(ToolError::BadParameter("timeout_s must be at least 1".into())),
        t if t > MAX_TIMEOUT_S => Err(ToolError::BadParameter(format!(
            "timeout_s={t} is over the limit of {MAX_TIMEOUT_S}; for longer jobs use run_command with background=true"
        ))),
        t => Ok(Duration::from_secs(t)),
    }
}

fn check_len(what: &str, text: &str) -> Result<(), ToolError> {
    if text.len() > MAX_CODE_BYTES {
        return Err(ToolError::BadParameter(format!(
            "{what} is {} bytes, over the limit of {MAX_CODE_BYTES}; write it to a file with write_file and run that",
            text.len()
        )));
    }
    Ok(())
}

fn ms(us: u64) -> u64 {
    us / 1000
}

/// The image MIME type of `bytes`, from their magic number.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// Progress and output notifications of one call.
struct Notifier<'a> {
    context: &'a RequestContext<RoleServer>,
    server: &'a CapsuleMcp,
    sandbox: String,
    started: Instant,
    ticks: u32,
    logged_bytes: u64,
}

impl<'a> Notifier<'a> {
    async fn progress(&mut self, bytes_so_far: u64) {
        let Some(token) = self.context.meta.get_progress_token() else { return };
        self.ticks += 1;
        let message = format!(
            "running for {:.0} s in {}, {bytes_so_far} bytes of output so far",
            self.started.elapsed().as_secs_f64(),
            self.sandbox
        );
        let param = ProgressNotificationParam::new(token, f64::from(self.ticks)).with_message(message);
        let _ = self.context.peer.notify_progress(param).await;
    }

    async fn output(&mut self, event: &Event) {
        if let Event::Output { stream, data } = event {
            if self.logged_bytes >= MAX_LOGGED_OUTPUT_BYTES {
                return;
            }
            self.logged_bytes += data.len() as u64;
            let name = match stream {
                proto::Stream::Stdout => "stdout",
                proto::Stream::Stderr => "stderr",
            };
            self.server
                .log_output(
                    &self.context.peer,
                    serde_json::json!({
                        "sandbox_id": self.sandbox,
                        "stream": name,
                        "text": String::from_utf8_lossy(data),
                    }),
                )
                .await;
        }
    }
}

/// Drives a streaming guest call: forwards output, sends progress, honours
/// MCP cancellation, and returns the final step.
async fn drive(
    call: &mut GuestCall,
    notifier: &mut Notifier<'_>,
    mut on_event: impl FnMut(&Event),
) -> Result<Reply, GuestError> {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    let mut seen_bytes = 0u64;
    let deadline = call.wall_limit().map(|l| tokio::time::Instant::now() + l);
    let mut cancelled = false;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            step = call.next() => match step {
                Step::Event(e) => {
                    if let Event::Output { data, .. } = &e {
                        seen_bytes += data.len() as u64;
                    }
                    notifier.output(&e).await;
                    on_event(&e);
                }
                Step::Done(reply) => return Ok(reply),
                Step::Failed(e) => return Err(e),
            },
            _ = tick.tick() => notifier.progress(seen_bytes).await,
            _ = notifier.context.ct.cancelled(), if !cancelled => {
                cancelled = true;
                call.cancel();
            }
            _ = sleep => return Err(GuestError::NoReply(call.wall_limit().unwrap_or_default())),
        }
    }
}

impl CapsuleMcp {
    async fn lease(&self, sandbox_id: Option<&str>) -> Result<Lease, ToolError> {
        Ok(self.manager.acquire(&self.owner, sandbox_id).await?)
    }

    /// Turns a guest failure into a tool error; a lost connection is checked
    /// with the manager (a crashed guest is marked failed and says state is lost).
    async fn guest_error(&self, lease: &Lease, what: &str, e: GuestError) -> ToolError {
        if e.is_lost() {
            return ToolError::Manager(self.manager.agent_lost(&lease.id, &e.to_string()).await);
        }
        let hint = hint_for(e.agent_kind()).to_string();
        ToolError::Guest { what: what.to_string(), sandbox: lease.id.clone(), cause: e, hint }
    }

    async fn quick(&self, lease: &Lease, what: &str, op: Op) -> Result<Reply, ToolError> {
        match guest::call(&lease.client, op, QUICK_OP_TIMEOUT).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.guest_error(lease, what, e).await),
        }
    }

    /// Runs a streaming guest call (as [`GuestCall::start`] returned it) to its
    /// end (see [`drive`]): `on_event` sees every event. Returns the final reply
    /// and what the guest dropped over the call's budget.
    async fn streamed(
        &self,
        lease: &Lease,
        what: &str,
        started: Result<GuestCall, GuestError>,
        context: &RequestContext<RoleServer>,
        on_event: impl FnMut(&Event),
    ) -> Result<(Reply, Overflow), ToolError> {
        let mut call = match started {
            Ok(c) => c,
            Err(e) => return Err(self.guest_error(lease, what, e).await),
        };
        let mut notifier = Notifier {
            context,
            server: self,
            sandbox: lease.id.clone(),
            started: Instant::now(),
            ticks: 0,
            logged_bytes: 0,
        };
        match drive(&mut call, &mut notifier, on_event).await {
            Ok(reply) => Ok((reply, call.overflow())),
            Err(e) => Err(self.guest_error(lease, what, e).await),
        }
    }

    fn unexpected(lease: &Lease, what: &str, reply: Reply) -> ToolError {
        ToolError::Guest {
            what: what.into(),
            sandbox: lease.id.clone(),
            cause: GuestError::Unexpected(format!("{reply:?}")),
            hint: String::new(),
        }
    }

    pub(super) async fn run_code(
        &self,
        p: RunCodeParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        check_len("code", &p.code)?;
        let timeout = timeout_of(p.timeout_s)?;
        let language = p.language.unwrap_or_default();
        let context_name = p.context.clone().unwrap_or_else(|| language.as_str().to_string());
        if context_name.is_empty() || context_name.len() > 64 {
            return Err(ToolError::BadParameter("context must be 1 to 64 characters".into()));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let op = Op::RunCode(RunCodeRequest {
            context: context_name.clone(),
            language: match language {
                Language::Python => proto::Language::Python,
                Language::Javascript => proto::Language::JavaScript,
                Language::Bash => proto::Language::Bash,
            },
            code: p.code,
            output_cap_bytes: Some(self.shaping.output_cap_bytes as u64),
            limits: None,
        });
        let budget = EventBudget {
            output_bytes_per_stream: self.shaping.output_cap_bytes as u64,
            results: MAX_RESULTS_PER_CALL,
            result_bytes: MAX_RESULT_BYTES_PER_CALL,
        };
        let mut output = OutputCollector::new(self.shaping.output_cap_bytes);
        let mut results = Vec::new();
        let mut images = Vec::new();
        let (mut image_bytes, mut images_dropped) = (0usize, 0usize);
        let mut error = None;
        let text_cap = self.shaping.output_cap_bytes;
        let started = GuestCall::start(&lease.client, op, Some(timeout), budget);
        let streamed = self
            .streamed(&lease, "run_code", started, context, |e| {
                if output.on_event(e) {
                    return;
                }
                match e {
                    Event::Result(rich) => {
                        let mut r = CodeResult {
                            text: None,
                            html: None,
                            mime_types: Vec::new(),
                            is_main_result: rich.is_main_result,
                        };
                        for (mime, data) in &rich.data {
                            r.mime_types.push(mime.clone());
                            match mime.as_str() {
                                "text/plain" => {
                                    r.text = Some(cap_text(&String::from_utf8_lossy(data), text_cap, "text/plain"))
                                }
                                "text/html" => {
                                    r.html = Some(cap_text(&String::from_utf8_lossy(data), text_cap, "text/html"))
                                }
                                "image/png" | "image/jpeg" | "image/gif" | "image/webp" => {
                                    if images.len() < MAX_IMAGES_PER_RESULT
                                        && image_bytes + data.len() <= MAX_IMAGE_BYTES_PER_RESULT
                                    {
                                        image_bytes += data.len();
                                        images.push((
                                            base64::engine::general_purpose::STANDARD.encode(data),
                                            mime.clone(),
                                        ));
                                    } else {
                                        images_dropped += 1;
                                    }
                                }
                                _ => {}
                            }
                        }
                        results.push(r);
                    }
                    Event::Error(err) => {
                        error = Some(CodeErrorInfo {
                            name: err.name.clone(),
                            value: err.value.clone(),
                            traceback: err.traceback.join("\n"),
                        })
                    }
                    _ => {}
                }
            })
            .await;
        let (reply, dropped) = streamed?;
        let outcome = match reply {
            Reply::CodeDone(o) => o,
            other => return Err(Self::unexpected(&lease, "run_code", other)),
        };
        output.count_dropped(dropped.stdout_bytes, dropped.stderr_bytes);
        let result = RunCodeResult {
            sandbox_id: lease.id.clone(),
            context: context_name,
            stdout: output.stdout.text(),
            stderr: output.stderr.text(),
            results,
            error,
            execution_count: outcome.execution_count,
            duration_ms: ms(outcome.duration_us),
            timed_out: outcome.timed_out,
            context_restarted: outcome.context_restarted,
            exit_code: outcome.exit_code,
            truncated: output.truncations(None, None),
            results_left_out: dropped.results,
            images_left_out: images_dropped as u64,
        };
        let mut text = String::new();
        push_section(&mut text, None, &result.stdout);
        push_section(&mut text, Some("[stderr]"), &result.stderr);
        for r in result.results.iter().filter(|r| r.is_main_result) {
            if let Some(t) = &r.text {
                push_section(&mut text, Some(&format!("[result {}]", result.execution_count)), t);
            }
        }
        if let Some(err) = &result.error {
            push_section(&mut text, Some("[error]"), &format!("{}: {}\n{}", err.name, err.value, err.traceback));
        }
        for t in &result.truncated {
            push_section(&mut text, None, &truncation_note(t));
        }
        if !images.is_empty() {
            push_section(&mut text, None, &format!("[{} image(s) attached]", images.len()));
        }
        if images_dropped > 0 {
            push_section(&mut text, None, &format!(
                "[{images_dropped} more image(s) left out: a result carries at most {MAX_IMAGES_PER_RESULT} images and {MAX_IMAGE_BYTES_PER_RESULT} bytes of them. Save figures to files (plt.savefig) and read_file the ones you need]"
            ));
        }
        if dropped.results > 0 {
            push_section(&mut text, None, &format!(
                "[{} more result(s) left out ({} bytes): one run_code result carries at most {MAX_RESULTS_PER_CALL} displayed results plus the cell's value, and {MAX_RESULT_BYTES_PER_CALL} bytes of them. Display less per cell, or save outputs to files and read_file the ones you need]",
                dropped.results, dropped.result_bytes
            ));
        }
        if result.context_restarted {
            push_section(&mut text, None, "[the interpreter restarted: variables and imports of this context were lost; run the setup cells again]");
        }
        if result.timed_out {
            push_section(&mut text, None, &format!(
                "[timed out after {} s: the cell was interrupted; the output above is partial. Make it faster, raise timeout_s (at most {MAX_TIMEOUT_S}), or run long jobs with run_command background=true]",
                timeout.as_secs()
            ));
        }
        let is_error = result.timed_out;
        Ok(tool_result(&result, text, images, is_error))
    }

    pub(super) async fn run_command(
        &self,
        p: RunCommandParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        check_len("command", &p.command)?;
        if p.command.trim().is_empty() {
            return Err(ToolError::BadParameter("command is empty".into()));
        }
        let timeout = timeout_of(p.timeout_s)?;
        let background = p.background.unwrap_or(false);
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let mut env: BTreeMap<String, String> = lease.env.clone();
        env.extend(p.env.unwrap_or_default());
        let op = Op::Exec(ExecRequest {
            command: Command::Shell(p.command),
            cwd: p.cwd,
            env: env.into_iter().collect(),
            stdin: p.stdin.map(String::into_bytes),
            background,
            output_cap_bytes: Some(self.shaping.output_cap_bytes as u64),
            limits: None,
            pty: None,
        });
        if background {
            return match self.quick(&lease, "run_command", op).await? {
                Reply::Started { pid } => {
                    let result = RunCommandResult {
                        sandbox_id: lease.id.clone(),
                        pid: Some(pid),
                        exit_code: None,
                        signal: None,
                        stdout: String::new(),
                        stderr: String::new(),
                        duration_ms: 0,
                        timed_out: false,
                        truncated: Vec::new(),
                    };
                    let text = format!(
                        "Started in the background as process {pid} in sandbox {}. Read its output with read_process pid={pid}; stop it with kill_process pid={pid}.",
                        lease.id
                    );
                    Ok(tool_result(&result, text, Vec::new(), false))
                }
                other => Err(Self::unexpected(&lease, "run_command", other)),
            };
        }
        let budget =
            EventBudget { output_bytes_per_stream: self.shaping.output_cap_bytes as u64, ..EventBudget::NOTHING };
        let mut output = OutputCollector::new(self.shaping.output_cap_bytes);
        let started = GuestCall::start(&lease.client, op, Some(timeout), budget);
        let (reply, dropped) = self
            .streamed(&lease, "run_command", started, context, |e| {
                output.on_event(e);
            })
            .await?;
        let status = match reply {
            Reply::Exit(status) => status,
            other => return Err(Self::unexpected(&lease, "run_command", other)),
        };
        output.count_dropped(dropped.stdout_bytes, dropped.stderr_bytes);
        let result = RunCommandResult {
            sandbox_id: lease.id.clone(),
            pid: None,
            exit_code: status.code,
            signal: status.signal,
            stdout: output.stdout.text(),
            stderr: output.stderr.text(),
            duration_ms: ms(status.duration_us),
            timed_out: status.timed_out,
            truncated: output.truncations(Some(status.stdout_bytes), Some(status.stderr_bytes)),
        };
        let mut text = String::new();
        push_section(&mut text, None, &result.stdout);
        push_section(&mut text, Some("[stderr]"), &result.stderr);
        for t in &result.truncated {
            push_section(&mut text, None, &truncation_note(t));
        }
        let ending = if status.timed_out {
            format!(
                "[timed out after {} s: the command was killed; the output above is partial. Raise timeout_s (at most {MAX_TIMEOUT_S}) or run it with background=true and poll read_process]",
                timeout.as_secs()
            )
        } else {
            match (status.code, status.signal) {
                (Some(code), _) => format!("[exit code {code}, {} ms]", result.duration_ms),
                (None, Some(sig)) => format!("[killed by signal {sig}, {} ms]", result.duration_ms),
                (None, None) => format!("[ended, {} ms]", result.duration_ms),
            }
        };
        push_section(&mut text, None, &ending);
        Ok(tool_result(&result, text, Vec::new(), status.timed_out))
    }

    pub(super) async fn read_process(&self, p: ReadProcessParams) -> Result<CallToolResult, ToolError> {
        let max_bytes = p.max_bytes.unwrap_or(DEFAULT_PROCESS_READ_BYTES).clamp(1, MAX_READ_LIMIT_BYTES);
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let op = Op::ReadProcessOutput {
            pid: p.pid,
            stdout_offset: p.stdout_offset.unwrap_or(0),
            stderr_offset: p.stderr_offset.unwrap_or(0),
            max_bytes,
        };
        let out = match self.quick(&lease, "read_process", op).await? {
            Reply::ProcessOutput(out) => out,
            other => return Err(Self::unexpected(&lease, "read_process", other)),
        };
        let result = ReadProcessResult {
            sandbox_id: lease.id.clone(),
            pid: p.pid,
            running: out.exit.is_none(),
            exit_code: out.exit.as_ref().and_then(|e| e.code),
            signal: out.exit.as_ref().and_then(|e| e.signal),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            next_stdout_offset: out.next_stdout_offset,
            next_stderr_offset: out.next_stderr_offset,
        };
        let mut text = String::new();
        push_section(&mut text, None, &result.stdout);
        push_section(&mut text, Some("[stderr]"), &result.stderr);
        let status = match (&out.exit, result.exit_code, result.signal) {
            (None, _, _) => format!(
                "[process {} is running; next offsets: stdout {}, stderr {}]",
                p.pid, result.next_stdout_offset, result.next_stderr_offset
            ),
            (Some(_), Some(code), _) => format!("[process {} exited with code {code}]", p.pid),
            (Some(_), None, Some(sig)) => format!("[process {} was killed by signal {sig}]", p.pid),
            (Some(_), None, None) => format!("[process {} ended]", p.pid),
        };
        push_section(&mut text, None, &status);
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn kill_process(&self, p: KillProcessParams) -> Result<CallToolResult, ToolError> {
        let signal = p.signal.unwrap_or(9);
        if !(1..=64).contains(&signal) {
            return Err(ToolError::BadParameter(format!("signal={signal} is not a signal number (1 to 64)")));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        self.quick(&lease, "kill_process", Op::Signal { pid: p.pid, signal }).await?;
        let result = KillProcessResult { sandbox_id: lease.id.clone(), pid: p.pid, signal };
        let text = format!("Sent signal {signal} to process {} in sandbox {}.", p.pid, lease.id);
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn write_file(&self, p: WriteFileParams) -> Result<CallToolResult, ToolError> {
        let data = match p.encoding.unwrap_or_default() {
            ContentEncoding::Text => p.content.into_bytes(),
            ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| ToolError::BadParameter(format!("content is not valid base64 ({e})")))?,
        };
        if data.len() as u64 > MAX_WRITE_BYTES {
            return Err(ToolError::BadParameter(format!(
                "content is {} bytes, over the limit of {MAX_WRITE_BYTES} per call; write it in parts with append=true",
                data.len()
            )));
        }
        let mode = match &p.mode {
            None => None,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o7777 => Some(v),
                _ => {
                    return Err(ToolError::BadParameter(format!(
                        "mode {m:?} is not octal permission bits such as \"644\" or \"755\""
                    )))
                }
            },
        };
        if p.path.is_empty() {
            return Err(ToolError::BadParameter("path is empty".into()));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let append = p.append.unwrap_or(false);
        let mut chunks: Vec<&[u8]> = data.chunks(proto::MAX_FILE_CHUNK_BYTES).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let position = if i == 0 && !append { WritePosition::Truncate } else { WritePosition::Append };
            let op = Op::WriteFile(WriteFileRequest {
                path: p.path.clone(),
                position,
                data: chunk.to_vec(),
                mode,
                create_parents: true,
            });
            self.quick(&lease, "write_file", op).await?;
        }
        let result =
            WriteFileResult { sandbox_id: lease.id.clone(), path: p.path.clone(), bytes_written: data.len() as u64 };
        let text = format!("Wrote {} bytes to {} in sandbox {}.", data.len(), p.path, lease.id);
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn read_file(&self, p: ReadFileParams) -> Result<CallToolResult, ToolError> {
        let offset = p.offset.unwrap_or(0);
        let limit = p.limit.unwrap_or(DEFAULT_READ_LIMIT_BYTES);
        if limit == 0 || limit > MAX_READ_LIMIT_BYTES {
            return Err(ToolError::BadParameter(format!(
                "limit={limit} is out of range: use 1 to {MAX_READ_LIMIT_BYTES}"
            )));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let op = Op::ReadFile { path: p.path.clone(), offset, length: limit };
        let (data, size) = match self.quick(&lease, "read_file", op).await? {
            Reply::FileData { data, size } => (data, size),
            other => return Err(Self::unexpected(&lease, "read_file", other)),
        };
        let mut bytes_read = data.len() as u64;
        let mut images = Vec::new();
        let (encoding, content, mime_type) =
            if let (Some(mime), true) = (sniff_image(&data), offset == 0 && bytes_read == size) {
                images.push((base64::engine::general_purpose::STANDARD.encode(&data), mime.to_string()));
                ("image", None, Some(mime.to_string()))
            } else {
                match text_prefix(&data) {
                    Some(text) => {
                        bytes_read = text.len() as u64;
                        ("text", Some(text.to_string()), None)
                    }
                    None => ("base64", Some(base64::engine::general_purpose::STANDARD.encode(&data)), None),
                }
            };
        let next_offset = offset + bytes_read;
        let result = ReadFileResult {
            sandbox_id: lease.id.clone(),
            path: p.path.clone(),
            size,
            offset,
            bytes_read,
            encoding: encoding.to_string(),
            content: content.clone(),
            mime_type,
            has_more: next_offset < size,
            next_offset,
        };
        let mut text = match encoding {
            "image" => format!("{} is an image ({} bytes); it is attached.", p.path, size),
            "base64" => format!(
                "{} is binary; bytes {offset}..{next_offset} of {size} as base64:\n{}",
                p.path,
                content.unwrap_or_default()
            ),
            _ => content.unwrap_or_default(),
        };
        if result.has_more {
            push_section(
                &mut text,
                None,
                &format!("[showing bytes {offset}..{next_offset} of {size}; read on with offset={next_offset}]"),
            );
        }
        Ok(tool_result(&result, text, images, false))
    }

    pub(super) async fn list_files(&self, p: ListFilesParams) -> Result<CallToolResult, ToolError> {
        let depth = p.depth.unwrap_or(DEFAULT_LIST_DEPTH);
        if depth == 0 || depth > MAX_LIST_DEPTH {
            return Err(ToolError::BadParameter(format!("depth={depth} is out of range: use 1 to {MAX_LIST_DEPTH}")));
        }
        let path = p.path.clone().unwrap_or_else(|| ".".to_string());
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let entries = match self.quick(&lease, "list_files", Op::ListDir { path: path.clone(), depth }).await? {
            Reply::Entries(e) => e,
            other => return Err(Self::unexpected(&lease, "list_files", other)),
        };
        let truncated = entries.len() > MAX_LIST_ENTRIES;
        let entries: Vec<FileEntry> = entries
            .into_iter()
            .take(MAX_LIST_ENTRIES)
            .map(|e| FileEntry {
                path: e.path,
                kind: match e.stat.kind {
                    proto::FileKind::File => FileKind::File,
                    proto::FileKind::Dir => FileKind::Dir,
                    proto::FileKind::Symlink => FileKind::Symlink,
                    proto::FileKind::Other => FileKind::Other,
                },
                size: e.stat.size,
                mode: format!("{:o}", e.stat.mode),
                modified_unix_ms: e.stat.modified_unix_ms,
            })
            .collect();
        let mut text = String::new();
        for e in &entries {
            let suffix = if e.kind == FileKind::Dir { "/" } else { "" };
            text.push_str(&format!("{:>10}  {}  {}{}\n", e.size, e.mode, e.path, suffix));
        }
        if entries.is_empty() {
            text = format!("{path} is empty.");
        }
        if truncated {
            push_section(
                &mut text,
                None,
                &format!(
                    "[only the first {MAX_LIST_ENTRIES} entries shown; list a subdirectory or use a smaller depth]"
                ),
            );
        }
        let result = ListFilesResult { sandbox_id: lease.id.clone(), path, entries, truncated };
        Ok(tool_result(&result, text, Vec::new(), false))
    }
}

/// The data as text, if it is text: valid UTF-8 without NUL bytes, allowing a
/// character cut at the end by the read limit.
fn text_prefix(data: &[u8]) -> Option<&str> {
    if data.contains(&0) {
        return None;
    }
    match std::str::from_utf8(data) {
        Ok(s) => Some(s),
        Err(e) if e.error_len().is_none() && data.len() - e.valid_up_to() < 4 => {
            std::str::from_utf8(&data[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}
