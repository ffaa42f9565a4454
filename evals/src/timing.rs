//! Interleaved timing of benchmark variants: one call of each variant per
//! round, so a noisy shared host loads every variant alike. It only measures;
//! summarising and printing are each bench's own.

use std::time::{Duration, Instant};

/// Runs `warmup_rounds` untimed rounds, then `n` timed ones, of every variant
/// (one call of each per round). Returns each variant's `n` durations, in
/// the order the variants were given; stops at the first error.
pub fn interleaved_samples(
    n: usize,
    warmup_rounds: usize,
    variants: &mut [&mut dyn FnMut() -> anyhow::Result<()>],
) -> anyhow::Result<Vec<Vec<Duration>>> {
    for _ in 0..warmup_rounds {
        for f in variants.iter_mut() {
            f()?;
        }
    }
    let mut samples = vec![Vec::with_capacity(n); variants.len()];
    for _ in 0..n {
        for (f, out) in variants.iter_mut().zip(&mut samples) {
            let start = Instant::now();
            f()?;
            out.push(start.elapsed());
        }
    }
    Ok(samples)
}
