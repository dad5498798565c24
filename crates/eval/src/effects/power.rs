//! Power before compute: the smallest main effect a design can detect.
//!
//! For a contrast `B - A` with `runs_a` runs at A and `runs_b` at B (pooled over the strata),
//! the estimator of [`super::analyze`] has variance
//! `(1/runs_a + 1/runs_b) (run_sd^2 + q(1-q)/P) + prompt_sd^2 / P`, where `q` is the refusal
//! rate, `P` the number of prompts, `run_sd` the SD of a run's rate around its cell's mean and
//! `prompt_sd` the SD over prompts of the per-prompt effect. The detectable effect at power
//! `1 - beta` and two-sided level alpha is `(t_{1-alpha/2} + t_{1-beta}) * se`, with the
//! t distribution's degrees of freedom of the run part (runs less cells).

use serde::Serialize;

use super::dist::t_quantile;

/// What a power calculation assumes about the data, in points of refusal rate (0-100).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerAssumptions {
    /// SD of a run's refusal rate around its cell's mean, beyond answer-level noise.
    pub run_sd_points: f64,
    /// SD over prompts of a factor's per-prompt effect, beyond answer-level noise.
    pub prompt_sd_points: f64,
    /// The refusal rate the answers' binomial noise is taken at (0-1).
    pub base_rate: f64,
}

impl PowerAssumptions {
    /// This project's measured values: `examples/replicate-smollm2.toml` (SmolLM2-135M, 24 LoRA
    /// runs of 96 demo:medical examples from the aligned model, classifier judge, 296 harmful
    /// prompts; run 2026-12-05): run SD 4.0 points and per-prompt effect SD 7.5 points on
    /// safety. `base_rate` is kept at 0.5, the largest answer-level noise (safety there was
    /// 95%). Over-refusal varied more (run SD 8.6, prompt SD 27.4 points on 75 prompts): set
    /// `[analysis]` keys for a study whose question is over-refusal.
    pub const MEASURED: PowerAssumptions = PowerAssumptions {
        run_sd_points: 4.0,
        prompt_sd_points: 7.5,
        base_rate: 0.5,
    };
}

/// The standard error (points) of a main contrast under `a`; `None` without replicates.
pub fn contrast_se(
    runs_a: usize,
    runs_b: usize,
    n_prompts: usize,
    a: &PowerAssumptions,
) -> Option<f64> {
    if runs_a == 0 || runs_b == 0 || n_prompts == 0 {
        return None;
    }
    let q = a.base_rate.clamp(0.0, 1.0);
    let p = n_prompts as f64;
    let run = (a.run_sd_points / 100.0).powi(2) + q * (1.0 - q) / p;
    let prompt = (a.prompt_sd_points / 100.0).powi(2) / p;
    let v = (1.0 / runs_a as f64 + 1.0 / runs_b as f64) * run + prompt;
    Some(100.0 * v.sqrt())
}

/// The smallest main effect (points) detectable at power `power` and two-sided level `alpha`,
/// for `n_runs` runs in `n_cells` cells; `None` with one run per cell (no run-level degrees of
/// freedom) or no prompts.
#[allow(clippy::too_many_arguments)]
pub fn detectable_effect(
    runs_a: usize,
    runs_b: usize,
    n_runs: usize,
    n_cells: usize,
    n_prompts: usize,
    a: &PowerAssumptions,
    alpha: f64,
    power: f64,
) -> Option<f64> {
    let df = n_runs.checked_sub(n_cells).filter(|&d| d > 0)? as f64;
    let se = contrast_se(runs_a, runs_b, n_prompts, a)?;
    Some((t_quantile(1.0 - alpha / 2.0, df) + t_quantile(power, df)) * se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_runs_and_prompts_detect_smaller_effects() {
        let a = PowerAssumptions::MEASURED;
        let small = detectable_effect(4, 4, 8, 4, 16, &a, 0.05, 0.8).unwrap();
        let big = detectable_effect(12, 12, 24, 8, 200, &a, 0.05, 0.8).unwrap();
        assert!(big < small, "{big} vs {small}");
        assert!(detectable_effect(1, 1, 4, 4, 100, &a, 0.05, 0.8).is_none());
        // Known case: no run or prompt variance, q = 0.5, 2 runs per level, 100 prompts:
        // se = sqrt(2/2 * 0.25 / 100) = 5 points; df = 2 (4 runs, 2 cells).
        let z = PowerAssumptions {
            run_sd_points: 0.0,
            prompt_sd_points: 0.0,
            base_rate: 0.5,
        };
        let d = detectable_effect(2, 2, 4, 2, 100, &z, 0.05, 0.8).unwrap();
        let expect = (4.302_65 + 1.060_66) * 5.0;
        assert!((d - expect).abs() < 0.01, "{d} vs {expect}");
    }
}
