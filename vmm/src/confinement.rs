//! Confining a worker process once its VM is built: resource limits (no core dumps, a bounded
//! number of open files and threads) and a seccomp filter that allows only the system calls a
//! running worker makes (KVM ioctls, its socket, snapshot file writes, thread management).
//! Anything else kills the process. It never loosens a limit and never runs before setup is
//! done (building or restoring a VM needs more than the filter allows).

/// Most open file descriptors a worker keeps (vCPU, VM, memory, eventfds, vsock connections).
pub const WORKER_MAX_OPEN_FILES: u64 = 4096;
/// Largest file a worker may write (a snapshot memory file of the biggest guest), in bytes.
pub const WORKER_MAX_FILE_BYTES: u64 = 128 << 30;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// System calls a running worker may make with any arguments. Found with `strace -f` over the
/// worker, snapshot and virtio tests (after the filter point), plus what the block and vsock
/// backends and std's runtime need on paths those tests do not take. The network stack needs
/// nothing more: its epoll, timer and broker listener are made before the filter, and then it
/// only waits (`epoll_wait`), re-arms (`epoll_ctl`, `timerfd_settime`), accepts the daemon
/// (`accept4`), talks to it (`sendmsg`/`recvmsg`, with streams passed as `SCM_RIGHTS`) and
/// splices those streams (`recvfrom`/`sendto`/`read`/`write`, `shutdown`, `close`); the KVM
/// network test runs all of it under this filter.
const ALLOWED_SYSCALLS: &[i64] = &[
    // KVM_RUN and the control socket.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    // vsock (hybrid, Unix sockets: accepting host connections, connecting guest-initiated ones)
    // and the network stack (the daemon's broker channel and the streams it hands over).
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // The vsock muxer's expiry timer and the network stack's (created before the filter, armed
    // and disarmed after).
    libc::SYS_timerfd_settime,
    // virtio-blk.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Snapshot files.
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_readlink,
    libc::SYS_getcwd,
    // Memory and threads (vCPU threads start after the filter).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_prctl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Kicking vCPUs out of KVM_RUN.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_tgkill,
];

/// The only address family a worker may create sockets in (vsock's host side is Unix
/// sockets); `socket` for any other family kills the process.
pub const ALLOWED_SOCKET_FAMILY: u64 = libc::AF_UNIX as u64;

/// `_IOC_TYPE` of every KVM ioctl (`KVMIO`, include/uapi/linux/kvm.h).
const KVMIO: u64 = 0xae;
/// Non-KVM ioctls a worker makes: FIONBIO (set_nonblocking), FIOCLEX (std's cloexec).
const ALLOWED_IOCTLS: &[u64] = &[0x5421, 0x5451];

/// Why the worker could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    #[error("building the seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("setting rlimit {name} to {value}")]
    Rlimit {
        name: &'static str,
        value: u64,
        #[source]
        source: std::io::Error,
    },
}

fn set_rlimit(resource: libc::__rlimit_resource_t, name: &'static str, value: u64) -> Result<(), ConfinementError> {
    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads the struct we pass and has no other memory effects.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(ConfinementError::Rlimit { name, value, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Lowers the worker's resource limits: no core dumps (guest memory must never land on disk
/// by accident), bounded open files and file size.
pub fn apply_rlimits() -> Result<(), ConfinementError> {
    set_rlimit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    set_rlimit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", WORKER_MAX_OPEN_FILES)?;
    set_rlimit(libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", WORKER_MAX_FILE_BYTES)?;
    Ok(())
}

/// The worker's filter: the syscalls of `ALLOWED_SYSCALLS`, `ioctl` only for KVM and
/// `ALLOWED_IOCTLS`, `socket` only for [`ALLOWED_SOCKET_FAMILY`]; anything else kills the
/// process.
pub fn worker_filter() -> Result<BpfProgram, ConfinementError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED_SYSCALLS.iter().map(|&nr| (nr, Vec::new())).collect();
    let arg_rule = |arg, op, value| -> Result<SeccompRule, ConfinementError> {
        let condition =
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(ConfinementError::Filter)?;
        SeccompRule::new(vec![condition]).map_err(ConfinementError::Filter)
    };
    let mut ioctl = vec![arg_rule(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)?];
    for &request in ALLOWED_IOCTLS {
        ioctl.push(arg_rule(1, SeccompCmpOp::Eq, request)?);
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    rules.insert(libc::SYS_socket, vec![arg_rule(0, SeccompCmpOp::Eq, ALLOWED_SOCKET_FAMILY)?]);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(ConfinementError::Filter)?;
    filter.try_into().map_err(ConfinementError::Filter)
}

/// Confines the calling worker process (all its threads): rlimits, then the seccomp filter.
pub fn confine_worker() -> Result<(), ConfinementError> {
    apply_rlimits()?;
    let filter = worker_filter()?;
    // The one line that explains a later SIGSYS death.
    tracing::info!(
        pid = std::process::id(),
        allowed_syscalls = ALLOWED_SYSCALLS.len() + 2,
        "worker: installing the seccomp filter; any other system call kills this process"
    );
    seccompiler::apply_filter_all_threads(&filter).map_err(ConfinementError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_for_x86_64() {
        let program = worker_filter().unwrap();
        assert!(program.len() > ALLOWED_SYSCALLS.len());
    }

    /// Forks a child that installs the worker filter and opens a socket of `family`; returns
    /// the child's wait status.
    fn socket_under_filter(family: libc::c_int) -> libc::c_int {
        let program = worker_filter().unwrap();
        // SAFETY: the child only makes raw system calls (seccomp install, socket, _exit)
        // before exiting; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let installed = seccompiler::apply_filter(&program).is_ok();
            // SAFETY: plain system calls in the forked child.
            unsafe {
                if !installed {
                    libc::_exit(3);
                }
                let fd = libc::socket(family, libc::SOCK_STREAM, 0);
                libc::_exit(if fd >= 0 { 0 } else { 4 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child we just forked.
        let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(reaped, pid);
        status
    }

    #[test]
    fn unix_sockets_are_allowed_and_other_families_kill_the_worker() {
        let unix = socket_under_filter(libc::AF_UNIX);
        assert!(
            libc::WIFEXITED(unix) && libc::WEXITSTATUS(unix) == 0,
            "AF_UNIX socket under the filter: wait status {unix:#x}"
        );
        for family in [libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK] {
            let status = socket_under_filter(family);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "socket family {family} under the filter: wait status {status:#x}"
            );
        }
    }
}
