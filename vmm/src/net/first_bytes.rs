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

/// A bounds-checked reader over a byte slice: every read says whether the bytes were there.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A `u8`-length-prefixed vector.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A `u16`-length-prefixed vector.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Reads the server name of the TLS ClientHello at the start of `bytes`.
///
/// Layout (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2, RFC 6066 §3): records of 5-byte headers
/// (content type 22, version 3.x, 16-bit length up to 2^14) whose payloads, concatenated,
/// hold the handshake message: type 1, 24-bit length, then `legacy_version` (2), `random`
/// (32), `session_id` (u8-prefixed, at most 32), `cipher_suites` (u16-prefixed, even, not
/// empty), `compression_methods` (u8-prefixed, not empty), and optionally `extensions`
/// (u16-prefixed, filling the rest), each a 16-bit type and a u16-prefixed body. The
/// `server_name` extension (type 0) holds a u16-prefixed list of (u8 type, u16-prefixed name);
/// type 0 is `host_name`. A ClientHello may be split over several handshake records; any other
/// record before it ends is refused.
pub fn parse_tls_sni(bytes: &[u8]) -> SniResult {
    // The handshake bytes collected so far, at most the header and MAX_CLIENT_HELLO_BYTES.
    let mut message: Vec<u8> = Vec::new();
    let mut rest = bytes;
    loop {
        // Record header: check each byte as soon as it is there, so other protocols are told
        // apart after their first byte.
        match rest.first() {
            None => return SniResult::NeedMore,
            Some(&TLS_HANDSHAKE) => {}
            Some(_) if message.is_empty() => return SniResult::NotTls("not a TLS handshake record"),
            Some(_) => return SniResult::NotTls("the ClientHello is interrupted by another record"),
        }
        match rest.get(1) {
            None => return SniResult::NeedMore,
            Some(3) => {}
            Some(_) => return SniResult::NotTls("not a TLS record version"),
        }
        match rest.get(2) {
            None => return SniResult::NeedMore,
            Some(minor) if *minor <= 4 => {}
            Some(_) => return SniResult::NotTls("not a TLS record version"),
        }
        let Some(len) = rest.get(3..5).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return SniResult::NeedMore;
        };
        if len == 0 || len > MAX_TLS_RECORD_BYTES {
            return SniResult::NotTls("a TLS record length out of range");
        }
        let available = rest.len() - 5;
        let payload = &rest[5..5 + len.min(available)];
        if message.len() + payload.len() > 4 + MAX_CLIENT_HELLO_BYTES {
            return SniResult::NotTls("the ClientHello is too long");
        }
        message.extend_from_slice(payload);

        // Handshake header.
        if let Some(&kind) = message.first() {
            if kind != TLS_CLIENT_HELLO {
                return SniResult::NotTls("not a ClientHello");
            }
        }
        if message.len() >= 4 {
            let body_len = usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
            if body_len > MAX_CLIENT_HELLO_BYTES {
                return SniResult::NotTls("the ClientHello is too long");
            }
            if message.len() >= 4 + body_len {
                return client_hello_server_name(&message[4..4 + body_len]);
            }
        }
        if available < len {
            return SniResult::NeedMore;
        }
        rest = &rest[5 + len..];
    }
}

/// The server name of a complete ClientHello body.
fn client_hello_server_name(body: &[u8]) -> SniResult {
    const MALFORMED: SniResult = SniResult::NotTls("a malformed ClientHello");
    let mut r = Reader { bytes: body };
    let Some(version) = r.take(2) else { return MALFORMED };
    if version[0] != 3 {
        return SniResult::NotTls("not a TLS ClientHello version");
    }
    if r.take(32).is_none() {
        return MALFORMED;
    }
    match r.vec8() {
        Some(session_id) if session_id.len() <= 32 => {}
        _ => return MALFORMED,
    }
    match r.vec16() {
        Some(suites) if !suites.is_empty() && suites.len() % 2 == 0 => {}
        _ => return MALFORMED,
    }
    match r.vec8() {
        Some(methods) if !methods.is_empty() => {}
        _ => return MALFORMED,
    }
    if r.is_empty() {
        return SniResult::NoServerName;
    }
    let Some(extensions) = r.vec16() else { return MALFORMED };
    if !r.is_empty() {
        return MALFORMED;
    }
    let mut r = Reader { bytes: extensions };
    let mut found: Option<String> = None;
    let mut seen_server_name = false;
    while !r.is_empty() {
        let (Some(kind), Some(data)) = (r.u16(), r.vec16()) else { return MALFORMED };
        if kind != TLS_EXT_SERVER_NAME {
            continue;
        }
        if seen_server_name {
            return SniResult::NotTls("two server_name extensions");
        }
        seen_server_name = true;
        match server_name_extension(data) {
            Ok(name) => found = name,
            Err(why) => return SniResult::NotTls(why),
        }
    }
    match found {
        Some(name) => SniResult::Found(name),
        None => SniResult::NoServerName,
    }
}

/// The `host_name` of a `server_name` extension body, if it has one.
fn server_name_extension(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { bytes: data };
    let list = r.vec16().ok_or("a malformed server_name extension")?;
    if !r.is_empty() || list.is_empty() {
        return Err("a malformed server_name extension");
    }
    let mut r = Reader { bytes: list };
    let mut host = None;
    while !r.is_empty() {
        let (Some(kind), Some(name)) = (r.u8(), r.vec16()) else {
            return Err("a malformed server_name extension");
        };
        if kind != TLS_NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err("two host names in server_name");
        }
        host = Some(dns_name(name).ok_or("a server_name that is not a DNS name")?);
    }
    Ok(host)
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

/// `tchar` of RFC 9110 §5.6.2: the characters of a method or header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads the host of the HTTP/1.x request head at the start of `bytes` (RFC 9112).
///
/// The request line must be `method SP target SP HTTP/1.0|1.1 CRLF`; header lines end in
/// CRLF, and the head in an empty line. The host is the `Host` header (name matched without
/// regard to case), or the authority of an `absolute-form` or `authority-form` (CONNECT)
/// target, which must then agree with `Host` if both are there. More than one `Host`, obsolete
/// line folding, whitespace before a colon, control characters and lone CR or LF are refused.
pub fn parse_http_host(bytes: &[u8]) -> HostResult {
    let head = &bytes[..bytes.len().min(MAX_HTTP_HEAD_BYTES)];
    // The method, checked byte by byte so that other protocols are told apart at once.
    let method_end = head.iter().position(|&b| b == b' ');
    let method = &head[..method_end.unwrap_or(head.len())];
    if method.len() > MAX_HTTP_METHOD_BYTES || !method.iter().all(|&b| is_tchar(b)) {
        return HostResult::NotHttp("not an HTTP method");
    }
    if method_end == Some(0) {
        return HostResult::NotHttp("not an HTTP method");
    }
    let mut lines = Lines { rest: head };
    let request_line = match lines.next() {
        Line::Full(line) => line,
        Line::Partial => return need_more_http(bytes),
        Line::Bad(why) => return HostResult::NotHttp(why),
    };
    let target_host = match request_target_host(request_line) {
        Ok(host) => host,
        Err(why) => return HostResult::NotHttp(why),
    };
    let mut host_header: Option<Option<String>> = None;
    loop {
        let line = match lines.next() {
            Line::Full(line) => line,
            Line::Partial => return need_more_http(bytes),
            Line::Bad(why) => return HostResult::NotHttp(why),
        };
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return HostResult::NotHttp("folded HTTP header lines");
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return HostResult::NotHttp("an HTTP header line without a colon");
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return HostResult::NotHttp("not an HTTP header name");
        }
        if !value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
            return HostResult::NotHttp("control characters in an HTTP header");
        }
        if name.eq_ignore_ascii_case(b"host") {
            if host_header.is_some() {
                return HostResult::NotHttp("two Host headers");
            }
            let value = value.trim_ascii();
            if value.is_empty() {
                host_header = Some(None);
            } else {
                match authority_host(value) {
                    Some(host) => host_header = Some(Some(host)),
                    None => return HostResult::NotHttp("a Host header that is not a host"),
                }
            }
        }
    }
    match (target_host, host_header.flatten()) {
        (Some(target), Some(host)) if target != host => {
            HostResult::NotHttp("the request target and the Host header name different hosts")
        }
        (Some(host), _) | (None, Some(host)) => HostResult::Found(host),
        (None, None) => HostResult::NoHost,
    }
}

/// "Need more", unless the head is already as long as it may be.
fn need_more_http(bytes: &[u8]) -> HostResult {
    if bytes.len() >= MAX_HTTP_HEAD_BYTES {
        HostResult::NotHttp("the HTTP request head is too long")
    } else {
        HostResult::NeedMore
    }
}

/// One line of an HTTP head.
enum Line<'a> {
    /// A line without its CRLF.
    Full(&'a [u8]),
    /// The input ends inside a line.
    Partial,
    /// A lone CR or LF, or a NUL.
    Bad(&'static str),
}

/// Splits an HTTP head into CRLF-terminated lines.
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Line<'a> {
        for (i, &b) in self.rest.iter().enumerate() {
            match b {
                b'\r' => {
                    return match self.rest.get(i + 1) {
                        None => Line::Partial,
                        Some(b'\n') => {
                            let line = &self.rest[..i];
                            self.rest = &self.rest[i + 2..];
                            Line::Full(line)
                        }
                        Some(_) => Line::Bad("a lone CR in an HTTP head"),
                    }
                }
                b'\n' => return Line::Bad("a lone LF in an HTTP head"),
                0 => return Line::Bad("a NUL in an HTTP head"),
                _ => {}
            }
        }
        Line::Partial
    }
}

/// Checks a request line and returns the host its target names, if it names one.
fn request_target_host(line: &[u8]) -> Result<Option<String>, &'static str> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not an HTTP request line");
    };
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err("not an HTTP/1.x request");
    }
    if target.is_empty() || !target.iter().all(|&b| (b'!'..=b'~').contains(&b)) {
        return Err("not an HTTP request target");
    }
    if method == b"CONNECT" {
        return authority_host(target).map(Some).ok_or("a CONNECT target that is not a host");
    }
    if target[0] == b'/' || target == b"*" {
        return Ok(None);
    }
    // absolute-form: scheme "://" authority [path]
    let Some(sep) = target.windows(3).position(|w| w == b"://") else {
        return Err("not an HTTP request target");
    };
    let after = &target[sep + 3..];
    let end = after.iter().position(|&b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(after.len());
    authority_host(&after[..end]).map(Some).ok_or("a request target whose authority is not a host")
}

/// The host of an authority `host[:port]` or `[v6]:port` (no user info), normalized.
fn authority_host(authority: &[u8]) -> Option<String> {
    let port_ok = |port: &[u8]| port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    if let Some(inner) = authority.strip_prefix(b"[") {
        let close = inner.iter().position(|&b| b == b']')?;
        let after = &inner[close + 1..];
        if !(after.is_empty() || after.strip_prefix(b":").is_some_and(port_ok)) {
            return None;
        }
        let text = std::str::from_utf8(&inner[..close]).ok()?;
        return text.parse::<std::net::Ipv6Addr>().ok().map(|ip| ip.to_string());
    }
    let host = match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if port_ok(&authority[colon + 1..]) => &authority[..colon],
        Some(_) => return None,
        None => authority,
    };
    dns_name(host)
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
#[path = "first_bytes_tests.rs"]
mod tests;
