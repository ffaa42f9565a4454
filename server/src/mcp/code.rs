//! The `run_code` tool: one cell in a persistent interpreter context, its output, rich
//! results and images shaped into one result.

use base64::Engine as _;
use capsule_agent::protocol::{self as proto, Event, Op, Reply, RunCodeRequest};
use capsule_tool_schemas::{
    CodeErrorInfo, CodeResult, Language, LimitHit, RunCodeParams, RunCodeResult, MAX_TIMEOUT_S,
};
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::RoleServer;

use super::handler::{check_len, ms, timeout_of, wire_limit};
use super::shaping::{cap_text, limit_note, push_section, tool_result, truncation_note, OutputCollector};
use super::tool_error::ToolError;
use super::CapsuleMcp;
use crate::guest::{EventBudget, GuestCall};

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

impl CapsuleMcp {
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
            limits: Self::process_limits(&lease),
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
            limit: wire_limit(outcome.limit),
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
        if let Some(limit) = &result.limit {
            push_section(&mut text, None, &limit_note(limit, "the cell"));
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
        self.push_network_refusals(&mut text, &lease.id);
        let is_error = result.timed_out || matches!(result.limit, Some(LimitHit::Pids { .. }));
        Ok(tool_result(&result, text, images, is_error))
    }
}
