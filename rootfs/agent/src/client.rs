//! The host side of the protocol: a thread-safe client for one agent connection.
//!
//! Owns one byte stream to an agent (a Unix socket: the agent as a host
//! process in tests, or the VMM's hybrid-vsock socket for a microVM), a reader
//! thread that routes every [`AgentFrame`] to the sink registered for its
//! request id, and a writer shared by all callers. It never interprets
//! results beyond what the convenience calls need, and it never panics on
//! what the agent sends: a broken stream ends the connection and every
//! pending request gets [`Incoming::Disconnected`].
//!
//! # How the MCP server uses it
//!
//! ```text
//! // once per sandbox connection (reconnect after every restore/fork: vsock is reset)
//! let (client, hello) = AgentClient::connect_hybrid_vsock(&vsock_uds, AGENT_VSOCK_PORT)?;
//! // streaming, async-friendly: the sink runs on the reader thread, keep it quick
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let handle = client.start(Request { timeout_ms, op }, Box::new(move |i| { let _ = tx.send(i); }))?;
//! while let Some(incoming) = rx.recv().await { /* Event… then Done / Failed / Disconnected */ }
//! handle.cancel()?; // e.g. when the MCP call is cancelled
//! // blocking conveniences (call them from spawn_blocking in async code):
//! let out = client.exec(ExecRequest { .. }, Some(Duration::from_secs(30)))?;
//! client.write_file("/work/a.bin", &bytes, Some(0o644))?;
//! let bytes = client.read_file("/work/a.bin")?;
//! ```
//!
//! # What a hostile or stuck agent can cost the host
//!
//! Every write to the agent must finish within the connection's write timeout
//! ([`WRITE_TIMEOUT`] unless [`ClientOptions`] say otherwise): an agent that
//! stops reading ends the connection (every pending request gets
//! `Disconnected`, later calls fail at once) instead of blocking callers.
//! What the blocking conveniences keep in memory is capped on the host, never
//! sized by what the agent claims: [`MAX_COLLECTED_EVENT_BYTES`] for
//! [`AgentClient::call`], the request's output cap per stream for
//! [`AgentClient::exec`], and a maximum file size for
//! [`AgentClient::read_file_capped`] ([`MAX_READ_FILE_BYTES`] for `read_file`).
//!
//! The client is cheap to clone (`Arc` inside); clones share the connection.
//! Request ids are allocated here, starting at 1 (0 is the handshake).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{encode_frame, error_chain, read_frame, read_full, write_frame, FrameError};
use crate::lock::lock;
use crate::protocol::{
    AgentError, AgentFrame, AgentMessage, ClientFrame, ClientMessage, Containment, Event, ExecRequest, ExitStatus,
    Hello, HelloReply, Op, Reply, Request, RequestId, Stream, WriteFileRequest, WritePosition,
    DEFAULT_OUTPUT_CAP_BYTES, MAX_FILE_CHUNK_BYTES, PROTOCOL_VERSION,
};

/// How long the handshake (and a hybrid-vsock `CONNECT`) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra time a blocking call waits past the request's own timeout for the
/// agent's final frame (which reports the timeout itself) before giving up.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);

/// How long one frame may take to reach the agent's socket; an agent that
/// stops reading for this long loses its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of events (output, rich results, errors) one blocking
/// [`AgentClient::call`] collects before it cancels the request and fails.
pub const MAX_COLLECTED_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// Largest file [`AgentClient::read_file`] reads into memory.
pub const MAX_READ_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Longest reply line accepted from a hybrid-vsock `CONNECT`, in bytes.
const MAX_CONNECT_REPLY_BYTES: u64 = 64;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or configuring the socket failed.
    #[error("cannot connect to the agent at {path}")]
    Connect {
        /// The Unix socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VMM refused or garbled the hybrid-vsock `CONNECT <port>`.
    #[error("hybrid vsock CONNECT to port {port} failed: {reason}")]
    HybridVsock {
        /// The guest port.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// Socket I/O failed outside framing.
    #[error("agent socket I/O failed")]
    Io(#[source] io::Error),
    /// Encoding, decoding or moving a frame failed.
    #[error("agent protocol framing failed")]
    Frame(#[source] FrameError),
    /// The agent's handshake answer was wrong.
    #[error("agent handshake failed: {0}")]
    Handshake(String),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {agent}, this host speaks {host}")]
    VersionMismatch {
        /// The agent's version.
        agent: u32,
        /// Ours ([`PROTOCOL_VERSION`]).
        host: u32,
    },
    /// The agent answered the request with a failure.
    #[error("agent request failed")]
    Agent(#[source] AgentError),
    /// The connection is gone.
    #[error("agent connection lost: {0}")]
    Disconnected(String),
    /// No final reply arrived in time (the request was cancelled).
    #[error("no reply from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent's final reply was not the kind this call expects.
    #[error("unexpected reply from the agent: {0}")]
    UnexpectedReply(String),
    /// Reading the local data to upload failed.
    #[error("cannot read the data to upload")]
    Upload(#[source] io::Error),
    /// The agent sent (or announced) more than this client keeps in memory.
    #[error("{what} exceeds the host-side limit of {limit_bytes} bytes")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The limit, in bytes.
        limit_bytes: u64,
    },
}

/// Settings of one connection (see [`AgentClient::handshake_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long one frame may take to reach the agent's socket
    /// ([`WRITE_TIMEOUT`] by default).
    pub write_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { write_timeout: WRITE_TIMEOUT }
    }
}

/// What a request's sink receives, in order: any number of `Event`s, then
/// exactly one of `Done`, `Failed` or `Disconnected`.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An intermediate event (output chunk, truncation, rich result, error).
    Event(Event),
    /// The request succeeded.
    Done(Reply),
    /// The request failed.
    Failed(AgentError),
    /// The connection died before the request finished.
    Disconnected(String),
}

impl Incoming {
    /// Whether nothing more follows for this request.
    pub fn is_final(&self) -> bool {
        !matches!(self, Incoming::Event(_))
    }
}

/// A request's receiver of [`Incoming`]s; called on the reader thread.
pub type Sink = Box<dyn FnMut(Incoming) + Send>;

/// What a foreground command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Streamed stdout (at most the request's cap).
    pub stdout: Vec<u8>,
    /// Streamed stderr (at most the request's cap).
    pub stderr: Vec<u8>,
    /// Streams that passed the cap, with the guest file that holds the stream
    /// (empty when no file does, e.g. the host dropped what passed the cap).
    pub truncated: Vec<(Stream, String)>,
    /// How it ended.
    pub status: ExitStatus,
}

#[derive(Default)]
struct Pending {
    sinks: HashMap<RequestId, Sink>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

struct Inner {
    writer: Mutex<UnixStream>,
    /// The same socket, to shut it down without waiting for the writer lock.
    control: UnixStream,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    write_timeout: Duration,
    /// The limits the agent enforces, as its handshake said (`None`: it enforces none).
    containment: Option<Containment>,
}

impl Inner {
    /// Ends the connection for `reason` (unless it already ended): later
    /// calls fail with the first reason, every pending sink gets `Disconnected`.
    fn disconnect(&self, reason: String) {
        let (reason, sinks) = {
            let mut pending = lock(&self.pending);
            let reason = pending.closed.get_or_insert(reason).clone();
            (reason, std::mem::take(&mut pending.sinks))
        };
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        for (_, mut sink) in sinks {
            sink(Incoming::Disconnected(reason.clone()));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: end the stream so the reader thread stops.
        let _ = self.control.shutdown(std::net::Shutdown::Both);
    }
}

/// A connected, handshaken agent client. Clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").field("closed", &self.closed_reason()).finish()
    }
}

/// A started request; lets the caller cancel it.
#[derive(Debug, Clone)]
pub struct RequestHandle {
    id: RequestId,
    client: AgentClient,
}

impl RequestHandle {
    /// The request id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Asks the agent to cancel the request; its sink still gets the final frame.
    pub fn cancel(&self) -> Result<(), ClientError> {
        self.client.cancel(self.id)
    }
}

impl AgentClient {
    /// Connects to an agent listening on a Unix socket and shakes hands.
    pub fn connect_unix(path: &Path) -> Result<(AgentClient, HelloReply), ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        Self::handshake(stream, "capsule")
    }

    /// Connects through a Firecracker-style hybrid vsock: the VMM's Unix socket
    /// at `uds_path`, then `CONNECT <port>\n`, answered by `OK <n>\n`; after
    /// that the stream is a plain byte stream to the guest's port.
    pub fn connect_hybrid_vsock(uds_path: &Path, port: u32) -> Result<(AgentClient, HelloReply), ClientError> {
        let mut stream = UnixStream::connect(uds_path)
            .map_err(|source| ClientError::Connect { path: uds_path.display().to_string(), source })?;
        set_handshake_timeouts(&stream)?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(ClientError::Io)?;
        // Read the reply byte by byte so nothing past the newline is consumed.
        let mut line = Vec::new();
        let mut reader = BufReader::with_capacity(1, (&stream).take(MAX_CONNECT_REPLY_BYTES));
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| ClientError::HybridVsock { port, reason: format!("reading the reply failed: {e}") })?;
        let text = String::from_utf8_lossy(&line);
        if !line.ends_with(b"\n") || !text.starts_with("OK ") {
            return Err(ClientError::HybridVsock {
                port,
                reason: format!("expected `OK <n>`, got {:?}", text.trim_end()),
            });
        }
        Self::handshake(stream, "capsule")
    }

    /// Shakes hands over an already connected stream and starts the reader thread.
    pub fn handshake(stream: UnixStream, client_name: &str) -> Result<(AgentClient, HelloReply), ClientError> {
        Self::handshake_with(stream, client_name, ClientOptions::default())
    }

    /// [`handshake`](Self::handshake) with explicit [`ClientOptions`].
    pub fn handshake_with(
        stream: UnixStream,
        client_name: &str,
        options: ClientOptions,
    ) -> Result<(AgentClient, HelloReply), ClientError> {
        set_handshake_timeouts(&stream)?;
        let mut writer = stream.try_clone().map_err(ClientError::Io)?;
        let hello = ClientFrame {
            id: 0,
            body: ClientMessage::Hello(Hello { version: PROTOCOL_VERSION, client: client_name.to_owned() }),
        };
        write_frame(&mut writer, &hello).map_err(ClientError::Frame)?;
        let mut reader = stream;
        let reply = match read_frame::<AgentFrame, _>(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(ClientError::Handshake("the agent closed the stream".into())),
            Err(e) => return Err(ClientError::Frame(e)),
        };
        let hello_reply = match reply {
            AgentFrame { id: 0, body: AgentMessage::Hello(h) } => h,
            AgentFrame { id: 0, body: AgentMessage::Failed(e) } => return Err(ClientError::Handshake(e.to_string())),
            other => return Err(ClientError::Handshake(format!("expected a Hello reply, got {other:?}"))),
        };
        if hello_reply.version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch { agent: hello_reply.version, host: PROTOCOL_VERSION });
        }
        reader.set_read_timeout(None).map_err(ClientError::Io)?;
        let control = reader.try_clone().map_err(ClientError::Io)?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(writer),
            control,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            write_timeout: options.write_timeout,
            containment: hello_reply.containment,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("agent-client-reader".into())
            .spawn(move || reader_loop(reader, weak))
            .map_err(ClientError::Io)?;
        Ok((AgentClient { inner }, hello_reply))
    }

    /// The process limits the agent enforces (its handshake's [`HelloReply::containment`]);
    /// `None` when it has no cgroups to enforce them with.
    pub fn containment(&self) -> Option<Containment> {
        self.inner.containment
    }

    /// Why the connection ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.inner.pending).closed.clone()
    }

    /// Starts a request; `sink` receives its events and final frame on the reader thread.
    /// When sending it ends the connection (the agent stopped reading), the
    /// sink gets `Disconnected` like every other pending one, and this fails too.
    pub fn start(&self, request: Request, sink: Sink) -> Result<RequestHandle, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = lock(&self.inner.pending);
            if let Some(reason) = &pending.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            pending.sinks.insert(id, sink);
        }
        let frame = ClientFrame { id, body: ClientMessage::Request(request) };
        if let Err(e) = self.send(&frame) {
            lock(&self.inner.pending).sinks.remove(&id);
            return Err(e);
        }
        Ok(RequestHandle { id, client: self.clone() })
    }

    /// Asks the agent to cancel request `id`.
    pub fn cancel(&self, id: RequestId) -> Result<(), ClientError> {
        self.send(&ClientFrame { id, body: ClientMessage::Cancel })
    }

    /// Ends the connection: the agent cancels this connection's requests
    /// (background processes keep running), pending sinks get `Disconnected`.
    pub fn close(&self) {
        let _ = self.inner.control.shutdown(std::net::Shutdown::Both);
    }

    /// Fails with the reason the connection ended, if it has.
    fn check_open(&self) -> Result<(), ClientError> {
        match self.closed_reason() {
            Some(reason) => Err(ClientError::Disconnected(reason)),
            None => Ok(()),
        }
    }

    /// Writes one frame within the write timeout; a write that fails or times
    /// out ends the connection (the frame may be half sent).
    fn send(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.check_open()?;
        let mut buf = Vec::new();
        encode_frame(frame, &mut buf).map_err(ClientError::Frame)?;
        let writer = lock(&self.inner.writer);
        // A writer before us may have given up while we waited for the lock.
        self.check_open()?;
        let timeout = self.inner.write_timeout;
        let Err(e) = write_all_within(&writer, &buf, timeout) else {
            return Ok(());
        };
        drop(writer);
        let reason = if e.kind() == io::ErrorKind::TimedOut {
            format!("agent stopped reading for {timeout:?}")
        } else {
            format!("write failed: {e}")
        };
        self.inner.disconnect(reason.clone());
        Err(ClientError::Disconnected(self.closed_reason().unwrap_or(reason)))
    }

    /// Runs one request to its end and returns its events and reply.
    /// `timeout` becomes the request's deadline in the agent; the client waits
    /// [`REPLY_GRACE`] longer for the final frame, then cancels and gives up.
    ///
    /// At most [`MAX_COLLECTED_EVENT_BYTES`] of events are collected; past
    /// that the request is cancelled and the call fails with `TooLarge`.
    pub fn call(&self, op: Op, timeout: Option<Duration>) -> Result<(Vec<Event>, Reply), ClientError> {
        let mut events = Vec::new();
        let mut collected_bytes = 0usize;
        let reply = self.call_each(op, timeout, &mut |event| {
            collected_bytes = collected_bytes.saturating_add(event_bytes(&event));
            if collected_bytes > MAX_COLLECTED_EVENT_BYTES {
                return Err(ClientError::TooLarge {
                    what: "the events of one request".into(),
                    limit_bytes: MAX_COLLECTED_EVENT_BYTES as u64,
                });
            }
            events.push(event);
            Ok(())
        })?;
        Ok((events, reply))
    }

    /// Runs one request to its end, handing each event to `on_event` as it
    /// arrives; an error from `on_event` cancels the request and is returned.
    /// Timeouts as in [`call`](Self::call).
    pub fn call_each(
        &self,
        op: Op,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event) -> Result<(), ClientError>,
    ) -> Result<Reply, ClientError> {
        let (tx, rx) = mpsc::channel();
        let request = Request { timeout_ms: timeout.map(|t| t.as_millis() as u64), op };
        let handle = self.start(request, Box::new(move |i| drop(tx.send(i))))?;
        let wait_limit = timeout.map(|t| t + REPLY_GRACE);
        loop {
            let incoming = match wait_limit {
                Some(limit) => match rx.recv_timeout(limit) {
                    Ok(i) => i,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = handle.cancel();
                        return Err(ClientError::Timeout(limit));
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(ClientError::Disconnected("reply channel closed".into()))
                    }
                },
                None => rx.recv().map_err(|_| ClientError::Disconnected("reply channel closed".into()))?,
            };
            match incoming {
                Incoming::Event(e) => {
                    if let Err(err) = on_event(e) {
                        let _ = handle.cancel();
                        return Err(err);
                    }
                }
                Incoming::Done(reply) => return Ok(reply),
                Incoming::Failed(e) => return Err(ClientError::Agent(e)),
                Incoming::Disconnected(reason) => return Err(ClientError::Disconnected(reason)),
            }
        }
    }

    /// [`call`](Self::call) for operations whose events do not matter.
    pub fn call_reply(&self, op: Op, timeout: Option<Duration>) -> Result<Reply, ClientError> {
        self.call(op, timeout).map(|(_, reply)| reply)
    }

    /// Runs a foreground command and collects its output.
    ///
    /// Each stream keeps at most the request's output cap
    /// ([`DEFAULT_OUTPUT_CAP_BYTES`] when unset), and that cap is lowered to
    /// [`MAX_COLLECTED_EVENT_BYTES`] before the request is sent; whatever an
    /// agent streams past it is dropped here (and the stream is listed as
    /// truncated with an empty path).
    pub fn exec(&self, mut req: ExecRequest, timeout: Option<Duration>) -> Result<ExecOutput, ClientError> {
        let cap_bytes = req.output_cap_bytes.unwrap_or(DEFAULT_OUTPUT_CAP_BYTES).min(MAX_COLLECTED_EVENT_BYTES as u64);
        req.output_cap_bytes = Some(cap_bytes);
        let cap = cap_bytes as usize; // at most MAX_COLLECTED_EVENT_BYTES
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut truncated: Vec<(Stream, String)> = Vec::new();
        let reply = self.call_each(Op::Exec(req), timeout, &mut |event| {
            match event {
                Event::Output { stream, data } => {
                    let kept = match stream {
                        Stream::Stdout => &mut stdout,
                        Stream::Stderr => &mut stderr,
                    };
                    let room = cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if data.len() > room && !truncated.iter().any(|(s, _)| *s == stream) {
                        truncated.push((stream, String::new()));
                    }
                }
                Event::Truncated { stream, path, .. } => match truncated.iter_mut().find(|(s, _)| *s == stream) {
                    Some(entry) if entry.1.is_empty() => entry.1 = path,
                    Some(_) => {}
                    None => truncated.push((stream, path)),
                },
                Event::Result(_) | Event::Error(_) => {}
            }
            Ok(())
        })?;
        let Reply::Exit(status) = reply else {
            return Err(ClientError::UnexpectedReply(format!("{reply:?} to a foreground Exec")));
        };
        Ok(ExecOutput { stdout, stderr, truncated, status })
    }

    /// Writes `data` to `path` (created or truncated), in chunks of at most
    /// [`MAX_FILE_CHUNK_BYTES`], creating parent directories. Returns the bytes written.
    pub fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<u64, ClientError> {
        self.write_file_from(path, data, mode)
    }

    /// Like [`write_file`](Self::write_file), reading the data from `source`.
    pub fn write_file_from<R: Read>(&self, path: &str, mut source: R, mode: Option<u32>) -> Result<u64, ClientError> {
        let mut offset = 0u64;
        let mut chunk = vec![0u8; MAX_FILE_CHUNK_BYTES];
        loop {
            let n = read_full(&mut source, &mut chunk).map_err(ClientError::Upload)?;
            if n == 0 && offset > 0 {
                return Ok(offset);
            }
            let position = if offset == 0 { WritePosition::Truncate } else { WritePosition::At(offset) };
            let op = Op::WriteFile(WriteFileRequest {
                path: path.to_owned(),
                position,
                data: chunk[..n].to_vec(),
                mode,
                create_parents: true,
            });
            expect_unit(self.call_reply(op, None)?)?;
            offset += n as u64;
            if n < chunk.len() {
                return Ok(offset);
            }
        }
    }

    /// Reads a whole file, range by range; files over
    /// [`MAX_READ_FILE_BYTES`] are refused (see [`read_file_capped`](Self::read_file_capped)).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_capped(path, MAX_READ_FILE_BYTES)
    }

    /// Reads a whole file of at most `max_bytes`, range by range. Fails with
    /// `TooLarge` when the agent announces or sends more; memory grows with
    /// the data received, never with the size the agent claims.
    pub fn read_file_capped(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, ClientError> {
        let too_large = |size: u64| ClientError::TooLarge {
            what: format!("file {path} ({size} bytes or more)"),
            limit_bytes: max_bytes,
        };
        let mut out = Vec::new();
        loop {
            let op =
                Op::ReadFile { path: path.to_owned(), offset: out.len() as u64, length: MAX_FILE_CHUNK_BYTES as u64 };
            match self.call_reply(op, None)? {
                Reply::FileData { data, size } => {
                    let total = out.len() as u64 + data.len() as u64;
                    if size > max_bytes || total > max_bytes {
                        return Err(too_large(size.max(total)));
                    }
                    out.extend_from_slice(&data);
                    if data.is_empty() || total >= size {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::UnexpectedReply(format!("{other:?} to ReadFile"))),
            }
        }
    }
}

/// Fails unless the reply is [`Reply::Unit`].
fn expect_unit(reply: Reply) -> Result<(), ClientError> {
    match reply {
        Reply::Unit => Ok(()),
        other => Err(ClientError::UnexpectedReply(format!("{other:?} where Unit was expected"))),
    }
}

/// Bounds reads and writes by [`HANDSHAKE_TIMEOUT`] until the handshake is done.
fn set_handshake_timeouts(stream: &UnixStream) -> Result<(), ClientError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(ClientError::Io)
}

/// Bytes an event holds, as counted against [`MAX_COLLECTED_EVENT_BYTES`].
fn event_bytes(event: &Event) -> usize {
    match event {
        Event::Output { data, .. } => data.len(),
        Event::Truncated { path, .. } => path.len(),
        Event::Result(r) => r.data.iter().map(|(mime, data)| mime.len() + data.len()).sum(),
        Event::Error(e) => e.name.len() + e.value.len() + e.traceback.iter().map(String::len).sum::<usize>(),
    }
}

/// Writes all of `buf` to `stream` within `limit` (the socket's send timeout
/// is set to what is left before each write); `TimedOut` when it is spent.
fn write_all_within(stream: &UnixStream, mut buf: &[u8], limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match (&mut &*stream).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Routes frames to sinks until the stream ends, then disconnects every pending request.
fn reader_loop(mut stream: UnixStream, inner: std::sync::Weak<Inner>) {
    let reason = loop {
        let frame = match read_frame::<AgentFrame, _>(&mut stream) {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent closed the connection".to_owned(),
            Err(e) => break error_chain(&e),
        };
        let Some(inner) = inner.upgrade() else { return };
        let incoming = match frame.body {
            AgentMessage::Event(e) => Incoming::Event(e),
            AgentMessage::Done(r) => Incoming::Done(r),
            AgentMessage::Failed(e) => Incoming::Failed(e),
            AgentMessage::Hello(_) => continue,
        };
        let is_final = incoming.is_final();
        // Take the sink out so it runs without the lock held (it may call `start`).
        let Some(mut sink) = lock(&inner.pending).sinks.remove(&frame.id) else {
            continue;
        };
        sink(incoming);
        if !is_final {
            let mut pending = lock(&inner.pending);
            match pending.closed.clone() {
                None => {
                    pending.sinks.insert(frame.id, sink);
                }
                Some(reason) => {
                    // The connection ended while the sink ran: it still gets its final word.
                    drop(pending);
                    sink(Incoming::Disconnected(reason));
                }
            }
        }
    };
    if let Some(inner) = inner.upgrade() {
        inner.disconnect(reason);
    }
}
