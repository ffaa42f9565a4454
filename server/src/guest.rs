//! Async calls into a sandbox's guest agent.
//!
//! Wraps the blocking, thread-backed [`AgentClient`] for async callers: a
//! request's frames arrive on a channel ([`GuestCall`]), with a wall-clock
//! guard on top of the agent's own deadline and cancellation on drop. This
//! module knows the protocol, not MCP and not the sandbox lifecycle.
//!
//! The guest is hostile: what one call buffers on the host is bounded by its
//! [`EventBudget`]. Events past the budget are dropped on the connection's
//! reader thread and only counted ([`Overflow`]), so a guest that ignores the
//! output cap it was given cannot grow the host's memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_agent::client::{AgentClient, ClientError, Incoming, RequestHandle};
use capsule_agent::protocol::{AgentError, ErrorKind, Event, Op, Reply, Request, Stream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Extra time past a request's own deadline before the host gives up on the agent.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);
/// Deadline of quick operations (files, process queries, signals).
pub const QUICK_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most events other than output and rich results (errors, truncation
/// notices) one call forwards; an honest cell sends one or two.
pub const MAX_OTHER_EVENTS_PER_CALL: u64 = 16;
/// Most bytes of those other events (an error's name, value and traceback; a
/// truncation notice's path) one call forwards. The agent bounds an error at
/// 320 KiB.
pub const MAX_OTHER_EVENT_BYTES_PER_CALL: u64 = 1024 * 1024;

/// What one call forwards of the guest's events; the rest is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventBudget {
    /// Most output bytes forwarded per stream (the agent stops streaming at
    /// the cap it was given; a hostile one may not).
    pub output_bytes_per_stream: u64,
    /// Most rich results forwarded (the cell's first main result comes on top).
    pub results: u64,
    /// Most rich-result bytes (all representations together) forwarded.
    pub result_bytes: u64,
}

impl EventBudget {
    /// Forwards nothing but the final frame (for calls that ignore events).
    pub const NOTHING: EventBudget = EventBudget { output_bytes_per_stream: 0, results: 0, result_bytes: 0 };
}

/// What a call's [`EventBudget`] left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overflow {
    /// Stdout bytes dropped.
    pub stdout_bytes: u64,
    /// Stderr bytes dropped.
    pub stderr_bytes: u64,
    /// Rich results dropped.
    pub results: u64,
    /// Bytes of the rich results dropped.
    pub result_bytes: u64,
    /// Other events dropped.
    pub other_events: u64,
}

/// The budget's books for one call, kept by the sink on the reader thread.
#[derive(Debug, Default)]
struct Gate {
    budget: EventBudget,
    stdout_bytes: u64,
    stderr_bytes: u64,
    results: u64,
    main_results: u64,
    result_bytes: u64,
    other_events: u64,
    other_event_bytes: u64,
    dropped: Overflow,
}

impl Gate {
    /// Whether `event` is forwarded; charges it to the budget or counts it as
    /// dropped. Output is cut to what is left of its stream's budget.
    fn admit(&mut self, event: &mut Event) -> bool {
        match event {
            Event::Output { stream, data } => {
                let (sent, dropped) = match stream {
                    Stream::Stdout => (&mut self.stdout_bytes, &mut self.dropped.stdout_bytes),
                    Stream::Stderr => (&mut self.stderr_bytes, &mut self.dropped.stderr_bytes),
                };
                let room = self.budget.output_bytes_per_stream.saturating_sub(*sent);
                let keep = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                *dropped += (data.len() - keep) as u64;
                *sent += keep as u64;
                data.truncate(keep);
                keep > 0
            }
            Event::Result(rich) => {
                let len: u64 = rich.data.iter().map(|(mime, data)| (mime.len() + data.len()) as u64).sum();
                let counted = if rich.is_main_result && self.main_results == 0 {
                    true
                } else {
                    self.results < self.budget.results
                };
                if counted && self.result_bytes + len <= self.budget.result_bytes {
                    self.result_bytes += len;
                    if rich.is_main_result && self.main_results == 0 {
                        self.main_results += 1;
                    } else {
                        self.results += 1;
                    }
                    true
                } else {
                    self.dropped.results += 1;
                    self.dropped.result_bytes += len;
                    false
                }
            }
            Event::Error(_) | Event::Truncated { .. } => {
                let len = match event {
                    Event::Error(e) => {
                        e.name.len() + e.value.len() + e.traceback.iter().map(String::len).sum::<usize>()
                    }
                    Event::Truncated { path, .. } => path.len(),
                    _ => 0,
                } as u64;
                if self.other_events < MAX_OTHER_EVENTS_PER_CALL
                    && self.other_event_bytes + len <= MAX_OTHER_EVENT_BYTES_PER_CALL
                {
                    self.other_events += 1;
                    self.other_event_bytes += len;
                    true
                } else {
                    self.dropped.other_events += 1;
                    false
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    /// The agent answered no liveness ping for this long while a call ran.
    #[error("the sandbox's agent stopped answering (no answer to a liveness ping for {} s)", .0.as_secs())]
    Silent(Duration),
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
        matches!(self, GuestError::Lost(_)) || matches!(self, GuestError::Send(ClientError::Disconnected(_)))
    }
}

/// One request in flight. Dropping it before the end cancels the request.
#[derive(Debug)]
pub struct GuestCall {
    rx: UnboundedReceiver<Incoming>,
    handle: RequestHandle,
    finished: bool,
    wall_limit: Option<Duration>,
    gate: Arc<Mutex<Gate>>,
}

impl GuestCall {
    /// Starts `op` with the agent-side deadline `timeout`, forwarding at most
    /// `budget` of its events (the channel holds no more than that).
    pub fn start(
        client: &AgentClient,
        op: Op,
        timeout: Option<Duration>,
        budget: EventBudget,
    ) -> Result<GuestCall, GuestError> {
        let (tx, rx) = unbounded_channel();
        let gate = Arc::new(Mutex::new(Gate { budget, ..Gate::default() }));
        let sink_gate = gate.clone();
        let request = Request { timeout_ms: timeout.map(|t| t.as_millis().try_into().unwrap_or(u64::MAX)), op };
        let sink = move |mut incoming: Incoming| {
            if let Incoming::Event(event) = &mut incoming {
                if !lock(&sink_gate).admit(event) {
                    return;
                }
            }
            drop(tx.send(incoming));
        };
        let handle = client.start(request, Box::new(sink)).map_err(GuestError::Send)?;
        Ok(GuestCall { rx, handle, finished: false, wall_limit: timeout.map(|t| t + REPLY_GRACE), gate })
    }

    /// What the budget has left out so far.
    pub fn overflow(&self) -> Overflow {
        lock(&self.gate).dropped
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

/// How often a call in flight checks that the agent still answers.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(5);
/// How long one liveness ping may take before it counts as missed.
pub const LIVENESS_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Missed pings in a row after which the agent counts as silent.
pub const LIVENESS_MISSES: u32 = 2;
/// How long a call on an unresponsive sandbox waits for its agent's answer to a ping.
pub const UNRESPONSIVE_RECHECK: Duration = Duration::from_secs(3);

/// When an agent counts as silent: pinged every `every`, a ping unanswered after
/// `ping_timeout` is missed, and `misses` missed in a row make it silent. `recheck` is how long
/// a later call waits for a ping's answer before it fails fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTimings {
    /// Time between pings.
    pub every: Duration,
    /// How long one ping may take.
    pub ping_timeout: Duration,
    /// Missed pings in a row that make the agent silent.
    pub misses: u32,
    /// How long a call on an unresponsive sandbox waits for a ping's answer.
    pub recheck: Duration,
}

impl Default for LivenessTimings {
    fn default() -> Self {
        Self {
            every: LIVENESS_EVERY,
            ping_timeout: LIVENESS_PING_TIMEOUT,
            misses: LIVENESS_MISSES,
            recheck: UNRESPONSIVE_RECHECK,
        }
    }
}

/// The liveness watch of one call: pings the agent every [`LivenessTimings::every`] while the
/// call runs and says when [`LivenessTimings::misses`] pings in a row went unanswered. With the
/// defaults a hung agent is found in about half a minute, not at the end of the call's own (up
/// to an hour long) deadline.
#[derive(Debug)]
pub struct Liveness {
    client: AgentClient,
    timings: LivenessTimings,
    next_at: tokio::time::Instant,
    ping: Option<tokio::task::JoinHandle<bool>>,
    misses: u32,
    silent_since: Option<tokio::time::Instant>,
}

impl Liveness {
    /// A watch over the agent behind `client`; its first ping goes out after `timings.every`.
    pub fn new(client: &AgentClient, timings: LivenessTimings) -> Self {
        Self {
            client: client.clone(),
            timings,
            next_at: tokio::time::Instant::now() + timings.every,
            ping: None,
            misses: 0,
            silent_since: None,
        }
    }

    /// Resolves once the agent counts as silent, with how long it has been. Cancel-safe: it may
    /// be polled in a `select!` that drops it at every other event.
    pub async fn silent(&mut self) -> Duration {
        loop {
            match &mut self.ping {
                None => {
                    tokio::time::sleep_until(self.next_at).await;
                    let client = self.client.clone();
                    let within = self.timings.ping_timeout;
                    self.ping = Some(tokio::spawn(async move {
                        let ping = call(&client, Op::Ping, within);
                        matches!(tokio::time::timeout(within, ping).await, Ok(Ok(Reply::Pong)))
                    }));
                }
                Some(ping) => {
                    let sent = self.next_at;
                    let answered = ping.await.unwrap_or(false);
                    self.ping = None;
                    self.next_at = tokio::time::Instant::now() + self.timings.every;
                    if answered {
                        self.misses = 0;
                        self.silent_since = None;
                        continue;
                    }
                    self.misses += 1;
                    let since = *self.silent_since.get_or_insert(sent);
                    if self.misses >= self.timings.misses {
                        return since.elapsed();
                    }
                }
            }
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        if let Some(ping) = self.ping.take() {
            ping.abort();
        }
    }
}

/// Runs `op` (a quick request) to its end like [`call`], and fails it with
/// [`GuestError::Silent`] as soon as the agent stops answering pings.
pub async fn watched_call(
    client: &AgentClient,
    op: Op,
    timeout: Duration,
    timings: LivenessTimings,
) -> Result<Reply, GuestError> {
    let mut liveness = Liveness::new(client, timings);
    tokio::select! {
        result = call(client, op, timeout) => result,
        silent = liveness.silent() => Err(GuestError::Silent(silent)),
    }
}

/// Runs a quick request to its end, ignoring events.
pub async fn call(client: &AgentClient, op: Op, timeout: Duration) -> Result<Reply, GuestError> {
    let mut call = GuestCall::start(client, op, Some(timeout), EventBudget::NOTHING)?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use capsule_agent::frame::{read_frame, write_frame};
    use capsule_agent::protocol::{
        AgentFrame, AgentMessage, ClientFrame, ClientMessage, CodeError, ExitStatus, HelloReply, RichResult,
        PROTOCOL_VERSION,
    };

    use super::*;

    /// A hostile agent on the other end of a real socket: it answers the
    /// handshake, then floods the first request with output and results far
    /// past any cap before it ends it.
    fn flooding_agent(mut stream: UnixStream) {
        let _hello: Option<ClientFrame> = read_frame(&mut stream).expect("hello");
        let reply = HelloReply {
            version: PROTOCOL_VERSION,
            agent_version: "hostile".into(),
            capabilities: vec![],
            pid1: false,
            containment: None,
        };
        write_frame(&mut stream, &AgentFrame { id: 0, body: AgentMessage::Hello(reply) }).expect("hello reply");
        let request: ClientFrame = read_frame(&mut stream).expect("request").expect("a request");
        assert!(matches!(request.body, ClientMessage::Request(_)));
        let send = |stream: &mut UnixStream, event: Event| {
            write_frame(stream, &AgentFrame { id: request.id, body: AgentMessage::Event(event) }).expect("event");
        };
        for _ in 0..2000 {
            send(&mut stream, Event::Output { stream: Stream::Stdout, data: vec![b'x'; 1001] });
            send(&mut stream, Event::Output { stream: Stream::Stderr, data: vec![b'y'; 10] });
            send(
                &mut stream,
                Event::Result(RichResult { data: vec![("text/plain".into(), vec![b'r'; 90])], is_main_result: false }),
            );
            send(&mut stream, Event::Error(CodeError { name: "E".into(), value: "v".into(), traceback: vec![] }));
        }
        let done = ExitStatus {
            code: Some(0),
            signal: None,
            duration_us: 1,
            timed_out: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            limit: None,
            escaped_killed: 0,
        };
        write_frame(&mut stream, &AgentFrame { id: request.id, body: AgentMessage::Done(Reply::Exit(done)) })
            .expect("done");
        // Keep the stream open until the host has read everything.
        let _: Result<Option<ClientFrame>, _> = read_frame(&mut stream);
    }

    #[tokio::test]
    async fn a_guest_flooding_past_the_budget_is_dropped_and_counted_not_buffered() {
        let (host, guest) = UnixStream::pair().expect("socketpair");
        let agent = std::thread::spawn(move || flooding_agent(guest));
        let (client, _) = AgentClient::handshake(host, "test").expect("handshake");
        let budget = EventBudget { output_bytes_per_stream: 50_000, results: 100, result_bytes: 1_000_000 };
        let op = Op::Ping;
        let mut call = GuestCall::start(&client, op, Some(Duration::from_secs(30)), budget).expect("start");
        let (mut stdout, mut stderr, mut results, mut errors) = (0u64, 0u64, 0u64, 0u64);
        let reply = loop {
            match call.next().await {
                Step::Event(Event::Output { stream: Stream::Stdout, data }) => stdout += data.len() as u64,
                Step::Event(Event::Output { stream: Stream::Stderr, data }) => stderr += data.len() as u64,
                Step::Event(Event::Result(_)) => results += 1,
                Step::Event(Event::Error(_)) => errors += 1,
                Step::Event(other) => panic!("unexpected {other:?}"),
                Step::Done(reply) => break reply,
                Step::Failed(e) => panic!("failed: {e}"),
            }
        };
        assert!(matches!(reply, Reply::Exit(_)), "the final frame always arrives");
        assert_eq!((stdout, stderr, results, errors), (50_000, 20_000, 100, MAX_OTHER_EVENTS_PER_CALL));
        let dropped = call.overflow();
        assert_eq!(dropped.stdout_bytes, 2_002_000 - 50_000, "the chunk that crosses the cap is cut, the rest counted");
        assert_eq!(dropped.stderr_bytes, 0);
        assert_eq!(dropped.results, 1900);
        assert_eq!(dropped.result_bytes, 1900 * 100);
        assert_eq!(dropped.other_events, 2000 - MAX_OTHER_EVENTS_PER_CALL);
        client.close();
        agent.join().expect("agent thread");
    }

    #[test]
    fn a_first_main_result_passes_the_count_cap_but_not_the_byte_cap() {
        let mut gate = Gate {
            budget: EventBudget { output_bytes_per_stream: 0, results: 0, result_bytes: 10 },
            ..Gate::default()
        };
        let main = |n: usize| Event::Result(RichResult { data: vec![("m".into(), vec![0; n])], is_main_result: true });
        assert!(!gate.admit(&mut main(20)), "over the byte cap");
        assert!(gate.admit(&mut main(5)));
        assert!(!gate.admit(&mut main(1)), "only one main result on top of the count cap");
        assert_eq!(gate.dropped.results, 2);
    }

    #[test]
    fn oversized_errors_are_dropped_by_bytes_not_only_by_count() {
        let mut gate = Gate::default();
        let error = |n: usize| Event::Error(CodeError { name: "E".into(), value: "v".repeat(n), traceback: vec![] });
        assert!(!gate.admit(&mut error(MAX_OTHER_EVENT_BYTES_PER_CALL as usize)));
        assert!(gate.admit(&mut error(10)));
        assert_eq!(gate.dropped.other_events, 1);
    }
}
