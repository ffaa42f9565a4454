//! The one way this crate takes a mutex: a poisoned lock is used as is.
//!
//! A panicking request thread (caught and reported as `Internal`) must not
//! take the connection, the process table or the worker pool down with it, so
//! every lock here ignores poisoning. It owns nothing else.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
