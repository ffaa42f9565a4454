//! Bench sizes (how many samples, rounds or boots) read from environment variables, with a
//! default. A value that is not a positive count is an error, never silently replaced.

use anyhow::{bail, Result};

/// The positive count in the variable `name`, or `default` when it is unset.
pub fn env_count(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{name}={text:?} is not a positive count"),
        },
        Err(_) => Ok(default),
    }
}
