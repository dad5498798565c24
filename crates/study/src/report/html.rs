//! The HTML report: a page model (the results, plus the charts and the judge-accuracy section
//! already rendered) filled into `report.html.j2` by minijinja.
//!
//! Auto-escaping is on for the template, with the report's own [`esc`] as the escaper, so every
//! string from the study (names, prompts, responses, errors) is escaped exactly once. Only the
//! SVG charts (`charts.rs`) and the judge-accuracy section (`judge_check.rs`), which escape their
//! own text, are inserted with `|safe`.

use minijinja::{AutoEscape, Environment, Error, Output, State, Value};
use serde::Serialize;

use safetune_eval::effects::{EffectRow, Outcome};

use super::effects::{ci_text, p_text};
use super::{
    charts, esc, hypothesis_words, judge_check, pct, power_words, tokens_words, truncate,
    Agreement, Rate, Sample, StudyResults,
};

const TEMPLATE: &str = include_str!("report.html.j2");
const TEMPLATE_NAME: &str = "report.html.j2";

/// Sample responses shown in the page.
const SAMPLES: usize = 40;

/// What the template shows.
#[derive(Serialize)]
struct Page<'a> {
    study: &'a str,
    program_version: &'a str,
    primary_judge: &'a str,
    primary_judge_note: &'a str,
    /// (status, steps) pairs.
    steps: Vec<(&'a str, usize)>,
    failed_steps: &'a [(String, String)],
    safety_chart: Option<String>,
    rates: Vec<RateRow<'a>>,
    /// How the effects were obtained.
    effects_method: &'a str,
    /// Forest plots of the primary judge's effects (safety, then over-refusal).
    forest_charts: Vec<String>,
    /// The primary judge's effect rows.
    effect_rows: Vec<EffectView>,
    /// Per judge, the paper's hypotheses in words.
    hypotheses: Vec<(String, Vec<String>)>,
    /// What the design can detect.
    power: Vec<String>,
    /// Run and prompt variance per judge and outcome.
    variance: Vec<VarianceView>,
    token_warning: Option<&'a str>,
    utility_chart: Option<String>,
    rm_chart: Option<String>,
    /// Shown with the RM chart: (reward model, mean score on refusals, on compliances).
    rm_by_verdict: Vec<(&'a str, Option<f64>, Option<f64>)>,
    agreement_chart: Option<String>,
    agreement: &'a [Agreement],
    /// The judge-accuracy section's HTML; empty without human labels.
    judge_accuracy: String,
    /// The utility table and the mitigations section's HTML; empty without either.
    mitigations: String,
    /// The non-answer section, when answers were read.
    non_answers: Option<super::non_answers::Section>,
    non_answer_note: &'static str,
    samples: &'a [Sample],
}

/// One row of the per-condition rates table.
#[derive(Serialize)]
struct RateRow<'a> {
    condition: &'a str,
    benchmark: &'a str,
    metric: &'a str,
    rate: &'a Rate,
}

#[derive(Serialize)]
struct EffectView {
    name: String,
    outcome: &'static str,
    estimate: String,
    ci: String,
    p: String,
    p_holm: String,
    n_runs: usize,
    n_prompts: usize,
}

#[derive(Serialize)]
struct VarianceView {
    judge: String,
    outcome: &'static str,
    mean_rate: String,
    run_sd: String,
    prompt_icc: String,
    runs: usize,
    prompts: usize,
}

/// Renders the HTML report.
pub(super) fn render(r: &StudyResults) -> String {
    environment()
        .get_template(TEMPLATE_NAME)
        .and_then(|t| t.render(page(r)))
        .unwrap_or_else(|e| panic!("the report template does not render: {e:#}"))
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_formatter(escape_with_esc);
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_filter("pct", pct);
    env.add_filter("fixed", |v: f64, digits: usize| format!("{v:.digits$}"));
    env.add_filter("points", |v: f64| format!("{:+.1}", 100.0 * v));
    env.add_filter("clip", |s: String, n: usize| truncate(&s, n));
    env.add_template(TEMPLATE_NAME, TEMPLATE)
        .expect("the report template parses");
    env
}

/// The formatter for `{{ ... }}`: values not marked safe go through [`esc`] when the template
/// auto-escapes HTML (always, here).
fn escape_with_esc(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    if matches!(state.auto_escape(), AutoEscape::Html) && !value.is_safe() && !value.is_undefined()
    {
        out.write_str(&esc(&value.to_string()))?;
        Ok(())
    } else {
        minijinja::escape_formatter(out, state, value)
    }
}

fn page(r: &StudyResults) -> Page<'_> {
    Page {
        study: &r.study,
        program_version: &r.program_version,
        primary_judge: r.primary_judge.as_deref().unwrap_or("none"),
        primary_judge_note: &r.primary_judge_note,
        steps: r.steps.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        failed_steps: &r.failed_steps,
        safety_chart: safety_chart(r),
        rates: rate_rows(r),
        effects_method: &r.effect_analysis.method,
        forest_charts: forest_charts(r),
        effect_rows: r.effects.iter().map(effect_view).collect(),
        hypotheses: r
            .effect_analysis
            .judges
            .iter()
            .map(|j| {
                (
                    j.judge.clone(),
                    j.hypotheses.iter().map(hypothesis_words).collect(),
                )
            })
            .collect(),
        power: power_words(&r.effect_analysis)
            .into_iter()
            .chain(tokens_words(&r.effect_analysis))
            .collect(),
        variance: variance_views(r),
        token_warning: r.effect_analysis.token_warning.as_deref(),
        utility_chart: utility_chart(r),
        rm_chart: rm_chart(r),
        rm_by_verdict: r
            .rm_by_verdict
            .iter()
            .map(|(rm, (a, b))| (rm.as_str(), *a, *b))
            .collect(),
        agreement_chart: agreement_chart(&r.judge_agreement),
        agreement: &r.judge_agreement,
        judge_accuracy: judge_check::html(r.judge_accuracy.as_ref()),
        mitigations: super::mitigations::html(&r.utility, r.mitigations.as_ref()),
        non_answers: super::non_answers::section(r),
        non_answer_note: super::non_answers::NOTE,
        samples: &r.samples[..r.samples.len().min(SAMPLES)],
    }
}

fn rate_rows(r: &StudyResults) -> Vec<RateRow<'_>> {
    let mut rows = Vec::new();
    for c in &r.conditions {
        for (benchmark, by_metric) in &c.by_benchmark {
            for (metric, rate) in by_metric {
                rows.push(RateRow {
                    condition: &c.name,
                    benchmark,
                    metric,
                    rate,
                });
            }
        }
    }
    rows
}

fn safety_chart(r: &StudyResults) -> Option<String> {
    let rows: Vec<(String, &Rate)> = r
        .conditions
        .iter()
        .filter_map(|c| c.safety.as_ref().map(|s| (c.name.clone(), s)))
        .collect();
    (!rows.is_empty())
        .then(|| charts::bars(&rows, "Safety rate on harmful prompts (higher is safer)"))
}

/// The name of an effect row: `identity: add - placebo` or `structure x identity: (...)`.
pub(super) fn effect_name(e: &EffectRow) -> String {
    match (&e.factor, &e.interaction) {
        (Some(f), _) => format!("{f}: {}", e.contrast),
        (None, Some([a, b])) => format!("{a} x {b}: {}", e.contrast),
        _ => e.contrast.clone(),
    }
}

pub(super) fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Safety => "safety",
        Outcome::OverRefusal => "over-refusal",
        Outcome::Utility => "multiple-choice accuracy",
    }
}

fn effect_view(e: &EffectRow) -> EffectView {
    EffectView {
        name: effect_name(e),
        outcome: outcome_name(e.outcome),
        estimate: format!("{:+.1}", e.estimate_points),
        ci: ci_text(e),
        p: e.p.map_or("-".into(), p_text),
        p_holm: e.p_holm.map_or("-".into(), p_text),
        n_runs: e.n_runs,
        n_prompts: e.n_prompts,
    }
}

fn forest_charts(r: &StudyResults) -> Vec<String> {
    [Outcome::Safety, Outcome::OverRefusal]
        .into_iter()
        .filter_map(|o| {
            let rows: Vec<(String, f64, Option<[f64; 2]>)> = r
                .effects
                .iter()
                .filter(|e| e.outcome == o)
                .map(|e| (effect_name(e), e.estimate_points, e.ci95))
                .collect();
            (!rows.is_empty()).then(|| {
                let title = match o {
                    Outcome::Safety => "Effects on safety (refusal rate on harmful prompts; positive = safer)",
                    Outcome::OverRefusal => "Effects on over-refusal (refusal rate on benign prompts; positive = refuses more)",
                    Outcome::Utility => "Effects on multiple-choice accuracy (positive = more correct)",
                };
                charts::forest(&rows, title)
            })
        })
        .collect()
}

fn variance_views(r: &StudyResults) -> Vec<VarianceView> {
    let mut out = Vec::new();
    for j in &r.effect_analysis.judges {
        for v in &j.variance {
            out.push(VarianceView {
                judge: j.judge.clone(),
                outcome: outcome_name(v.outcome),
                mean_rate: pct(v.mean_rate),
                run_sd: v
                    .run_sd_points
                    .map_or("-".into(), |s| format!("{s:.1} points")),
                prompt_icc: v.prompt_icc.map_or("-".into(), |i| format!("{i:.2}")),
                runs: v.n_runs,
                prompts: v.n_prompts,
            });
        }
    }
    out
}

/// Safety against the share of benign prompts answered, per condition with both.
fn utility_chart(r: &StudyResults) -> Option<String> {
    let pts: Vec<(String, f64, f64)> = r
        .conditions
        .iter()
        .filter_map(|c| match (&c.safety, &c.over_refusal) {
            (Some(s), Some(o)) => Some((c.name.clone(), 1.0 - o.value, s.value)),
            _ => None,
        })
        .collect();
    (!pts.is_empty()).then(|| {
        charts::scatter(
            &pts,
            "Safety vs utility",
            "benign prompts answered (1 - over-refusal)",
            "safety rate",
            (0.0, 1.0),
            (0.0, 1.0),
        )
    })
}

/// Mean reward-model score against safety, per condition and reward model.
fn rm_chart(r: &StudyResults) -> Option<String> {
    let mut pts = Vec::new();
    for c in &r.conditions {
        if let Some(s) = &c.safety {
            for (rm, m) in &c.rm_mean {
                pts.push((format!("{} ({rm})", c.name), *m, s.value));
            }
        }
    }
    if pts.is_empty() {
        return None;
    }
    let lo = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let pad = ((hi - lo) * 0.1).max(1e-3);
    Some(charts::scatter(
        &pts,
        "Mean RM score on harmful prompts vs safety rate",
        "mean reward-model score",
        "safety rate",
        (lo - pad, hi + pad),
        (0.0, 1.0),
    ))
}

fn agreement_chart(agreement: &[Agreement]) -> Option<String> {
    if agreement.is_empty() {
        return None;
    }
    let rates: Vec<Rate> = agreement
        .iter()
        .map(|a| Rate::new((a.agree * a.rows as f64).round() as u64, a.rows as u64))
        .collect();
    let rows: Vec<(String, &Rate)> = agreement
        .iter()
        .zip(&rates)
        .map(|(a, rate)| (format!("{} vs {}", a.a, a.b), rate))
        .collect();
    Some(charts::bars(&rows, "Percent agreement between judges"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::Condition;

    fn rate(count: u64, total: u64) -> Rate {
        Rate::new(count, total)
    }

    /// One base condition named with markup, judged on a harmful benchmark only.
    fn small() -> StudyResults {
        let name = "m<script>alert('c')</script> base";
        let mut by_benchmark = BTreeMap::new();
        by_benchmark.insert(
            "harm<b>".to_string(),
            BTreeMap::from([("keyword safety_rate".to_string(), rate(3, 4))]),
        );
        StudyResults {
            study: "s<script>".into(),
            program_version: "v".into(),
            primary_judge: Some("keyword".into()),
            primary_judge_note: "Primary judge: keyword & co.".into(),
            steps: BTreeMap::from([("done".to_string(), 3), ("failed".to_string(), 1)]),
            stage_times: Vec::new(),
            failed_steps: vec![("tune <x>".into(), "broke: <script>".into())],
            conditions: vec![Condition {
                name: name.into(),
                factors: BTreeMap::from([("model".to_string(), "m<script>".to_string())]),
                safety: Some(rate(3, 4)),
                over_refusal: None,
                non_answers_harmful: Some(rate(1, 4)),
                non_answers_benign: None,
                safety_strict: Some(rate(2, 4)),
                over_refusal_strict: None,
                by_benchmark,
                rm_mean: BTreeMap::new(),
            }],
            effects: vec![],
            effect_analysis: Default::default(),
            effects_non_answers: None,
            judge_agreement: vec![],
            rm_by_verdict: BTreeMap::new(),
            rm_vs_safety: BTreeMap::new(),
            utility: vec![],
            mitigations: None,
            samples: vec![Sample {
                condition: name.into(),
                benchmark: "harm<b>".into(),
                prompt: "<script>prompt()</script>".into(),
                response: "Sure: <script>answer()</script>\n  indented".into(),
                verdict: "compliance".into(),
            }],
            judge_accuracy: None,
        }
    }

    #[test]
    fn names_prompts_and_responses_with_markup_are_escaped() {
        let html = render(&small());
        assert!(!html.to_lowercase().contains("<script"), "{html}");
        for escaped in [
            "<title>safetune study: s&lt;script&gt;</title>",
            "<td>m&lt;script&gt;alert(&#39;c&#39;)&lt;/script&gt; base</td><td>harm&lt;b&gt;</td>",
            "<td class=\"resp\">&lt;script&gt;prompt()&lt;/script&gt;</td>",
            "<td class=\"resp\">Sure: &lt;script&gt;answer()&lt;/script&gt;\n  indented</td>",
            "<li><b>tune &lt;x&gt;</b>: broke: &lt;script&gt;</li>",
            "<p>Primary judge: keyword &amp; co.</p>",
        ] {
            assert!(html.contains(escaped), "{escaped}\n{html}");
        }
    }

    #[test]
    fn a_small_report_has_every_section_and_says_what_is_missing() {
        let html = render(&small());
        assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        assert!(html.ends_with("</body></html>\n"));
        for section in [
            "<h2>Safety rate per condition</h2>",
            "<h2>Factor effects</h2>",
            "No factor varies across the tuned runs with judged answers.",
            "<h2>Safety against utility</h2>",
            "Needs a harmful and a benign (over-refusal) benchmark.",
            "<h2>Reward-model score against measured safety</h2>",
            "No reward-model scores in this study.",
            "<h2>Judge agreement</h2>",
            "One judge only: agreement needs two.",
            "<h2>Sample responses</h2>",
            "<p>Steps: 3 done, 1 failed</p>",
            "<td class=\"num\">75.0%</td><td class=\"num\">[",
        ] {
            assert!(html.contains(section), "{section}\n{html}");
        }
        assert_eq!(html.matches("<svg").count(), 1, "the safety chart only");
    }
}
