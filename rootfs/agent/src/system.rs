//! Guest-wide operations: wall clock, entropy and power-off.
//!
//! These change the whole machine, so they run only when the agent is PID 1
//! of a guest (`pid1 == true`). As a host process (tests, the fake engine)
//! they answer `Unsupported` even as root: a test must never set the host's
//! clock or power it off.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::oserror::{agent_error, error};
use crate::protocol::{AgentError, ErrorKind};

/// Most entropy bytes one `AddEntropy` accepts.
pub const MAX_ENTROPY_BYTES: usize = 4096;

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` (linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn refuse_on_host(pid1: bool, what: &str) -> Result<(), AgentError> {
    if pid1 {
        Ok(())
    } else {
        Err(error(ErrorKind::Unsupported, format!("{what} is only done by the agent as PID 1 of a guest")))
    }
}

/// Sets `CLOCK_REALTIME`.
pub fn set_clock(pid1: bool, unix_time_ns: u64) -> Result<(), AgentError> {
    refuse_on_host(pid1, "setting the clock")?;
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(agent_error("clock_settime(CLOCK_REALTIME)", &std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mixes `bytes` into the kernel RNG, credited as entropy, and reseeds the CRNG.
pub fn add_entropy(pid1: bool, bytes: &[u8]) -> Result<(), AgentError> {
    refuse_on_host(pid1, "adding entropy")?;
    if bytes.len() > MAX_ENTROPY_BYTES {
        return Err(error(
            ErrorKind::TooLarge,
            format!("{} entropy bytes exceed the limit of {MAX_ENTROPY_BYTES}", bytes.len()),
        ));
    }
    let urandom =
        OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| agent_error("open /dev/urandom", &e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = bytes.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (bytes.len() * 8) as u32;
    info[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is laid out as struct rand_pool_info with `buf_size` bytes
    // of payload after the header, and lives for the duration of the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(agent_error("ioctl(RNDADDENTROPY)", &std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(agent_error("ioctl(RNDRESEEDCRNG)", &std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks that a shutdown may happen (PID 1 only).
pub fn check_shutdown(pid1: bool) -> Result<(), AgentError> {
    refuse_on_host(pid1, "shutting down")
}

/// Where the kernel shows ACPI; without it, the kernel has no way to power off.
const ACPI_SYSFS_DIR: &str = "/sys/firmware/acpi";

/// Kills every other process, syncs, and powers off or reboots. Returns only on failure.
///
/// A guest without ACPI (our microVMs) cannot power off: `reboot(RB_POWER_OFF)`
/// would just end the calling process and leave the VM running. There a
/// power-off is a reset instead (`reboot=k`: the i8042 reset line), which the
/// VMM treats as the guest stopping, as Firecracker does.
pub fn shutdown_now(reboot: bool) -> AgentError {
    let cmd =
        if reboot || !std::path::Path::new(ACPI_SYSFS_DIR).exists() { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    // SAFETY: kill(-1) signals every process but init and ourselves; sync and
    // reboot take plain integers.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(cmd);
    }
    agent_error("reboot(2)", &std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mode_refuses_machine_wide_operations() {
        assert_eq!(set_clock(false, 0).unwrap_err().kind, ErrorKind::Unsupported);
        assert_eq!(add_entropy(false, &[1, 2, 3]).unwrap_err().kind, ErrorKind::Unsupported);
        assert_eq!(check_shutdown(false).unwrap_err().kind, ErrorKind::Unsupported);
    }
}
