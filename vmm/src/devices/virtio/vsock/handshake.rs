//! The hybrid-vsock handshake on the device's host Unix socket (Firecracker's): a host process
//! connects, sends `CONNECT <port>\n` naming the guest port, and once the guest accepts, the
//! VMM answers `OK <local port>\n`; bytes after those lines are the stream. This is the one
//! definition of the two lines, for the muxer and for host clients (the agent client).
//!
//! It owns the line format only; it never does I/O and never decides what a port means.

/// What a host stream sends first, before the port.
pub const CONNECT_PREFIX: &str = "CONNECT ";
/// What the VMM answers once the guest accepted, before the local port.
pub const OK_PREFIX: &str = "OK ";
/// Longest `CONNECT <port>\n` line the muxer reads, in bytes.
pub const MAX_CONNECT_LINE_BYTES: usize = 32;

/// The line a host process sends to reach guest `port`: `CONNECT <port>\n`.
pub fn connect_line(port: u32) -> String {
    format!("{CONNECT_PREFIX}{port}\n")
}

/// Parses `CONNECT <port>` (without the newline; a trailing `\r` and blanks around the port
/// are accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    parse_line(line, CONNECT_PREFIX)
}

/// The VMM's answer once the guest accepted: `OK <local_port>\n`.
pub fn ok_line(local_port: u32) -> String {
    format!("{OK_PREFIX}{local_port}\n")
}

/// Parses `OK <port>` (without the newline), as [`parse_connect_line`] does.
pub fn parse_ok_line(line: &[u8]) -> Option<u32> {
    parse_line(line, OK_PREFIX)
}

fn parse_line(line: &[u8], prefix: &str) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.strip_prefix(prefix)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_parses_back_to_its_port() {
        for port in [0, 52, 1 << 30, u32::MAX] {
            let line = connect_line(port);
            assert!(line.len() <= MAX_CONNECT_LINE_BYTES, "{line:?}");
            assert_eq!(parse_connect_line(line.strip_suffix('\n').unwrap().as_bytes()), Some(port));
            let ok = ok_line(port);
            assert_eq!(parse_ok_line(ok.strip_suffix('\n').unwrap().as_bytes()), Some(port));
        }
        assert_eq!(parse_connect_line(b"CONNECT 7\r"), Some(7));
        assert_eq!(parse_connect_line(b"HELLO there"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"OK 7"), None);
        assert_eq!(parse_ok_line(b"CONNECT 7"), None);
    }
}
