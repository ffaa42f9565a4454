//! Reading what a guest sent first on a TCP connection to port 80 or 443: the server name of a
//! TLS ClientHello ([`parse_tls_sni`]) or the `Host` of an HTTP/1.x request
//! ([`parse_http_host`]), mapped to the broker's [`FirstBytes`] by [`scan`].
//!
//! The bytes come from the guest, so everything here is hostile-input safe: no panics, no
//! allocation beyond the input, every length checked against what is present and against a
//! cap. Each parser answers one of three things: found (or a well-formed message without the
//! name), "need more bytes" (what is there is a valid prefix), or "not this protocol". A prefix
//! that has been decided never changes its answer when more bytes follow (the fuzz helper
//! [`fuzz_scan`] checks that). Ambiguous messages (two host names, an `absolute-form` target
//! that disagrees with `Host`, folded headers, bare line feeds) are "not this protocol": the
//! policy then refuses rather than guess which name the server would use.
//!
//! This module only reads; it never decides what is allowed (the daemon's policy does).

mod http;
mod tls;

pub use http::parse_http_host;
pub use tls::parse_tls_sni;

use super::broker::{FirstBytes, MAX_DNS_NAME_BYTES};

/// Most bytes the worker buffers (and these parsers read) before it gives up and reports
/// [`FirstBytes::Unrecognized`]: one full TLS record and its header, with room to spare.
pub const MAX_FIRST_BYTES: usize = 18 * 1024;
/// Largest ClientHello handshake message accepted, in bytes (body, without its 4-byte header).
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;
/// Largest TLS record payload (RFC 8446 §5.1: 2^14).
const MAX_TLS_RECORD_BYTES: usize = 16 * 1024;
/// Longest HTTP request head (request line and headers, through the blank line), in bytes.
pub const MAX_HTTP_HEAD_BYTES: usize = 8 * 1024;
/// Longest HTTP method token.
const MAX_HTTP_METHOD_BYTES: usize = 16;

/// TLS content type of handshake records.
const TLS_HANDSHAKE: u8 = 0x16;
/// TLS handshake type of a ClientHello.
const TLS_CLIENT_HELLO: u8 = 0x01;
/// TLS extension type `server_name` (RFC 6066 §3).
const TLS_EXT_SERVER_NAME: u16 = 0;
/// `NameType` `host_name` in a `server_name` extension (RFC 6066 §3).
const TLS_NAME_TYPE_HOST: u8 = 0;

/// What [`parse_tls_sni`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniResult {
    /// A complete ClientHello naming this server (lower case, without a trailing dot).
    Found(String),
    /// A complete, well-formed ClientHello without a `server_name`.
    NoServerName,
    /// A valid prefix of a ClientHello: more bytes are needed.
    NeedMore,
    /// Not a TLS ClientHello (or one too malformed or too ambiguous to read): why.
    NotTls(&'static str),
}

/// What [`parse_http_host`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostResult {
    /// A complete request head naming this host (lower case, without port or trailing dot;
    /// an IP literal in its standard text form, without brackets).
    Found(String),
    /// A complete request head without a host (no `Host` header, or an empty one).
    NoHost,
    /// A valid prefix of an HTTP/1.x request head: more bytes are needed.
    NeedMore,
    /// Not an HTTP/1.x request (or one too malformed or too ambiguous to read): why.
    NotHttp(&'static str),
}

/// What [`scan`] makes of the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Decided: more bytes would not change the answer.
    Done(FirstBytes),
    /// Could still become a TLS ClientHello or an HTTP request: wait for more bytes (up to
    /// [`MAX_FIRST_BYTES`]).
    NeedMore,
}

impl Scan {
    /// The answer to report when no more bytes will come (the guest waits for the server, or
    /// the buffer is full): an undecided scan is [`FirstBytes::Unrecognized`].
    pub fn or_unrecognized(self) -> FirstBytes {
        match self {
            Scan::Done(first) => first,
            Scan::NeedMore => FirstBytes::Unrecognized,
        }
    }
}

/// Maps the first bytes the guest sent on a connection to what the broker reports. Bytes past
/// [`MAX_FIRST_BYTES`] are not read; an input that long and still undecided is unrecognized.
pub fn scan(bytes: &[u8]) -> Scan {
    let bytes = &bytes[..bytes.len().min(MAX_FIRST_BYTES)];
    let tls = parse_tls_sni(bytes);
    if let SniResult::Found(name) = tls {
        return Scan::Done(FirstBytes::TlsServerName(name));
    }
    let http = parse_http_host(bytes);
    if let HostResult::Found(host) = http {
        return Scan::Done(FirstBytes::HttpHost(host));
    }
    let undecided = tls == SniResult::NeedMore || http == HostResult::NeedMore;
    if undecided && bytes.len() < MAX_FIRST_BYTES {
        Scan::NeedMore
    } else {
        Scan::Done(FirstBytes::Unrecognized)
    }
}

/// `bytes` as a DNS name in the form the policy compares: lower case, no trailing dot, each
/// label 1 to 63 of letters, digits, `-` and `_`, at most [`MAX_DNS_NAME_BYTES`] in all.
fn dns_name(bytes: &[u8]) -> Option<String> {
    let bytes = bytes.strip_suffix(b".").unwrap_or(bytes);
    if bytes.is_empty() || bytes.len() > MAX_DNS_NAME_BYTES {
        return None;
    }
    let label_ok = |label: &[u8]| {
        (1..=63).contains(&label.len()) && label.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    };
    if !bytes.split(|&b| b == b'.').all(label_ok) {
        return None;
    }
    Some(String::from_utf8_lossy(bytes).to_ascii_lowercase())
}

/// How far one input got through [`fuzz_scan`]; the smoke test checks each occurs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstBytesOutcome {
    /// A TLS server name was found.
    TlsServerName,
    /// An HTTP host was found.
    HttpHost,
    /// Decided as unrecognized.
    Unrecognized,
    /// Still undecided.
    NeedMore,
}

/// Fuzz entry point: runs [`scan`] (and both parsers) over `data` and over prefixes of it, and
/// panics if a decided prefix changes its answer when more bytes come, which would be a bug.
/// Used by the cargo-fuzz target `vmm/fuzz/fuzz_targets/first_bytes.rs` and the stable smoke
/// test `vmm/tests/virtio_fuzz_smoke.rs`.
pub fn fuzz_scan(data: &[u8]) -> FirstBytesOutcome {
    let full = scan(data);
    let (tls, http) = (parse_tls_sni(data), parse_http_host(data));
    // Every prefix for short inputs; a sample of cut points for long ones.
    let step = (data.len() / 256).max(1);
    for cut in (0..data.len()).step_by(step) {
        let prefix = &data[..cut];
        if let decided @ Scan::Done(_) = scan(prefix) {
            assert_eq!(decided, full, "the scan of a {cut}-byte prefix changed with more bytes");
        }
        let prefix_tls = parse_tls_sni(prefix);
        if prefix_tls != SniResult::NeedMore {
            assert_eq!(prefix_tls, tls, "the TLS answer of a {cut}-byte prefix changed");
        }
        let prefix_http = parse_http_host(prefix);
        if prefix_http != HostResult::NeedMore {
            assert_eq!(prefix_http, http, "the HTTP answer of a {cut}-byte prefix changed");
        }
    }
    match full {
        Scan::Done(FirstBytes::TlsServerName(_)) => FirstBytesOutcome::TlsServerName,
        Scan::Done(FirstBytes::HttpHost(_)) => FirstBytesOutcome::HttpHost,
        Scan::Done(FirstBytes::Unrecognized) => FirstBytesOutcome::Unrecognized,
        Scan::NeedMore => FirstBytesOutcome::NeedMore,
    }
}

#[cfg(test)]
mod tests;
