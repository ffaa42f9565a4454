//! Pseudo-terminals for interactive background processes: the agent keeps
//! the master end (output is read from it, input written to it, the size set
//! on it); the process gets the slave end as stdin, stdout and stderr and as
//! its controlling terminal (see [`crate::spawn::Session::NewSessionOnTerminal`]).
//!
//! Owns opening a pair and sizing it. It never reads or writes a terminal:
//! that is [`crate::process`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::protocol::{PtySize, MAX_PTY_SIDE};

/// Both ends of a new terminal.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end.
    pub master: OwnedFd,
    /// The process's end.
    pub slave: OwnedFd,
}

/// Why a size is refused, when it is (each side must be 1 to [`MAX_PTY_SIDE`]).
pub fn size_problem(size: PtySize) -> Option<String> {
    let ok = |side: u16| (1..=MAX_PTY_SIDE).contains(&side);
    if ok(size.rows) && ok(size.cols) {
        return None;
    }
    Some(format!(
        "pty size {}x{} (rows x cols) is out of range: each side is 1 to {MAX_PTY_SIDE}",
        size.rows, size.cols
    ))
}

/// Opens a new terminal pair of `size` (close-on-exec on both ends).
pub fn open(size: PtySize) -> io::Result<Pty> {
    // SAFETY: posix_openpt(3) takes flags and returns a new descriptor or -1.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt/unlockpt take the master descriptor we own.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // TIOCGPTPEER opens the slave from the master, without a path lookup (Linux 4.13+).
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: the ioctl takes the open flags as its argument and returns a new descriptor or -1.
    let raw = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    set_size(master.as_fd(), size)?;
    Ok(Pty { master, slave })
}

/// Sets a terminal's size; its foreground process group gets `SIGWINCH`.
pub fn set_size(master: BorrowedFd<'_>, size: PtySize) -> io::Result<()> {
    let winsize = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_outside_one_to_the_cap_are_refused() {
        assert_eq!(size_problem(PtySize { rows: 24, cols: 80 }), None);
        assert!(size_problem(PtySize { rows: 0, cols: 80 }).is_some());
        assert!(size_problem(PtySize { rows: 24, cols: MAX_PTY_SIDE + 1 }).is_some());
    }

    #[test]
    fn a_new_pair_has_the_size_asked_for() {
        let pty = open(PtySize { rows: 33, cols: 101 }).unwrap();
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
        assert_eq!(unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) }, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
    }
}
