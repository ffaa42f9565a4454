//! PID 1 duties: the API filesystems, the writable overlay root, host name and
//! environment, the network ([`setup_network`]), and the init loop that reaps every orphan.
//!
//! Layout of the boot: the kernel mounted the shared read-only base disk as
//! `/` (`root=/dev/vda ro`). [`setup_filesystems`] mounts proc, sysfs,
//! cgroup2 (at [`CGROUP_MOUNT`]) and devtmpfs, stages the per-sandbox writable disk (`/dev/vdb`, ext4; a tmpfs
//! when absent) and an overlay of the two under `/run/capsule`, moves the API
//! mounts into the overlay and `pivot_root`s into it, so `/` is writable.
//!
//! Then [`init_loop`] splits the process: the child serves the protocol (it is
//! an ordinary process whose only children are its own, so per-child
//! `waitpid` there never races a reaper), and PID 1 itself only reaps with
//! `waitpid(-1)` and restarts the server if it ever dies. PID 1 never exits
//! and never panics on purpose: every step logs and carries on.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

/// Where PID 1 mounts cgroup v2 (the agent's cgroup root in a guest).
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// Staging area of the overlay (on the first tmpfs at `/run`).
const STAGING_DIR: &str = "/run/capsule";
/// The per-sandbox writable disk.
const WRITABLE_DISK: &str = "/dev/vdb";
/// The guest's host name.
pub const GUEST_HOSTNAME: &str = "capsule";
/// What PID 1 prints on the console once filesystems and the overlay root are up.
pub const INIT_OK_LINE: &str = "capsule-agent: init ok";
/// The guest's network interface; the kernel's `ip=` argument configures it and brings it up.
const NET_INTERFACE_SYSFS: &str = "/sys/class/net/eth0";
/// The resolver configuration: the sandbox gateway answers DNS (the VMM's network stack).
const RESOLV_CONF: &str = "nameserver 10.0.2.2\n";
/// Where it goes, in the overlay root.
const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";
/// How long PID 1 waits before restarting a server that died.
const SERVER_RESTART_PAUSE: Duration = Duration::from_secs(1);
/// Default environment of the guest.
const GUEST_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// Errors of one PID 1 step (each is logged; none stops the boot).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A system call failed.
    #[error("{what} failed")]
    Sys {
        /// The call and its arguments.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> InitError {
    InitError::Sys { what: what.into(), source: io::Error::last_os_error() }
}

/// Writes one line to the console (stdout, which the kernel ties to the console).
pub fn console(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn cstring(s: &str) -> CString {
    // Only called with our own constant-derived paths, which have no NUL.
    CString::new(s).unwrap_or_default()
}

/// mount(2) with string arguments.
fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), InitError> {
    let (s, t, f, d) = (cstring(source), cstring(target), cstring(fstype), cstring(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() { std::ptr::null() } else { f.as_ptr() },
            flags,
            if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() },
        )
    };
    if rc != 0 {
        return Err(sys(format!("mount {source} on {target} ({fstype})")));
    }
    Ok(())
}

fn mkdir_p(path: &str) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|source| InitError::Sys { what: format!("mkdir {path}"), source })
}

/// Treats a [`mount`] that failed because something is mounted there already
/// (EBUSY) as done: API filesystems may have been mounted by the kernel.
fn unless_mounted(result: Result<(), InitError>) -> Result<(), InitError> {
    match result {
        Err(InitError::Sys { source: e, .. }) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Mounts a `nosuid,nodev` tmpfs with permission bits `mode` (e.g. `"1777"`) at `target`.
fn mount_tmpfs(target: &str, mode: &str) -> Result<(), InitError> {
    unless_mounted(mount("tmpfs", target, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, &format!("mode={mode}")))
}

/// Makes sure fds 0, 1, 2 exist, on `/dev/console` when the kernel gave none.
fn ensure_console_fds() {
    for fd in 0..=2 {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let path = cstring("/dev/console");
        // SAFETY: a valid path; the result is checked.
        let console = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if console >= 0 && console != fd {
            // SAFETY: both descriptors are valid; dup2 replaces `fd`.
            unsafe {
                libc::dup2(console, fd);
                libc::close(console);
            }
        }
    }
}

fn log_step(result: Result<(), InitError>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
            console(&format!("capsule-agent: {e}{cause}"));
            false
        }
    }
}

/// Mounts the API filesystems and builds the writable overlay root.
/// Returns whether the overlay root is in place.
pub fn setup_filesystems() -> bool {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    log_step(unless_mounted(mount("proc", "/proc", "proc", nosuid_nodev_noexec, "")));
    log_step(unless_mounted(mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "")));
    // Submounts of /sys move with it into the overlay root below.
    log_step(unless_mounted(mount("cgroup2", CGROUP_MOUNT, "cgroup2", nosuid_nodev_noexec, "")));
    log_step(unless_mounted(mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")));
    ensure_console_fds();
    log_step(mount_tmpfs("/run", "0755"));
    let overlay_ok = log_step(build_overlay_root());
    // The final API mounts, in the new root (or the old one if the overlay failed).
    log_step(mount_tmpfs("/run", "0755"));
    log_step(mount_tmpfs("/tmp", "1777"));
    log_step(mkdir_p("/dev/pts"));
    log_step(unless_mounted(mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0620,ptmxmode=0666",
    )));
    log_step(mkdir_p("/dev/shm"));
    log_step(mount_tmpfs("/dev/shm", "1777"));
    overlay_ok
}

/// Stages the overlay under [`STAGING_DIR`] and pivots into it.
fn build_overlay_root() -> Result<(), InitError> {
    let rw = format!("{STAGING_DIR}/rw");
    let lower = format!("{STAGING_DIR}/lower");
    let root = format!("{STAGING_DIR}/root");
    for dir in [&rw, &lower, &root] {
        mkdir_p(dir)?;
    }
    if Path::new(WRITABLE_DISK).exists() {
        mount(WRITABLE_DISK, &rw, "ext4", libc::MS_NOATIME, "")?;
    } else {
        console(&format!("capsule-agent: no {WRITABLE_DISK}; the writable layer is a tmpfs"));
        mount("tmpfs", &rw, "tmpfs", 0, "mode=0755")?;
    }
    mkdir_p(&format!("{rw}/upper"))?;
    mkdir_p(&format!("{rw}/work"))?;
    // A non-recursive bind of the old root: its submounts (/proc, /run…) stay out of the lower layer.
    mount("/", &lower, "", libc::MS_BIND, "")?;
    let options = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
    mount("overlay", &root, "overlay", 0, &options)?;
    for api in ["/proc", "/sys", "/dev"] {
        let target = format!("{root}{api}");
        mkdir_p(&target)?;
        mount(api, &target, "", libc::MS_MOVE, "")?;
    }
    // pivot_root: the overlay becomes `/`, the old root lands on its `/run`,
    // from where it is detached (the overlay keeps its layers alive).
    std::env::set_current_dir(&root).map_err(|source| InitError::Sys { what: format!("chdir {root}"), source })?;
    mkdir_p("run")?;
    let (new_root, put_old) = (cstring("."), cstring("run"));
    // SAFETY: valid NUL-terminated paths; pivot_root changes only mount state.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    if rc != 0 {
        return Err(sys("pivot_root"));
    }
    std::env::set_current_dir("/").map_err(|source| InitError::Sys { what: "chdir /".into(), source })?;
    let old = cstring("/run");
    // SAFETY: a valid path; MNT_DETACH lazily detaches the old root tree.
    if unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(sys("umount the old root from /run"));
    }
    Ok(())
}

/// Sets the host name and the default environment.
pub fn setup_identity() {
    let name = GUEST_HOSTNAME.as_bytes();
    // SAFETY: `name` is valid for `name.len()` bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        log_step(Err(sys("sethostname")));
    }
    for (key, value) in GUEST_ENV {
        // Single-threaded here (before any thread starts), so setting the environment is sound.
        std::env::set_var(key, value);
    }
}

/// Brings the loopback interface up (the kernel's `ip=` does when the VM has a network; without
/// one it stays down), and, when the VM has its network interface, points the resolver at the
/// gateway. Each step logs what failed and the boot goes on.
pub fn setup_network() {
    log_step(bring_up(c"lo"));
    if Path::new(NET_INTERFACE_SYSFS).exists() {
        log_step(write_resolv_conf());
    }
}

/// Writes [`RESOLV_CONF`] in place of whatever the image has there (a symlink, a stub).
fn write_resolv_conf() -> Result<(), InitError> {
    let failed = |what: &str| {
        let what = format!("{what} {RESOLV_CONF_PATH}");
        move |source| InitError::Sys { what, source }
    };
    match std::fs::remove_file(RESOLV_CONF_PATH) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("remove")(e)),
    }
    std::fs::write(RESOLV_CONF_PATH, RESOLV_CONF).map_err(failed("write"))
}

/// Sets `IFF_UP` on the interface `name`, unless it is up already.
fn bring_up(name: &std::ffi::CStr) -> Result<(), InitError> {
    let label = name.to_string_lossy();
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys(format!("socket for bringing up {label}")));
    }
    // SAFETY: socket just returned this descriptor, owned by nothing else.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes().iter().take(libc::IFNAMSIZ - 1)) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(sys(format!("SIOCGIFFLAGS {label}")));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `req`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(sys(format!("SIOCSIFFLAGS {label} up")));
    }
    Ok(())
}

/// Logs panics instead of letting them pass silently; PID 1 and the server keep going.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        console(&format!("capsule-agent: internal error (panic): {info}"));
    }));
}

/// Forks the server (`serve` runs in the child; should it return, the child
/// exits), then reaps every child forever as PID 1, restarting the server when it dies.
pub fn init_loop(serve: impl Fn()) -> ! {
    loop {
        // SAFETY: PID 1 is single-threaded at this point (no thread was ever
        // started here), so the child may run arbitrary code after fork.
        let server = unsafe { libc::fork() };
        if server == 0 {
            serve();
            std::process::exit(1);
        }
        if server < 0 {
            log_step(Err(sys("fork of the agent server")));
            std::thread::sleep(SERVER_RESTART_PAUSE);
            continue;
        }
        reap_until_exit(server);
        std::thread::sleep(SERVER_RESTART_PAUSE);
    }
}

/// Reaps children (orphans included) until `server` exits.
fn reap_until_exit(server: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == server {
            console(&format!("capsule-agent: the agent server exited (wait status {status}); restarting"));
            return;
        }
        if pid < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                // ECHILD cannot last while the server lives; never spin on it.
                std::thread::sleep(SERVER_RESTART_PAUSE);
            }
        }
    }
}
