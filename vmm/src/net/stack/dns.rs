//! The DNS wire format, as far as the sandbox's resolver needs it: reading one query (one
//! question, class IN) and writing its answer (A or AAAA records, or an error code).
//!
//! Queries come from the guest: the parser reads at most [`MAX_DNS_QUERY_BYTES`], checks every
//! length against what is there, takes no compression pointers (a query's question never needs
//! them) and accepts only names the broker accepts (letters, digits, `-`, `_`; labels of 1 to
//! 63; at most [`MAX_DNS_NAME_BYTES`]). It never panics; [`fuzz_dns_query`] is the fuzz entry
//! point. Answers are at most [`MAX_DNS_ANSWER_BYTES`] (plain UDP DNS, no EDNS): records that
//! do not fit are left out. It only reads and writes bytes; what is resolved is not decided here.

use std::net::IpAddr;

use thiserror::Error;

use crate::net::broker::MAX_DNS_NAME_BYTES;

/// Longest query read, in bytes (longer datagrams are dropped).
pub const MAX_DNS_QUERY_BYTES: usize = 1232;
/// Longest answer written, in bytes (RFC 1035 §4.2.1, UDP without EDNS).
pub const MAX_DNS_ANSWER_BYTES: usize = 512;
/// Bytes of a DNS header.
const HEADER_BYTES: usize = 12;
/// Record type A (RFC 1035).
pub const TYPE_A: u16 = 1;
/// Record type AAAA (RFC 3596).
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
const CLASS_IN: u16 = 1;
/// A compression pointer to the question's name, at offset 12 (RFC 1035 §4.1.4).
const NAME_POINTER_TO_QUESTION: [u8; 2] = [0xc0, 0x0c];

/// Response codes (RFC 1035 §4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// No error.
    NoError = 0,
    /// The query could not be read.
    FormErr = 1,
    /// The resolver failed.
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// The kind of query is not supported.
    NotImp = 4,
    /// The resolver will not answer this (policy).
    Refused = 5,
}

/// Why a datagram is not a query the resolver answers.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than a header, or longer than [`MAX_DNS_QUERY_BYTES`]: dropped unanswered.
    #[error("a DNS message of {0} bytes is not a query")]
    Length(usize),
    /// A response, not a query: dropped unanswered.
    #[error("a DNS response, not a query")]
    NotAQuery,
    /// An opcode other than QUERY.
    #[error("DNS opcode {0} is not supported")]
    Opcode(u8),
    /// Not exactly one question, or answer/authority records in a query.
    #[error("a DNS query must ask exactly one question")]
    Questions,
    /// The question is cut short or its name is malformed.
    #[error("the DNS question is malformed: {0}")]
    Malformed(&'static str),
    /// A well-formed name the resolver does not forward (characters outside the DNS hostname
    /// set, or the root).
    #[error("the DNS name is not one the resolver forwards")]
    Name,
    /// A class other than IN.
    #[error("DNS class {0} is not supported")]
    Class(u16),
}

impl DnsError {
    /// The code to answer with, or `None` to drop the datagram unanswered.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            DnsError::Length(_) | DnsError::NotAQuery => None,
            DnsError::Opcode(_) => Some(Rcode::NotImp),
            DnsError::Questions | DnsError::Malformed(_) => Some(Rcode::FormErr),
            DnsError::Name | DnsError::Class(_) => Some(Rcode::Refused),
        }
    }
}

/// A query the resolver can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The query's id, echoed in the answer.
    pub id: u16,
    /// Whether the guest asked for recursion (echoed).
    pub recursion_desired: bool,
    /// The name asked, lower case, without a trailing dot.
    pub name: String,
    /// The record type asked.
    pub qtype: u16,
    /// The question as the guest wrote it (name, type, class), echoed in the answer so the
    /// guest's case randomisation matches.
    question: Vec<u8>,
}

/// Reads the query `bytes`.
pub fn parse_query(bytes: &[u8]) -> Result<Query, DnsError> {
    if bytes.len() < HEADER_BYTES || bytes.len() > MAX_DNS_QUERY_BYTES {
        return Err(DnsError::Length(bytes.len()));
    }
    let word = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let id = word(0);
    let flags = word(2);
    if flags & 0x8000 != 0 {
        return Err(DnsError::NotAQuery);
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    if opcode != 0 {
        return Err(DnsError::Opcode(opcode));
    }
    // Additional records (an EDNS OPT) are allowed and ignored.
    if word(4) != 1 || word(6) != 0 || word(8) != 0 {
        return Err(DnsError::Questions);
    }
    let mut at = HEADER_BYTES;
    let mut name = String::new();
    loop {
        let Some(&len) = bytes.get(at) else {
            return Err(DnsError::Malformed("the name runs past the end"));
        };
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return Err(DnsError::Malformed("a compressed or extended label"));
        }
        let Some(label) = bytes.get(at..at + len as usize) else {
            return Err(DnsError::Malformed("a label runs past the end"));
        };
        at += len as usize;
        if !name.is_empty() {
            name.push('.');
        }
        if name.len() + label.len() > MAX_DNS_NAME_BYTES {
            return Err(DnsError::Malformed("the name is too long"));
        }
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) {
            return Err(DnsError::Name);
        }
        name.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
    }
    let Some(fixed) = bytes.get(at..at + 4) else {
        return Err(DnsError::Malformed("the question's type and class are missing"));
    };
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    if qclass != CLASS_IN {
        return Err(DnsError::Class(qclass));
    }
    if name.is_empty() {
        return Err(DnsError::Name);
    }
    Ok(Query {
        id,
        recursion_desired: flags & 0x0100 != 0,
        name,
        qtype,
        question: bytes[HEADER_BYTES..at + 4].to_vec(),
    })
}

/// The answer to `query`: `rcode`, and one record per address in `addrs` that matches the type
/// asked (as many as fit in [`MAX_DNS_ANSWER_BYTES`]), each cacheable for `ttl_s` seconds.
pub fn answer(query: &Query, rcode: Rcode, addrs: &[IpAddr], ttl_s: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_DNS_ANSWER_BYTES);
    out.extend_from_slice(&query.id.to_be_bytes());
    let rd = if query.recursion_desired { 0x0100 } else { 0 };
    // QR, RD as asked, RA.
    out.extend_from_slice(&(0x8000u16 | rd | 0x0080 | rcode as u16).to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&query.question);
    let mut count = 0u16;
    for addr in addrs {
        let (rtype, data): (u16, Vec<u8>) = match (query.qtype, addr) {
            (TYPE_A, IpAddr::V4(v4)) => (TYPE_A, v4.octets().to_vec()),
            (TYPE_AAAA, IpAddr::V6(v6)) => (TYPE_AAAA, v6.octets().to_vec()),
            _ => continue,
        };
        if out.len() + 12 + data.len() > MAX_DNS_ANSWER_BYTES {
            break;
        }
        out.extend_from_slice(&NAME_POINTER_TO_QUESTION);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl_s.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
        count += 1;
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out
}

/// An error answer to a datagram that is no query the resolver reads: the header's id and
/// `rcode`, no question. `None` when `bytes` has no header or is not a query.
pub fn error_reply(bytes: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    let header = bytes.get(..HEADER_BYTES)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let mut out = vec![0u8; HEADER_BYTES];
    out[..2].copy_from_slice(&header[..2]);
    // QR, the opcode and RD as asked, RA, the code.
    out[2] = 0x80 | (header[2] & 0x79);
    out[3] = 0x80 | rcode as u8;
    Some(out)
}

/// How far one input got through [`fuzz_dns_query`]; the smoke test checks each occurs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsQueryOutcome {
    /// A query was read and answered.
    Answered,
    /// Not a query the resolver reads, answered with an error code.
    ErrorReply,
    /// Dropped unanswered.
    Dropped,
}

/// Fuzz entry point: reads `data` as a guest's query and writes the answers the resolver could
/// give (with records of both families), checking they stay within [`MAX_DNS_ANSWER_BYTES`] and
/// carry the query's id. Used by `vmm/fuzz/fuzz_targets/dns_query.rs` and the stable smoke test
/// `vmm/tests/virtio_fuzz_smoke.rs`.
pub fn fuzz_dns_query(data: &[u8]) -> DnsQueryOutcome {
    match parse_query(data) {
        Ok(query) => {
            let addrs: Vec<IpAddr> = (0..40u8)
                .map(|i| {
                    if i % 2 == 0 {
                        IpAddr::from([192, 0, 2, i])
                    } else {
                        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i.into()])
                    }
                })
                .collect();
            for rcode in [Rcode::NoError, Rcode::NxDomain] {
                let out = answer(&query, rcode, &addrs, 60);
                assert!(out.len() <= MAX_DNS_ANSWER_BYTES.max(HEADER_BYTES + query.question.len()));
                assert_eq!(&out[..2], &query.id.to_be_bytes());
                let reread = parse_answer_header(&out);
                assert_eq!(reread, Some((query.id, rcode as u8)));
            }
            DnsQueryOutcome::Answered
        }
        Err(e) => match e.rcode().and_then(|rcode| error_reply(data, rcode)) {
            Some(out) => {
                assert_eq!(out.len(), HEADER_BYTES);
                DnsQueryOutcome::ErrorReply
            }
            None => DnsQueryOutcome::Dropped,
        },
    }
}

/// The id and response code of an answer (for tests and the fuzz check).
pub fn parse_answer_header(bytes: &[u8]) -> Option<(u16, u8)> {
    let header = bytes.get(..HEADER_BYTES)?;
    (header[2] & 0x80 != 0).then(|| (u16::from_be_bytes([header[0], header[1]]), header[3] & 0x0f))
}

/// A query for `name` of `qtype` with id `id` (for tests and the fuzz smoke test).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len().min(255) as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_reads_and_its_answer_carries_the_records_asked() {
        let query = parse_query(&build_query(7, "Pkgs.Example", TYPE_A)).unwrap();
        assert_eq!((query.id, query.name.as_str(), query.qtype), (7, "pkgs.example", TYPE_A));
        let addrs = [IpAddr::from([192, 0, 2, 1]), IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])];
        let out = answer(&query, Rcode::NoError, &addrs, 30);
        assert_eq!(parse_answer_header(&out), Some((7, 0)));
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 1, "only the A record");
        assert_eq!(&out[out.len() - 4..], &[192, 0, 2, 1]);
    }

    #[test]
    fn malformed_queries_are_errors_not_panics() {
        let good = build_query(1, "a.example", TYPE_A);
        for cut in 0..good.len() {
            let _ = fuzz_dns_query(&good[..cut]);
        }
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert!(matches!(parse_query(&pointer), Err(DnsError::Malformed(_))));
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(DnsError::NotAQuery));
        assert_eq!(fuzz_dns_query(&response), DnsQueryOutcome::Dropped);
        let long = build_query(1, &vec!["a".repeat(63); 5].join("."), TYPE_A);
        assert!(matches!(parse_query(&long), Err(DnsError::Malformed(_))));
        assert_eq!(parse_query(&build_query(1, "a b.example", TYPE_A)), Err(DnsError::Name));
    }
}
