//! Tests of the first-bytes parsers, over ClientHellos written out byte by byte and HTTP heads.

use super::*;

/// A minimal TLS 1.2-style ClientHello for `example.com`, written out by hand.
#[rustfmt::skip]
const HELLO_EXAMPLE_COM: &[u8] = &[
    // TLS record header: handshake (22), version 3.1, length 0x0043 = 67 (4 + 63).
    0x16, 0x03, 0x01, 0x00, 0x43,
    // Handshake header: ClientHello (1), length 0x00003f = 63 (2 + 32 + 1 + 4 + 2 + 2 + 20).
    0x01, 0x00, 0x00, 0x3f,
    // legacy_version 3.3 (TLS 1.2).
    0x03, 0x03,
    // random: 32 bytes.
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
    // session_id: empty.
    0x00,
    // cipher_suites: 2 bytes, TLS_AES_128_GCM_SHA256 (0x1301).
    0x00, 0x02, 0x13, 0x01,
    // compression_methods: 1 byte, null (0).
    0x01, 0x00,
    // extensions: 0x0014 = 20 bytes.
    0x00, 0x14,
    // extension server_name (0), 0x0010 = 16 bytes:
    0x00, 0x00, 0x00, 0x10,
    //   server_name_list: 0x000e = 14 bytes; host_name (0), 0x000b = 11 bytes, "example.com".
    0x00, 0x0e, 0x00, 0x00, 0x0b,
    b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm',
];

/// A ClientHello body (after the handshake header) with the given session id and extensions,
/// laid out as in [`HELLO_EXAMPLE_COM`].
fn hello_body(session_id: &[u8], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.push(session_id.len() as u8);
    body.extend_from_slice(session_id);
    body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    body
}

/// The body of a `server_name` extension with these (type, name) entries.
fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in entries {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

/// A ClientHello handshake message in records of at most `record_len` payload bytes.
fn records(body: &[u8], record_len: usize) -> Vec<u8> {
    let mut message = vec![TLS_CLIENT_HELLO];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(body);
    let mut out = Vec::new();
    for chunk in message.chunks(record_len) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn hello_for(name: &[u8]) -> Vec<u8> {
    records(&hello_body(&[], &[(TLS_EXT_SERVER_NAME, sni_ext(&[(0, name)]))]), MAX_TLS_RECORD_BYTES)
}

#[test]
fn the_hand_written_client_hello_names_example_com() {
    assert_eq!(parse_tls_sni(HELLO_EXAMPLE_COM), SniResult::Found("example.com".into()));
    assert_eq!(scan(HELLO_EXAMPLE_COM), Scan::Done(FirstBytes::TlsServerName("example.com".into())));
    assert_eq!(hello_for(b"example.com")[..5], [0x16, 0x03, 0x01, 0x00, 0x45]);
}

#[test]
fn every_truncation_of_a_client_hello_needs_more() {
    for cut in 0..HELLO_EXAMPLE_COM.len() {
        assert_eq!(parse_tls_sni(&HELLO_EXAMPLE_COM[..cut]), SniResult::NeedMore, "cut at {cut}");
        assert_eq!(scan(&HELLO_EXAMPLE_COM[..cut]), Scan::NeedMore, "cut at {cut}");
    }
    assert_eq!(scan(&HELLO_EXAMPLE_COM[..10]).or_unrecognized(), FirstBytes::Unrecognized);
}

#[test]
fn bytes_after_a_complete_client_hello_change_nothing() {
    let mut bytes = HELLO_EXAMPLE_COM.to_vec();
    bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0xff, 0xff, 0xde, 0xad]);
    assert_eq!(parse_tls_sni(&bytes), SniResult::Found("example.com".into()));
}

#[test]
fn the_server_name_is_found_among_other_extensions() {
    let supported_versions = (43u16, vec![0x02, 0x03, 0x04]);
    let alpn = (16u16, b"\x00\x03\x02h2".to_vec());
    let padding = (21u16, vec![0; 300]);
    let body = hello_body(
        &[7; 32],
        &[supported_versions, alpn, (TLS_EXT_SERVER_NAME, sni_ext(&[(0, b"API.Good.com.")])), padding],
    );
    assert_eq!(parse_tls_sni(&records(&body, MAX_TLS_RECORD_BYTES)), SniResult::Found("api.good.com".into()));
}

#[test]
fn a_client_hello_split_over_records_is_reassembled() {
    let body = hello_body(&[], &[(TLS_EXT_SERVER_NAME, sni_ext(&[(0, b"split.example")]))]);
    for record_len in [1, 7, 40, 100] {
        assert_eq!(parse_tls_sni(&records(&body, record_len)), SniResult::Found("split.example".into()));
    }
    // Another record type in the middle is refused.
    let mut bytes = records(&body, 40);
    bytes.splice(45..45, [0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
    assert_eq!(parse_tls_sni(&bytes), SniResult::NotTls("the ClientHello is interrupted by another record"));
}

#[test]
fn a_client_hello_without_server_name_says_so() {
    let no_ext = records(&hello_body(&[], &[(10, vec![0, 2, 0, 0x1d])]), MAX_TLS_RECORD_BYTES);
    assert_eq!(parse_tls_sni(&no_ext), SniResult::NoServerName);
    // No extensions block at all (TLS 1.0 style).
    let mut body = hello_body(&[], &[]);
    body.truncate(body.len() - 2);
    assert_eq!(parse_tls_sni(&records(&body, MAX_TLS_RECORD_BYTES)), SniResult::NoServerName);
    // A server_name list with only a non-host_name entry.
    let other = records(&hello_body(&[], &[(0, sni_ext(&[(7, b"x")]))]), MAX_TLS_RECORD_BYTES);
    assert_eq!(parse_tls_sni(&other), SniResult::NoServerName);
    assert_eq!(scan(&no_ext), Scan::Done(FirstBytes::Unrecognized));
}

#[test]
fn ambiguous_server_names_are_refused() {
    let two_names = hello_body(&[], &[(0, sni_ext(&[(0, b"good.com"), (0, b"evil.com")]))]);
    assert_eq!(parse_tls_sni(&records(&two_names, 16384)), SniResult::NotTls("two host names in server_name"));
    let two_ext = hello_body(&[], &[(0, sni_ext(&[(0, b"good.com")])), (0, sni_ext(&[(0, b"evil.com")]))]);
    assert_eq!(parse_tls_sni(&records(&two_ext, 16384)), SniResult::NotTls("two server_name extensions"));
    for bad in [&b"evil com"[..], b"", b"a..b", b"ev\0il.com", b"\xff.com", &[b'a'; 64][..], &[b'a'; 300][..]] {
        assert!(matches!(parse_tls_sni(&hello_for(bad)), SniResult::NotTls(_)), "{bad:?}");
    }
}

#[test]
fn huge_and_inconsistent_lengths_are_refused() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x16, 0x03, 0x01, 0xff, 0xff], "a TLS record length out of range"),
        (&[0x16, 0x03, 0x01, 0x00, 0x00], "a TLS record length out of range"),
        (&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff], "the ClientHello is too long"),
        (&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00], "not a ClientHello"),
        (&[0x16, 0x02, 0x01], "not a TLS record version"),
        (&[0x16, 0x03, 0x09], "not a TLS record version"),
        (&[0x15, 0x03, 0x01], "not a TLS handshake record"),
    ];
    for (bytes, why) in cases {
        assert_eq!(parse_tls_sni(bytes), SniResult::NotTls(why), "{bytes:02x?}");
    }
    // Lengths inside the body that run past its end.
    let mut body = hello_body(&[], &[(0, sni_ext(&[(0, b"a.com")]))]);
    let last = body.len() - 1;
    body[34] = 33; // session id longer than 32 and than the body
    assert_eq!(parse_tls_sni(&records(&body, 16384)), SniResult::NotTls("a malformed ClientHello"));
    body[34] = 0;
    body[last - 8] = 0xff; // the server_name list length
    assert!(matches!(parse_tls_sni(&records(&body, 16384)), SniResult::NotTls(_)));
}

#[test]
fn garbage_is_not_tls_and_not_http() {
    for bytes in
        [&b"\x00\x00\x00\x00"[..], b"SSH-2.0-OpenSSH_9.6\r\n", b"\xff\xfe", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    {
        assert!(matches!(parse_tls_sni(bytes), SniResult::NotTls(_)), "{bytes:?}");
        assert_eq!(scan(bytes), Scan::Done(FirstBytes::Unrecognized), "{bytes:?}");
    }
    assert_eq!(scan(&[0x16; MAX_FIRST_BYTES + 10]), Scan::Done(FirstBytes::Unrecognized));
}

#[test]
fn http_host_is_found_case_insensitively_without_port() {
    let req = b"GET /simple/ HTTP/1.1\r\nUser-Agent: pip\r\nhOsT:  Pkgs.example:8080 \r\nAccept: */*\r\n\r\nbody";
    assert_eq!(parse_http_host(req), HostResult::Found("pkgs.example".into()));
    assert_eq!(scan(req), Scan::Done(FirstBytes::HttpHost("pkgs.example".into())));
    let v6 = b"HEAD / HTTP/1.0\r\nHost: [2001:DB8::1]:80\r\n\r\n";
    assert_eq!(parse_http_host(v6), HostResult::Found("2001:db8::1".into()));
    let v4 = b"POST /x HTTP/1.1\r\nHost: 93.184.216.34\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(parse_http_host(v4), HostResult::Found("93.184.216.34".into()));
}

#[test]
fn absolute_and_connect_targets_must_agree_with_host() {
    let absolute = b"GET http://good.com/path HTTP/1.1\r\nHost: good.com\r\n\r\n";
    assert_eq!(parse_http_host(absolute), HostResult::Found("good.com".into()));
    let fronted = b"GET http://evil.com/ HTTP/1.1\r\nHost: good.com\r\n\r\n";
    assert!(matches!(parse_http_host(fronted), HostResult::NotHttp(_)));
    let connect = b"CONNECT evil.com:443 HTTP/1.1\r\n\r\n";
    assert_eq!(parse_http_host(connect), HostResult::Found("evil.com".into()));
    let no_host_header = b"GET http://only.target:81?q HTTP/1.1\r\n\r\n";
    assert_eq!(parse_http_host(no_host_header), HostResult::Found("only.target".into()));
}

#[test]
fn http_without_host_says_so() {
    assert_eq!(parse_http_host(b"GET / HTTP/1.0\r\n\r\n"), HostResult::NoHost);
    assert_eq!(parse_http_host(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"), HostResult::NoHost);
    assert_eq!(scan(b"GET / HTTP/1.0\r\n\r\n"), Scan::Done(FirstBytes::Unrecognized));
}

#[test]
fn truncated_http_needs_more() {
    let req = b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n";
    for cut in 0..req.len() {
        assert_eq!(parse_http_host(&req[..cut]), HostResult::NeedMore, "cut at {cut}");
    }
    let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HTTP_HEAD_BYTES]].concat();
    assert_eq!(parse_http_host(&long), HostResult::NotHttp("the HTTP request head is too long"));
}

#[test]
fn malformed_or_ambiguous_http_is_refused() {
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: y\r\n Host: b.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.com\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a.com\n\n",
        b"GET / HTTP/1.1\r\nHost: a.com\rX\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.com:http\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.com\x01\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a.com\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b" GET / HTTP/1.1\r\n\r\n",
        b"GETTINGVERYLONGMETHODNAME / HTTP/1.1\r\n\r\n",
        b"G\xc3\xa9T / HTTP/1.1\r\n\r\n",
        b"GET relative HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
    ];
    for bytes in cases {
        assert!(matches!(parse_http_host(bytes), HostResult::NotHttp(_)), "{:?}", String::from_utf8_lossy(bytes));
    }
}

#[test]
fn the_fuzz_helper_reaches_every_outcome() {
    assert_eq!(fuzz_scan(HELLO_EXAMPLE_COM), FirstBytesOutcome::TlsServerName);
    assert_eq!(fuzz_scan(b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n"), FirstBytesOutcome::HttpHost);
    assert_eq!(fuzz_scan(b"\x00garbage"), FirstBytesOutcome::Unrecognized);
    assert_eq!(fuzz_scan(b"GET / HT"), FirstBytesOutcome::NeedMore);
}
