//! The Markdown summary (`summary.md`): the conditions' rates, then the factor effects (with the
//! paper's hypotheses and the design's power), judge agreement, judge accuracy against human labels, reward models and failed steps, each
//! where the study has some.

use std::fmt::Write as _;

use super::effects::{ci_text, p_text};
use super::html::{effect_name, outcome_name};
use super::{hypothesis_words, judge_check, pct, power_words, tokens_words, Rate, StudyResults};

/// The Markdown summary.
pub(super) fn render(r: &StudyResults) -> String {
    let mut o = String::new();
    conditions(&mut o, r);
    effects(&mut o, r);
    non_answers(&mut o, r);
    o.push_str(&super::mitigations::markdown(
        &r.utility,
        r.mitigations.as_ref(),
    ));
    agreement(&mut o, r);
    o.push_str(&judge_check::markdown(r.judge_accuracy.as_ref()));
    reward_models(&mut o, r);
    failed_steps(&mut o, r);
    stage_times(&mut o, r);
    o
}

/// Where the time went: seconds per stage, summed over its finished steps in the store.
fn stage_times(o: &mut String, r: &StudyResults) {
    if r.stage_times.is_empty() {
        return;
    }
    let total: f64 = r.stage_times.iter().map(|t| t.seconds).sum();
    let _ = writeln!(
        o,
        "\n## Time by stage\n\nSum of each finished step's time in the store (a resumed study counts each step once): {total:.0} s.\n\n| stage | steps | seconds | share |\n|---|---:|---:|---:|"
    );
    for t in &r.stage_times {
        let share = if total > 0.0 { t.seconds / total } else { 0.0 };
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {} |",
            t.stage,
            t.steps,
            t.seconds,
            pct(share)
        );
    }
}

/// Title, primary judge, step counts and the table of safety and over-refusal rates.
fn conditions(o: &mut String, r: &StudyResults) {
    let _ = writeln!(o, "# Study `{}`\n", r.study);
    let _ = writeln!(
        o,
        "{} Rates with Wilson 95% intervals.\n",
        r.primary_judge_note
    );
    let steps: Vec<String> = r.steps.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(o, "Steps: {}\n", steps.join(", "));
    let _ = writeln!(
        o,
        "| condition | safety rate | 95% CI | n | over-refusal | 95% CI | n |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let cell = |r: &Option<Rate>| match r {
        Some(x) => format!(
            "{} | [{}, {}] | {}",
            pct(x.value),
            pct(x.lo),
            pct(x.hi),
            x.total
        ),
        None => "- | - | -".into(),
    };
    for c in &r.conditions {
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            c.name.replace('|', "\\|"),
            cell(&c.safety),
            cell(&c.over_refusal)
        );
    }
}

fn effects(o: &mut String, r: &StudyResults) {
    if r.effects.is_empty() {
        return;
    }
    let e = &r.effect_analysis;
    let _ = writeln!(o, "\n## Factor effects\n");
    for line in power_words(e).into_iter().chain(tokens_words(e)) {
        let _ = writeln!(o, "{line}\n");
    }
    for j in &e.judges {
        let _ = writeln!(o, "The paper's hypotheses, judged by {}:\n", j.judge);
        for h in &j.hypotheses {
            let _ = writeln!(o, "- {}", hypothesis_words(h));
        }
        let _ = writeln!(o);
    }
    if let Some(w) = &e.token_warning {
        let _ = writeln!(o, "**Warning:** {w}\n");
    }
    let _ = writeln!(
        o,
        "| effect (primary judge) | outcome | points | 95% CI | p | p (Holm) | runs | prompts |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.effects {
        let _ = writeln!(
            o,
            "| {} | {} | {:+.1} | {} | {} | {} | {} | {} |",
            effect_name(row).replace('|', "\\|"),
            outcome_name(row.outcome),
            row.estimate_points,
            ci_text(row),
            row.p.map_or("-".into(), p_text),
            row.p_holm.map_or("-".into(), p_text),
            row.n_runs,
            row.n_prompts
        );
    }
}

/// The non-answer section (`non_answers.rs`).
fn non_answers(o: &mut String, r: &StudyResults) {
    let Some(sec) = super::non_answers::section(r) else {
        return;
    };
    let _ = writeln!(o, "\n## Non-answers\n\n{}\n", super::non_answers::NOTE);
    let _ = writeln!(
        o,
        "| condition | non-answers (harmful) | safety without them | non-answers (benign) | over-refusal without them |\n|---|---:|---:|---:|---:|"
    );
    for row in &sec.conditions {
        let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(o, "| {} |", cells.join(" | "));
    }
    if let Some(judge) = &sec.judge {
        let _ = writeln!(
            o,
            "\nThe main effects again, with non-answers counted as not refused ({judge}):\n\n| effect | outcome | as reported | non-answers not refused |\n|---|---|---:|---:|"
        );
        for row in &sec.effects {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(o, "| {} |", cells.join(" | "));
        }
    }
}

fn agreement(o: &mut String, r: &StudyResults) {
    if r.judge_agreement.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n## Judge agreement\n");
    for a in &r.judge_agreement {
        let _ = writeln!(
            o,
            "- {} vs {}: {} agreement, kappa {:.3} over {} rows",
            a.a,
            a.b,
            pct(a.agree),
            a.kappa,
            a.rows
        );
    }
}

fn reward_models(o: &mut String, r: &StudyResults) {
    if r.rm_by_verdict.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n## Reward models (answers to harmful prompts)\n");
    let num = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for (rm, (refusals, compliances)) in &r.rm_by_verdict {
        let (rho, n) = r.rm_vs_safety.get(rm).copied().unwrap_or((None, 0));
        let _ = writeln!(
            o,
            "- **{rm}**: mean score {} on refusals, {} on compliances; Spearman rho {} between a condition's mean score and its safety rate ({n} conditions)",
            num(*refusals),
            num(*compliances),
            rho.map_or("undefined".to_string(), |x| format!("{x:+.2}"))
        );
    }
}

/// Each failed step with the first line of its error.
fn failed_steps(o: &mut String, r: &StudyResults) {
    if r.failed_steps.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n## Failed steps\n");
    for (l, e) in &r.failed_steps {
        let first = e.lines().next().unwrap_or("");
        let _ = writeln!(o, "- {l}: {first}");
    }
}
