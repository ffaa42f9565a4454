//! Framing of protocol messages on a byte stream.
//!
//! A frame is a 4-byte little-endian payload length followed by that many
//! bytes of postcard-encoded message. The length is checked against
//! [`MAX_FRAME_BYTES`] before anything is allocated, so a hostile peer cannot
//! make us buffer more than one capped frame. Any error here is fatal for the
//! connection (the stream position is lost), never for the process.
//!
//! Two ways in: [`read_frame`]/[`write_frame`] for blocking streams, and
//! [`FrameDecoder`] for callers that receive bytes in arbitrary pieces
//! (async readers, fuzzers). Both share one header check and one decode.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::MAX_FRAME_BYTES;

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Errors of framing. All of them end the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than the cap.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The cap ([`MAX_FRAME_BYTES`]).
        max: usize,
    },
    /// A frame's payload did not decode as the expected message.
    #[error("malformed frame of {len} bytes")]
    Malformed {
        /// Payload length.
        len: usize,
        /// What the decoder said.
        #[source]
        source: postcard::Error,
    },
    /// A message could not be encoded (it would not fit the cap, or serde failed).
    #[error("cannot encode frame")]
    Encode(#[source] postcard::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Reading or writing the stream failed.
    #[error("frame I/O failed")]
    Io(#[source] io::Error),
}

/// Appends one encoded frame for `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let mut buf = std::mem::take(out);
    buf = postcard::to_extend(msg, buf).map_err(FrameError::Encode)?;
    let len = buf.len() - start - FRAME_HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        buf.truncate(start);
        *out = buf;
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    // The cap fits in u32, checked above.
    buf[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    *out = buf;
    Ok(())
}

/// Writes one frame for `msg` and flushes.
pub fn write_frame<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf)?;
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Checks a header and returns the payload length it announces.
fn payload_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    Ok(len)
}

/// Decodes one payload.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(msg),
        Ok(_) => Err(FrameError::Malformed { len: payload.len(), source: postcard::Error::DeserializeBadEncoding }),
        Err(source) => Err(FrameError::Malformed { len: payload.len(), source }),
    }
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<T: DeserializeOwned, R: Read>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let got = read_full(r, &mut header).map_err(FrameError::Io)?;
    if got == 0 {
        return Ok(None);
    }
    if got < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated { got, want: FRAME_HEADER_BYTES });
    }
    let len = payload_len(header)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload).map_err(FrameError::Io)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    decode_payload(&payload).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
pub(crate) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// An error and its `source()` chain on one line (`outer: cause: root cause`),
/// for logs and disconnect reasons.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// An incremental decoder: push bytes as they arrive, pop whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Pops the next whole frame, if one is buffered. An oversized header is
    /// reported as soon as the header arrives, before its payload is buffered.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buf.first_chunk::<FRAME_HEADER_BYTES>() else {
            return Ok(None);
        };
        let len = payload_len(*header)?;
        let end = FRAME_HEADER_BYTES + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let msg = decode_payload(&self.buf[FRAME_HEADER_BYTES..end]);
        self.buf.drain(..end);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn exec_frame(id: RequestId) -> ClientFrame {
        ClientFrame {
            id,
            body: ClientMessage::Request(Request {
                timeout_ms: Some(1000),
                op: Op::Exec(ExecRequest {
                    command: Command::Shell("echo hi".into()),
                    cwd: None,
                    env: vec![("A".into(), "b".into())],
                    stdin: Some(vec![0, 255, 1]),
                    background: false,
                    output_cap_bytes: None,
                    limits: None,
                    pty: None,
                }),
            }),
        }
    }

    #[test]
    fn error_chain_names_every_cause() {
        let e = FrameError::Io(io::Error::other("pipe broke"));
        assert_eq!(error_chain(&e), "frame I/O failed: pipe broke");
    }

    #[test]
    fn frames_round_trip_through_blocking_io() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &exec_frame(7)).unwrap();
        write_frame(&mut wire, &exec_frame(8)).unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_frame::<ClientFrame, _>(&mut r).unwrap(), Some(exec_frame(7)));
        assert_eq!(read_frame::<ClientFrame, _>(&mut r).unwrap(), Some(exec_frame(8)));
        assert_eq!(read_frame::<ClientFrame, _>(&mut r).unwrap(), None);
    }

    #[test]
    fn decoder_accepts_bytes_one_at_a_time() {
        let mut wire = Vec::new();
        encode_frame(&exec_frame(1), &mut wire).unwrap();
        encode_frame(&exec_frame(2), &mut wire).unwrap();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame::<ClientFrame>().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![exec_frame(1), exec_frame(2)]);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_header_is_rejected_before_payload_arrives() {
        let mut dec = FrameDecoder::new();
        dec.push(&((MAX_FRAME_BYTES as u32) + 1).to_le_bytes());
        let err = dec.next_frame::<ClientFrame>().unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == MAX_FRAME_BYTES + 1 && max == MAX_FRAME_BYTES)
        );
        let mut r: &[u8] = &u32::MAX.to_le_bytes();
        assert!(matches!(read_frame::<ClientFrame, _>(&mut r), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_payload_is_malformed_not_a_panic() {
        let mut wire = 5u32.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut r = wire.as_slice();
        assert!(matches!(read_frame::<ClientFrame, _>(&mut r), Err(FrameError::Malformed { len: 5, .. })));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut payload = postcard::to_allocvec(&exec_frame(3)).unwrap();
        payload.push(0);
        let mut wire = (payload.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&payload);
        let mut r = wire.as_slice();
        assert!(matches!(read_frame::<ClientFrame, _>(&mut r), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let mut wire = Vec::new();
        encode_frame(&exec_frame(1), &mut wire).unwrap();
        wire.truncate(wire.len() - 1);
        let mut r = wire.as_slice();
        assert!(matches!(read_frame::<ClientFrame, _>(&mut r), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn encoding_refuses_a_message_over_the_cap() {
        let msg = AgentFrame {
            id: 1,
            body: AgentMessage::Done(Reply::FileData { data: vec![0; MAX_FRAME_BYTES + 1], size: 0 }),
        };
        let mut out = vec![9u8];
        assert!(matches!(encode_frame(&msg, &mut out), Err(FrameError::TooLarge { .. })));
        assert_eq!(out, vec![9u8], "a refused frame leaves the buffer as it was");
    }

    #[test]
    fn largest_file_chunk_fits_in_a_frame() {
        let msg = ClientFrame {
            id: u64::MAX,
            body: ClientMessage::Request(Request {
                timeout_ms: Some(u64::MAX),
                op: Op::WriteFile(WriteFileRequest {
                    path: "/".repeat(4096),
                    position: WritePosition::At(u64::MAX),
                    data: vec![0xab; MAX_FILE_CHUNK_BYTES],
                    mode: Some(0o644),
                    create_parents: true,
                }),
            }),
        };
        let mut out = Vec::new();
        encode_frame(&msg, &mut out).unwrap();
    }
}
