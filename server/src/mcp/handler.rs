//! What every tool call into a guest shares: holding its sandbox, driving the agent request
//! (progress, output notifications, cancellation, the liveness watch), and turning guest
//! failures into what the model reads. The tools themselves are in [`super::code`],
//! [`super::processes`] and [`super::files`].
//!
//! Failures the model should read are [`ToolError`]s, rendered as `isError`
//! results that say what to do next. This module holds no VM logic and no
//! lifecycle logic (that is the manager's).

use std::time::{Duration, Instant};

use capsule_agent::client::AgentClient;
use capsule_agent::protocol::{self as proto, Event, Op, ProcessLimits, Reply};
use capsule_tool_schemas::{LimitHit, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S};
use rmcp::model::ProgressNotificationParam;
use rmcp::service::RequestContext;
use rmcp::RoleServer;

use super::tool_error::{hint_for, ToolError};
use super::CapsuleMcp;
use crate::guest::{self, GuestCall, GuestError, Liveness, LivenessTimings, Overflow, Step, QUICK_OP_TIMEOUT};
use crate::sandbox::health::answers_ping;
use crate::sandbox::Lease;

/// Longest code cell or command line, in bytes.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// How often a long call sends a progress notification.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Most output bytes of one call forwarded as logging notifications (the guest is not trusted to stop).
pub const MAX_LOGGED_OUTPUT_BYTES: u64 = 1024 * 1024;

pub(super) fn timeout_of(timeout_s: Option<u64>) -> Result<Duration, ToolError> {
    match timeout_s.unwrap_or(DEFAULT_TIMEOUT_S) {
        0 => Err(ToolError::BadParameter("timeout_s must be at least 1".into())),
        t if t > MAX_TIMEOUT_S => Err(ToolError::BadParameter(format!(
            "timeout_s={t} is over the limit of {MAX_TIMEOUT_S}; for longer jobs use run_command with background=true"
        ))),
        t => Ok(Duration::from_secs(t)),
    }
}

pub(super) fn check_len(what: &str, text: &str) -> Result<(), ToolError> {
    if text.len() > MAX_CODE_BYTES {
        return Err(ToolError::BadParameter(format!(
            "{what} is {} bytes, over the limit of {MAX_CODE_BYTES}; write it to a file with write_file and run that",
            text.len()
        )));
    }
    Ok(())
}

pub(super) fn ms(us: u64) -> u64 {
    us / 1000
}

/// A limit the agent reports, in the tools' words.
pub(super) fn wire_limit(limit: Option<proto::LimitHit>) -> Option<LimitHit> {
    limit.map(|hit| match hit {
        proto::LimitHit::Pids { max } => LimitHit::Pids { max },
        proto::LimitHit::Memory { max_bytes } => LimitHit::Memory { max_mib: max_bytes / (1024 * 1024) },
    })
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
/// MCP cancellation, watches that the agent still answers, and returns the final step.
async fn drive(
    client: &AgentClient,
    timings: LivenessTimings,
    call: &mut GuestCall,
    notifier: &mut Notifier<'_>,
    mut on_event: impl FnMut(&Event),
) -> Result<Reply, GuestError> {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    let mut seen_bytes = 0u64;
    let deadline = call.wall_limit().map(|l| tokio::time::Instant::now() + l);
    let mut cancelled = false;
    let mut liveness = Liveness::new(client, timings);
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
            silent = liveness.silent() => return Err(GuestError::Silent(silent)),
        }
    }
}

impl CapsuleMcp {
    pub(super) async fn lease(&self, sandbox_id: Option<&str>) -> Result<Lease, ToolError> {
        Ok(self.manager.acquire(&self.owner, sandbox_id).await?)
    }

    /// The limits every command and context of the leased sandbox runs under (none where its
    /// agent cannot enforce them: the test engine's agent runs without cgroups of its own).
    pub(super) fn process_limits(lease: &Lease) -> Option<ProcessLimits> {
        lease.client.containment()?;
        Some(ProcessLimits { pids_max: Some(lease.pids_max), memory_max_bytes: None })
    }

    /// Turns a guest failure into a tool error. A lost connection is checked with the manager
    /// (a crashed guest is rolled back or marked failed); a silent agent marks the sandbox
    /// unresponsive (a request that only ran late, while the agent still answers, is reported
    /// as such).
    pub(super) async fn guest_error(&self, lease: &Lease, what: &str, e: GuestError) -> ToolError {
        if e.is_lost() {
            return ToolError::Manager(self.manager.agent_lost(&lease.id, &e.to_string()).await);
        }
        let silent = match &e {
            GuestError::Silent(_) => true,
            GuestError::NoReply(_) => !answers_ping(&lease.client, lease.liveness.recheck).await,
            _ => false,
        };
        if silent {
            return ToolError::Manager(self.manager.agent_unresponsive(&lease.id, &e.to_string()).await);
        }
        let hint = hint_for(e.agent_kind()).to_string();
        ToolError::Guest { what: what.to_string(), sandbox: lease.id.clone(), cause: e, hint }
    }

    /// Runs a quick request (files, process queries, signals) under the liveness watch.
    pub(super) async fn quick(&self, lease: &Lease, what: &str, op: Op) -> Result<Reply, ToolError> {
        match guest::watched_call(&lease.client, op, QUICK_OP_TIMEOUT, lease.liveness).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.guest_error(lease, what, e).await),
        }
    }

    /// Runs a streaming guest call (as [`GuestCall::start`] returned it) to its
    /// end (see [`drive`]): `on_event` sees every event. Returns the final reply
    /// and what the guest dropped over the call's budget.
    pub(super) async fn streamed(
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
        match drive(&lease.client, lease.liveness, &mut call, &mut notifier, on_event).await {
            Ok(reply) => Ok((reply, call.overflow())),
            Err(e) => Err(self.guest_error(lease, what, e).await),
        }
    }

    pub(super) fn unexpected(lease: &Lease, what: &str, reply: Reply) -> ToolError {
        ToolError::Guest {
            what: what.into(),
            sandbox: lease.id.clone(),
            cause: GuestError::Unexpected(format!("{reply:?}")),
            hint: String::new(),
        }
    }
}
