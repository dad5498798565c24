//! The Markdown summary (`summary.md`): the conditions' rates, then main effects, interactions,
//! judge agreement, judge accuracy against human labels, reward models and failed steps, each
//! where the study has some.

use std::fmt::Write as _;

use super::{judge_check, pct, Rate, StudyResults};

/// The Markdown summary.
pub(super) fn render(r: &StudyResults) -> String {
    let mut o = String::new();
    conditions(&mut o, r);
    effects(&mut o, r);
    interactions(&mut o, r);
    agreement(&mut o, r);
    o.push_str(&judge_check::markdown(r.judge_accuracy.as_ref()));
    reward_models(&mut o, r);
    failed_steps(&mut o, r);
    o
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
    let _ = writeln!(o, "\n## Main effects (safety rate by level)\n");
    for e in &r.effects {
        let levels: Vec<String> = e
            .levels
            .iter()
            .map(|(l, rate)| format!("{l} {}", pct(rate.value)))
            .collect();
        let _ = writeln!(
            o,
            "- **{}**: {} (spread {:.1} points)",
            e.factor,
            levels.join(", "),
            100.0 * e.spread
        );
    }
}

fn interactions(o: &mut String, r: &StudyResults) {
    if r.interactions.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n## Interactions\n");
    for it in &r.interactions {
        let cells: Vec<String> = it
            .cells
            .iter()
            .map(|(a, b, rate)| format!("{a}/{b} {}", pct(rate.value)))
            .collect();
        let _ = writeln!(
            o,
            "- **{} x {}**: {}{}",
            it.a,
            it.b,
            cells.join(", "),
            it.contrast
                .map(|c| format!(" (contrast {:+.1} points)", 100.0 * c))
                .unwrap_or_default()
        );
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
