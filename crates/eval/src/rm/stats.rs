//! Statistics of reward-model reliability: ROC AUC, pairwise accuracy with Wilson intervals (ties
//! apart), Kendall tau-b, Spearman rho, seeded percentile bootstrap, and agreement among several
//! raters (pairwise tau, Kendall's W with tie correction). Every function is checked against a
//! hand-computed case in the tests below.

use safetune_data::stats::{Proportion, Z95};
use safetune_data::util::{shuffle_with, SplitMix64};
use serde::Serialize;

/// Average ranks (1-based) of `xs`, ascending; tied values share the mean of their ranks.
/// Also returns the tie-group sizes (groups of 2 or more) for tie corrections.
pub fn average_ranks(xs: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut ranks = vec![0.0; xs.len()];
    let mut ties = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) share rank mean(i+1 ..= j+1).
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = r;
        }
        if j > i {
            ties.push(j - i + 1);
        }
        i = j + 1;
    }
    (ranks, ties)
}

/// ROC AUC of scores of positive items against negative ones: the probability that a random
/// positive scores above a random negative, ties counting one half (Mann-Whitney U / (n_pos n_neg)).
/// `None` when either side is empty.
pub fn roc_auc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let all: Vec<f64> = pos.iter().chain(neg).copied().collect();
    let (ranks, _) = average_ranks(&all);
    let n_pos = pos.len() as f64;
    let rank_sum: f64 = ranks[..pos.len()].iter().sum();
    let u = rank_sum - n_pos * (n_pos + 1.0) / 2.0;
    Some(u / (n_pos * neg.len() as f64))
}

/// Agreement of a scorer with pairwise preferences: a pair is correct when the preferred item
/// scores higher by more than `tie_eps`, wrong when lower by more, a tie otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairAccuracy {
    pub pairs: u64,
    pub correct: u64,
    pub wrong: u64,
    pub ties: u64,
    /// correct / (correct + wrong), with a Wilson 95% interval; ties are left out.
    pub accuracy: Proportion,
    /// ties / pairs, with a Wilson 95% interval.
    pub tie_share: Proportion,
    /// (correct + ties / 2) / pairs: the accuracy a coin flip on ties would get.
    pub accuracy_ties_half: f64,
}

/// `pairs` holds (score of the preferred item, score of the other one).
pub fn pair_accuracy(pairs: &[(f64, f64)], tie_eps: f64) -> PairAccuracy {
    let (mut correct, mut wrong, mut ties) = (0u64, 0u64, 0u64);
    for &(a, b) in pairs {
        let d = a - b;
        if d.is_nan() || d.abs() <= tie_eps {
            ties += 1;
        } else if d > 0.0 {
            correct += 1;
        } else {
            wrong += 1;
        }
    }
    let n = pairs.len() as u64;
    PairAccuracy {
        pairs: n,
        correct,
        wrong,
        ties,
        accuracy: Proportion::new(correct, correct + wrong),
        tie_share: Proportion::new(ties, n),
        accuracy_ties_half: if n == 0 {
            0.0
        } else {
            (correct as f64 + ties as f64 / 2.0) / n as f64
        },
    }
}

/// Kendall's tau-b: (concordant - discordant) / sqrt((n0 - n1)(n0 - n2)), where n1 and n2 count
/// pairs tied in x and in y. `None` when fewer than two items or one side is constant.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "kendall_tau_b: x and y differ in length");
    let n = x.len();
    if n < 2 {
        return None;
    }
    let (mut conc, mut disc, mut tx, mut ty) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[i] - x[j];
            let dy = y[i] - y[j];
            if dx == 0.0 {
                tx += 1;
            }
            if dy == 0.0 {
                ty += 1;
            }
            if dx == 0.0 || dy == 0.0 {
                continue;
            }
            if (dx > 0.0) == (dy > 0.0) {
                conc += 1;
            } else {
                disc += 1;
            }
        }
    }
    let n0 = (n * (n - 1) / 2) as i64;
    let denom = (((n0 - tx) * (n0 - ty)) as f64).sqrt();
    if denom == 0.0 {
        return None;
    }
    Some((conc - disc) as f64 / denom)
}

/// Pearson correlation; `None` when a side is constant or there are fewer than two items.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "pearson: x and y differ in length");
    let n = x.len();
    if n < 2 {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some(sxy / (sxx * syy).sqrt())
}

/// Spearman's rho: Pearson correlation of average ranks (so ties are handled exactly).
pub fn spearman_rho(x: &[f64], y: &[f64]) -> Option<f64> {
    let (rx, _) = average_ranks(x);
    let (ry, _) = average_ranks(y);
    pearson(&rx, &ry)
}

/// A small seeded generator (splitmix64) for bootstrap resampling and random selection.
#[derive(Debug, Clone)]
pub struct SplitMix(SplitMix64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(SplitMix64::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in 0..n (n > 0), by multiply-shift.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below_mul(n)
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        shuffle_with(xs, |n| self.below(n));
    }
}

/// A point estimate with a percentile bootstrap interval, the settings of [`bootstrap`] and how
/// it draws: one type each with the judge metrics (their home is [`crate::bootstrap`]). The
/// analysis sets `resamples` and draws by multiply-shift ([`Draw::MulShift`], the default).
pub use crate::bootstrap::{BootstrapOptions, Draw, Estimate};

/// Percentile of sorted values with linear interpolation between order statistics (one
/// implementation, shared with the judge metrics).
pub use crate::metrics::quantile_sorted;

/// Percentile bootstrap over `n` units ([`crate::bootstrap::bootstrap`]): `stat` gets the
/// resampled unit indices (with repetition) and returns the statistic, or `None` where it is
/// undefined; those resamples, and any whose statistic is not finite, are dropped.
/// Deterministic for a seed. `None` when the statistic is undefined on the full sample.
pub fn bootstrap(
    n: usize,
    opts: &BootstrapOptions,
    stat: &dyn Fn(&[usize]) -> Option<f64>,
) -> Option<Estimate> {
    crate::bootstrap::bootstrap(n, opts, &|idx| stat(idx).filter(|v| v.is_finite()))
}

/// Bootstrap interval of the mean of `xs`.
pub fn bootstrap_mean(xs: &[f64], opts: &BootstrapOptions) -> Option<Estimate> {
    bootstrap(xs.len(), opts, &|idx| {
        if idx.is_empty() {
            None
        } else {
            Some(idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64)
        }
    })
}

/// Kendall tau-b of paired values with a bootstrap interval over the pairs.
pub fn kendall_tau_ci(x: &[f64], y: &[f64], opts: &BootstrapOptions) -> Option<Estimate> {
    bootstrap(x.len(), opts, &|idx| {
        let xs: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let ys: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        kendall_tau_b(&xs, &ys)
    })
}

/// Spearman rho of paired values with a bootstrap interval over the pairs.
pub fn spearman_rho_ci(x: &[f64], y: &[f64], opts: &BootstrapOptions) -> Option<Estimate> {
    bootstrap(x.len(), opts, &|idx| {
        let xs: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let ys: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        spearman_rho(&xs, &ys)
    })
}

/// Kendall's coefficient of concordance W among `m` raters scoring the same `n` items
/// (`scores[rater][item]`), with the tie correction:
/// W = 12 S / (m^2 (n^3 - n) - m sum_j T_j), S = sum_i (R_i - m (n + 1) / 2)^2,
/// T_j = sum over rater j's tie groups of (t^3 - t). `None` with fewer than 2 raters or items,
/// ragged input, or when every rater ties every item.
pub fn kendall_w(scores: &[Vec<f64>]) -> Option<f64> {
    let m = scores.len();
    if m < 2 {
        return None;
    }
    let n = scores[0].len();
    if n < 2 || scores.iter().any(|r| r.len() != n) {
        return None;
    }
    let mut rank_sums = vec![0.0; n];
    let mut t_total = 0.0;
    for rater in scores {
        let (ranks, ties) = average_ranks(rater);
        for (s, r) in rank_sums.iter_mut().zip(&ranks) {
            *s += r;
        }
        t_total += ties.iter().map(|&t| (t * t * t - t) as f64).sum::<f64>();
    }
    let (mf, nf) = (m as f64, n as f64);
    let mean = mf * (nf + 1.0) / 2.0;
    let s: f64 = rank_sums.iter().map(|r| (r - mean) * (r - mean)).sum();
    let denom = mf * mf * (nf * nf * nf - nf) - mf * t_total;
    if denom <= 0.0 {
        return None;
    }
    Some(12.0 * s / denom)
}

/// Kendall tau-b between every two raters; `matrix[i][j]` (`None` on the diagonal's undefined
/// cases, e.g. a constant rater).
pub fn pairwise_tau(scores: &[Vec<f64>]) -> Vec<Vec<Option<f64>>> {
    let m = scores.len();
    let mut out = vec![vec![None; m]; m];
    for i in 0..m {
        for j in 0..m {
            out[i][j] = if i == j {
                Some(1.0)
            } else if j < i {
                out[j][i]
            } else {
                kendall_tau_b(&scores[i], &scores[j])
            };
        }
    }
    out
}

/// The z of a two-sided 95% interval (re-exported for callers that print intervals).
pub const Z: f64 = Z95;

#[cfg(test)]
mod tests {
    use super::*;

    /// Bootstrap and selection draws must never move.
    #[test]
    fn splitmix_is_pinned() {
        type Case = (u64, [u64; 3], [usize; 8], [u32; 10]);
        let expect: [Case; 2] = [
            (
                0,
                [
                    16294208416658607535,
                    7960286522194355700,
                    487617019471545679,
                ],
                [0, 0, 0, 1, 7, 24, 952, 435921149244],
                [6, 1, 0, 5, 2, 3, 9, 8, 4, 7],
            ),
            (
                42,
                [
                    13679457532755275413,
                    2949826092126892291,
                    5139283748462763858,
                ],
                [0, 0, 2, 1, 8, 33, 618, 225291946615],
                [2, 3, 6, 5, 0, 1, 7, 8, 9, 4],
            ),
        ];
        for (seed, draws, below, shuffled) in expect {
            let mut r = SplitMix::new(seed);
            let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
            assert_eq!(got, draws);
            let got: Vec<usize> = [1, 2, 3, 7, 10, 100, 1000, 1 << 40]
                .iter()
                .map(|&n| r.below(n))
                .collect();
            assert_eq!(got, below);
            let mut xs: Vec<u32> = (0..10).collect();
            r.shuffle(&mut xs);
            assert_eq!(xs, shuffled);
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn average_ranks_share_tied_positions() {
        let (r, ties) = average_ranks(&[10.0, 20.0, 20.0, 5.0, 20.0]);
        // sorted: 5 (1), 10 (2), 20 20 20 (3,4,5 -> 4)
        assert_eq!(r, vec![2.0, 4.0, 4.0, 1.0, 4.0]);
        assert_eq!(ties, vec![3]);
    }

    #[test]
    fn auc_matches_hand_count_with_a_tie() {
        // Pairs pos > neg: 0.9>0.5, 0.9>0.3, 0.8>0.5, 0.8>0.3, 0.5>0.3 = 5; 0.5 = 0.5 counts 0.5.
        // AUC = 5.5 / 6.
        let auc = roc_auc(&[0.9, 0.8, 0.5], &[0.5, 0.3]).unwrap();
        assert!(close(auc, 5.5 / 6.0), "auc = {auc}");
        assert_eq!(roc_auc(&[1.0, 2.0], &[3.0]), Some(0.0));
        assert_eq!(roc_auc(&[1.0], &[1.0]), Some(0.5));
        assert_eq!(roc_auc(&[], &[1.0]), None);
    }

    #[test]
    fn pair_accuracy_reports_ties_apart() {
        let pairs = [(2.0, 1.0), (3.0, 1.0), (1.0, 2.0), (1.0, 1.0), (0.5, 0.1)];
        let a = pair_accuracy(&pairs, 0.0);
        assert_eq!((a.correct, a.wrong, a.ties, a.pairs), (3, 1, 1, 5));
        assert!(close(a.accuracy.share, 0.75));
        // Wilson for 3/4 at z = 1.96: centre (0.75 + 0.4802) / 1.9604 = 0.627525,
        // half 1.96 * sqrt(0.046875 + 0.060025) / 1.9604 = 0.326886 -> [0.300639, 0.954411].
        assert!((a.accuracy.lo - 0.300639).abs() < 1e-4, "{:?}", a.accuracy);
        assert!((a.accuracy.hi - 0.954411).abs() < 1e-4, "{:?}", a.accuracy);
        assert!(close(a.tie_share.share, 0.2));
        assert!(close(a.accuracy_ties_half, 3.5 / 5.0));
        // A tolerance turns the near-tie into a tie.
        let b = pair_accuracy(&pairs, 0.5);
        assert_eq!((b.correct, b.wrong, b.ties), (2, 1, 2));
    }

    #[test]
    fn kendall_tau_b_matches_hand_counts() {
        // Two discordant pairs of ten: (8 - 2) / 10.
        let t = kendall_tau_b(&[1., 2., 3., 4., 5.], &[1., 3., 2., 5., 4.]).unwrap();
        assert!(close(t, 0.6), "tau = {t}");
        // Ties: x=[1,2,2,3], y=[1,2,3,3]: 4 concordant, 0 discordant, one tie in each of x and y,
        // n0 = 6: 4 / sqrt(5 * 5) = 0.8.
        let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 2., 3., 3.]).unwrap();
        assert!(close(t, 0.8), "tau = {t}");
        let t = kendall_tau_b(&[1., 2., 3.], &[3., 2., 1.]).unwrap();
        assert!(close(t, -1.0));
        assert_eq!(kendall_tau_b(&[1., 1., 1.], &[1., 2., 3.]), None);
    }

    #[test]
    fn spearman_matches_hand_computed_values() {
        // No ties: 1 - 6 * 4 / (5 * 24) = 0.8.
        let r = spearman_rho(&[1., 2., 3., 4., 5.], &[1., 3., 2., 5., 4.]).unwrap();
        assert!(close(r, 0.8), "rho = {r}");
        // Ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; cov 4.5, var 4.5 and 5:
        // 4.5 / sqrt(22.5) = 0.948683.
        let r = spearman_rho(&[10., 20., 20., 30.], &[1., 2., 3., 4.]).unwrap();
        assert!((r - 0.948683).abs() < 1e-6, "rho = {r}");
    }

    #[test]
    fn kendall_w_with_tie_correction() {
        // Ranks A [1,2,3], B [1,3,2], C [1.5,1.5,3]; R = [3.5, 6.5, 8], mean 6, S = 10.5;
        // T = 2^3 - 2 = 6; W = 12 * 10.5 / (9 * 24 - 3 * 6) = 126 / 198.
        let w = kendall_w(&[vec![1., 2., 3.], vec![1., 3., 2.], vec![1., 1., 3.]]).unwrap();
        assert!(close(w, 126.0 / 198.0), "W = {w}");
        let w = kendall_w(&[vec![1., 2., 3.], vec![10., 20., 30.]]).unwrap();
        assert!(close(w, 1.0));
        // Two raters in exact reverse order: R all equal, W = 0.
        let w = kendall_w(&[vec![1., 2., 3.], vec![3., 2., 1.]]).unwrap();
        assert!(close(w, 0.0));
        assert_eq!(kendall_w(&[vec![1., 2.]]), None);
    }

    #[test]
    fn pairwise_tau_is_symmetric() {
        let m = pairwise_tau(&[vec![1., 2., 3.], vec![3., 2., 1.], vec![1., 3., 2.]]);
        assert_eq!(m[0][1], Some(-1.0));
        assert_eq!(m[1][0], Some(-1.0));
        // x=[1,2,3], y=[1,3,2]: 2 concordant, 1 discordant -> 1/3.
        assert!(close(m[0][2].unwrap(), 1.0 / 3.0));
        assert_eq!(m[2][2], Some(1.0));
    }

    #[test]
    fn bootstrap_is_seeded_and_matches_a_two_point_case() {
        let opts = BootstrapOptions {
            resamples: 4000,
            seed: 7,
            ..Default::default()
        };
        // Data [0, 1]: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the
        // 2.5% and 97.5% percentiles are 0 and 1.
        let e = bootstrap_mean(&[0.0, 1.0], &opts).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (0.5, 0.0, 1.0));
        // Constant data: a zero-width interval.
        let e = bootstrap_mean(&[2.0; 5], &opts).unwrap();
        assert_eq!((e.lo, e.hi), (2.0, 2.0));
        // Same seed, same interval; another seed, another one.
        let xs: Vec<f64> = (0..30).map(|i| ((i * 37) % 11) as f64).collect();
        let a = bootstrap_mean(&xs, &opts).unwrap();
        let b = bootstrap_mean(&xs, &opts).unwrap();
        assert_eq!(a, b);
        let c = bootstrap_mean(&xs, &BootstrapOptions { seed: 8, ..opts }).unwrap();
        assert_ne!((a.lo, a.hi), (c.lo, c.hi));
        assert!(a.lo < a.value && a.value < a.hi);
        // Tau with an interval: perfectly concordant data stays at 1 in every defined resample.
        let t = kendall_tau_ci(&[1., 2., 3., 4.], &[2., 4., 6., 8.], &opts).unwrap();
        assert_eq!((t.value, t.lo, t.hi), (1.0, 1.0, 1.0));
        let kept = t.resamples.unwrap();
        assert!(kept > 3000 && kept < 4000);
    }

    #[test]
    fn quantile_interpolates() {
        assert!(close(quantile_sorted(&[0., 10.], 0.25), 2.5));
        assert!(close(quantile_sorted(&[1., 2., 3.], 0.5), 2.0));
    }
}
