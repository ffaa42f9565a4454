//! `capsule serve`: the command MCP clients start. It reaches the daemon that owns its state
//! directory (starting one with its settings when none runs) and then, over stdio, relays MCP
//! between the client and the daemon; over HTTP, it asks the daemon to listen and holds that
//! listener open until it is stopped. Any number of `capsule serve` processes can share one
//! host; the sandboxes belong to the daemon and outlive them.
//!
//! Logs go to stderr only: stdout is the stdio transport.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::daemon::client::{self, ClientError};
use crate::daemon::hello::{Hello, GOODBYE, HELLO_VERSION};
use crate::daemon::open::{self, OpenError};
use crate::mcp::http::{self, HttpError, HttpOptions};
use crate::settings::{resolve, EngineChoice, SettingsArgs, SettingsError};

/// The MCP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// MCP over stdin/stdout (for clients that start capsule themselves).
    Stdio,
    /// Streamable HTTP at /mcp.
    Http,
}

/// Arguments of `capsule serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// MCP transport.
    #[arg(long, value_enum, default_value = "stdio", env = "CAPSULE_TRANSPORT")]
    pub transport: Transport,
    /// Whose sandboxes a stdio client's calls act on (default: the client's own name, from its
    /// MCP `clientInfo`). A restarted client with the same name finds its sandboxes again.
    #[arg(long, env = "CAPSULE_OWNER")]
    pub owner: Option<String>,
    /// Address for --transport http (loopback by default; off loopback needs --token).
    #[arg(long, default_value = "127.0.0.1:8765", env = "CAPSULE_LISTEN")]
    pub listen: SocketAddr,
    /// Bearer token required on every HTTP request.
    #[arg(long, env = "CAPSULE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With --token: the owner the token's requests act as, so that their sandboxes survive
    /// sessions and restarts (default: each HTTP session is an owner of its own).
    #[arg(long, env = "CAPSULE_TOKEN_OWNER")]
    pub token_owner: Option<String>,
    /// Allow this browser Origin (besides loopback ones); repeatable.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Let every HTTP session see every sandbox (default: each session sees its own).
    #[arg(long, env = "CAPSULE_SHARED_SANDBOXES")]
    pub shared_sandboxes: bool,
    /// The daemon's settings (used when this command has to start it).
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// Errors of `capsule serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Settings are invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// HTTP settings are unsafe or invalid.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The guest image could not be made ready.
    #[error(transparent)]
    Image(#[from] OpenError),
    /// The daemon could not be reached or refused.
    #[error(transparent)]
    Daemon(#[from] ClientError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Runs `capsule serve`.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    let resolved = resolve(&args.settings)?;
    if resolved.engine == EngineChoice::Kvm {
        // A first build takes minutes; do it here, where its progress reaches the user.
        open::build_missing_image()?;
    }
    match args.transport {
        Transport::Stdio => Ok(client::relay_stdio(&args.settings, &resolved, args.owner.clone())?),
        Transport::Http => {
            let options = HttpOptions {
                listen: args.listen,
                token: args.token.clone(),
                token_owner: args.token_owner.clone(),
                allowed_origins: args.allow_origins.clone(),
                shared_sandboxes: args.shared_sandboxes,
            };
            http::check_options(&options)?;
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Runtime)?;
            runtime.block_on(hold_http_listener(&args.settings, &resolved, options))
        }
    }
}

/// Asks the daemon to listen for HTTP and holds the listener open until SIGINT/SIGTERM. A
/// daemon that goes away (a crash, `kill -9`) is started again and asked again.
async fn hold_http_listener(
    settings: &SettingsArgs,
    resolved: &crate::settings::Resolved,
    options: HttpOptions,
) -> Result<(), ServeError> {
    let mut announced = false;
    loop {
        let (settings, resolved2, options2) = (settings.clone(), resolved.clone(), options.clone());
        let holding = tokio::task::spawn_blocking(move || {
            let stream = client::connect_or_start(&settings, &resolved2)?;
            let hello = Hello::Http { version: HELLO_VERSION, listener: options2, settings: resolved2.digest() };
            let (reader, welcome) = client::greet(&stream, &hello)?;
            Ok::<_, ClientError>((stream, reader, welcome))
        })
        .await
        .map_err(|e| ServeError::Runtime(std::io::Error::other(e)))?;
        let (stream, reader, welcome) = holding?;
        if !announced {
            let bound = welcome.bound.unwrap_or(options.listen);
            // The one line on stderr that scripts wait for.
            eprintln!("capsule: serving MCP at http://{bound}{}", http::MCP_PATH);
            announced = true;
        } else {
            eprintln!("capsule: the daemon was restarted and listens again");
        }
        // The daemon sends nothing more: end of stream means it is gone.
        drop(reader);
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream))
            .map_err(|e| ServeError::Daemon(ClientError::Io(e)))?;
        let daemon_gone = async move {
            let mut stream = stream;
            let mut said = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut said).await;
            said
        };
        tokio::select! {
            _ = crate::daemon::shutdown_signal() => return Ok(()),
            said = daemon_gone => {
                if String::from_utf8_lossy(&said).contains(GOODBYE) {
                    eprintln!("capsule: the daemon was shut down (capsule shutdown); stopping");
                    return Ok(());
                }
                eprintln!("capsule: the daemon went away; starting it again");
            }
        }
    }
}

/// The state directory `settings` name, for commands that only talk to a daemon.
pub fn state_dir(settings: &SettingsArgs) -> Result<PathBuf, ServeError> {
    Ok(resolve(settings)?.state_dir)
}
