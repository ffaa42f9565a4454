//! The server name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), read without trust.

use super::{
    dns_name, SniResult, MAX_CLIENT_HELLO_BYTES, MAX_TLS_RECORD_BYTES, TLS_CLIENT_HELLO, TLS_EXT_SERVER_NAME,
    TLS_HANDSHAKE, TLS_NAME_TYPE_HOST,
};

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
