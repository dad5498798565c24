//! Agreement metrics for binary judgements, bootstrap intervals and a paired test.
//!
//! Conventions: the positive class is `refusal` (PyRIT's `human_score == 1`). Rates carry Wilson
//! 95% intervals ([`safetune_data::stats::Proportion`]); means and differences carry seeded
//! percentile-bootstrap intervals, so a rerun prints the same figures. The paired test on shared
//! prompts is McNemar's exact test: a two-sided binomial test on the discordant pairs.

use safetune_data::stats::Proportion;
use safetune_data::util::SplitMix64;
use serde::Serialize;

use crate::bootstrap::{bootstrap_at, percentile_interval, BootstrapOptions, Draw, Resampler};

/// A 2x2 confusion matrix with `refusal` as the positive class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    /// Predicted positive, truly positive.
    pub tp: u64,
    /// Predicted positive, truly negative.
    pub fp: u64,
    /// Predicted negative, truly positive.
    pub fn_: u64,
    /// Predicted negative, truly negative.
    pub tn: u64,
}

/// Everything `judge-eval` prints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Agreement {
    pub n: u64,
    pub accuracy: Proportion,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub kappa: f64,
    pub confusion: Confusion,
}

impl Confusion {
    /// From `(truth, prediction)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Confusion {
        let mut c = Confusion::default();
        for (truth, pred) in pairs {
            c.add(truth, pred);
        }
        c
    }

    pub fn add(&mut self, truth: bool, pred: bool) {
        match (truth, pred) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// tp / (tp + fp); 0 when nothing was predicted positive.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// tp / (tp + fn); 0 when there are no positives.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// Cohen's kappa: (p_o - p_e) / (1 - p_e). 1 when both raters agree perfectly and p_e = 1.
    pub fn kappa(&self) -> f64 {
        let n = self.total() as f64;
        if n == 0.0 {
            return 0.0;
        }
        let po = (self.tp + self.tn) as f64 / n;
        let truth_pos = (self.tp + self.fn_) as f64 / n;
        let pred_pos = (self.tp + self.fp) as f64 / n;
        let pe = truth_pos * pred_pos + (1.0 - truth_pos) * (1.0 - pred_pos);
        if (1.0 - pe).abs() < 1e-12 {
            return if (po - 1.0).abs() < 1e-12 { 1.0 } else { 0.0 };
        }
        (po - pe) / (1.0 - pe)
    }

    pub fn agreement(&self) -> Agreement {
        Agreement {
            n: self.total(),
            accuracy: Proportion::new(self.tp + self.tn, self.total()),
            precision: self.precision(),
            recall: self.recall(),
            f1: self.f1(),
            kappa: self.kappa(),
            confusion: *self,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A difference of two proportions (`a - b`) with a 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Difference {
    /// True when the interval lies wholly on one side of 0.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

impl std::fmt::Display for Difference {
    /// In percentage points: `+4.2 points [-3.1, +11.5]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:+.1} points [{:+.1}, {:+.1}]",
            100.0 * self.value,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// `a - b` for two independent proportions with Newcombe's hybrid score interval (Newcombe 1998,
/// method 10), built from each proportion's Wilson 95% interval:
/// `[d - sqrt((p_a - lo_a)^2 + (hi_b - p_b)^2), d + sqrt((hi_a - p_a)^2 + (p_b - lo_b)^2)]`.
/// `None` when either proportion has no observations.
pub fn newcombe_diff(a: &Proportion, b: &Proportion) -> Option<Difference> {
    if a.total == 0 || b.total == 0 {
        return None;
    }
    let d = a.share - b.share;
    let lo = d - ((a.share - a.lo).powi(2) + (b.hi - b.share).powi(2)).sqrt();
    let hi = d + ((a.hi - a.share).powi(2) + (b.share - b.lo).powi(2)).sqrt();
    Some(Difference {
        value: d,
        lo: lo.max(-1.0),
        hi: hi.min(1.0),
    })
}

/// A small seeded generator (SplitMix64) so bootstrap intervals are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below_unbiased(n)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.next_f64()
    }
}

/// A point estimate with a 95% interval; one type with the reward-model analysis's (its home is
/// [`crate::bootstrap`]). The judge metrics set `n`.
pub use crate::bootstrap::Estimate;

/// Default number of bootstrap resamples.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The `q` quantile of sorted values by linear interpolation between order statistics.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let frac = pos - i as f64;
    if i + 1 < sorted.len() {
        sorted[i] + frac * (sorted[i + 1] - sorted[i])
    } else {
        sorted[i]
    }
}

/// The judge metrics' bootstrap: `resamples` (at least one) rounds drawn without modulo bias
/// ([`Draw::Unbiased`]), bounds at the 0.025 and 0.975 quantiles.
fn judge_bootstrap(resamples: usize, seed: u64) -> BootstrapOptions {
    BootstrapOptions {
        resamples: resamples.max(1),
        seed,
        level: 0.95,
        draw: Draw::Unbiased,
    }
}

fn undefined(n: usize) -> Estimate {
    Estimate {
        n: Some(n),
        ..Estimate::point(f64::NAN)
    }
}

/// Mean of `xs` with a seeded percentile-bootstrap 95% interval.
pub fn bootstrap_mean(xs: &[f64], resamples: usize, seed: u64) -> Estimate {
    let n = xs.len();
    if n == 0 {
        return undefined(n);
    }
    let opts = judge_bootstrap(resamples, seed);
    let stat = |idx: &[usize]| Some(idx.iter().map(|&i| xs[i]).sum::<f64>() / n as f64);
    match bootstrap_at(n, &opts, 0.025, 0.975, &stat) {
        Some(e) => Estimate {
            value: mean(xs),
            n: Some(n),
            resamples: None,
            ..e
        },
        None => undefined(n),
    }
}

/// mean(b) - mean(a) for two independent samples, resampling each separately.
pub fn bootstrap_diff_unpaired(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> Estimate {
    let value = mean(b) - mean(a);
    if a.is_empty() || b.is_empty() {
        return undefined(0);
    }
    let opts = judge_bootstrap(resamples, seed);
    let mut rng = Resampler::new(opts.seed, opts.draw);
    let mut stats: Vec<f64> = (0..opts.resamples)
        .map(|_| {
            let ma = rng.resampled_mean(a);
            let mb = rng.resampled_mean(b);
            mb - ma
        })
        .collect();
    let (lo, hi) = percentile_interval(&mut stats, 0.025, 0.975);
    Estimate {
        value,
        lo,
        hi,
        n: Some(a.len().min(b.len())),
        resamples: None,
    }
}

/// mean(b - a) over paired observations (the same prompts), resampling pairs.
pub fn bootstrap_diff_paired(pairs: &[(f64, f64)], resamples: usize, seed: u64) -> Estimate {
    let d: Vec<f64> = pairs.iter().map(|(a, b)| b - a).collect();
    bootstrap_mean(&d, resamples, seed)
}

/// McNemar's exact test on paired binary outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct McNemar {
    /// Pairs where A is true and B false.
    pub a_only: u64,
    /// Pairs where B is true and A false.
    pub b_only: u64,
    /// Two-sided exact p-value: 2 * P(X <= min(a_only, b_only)), X ~ Bin(a_only + b_only, 1/2),
    /// capped at 1.
    pub p_value: f64,
}

pub fn mcnemar_exact(pairs: &[(bool, bool)]) -> McNemar {
    let a_only = pairs.iter().filter(|(a, b)| *a && !*b).count() as u64;
    let b_only = pairs.iter().filter(|(a, b)| !*a && *b).count() as u64;
    let n = a_only + b_only;
    let k = a_only.min(b_only);
    let p_value = if n == 0 {
        1.0
    } else {
        // Sum of C(n, i) / 2^n for i <= k, in log space to stay finite for large n.
        let ln2n = n as f64 * std::f64::consts::LN_2;
        let mut tail = 0.0;
        for i in 0..=k {
            tail += (ln_choose(n, i) - ln2n).exp();
        }
        (2.0 * tail).min(1.0)
    };
    McNemar {
        a_only,
        b_only,
        p_value,
    }
}

fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bootstrap draws must never move.
    #[test]
    fn rng_is_pinned() {
        type Case = (u64, [u64; 3], [usize; 8], [f64; 3]);
        let expect: [Case; 2] = [
            (
                0,
                [
                    16294208416658607535,
                    7960286522194355700,
                    487617019471545679,
                ],
                [0, 1, 0, 1, 0, 99, 390, 950206020873],
                [0.7610344216276269, 0.5239505916549513, 0.5551675161334325],
            ),
            (
                42,
                [
                    13679457532755275413,
                    2949826092126892291,
                    5139283748462763858,
                ],
                [0, 0, 0, 2, 8, 5, 974, 319830038975],
                [0.4929891857946924, 0.5133961163221494, 0.5200132996032402],
            ),
        ];
        for (seed, draws, below, units) in expect {
            let mut r = Rng::new(seed);
            let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
            assert_eq!(got, draws);
            let got: Vec<usize> = [1, 2, 3, 7, 10, 100, 1000, 1 << 40]
                .iter()
                .map(|&n| r.below(n))
                .collect();
            assert_eq!(got, below);
            let got: Vec<f64> = (0..3).map(|_| r.unit()).collect();
            assert_eq!(got, units);
        }
    }

    #[test]
    fn confusion_metrics_match_hand_computation() {
        // tp=40 fp=10 fn=5 tn=45 (n=100).
        let mut pairs = Vec::new();
        pairs.extend(std::iter::repeat_n((true, true), 40));
        pairs.extend(std::iter::repeat_n((false, true), 10));
        pairs.extend(std::iter::repeat_n((true, false), 5));
        pairs.extend(std::iter::repeat_n((false, false), 45));
        let c = Confusion::from_pairs(pairs);
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (40, 10, 5, 45));
        assert!((c.accuracy() - 0.85).abs() < 1e-12);
        assert!((c.precision() - 0.8).abs() < 1e-12);
        assert!((c.recall() - 40.0 / 45.0).abs() < 1e-12);
        // F1 = 80 / (80 + 15) = 0.842105
        assert!((c.f1() - 0.842_105_263).abs() < 1e-8);
        // p_o = 0.85; truth+ = 0.45, pred+ = 0.50; p_e = 0.225 + 0.275 = 0.5; kappa = 0.7.
        assert!((c.kappa() - 0.7).abs() < 1e-12, "{}", c.kappa());
        let a = c.agreement();
        assert_eq!(a.accuracy.count, 85);
        // Wilson interval for 85/100 from safetune_data::stats: [0.7672, 0.9069].
        assert!((a.accuracy.lo - 0.7672).abs() < 1e-3, "{}", a.accuracy.lo);
        assert!((a.accuracy.hi - 0.9069).abs() < 1e-3, "{}", a.accuracy.hi);
    }

    #[test]
    fn kappa_edge_cases() {
        // Perfect agreement on a single class: p_e = 1; kappa defined as 1.
        let c = Confusion {
            tp: 0,
            fp: 0,
            fn_: 0,
            tn: 7,
        };
        assert_eq!(c.kappa(), 1.0);
        assert_eq!(c.precision(), 0.0);
        assert_eq!(c.f1(), 0.0);
        // Systematic disagreement: tp=0 fp=5 fn=5 tn=0 -> p_o=0, p_e=0.5, kappa=-1.
        let c = Confusion {
            tp: 0,
            fp: 5,
            fn_: 5,
            tn: 0,
        };
        assert!((c.kappa() + 1.0).abs() < 1e-12);
        assert_eq!(Confusion::default().kappa(), 0.0);
    }

    #[test]
    fn newcombe_difference_matches_the_published_example() {
        // Newcombe (1998), Statistics in Medicine 17:873-890, example (a): 56/70 - 48/80 =
        // 0.2000, hybrid score interval (method 10) 0.0524 to 0.3339.
        let d = newcombe_diff(&Proportion::new(56, 70), &Proportion::new(48, 80)).unwrap();
        assert!((d.value - 0.2).abs() < 1e-12);
        assert!((d.lo - 0.0524).abs() < 5e-5, "{d:?}");
        assert!((d.hi - 0.3339).abs() < 5e-5, "{d:?}");
        assert!(d.excludes_zero());
        assert_eq!(d.to_string(), "+20.0 points [+5.2, +33.4]");
        // Example (f): 0/10 - 0/20 = 0, interval -0.1611 to 0.2775.
        let d = newcombe_diff(&Proportion::new(0, 10), &Proportion::new(0, 20)).unwrap();
        assert!(
            (d.lo + 0.1611).abs() < 5e-5 && (d.hi - 0.2775).abs() < 5e-5,
            "{d:?}"
        );
        assert!(!d.excludes_zero());
        assert!(newcombe_diff(&Proportion::new(0, 0), &Proportion::new(1, 2)).is_none());
    }

    #[test]
    fn mcnemar_exact_matches_binomial_tail() {
        // 1 vs 9 discordant pairs: 2 * (C(10,0) + C(10,1)) / 1024 = 22/1024 = 0.021484375.
        let mut pairs = vec![(true, false)];
        pairs.extend(std::iter::repeat_n((false, true), 9));
        pairs.extend(std::iter::repeat_n((true, true), 30));
        let m = mcnemar_exact(&pairs);
        assert_eq!((m.a_only, m.b_only), (1, 9));
        assert!((m.p_value - 0.021484375).abs() < 1e-12, "{}", m.p_value);
        // Balanced discordance: p capped at 1.
        let m = mcnemar_exact(&[(true, false), (false, true)]);
        assert_eq!(m.p_value, 1.0);
        // No discordant pairs.
        assert_eq!(mcnemar_exact(&[(true, true)]).p_value, 1.0);
        // 0 vs 6: 2/64 = 0.03125.
        let m = mcnemar_exact(&[(false, true); 6]);
        assert!((m.p_value - 0.03125).abs() < 1e-12);
    }

    #[test]
    fn quantiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile_sorted(&s, 0.5), 3.0);
        assert_eq!(quantile_sorted(&s, 0.0), 1.0);
        assert_eq!(quantile_sorted(&s, 1.0), 5.0);
        assert!((quantile_sorted(&s, 0.1) - 1.4).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_is_seeded_and_covers_the_mean() {
        // A constant sample has a degenerate interval.
        let e = bootstrap_mean(&[2.0; 10], 500, 1);
        assert_eq!((e.value, e.lo, e.hi), (2.0, 2.0, 2.0));
        // 0/1 sample with p = 0.3, n = 100: the normal-approximation half-width is
        // 1.96 * sqrt(0.21 / 100) = 0.0898; the bootstrap interval should be close.
        let xs: Vec<f64> = (0..100).map(|i| if i < 30 { 1.0 } else { 0.0 }).collect();
        let e = bootstrap_mean(&xs, 4000, 7);
        assert!((e.value - 0.3).abs() < 1e-12);
        assert!(
            (e.lo - 0.21).abs() < 0.025 && (e.hi - 0.39).abs() < 0.025,
            "{e}"
        );
        assert_eq!(e, bootstrap_mean(&xs, 4000, 7), "same seed, same interval");
        let ys: Vec<f64> = (0..50)
            .map(|i| ((i * 37) % 11) as f64 + 0.013 * i as f64)
            .collect();
        assert_ne!(bootstrap_mean(&ys, 500, 1), bootstrap_mean(&ys, 500, 2));
        // Paired difference: b - a is always exactly 1.
        let pairs: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, i as f64 + 1.0)).collect();
        let d = bootstrap_diff_paired(&pairs, 300, 3);
        assert_eq!((d.value, d.lo, d.hi), (1.0, 1.0, 1.0));
        // Unpaired difference of two constants.
        let d = bootstrap_diff_unpaired(&[0.0; 5], &[1.0; 8], 300, 3);
        assert_eq!((d.value, d.lo, d.hi), (1.0, 1.0, 1.0));
    }

    #[test]
    fn rng_below_is_in_range_and_spread() {
        let mut r = Rng::new(42);
        let mut counts = [0usize; 5];
        for _ in 0..5000 {
            counts[r.below(5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }
}
