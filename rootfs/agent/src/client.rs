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
//! The client is cheap to clone (`Arc` inside); clones share the connection.
//! Request ids are allocated here, starting at 1 (0 is the handshake).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::frame::{read_frame, write_frame, FrameError};
use crate::protocol::{
    AgentError, AgentFrame, AgentMessage, ClientFrame, ClientMessage, Event, ExecRequest,
    ExitStatus, Hello, HelloReply, Op, Reply, Request, RequestId, Stream, WriteFileRequest,
    WritePosition, MAX_FILE_CHUNK_BYTES, PROTOCOL_VERSION,
};

/// How long the handshake (and a hybrid-vsock `CONNECT`) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra time a blocking call waits past the request's own timeout for the
/// agent's final frame (which reports the timeout itself) before giving up.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);

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
    /// Streams that passed the cap, with the guest file holding all of it.
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
    pending: Mutex<Pending>,
    next_id: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: end the stream so the reader thread stops.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }
}

/// A connected, handshaken agent client. Clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("closed", &self.closed_reason())
            .finish()
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
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::handshake(stream, "capsule")
    }

    /// Connects through a Firecracker-style hybrid vsock: the VMM's Unix socket
    /// at `uds_path`, then `CONNECT <port>\n`, answered by `OK <n>\n`; after
    /// that the stream is a plain byte stream to the guest's port.
    pub fn connect_hybrid_vsock(
        uds_path: &Path,
        port: u32,
    ) -> Result<(AgentClient, HelloReply), ClientError> {
        let mut stream = UnixStream::connect(uds_path).map_err(|source| ClientError::Connect {
            path: uds_path.display().to_string(),
            source,
        })?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(ClientError::Io)?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(ClientError::Io)?;
        // Read the reply byte by byte so nothing past the newline is consumed.
        let mut line = Vec::new();
        let mut reader = BufReader::with_capacity(1, (&stream).take(MAX_CONNECT_REPLY_BYTES));
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| ClientError::HybridVsock {
                port,
                reason: format!("reading the reply failed: {e}"),
            })?;
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
    pub fn handshake(
        stream: UnixStream,
        client_name: &str,
    ) -> Result<(AgentClient, HelloReply), ClientError> {
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(ClientError::Io)?;
        let mut writer = stream.try_clone().map_err(ClientError::Io)?;
        let hello = ClientFrame {
            id: 0,
            body: ClientMessage::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: client_name.to_owned(),
            }),
        };
        write_frame(&mut writer, &hello).map_err(ClientError::Frame)?;
        let mut reader = stream;
        let reply = match read_frame::<AgentFrame, _>(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(ClientError::Handshake("the agent closed the stream".into())),
            Err(e) => return Err(ClientError::Frame(e)),
        };
        let hello_reply = match reply {
            AgentFrame {
                id: 0,
                body: AgentMessage::Hello(h),
            } => h,
            AgentFrame {
                id: 0,
                body: AgentMessage::Failed(e),
            } => return Err(ClientError::Handshake(e.to_string())),
            other => {
                return Err(ClientError::Handshake(format!(
                    "expected a Hello reply, got {other:?}"
                )))
            }
        };
        if hello_reply.version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                agent: hello_reply.version,
                host: PROTOCOL_VERSION,
            });
        }
        reader.set_read_timeout(None).map_err(ClientError::Io)?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("agent-client-reader".into())
            .spawn(move || reader_loop(reader, weak))
            .map_err(ClientError::Io)?;
        Ok((AgentClient { inner }, hello_reply))
    }

    /// Why the connection ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.inner.pending).closed.clone()
    }

    /// Starts a request; `sink` receives its events and final frame on the reader thread.
    pub fn start(&self, request: Request, sink: Sink) -> Result<RequestHandle, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = lock(&self.inner.pending);
            if let Some(reason) = &pending.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            pending.sinks.insert(id, sink);
        }
        let frame = ClientFrame {
            id,
            body: ClientMessage::Request(request),
        };
        if let Err(e) = self.send(&frame) {
            lock(&self.inner.pending).sinks.remove(&id);
            return Err(e);
        }
        Ok(RequestHandle {
            id,
            client: self.clone(),
        })
    }

    /// Asks the agent to cancel request `id`.
    pub fn cancel(&self, id: RequestId) -> Result<(), ClientError> {
        self.send(&ClientFrame {
            id,
            body: ClientMessage::Cancel,
        })
    }

    /// Ends the connection: the agent cancels this connection's requests
    /// (background processes keep running), pending sinks get `Disconnected`.
    pub fn close(&self) {
        let _ = lock(&self.inner.writer).shutdown(std::net::Shutdown::Both);
    }

    fn send(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let mut w = lock(&self.inner.writer);
        write_frame(&mut *w, frame).map_err(|e| match e {
            FrameError::Io(io) => ClientError::Disconnected(format!("write failed: {io}")),
            other => ClientError::Frame(other),
        })
    }

    /// Runs one request to its end and returns its events and reply.
    /// `timeout` becomes the request's deadline in the agent; the client waits
    /// [`REPLY_GRACE`] longer for the final frame, then cancels and gives up.
    pub fn call(
        &self,
        op: Op,
        timeout: Option<Duration>,
    ) -> Result<(Vec<Event>, Reply), ClientError> {
        let (tx, rx) = mpsc::channel();
        let request = Request {
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            op,
        };
        let handle = self.start(request, Box::new(move |i| drop(tx.send(i))))?;
        let wait_limit = timeout.map(|t| t + REPLY_GRACE);
        let mut events = Vec::new();
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
                None => rx
                    .recv()
                    .map_err(|_| ClientError::Disconnected("reply channel closed".into()))?,
            };
            match incoming {
                Incoming::Event(e) => events.push(e),
                Incoming::Done(reply) => return Ok((events, reply)),
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
    pub fn exec(
        &self,
        req: ExecRequest,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ClientError> {
        let (events, reply) = self.call(Op::Exec(req), timeout)?;
        let Reply::Exit(status) = reply else {
            return Err(ClientError::UnexpectedReply(format!(
                "{reply:?} to a foreground Exec"
            )));
        };
        let mut out = ExecOutput {
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: Vec::new(),
            status,
        };
        for event in events {
            match event {
                Event::Output {
                    stream: Stream::Stdout,
                    data,
                } => out.stdout.extend_from_slice(&data),
                Event::Output {
                    stream: Stream::Stderr,
                    data,
                } => out.stderr.extend_from_slice(&data),
                Event::Truncated { stream, path, .. } => out.truncated.push((stream, path)),
                Event::Result(_) | Event::Error(_) => {}
            }
        }
        Ok(out)
    }

    /// Writes `data` to `path` (created or truncated), in chunks of at most
    /// [`MAX_FILE_CHUNK_BYTES`], creating parent directories. Returns the bytes written.
    pub fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ClientError> {
        self.write_file_from(path, data, mode)
    }

    /// Like [`write_file`](Self::write_file), reading the data from `source`.
    pub fn write_file_from<R: Read>(
        &self,
        path: &str,
        mut source: R,
        mode: Option<u32>,
    ) -> Result<u64, ClientError> {
        let mut offset = 0u64;
        let mut chunk = vec![0u8; MAX_FILE_CHUNK_BYTES];
        loop {
            let n = read_up_to(&mut source, &mut chunk).map_err(ClientError::Upload)?;
            if n == 0 && offset > 0 {
                return Ok(offset);
            }
            let position = if offset == 0 {
                WritePosition::Truncate
            } else {
                WritePosition::At(offset)
            };
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

    /// Reads a whole file, range by range.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let op = Op::ReadFile {
                path: path.to_owned(),
                offset: out.len() as u64,
                length: MAX_FILE_CHUNK_BYTES as u64,
            };
            match self.call_reply(op, None)? {
                Reply::FileData { data, size } => {
                    let done = data.is_empty() || out.len() as u64 + data.len() as u64 >= size;
                    out.extend_from_slice(&data);
                    if done {
                        return Ok(out);
                    }
                }
                other => {
                    return Err(ClientError::UnexpectedReply(format!(
                        "{other:?} to ReadFile"
                    )))
                }
            }
        }
    }
}

/// Fails unless the reply is [`Reply::Unit`].
fn expect_unit(reply: Reply) -> Result<(), ClientError> {
    match reply {
        Reply::Unit => Ok(()),
        other => Err(ClientError::UnexpectedReply(format!(
            "{other:?} where Unit was expected"
        ))),
    }
}

/// Reads until `buf` is full or `r` ends.
fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Routes frames to sinks until the stream ends, then disconnects every pending request.
fn reader_loop(mut stream: UnixStream, inner: std::sync::Weak<Inner>) {
    let reason = loop {
        let frame = match read_frame::<AgentFrame, _>(&mut stream) {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the agent closed the connection".to_owned(),
            Err(e) => break format!("{e}: {}", source_chain(&e)),
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
            if pending.closed.is_none() {
                pending.sinks.insert(frame.id, sink);
            }
        }
    };
    let Some(inner) = inner.upgrade() else { return };
    let sinks = {
        let mut pending = lock(&inner.pending);
        pending.closed = Some(reason.clone());
        std::mem::take(&mut pending.sinks)
    };
    for (_, mut sink) in sinks {
        sink(Incoming::Disconnected(reason.clone()));
    }
}

/// The `source()` chain of an error, joined for one log line.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}
