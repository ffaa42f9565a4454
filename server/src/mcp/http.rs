//! Streamable HTTP at `/mcp`: binding rules, bearer token, Origin check, one owner per session.
//!
//! - Binds to 127.0.0.1 by default; binding off loopback requires a token.
//! - With a token, every request needs `Authorization: Bearer <token>` (401 otherwise).
//! - A request carrying an `Origin` header must come from a loopback origin or
//!   one allowed with `--allow-origin` (403 otherwise): a web page cannot
//!   drive a local server through the browser.
//! - Each MCP session gets its own handler and owner id, so it sees only its
//!   own sandboxes, unless sandboxes are shared. Sandboxes of sessions that
//!   ended (or of a previous run of the server) are orphans that the
//!   manager's timers reclaim.
//! - The sessionless revision 2026-07-28 is served beside it (rmcp routes each
//!   request by its era) only with a token or a fixed owner: a 2026-07-28
//!   request acts for `--token-owner`, for the shared owner, or else for its
//!   client's name (`http-client:NAME`), which only token holders can claim.
//!
//! This module is transport plumbing; tools live in [`super::handler`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::shaping::Shaping;
use super::{client_owner, CapsuleMcp, OwnerSource};
use crate::sandbox::{Manager, Owner};

/// The path of the MCP endpoint.
pub const MCP_PATH: &str = "/mcp";

/// Settings of the HTTP transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Bearer token every request must carry, if set.
    pub token: Option<String>,
    /// The owner that requests with the token act as: their sandboxes (and default sandbox)
    /// belong to this client name across sessions and restarts. `None`: each MCP session is an
    /// owner of its own.
    #[serde(default)]
    pub token_owner: Option<String>,
    /// Extra allowed browser origins (`scheme://host[:port]`), besides loopback ones.
    pub allowed_origins: Vec<String>,
    /// All sessions see all sandboxes (one shared owner).
    pub shared_sandboxes: bool,
}

/// Errors of the HTTP transport's setup.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Off-loopback bind without a token.
    #[error("refusing to listen on {0} without a token: anyone who can reach that address could run code. Pass --token (or CAPSULE_TOKEN), or listen on 127.0.0.1")]
    TokenRequired(SocketAddr),
    /// The token is unusable.
    #[error("the token must be 16 to 256 printable ASCII characters without spaces")]
    BadToken,
    /// A token owner without a token.
    #[error("--token-owner names who the token's requests act as, so it needs --token")]
    OwnerWithoutToken,
}

#[derive(Debug)]
struct Guard {
    token: Option<String>,
    allowed_origins: Vec<String>,
}

/// Checks the bind address against the token rule and validates the token.
pub fn check_options(opts: &HttpOptions) -> Result<(), HttpError> {
    if let Some(t) = &opts.token {
        if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HttpError::BadToken);
        }
    }
    if opts.token_owner.is_some() && opts.token.is_none() {
        return Err(HttpError::OwnerWithoutToken);
    }
    if !opts.listen.ip().is_loopback() && opts.token.is_none() {
        return Err(HttpError::TokenRequired(opts.listen));
    }
    Ok(())
}

/// Constant-time equality of two byte strings.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `origin` is a loopback origin (`http(s)://localhost|127.0.0.1|[::1][:port]`).
fn is_loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, tail)) if tail.is_empty() || tail.starts_with(':') => h,
            _ => return false,
        }
    } else {
        rest.split(':').next().unwrap_or("")
    };
    if rest.contains('/') {
        return false;
    }
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

async fn guard(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let allowed = is_loopback_origin(origin) || guard.allowed_origins.iter().any(|o| o == origin);
        if !allowed {
            return (
                StatusCode::FORBIDDEN,
                format!("origin {origin:?} is not allowed; start capsule with --allow-origin {origin} to allow it"),
            )
                .into_response();
        }
    }
    if let Some(token) = &guard.token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(presented.as_bytes(), token.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token: send Authorization: Bearer <the token capsule was started with>",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// The axum router serving MCP at [`MCP_PATH`].
pub fn router(manager: Manager, shaping: Shaping, opts: &HttpOptions) -> Result<axum::Router, HttpError> {
    Ok(router_with_shutdown(manager, shaping, opts)?.0)
}

/// Like [`router`], plus a function that ends every MCP session (open SSE
/// streams included), so that a graceful shutdown does not wait on clients.
pub fn router_with_shutdown(
    manager: Manager,
    shaping: Shaping,
    opts: &HttpOptions,
) -> Result<(axum::Router, impl Fn() + Send + Sync + 'static), HttpError> {
    check_options(opts)?;
    let shared = opts.shared_sandboxes;
    let token_owner = opts.token_owner.clone();
    let sessions = Arc::new(AtomicU64::new(0));
    // Owner ids name this server's boot and the session's number. MCP sessions
    // do not survive a server restart (clients must initialize again), so no
    // later session can claim an earlier one's sandboxes: they are orphans,
    // reclaimed by the timers (paused when idle, deleted after the retention
    // period) and visible to --shared-sandboxes sessions until then. Reusing
    // ids across restarts would hand one client's sandboxes to another.
    let boot = crate::registry::now_ms();
    // The sessionless 2026-07-28 revision needs an identity other than the session: the
    // token (its holders act for their client names) or a fixed owner.
    let offers_stateless = opts.token.is_some() || token_owner.is_some() || shared;
    // One task store for the listener: a 2026-07-28 request gets a handler of its own, and the
    // request that polls a task is not the one that made it.
    let tasks = rmcp::task_manager::TaskManager::new();
    let factory = move || {
        let n = sessions.fetch_add(1, Ordering::Relaxed);
        let source = match (&token_owner, shared) {
            (_, true) => OwnerSource::Fixed(Owner { id: "http-shared".into(), sees_all: true }),
            (Some(name), false) => OwnerSource::Fixed(client_owner(name)),
            (None, false) => OwnerSource::Session(Owner::new(format!("http-{boot:x}-{n}"))),
        };
        Ok(CapsuleMcp::with_owner_source(manager.clone(), source, shaping)
            .offering_stateless(offers_stateless)
            .with_tasks(tasks.clone()))
    };
    // The same limit as the stdio relay's: a bigger body is answered 413, naming the limit.
    let mut config =
        StreamableHttpServerConfig::default().with_max_request_body_bytes(crate::daemon::relay::MAX_MESSAGE_BYTES);
    if !opts.listen.ip().is_loopback() {
        // Host-header checks guard loopback servers against DNS rebinding; off
        // loopback the bearer token does that job.
        config = config.disable_allowed_hosts();
    }
    let sessions_end = config.cancellation_token.clone();
    let service = StreamableHttpService::new(factory, Arc::new(LocalSessionManager::default()), config);
    let guard_state = Arc::new(Guard { token: opts.token.clone(), allowed_origins: opts.allowed_origins.clone() });
    let router = axum::Router::new()
        .nest_service(MCP_PATH, service)
        .layer(axum::middleware::from_fn_with_state(guard_state, guard));
    Ok((router, move || sessions_end.cancel()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_origins_are_recognised_and_lookalikes_are_not() {
        for ok in
            ["http://localhost", "http://localhost:3000", "http://127.0.0.1:8765", "https://[::1]:9", "http://[::1]"]
        {
            assert!(is_loopback_origin(ok), "{ok}");
        }
        for bad in [
            "http://localhost.evil.com",
            "http://evil.com",
            "null",
            "file://",
            "http://127.0.0.1.nip.io",
            "http://localhost/x",
        ] {
            assert!(!is_loopback_origin(bad), "{bad}");
        }
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let mut opts = HttpOptions {
            listen: "0.0.0.0:1".parse().unwrap(),
            token: None,
            token_owner: None,
            allowed_origins: vec![],
            shared_sandboxes: false,
        };
        assert!(matches!(check_options(&opts), Err(HttpError::TokenRequired(_))));
        opts.token = Some("short".into());
        assert!(matches!(check_options(&opts), Err(HttpError::BadToken)));
        opts.token = Some("a-long-enough-secret-token".into());
        assert!(check_options(&opts).is_ok());
        opts.listen = "127.0.0.1:1".parse().unwrap();
        opts.token = None;
        assert!(check_options(&opts).is_ok());
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
