//! Summaries of timed samples and the lines the benches print: nearest-rank quantiles, values
//! in milliseconds, and ratios of two variants. It never measures anything itself (see
//! [`crate::timing`]).

use std::time::Duration;

/// Sorted times of one variant.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// The summary of `samples` (at least one).
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Latencies(samples)
    }

    /// The `q`-quantile by the nearest-rank method (`q` in 0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.0.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.0[rank - 1]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    /// The 99th percentile (the slowest sample when there are fewer than 100).
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// The samples, fastest first.
    pub fn sorted(&self) -> &[Duration] {
        &self.0
    }
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints `label` with the p50 and p99 of `l`.
pub fn show(label: &str, l: &Latencies) {
    println!("  {label:<62} p50 {:>9.3} ms   p99 {:>9.3} ms", ms(l.p50()), ms(l.p99()));
}

/// Prints the ratios `over / base` at p50 and at p99.
pub fn ratio(label: &str, over: &Latencies, base: &Latencies) {
    println!(
        "  {label:<62} p50 {:>8.2}×      p99 {:>8.2}×",
        over.p50().as_secs_f64() / base.p50().as_secs_f64(),
        over.p99().as_secs_f64() / base.p99().as_secs_f64()
    );
}
