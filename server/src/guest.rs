//! Async calls into a sandbox's guest agent.
//!
//! Wraps the blocking, thread-backed [`AgentClient`] for async callers: a
//! request's frames arrive on a channel ([`GuestCall`]), with a wall-clock
//! guard on top of the agent's own deadline and cancellation on drop. This
//! module knows the protocol, not MCP and not the sandbox lifecycle.

use std::time::Duration;

use capsule_agent::client::{AgentClient, ClientError, Incoming, RequestHandle};
use capsule_agent::protocol::{AgentError, ErrorKind, Event, Op, Reply, Request};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Extra time past a request's own deadline before the host gives up on the agent.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);
/// Deadline of quick operations (files, process queries, signals).
pub const QUICK_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a guest call.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The agent refused or failed the request.
    #[error("{}", .0.message)]
    Agent(#[source] AgentError),
    /// The connection died before the reply (the guest may have crashed).
    #[error("the connection to the sandbox broke: {0}")]
    Lost(String),
    /// No reply within the deadline plus grace.
    #[error("the sandbox did not answer within {0:?}")]
    NoReply(Duration),
    /// The request could not be sent.
    #[error("cannot send the request to the sandbox")]
    Send(#[source] ClientError),
    /// The agent answered with a reply of the wrong kind.
    #[error("unexpected reply from the sandbox agent: {0}")]
    Unexpected(String),
}

impl GuestError {
    /// The agent's error kind, when the agent answered with an error.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            GuestError::Agent(e) => Some(e.kind),
            _ => None,
        }
    }

    /// Whether the connection (and maybe the guest) is gone.
    pub fn is_lost(&self) -> bool {
        matches!(self, GuestError::Lost(_) | GuestError::NoReply(_))
            || matches!(self, GuestError::Send(ClientError::Disconnected(_)))
    }
}

/// One request in flight. Dropping it before the end cancels the request.
#[derive(Debug)]
pub struct GuestCall {
    rx: UnboundedReceiver<Incoming>,
    handle: RequestHandle,
    finished: bool,
    wall_limit: Option<Duration>,
}

impl GuestCall {
    /// Starts `op` with the agent-side deadline `timeout`.
    pub fn start(client: &AgentClient, op: Op, timeout: Option<Duration>) -> Result<GuestCall, GuestError> {
        let (tx, rx) = unbounded_channel();
        let request = Request { timeout_ms: timeout.map(|t| t.as_millis().try_into().unwrap_or(u64::MAX)), op };
        let handle = client
            .start(request, Box::new(move |incoming| drop(tx.send(incoming))))
            .map_err(GuestError::Send)?;
        Ok(GuestCall { rx, handle, finished: false, wall_limit: timeout.map(|t| t + REPLY_GRACE) })
    }

    /// How long the host waits in all (the agent's deadline plus grace), if bounded.
    pub fn wall_limit(&self) -> Option<Duration> {
        self.wall_limit
    }

    /// The next step: events in order, then exactly one `Done` or `Failed`.
    pub async fn next(&mut self) -> Step {
        if self.finished {
            return Step::Failed(GuestError::Lost("request already finished".into()));
        }
        let step = match self.rx.recv().await {
            Some(Incoming::Event(e)) => return Step::Event(e),
            Some(Incoming::Done(reply)) => Step::Done(reply),
            Some(Incoming::Failed(e)) => Step::Failed(GuestError::Agent(e)),
            Some(Incoming::Disconnected(why)) => Step::Failed(GuestError::Lost(why)),
            None => Step::Failed(GuestError::Lost("the client dropped the request".into())),
        };
        self.finished = true;
        step
    }

    /// Asks the agent to cancel (the final frame still arrives).
    pub fn cancel(&self) {
        let _ = self.handle.cancel();
    }
}

impl Drop for GuestCall {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.handle.cancel();
        }
    }
}

/// One step of a [`GuestCall`].
#[derive(Debug)]
pub enum Step {
    /// An intermediate event.
    Event(Event),
    /// The final reply.
    Done(Reply),
    /// The request failed.
    Failed(GuestError),
}

/// Runs a quick request to its end, ignoring events.
pub async fn call(client: &AgentClient, op: Op, timeout: Duration) -> Result<Reply, GuestError> {
    let mut call = GuestCall::start(client, op, Some(timeout))?;
    let limit = timeout + REPLY_GRACE;
    let run = async {
        loop {
            match call.next().await {
                Step::Event(_) => continue,
                Step::Done(reply) => return Ok(reply),
                Step::Failed(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(limit, run).await {
        Ok(result) => result,
        Err(_) => Err(GuestError::NoReply(limit)),
    }
}
