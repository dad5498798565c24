//! The report's section on non-answers (responses without content,
//! [`safetune_eval::nonanswer`]): per condition, their share and the rates with them counted as
//! not refused, and the primary judge's main effects read both ways. One table model, rendered
//! by `markdown.rs` and `html.rs` alike.

use serde::Serialize;

use safetune_eval::effects::EffectRow;

use super::effects::ci_text;
use super::html::{effect_name, outcome_name};
use super::{pct, Rate, StudyResults};

/// What a non-answer is, and why the report counts them.
pub(super) const NOTE: &str = "A non-answer has no content: no words, an empty Markdown skeleton, or one line or phrase repeated (and no sentence that declines). Small tuned models write many; a refusal judge has to call them something, and the classifier calls most of them refusals. The safety and over-refusal rates above count them as the primary judge did; this table shows how many there are and the rates with them counted as not refused. A factor whose effect changes between the two readings acts through non-answers, not refusals.";

/// The section's tables, as text cells.
#[derive(Debug, Serialize)]
pub(super) struct Section {
    /// condition, non-answers (harmful), safety without them, non-answers (benign),
    /// over-refusal without them.
    pub conditions: Vec<[String; 5]>,
    /// The sensitivity judge's name, when effects exist.
    pub judge: Option<String>,
    /// effect, outcome, as reported, with non-answers not refused.
    pub effects: Vec<[String; 4]>,
}

fn share(x: Option<&Rate>) -> String {
    x.map_or("-".into(), |x| format!("{} of {}", pct(x.value), x.total))
}

fn rate(x: Option<&Rate>) -> String {
    x.map_or("-".into(), |x| {
        format!("{} [{}, {}]", pct(x.value), pct(x.lo), pct(x.hi))
    })
}

fn effect(e: &EffectRow) -> String {
    format!("{:+.1} {}", e.estimate_points, ci_text(e))
}

/// The section, or `None` when no judged answer was read for non-answers.
pub(super) fn section(r: &StudyResults) -> Option<Section> {
    let any = r
        .conditions
        .iter()
        .any(|c| c.non_answers_harmful.is_some() || c.non_answers_benign.is_some());
    if !any {
        return None;
    }
    let conditions = r
        .conditions
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                share(c.non_answers_harmful.as_ref()),
                rate(c.safety_strict.as_ref()),
                share(c.non_answers_benign.as_ref()),
                rate(c.over_refusal_strict.as_ref()),
            ]
        })
        .collect();
    let strict = r.effects_non_answers.as_ref();
    let effects = strict
        .map(|s| {
            r.effects
                .iter()
                .filter(|e| e.factor.is_some())
                .map(|e| {
                    let twin = s.effects.iter().find(|t| {
                        t.outcome == e.outcome && t.factor == e.factor && t.contrast == e.contrast
                    });
                    [
                        effect_name(e),
                        outcome_name(e.outcome).to_string(),
                        effect(e),
                        twin.map_or("-".into(), effect),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Section {
        conditions,
        judge: strict.map(|s| s.judge.clone()),
        effects,
    })
}
