//! Mapping of operating-system errors to protocol errors.
//!
//! Owns the one table from `errno` to [`ErrorKind`], so files, processes and
//! the system operations report the same kind for the same cause. It never
//! hides the OS message: it is kept in [`AgentError::message`].

use std::io;

use crate::protocol::{AgentError, ErrorKind};

/// The protocol kind of an OS error.
pub fn kind_of(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => ErrorKind::NotFound,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::ENOTEMPTY) => ErrorKind::DirectoryNotEmpty,
        Some(libc::EINVAL) | Some(libc::ENAMETOOLONG) | Some(libc::ELOOP) => ErrorKind::InvalidArgument,
        Some(libc::EFBIG) | Some(libc::E2BIG) => ErrorKind::TooLarge,
        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        },
    }
}

/// An [`AgentError`] for `what` (e.g. "open /a/b") failing with `e`.
pub fn agent_error(what: &str, e: &io::Error) -> AgentError {
    AgentError { kind: kind_of(e), message: format!("{what}: {e}") }
}

/// An [`AgentError`] of `kind` with `message`.
pub fn error(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError { kind, message: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_precise_kinds() {
        let cases = [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::ENOTDIR, ErrorKind::NotADirectory),
            (libc::EISDIR, ErrorKind::IsADirectory),
            (libc::EACCES, ErrorKind::PermissionDenied),
            (libc::EROFS, ErrorKind::PermissionDenied),
            (libc::EEXIST, ErrorKind::AlreadyExists),
            (libc::ENOTEMPTY, ErrorKind::DirectoryNotEmpty),
            (libc::EIO, ErrorKind::Io),
        ];
        for (errno, kind) in cases {
            assert_eq!(kind_of(&io::Error::from_raw_os_error(errno)), kind, "errno {errno}");
        }
        let e = agent_error("open /x", &io::Error::from_raw_os_error(libc::ENOENT));
        assert!(e.message.starts_with("open /x: "), "{}", e.message);
    }
}
