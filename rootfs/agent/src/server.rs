//! The protocol server: connections, the handshake, dispatch of requests to
//! worker threads, cancellation, and the single writer per connection.
//!
//! Each connection has one reader thread (decodes [`ClientFrame`]s), one
//! worker thread per request (from a pool capped at
//! [`MAX_REQUEST_WORKERS`]; past it a request fails with `Busy`), and one
//! writer (a mutex over the stream) that all of them send [`AgentFrame`]s
//! through. `Ping` is answered by the reader itself, so it needs no worker
//! and is answered however busy the agent is. At most [`MAX_CONNECTIONS`]
//! connections are served at once; more are refused at the handshake. A frame that is too big or does
//! not decode, a bad handshake, or a duplicate request id ends THAT
//! connection with a logged reason; the agent keeps serving the others and
//! new ones. When a connection ends, its in-flight requests are cancelled;
//! background processes and language contexts live on (they belong to the
//! [`Agent`], and connections do not survive snapshots).
//!
//! The server never panics on input; a panicking worker becomes
//! `Failed{Internal}` for its request.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::budget::{Protection, MAX_CONNECTIONS, MAX_REQUEST_WORKERS};
use crate::cancel::{CancelToken, StopReason};
use crate::cgroup::CgroupTree;
use crate::context::{Contexts, ContextsConfig};
use crate::files::Files;
use crate::frame::{error_chain, read_frame, write_frame, FrameError};
use crate::lock::lock;
use crate::oserror::error;
use crate::output::CappedOutput;
use crate::process::Processes;
use crate::protocol::{
    capability, AgentError, AgentFrame, AgentMessage, ClientFrame, ClientMessage, CodeError, ErrorKind, Event,
    HelloReply, Op, Reply, Request, RequestId, DEFAULT_OUTPUT_CAP_BYTES, PROTOCOL_VERSION,
};
use crate::system;
use crate::workers::{PoolError, WorkerPool};

/// Pause after a failed `accept`, so a persistent error (EMFILE) cannot spin.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long a refused connection's Hello is waited for (the accept loop waits with it).
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_millis(200);

/// Where the agent works and keeps its files.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Default working directory of commands and base of relative paths.
    pub work_dir: PathBuf,
    /// Where output overflow files, background output and context state go.
    pub state_dir: PathBuf,
    /// Whether the agent is PID 1 of a guest (enables clock, entropy, shutdown).
    pub pid1: bool,
    /// The cgroup v2 directory under which the agent keeps itself (`agent/`)
    /// and its workloads (`workloads/`); `None`: no containment.
    pub cgroup_root: Option<PathBuf>,
    /// What the agent changed about itself (see [`crate::budget::protect_self`]).
    pub protection: Protection,
}

/// The agent: everything that outlives a connection.
pub struct Agent {
    config: AgentConfig,
    processes: Processes,
    files: Files,
    contexts: Contexts,
    workers: WorkerPool,
    cgroups: Option<Arc<CgroupTree>>,
    connections: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("config", &self.config).finish()
    }
}

/// The sending half of one connection, shared by its reader and workers.
struct ConnWriter {
    stream: Mutex<UnixStream>,
    /// Set after the first failed write: the peer is gone, stop trying.
    dead: AtomicBool,
}

impl ConnWriter {
    fn send(&self, frame: &AgentFrame) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let mut stream = lock(&self.stream);
        match write_frame(&mut *stream, frame) {
            Ok(()) => {}
            Err(FrameError::TooLarge { len, max }) => {
                // Only a bug can build such a frame; tell the host rather than drop it silently.
                eprintln!("capsule-agent: refusing to send a {len}-byte frame (cap {max}) for request {}", frame.id);
                let message = format!("a message of {len} bytes exceeds the frame cap of {max} bytes");
                // An event is replaced by an error event (the request goes on);
                // a final frame by a failure (it stays the one final frame).
                let body = match frame.body {
                    AgentMessage::Event(_) => AgentMessage::Event(Event::Error(CodeError {
                        name: "OutputTooLarge".into(),
                        value: message,
                        traceback: Vec::new(),
                    })),
                    _ => AgentMessage::Failed(error(ErrorKind::TooLarge, message)),
                };
                if write_frame(&mut *stream, &AgentFrame { id: frame.id, body }).is_err() {
                    self.dead.store(true, Ordering::Relaxed);
                }
            }
            Err(_) => self.dead.store(true, Ordering::Relaxed),
        }
    }

    fn close(&self) {
        self.dead.store(true, Ordering::Relaxed);
        let _ = lock(&self.stream).shutdown(std::net::Shutdown::Both);
    }
}

/// Sends the frames of one request.
#[derive(Clone)]
struct Responder {
    id: RequestId,
    writer: Arc<ConnWriter>,
}

impl Responder {
    fn event(&self, event: Event) {
        self.writer.send(&AgentFrame { id: self.id, body: AgentMessage::Event(event) });
    }

    fn finish(&self, result: Result<Reply, AgentError>) {
        let body = match result {
            Ok(reply) => AgentMessage::Done(reply),
            Err(e) => AgentMessage::Failed(e),
        };
        self.writer.send(&AgentFrame { id: self.id, body });
    }
}

/// Why a connection ended.
enum ConnEnd {
    PeerClosed,
    Violation(String),
}

impl Agent {
    /// An agent with `config`; creates its working and state directories.
    pub fn new(config: AgentConfig) -> Arc<Agent> {
        for dir in [&config.work_dir, &config.state_dir] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("capsule-agent: cannot create {}: {e}", dir.display());
            }
        }
        let cgroups = config.cgroup_root.as_deref().and_then(|root| match CgroupTree::establish(root) {
            Ok(tree) => {
                if let Some(why) = tree.no_limits_reason() {
                    eprintln!("capsule-agent: commands get their own cgroups but no limits: {why}");
                }
                Some(Arc::new(tree))
            }
            Err(e) => {
                eprintln!("capsule-agent: no containment: {}", error_chain(&e));
                None
            }
        });
        let contexts = Contexts::new(ContextsConfig {
            work_dir: config.work_dir.clone(),
            state_dir: config.state_dir.join("contexts"),
            cgroups: cgroups.clone(),
            protection: config.protection,
            ..ContextsConfig::default()
        });
        Arc::new(Agent {
            processes: Processes::new(&config.work_dir, &config.state_dir, cgroups.clone(), config.protection),
            files: Files::new(&config.work_dir),
            contexts,
            workers: WorkerPool::new(MAX_REQUEST_WORKERS),
            cgroups,
            connections: Arc::default(),
            config,
        })
    }

    /// What the handshake answers.
    pub fn hello_reply(&self) -> HelloReply {
        let mut capabilities = vec![capability::EXEC.to_owned(), capability::FILES.to_owned()];
        capabilities.extend([capability::PYTHON, capability::JAVASCRIPT, capability::BASH].map(str::to_owned));
        capabilities.push(capability::INTERACTIVE.to_owned());
        if self.cgroups.is_some() {
            capabilities.push(capability::CGROUPS.to_owned());
        }
        if self.config.pid1 {
            capabilities.push(capability::CLOCK_AND_ENTROPY.to_owned());
        }
        HelloReply {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities,
            pid1: self.config.pid1,
            containment: self.cgroups.as_ref().and_then(|t| t.policy()).map(|p| p.containment()),
        }
    }

    /// Serves connections from `accept` forever, one thread per connection.
    pub fn serve(self: &Arc<Self>, mut accept: impl FnMut() -> io::Result<UnixStream>) -> ! {
        loop {
            match accept() {
                Ok(stream) => {
                    // Over the cap, refused here: no thread per refused connection.
                    let Some(slot) = ConnectionSlot::take(&self.connections) else {
                        refuse_connection(stream);
                        continue;
                    };
                    let agent = Arc::clone(self);
                    let spawned = std::thread::Builder::new().name("agent-conn".into()).spawn(move || {
                        let _slot = slot;
                        agent.serve_admitted(stream);
                    });
                    if let Err(e) = spawned {
                        eprintln!("capsule-agent: cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("capsule-agent: accept failed: {e}");
                    std::thread::sleep(ACCEPT_RETRY_PAUSE);
                }
            }
        }
    }

    /// Serves one connection until it ends; never panics. Past
    /// [`MAX_CONNECTIONS`] at once, the handshake is answered with `Busy` and
    /// the connection closed.
    pub fn serve_connection(self: &Arc<Self>, stream: UnixStream) {
        match ConnectionSlot::take(&self.connections) {
            Some(_slot) => self.serve_admitted(stream),
            None => refuse_connection(stream),
        }
    }

    /// Serves a connection that holds a slot.
    fn serve_admitted(self: &Arc<Self>, stream: UnixStream) {
        let writer = match stream.try_clone() {
            Ok(w) => Arc::new(ConnWriter { stream: Mutex::new(w), dead: AtomicBool::new(false) }),
            Err(e) => {
                eprintln!("capsule-agent: cannot clone a connection: {e}");
                return;
            }
        };
        let in_flight: Arc<Mutex<HashMap<RequestId, CancelToken>>> = Arc::default();
        let end = self.connection_loop(stream, &writer, &in_flight);
        if let ConnEnd::Violation(reason) = &end {
            eprintln!("capsule-agent: closing a connection: {reason}");
        }
        for token in lock(&in_flight).values() {
            token.cancel();
        }
        writer.close();
    }

    fn connection_loop(
        self: &Arc<Self>,
        mut stream: UnixStream,
        writer: &Arc<ConnWriter>,
        in_flight: &Arc<Mutex<HashMap<RequestId, CancelToken>>>,
    ) -> ConnEnd {
        let protocol_failure = |id: RequestId, message: String| {
            writer.send(&AgentFrame { id, body: AgentMessage::Failed(error(ErrorKind::Protocol, message.clone())) });
            ConnEnd::Violation(message)
        };
        // The handshake.
        match read_frame::<ClientFrame, _>(&mut stream) {
            Ok(None) => return ConnEnd::PeerClosed,
            Err(e) => return ConnEnd::Violation(error_chain(&e)),
            Ok(Some(ClientFrame { id: 0, body: ClientMessage::Hello(hello) })) => {
                if hello.version != PROTOCOL_VERSION {
                    return protocol_failure(
                        0,
                        format!(
                            "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
                            hello.version
                        ),
                    );
                }
                writer.send(&AgentFrame { id: 0, body: AgentMessage::Hello(self.hello_reply()) });
            }
            Ok(Some(other)) => return protocol_failure(other.id, "the first frame must be Hello with id 0".into()),
        }
        loop {
            let frame = match read_frame::<ClientFrame, _>(&mut stream) {
                Ok(Some(frame)) => frame,
                Ok(None) => return ConnEnd::PeerClosed,
                Err(e) => return ConnEnd::Violation(error_chain(&e)),
            };
            match frame.body {
                ClientMessage::Hello(_) => {
                    return protocol_failure(frame.id, "Hello sent twice".into());
                }
                ClientMessage::Cancel => {
                    if let Some(token) = lock(in_flight).get(&frame.id) {
                        token.cancel();
                    }
                }
                ClientMessage::Request(request) => {
                    if frame.id == 0 {
                        return protocol_failure(0, "request id 0 is reserved for the handshake".into());
                    }
                    if matches!(request.op, Op::Ping) {
                        // Answered here: no worker needed, however busy the agent is.
                        writer.send(&AgentFrame { id: frame.id, body: AgentMessage::Done(Reply::Pong) });
                        continue;
                    }
                    let token = CancelToken::with_timeout(request.timeout_ms.map(Duration::from_millis));
                    {
                        let mut map = lock(in_flight);
                        if map.contains_key(&frame.id) {
                            drop(map);
                            return protocol_failure(frame.id, format!("request id {} is already in flight", frame.id));
                        }
                        map.insert(frame.id, token.clone());
                    }
                    let responder = Responder { id: frame.id, writer: Arc::clone(writer) };
                    let agent = Arc::clone(self);
                    let in_flight_w = Arc::clone(in_flight);
                    let spawned =
                        self.workers.execute(move || agent.run_request(request, &token, &responder, &in_flight_w));
                    if let Err(e) = spawned {
                        lock(in_flight).remove(&frame.id);
                        let failure = match e {
                            PoolError::Full { max } => error(
                                ErrorKind::Busy,
                                format!(
                                    "the agent is running {max} requests at once (its cap); retry when some finish"
                                ),
                            ),
                            PoolError::Spawn(e) => {
                                error(ErrorKind::Busy, format!("the agent cannot start a request thread now: {e}"))
                            }
                        };
                        Responder { id: frame.id, writer: Arc::clone(writer) }.finish(Err(failure));
                    }
                }
            }
        }
    }

    /// Runs one request on its worker thread and sends its final frame.
    fn run_request(
        &self,
        request: Request,
        token: &CancelToken,
        responder: &Responder,
        in_flight: &Mutex<HashMap<RequestId, CancelToken>>,
    ) {
        let shutdown = match &request.op {
            Op::Shutdown { reboot } => Some(*reboot),
            _ => None,
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(request.op, token, responder)))
            .unwrap_or_else(|_| Err(error(ErrorKind::Internal, "the agent hit a bug handling this request")));
        let ok = result.is_ok();
        lock(in_flight).remove(&responder.id);
        responder.finish(result);
        if let (Some(reboot), true) = (shutdown, ok) {
            self.contexts.shutdown();
            let e = system::shutdown_now(reboot);
            eprintln!("capsule-agent: shutdown failed: {e}");
        }
    }

    /// Performs one operation.
    fn handle(&self, op: Op, token: &CancelToken, responder: &Responder) -> Result<Reply, AgentError> {
        if let Some(reason) = token.stop_reason() {
            return Err(stop_error(reason));
        }
        match op {
            Op::Ping => Ok(Reply::Pong),
            Op::Exec(req) if req.background => self.processes.start_background(&req).map(|pid| Reply::Started { pid }),
            Op::Exec(req) => self.processes.run_foreground(&req, token, &|e| responder.event(e)).map(Reply::Exit),
            Op::Signal { pid, signal } => self.processes.signal(pid, signal).map(|()| Reply::Unit),
            Op::ListProcesses => Ok(Reply::Processes(self.processes.list())),
            Op::ReadProcessOutput { pid, stdout_offset, stderr_offset, max_bytes } => {
                self.processes.read_output(pid, stdout_offset, stderr_offset, max_bytes).map(Reply::ProcessOutput)
            }
            Op::RunCode(req) => {
                let cap = req.output_cap_bytes.unwrap_or(DEFAULT_OUTPUT_CAP_BYTES);
                let tag = format!("code-{}", self.processes.next_seq());
                let mut capped = CappedOutput::new(cap, &self.processes.output_dir(), tag);
                let mut forward = |e: Event| responder.event(e);
                let outcome = self.contexts.run_code(&req, token, &mut |e| capped.push(e, &mut forward));
                capped.finish();
                outcome.map(Reply::CodeDone)
            }
            Op::CreateContext { name, language, limits } => {
                self.contexts.create(&name, language, limits.as_ref()).map(|()| Reply::Unit)
            }
            Op::ResetContext { name } => self.contexts.reset(&name).map(|()| Reply::Unit),
            Op::RemoveContext { name } => self.contexts.remove(&name).map(|()| Reply::Unit),
            Op::ListContexts => Ok(Reply::Contexts(self.contexts.list())),
            Op::WriteFile(req) => self.files.write(&req).map(|()| Reply::Unit),
            Op::ReadFile { path, offset, length } => {
                self.files.read(&path, offset, length).map(|(data, size)| Reply::FileData { data, size })
            }
            Op::ListDir { path, depth } => self.files.list(&path, depth).map(Reply::Entries),
            Op::Stat { path } => self.files.stat(&path).map(Reply::Stat),
            Op::MakeDir { path, mode } => self.files.make_dir(&path, mode).map(|()| Reply::Unit),
            Op::Remove { path, recursive } => self.files.remove(&path, recursive).map(|()| Reply::Unit),
            Op::Rename { from, to } => self.files.rename(&from, &to).map(|()| Reply::Unit),
            Op::SetClock { unix_time_ns } => system::set_clock(self.config.pid1, unix_time_ns).map(|()| Reply::Unit),
            Op::AddEntropy { bytes } => system::add_entropy(self.config.pid1, &bytes).map(|()| Reply::Unit),
            Op::Shutdown { .. } => system::check_shutdown(self.config.pid1).map(|()| Reply::Unit),
            Op::WriteProcess { pid, data, close_stdin } => self
                .processes
                .write_input(pid, &data, close_stdin)
                .map(|pending_bytes| Reply::InputQueued { pending_bytes }),
            Op::ResizePty { pid, size } => self.processes.resize_pty(pid, size).map(|()| Reply::Unit),
        }
    }
}

/// One of the [`MAX_CONNECTIONS`] connection slots, released on drop.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<ConnectionSlot> {
        if count.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(Arc::clone(count)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers a connection over the cap with a `Busy` failure of its handshake, then closes it.
fn refuse_connection(mut stream: UnixStream) {
    eprintln!("capsule-agent: refusing a connection: {MAX_CONNECTIONS} are open");
    // Read the Hello first (briefly), so the host reads the refusal rather than a reset.
    let _ = stream.set_read_timeout(Some(REFUSAL_READ_TIMEOUT));
    let _ = read_frame::<ClientFrame, _>(&mut stream);
    let message = format!("the agent serves at most {MAX_CONNECTIONS} connections at once; close one and retry");
    let _ =
        write_frame(&mut stream, &AgentFrame { id: 0, body: AgentMessage::Failed(error(ErrorKind::Busy, message)) });
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn stop_error(reason: StopReason) -> AgentError {
    match reason {
        StopReason::Cancelled => error(ErrorKind::Cancelled, "the request was cancelled"),
        StopReason::TimedOut => error(ErrorKind::Timeout, "the request's timeout passed"),
    }
}
