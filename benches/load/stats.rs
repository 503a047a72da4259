//! Percentiles of latency samples.

use serde::Serialize;

/// Distribution of one measure, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarizes `samples`, or returns `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        count: sorted.len(),
        p50: percentile(&sorted, 50.0),
        p95: percentile(&sorted, 95.0),
        p99: percentile(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
        mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
    })
}

/// Nearest-rank percentile of an ascending, non-empty slice: the smallest sample with at
/// least `rank` percent of the samples at or below it.
pub fn percentile(sorted: &[f64], rank: f64) -> f64 {
    let position = (rank / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[position.clamp(1, sorted.len()) - 1]
}
