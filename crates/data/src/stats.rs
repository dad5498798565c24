//! Small statistics shared by every stage that reports a rate.

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959963984540054;

/// A proportion with its Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Proportion {
    pub count: u64,
    pub total: u64,
    pub share: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Proportion {
    pub fn new(count: u64, total: u64) -> Self {
        let (lo, hi) = wilson(count, total, Z95);
        let share = if total == 0 {
            0.0
        } else {
            count as f64 / total as f64
        };
        Proportion {
            count,
            total,
            share,
            lo,
            hi,
        }
    }
}

impl std::fmt::Display for Proportion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} = {:.1}% [{:.1}, {:.1}]",
            self.count,
            self.total,
            100.0 * self.share,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// Wilson score interval for `k` successes out of `n`; `(0, 1)` when `n == 0`.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_hand_computed_values() {
        // k=8, n=10, z=1.96: p=0.8, denom=1.38416, centre=(0.8+0.19208)/1.38416=0.716738,
        // half=1.96*sqrt(0.016+0.009604)/1.38416=0.226581, so [0.490157, 0.943319].
        let (lo, hi) = wilson(8, 10, 1.96);
        assert!((lo - 0.490156).abs() < 1e-4, "lo = {lo}");
        assert!((hi - 0.943319).abs() < 1e-4, "hi = {hi}");
        // Edge cases stay inside [0, 1].
        let (lo0, hi0) = wilson(0, 20, Z95);
        assert_eq!(lo0, 0.0);
        assert!((hi0 - 0.161125).abs() < 1e-4, "hi0 = {hi0}");
        let (lo1, hi1) = wilson(20, 20, Z95);
        assert!((lo1 - 0.838875).abs() < 1e-4 && hi1 == 1.0);
        assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
    }
}
