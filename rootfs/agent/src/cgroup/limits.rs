//! The limits policy: what a command's or context's cgroup gets by default,
//! how far a request may move it, and how the guest's size sets both.
//!
//! Owns pure arithmetic and validation (fuzzed with the request decoder): the
//! guest's memory and pid numbers in, a [`LimitPolicy`] out, and a request's
//! [`ProcessLimits`] resolved against it or refused with an error that names
//! the bound. It never touches a cgroup file.

use crate::budget::{AGENT_TASK_RESERVE, MIN_RESERVED_MEMORY_BYTES, RESERVED_MEMORY_DIVISOR};
use crate::oserror::error;
use crate::protocol::{AgentError, Containment, ErrorKind, ProcessLimits, MIN_MEMORY_MAX_BYTES};

/// `pids.max` of a command or context when its request does not say.
pub const DEFAULT_PIDS_MAX: u32 = 1024;

/// `memory.high` is this percentage of `memory.max`.
pub const MEMORY_HIGH_PERCENT: u64 = 90;

/// Fewest pids the guest must be able to give commands for containment to be on.
const MIN_WORKLOAD_PIDS: u64 = 64;

const MIB: u64 = 1024 * 1024;

/// Errors of the limits policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A request asked for 0 processes.
    #[error("limits.pids_max must be at least 1")]
    PidsZero,
    /// A request asked for more processes than the guest gives.
    #[error("limits.pids_max {asked} is above this guest's ceiling of {ceiling} processes")]
    PidsAboveCeiling {
        /// What was asked.
        asked: u32,
        /// The ceiling.
        ceiling: u32,
    },
    /// A request asked for too little memory to run anything.
    #[error("limits.memory_max_bytes {asked} is below the minimum of {MIN_MEMORY_MAX_BYTES} bytes")]
    MemoryBelowMinimum {
        /// What was asked.
        asked: u64,
    },
    /// A request asked for more memory than the guest gives.
    #[error("limits.memory_max_bytes {asked} is above this guest's ceiling of {ceiling} bytes")]
    MemoryAboveCeiling {
        /// What was asked.
        asked: u64,
        /// The ceiling.
        ceiling: u64,
    },
    /// The guest is too small to keep its reserve and still run commands.
    #[error(
        "the guest is too small to contain commands: {memory_bytes} bytes of memory and {pids} pids, \
         less a reserve of {reserved_memory_bytes} bytes and {AGENT_TASK_RESERVE} pids"
    )]
    GuestTooSmall {
        /// The guest's memory.
        memory_bytes: u64,
        /// The smaller of its `pid_max` and `threads-max`.
        pids: u64,
        /// The memory reserve.
        reserved_memory_bytes: u64,
    },
}

/// Limits as written into one cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedLimits {
    /// `pids.max`.
    pub pids_max: u32,
    /// `memory.max`, in bytes.
    pub memory_max_bytes: u64,
    /// `memory.high`, in bytes ([`MEMORY_HIGH_PERCENT`] of `memory.max`).
    pub memory_high_bytes: u64,
}

impl ResolvedLimits {
    /// These limits in the protocol's words (every field set).
    pub fn as_request(&self) -> ProcessLimits {
        ProcessLimits { pids_max: Some(self.pids_max), memory_max_bytes: Some(self.memory_max_bytes) }
    }
}

/// Defaults and ceilings of one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitPolicy {
    /// `pids.max` of the `workloads` parent and the highest a request may ask.
    pub pids_ceiling: u32,
    /// `memory.max` of the `workloads` parent and the highest a request may ask.
    pub memory_ceiling_bytes: u64,
    /// What a request gets for `pids_max` when it does not say.
    pub default_pids_max: u32,
    /// What a request gets for `memory_max_bytes` when it does not say.
    pub default_memory_max_bytes: u64,
}

/// Memory kept out of the commands' reach in a guest with `memory_bytes`.
pub fn reserved_memory_bytes(memory_bytes: u64) -> u64 {
    MIN_RESERVED_MEMORY_BYTES.max(memory_bytes / RESERVED_MEMORY_DIVISOR)
}

impl LimitPolicy {
    /// The policy of a guest with `memory_bytes` of memory and the kernel's
    /// `pid_max` and `threads-max`: commands together get the memory less
    /// [`reserved_memory_bytes`] and the pids less [`AGENT_TASK_RESERVE`];
    /// one command gets all that memory and [`DEFAULT_PIDS_MAX`] pids by default.
    pub fn for_guest(memory_bytes: u64, pid_max: u64, threads_max: u64) -> Result<LimitPolicy, LimitError> {
        let reserved = reserved_memory_bytes(memory_bytes);
        let pids = pid_max.min(threads_max);
        let too_small = || LimitError::GuestTooSmall { memory_bytes, pids, reserved_memory_bytes: reserved };
        // Whole MiB, so the kernel (which keeps pages) shows the very number.
        let memory_ceiling_bytes =
            memory_bytes.checked_sub(reserved).map(|m| m / MIB * MIB).filter(|m| *m >= MIN_MEMORY_MAX_BYTES);
        let pids_ceiling = pids.checked_sub(AGENT_TASK_RESERVE).filter(|p| *p >= MIN_WORKLOAD_PIDS);
        let (Some(memory_ceiling_bytes), Some(pids_ceiling)) = (memory_ceiling_bytes, pids_ceiling) else {
            return Err(too_small());
        };
        let pids_ceiling = u32::try_from(pids_ceiling).unwrap_or(u32::MAX);
        Ok(LimitPolicy {
            pids_ceiling,
            memory_ceiling_bytes,
            default_pids_max: DEFAULT_PIDS_MAX.min(pids_ceiling),
            default_memory_max_bytes: memory_ceiling_bytes,
        })
    }

    /// A request's limits (`None`: all defaults) resolved against this policy.
    pub fn resolve(&self, asked: Option<&ProcessLimits>) -> Result<ResolvedLimits, LimitError> {
        let asked = asked.copied().unwrap_or_default();
        let pids_max = match asked.pids_max {
            None => self.default_pids_max,
            Some(0) => return Err(LimitError::PidsZero),
            Some(p) if p > self.pids_ceiling => {
                return Err(LimitError::PidsAboveCeiling { asked: p, ceiling: self.pids_ceiling })
            }
            Some(p) => p,
        };
        let memory_max_bytes = match asked.memory_max_bytes {
            None => self.default_memory_max_bytes,
            Some(m) if m < MIN_MEMORY_MAX_BYTES => return Err(LimitError::MemoryBelowMinimum { asked: m }),
            Some(m) if m > self.memory_ceiling_bytes => {
                return Err(LimitError::MemoryAboveCeiling { asked: m, ceiling: self.memory_ceiling_bytes })
            }
            Some(m) => m,
        };
        // Only an absurdly large value overflows the product; divide first then.
        let memory_high_bytes = memory_max_bytes
            .checked_mul(MEMORY_HIGH_PERCENT)
            .map(|m| m / 100)
            .unwrap_or(memory_max_bytes / 100 * MEMORY_HIGH_PERCENT);
        Ok(ResolvedLimits { pids_max, memory_max_bytes, memory_high_bytes })
    }

    /// The policy in the protocol's words, for the handshake.
    pub fn containment(&self) -> Containment {
        Containment {
            default_pids_max: self.default_pids_max,
            max_pids_max: self.pids_ceiling,
            default_memory_max_bytes: self.default_memory_max_bytes,
            max_memory_max_bytes: self.memory_ceiling_bytes,
        }
    }
}

/// A request's limits under `policy` (`None`: this agent cannot enforce
/// limits): what to write into its cgroup (`None`: nothing), or the error the
/// host gets. Without a policy, asking for a value is `Unsupported` rather
/// than silently ignored.
pub fn resolve_request(
    policy: Option<&LimitPolicy>,
    asked: Option<&ProcessLimits>,
) -> Result<Option<ResolvedLimits>, AgentError> {
    match policy {
        Some(policy) => policy.resolve(asked).map(Some).map_err(|e| error(ErrorKind::InvalidArgument, e.to_string())),
        None if asked.is_some_and(|l| l.pids_max.is_some() || l.memory_max_bytes.is_some()) => Err(error(
            ErrorKind::Unsupported,
            "this agent cannot enforce process limits: it has no cgroup v2 with the pids and memory controllers \
             (its handshake says containment: None)",
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_whole_mebibytes() {
        let odd = LimitPolicy::for_guest(1000 * MIB + 12345, 32768, 32768).unwrap();
        assert_eq!(odd.memory_ceiling_bytes % MIB, 0);
        assert!(odd.memory_ceiling_bytes <= 1000 * MIB + 12345 - MIN_RESERVED_MEMORY_BYTES);
    }

    #[test]
    fn a_small_guest_keeps_its_reserve_and_defaults_to_1024_pids() {
        let policy = LimitPolicy::for_guest(512 * MIB, 32768, 4096).unwrap();
        assert_eq!(policy.memory_ceiling_bytes, 512 * MIB - MIN_RESERVED_MEMORY_BYTES);
        assert_eq!(policy.pids_ceiling, 4096 - AGENT_TASK_RESERVE as u32, "threads-max is the smaller bound");
        assert_eq!(policy.default_pids_max, 1024);
        let big = LimitPolicy::for_guest(8 * 1024 * MIB, 32768, 100_000).unwrap();
        assert_eq!(big.memory_ceiling_bytes, 8 * 1024 * MIB - 512 * MIB, "1/16 of a big guest is kept");
        let limits = big.resolve(None).unwrap();
        assert_eq!(limits.memory_high_bytes, limits.memory_max_bytes * 90 / 100);
    }

    #[test]
    fn request_limits_are_honoured_within_bounds_and_refused_past_them() {
        let policy = LimitPolicy::for_guest(1024 * MIB, 32768, 8192).unwrap();
        let asked = ProcessLimits { pids_max: Some(64), memory_max_bytes: Some(100 * MIB) };
        let got = policy.resolve(Some(&asked)).unwrap();
        assert_eq!((got.pids_max, got.memory_max_bytes, got.memory_high_bytes), (64, 100 * MIB, 90 * MIB));
        assert_eq!(got.as_request(), asked);
        let only_pids = ProcessLimits { pids_max: Some(10), memory_max_bytes: None };
        assert_eq!(policy.resolve(Some(&only_pids)).unwrap().memory_max_bytes, policy.default_memory_max_bytes);
        let cases = [
            (ProcessLimits { pids_max: Some(0), memory_max_bytes: None }, LimitError::PidsZero),
            (
                ProcessLimits { pids_max: Some(u32::MAX), memory_max_bytes: None },
                LimitError::PidsAboveCeiling { asked: u32::MAX, ceiling: policy.pids_ceiling },
            ),
            (ProcessLimits { pids_max: None, memory_max_bytes: Some(1) }, LimitError::MemoryBelowMinimum { asked: 1 }),
            (
                ProcessLimits { pids_max: None, memory_max_bytes: Some(u64::MAX) },
                LimitError::MemoryAboveCeiling { asked: u64::MAX, ceiling: policy.memory_ceiling_bytes },
            ),
        ];
        for (asked, want) in cases {
            assert_eq!(policy.resolve(Some(&asked)), Err(want));
        }
    }

    #[test]
    fn a_guest_too_small_for_its_reserve_has_no_policy() {
        assert!(matches!(LimitPolicy::for_guest(64 * MIB, 32768, 32768), Err(LimitError::GuestTooSmall { .. })));
        assert!(matches!(LimitPolicy::for_guest(u64::MAX, 300, 300), Err(LimitError::GuestTooSmall { .. })));
        assert!(LimitPolicy::for_guest(u64::MAX, u64::MAX, u64::MAX).is_ok(), "no overflow at the top");
    }
}
