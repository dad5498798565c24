//! The one seeded percentile bootstrap of this crate, and the [`Estimate`] it reports.
//!
//! The judge metrics ([`crate::metrics`]: benchmark means, run comparisons) and the reward-model
//! analysis ([`crate::rm::stats`], [`crate::rm::analyze`]) both resample with this module's
//! [`Resampler`] and read their intervals off with [`percentile_interval`]; resampling of whole
//! units goes through [`bootstrap`]. The two callers pinned different ways of drawing an index
//! below `n` before they shared this code, and each keeps its own ([`Draw`]) so that no reported
//! interval moves.

use safetune_data::util::SplitMix64;
use serde::{Deserialize, Deserializer, Serialize};

use crate::metrics::quantile_sorted;

/// A point estimate with an interval, as results files store it.
///
/// `n` (the sample size, judge metrics) and `resamples` (how many resamples had a defined
/// statistic, reward-model analysis) are written only when present, so the JSON of each is what
/// it was when they were two types; both old shapes read back. An undefined bound is written as
/// `null` (JSON has no NaN) and reads back as NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    #[serde(deserialize_with = "f64_or_nan")]
    pub value: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub lo: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub hi: f64,
    /// Observations the estimate is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// Resamples whose statistic was defined (e.g. not constant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resamples: Option<usize>,
}

impl Estimate {
    /// An estimate with no interval (both bounds NaN).
    pub fn point(value: f64) -> Estimate {
        Estimate {
            value,
            lo: f64::NAN,
            hi: f64::NAN,
            n: None,
            resamples: None,
        }
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}, {:.3}]", self.value, self.lo, self.hi)?;
        if let Some(n) = self.n {
            write!(f, " (n={n})")?;
        }
        Ok(())
    }
}

fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// How a [`Resampler`] draws an index in `0..n`. Both are pinned: each keeps the intervals of
/// the reports that used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Draw {
    /// By rejection, with no modulo bias ([`SplitMix64::below_unbiased`]): the judge metrics.
    Unbiased,
    /// By the high half of `x * n` ([`SplitMix64::below_mul`]): the reward-model analysis.
    #[default]
    MulShift,
}

/// Settings of [`bootstrap`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootstrapOptions {
    pub resamples: usize,
    pub seed: u64,
    /// Two-sided coverage, e.g. 0.95.
    pub level: f64,
    pub draw: Draw,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            resamples: 2000,
            seed: 0,
            level: 0.95,
            draw: Draw::MulShift,
        }
    }
}

impl BootstrapOptions {
    /// The quantiles of the interval's bounds: `(1 - level) / 2` and one minus that.
    pub fn quantiles(&self) -> (f64, f64) {
        let alpha = (1.0 - self.level) / 2.0;
        (alpha, 1.0 - alpha)
    }
}

/// A seeded generator of resampling draws (SplitMix64 with a [`Draw`] rule).
#[derive(Debug, Clone)]
pub struct Resampler {
    rng: SplitMix64,
    draw: Draw,
}

impl Resampler {
    pub fn new(seed: u64, draw: Draw) -> Resampler {
        Resampler {
            rng: SplitMix64::new(seed),
            draw,
        }
    }

    /// An index in `0..n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        match self.draw {
            Draw::Unbiased => self.rng.below_unbiased(n),
            Draw::MulShift => self.rng.below_mul(n),
        }
    }

    /// Uniform in [0, 1) (53 bits).
    pub fn unit(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The mean of `xs` (non-empty) resampled with repetition: `xs.len()` draws, summed in the
    /// order drawn.
    pub fn resampled_mean(&mut self, xs: &[f64]) -> f64 {
        let n = xs.len();
        (0..n).map(|_| xs[self.index(n)]).sum::<f64>() / n as f64
    }

    /// The share of `total` Bernoulli(`p`) draws that succeed (a parametric resample of a rate).
    pub fn resampled_rate(&mut self, p: f64, total: u64) -> f64 {
        let hits = (0..total).filter(|_| self.unit() < p).count();
        hits as f64 / total as f64
    }
}

/// The `lo_q` and `hi_q` quantiles of `values` (sorted here), or NaN for both when empty.
pub fn percentile_interval(values: &mut [f64], lo_q: f64, hi_q: f64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    (quantile_sorted(values, lo_q), quantile_sorted(values, hi_q))
}

/// Percentile bootstrap over `n` units: each of `opts.resamples` rounds draws `n` unit indices
/// with repetition and hands them to `stat`, which returns the statistic or `None` where it is
/// undefined (that round is dropped). `None` when the statistic is undefined on the full sample.
/// The bounds are the [`BootstrapOptions::quantiles`] of the kept statistics (NaN when none
/// was kept); `resamples` counts those. Deterministic for a seed and draw rule.
pub fn bootstrap(
    n: usize,
    opts: &BootstrapOptions,
    stat: &dyn Fn(&[usize]) -> Option<f64>,
) -> Option<Estimate> {
    let (lo_q, hi_q) = opts.quantiles();
    bootstrap_at(n, opts, lo_q, hi_q, stat)
}

/// [`bootstrap`] with the bounds' quantiles given (the judge metrics pin 0.025 and 0.975 as
/// written, which differ in the last bit from `(1 - 0.95) / 2`).
pub fn bootstrap_at(
    n: usize,
    opts: &BootstrapOptions,
    lo_q: f64,
    hi_q: f64,
    stat: &dyn Fn(&[usize]) -> Option<f64>,
) -> Option<Estimate> {
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all)?;
    let mut rng = Resampler::new(opts.seed, opts.draw);
    let mut values = Vec::with_capacity(opts.resamples);
    let mut idx = vec![0usize; n];
    for _ in 0..opts.resamples {
        for slot in idx.iter_mut() {
            *slot = rng.index(n);
        }
        if let Some(v) = stat(&idx) {
            values.push(v);
        }
    }
    let (lo, hi) = percentile_interval(&mut values, lo_q, hi_q);
    Some(Estimate {
        value,
        lo,
        hi,
        n: None,
        resamples: Some(values.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results files written before the two estimate types were merged still read back.
    #[test]
    fn both_old_estimate_shapes_read_back() {
        // Judge metrics (`results.json`, `safetune compare --json`): `n`, no `resamples`.
        let e: Estimate =
            serde_json::from_str(r#"{"value":0.5,"lo":0.25,"hi":0.75,"n":40}"#).unwrap();
        assert_eq!(
            (e.value, e.lo, e.hi, e.n, e.resamples),
            (0.5, 0.25, 0.75, Some(40), None)
        );
        // Reward-model reports: `resamples`, no `n`; an undefined interval written as null.
        let e: Estimate =
            serde_json::from_str(r#"{"value":0.8,"lo":null,"hi":null,"resamples":0}"#).unwrap();
        assert_eq!((e.value, e.n, e.resamples), (0.8, None, Some(0)));
        assert!(e.lo.is_nan() && e.hi.is_nan());
        // Each writes back in its old shape.
        let judge = Estimate {
            n: Some(40),
            ..Estimate::point(0.5)
        };
        assert_eq!(
            serde_json::to_string(&judge).unwrap(),
            r#"{"value":0.5,"lo":null,"hi":null,"n":40}"#
        );
        let rm = Estimate {
            lo: 0.1,
            hi: 0.9,
            resamples: Some(7),
            ..Estimate::point(0.8)
        };
        assert_eq!(
            serde_json::to_string(&rm).unwrap(),
            r#"{"value":0.8,"lo":0.1,"hi":0.9,"resamples":7}"#
        );
        // A missing bound is still an error naming the field.
        let err = serde_json::from_str::<Estimate>(r#"{"value":1.0,"lo":0.0}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `hi`"), "{err}");
    }

    #[test]
    fn display_shows_n_only_when_known() {
        let mut e = Estimate {
            lo: 0.25,
            hi: 0.75,
            ..Estimate::point(0.5)
        };
        assert_eq!(e.to_string(), "0.500 [0.250, 0.750]");
        e.n = Some(12);
        assert_eq!(e.to_string(), "0.500 [0.250, 0.750] (n=12)");
    }

    #[test]
    fn draw_rules_follow_their_pinned_streams() {
        let mut u = Resampler::new(42, Draw::Unbiased);
        let mut m = Resampler::new(42, Draw::MulShift);
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for n in [1, 2, 3, 7, 10, 100, 1000] {
            assert_eq!(u.index(n), a.below_unbiased(n));
            assert_eq!(m.index(n), b.below_mul(n));
        }
    }

    #[test]
    fn percentile_interval_of_nothing_is_nan() {
        let (lo, hi) = percentile_interval(&mut [], 0.025, 0.975);
        assert!(lo.is_nan() && hi.is_nan());
        let (lo, hi) = percentile_interval(&mut [3.0, 1.0, 2.0], 0.0, 1.0);
        assert_eq!((lo, hi), (1.0, 3.0));
    }
}
