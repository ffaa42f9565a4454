//! The `state.bin` container: magic `CAPSNAP\0`, a little-endian u32 format version, a u32
//! reserved word (0), a u64 payload length, a u32 CRC-32 of the payload, then the payload
//! (postcard). It owns the framing and its checks; it never interprets the payload's meaning
//! beyond decoding it. A payload of the previous layout ([`PREVIOUS_FORMAT_VERSION`]) is decoded
//! as the caller's old type and converted ([`decode_or_upgrade`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"CAPSNAP\0";
/// The payload layout this build writes and accepts. Bump on any change to the state tree.
///
/// - 1: the first layout.
/// - 2: optional vCPU state is optional in the tree (XCRs, debug registers and the TSC rate as
///   `Option`, the XSAVE area or the legacy FPU state as one enum), so a snapshot of a host
///   without them restores. Version 1 files are refused; take the snapshot again.
/// - 3: the VM config has an optional net device (`VmConfig::net`) and the device states a
///   `Net` variant (the last one, so older variants keep their tags). Version 2 files are read
///   and converted (no net device), so VMs paused before it resume.
pub const FORMAT_VERSION: u32 = 3;
/// The older layout this build still reads, through [`decode_or_upgrade`].
pub const PREVIOUS_FORMAT_VERSION: u32 = 2;
/// Header bytes before the payload: magic, version, reserved, length, crc.
pub const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4;
/// Largest payload accepted (a state tree is a few hundred KiB; this bounds hostile input).
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 20;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("state file is {got} bytes, shorter than the {HEADER_BYTES}-byte header (truncated)")]
    Truncated { got: usize },
    #[error("state file does not start with the CAPSNAP magic (not a capsule snapshot, or corrupt)")]
    BadMagic,
    #[error("snapshot format version {got} is not supported (this build reads versions {PREVIOUS_FORMAT_VERSION} and {FORMAT_VERSION} only; take the snapshot again with this build)")]
    Version { got: u32 },
    #[error("reserved header word is {got:#x}, expected 0 (corrupt header)")]
    Reserved { got: u32 },
    #[error("header says {declared} payload bytes but the file holds {actual} (truncated or corrupt)")]
    Length { declared: u64, actual: u64 },
    #[error("payload of {declared} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge { declared: u64 },
    #[error("payload checksum mismatch: header {expected:#010x}, payload {actual:#010x} (corrupt)")]
    Checksum { expected: u32, actual: u32 },
    #[error("payload does not decode as snapshot format version {version}")]
    Decode {
        version: u32,
        #[source]
        source: postcard::Error,
    },
    #[error("encoding the snapshot state")]
    Encode(#[source] postcard::Error),
}

/// Frames `value` as a state file. Returns the bytes and the payload's CRC-32.
pub fn encode<T: Serialize>(value: &T) -> Result<(Vec<u8>, u32), FormatError> {
    let payload = postcard::to_stdvec(value).map_err(FormatError::Encode)?;
    let crc = crc32fast::hash(&payload);
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok((out, crc))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Checks the framing of `bytes` and decodes the payload, which must be of this build's layout.
/// Returns the value and its CRC-32.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, u32), FormatError> {
    let (version, payload, crc) = checked_payload(bytes)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { got: version });
    }
    let value = postcard::from_bytes(payload).map_err(|source| FormatError::Decode { version, source })?;
    Ok((value, crc))
}

/// Like [`decode`], but a payload of [`PREVIOUS_FORMAT_VERSION`] is decoded as `Old` and
/// converted. The CRC returned is the file's, whichever layout it holds.
pub fn decode_or_upgrade<T: DeserializeOwned, Old: DeserializeOwned + Into<T>>(
    bytes: &[u8],
) -> Result<(T, u32), FormatError> {
    let (version, payload, crc) = checked_payload(bytes)?;
    let decoded = match version {
        FORMAT_VERSION => postcard::from_bytes::<T>(payload),
        PREVIOUS_FORMAT_VERSION => postcard::from_bytes::<Old>(payload).map(Into::into),
        got => return Err(FormatError::Version { got }),
    };
    Ok((decoded.map_err(|source| FormatError::Decode { version, source })?, crc))
}

/// Checks the framing of `bytes` (any version this build reads); returns the version, the
/// payload and its CRC-32.
fn checked_payload(bytes: &[u8]) -> Result<(u32, &[u8], u32), FormatError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FormatError::Truncated { got: bytes.len() });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION && version != PREVIOUS_FORMAT_VERSION {
        return Err(FormatError::Version { got: version });
    }
    let reserved = le_u32(bytes, 12);
    if reserved != 0 {
        return Err(FormatError::Reserved { got: reserved });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len);
    if declared > MAX_PAYLOAD_BYTES {
        return Err(FormatError::TooLarge { declared });
    }
    let expected = le_u32(bytes, 24);
    let payload = &bytes[HEADER_BYTES..];
    if payload.len() as u64 != declared {
        return Err(FormatError::Length { declared, actual: payload.len() as u64 });
    }
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(FormatError::Checksum { expected, actual });
    }
    Ok((version, payload, actual))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        regs: kvm_bindings::kvm_regs,
    }

    fn sample() -> Sample {
        Sample { a: 7, b: vec![1, 2, 3], regs: kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() } }
    }

    #[test]
    fn round_trips_kvm_structs() {
        let (bytes, crc) = encode(&sample()).unwrap();
        let (back, crc2): (Sample, u32) = decode(&bytes).unwrap();
        assert_eq!(back, sample());
        assert_eq!(crc, crc2);
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let (bytes, _) = encode(&sample()).unwrap();
        let err = decode::<Sample>(&bytes[..10]).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { got: 10 }), "{err}");
        let err = decode::<Sample>(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, FormatError::Length { .. }), "{err}");
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<Sample>(&bad), Err(FormatError::BadMagic)));
        let mut bad = bytes.clone();
        bad[8] = 99;
        let err = decode::<Sample>(&bad).unwrap_err();
        assert!(matches!(err, FormatError::Version { got: 99 }), "{err}");
        assert!(err.to_string().contains("version 99"), "{err}");
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(decode::<Sample>(&bad), Err(FormatError::Checksum { .. })));
        let mut bad = bytes;
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Sample>(&bad), Err(FormatError::TooLarge { .. })));
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct OldSample {
        a: u64,
    }

    impl From<OldSample> for Sample {
        fn from(old: OldSample) -> Self {
            Sample { a: old.a, b: Vec::new(), regs: Default::default() }
        }
    }

    #[test]
    fn a_previous_layout_is_upgraded_and_only_that_one() {
        let (mut bytes, crc) = encode(&OldSample { a: 9 }).unwrap();
        bytes[8..12].copy_from_slice(&PREVIOUS_FORMAT_VERSION.to_le_bytes());
        let (back, crc2) = decode_or_upgrade::<Sample, OldSample>(&bytes).unwrap();
        assert_eq!((back.a, back.b.len(), crc2), (9, 0, crc));
        assert!(matches!(decode::<Sample>(&bytes), Err(FormatError::Version { .. })));
        let (current, _) = encode(&sample()).unwrap();
        assert_eq!(decode_or_upgrade::<Sample, OldSample>(&current).unwrap().0, sample());
        bytes[8..12].copy_from_slice(&(PREVIOUS_FORMAT_VERSION - 1).to_le_bytes());
        assert!(matches!(decode_or_upgrade::<Sample, OldSample>(&bytes), Err(FormatError::Version { .. })));
    }
}
