//! Coverage of the factor-effect intervals (`safetune_eval::effects`) on simulated studies.
//!
//! Each simulated study is a full 2x2x2 factorial (structure x identity x roleplay) with three
//! training runs (seeds) per cell, every run answering the same prompts. A judged answer is a
//! refusal with probability `expit(b0 + effects + u_run + v_prompt)`: the factors act on the
//! logit scale, `u_run` is the training run's random effect and `v_prompt` the prompt's. The
//! true effect is the estimand the analysis reports: the average marginal effect in points,
//! i.e. the difference in refusal probability between two levels, averaged over the run and
//! prompt populations (by quadrature) and over the other factors' levels. Prompts and runs are
//! drawn afresh for every study, so the interval must cover both sources of variance.

use std::collections::BTreeMap;

use safetune_eval::effects::{analyze, Answer, Design, Outcome, Run};
use safetune_eval::metrics::Rng;

fn expit(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn normal(rng: &mut Rng) -> f64 {
    // Box-Muller; 1 - unit() keeps the logarithm finite.
    let u1 = 1.0 - rng.unit();
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// E[expit(eta + w)] for w ~ N(0, sd^2), by a fine midpoint rule over +-8 sd.
fn mean_prob(eta: f64, sd: f64) -> f64 {
    if sd == 0.0 {
        return expit(eta);
    }
    let n = 4000;
    let (lo, hi) = (-8.0, 8.0);
    let h = (hi - lo) / n as f64;
    let mut s = 0.0;
    for i in 0..n {
        let z = lo + (i as f64 + 0.5) * h;
        let dens = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
        s += expit(eta + sd * z) * dens * h;
    }
    s
}

struct Truth {
    b0: f64,
    /// Logit effect of level 1 of each factor.
    beta: [f64; 3],
    /// Logit interaction of factors 0 and 1.
    inter01: f64,
    run_sd: f64,
    prompt_sd: f64,
}

impl Truth {
    fn eta(&self, x: [usize; 3]) -> f64 {
        self.b0
            + (0..3).map(|f| self.beta[f] * x[f] as f64).sum::<f64>()
            + self.inter01 * (x[0] * x[1]) as f64
    }

    /// The average marginal effect of factor `f` in points.
    fn ame(&self, f: usize) -> f64 {
        let sd = (self.run_sd.powi(2) + self.prompt_sd.powi(2)).sqrt();
        let mut s = 0.0;
        for a in 0..2 {
            for b in 0..2 {
                let mut others = [a, b].into_iter();
                let mut x0 = [0; 3];
                for (g, v) in x0.iter_mut().enumerate() {
                    if g != f {
                        *v = others.next().unwrap();
                    }
                }
                let mut x1 = x0;
                x1[f] = 1;
                s += mean_prob(self.eta(x1), sd) - mean_prob(self.eta(x0), sd);
            }
        }
        100.0 * s / 4.0
    }
}

const FACTORS: [(&str, [&str; 2]); 3] = [
    ("structure", ["plain", "markdown"]),
    ("identity", ["placebo", "add"]),
    ("roleplay", ["neutral", "add"]),
];

fn simulate(truth: &Truth, seeds: usize, prompts: usize, rng: &mut Rng) -> (Vec<Run>, Vec<Answer>) {
    let v: Vec<f64> = (0..prompts)
        .map(|_| truth.prompt_sd * normal(rng))
        .collect();
    let mut runs = Vec::new();
    let mut answers = Vec::new();
    for cell in 0..8usize {
        let x = [cell & 1, (cell >> 1) & 1, (cell >> 2) & 1];
        for seed in 0..seeds {
            let id = format!("cell{cell}-seed{seed}");
            let u = truth.run_sd * normal(rng);
            let levels: BTreeMap<String, String> = (0..3)
                .map(|f| (FACTORS[f].0.to_string(), FACTORS[f].1[x[f]].to_string()))
                .collect();
            runs.push(Run {
                id: id.clone(),
                levels,
            });
            let eta = truth.eta(x) + u;
            for (p, vp) in v.iter().enumerate() {
                answers.push(Answer {
                    run: id.clone(),
                    prompt: format!("p{p}"),
                    refused: rng.unit() < expit(eta + vp),
                });
            }
        }
    }
    (runs, answers)
}

fn design() -> Design {
    Design {
        factors: FACTORS
            .iter()
            .map(|(f, l)| (f.to_string(), l.iter().map(|s| s.to_string()).collect()))
            .collect(),
    }
}

/// Coverage and mean estimate of each main effect over `studies` simulated studies.
fn coverage(
    truth: &Truth,
    seeds: usize,
    prompts: usize,
    studies: usize,
    seed: u64,
) -> Vec<(f64, f64, f64)> {
    let mut rng = Rng::new(seed);
    let design = design();
    let mut covered = [0usize; 3];
    let mut sum = [0.0f64; 3];
    for _ in 0..studies {
        let (runs, answers) = simulate(truth, seeds, prompts, &mut rng);
        let a = analyze(&design, &runs, &answers, Outcome::Safety);
        for (f, (name, _)) in FACTORS.iter().enumerate() {
            let e = a
                .effects
                .iter()
                .find(|e| e.factor.as_deref() == Some(name))
                .expect("a main effect per factor");
            let [lo, hi] = e.ci95.expect("three runs per cell give an interval");
            let t = truth.ame(f);
            covered[f] += (lo <= t && t <= hi) as usize;
            sum[f] += e.estimate_points;
        }
    }
    (0..3)
        .map(|f| {
            (
                covered[f] as f64 / studies as f64,
                sum[f] / studies as f64,
                truth.ame(f),
            )
        })
        .collect()
}

#[test]
fn intervals_cover_the_true_average_marginal_effect_in_400_simulated_studies() {
    // Effects of the size the paper reports (tens of points), a run SD and a prompt SD on the
    // logit scale of the order this project measures, 3 seeds x 8 cells, 120 prompts.
    let truth = Truth {
        b0: -0.3,
        beta: [0.6, 0.4, -0.8],
        inter01: 0.3,
        run_sd: 0.35,
        prompt_sd: 1.2,
    };
    check(&coverage(&truth, 3, 120, 400, 20261205));
}

/// Each factor's coverage within 92-98% and mean estimate within 1 point of the truth.
fn check(res: &[(f64, f64, f64)]) {
    for (f, (cov, mean, t)) in res.iter().enumerate() {
        eprintln!(
            "{}: coverage {:.3}, mean estimate {:.2} points, truth {:.2} points",
            FACTORS[f].0, cov, mean, t
        );
        assert!(
            (0.92..=0.98).contains(cov),
            "{}: 95% intervals covered the truth in {:.1}% of studies",
            FACTORS[f].0,
            100.0 * cov
        );
        assert!(
            (mean - t).abs() <= 1.0,
            "{}: mean estimate {mean:.2} vs truth {t:.2}",
            FACTORS[f].0
        );
    }
}

#[test]
fn intervals_hold_without_run_variance_and_with_a_null_effect() {
    // No run effect at all and one factor with no effect: the prompt and answer parts carry
    // the interval, and a null effect is estimated near zero.
    let truth = Truth {
        b0: 0.5,
        beta: [0.0, 0.9, -0.5],
        inter01: 0.0,
        run_sd: 0.0,
        prompt_sd: 1.5,
    };
    check(&coverage(&truth, 2, 80, 400, 7));
}
