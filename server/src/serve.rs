//! `capsule serve` (stub: to be written).

/// Arguments of `capsule serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Errors of `capsule serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Not built yet.
    #[error("capsule serve is not implemented yet")]
    NotImplemented,
}

/// Runs `capsule serve`.
pub fn run(_args: ServeArgs) -> Result<(), ServeError> {
    Err(ServeError::NotImplemented)
}
