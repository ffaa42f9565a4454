//! The host of an HTTP/1.x request head (RFC 9112), read without trust.

use super::{dns_name, HostResult, MAX_HTTP_HEAD_BYTES, MAX_HTTP_METHOD_BYTES};

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
