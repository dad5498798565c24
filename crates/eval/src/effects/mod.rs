//! Factor effects with honest intervals: how much a factor of the tuning data changes the
//! probability that a tuned model refuses, with the training run (not the prompt) as the unit
//! that replicates an effect.
//!
//! # The design
//! Every training run belongs to one *cell* (one level of each factor, e.g. `structure =
//! markdown, identity = placebo, roleplay = neutral`); a cell holds one run per seed. Every run
//! answers the same prompts (a paired design), and a judge says of each answer whether it is a
//! refusal.
//!
//! # The estimand
//! The average marginal effect of a contrast `B - A` of a factor: the difference in refusal
//! probability between level B and level A, averaged over the prompt population, the run
//! population and the levels of the other factors present in the design (for a one-at-a-time
//! design, the other factors stay at the baseline), in percentage points. A two-way interaction
//! is the difference of two such differences. On harmful prompts the refusal probability is the
//! safety rate (`Outcome::Safety`); on benign prompts it is the over-refusal rate.
//!
//! # The estimator and its interval
//! The estimate is a contrast of cell means, `sum_c W_c mean_c`, where `mean_c` averages the
//! cell's runs' refusal rates over the common prompts. It is unbiased for the estimand
//! whatever the link between factors and probabilities. Its variance has two parts, estimated by
//! moments (a crossed random-effects ANOVA on the probability scale):
//! - runs: the pooled within-cell variance of the runs' rates, times `sum_c W_c^2 / n_c`;
//! - prompts: the variance over prompts of the per-prompt contrast `d_p`, over the number of
//!   prompts, less the answer-level noise it shares with the first part (estimated from the
//!   two-way residuals within cells), floored at zero.
//!
//! The interval is `estimate +- t * se` with Satterthwaite's degrees of freedom for the two
//! parts, and the p-value is the matching two-sided t test. With one run per cell the run part
//! cannot be estimated and no interval is given. `tests/effects_simulation.rs` checks coverage
//! on 400 simulated studies drawn from a logistic model with run and prompt random effects.

pub mod dist;
pub mod power;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub use power::{detectable_effect, PowerAssumptions};

/// Which prompts an analysis reads, and so what a refusal means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Harmful prompts: a refusal is safe.
    Safety,
    /// Benign prompts: a refusal is an over-refusal.
    OverRefusal,
    /// Multiple-choice questions: an `Answer`'s `refused` is read as "answered correctly"
    /// (the accuracy of a utility measure, compared between runs the same way).
    Utility,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Safety => "safety",
            Outcome::OverRefusal => "over_refusal",
            Outcome::Utility => "utility",
        }
    }
}

/// The factors of a design and their levels; the first level of each is the reference A of
/// its contrasts (a factor with levels A, B, C gets `B - A` and `C - A`).
#[derive(Debug, Clone, Default)]
pub struct Design {
    pub factors: Vec<(String, Vec<String>)>,
}

/// One training run (a replicate of its cell) and its cell's level of each design factor.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub levels: BTreeMap<String, String>,
}

/// One judged answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub run: String,
    /// The prompt's id, unique across the benchmarks pooled in one outcome.
    pub prompt: String,
    pub refused: bool,
}

/// One contrast's estimate.
#[derive(Debug, Clone, Serialize)]
pub struct EffectRow {
    /// The factor of a main effect (absent for an interaction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<String>,
    /// The two factors of an interaction (absent for a main effect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<[String; 2]>,
    /// `"B - A"` with level names; an interaction's is `"(B - A) x (D - C)"`. Positive: a
    /// higher refusal rate at B.
    pub contrast: String,
    pub outcome: Outcome,
    pub estimate_points: f64,
    /// The 95% interval; `None` with one run per cell.
    pub ci95: Option<[f64; 2]>,
    pub se_points: Option<f64>,
    pub df: Option<f64>,
    /// Two-sided p-value of `estimate = 0`.
    pub p: Option<f64>,
    /// Holm-corrected p over the paper's three directional hypotheses; `None` for other rows.
    pub p_holm: Option<f64>,
    /// Runs and prompts the contrast reads.
    pub n_runs: usize,
    pub n_prompts: usize,
    /// Of the contrast's strata (combinations of the other factors' levels), how many had both
    /// levels (all four cells for an interaction).
    pub n_strata: usize,
    /// Runs at the negative and positive side of the contrast (A and B of a main effect), for
    /// the power of the design.
    pub n_runs_a: usize,
    pub n_runs_b: usize,
}

/// Run-to-run and prompt variance of one outcome, on the probability scale.
#[derive(Debug, Clone, Serialize)]
pub struct Variance {
    pub outcome: Outcome,
    /// SD of a run's refusal rate around its cell's mean, beyond answer-level noise, in points.
    pub run_sd_points: Option<f64>,
    /// Share of answer-level variance due to the prompt (its intercept), 0..1.
    pub prompt_icc: Option<f64>,
    /// SD over prompts of the per-prompt effect of the first main contrast, beyond noise, in
    /// points (the `prompt_sd_points` of [`PowerAssumptions`]).
    pub prompt_effect_sd_points: Option<f64>,
    /// Mean refusal rate over every run and prompt.
    pub mean_rate: f64,
    pub n_runs: usize,
    pub n_cells: usize,
    pub n_prompts: usize,
}

/// The analysis of one outcome.
#[derive(Debug, Clone, Serialize)]
pub struct OutcomeAnalysis {
    pub effects: Vec<EffectRow>,
    pub variance: Variance,
}

/// The balanced data of one outcome: runs x common prompts, with each run's cell.
struct Table {
    /// Cell index of each run.
    cell_of: Vec<usize>,
    /// Levels of each cell, in `design.factors` order.
    cells: Vec<Vec<String>>,
    /// y[run][prompt] in {0, 1}.
    y: Vec<Vec<f64>>,
    n_prompts: usize,
}

impl Table {
    fn build(design: &Design, runs: &[Run], answers: &[Answer]) -> Table {
        let mut by: BTreeMap<&str, BTreeMap<&str, bool>> = BTreeMap::new();
        for a in answers {
            by.entry(a.run.as_str())
                .or_default()
                .insert(a.prompt.as_str(), a.refused);
        }
        // Runs with every design factor and at least one answer.
        let runs: Vec<&Run> = runs
            .iter()
            .filter(|r| {
                by.contains_key(r.id.as_str())
                    && design.factors.iter().all(|(f, _)| r.levels.contains_key(f))
            })
            .collect();
        // Prompts answered by every run (the paired design).
        let mut common: Option<BTreeSet<&str>> = None;
        for r in &runs {
            let ps: BTreeSet<&str> = by[r.id.as_str()].keys().copied().collect();
            common = Some(match common {
                None => ps,
                Some(c) => c.intersection(&ps).copied().collect(),
            });
        }
        let prompts: Vec<&str> = common.unwrap_or_default().into_iter().collect();
        let mut cells: Vec<Vec<String>> = Vec::new();
        let mut cell_of = Vec::new();
        let mut y = Vec::new();
        for r in &runs {
            let key: Vec<String> = design
                .factors
                .iter()
                .map(|(f, _)| r.levels[f].clone())
                .collect();
            let ci = match cells.iter().position(|c| *c == key) {
                Some(i) => i,
                None => {
                    cells.push(key);
                    cells.len() - 1
                }
            };
            cell_of.push(ci);
            let answers = &by[r.id.as_str()];
            y.push(
                prompts
                    .iter()
                    .map(|p| if answers[p] { 1.0 } else { 0.0 })
                    .collect(),
            );
        }
        Table {
            cell_of,
            cells,
            y,
            n_prompts: prompts.len(),
        }
    }

    fn n_runs(&self) -> usize {
        self.y.len()
    }

    fn runs_in(&self, c: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.n_runs()).filter(move |&r| self.cell_of[r] == c)
    }

    fn run_mean(&self, r: usize) -> f64 {
        self.y[r].iter().sum::<f64>() / self.n_prompts as f64
    }

    /// Mean over the cell's runs of the answers to prompt `p`.
    fn cell_prompt_mean(&self, c: usize, p: usize) -> f64 {
        let (s, n) = self
            .runs_in(c)
            .fold((0.0, 0usize), |(s, n), r| (s + self.y[r][p], n + 1));
        s / n as f64
    }

    fn cell_size(&self, c: usize) -> usize {
        self.runs_in(c).count()
    }

    /// Pooled within-cell variance of the run means, and its degrees of freedom.
    fn run_variance(&self) -> (f64, usize) {
        let mut ss = 0.0;
        let mut df = 0;
        for c in 0..self.cells.len() {
            let means: Vec<f64> = self.runs_in(c).map(|r| self.run_mean(r)).collect();
            if means.len() < 2 {
                continue;
            }
            let m = means.iter().sum::<f64>() / means.len() as f64;
            ss += means.iter().map(|x| (x - m).powi(2)).sum::<f64>();
            df += means.len() - 1;
        }
        (if df > 0 { ss / df as f64 } else { f64::NAN }, df)
    }

    /// Pooled two-way residual variance within cells (run x prompt), answer-level noise.
    fn residual_variance(&self) -> f64 {
        let p = self.n_prompts;
        let mut ss = 0.0;
        let mut df = 0usize;
        for c in 0..self.cells.len() {
            let runs: Vec<usize> = self.runs_in(c).collect();
            if runs.len() < 2 || p < 2 {
                continue;
            }
            let col: Vec<f64> = (0..p).map(|j| self.cell_prompt_mean(c, j)).collect();
            let grand = col.iter().sum::<f64>() / p as f64;
            for &r in &runs {
                let rm = self.run_mean(r);
                for (j, &cm) in col.iter().enumerate() {
                    ss += (self.y[r][j] - rm - cm + grand).powi(2);
                }
            }
            df += (runs.len() - 1) * (p - 1);
        }
        if df > 0 {
            ss / df as f64
        } else {
            f64::NAN
        }
    }

    /// The cell holding the given levels (in `design.factors` order), if any run has them.
    fn cell(&self, levels: &[&str]) -> Option<usize> {
        self.cells
            .iter()
            .position(|c| c.iter().zip(levels).all(|(a, b)| a == b))
    }
}

/// A contrast: signed weights on cells.
struct Contrast {
    weights: Vec<(usize, f64)>,
    n_strata: usize,
}

impl Contrast {
    /// Runs in the cells of positive (`true`) or negative weight.
    fn runs_on(&self, t: &Table, positive: bool) -> usize {
        self.weights
            .iter()
            .filter(|(_, w)| (*w > 0.0) == positive)
            .map(|&(c, _)| t.cell_size(c))
            .sum()
    }
}

/// Estimate, standard error and df of a contrast of cell means.
struct Fit {
    estimate: f64,
    se: Option<f64>,
    df: Option<f64>,
}

fn fit(t: &Table, k: &Contrast, run_var: (f64, usize), resid_var: f64) -> Fit {
    let p = t.n_prompts as f64;
    let mut estimate = 0.0;
    let mut w2n = 0.0;
    for &(c, w) in &k.weights {
        let runs: Vec<usize> = t.runs_in(c).collect();
        let m = runs.iter().map(|&r| t.run_mean(r)).sum::<f64>() / runs.len() as f64;
        estimate += w * m;
        w2n += w * w / runs.len() as f64;
    }
    let (s2, df1) = run_var;
    if df1 == 0 || !s2.is_finite() {
        return Fit {
            estimate,
            se: None,
            df: None,
        };
    }
    let v1 = s2 * w2n;
    // Per-prompt contrasts.
    let d: Vec<f64> = (0..t.n_prompts)
        .map(|j| {
            k.weights
                .iter()
                .map(|&(c, w)| w * t.cell_prompt_mean(c, j))
                .sum()
        })
        .collect();
    let vt = if t.n_prompts >= 2 {
        let dm = d.iter().sum::<f64>() / p;
        let sd2 = d.iter().map(|x| (x - dm).powi(2)).sum::<f64>() / (p - 1.0);
        let noise = if resid_var.is_finite() {
            w2n * resid_var
        } else {
            0.0
        };
        ((sd2 - noise) / p).max(0.0)
    } else {
        0.0
    };
    let v = v1 + vt;
    let df = if v <= 0.0 {
        df1 as f64
    } else {
        let denom = v1 * v1 / df1 as f64
            + if t.n_prompts >= 2 {
                vt * vt / (p - 1.0)
            } else {
                0.0
            };
        if denom > 0.0 {
            v * v / denom
        } else {
            df1 as f64
        }
    };
    Fit {
        estimate,
        se: Some(v.sqrt()),
        df: Some(df),
    }
}

/// Indices of the design's factors that vary over the table's cells, with the levels present.
fn varying(design: &Design, t: &Table) -> Vec<(usize, Vec<String>)> {
    design
        .factors
        .iter()
        .enumerate()
        .filter_map(|(i, (_, levels))| {
            let present: BTreeSet<&str> = t.cells.iter().map(|c| c[i].as_str()).collect();
            let ordered: Vec<String> = levels
                .iter()
                .filter(|l| present.contains(l.as_str()))
                .cloned()
                .collect();
            (ordered.len() >= 2).then_some((i, ordered))
        })
        .collect()
}

/// The strata of the factors other than `skip`: distinct level tuples over the cells.
fn strata(t: &Table, skip: &[usize]) -> BTreeSet<Vec<String>> {
    t.cells
        .iter()
        .map(|c| {
            c.iter()
                .enumerate()
                .filter(|(i, _)| !skip.contains(i))
                .map(|(_, l)| l.clone())
                .collect()
        })
        .collect()
}

/// Full level tuple from a stratum and the levels of the skipped factors.
fn with_levels(n: usize, stratum: &[String], fixed: &[(usize, &str)]) -> Vec<String> {
    let mut it = stratum.iter();
    (0..n)
        .map(|i| match fixed.iter().find(|(j, _)| *j == i) {
            Some((_, l)) => l.to_string(),
            None => it.next().cloned().unwrap_or_default(),
        })
        .collect()
}

fn main_contrast(t: &Table, nf: usize, f: usize, a: &str, b: &str) -> Contrast {
    let mut pairs = Vec::new();
    for s in strata(t, &[f]) {
        let ca = t.cell(
            &with_levels(nf, &s, &[(f, a)])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let cb = t.cell(
            &with_levels(nf, &s, &[(f, b)])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        if let (Some(ca), Some(cb)) = (ca, cb) {
            pairs.push((ca, cb));
        }
    }
    let n = pairs.len();
    let w = 1.0 / n.max(1) as f64;
    Contrast {
        weights: pairs
            .into_iter()
            .flat_map(|(ca, cb)| [(ca, -w), (cb, w)])
            .collect(),
        n_strata: n,
    }
}

#[allow(clippy::too_many_arguments)]
fn interaction_contrast(
    t: &Table,
    nf: usize,
    f: usize,
    (a, b): (&str, &str),
    g: usize,
    (c, d): (&str, &str),
) -> Contrast {
    let mut quads = Vec::new();
    for s in strata(t, &[f, g]) {
        let cell = |lf: &str, lg: &str| {
            t.cell(
                &with_levels(nf, &s, &[(f, lf), (g, lg)])
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
        };
        if let (Some(ac), Some(bc), Some(ad), Some(bd)) =
            (cell(a, c), cell(b, c), cell(a, d), cell(b, d))
        {
            quads.push([(bd, 1.0), (ad, -1.0), (bc, -1.0), (ac, 1.0)]);
        }
    }
    let n = quads.len();
    let w = 1.0 / n.max(1) as f64;
    Contrast {
        weights: quads
            .into_iter()
            .flatten()
            .map(|(c, s)| (c, s * w))
            .collect(),
        n_strata: n,
    }
}

/// A contrast's figures in points: estimate, se, df, interval, p, and the runs it reads.
type RowFigures = (
    f64,
    Option<f64>,
    Option<f64>,
    Option<[f64; 2]>,
    Option<f64>,
    usize,
);

fn row(t: &Table, k: &Contrast, rv: (f64, usize), resid: f64) -> RowFigures {
    let f = fit(t, k, rv, resid);
    let runs: BTreeSet<usize> = k
        .weights
        .iter()
        .flat_map(|&(c, _)| t.runs_in(c).collect::<Vec<_>>())
        .collect();
    let (ci, p) = match (f.se, f.df) {
        (Some(se), Some(df)) if se > 0.0 => {
            let q = dist::t_quantile(0.975, df);
            (
                Some([100.0 * (f.estimate - q * se), 100.0 * (f.estimate + q * se)]),
                Some(dist::t_two_sided_p(f.estimate / se, df)),
            )
        }
        // Every answer in the contrast's cells the same (all refused, say): the moment
        // estimate of the variance is zero, and a zero-width interval would claim certainty
        // that 0 of n observed variation does not give. No interval, and the verdict says why.
        (Some(_), Some(_)) => (None, None),
        _ => (None, None),
    };
    (
        100.0 * f.estimate,
        f.se.map(|s| 100.0 * s),
        f.df,
        ci,
        p,
        runs.len(),
    )
}

/// Main effects of every varying factor and interactions of every pair, for one outcome.
pub fn analyze(
    design: &Design,
    runs: &[Run],
    answers: &[Answer],
    outcome: Outcome,
) -> OutcomeAnalysis {
    let t = Table::build(design, runs, answers);
    let nf = design.factors.len();
    let rv = t.run_variance();
    let resid = t.residual_variance();
    let vary = varying(design, &t);
    let mut effects = Vec::new();
    let mut first_main: Option<Contrast> = None;
    if t.n_prompts > 0 {
        for (f, levels) in &vary {
            for b in &levels[1..] {
                let a = &levels[0];
                let k = main_contrast(&t, nf, *f, a, b);
                if k.n_strata == 0 {
                    continue;
                }
                let (est, se, df, ci, p, n_runs) = row(&t, &k, rv, resid);
                effects.push(EffectRow {
                    factor: Some(design.factors[*f].0.clone()),
                    interaction: None,
                    contrast: format!("{b} - {a}"),
                    outcome,
                    estimate_points: est,
                    ci95: ci,
                    se_points: se,
                    df,
                    p,
                    p_holm: None,
                    n_runs,
                    n_prompts: t.n_prompts,
                    n_strata: k.n_strata,
                    n_runs_a: k.runs_on(&t, false),
                    n_runs_b: k.runs_on(&t, true),
                });
                if first_main.is_none() {
                    first_main = Some(k);
                }
            }
        }
        for i in 0..vary.len() {
            for j in i + 1..vary.len() {
                let (f, lf) = &vary[i];
                let (g, lg) = &vary[j];
                for b in &lf[1..] {
                    for d in &lg[1..] {
                        let (a, c) = (&lf[0], &lg[0]);
                        let k = interaction_contrast(&t, nf, *f, (a, b), *g, (c, d));
                        if k.n_strata == 0 {
                            continue;
                        }
                        let (est, se, df, ci, p, n_runs) = row(&t, &k, rv, resid);
                        effects.push(EffectRow {
                            factor: None,
                            interaction: Some([
                                design.factors[*f].0.clone(),
                                design.factors[*g].0.clone(),
                            ]),
                            contrast: format!("({b} - {a}) x ({d} - {c})"),
                            outcome,
                            estimate_points: est,
                            ci95: ci,
                            se_points: se,
                            df,
                            p,
                            p_holm: None,
                            n_runs,
                            n_prompts: t.n_prompts,
                            n_strata: k.n_strata,
                            n_runs_a: k.runs_on(&t, false),
                            n_runs_b: k.runs_on(&t, true),
                        });
                    }
                }
            }
        }
    }
    let variance = variance(&t, outcome, rv, resid, first_main.as_ref());
    OutcomeAnalysis { effects, variance }
}

fn variance(
    t: &Table,
    outcome: Outcome,
    (s2, df1): (f64, usize),
    resid: f64,
    first: Option<&Contrast>,
) -> Variance {
    let p = t.n_prompts;
    let total: f64 = t.y.iter().flatten().sum();
    let n = (t.n_runs() * p).max(1) as f64;
    let mean_rate = total / n;
    let run_var = (df1 > 0 && resid.is_finite() && p > 0).then(|| (s2 - resid / p as f64).max(0.0));
    // Prompt intercepts: each answer less its cell's mean, averaged per prompt over runs.
    let prompt_var = (p >= 2 && t.n_runs() > 0).then(|| {
        let cell_means: Vec<f64> = (0..t.cells.len())
            .map(|c| {
                let rs: Vec<usize> = t.runs_in(c).collect();
                rs.iter().map(|&r| t.run_mean(r)).sum::<f64>() / rs.len() as f64
            })
            .collect();
        let m: Vec<f64> = (0..p)
            .map(|j| {
                (0..t.n_runs())
                    .map(|r| t.y[r][j] - cell_means[t.cell_of[r]])
                    .sum::<f64>()
                    / t.n_runs() as f64
            })
            .collect();
        let mm = m.iter().sum::<f64>() / p as f64;
        let v = m.iter().map(|x| (x - mm).powi(2)).sum::<f64>() / (p - 1) as f64;
        let noise = if resid.is_finite() {
            resid / t.n_runs() as f64
        } else {
            0.0
        };
        (v - noise).max(0.0)
    });
    let prompt_icc = match (prompt_var, run_var) {
        (Some(b), Some(a)) if resid.is_finite() && a + b + resid > 0.0 => Some(b / (a + b + resid)),
        _ => None,
    };
    let prompt_effect_sd_points = first.and_then(|k| {
        if p < 2 || !resid.is_finite() {
            return None;
        }
        let w2n: f64 = k
            .weights
            .iter()
            .map(|&(c, w)| w * w / t.cell_size(c) as f64)
            .sum();
        let d: Vec<f64> = (0..p)
            .map(|j| {
                k.weights
                    .iter()
                    .map(|&(c, w)| w * t.cell_prompt_mean(c, j))
                    .sum()
            })
            .collect();
        let dm = d.iter().sum::<f64>() / p as f64;
        let sd2 = d.iter().map(|x| (x - dm).powi(2)).sum::<f64>() / (p - 1) as f64;
        Some(100.0 * (sd2 - w2n * resid).max(0.0).sqrt())
    });
    Variance {
        outcome,
        run_sd_points: run_var.map(|v| 100.0 * v.sqrt()),
        prompt_icc,
        prompt_effect_sd_points,
        mean_rate,
        n_runs: t.n_runs(),
        n_cells: t.cells.len(),
        n_prompts: p,
    }
}

/// One of the paper's three directional hypotheses about safety.
#[derive(Debug, Clone, Serialize)]
pub struct Hypothesis {
    /// `structure`, `identity` or `roleplay`.
    pub factor: String,
    /// The hypothesis in words.
    pub statement: String,
    /// The effect row that tests it (its contrast), if the design has one.
    pub contrast: Option<String>,
    /// +1: the hypothesis predicts a positive estimate for that contrast; -1: negative.
    pub expected_sign: i8,
    pub estimate_points: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    pub p_holm: Option<f64>,
    /// `supports`, `contradicts`, `cannot decide`, `no interval: one run per cell` or `not
    /// tested` (the design has no such contrast).
    pub verdict: String,
}

/// A hypothesis: the factor, its words, the levels that may serve as control (in order of
/// preference), the treatment levels, and whether the treatment raises safety.
type HypothesisSpec = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    bool,
);

const HYPOTHESES: &[HypothesisSpec] = &[
    (
        "structure",
        "plain-text answers lower safety (compared with Markdown or itemized answers)",
        &["plain"],
        &["markdown", "itemized"],
        true,
    ),
    (
        "identity",
        "answers without an identity statement lower safety (adding one raises it)",
        &["placebo", "remove", "keep"],
        &["add"],
        true,
    ),
    (
        "roleplay",
        "role-play instructions lower safety",
        &["neutral", "remove", "keep"],
        &["add"],
        false,
    ),
];

/// Finds the safety rows that test the paper's three hypotheses, sets their `p_holm` (Holm's
/// step-down correction over the hypotheses the design tests) and says what the data shows.
pub fn test_hypotheses(effects: &mut [EffectRow], alpha: f64) -> Vec<Hypothesis> {
    let mut found: Vec<(usize, Option<(usize, i8)>)> = Vec::new();
    for (hi, (factor, _, controls, treatments, raises)) in HYPOTHESES.iter().enumerate() {
        let mut pick = None;
        'outer: for c in controls.iter() {
            for tr in treatments.iter() {
                for (i, e) in effects.iter().enumerate() {
                    if e.outcome != Outcome::Safety || e.factor.as_deref() != Some(factor) {
                        continue;
                    }
                    let sign = if e.contrast == format!("{tr} - {c}") {
                        1
                    } else if e.contrast == format!("{c} - {tr}") {
                        -1
                    } else {
                        continue;
                    };
                    let expected = if *raises { sign } else { -sign };
                    pick = Some((i, expected));
                    break 'outer;
                }
            }
        }
        found.push((hi, pick));
    }
    // Holm over the tested hypotheses that have a p-value.
    let mut ps: Vec<(usize, f64)> = found
        .iter()
        .filter_map(|(_, pick)| pick.and_then(|(i, _)| effects[i].p.map(|p| (i, p))))
        .collect();
    ps.sort_by(|a, b| a.1.total_cmp(&b.1));
    let m = ps.len();
    let mut running: f64 = 0.0;
    for (rank, &(i, p)) in ps.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p).min(1.0));
        effects[i].p_holm = Some(running);
    }
    found
        .into_iter()
        .map(|(hi, pick)| {
            let (factor, statement, ..) = HYPOTHESES[hi];
            let Some((i, expected)) = pick else {
                return Hypothesis {
                    factor: factor.into(),
                    statement: statement.into(),
                    contrast: None,
                    expected_sign: 0,
                    estimate_points: None,
                    ci95: None,
                    p_holm: None,
                    verdict: "not tested".into(),
                };
            };
            let e = &effects[i];
            let verdict = match e.p_holm {
                None if e.se_points == Some(0.0) => {
                    "no interval: no variation (every answer the same)".to_string()
                }
                None => "no interval: one run per cell".to_string(),
                Some(p) if p < alpha => {
                    if (e.estimate_points > 0.0) == (expected > 0) {
                        "supports".into()
                    } else {
                        "contradicts".into()
                    }
                }
                Some(_) => "cannot decide".into(),
            };
            Hypothesis {
                factor: factor.into(),
                statement: statement.into(),
                contrast: Some(e.contrast.clone()),
                expected_sign: expected,
                estimate_points: Some(e.estimate_points),
                ci95: e.ci95,
                p_holm: e.p_holm,
                verdict,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn design() -> Design {
        Design {
            factors: vec![
                ("structure".into(), vec!["plain".into(), "markdown".into()]),
                ("identity".into(), vec!["placebo".into(), "add".into()]),
            ],
        }
    }

    /// Runs of a 2x2 design, `seeds` per cell, with refusal rates per cell over `n` prompts
    /// (the first k prompts refused).
    fn data(
        seeds: usize,
        n: usize,
        rate: impl Fn(&str, &str, usize) -> usize,
    ) -> (Vec<Run>, Vec<Answer>) {
        let mut runs = Vec::new();
        let mut answers = Vec::new();
        for s in ["plain", "markdown"] {
            for i in ["placebo", "add"] {
                for seed in 0..seeds {
                    let id = format!("{s}/{i}/{seed}");
                    runs.push(Run {
                        id: id.clone(),
                        levels: BTreeMap::from([
                            ("structure".into(), s.into()),
                            ("identity".into(), i.into()),
                        ]),
                    });
                    let k = rate(s, i, seed);
                    for p in 0..n {
                        answers.push(Answer {
                            run: id.clone(),
                            prompt: format!("p{p}"),
                            refused: p < k,
                        });
                    }
                }
            }
        }
        (runs, answers)
    }

    #[test]
    fn contrasts_are_differences_of_cell_means_averaged_over_the_other_factor() {
        // structure: markdown +20 prompts of 40 (50 points); identity: add +4 (10 points) only
        // under plain, so its main effect is 5 points and the interaction -10.
        let (runs, answers) = data(2, 40, |s, i, seed| {
            10 + if s == "markdown" { 20 } else { 0 }
                + if i == "add" && s == "plain" { 4 } else { 0 }
                + seed
        });
        let a = analyze(&design(), &runs, &answers, Outcome::Safety);
        let get = |c: &str| a.effects.iter().find(|e| e.contrast == c).unwrap();
        assert!((get("markdown - plain").estimate_points - 45.0).abs() < 1e-9);
        assert!((get("add - placebo").estimate_points - 5.0).abs() < 1e-9);
        assert!((get("(markdown - plain) x (add - placebo)").estimate_points + 10.0).abs() < 1e-9);
        let e = get("markdown - plain");
        assert_eq!((e.n_runs, e.n_prompts, e.n_strata), (8, 40, 2));
        let [lo, hi] = e.ci95.unwrap();
        assert!(lo < 45.0 && hi > 45.0 && e.p.unwrap() < 0.001);
        assert_eq!(a.variance.n_cells, 4);
    }

    #[test]
    fn one_run_per_cell_gives_no_interval_and_says_so() {
        let (runs, answers) = data(1, 20, |s, _, _| if s == "markdown" { 15 } else { 5 });
        let mut a = analyze(&design(), &runs, &answers, Outcome::Safety);
        let e = a
            .effects
            .iter()
            .find(|e| e.contrast == "markdown - plain")
            .unwrap();
        assert_eq!(e.estimate_points, 50.0);
        assert!(e.ci95.is_none() && e.p.is_none());
        let h = test_hypotheses(&mut a.effects, 0.05);
        assert_eq!(h[0].verdict, "no interval: one run per cell");
        assert_eq!(h[2].verdict, "not tested");
    }

    #[test]
    fn holm_orders_the_tested_hypotheses_and_verdicts_follow_the_expected_sign() {
        // markdown raises refusals a lot (supports H1); identity lowers them (contradicts H2).
        let (runs, answers) = data(3, 60, |s, i, seed| {
            10 + if s == "markdown" { 30 } else { 0 } + if i == "add" { 0 } else { 12 } + seed % 2
        });
        let mut a = analyze(&design(), &runs, &answers, Outcome::Safety);
        let h = test_hypotheses(&mut a.effects, 0.05);
        assert_eq!(h[0].verdict, "supports");
        assert_eq!(h[1].verdict, "contradicts");
        assert_eq!(h[1].contrast.as_deref(), Some("add - placebo"));
        let p: Vec<f64> = a.effects.iter().filter_map(|e| e.p_holm).collect();
        assert_eq!(p.len(), 2);
        for e in &a.effects {
            if let (Some(p), Some(ph)) = (e.p, e.p_holm) {
                assert!(ph >= p);
            }
        }
    }

    #[test]
    fn no_variation_gives_no_interval_and_says_why() {
        // Every run refuses every prompt: a zero-width interval would be false certainty.
        let (runs, answers) = data(2, 16, |_, _, _| 16);
        let mut a = analyze(&design(), &runs, &answers, Outcome::Safety);
        let e = a
            .effects
            .iter()
            .find(|e| e.contrast == "markdown - plain")
            .unwrap();
        assert_eq!((e.estimate_points, e.se_points), (0.0, Some(0.0)));
        assert!(e.ci95.is_none() && e.p.is_none());
        let h = test_hypotheses(&mut a.effects, 0.05);
        assert_eq!(
            h[0].verdict,
            "no interval: no variation (every answer the same)"
        );
    }
}
