//! The first line of every connection to the daemon: who is calling and for what, and the
//! daemon's answer. After an MCP hello, the connection carries MCP (newline-delimited JSON-RPC)
//! both ways; an HTTP hello holds a listener open for as long as the connection lives; a
//! `ps` or `shutdown` hello gets one answer line.
//!
//! One JSON object per line, at most [`MAX_HELLO_BYTES`].

use serde::{Deserialize, Serialize};

use crate::mcp::http::HttpOptions;

/// Version of this handshake.
pub const HELLO_VERSION: u32 = 1;
/// The line a daemon that stops on purpose sends its HTTP holders before it closes their
/// connections (a daemon that dies sends nothing).
pub const GOODBYE: &str = "{\"goodbye\":\"the capsule daemon was shut down\"}";
/// Longest hello line, in bytes.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// What a client asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Hello {
    /// Serve MCP on this connection (a stdio relay).
    Mcp {
        /// Handshake version.
        version: u32,
        /// The owner its sandboxes belong to; `None`: the MCP client's `clientInfo.name`.
        owner: Option<String>,
        /// A digest of the caller's settings, to warn when they differ from the daemon's.
        settings: String,
    },
    /// Listen for streamable HTTP while this connection stays open.
    Http {
        /// Handshake version.
        version: u32,
        /// The listener's settings.
        listener: HttpOptions,
        /// A digest of the caller's settings.
        settings: String,
    },
    /// List every sandbox of the daemon (one [`Welcome`] then one JSON line).
    Ps {
        /// Handshake version.
        version: u32,
    },
    /// Pause every running sandbox and exit.
    Shutdown {
        /// Handshake version.
        version: u32,
    },
}

impl Hello {
    /// The handshake version the caller speaks.
    pub fn version(&self) -> u32 {
        match self {
            Hello::Mcp { version, .. }
            | Hello::Http { version, .. }
            | Hello::Ps { version }
            | Hello::Shutdown { version } => *version,
        }
    }
}

/// The daemon's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The daemon's pid.
    pub pid: u32,
    /// Whether the request is accepted.
    pub ok: bool,
    /// Why not, or a warning (settings that differ), for the caller to print.
    pub message: Option<String>,
    /// For an HTTP hello: the address actually bound.
    pub bound: Option<std::net::SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_as_one_json_line() {
        let hello = Hello::Mcp { version: HELLO_VERSION, owner: Some("claude-code".into()), settings: "x".into() };
        let line = serde_json::to_string(&hello).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains("\"role\":\"mcp\""), "{line}");
        assert_eq!(serde_json::from_str::<Hello>(&line).unwrap(), hello);
        assert!(serde_json::from_str::<Hello>("{\"role\":\"root-shell\",\"version\":1}").is_err());
    }
}
