//! The process tools: `run_command` (foreground, background, on a pseudo-terminal),
//! `read_process`, `write_process` and `kill_process`.
//!
//! Every command runs under its sandbox's process limits; what a limit cost (a stopped fork
//! bomb, an out-of-memory kill, processes left running) is in the result, in words and typed.

use std::collections::BTreeMap;

use capsule_agent::protocol::{Command, ErrorKind, ExecRequest, ExitStatus, Op, PtySize, Reply};
use capsule_tool_schemas::{
    KillProcessParams, KillProcessResult, LimitHit, ReadProcessParams, ReadProcessResult, RunCommandParams,
    RunCommandResult, WriteProcessParams, WriteProcessResult, DEFAULT_PROCESS_READ_BYTES, MAX_PROCESS_INPUT_BYTES,
    MAX_PTY_SIDE, MAX_READ_LIMIT_BYTES, MAX_TIMEOUT_S,
};
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::RoleServer;

use super::handler::{check_len, ms, timeout_of, wire_limit};
use super::shaping::{left_running_note, limit_note, push_section, tool_result, truncation_note, OutputCollector};
use super::tool_error::ToolError;
use super::CapsuleMcp;
use crate::guest::{EventBudget, GuestCall};

/// Rows of a pseudo-terminal unless asked otherwise.
pub const DEFAULT_PTY_ROWS: u16 = 24;
/// Columns of a pseudo-terminal unless asked otherwise.
pub const DEFAULT_PTY_COLS: u16 = 80;

/// The terminal `p` asks for: `None` without `pty`; an error for terminal sizes without
/// `pty`, a terminal without `background`, or a side out of range.
fn pty_of(p: &RunCommandParams) -> Result<Option<PtySize>, ToolError> {
    let bad = |why: String| Err(ToolError::BadParameter(why));
    if !p.pty.unwrap_or(false) {
        if p.rows.is_some() || p.cols.is_some() {
            return bad("rows and cols size a pseudo-terminal: pass them with pty=true".into());
        }
        return Ok(None);
    }
    if !p.background.unwrap_or(false) {
        return bad(
            "pty=true needs background=true: a terminal program is driven with write_process and read_process".into()
        );
    }
    let rows = p.rows.unwrap_or(DEFAULT_PTY_ROWS);
    let cols = p.cols.unwrap_or(DEFAULT_PTY_COLS);
    for (name, side) in [("rows", rows), ("cols", cols)] {
        if side == 0 || side > MAX_PTY_SIDE {
            return bad(format!("{name}={side} is out of range: use 1 to {MAX_PTY_SIDE}"));
        }
    }
    Ok(Some(PtySize { rows, cols }))
}

/// How a finished foreground command reads: its limit, what it left running, how it ended.
fn ending_notes(status: &ExitStatus, timeout_s: u64, duration_ms: u64) -> Vec<String> {
    let mut notes = Vec::new();
    let limit = wire_limit(status.limit);
    if let Some(limit) = &limit {
        notes.push(limit_note(limit, "the command"));
    }
    let stopped_whole = status.timed_out || matches!(limit, Some(LimitHit::Pids { .. }));
    if status.escaped_killed > 0 && !stopped_whole {
        notes.push(left_running_note(status.escaped_killed));
    }
    notes.push(if status.timed_out {
        format!(
            "[timed out after {timeout_s} s: the command was killed; the output above is partial. Raise timeout_s \
             (at most {MAX_TIMEOUT_S}) or run it with background=true and poll read_process]"
        )
    } else {
        match (status.code, status.signal) {
            (Some(code), _) => format!("[exit code {code}, {duration_ms} ms]"),
            (None, Some(sig)) => format!("[killed by signal {sig}, {duration_ms} ms]"),
            (None, None) => format!("[ended, {duration_ms} ms]"),
        }
    });
    notes
}

impl CapsuleMcp {
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
        let pty = pty_of(&p)?;
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
            limits: Self::process_limits(&lease),
            pty,
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
                        limit: None,
                        processes_killed: 0,
                    };
                    let terminal = match pty {
                        Some(size) => format!(" on a {}x{} terminal", size.cols, size.rows),
                        None => String::new(),
                    };
                    let text = format!(
                        "Started in the background as process {pid}{terminal} in sandbox {}. Read its output with \
                         read_process pid={pid}; send it input with write_process pid={pid}; stop it with \
                         kill_process pid={pid}.",
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
            limit: wire_limit(status.limit),
            processes_killed: status.escaped_killed,
        };
        let mut text = String::new();
        push_section(&mut text, None, &result.stdout);
        push_section(&mut text, Some("[stderr]"), &result.stderr);
        for t in &result.truncated {
            push_section(&mut text, None, &truncation_note(t));
        }
        for note in ending_notes(&status, timeout.as_secs(), result.duration_ms) {
            push_section(&mut text, None, &note);
        }
        self.push_network_refusals(&mut text, &lease.id);
        let is_error = status.timed_out || matches!(result.limit, Some(LimitHit::Pids { .. }));
        Ok(tool_result(&result, text, Vec::new(), is_error))
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
            limit: wire_limit(out.exit.as_ref().and_then(|e| e.limit)),
        };
        let mut text = String::new();
        push_section(&mut text, None, &result.stdout);
        push_section(&mut text, Some("[stderr]"), &result.stderr);
        if let Some(limit) = &result.limit {
            push_section(&mut text, None, &limit_note(limit, &format!("process {}", p.pid)));
        }
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

    pub(super) async fn write_process(&self, p: WriteProcessParams) -> Result<CallToolResult, ToolError> {
        if p.input.len() > MAX_PROCESS_INPUT_BYTES {
            return Err(ToolError::BadParameter(format!(
                "input is {} bytes, over the limit of {MAX_PROCESS_INPUT_BYTES} per call; send it in parts, or \
                 write it to a file with write_file and have the process read that",
                p.input.len()
            )));
        }
        let close_stdin = p.close_stdin.unwrap_or(false);
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let bytes = p.input.len();
        let op = Op::WriteProcess { pid: p.pid, data: p.input.into_bytes(), close_stdin };
        let pending_bytes = match self.quick(&lease, "write_process", op).await? {
            Reply::InputQueued { pending_bytes } => pending_bytes,
            other => return Err(Self::unexpected(&lease, "write_process", other)),
        };
        let result = WriteProcessResult { sandbox_id: lease.id.clone(), pid: p.pid, pending_bytes };
        let mut text = format!("Sent {bytes} bytes to process {} in sandbox {}", p.pid, lease.id);
        if close_stdin {
            text.push_str(" and closed its input");
        }
        text.push_str(&format!(
            "; {pending_bytes} bytes are waiting for it to read. Read its answer with read_process pid={}.",
            p.pid
        ));
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn kill_process(&self, p: KillProcessParams) -> Result<CallToolResult, ToolError> {
        let signal = p.signal.unwrap_or(9);
        if !(1..=64).contains(&signal) {
            return Err(ToolError::BadParameter(format!("signal={signal} is not a signal number (1 to 64)")));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        // Killing a process that is gone already is done, not a failure (the tool is idempotent).
        let delivered = match self.quick(&lease, "kill_process", Op::Signal { pid: p.pid, signal }).await {
            Ok(_) => true,
            Err(ToolError::Guest { cause, .. }) if cause.agent_kind() == Some(ErrorKind::NotFound) => false,
            Err(e) => return Err(e),
        };
        let result = KillProcessResult { sandbox_id: lease.id.clone(), pid: p.pid, signal, delivered };
        let text = if delivered {
            format!("Sent signal {signal} to process {} in sandbox {}.", p.pid, lease.id)
        } else {
            format!(
                "Process {} is not running in sandbox {} (it exited already, or there is no such pid); nothing was \
                 signalled. read_process shows how a background process ended.",
                p.pid, lease.id
            )
        };
        Ok(tool_result(&result, text, Vec::new(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(limit: Option<capsule_agent::protocol::LimitHit>, escaped: u32, timed_out: bool) -> ExitStatus {
        ExitStatus {
            code: Some(0),
            signal: None,
            duration_us: 5000,
            timed_out,
            stdout_bytes: 0,
            stderr_bytes: 0,
            limit,
            escaped_killed: escaped,
        }
    }

    #[test]
    fn a_terminal_needs_the_background_and_sides_in_range() {
        let p = |pty, background, rows| RunCommandParams {
            command: "x".into(),
            pty,
            background,
            rows,
            ..Default::default()
        };
        assert_eq!(pty_of(&p(None, None, None)).unwrap(), None);
        assert_eq!(pty_of(&p(Some(true), Some(true), None)).unwrap(), Some(PtySize { rows: 24, cols: 80 }));
        let msg = |r: Result<Option<PtySize>, ToolError>| r.unwrap_err().to_string();
        assert!(msg(pty_of(&p(Some(true), None, None))).contains("pty=true needs background=true"));
        assert!(msg(pty_of(&p(None, Some(true), Some(30)))).contains("pass them with pty=true"));
        assert!(msg(pty_of(&p(Some(true), Some(true), Some(0)))).contains("rows=0 is out of range: use 1 to 1000"));
    }

    #[test]
    fn what_a_command_left_running_is_said_only_when_it_was_not_stopped_whole() {
        use capsule_agent::protocol::LimitHit as Hit;
        let notes = ending_notes(&status(None, 2, false), 60, 5);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].starts_with("[2 process(es) it left running were killed"), "{notes:?}");
        assert_eq!(notes[1], "[exit code 0, 5 ms]");
        let notes = ending_notes(&status(Some(Hit::Pids { max: 64 }), 63, false), 60, 5);
        assert!(notes[0].contains("more than 64 processes"), "{notes:?}");
        assert_eq!(notes.len(), 2, "the processes of a stopped fork bomb are part of the stop: {notes:?}");
        let notes = ending_notes(&status(Some(Hit::Memory { max_bytes: 300 << 20 }), 0, false), 60, 5);
        assert!(notes[0].contains("at 300 MiB (memory limit)"), "{notes:?}");
        let notes = ending_notes(&status(None, 4, true), 60, 5);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("[timed out after 60 s"));
    }
}
