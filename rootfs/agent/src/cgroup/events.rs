//! Parsing what the kernel writes in cgroup v2 files: the "flat keyed" event
//! files (`pids.events`, `memory.events`, `cgroup.events`: one `key value`
//! per line) and the pid list `cgroup.procs`.
//!
//! Owns only pure functions over bytes, so they are fuzzed and tested
//! without a cgroup. It never opens a file and never trusts a length: input
//! over [`MAX_CGROUP_FILE_BYTES`] is refused, and unknown keys are skipped
//! (newer kernels add keys).

/// Most bytes of an event file the agent reads (the kernel writes under 200).
pub const MAX_CGROUP_FILE_BYTES: usize = 4096;

/// Errors of parsing a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    /// The content is longer than the agent reads.
    #[error("the cgroup file holds {len} bytes, more than the {MAX_CGROUP_FILE_BYTES} read")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A line is not `key value` with a decimal value.
    #[error("line {line} of the cgroup file is not `key <decimal>`: {snippet:?}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The start of the line.
        snippet: String,
    },
}

/// The value of `key` in flat-keyed content (`None` when the key is absent).
/// Every line must be `key value`; the first line with `key` wins.
pub fn keyed_value(text: &[u8], key: &str) -> Result<Option<u64>, EventsError> {
    if text.len() > MAX_CGROUP_FILE_BYTES {
        return Err(EventsError::TooLong { len: text.len() });
    }
    let mut found = None;
    for (n, raw) in text.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let malformed = || EventsError::Malformed {
            line: n + 1,
            snippet: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
        };
        let mut fields = raw.split(|b| *b == b' ').filter(|f| !f.is_empty());
        let (Some(name), Some(value), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(malformed());
        };
        let value = parse_decimal(value).ok_or_else(malformed)?;
        if found.is_none() && name == key.as_bytes() {
            found = Some(value);
        }
    }
    Ok(found)
}

/// A decimal `u64` of ASCII digits only.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, d| match d {
        b'0'..=b'9' => acc.checked_mul(10)?.checked_add(u64::from(d - b'0')),
        _ => None,
    })
}

/// What `cgroup.events` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupEvents {
    /// Some live process is in the cgroup or below it.
    pub populated: bool,
    /// The cgroup is frozen (every task in it has stopped).
    pub frozen: bool,
}

/// Parses `cgroup.events`; a missing key reads as 0.
pub fn parse_cgroup_events(text: &[u8]) -> Result<CgroupEvents, EventsError> {
    Ok(CgroupEvents {
        populated: keyed_value(text, "populated")?.unwrap_or(0) != 0,
        frozen: keyed_value(text, "frozen")?.unwrap_or(0) != 0,
    })
}

/// Parses `pids.events`: how often a fork failed at this cgroup's `pids.max`.
pub fn parse_pids_events(text: &[u8]) -> Result<u64, EventsError> {
    Ok(keyed_value(text, "max")?.unwrap_or(0))
}

/// Parses `memory.events`: how many processes the out-of-memory killer killed here.
pub fn parse_oom_kills(text: &[u8]) -> Result<u64, EventsError> {
    Ok(keyed_value(text, "oom_kill")?.unwrap_or(0))
}

/// Calls `each` with every pid in `cgroup.procs` content (one decimal pid per
/// line); a line that is not one is an error. Any length is accepted: the
/// caller bounds what it reads.
pub fn for_each_pid(text: &[u8], mut each: impl FnMut(u32)) -> Result<(), EventsError> {
    for (n, raw) in text.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let pid = parse_decimal(raw).and_then(|p| u32::try_from(p).ok()).ok_or_else(|| EventsError::Malformed {
            line: n + 1,
            snippet: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
        })?;
        each(pid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_event_files_parse_and_unknown_keys_are_skipped() {
        let memory = b"low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(memory), Ok(1));
        assert_eq!(keyed_value(memory, "high"), Ok(Some(12)));
        assert_eq!(parse_pids_events(b"max 7\n"), Ok(7));
        assert_eq!(parse_pids_events(b""), Ok(0), "a missing key reads as 0");
        assert_eq!(
            parse_cgroup_events(b"populated 1\nfrozen 0\n"),
            Ok(CgroupEvents { populated: true, frozen: false })
        );
        assert_eq!(keyed_value(b"new_key 5\nmax 2", "max"), Ok(Some(2)), "no final newline is fine");
    }

    #[test]
    fn malformed_or_oversized_content_is_an_error_not_a_panic() {
        for bad in [&b"max"[..], b"max -1\n", b"max 1 2\n", b"max 0x10\n", b"max 99999999999999999999\n"] {
            assert!(matches!(keyed_value(bad, "max"), Err(EventsError::Malformed { line: 1, .. })), "{bad:?}");
        }
        let long = vec![b'1'; MAX_CGROUP_FILE_BYTES + 1];
        assert_eq!(keyed_value(&long, "max"), Err(EventsError::TooLong { len: MAX_CGROUP_FILE_BYTES + 1 }));
    }

    #[test]
    fn pid_lists_are_counted_and_garbage_is_refused() {
        let mut pids = Vec::new();
        for_each_pid(b"12\n345\n\n6\n", |p| pids.push(p)).unwrap();
        assert_eq!(pids, vec![12, 345, 6]);
        assert!(for_each_pid(b"12\nx\n", |_| {}).is_err());
        assert!(for_each_pid(b"4294967296\n", |_| {}).is_err(), "a pid is 32 bits");
    }
}
