//! The daemon's side of the network broker (`capsule_vmm::net::broker`): for each sandbox, its
//! worker's SEQPACKET channel served under the sandbox's [`Egress`]. Resolutions go through the
//! host's resolver and come back filtered; allowed TCP connections are opened here and handed
//! to the worker as one end of a Unix stream pair, whose other end is spliced to the upstream
//! socket. Every refusal is kept (the last [`MAX_REFUSALS_KEPT`] per sandbox) for the MCP layer
//! to tell the model ([`NetworkBroker::take_refusals`]).
//!
//! The integrator attaches a sandbox's channel after its worker spawns, resumes or forks
//! ([`NetworkBroker::attach`]) and detaches it when the sandbox is deleted
//! ([`NetworkBroker::detach`]). A malformed message (one that does not parse, carries a
//! descriptor, or fails [`broker::validate`]) closes the channel, and with it every
//! connection of that channel.
//!
//! It never decides by itself: every answer is [`Egress`]'s decision. It never hands the
//! worker an internet socket, only Unix streams.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use capsule_vmm::net::broker::{self, BrokerError, BrokerToWorker, Family, WorkerToBroker};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinSet};

use super::egress::{Decision, Egress};
use super::host::host_addresses;
use super::policy::EffectivePolicy;

/// Most upstream connections one sandbox may hold open at once.
pub const MAX_CONNECTIONS_PER_SANDBOX: usize = 256;
/// Most resolutions of one sandbox in flight at once.
pub const MAX_PENDING_RESOLVES: usize = 64;
/// How long an upstream TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the host's resolver may take for one name.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The time to live given to answers of the host's resolver, which does not say theirs
/// (`getaddrinfo(3)` has no TTL); [`Egress::filter_resolved`] caps it further.
pub const RESOLVED_TTL: Duration = Duration::from_secs(60);
/// Most refusals kept per sandbox until they are taken; older ones are counted, not kept.
pub const MAX_REFUSALS_KEPT: usize = 32;

/// Errors of serving a broker channel and of the upstream side.
#[derive(Debug, thiserror::Error)]
pub enum NetBrokerError {
    /// The channel's socket could not be made non-blocking or registered with the runtime.
    #[error("cannot serve the network channel of sandbox {id}")]
    Setup {
        /// The sandbox.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The channel failed or carried a malformed message (it is closed).
    #[error("the network channel failed")]
    Channel(#[source] BrokerError),
    /// A message from the worker carried a file descriptor, which none of them may.
    #[error("a message from the worker carried a file descriptor")]
    UnexpectedDescriptor,
    /// The name does not exist.
    #[error("{name} does not exist (the host's resolver knows no such name)")]
    NoSuchName {
        /// The name.
        name: String,
    },
    /// The host's resolver failed.
    #[error("the host's resolver failed for {name}")]
    Resolver {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A boxed future of the upstream side.
pub type UpstreamFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where resolutions and connections really go: the host ([`HostUpstream`]), or a stand-in in
/// tests. Called only for what [`Egress`] allowed.
pub trait Upstream: Send + Sync + 'static {
    /// The addresses of `name`.
    fn resolve(&self, name: String) -> UpstreamFuture<Result<Vec<IpAddr>, NetBrokerError>>;
    /// A TCP connection to `dst`.
    fn connect(&self, dst: SocketAddr) -> UpstreamFuture<std::io::Result<TcpStream>>;
}

/// The host's resolver (`getaddrinfo(3)`, through tokio) and its TCP sockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostUpstream;

impl Upstream for HostUpstream {
    fn resolve(&self, name: String) -> UpstreamFuture<Result<Vec<IpAddr>, NetBrokerError>> {
        Box::pin(async move {
            let looked_up = tokio::net::lookup_host((name.as_str(), 0)).await.map(|addrs| addrs.collect::<Vec<_>>());
            match looked_up {
                Ok(addrs) => Ok(addrs.into_iter().map(|a| a.ip()).collect()),
                // getaddrinfo's EAI_NONAME / EAI_NODATA reach us only as text (std keeps no code).
                Err(e)
                    if ["not known", "No address associated", "no such host"]
                        .iter()
                        .any(|t| e.to_string().contains(t)) =>
                {
                    Err(NetBrokerError::NoSuchName { name })
                }
                Err(source) => Err(NetBrokerError::Resolver { name, source }),
            }
        })
    }

    fn connect(&self, dst: SocketAddr) -> UpstreamFuture<std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dst))
    }
}

/// Per-sandbox limits and timeouts of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLimits {
    /// See [`MAX_CONNECTIONS_PER_SANDBOX`].
    pub max_connections: usize,
    /// See [`MAX_PENDING_RESOLVES`].
    pub max_pending_resolves: usize,
    /// See [`CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`RESOLVE_TIMEOUT`].
    pub resolve_timeout: Duration,
    /// See [`RESOLVED_TTL`].
    pub resolved_ttl: Duration,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_connections: MAX_CONNECTIONS_PER_SANDBOX,
            max_pending_resolves: MAX_PENDING_RESOLVES,
            connect_timeout: CONNECT_TIMEOUT,
            resolve_timeout: RESOLVE_TIMEOUT,
            resolved_ttl: RESOLVED_TTL,
        }
    }
}

/// What a sandbox's connections carried so far (connections that ended; bytes of open ones
/// are counted when they end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes the sandbox sent upstream.
    pub bytes_out: u64,
    /// Bytes upstream sent the sandbox.
    pub bytes_in: u64,
    /// Upstream connections open now.
    pub open_connections: usize,
}

/// The refusals of one sandbox not yet taken, and its traffic.
#[derive(Debug, Default)]
struct SandboxLog {
    refusals: StdMutex<Refusals>,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    open: AtomicUsize,
}

#[derive(Debug, Default)]
struct Refusals {
    /// Each refusal with how many times in a row it happened.
    kept: VecDeque<(String, u32)>,
    /// How many were let go to keep [`MAX_REFUSALS_KEPT`].
    dropped: usize,
}

impl SandboxLog {
    fn refused(&self, what: String) {
        tracing::info!(refusal = %what, "network refusal");
        let mut r = lock(&self.refusals);
        if let Some((last, times)) = r.kept.back_mut() {
            if *last == what {
                *times += 1;
                return;
            }
        }
        if r.kept.len() == MAX_REFUSALS_KEPT {
            r.kept.pop_front();
            r.dropped += 1;
        }
        r.kept.push_back((what, 1));
    }

    fn take(&self) -> Vec<String> {
        let mut r = lock(&self.refusals);
        let mut out = Vec::new();
        if r.dropped > 0 {
            out.push(format!("({} earlier network refusals not shown)", r.dropped));
        }
        out.extend(r.kept.drain(..).map(|(what, times)| match times {
            1 => what,
            n => format!("{what} ({n} times)"),
        }));
        r.dropped = 0;
        out
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One attached sandbox.
struct Attached {
    log: Arc<SandboxLog>,
    task: Option<AbortHandle>,
}

struct Shared {
    host_addrs: Vec<IpAddr>,
    upstream: Arc<dyn Upstream>,
    limits: BrokerLimits,
    sandboxes: StdMutex<HashMap<String, Attached>>,
}

/// The broker side of every sandbox's network channel, keyed by sandbox id. Cheap to clone.
#[derive(Clone)]
pub struct NetworkBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NetworkBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkBroker").field("host_addrs", &self.shared.host_addrs).finish()
    }
}

impl Default for NetworkBroker {
    fn default() -> Self {
        NetworkBroker::new()
    }
}

impl NetworkBroker {
    /// A broker over the host's resolver and sockets, with the host's addresses read now.
    pub fn new() -> NetworkBroker {
        NetworkBroker::with_upstream(Arc::new(HostUpstream), BrokerLimits::default(), host_addresses())
    }

    /// A broker over `upstream` (tests), with `limits`, never reaching `host_addrs`.
    pub fn with_upstream(upstream: Arc<dyn Upstream>, limits: BrokerLimits, host_addrs: Vec<IpAddr>) -> NetworkBroker {
        NetworkBroker {
            shared: Arc::new(Shared { host_addrs, upstream, limits, sandboxes: StdMutex::new(HashMap::new()) }),
        }
    }

    /// The decisions for a sandbox with `policy` on this host.
    pub fn egress(&self, policy: EffectivePolicy) -> Egress {
        Egress::new(policy, self.shared.host_addrs.iter().copied())
    }

    /// Serves `channel` (the daemon's end of sandbox `sandbox_id`'s worker channel) under
    /// `egress`, on a task of the current tokio runtime, until the worker closes it, it carries
    /// a malformed message, or the sandbox is detached. A channel already attached for the
    /// sandbox is closed first (a resumed or restarted worker); its refusals not yet taken are
    /// kept.
    pub fn attach(&self, sandbox_id: &str, egress: Egress, channel: OwnedFd) -> Result<(), NetBrokerError> {
        let setup = |source| NetBrokerError::Setup { id: sandbox_id.to_string(), source };
        let channel = Channel::new(channel).map_err(setup)?;
        let mut sandboxes = lock(&self.shared.sandboxes);
        let attached =
            sandboxes.entry(sandbox_id.to_string()).or_insert_with(|| Attached { log: Arc::default(), task: None });
        if let Some(old) = attached.task.take() {
            old.abort();
        }
        let serving = Serving {
            channel: Arc::new(channel),
            egress: Arc::new(StdMutex::new(egress)),
            log: attached.log.clone(),
            upstream: self.shared.upstream.clone(),
            limits: self.shared.limits.clone(),
            pending_resolves: Arc::new(AtomicUsize::new(0)),
        };
        let id = sandbox_id.to_string();
        let task = tokio::spawn(async move {
            match serving.serve().await {
                Ok(()) => tracing::debug!(sandbox = %id, "network channel closed by the worker"),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %capsule_vmm::worker::error_chain(&e), "network channel closed")
                }
            }
        });
        attached.task = Some(task.abort_handle());
        Ok(())
    }

    /// Closes sandbox `sandbox_id`'s channel and its connections, and forgets its refusals.
    pub fn detach(&self, sandbox_id: &str) {
        if let Some(attached) = lock(&self.shared.sandboxes).remove(sandbox_id) {
            if let Some(task) = attached.task {
                task.abort();
            }
        }
    }

    /// Whether sandbox `sandbox_id` has a channel being served.
    pub fn is_serving(&self, sandbox_id: &str) -> bool {
        lock(&self.shared.sandboxes).get(sandbox_id).and_then(|a| a.task.as_ref()).is_some_and(|t| !t.is_finished())
    }

    /// The refusals of sandbox `sandbox_id` since they were last taken, oldest first, each a
    /// sentence for the model ("refused TCP to 10.1.2.3:5432 (…)").
    pub fn take_refusals(&self, sandbox_id: &str) -> Vec<String> {
        let log = lock(&self.shared.sandboxes).get(sandbox_id).map(|a| a.log.clone());
        log.map(|log| log.take()).unwrap_or_default()
    }

    /// What sandbox `sandbox_id`'s connections carried.
    pub fn traffic(&self, sandbox_id: &str) -> Option<Traffic> {
        let log = lock(&self.shared.sandboxes).get(sandbox_id).map(|a| a.log.clone())?;
        Some(Traffic {
            bytes_out: log.bytes_out.load(Ordering::Relaxed),
            bytes_in: log.bytes_in.load(Ordering::Relaxed),
            open_connections: log.open.load(Ordering::Relaxed),
        })
    }
}

/// A SEQPACKET broker channel on the tokio runtime (non-blocking).
pub(crate) struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Makes `fd` non-blocking and registers it.
    pub(crate) fn new(fd: OwnedFd) -> std::io::Result<Channel> {
        // SAFETY: fcntl(2) on a descriptor we own, with plain integer arguments.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which alone closes it, after it
        // deregisters it.
        Ok(Channel { fd: unsafe { AsyncFd::register(fd)? } })
    }

    /// Sends one message, with `fd` attached when given.
    pub(crate) async fn send<T: Serialize>(&self, message: &T, fd: Option<&OwnedFd>) -> Result<(), BrokerError> {
        loop {
            let mut guard = self.fd.writable().await.map_err(BrokerError::Send)?;
            let sent = guard.try_io(|inner| match broker::send(inner.get_ref(), message, fd) {
                Err(BrokerError::Send(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
                other => Ok(other),
            });
            match sent {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => return Err(BrokerError::Send(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message and the descriptor attached to it.
    pub(crate) async fn receive<T: DeserializeOwned>(&self) -> Result<(T, Option<OwnedFd>), BrokerError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(BrokerError::Receive)?;
            let got = guard.try_io(|inner| match broker::receive::<T>(inner.get_ref()) {
                Err(BrokerError::Receive(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
                other => Ok(other),
            });
            match got {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => return Err(BrokerError::Receive(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Holds one of a sandbox's connection places until dropped.
struct ConnectionSlot(Arc<SandboxLog>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One channel being served.
struct Serving {
    channel: Arc<Channel>,
    egress: Arc<StdMutex<Egress>>,
    log: Arc<SandboxLog>,
    upstream: Arc<dyn Upstream>,
    limits: BrokerLimits,
    pending_resolves: Arc<AtomicUsize>,
}

impl Serving {
    /// Serves until the worker closes the channel (`Ok`) or it fails. Dropping it (or the task
    /// it runs on) closes the channel and every connection it opened.
    async fn serve(&self) -> Result<(), NetBrokerError> {
        let mut tasks = JoinSet::new();
        loop {
            let received = tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                received = self.channel.receive::<WorkerToBroker>() => received,
            };
            let message = match received {
                Ok((message, None)) => message,
                Ok((_, Some(_))) => return Err(NetBrokerError::UnexpectedDescriptor),
                Err(BrokerError::Closed) => return Ok(()),
                Err(e) => return Err(NetBrokerError::Channel(e)),
            };
            broker::validate(&message).map_err(NetBrokerError::Channel)?;
            match message {
                WorkerToBroker::Connect { id, dst, name, first_bytes } => {
                    let what = match &name {
                        Some(name) => format!("TCP to {name} at {dst}"),
                        None => format!("TCP to {dst}"),
                    };
                    let decision =
                        lock(&self.egress).check_connect(dst, name.as_deref(), first_bytes.as_ref(), Instant::now());
                    if let Decision::Refuse(why) = decision {
                        self.refuse(id, format!("refused {what} ({why})")).await?;
                        continue;
                    }
                    let Some(slot) = self.connection_slot() else {
                        let max = self.limits.max_connections;
                        let why = format!("the sandbox has {max} connections open, the most it may; close some first");
                        self.refuse(id, format!("refused {what} ({why})")).await?;
                        continue;
                    };
                    tasks.spawn(self.connection(id, dst, slot));
                }
                WorkerToBroker::Resolve { id, name, family } => {
                    let decision = lock(&self.egress).check_resolve(&name);
                    if let Decision::Refuse(why) = decision {
                        self.log.refused(format!("refused to resolve {name} ({why})"));
                        let answer = BrokerToWorker::NotResolved { id, nxdomain: false, reason: why };
                        self.channel.send(&answer, None).await.map_err(NetBrokerError::Channel)?;
                        continue;
                    }
                    if self.pending_resolves.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending_resolves {
                        self.pending_resolves.fetch_sub(1, Ordering::AcqRel);
                        let reason = format!("more than {} lookups in flight", self.limits.max_pending_resolves);
                        let answer = BrokerToWorker::NotResolved { id, nxdomain: false, reason };
                        self.channel.send(&answer, None).await.map_err(NetBrokerError::Channel)?;
                        continue;
                    }
                    tasks.spawn(self.resolution(id, name, family));
                }
                WorkerToBroker::Blocked { what } => self.log.refused(format!("blocked {what}")),
            }
        }
    }

    /// Records a refused connection and tells the worker.
    async fn refuse(&self, id: u64, reason: String) -> Result<(), NetBrokerError> {
        self.log.refused(reason.clone());
        self.channel.send(&BrokerToWorker::Refused { id, reason }, None).await.map_err(NetBrokerError::Channel)
    }

    fn connection_slot(&self) -> Option<ConnectionSlot> {
        let open = self.log.open.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(self.log.clone());
        (open < self.limits.max_connections).then_some(slot)
    }

    /// Connects upstream, hands the worker its stream and splices the two until both ends close.
    fn connection(&self, id: u64, dst: SocketAddr, slot: ConnectionSlot) -> impl Future<Output = ()> + Send + 'static {
        let (channel, log, upstream) = (self.channel.clone(), self.log.clone(), self.upstream.clone());
        let timeout = self.limits.connect_timeout;
        async move {
            let refuse = |reason: String| {
                log.refused(reason.clone());
                BrokerToWorker::Refused { id, reason }
            };
            let mut tcp = match tokio::time::timeout(timeout, upstream.connect(dst)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    let reason = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => format!("connection refused by {dst}"),
                        _ => format!("cannot connect to {dst}: {e}"),
                    };
                    let _ = channel.send(&refuse(reason), None).await;
                    return;
                }
                Err(_) => {
                    let reason = format!("connecting to {dst} timed out after {} s", timeout.as_secs());
                    let _ = channel.send(&refuse(reason), None).await;
                    return;
                }
            };
            let pair = std::os::unix::net::UnixStream::pair().and_then(|(ours, theirs)| {
                ours.set_nonblocking(true)?;
                Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
            });
            let (mut ours, theirs) = match pair {
                Ok(pair) => pair,
                Err(e) => {
                    let _ =
                        channel.send(&refuse(format!("the daemon could not make a stream for {dst}: {e}")), None).await;
                    return;
                }
            };
            let theirs = OwnedFd::from(theirs);
            if channel.send(&BrokerToWorker::Connected { id }, Some(&theirs)).await.is_err() {
                return;
            }
            drop(theirs);
            match tokio::io::copy_bidirectional(&mut ours, &mut tcp).await {
                Ok((out, inb)) => {
                    log.bytes_out.fetch_add(out, Ordering::Relaxed);
                    log.bytes_in.fetch_add(inb, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(%dst, error = %e, "a sandbox connection ended with an error"),
            }
            drop(slot);
        }
    }

    /// Resolves `name` through the upstream and answers with what the policy lets through.
    fn resolution(&self, id: u64, name: String, family: Family) -> impl Future<Output = ()> + Send + 'static {
        let (channel, log, upstream, egress) =
            (self.channel.clone(), self.log.clone(), self.upstream.clone(), self.egress.clone());
        let (timeout, ttl, pending) =
            (self.limits.resolve_timeout, self.limits.resolved_ttl, self.pending_resolves.clone());
        async move {
            let looked_up = tokio::time::timeout(timeout, upstream.resolve(name.clone())).await;
            pending.fetch_sub(1, Ordering::AcqRel);
            let answer = match looked_up {
                Err(_) => BrokerToWorker::NotResolved {
                    id,
                    nxdomain: false,
                    reason: format!("the host's resolver gave no answer for {name} within {} s", timeout.as_secs()),
                },
                Ok(Err(e)) => BrokerToWorker::NotResolved {
                    id,
                    nxdomain: matches!(e, NetBrokerError::NoSuchName { .. }),
                    reason: capsule_vmm::worker::error_chain(&e),
                },
                Ok(Ok(addrs)) => {
                    let wanted: Vec<IpAddr> = addrs
                        .into_iter()
                        .filter(|a| matches!((family, a), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))))
                        .collect();
                    let filtered = lock(&egress).filter_resolved(&name, &wanted, ttl, Instant::now());
                    if filtered.addrs.is_empty() && !filtered.withheld.is_empty() {
                        let withheld: Vec<String> =
                            filtered.withheld.iter().map(|(addr, why)| format!("{addr}: {why}")).collect();
                        let reason = format!("withheld what {name} resolved to ({})", withheld.join("; "));
                        log.refused(reason.clone());
                        BrokerToWorker::NotResolved { id, nxdomain: false, reason }
                    } else {
                        BrokerToWorker::Resolved { id, addrs: filtered.addrs, ttl_s: filtered.ttl_s }
                    }
                }
            };
            let _ = channel.send(&answer, None).await;
        }
    }
}
