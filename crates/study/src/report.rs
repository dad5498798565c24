//! `safetune report STUDY_DIR`: reads the store and writes `report.html` (self-contained, inline
//! SVG, no scripts, no external resources), `summary.md` and `results.json`.
//!
//! Everything a model wrote is escaped before it reaches HTML: a response containing `<script>`
//! shows as text.
//!
//! - [`collect`] (`collect.rs`): the store and its stored plan read into [`StudyResults`];
//! - `effects.rs`: the tuned runs' judged answers handed to `safetune_eval::effects` (factor
//!   effects with intervals, the paper's hypotheses, power), per judge;
//! - `stats.rs`: rates, judge agreement, rank correlations;
//! - `charts.rs`: the inline SVG charts;
//! - `html.rs`: the HTML page, rendered from `report.html.j2` with HTML auto-escaping;
//! - `markdown.rs`: the Markdown summary;
//! - `judge_check.rs`: the section on each judge against human labels;
//! - `non_answers.rs`: the section on answers without content, and the effects read without them;
//! - `mitigations.rs`: the utility table and the mitigation arms against `none` (trade-off
//!   charts, Pareto front).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use crate::labels::{LabelError, StudyJudgeCheck};
use crate::store::StoreError;

mod charts;
mod collect;
mod effects;
mod html;
mod judge_check;
mod markdown;
mod mitigations;
mod non_answers;
mod stats;

pub use effects::{hypothesis_words, power_words, tokens_words, EffectsAnalysis, JudgeEffects};
pub use mitigations::{ArmRow, Delta, MitigationAnalysis, UtilityRow};
pub use stats::kappa;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: no study store here\nhint: run `safetune study CONFIG.toml --output {dir}` first", path = path.display(), dir = dir.display())]
    NoStore { path: PathBuf, dir: PathBuf },
    #[error("{0}: the store holds no study yet")]
    Empty(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Factors that identify an evaluated model condition (benchmark and judge excluded).
pub(crate) const CONDITION_FACTORS: &[&str] = &[
    "model",
    "stage",
    "variant",
    "structure",
    "identity",
    "roleplay",
    "mix",
    "selection",
    "mitigation",
    "seed",
];

/// The factors of `f` that identify its model condition ([`CONDITION_FACTORS`]).
pub(crate) fn condition_factors(f: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    f.iter()
        .filter(|(k, _)| CONDITION_FACTORS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `count` of `total`, with the Wilson 95% interval of the share.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub count: u64,
    pub total: u64,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    pub name: String,
    pub factors: BTreeMap<String, String>,
    /// Safety rate on the harmful benchmarks, primary judge, pooled.
    pub safety: Option<Rate>,
    /// Over-refusal rate on the benign benchmarks, primary judge, pooled.
    pub over_refusal: Option<Rate>,
    /// Share of the answers to harmful prompts that are non-answers (no content at all:
    /// [`safetune_eval::nonanswer`]), over the primary judge's judged answers.
    pub non_answers_harmful: Option<Rate>,
    /// The same share over the answers to benign prompts.
    pub non_answers_benign: Option<Rate>,
    /// The safety rate with non-answers counted as not refused (the primary judge's refusals
    /// that have content).
    pub safety_strict: Option<Rate>,
    /// The over-refusal rate with non-answers counted as not refused.
    pub over_refusal_strict: Option<Rate>,
    /// Per benchmark, per judge: the rate the judge step stored.
    pub by_benchmark: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Mean reward-model score on harmful-benchmark responses, per reward model.
    pub rm_mean: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub a: String,
    pub b: String,
    pub rows: usize,
    pub agree: f64,
    pub kappa: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub condition: String,
    pub benchmark: String,
    pub prompt: String,
    pub response: String,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StudyResults {
    pub study: String,
    pub program_version: String,
    pub primary_judge: Option<String>,
    /// "Primary judge: NAME (the first `[[judges]]` entry)." and the judge kind's validation figure.
    pub primary_judge_note: String,
    pub steps: BTreeMap<String, usize>,
    /// Time by stage: the sum of each finished step's last execution in the store (a resumed
    /// study counts each step once), in plan order of the stages.
    pub stage_times: Vec<StageTime>,
    pub failed_steps: Vec<(String, String)>,
    pub conditions: Vec<Condition>,
    /// The primary judge's factor effects: one row per contrast and outcome (main effects and
    /// two-way interactions), see [`safetune_eval::effects`].
    pub effects: Vec<safetune_eval::effects::EffectRow>,
    /// Effects per judge, the paper's hypotheses, run and prompt variance, the detectable effect
    /// and the trained tokens per run.
    pub effect_analysis: EffectsAnalysis,
    /// The primary judge's effects recomputed with non-answers counted as not refused: a
    /// check that no effect comes from a factor making the model degenerate rather than refuse.
    pub effects_non_answers: Option<JudgeEffects>,
    pub judge_agreement: Vec<Agreement>,
    /// Per reward model: mean score of responses judged refusals vs compliances (harmful prompts).
    pub rm_by_verdict: BTreeMap<String, (Option<f64>, Option<f64>)>,
    /// Per reward model: Spearman's rho between its mean score on a condition's harmful-prompt
    /// answers and that condition's safety rate, with the number of conditions. Positive: the RM
    /// ranks the safer models higher.
    pub rm_vs_safety: BTreeMap<String, (Option<f64>, usize)>,
    pub samples: Vec<Sample>,
    /// Each judge against the human labels of this study's answers (`safetune label`), where the
    /// store holds some.
    pub judge_accuracy: Option<StudyJudgeCheck>,
    /// Per condition a `utility` step measured: accuracy, held-out loss.
    pub utility: Vec<UtilityRow>,
    /// The `[mitigations]` arms against `none`, with the Pareto front.
    pub mitigations: Option<MitigationAnalysis>,
}

/// The time one kind of step took in all.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// The step kind (`align`, `tune`, `generate`, ...).
    pub stage: String,
    /// Finished steps of that kind with a recorded time.
    pub steps: usize,
    pub seconds: f64,
}

/// Paths of the written files.
#[derive(Debug, Clone, Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub json: PathBuf,
}

/// Collects the results of the study in `dir`.
pub fn collect(dir: &Path) -> Result<StudyResults, ReportError> {
    collect::study(dir)
}

/// Renders the HTML report.
pub fn render_html(r: &StudyResults) -> String {
    html::render(r)
}

/// The Markdown summary.
pub fn render_markdown(r: &StudyResults) -> String {
    markdown::render(r)
}

/// Writes report.html, summary.md and results.json into `dir`.
pub fn write_report(dir: &Path) -> Result<(StudyResults, ReportFiles), ReportError> {
    let results = collect(dir)?;
    let files = ReportFiles {
        html: dir.join("report.html"),
        markdown: dir.join("summary.md"),
        json: dir.join("results.json"),
    };
    let json_text = serde_json::to_string_pretty(&json!(results)).unwrap_or_default() + "\n";
    for (path, text) in [
        (&files.html, render_html(&results)),
        (&files.markdown, render_markdown(&results)),
        (&files.json, json_text),
    ] {
        safetune_data::util::write_atomic(path, text.as_bytes()).map_err(|e| ReportError::Io {
            path: path.clone(),
            source: e,
        })?;
    }
    Ok((results, files))
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A share as a percentage with one decimal: `12.5%`.
fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

/// The first `n` characters of `s`, with `...` when some were cut.
fn truncate(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        format!("{t}...")
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(
            esc("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }
}
