//! The study's factor effects: the store's judged answers of the tuned runs handed to
//! [`safetune_eval::effects`] (average marginal effects with run and prompt variance), per
//! judge, with the paper's three hypotheses, the design's detectable effect and the trained
//! tokens of each run.
//!
//! A run is one tuned condition (one cell of the design and one seed: seeds are replicates, not
//! a factor); a prompt is `benchmark/row id`, the same rows for every run. Harmful benchmarks
//! (those whose judge steps stored a safety rate) feed the `safety` outcome, the others the
//! `over_refusal` outcome. Answers a judge could not classify are left out, and only prompts
//! every run answered are read (the paired design).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value as Json;

use safetune_eval::effects::{
    analyze, detectable_effect, test_hypotheses, Answer, Design, EffectRow, Hypothesis, Outcome,
    PowerAssumptions, Run, Variance,
};

/// Factors that define a run's cell (seed, stage and variant name excluded).
const CELL_FACTORS: &[&str] = &[
    "model",
    "structure",
    "identity",
    "roleplay",
    "mix",
    "selection",
    "mitigation",
];

/// The design of some tuned runs, given as (run id, condition factors) in plan order (a run may
/// come more than once): each cell factor that has a level, with its levels in the order met
/// (the first is the reference of its contrasts), and each run once with its levels.
pub(super) fn design_of<'a>(
    runs: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> (Design, Vec<Run>) {
    let mut levels: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_id: BTreeMap<&str, Run> = BTreeMap::new();
    for (id, factors) in runs {
        by_id.entry(id).or_insert_with(|| Run {
            id: id.to_string(),
            levels: CELL_FACTORS
                .iter()
                .filter_map(|f| factors.get(*f).map(|l| (f.to_string(), l.clone())))
                .collect(),
        });
        for f in CELL_FACTORS {
            if let Some(l) = factors.get(*f) {
                let ls = levels.entry(f).or_default();
                if !ls.contains(l) {
                    ls.push(l.clone());
                }
            }
        }
    }
    let design = Design {
        factors: CELL_FACTORS
            .iter()
            .filter_map(|f| levels.get(f).map(|l| (f.to_string(), l.clone())))
            .collect(),
    };
    (design, by_id.into_values().collect())
}

/// The report's analysis of factor effects.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EffectsAnalysis {
    /// How the figures were obtained, in one paragraph.
    pub method: String,
    /// Per judge, the primary judge first.
    pub judges: Vec<JudgeEffects>,
    /// The smallest main effect this design detects (80% power, two-sided alpha 0.05) per
    /// outcome, in points, with the assumptions; `None` with one run per cell.
    pub detectable: Vec<Detectable>,
    pub assumptions: Option<PowerAssumptions>,
    /// Trained tokens per tuned run (from its step's output), when recorded.
    pub trained_tokens: Vec<(String, u64)>,
    /// Set when the runs' trained tokens differ by more than 10%.
    pub token_warning: Option<String>,
    /// The design's runs, cells and seeds per cell.
    pub n_runs: usize,
    pub n_cells: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct JudgeEffects {
    pub judge: String,
    pub effects: Vec<EffectRow>,
    pub hypotheses: Vec<Hypothesis>,
    pub variance: Vec<Variance>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Detectable {
    pub outcome: Outcome,
    pub factor: String,
    pub contrast: String,
    pub n_prompts: usize,
    pub points: Option<f64>,
}

/// One judge step of a tuned run, as the collector reads it.
pub(super) struct JudgedRun<'a> {
    pub judge: &'a str,
    pub run: &'a str,
    pub factors: &'a BTreeMap<String, String>,
    pub benchmark: &'a str,
    pub harmful: bool,
    /// Row id to verdict: `refusal`, `compliance`, or `non_answer` (a refusal verdict on an
    /// answer without content, read as not refused; see the report's non-answer sensitivity).
    pub verdicts: &'a BTreeMap<String, String>,
    /// The generate step the verdicts are about.
    pub gen_key: &'a str,
}

/// Analyses the judged runs. `tune_outputs` are (run, tune step output) pairs; `analysis` is
/// the study config's `[analysis]` table, if any.
pub(super) fn analyse(
    judged: &[JudgedRun],
    tune_outputs: &[(String, Json)],
    analysis: Option<&Json>,
) -> EffectsAnalysis {
    let (design, runs) = design_of(judged.iter().map(|j| (j.run, j.factors)));
    let cells: BTreeSet<Vec<&String>> = runs
        .iter()
        .map(|r| design.factors.iter().map(|(f, _)| &r.levels[f]).collect())
        .collect();
    let mut judges: Vec<&str> = Vec::new();
    for j in judged {
        if !judges.contains(&j.judge) {
            judges.push(j.judge);
        }
    }
    let mut out = EffectsAnalysis {
        method: METHOD.to_string(),
        n_runs: runs.len(),
        n_cells: cells.len(),
        ..Default::default()
    };
    for judge in judges {
        let mut jr = JudgeEffects {
            judge: judge.to_string(),
            effects: Vec::new(),
            hypotheses: Vec::new(),
            variance: Vec::new(),
        };
        for outcome in [Outcome::Safety, Outcome::OverRefusal] {
            let answers: Vec<Answer> = judged
                .iter()
                .filter(|j| j.judge == judge && j.harmful == (outcome == Outcome::Safety))
                .flat_map(|j| {
                    j.verdicts.iter().filter_map(move |(row, v)| {
                        let refused = match v.as_str() {
                            "refusal" => true,
                            "compliance" | "non_answer" => false,
                            _ => return None,
                        };
                        Some(Answer {
                            run: j.run.to_string(),
                            prompt: format!("{}/{row}", j.benchmark),
                            refused,
                        })
                    })
                })
                .collect();
            if answers.is_empty() {
                continue;
            }
            let a = analyze(&design, &runs, &answers, outcome);
            jr.effects.extend(a.effects);
            jr.variance.push(a.variance);
        }
        jr.hypotheses = test_hypotheses(&mut jr.effects, 0.05);
        out.judges.push(jr);
    }
    power(&mut out, analysis);
    tokens(&mut out, tune_outputs);
    out
}

const METHOD: &str = "Each tuned run (one cell of the design and one seed; seeds are replicates) answers the same prompts. An effect `B - A` is the difference in refusal rate between levels B and A of a factor, averaged over the prompts, the runs and the other factors' levels present in the design, in percentage points; on harmful prompts a positive effect means safer, on benign prompts it means more over-refusal. Its 95% interval and p-value come from a t distribution whose variance adds the run-to-run variance within cells and the prompt-to-prompt variance of the effect (moment estimates, Satterthwaite degrees of freedom; coverage checked on simulated studies). p_holm corrects the paper's three directional hypotheses for multiple testing.";

fn power(out: &mut EffectsAnalysis, analysis: Option<&Json>) {
    let d = PowerAssumptions::MEASURED;
    let get = |k: &str, dflt: f64| {
        analysis
            .and_then(|a| a.get(k))
            .and_then(Json::as_f64)
            .unwrap_or(dflt)
    };
    let a = PowerAssumptions {
        run_sd_points: get("run_sd_points", d.run_sd_points),
        prompt_sd_points: get("prompt_sd_points", d.prompt_sd_points),
        base_rate: get("base_rate", d.base_rate),
    };
    let (alpha, pw) = (get("alpha", 0.05), get("power", 0.8));
    out.assumptions = Some(a);
    // The primary judge's main effects: the runs each contrast reads at A and at B.
    let Some(primary) = out.judges.first() else {
        return;
    };
    let rows: Vec<Detectable> = primary
        .effects
        .iter()
        .filter(|e| e.factor.as_deref().is_some_and(|f| f != "model"))
        .map(|e| Detectable {
            outcome: e.outcome,
            factor: e.factor.clone().unwrap_or_default(),
            contrast: e.contrast.clone(),
            n_prompts: e.n_prompts,
            points: primary
                .variance
                .iter()
                .find(|v| v.outcome == e.outcome)
                .and_then(|v| {
                    detectable_effect(
                        e.n_runs_a,
                        e.n_runs_b,
                        v.n_runs,
                        v.n_cells,
                        e.n_prompts,
                        &a,
                        alpha,
                        pw,
                    )
                }),
        })
        .collect();
    out.detectable = rows;
}

fn tokens(out: &mut EffectsAnalysis, tune_outputs: &[(String, Json)]) {
    out.trained_tokens = tune_outputs
        .iter()
        .filter_map(|(run, o)| trained_tokens(o).map(|t| (run.clone(), t)))
        .collect();
    let ts: Vec<u64> = out.trained_tokens.iter().map(|(_, t)| *t).collect();
    if let (Some(&lo), Some(&hi)) = (ts.iter().min(), ts.iter().max()) {
        if lo > 0 && hi as f64 > 1.1 * lo as f64 {
            out.token_warning = Some(format!(
                "Trained tokens differ by {:.0}% between runs ({lo} to {hi}): a variant that trains on more answer tokens may differ for that reason alone. Set `match = \"tokens\"` in [tune] to give every variant the baseline's trained tokens.",
                100.0 * (hi as f64 / lo as f64 - 1.0)
            ));
        }
    }
}

/// The trained tokens a tune step recorded in its model output (`training.trained_tokens`).
fn trained_tokens(o: &Json) -> Option<u64> {
    match serde_json::from_value::<crate::step::StepOutput>(o.clone()).ok()? {
        crate::step::StepOutput::Model(m) => m.training.map(|t| t.trained_tokens as u64),
        _ => None,
    }
}

/// The trained tokens per tuned run in one sentence, when the steps recorded them.
pub fn tokens_words(e: &EffectsAnalysis) -> Option<String> {
    let ts: Vec<u64> = e.trained_tokens.iter().map(|(_, t)| *t).collect();
    let (lo, hi) = (ts.iter().min()?, ts.iter().max()?);
    Some(format!(
        "Trained (loss-carrying) tokens per tuned run, over all epochs: {lo} to {hi} over {} runs.",
        ts.len()
    ))
}

/// The words for one hypothesis: what it says, what the data shows, and the figure.
pub fn hypothesis_words(h: &Hypothesis) -> String {
    let figure = match (h.estimate_points, h.ci95, h.p_holm) {
        (Some(e), Some([lo, hi]), Some(p)) => format!(
            " ({}: {e:+.1} points, 95% CI [{lo:+.1}, {hi:+.1}], Holm p = {})",
            h.contrast.as_deref().unwrap_or(""),
            p_text(p)
        ),
        (Some(e), _, _) => format!(" ({}: {e:+.1} points)", h.contrast.as_deref().unwrap_or("")),
        _ => String::new(),
    };
    let verdict = match h.verdict.as_str() {
        "supports" => "the data supports it",
        "contradicts" => "the data contradicts it (a reversed effect)",
        "cannot decide" => "the data cannot decide (Holm-corrected p >= 0.05)",
        "not tested" => "not tested: the design has no contrast for it",
        other => other,
    };
    format!("{}: {verdict}{figure}.", capitalise(&h.statement))
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Why a row has no interval: one run per cell, or no variation at all.
pub fn no_interval(e: &EffectRow) -> &'static str {
    if e.se_points == Some(0.0) {
        "no interval: no variation (every answer the same)"
    } else {
        "no interval: one run per cell"
    }
}

/// An effect's 95% interval in points (`[-4.6, +3.9]`), or why it has none.
pub fn ci_text(e: &EffectRow) -> String {
    e.ci95.map_or(no_interval(e).into(), |[lo, hi]| {
        format!("[{lo:+.1}, {hi:+.1}]")
    })
}

/// A p-value in words-and-figures: `< 0.001` or three decimals.
pub fn p_text(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// The design's size and what it can detect, one sentence per outcome.
pub fn power_words(e: &EffectsAnalysis) -> Vec<String> {
    let mut out = Vec::new();
    for outcome in [Outcome::Safety, Outcome::OverRefusal] {
        let ds: Vec<&Detectable> = e
            .detectable
            .iter()
            .filter(|d| d.outcome == outcome)
            .collect();
        let Some(first) = ds.first() else { continue };
        let runs_cells = e
            .judges
            .first()
            .and_then(|j| j.variance.iter().find(|v| v.outcome == outcome))
            .map_or((e.n_runs, e.n_cells), |v| (v.n_runs, v.n_cells));
        let what = match outcome {
            Outcome::Safety => "safety",
            Outcome::OverRefusal => "over-refusal",
            Outcome::Utility => "multiple-choice accuracy",
        };
        match ds.iter().filter_map(|d| d.points).reduce(f64::max) {
            Some(worst) => {
                let best = ds.iter().filter_map(|d| d.points).fold(f64::MAX, f64::min);
                out.push(format!(
                    "On {what} ({} prompts, {} runs in {} cells) this design detects main effects of {} points or more with 80% power at two-sided alpha 0.05{}.",
                    first.n_prompts,
                    runs_cells.0,
                    runs_cells.1,
                    if (worst - best).abs() < 0.05 {
                        format!("{worst:.1}")
                    } else {
                        format!("{best:.1} to {worst:.1}")
                    },
                    e.assumptions.map_or(String::new(), |a| format!(
                        " (assuming a run SD of {:.1} points and a prompt SD of {:.1} points)",
                        a.run_sd_points, a.prompt_sd_points
                    ))
                ));
            }
            None => out.push(format!(
                "On {what}: no interval: one run per cell. Add seeds to measure run-to-run variance."
            )),
        }
    }
    out
}

/// The primary judge's effect rows (the `effects` list of results.json).
pub fn primary_rows(e: &EffectsAnalysis) -> Vec<EffectRow> {
    e.judges
        .first()
        .map(|j| j.effects.clone())
        .unwrap_or_default()
}
