//! One connection to the daemon: the peer is checked (it must be the state directory's owner),
//! its hello line read, and then it is served for what it asked: MCP over the connection, an
//! HTTP listener held open while the connection lives, a listing of every sandbox, or a
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::hello::{Hello, Welcome, GOODBYE, HELLO_VERSION, MAX_HELLO_BYTES};
use super::socket::{my_uid, peer_uid};
use super::Daemon;
use crate::mcp::http::{self, HttpOptions};
use crate::mcp::{CapsuleMcp, OwnerSource};
use crate::ps;

/// How long a new connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection to its end.
pub async fn serve(daemon: Arc<Daemon>, stream: UnixStream) {
    match peer_uid(&stream) {
        Ok(uid) if uid == my_uid() => {}
        Ok(uid) => {
            tracing::warn!(uid, "refused a connection from another user");
            let (_, mut writer) = stream.into_split();
            let message = format!("refused: this capsule daemon serves uid {} only, and you are uid {uid}", my_uid());
            let _ = write_welcome(&mut writer, &refusal(message)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell who connected; refused");
            return;
        }
    }
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut reader)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(why)) => {
            let _ = write_welcome(&mut writer, &refusal(why)).await;
            return;
        }
        Err(_) => {
            let _ = write_welcome(&mut writer, &refusal(format!("no hello within {HELLO_TIMEOUT:?}"))).await;
            return;
        }
    };
    if hello.version() != HELLO_VERSION {
        let why = format!(
            "this daemon speaks hello version {HELLO_VERSION} and the client {}; run the same capsule binary for both \
             (or stop the daemon with `capsule shutdown`)",
            hello.version()
        );
        let _ = write_welcome(&mut writer, &refusal(why)).await;
        return;
    }
    match hello {
        Hello::Mcp { owner, settings, .. } => {
            let _client = daemon.client();
            if write_welcome(&mut writer, &welcome(&daemon, &settings)).await.is_err() {
                return;
            }
            let handler = CapsuleMcp::with_owner_source(
                daemon.manager.clone(),
                OwnerSource::Client { name: owner },
                daemon.shaping,
            );
            match handler.serve((reader, writer)).await {
                Ok(service) => {
                    tokio::select! {
                        _ = service.waiting() => {}
                        _ = daemon.shutdown.cancelled() => {}
                    }
                }
                Err(e) => tracing::debug!(error = %e, "an MCP client left before its session began"),
            }
        }
        Hello::Http { listener, settings, .. } => {
            let _client = daemon.client();
            serve_http_listener(&daemon, listener, &settings, reader, writer).await;
        }
        Hello::Ps { .. } => {
            let rows = ps::rows(&daemon.manager);
            if write_welcome(&mut writer, &welcome(&daemon, &daemon.settings_digest)).await.is_ok() {
                let line = serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into());
                let _ = writer.write_all(format!("{line}\n").as_bytes()).await;
            }
        }
        Hello::Shutdown { .. } => {
            let _ = write_welcome(&mut writer, &welcome(&daemon, &daemon.settings_digest)).await;
            tracing::info!("shutdown requested by a client");
            daemon.shutdown.cancel();
        }
    }
}

/// Reads the hello line (at most [`MAX_HELLO_BYTES`]).
async fn read_hello(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Hello, String> {
    let mut line = Vec::new();
    let read = reader.take(MAX_HELLO_BYTES as u64 + 1).read_until(b'\n', &mut line).await;
    match read {
        Ok(0) => Err("the connection closed before its hello".into()),
        Ok(_) if !line.ends_with(b"\n") => Err(format!("the hello is longer than {MAX_HELLO_BYTES} bytes")),
        Ok(_) => serde_json::from_slice(&line).map_err(|e| format!("the hello is not valid: {e}")),
        Err(e) => Err(format!("cannot read the hello: {e}")),
    }
}

fn refusal(message: String) -> Welcome {
    Welcome { pid: std::process::id(), ok: false, message: Some(message), bound: None }
}

/// The welcome for a client whose settings digest is `settings`.
fn welcome(daemon: &Daemon, settings: &str) -> Welcome {
    let message = (settings != daemon.settings_digest).then(|| {
        format!(
            "the capsule daemon (pid {}) already running for this state directory was started with other \
             settings than this command's; it keeps its own. Stop it with `capsule shutdown` to apply new ones",
            std::process::id()
        )
    });
    Welcome { pid: std::process::id(), ok: true, message, bound: None }
}

async fn write_welcome(writer: &mut tokio::net::unix::OwnedWriteHalf, welcome: &Welcome) -> std::io::Result<()> {
    let line = serde_json::to_string(welcome).map_err(std::io::Error::other)?;
    writer.write_all(format!("{line}\n").as_bytes()).await
}

/// Listens for streamable HTTP as `options` say until the holder's connection closes (or the
/// daemon shuts down).
async fn serve_http_listener(
    daemon: &Daemon,
    options: HttpOptions,
    settings: &str,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) {
    let routed = http::router_with_shutdown(daemon.manager.clone(), daemon.shaping, &options);
    let (router, end_sessions) = match routed {
        Ok(routed) => routed,
        Err(e) => {
            let _ = write_welcome(&mut writer, &refusal(e.to_string())).await;
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(options.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let _ = write_welcome(&mut writer, &refusal(format!("cannot listen on {}: {e}", options.listen))).await;
            return;
        }
    };
    let bound = listener.local_addr().ok();
    let mut answer = welcome(daemon, settings);
    answer.bound = bound;
    if write_welcome(&mut writer, &answer).await.is_err() {
        return;
    }
    tracing::info!(listen = ?bound, "HTTP listener open");
    let holder_gone = async move {
        // The holder sends nothing more: EOF (or an error) means it is gone.
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
    };
    let shutdown = daemon.shutdown.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = holder_gone => {}
                _ = shutdown.cancelled() => {
                    // A daemon that stops on purpose says so: the holder then stops too, where
                    // a daemon that died is started again.
                    let _ = writer.write_all(format!("{GOODBYE}\n").as_bytes()).await;
                }
            }
            // Open SSE streams would keep a graceful shutdown waiting forever.
            end_sessions();
        })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the HTTP listener failed");
    }
    tracing::info!(listen = ?bound, "HTTP listener closed");
}
