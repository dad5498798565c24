//! The report's utility table and its "Mitigations" section.
//!
//! Utility: every condition a `utility` step measured, with its multiple-choice accuracy
//! (Wilson 95% interval) and its held-out loss and perplexity.
//!
//! Mitigations: each arm of `[mitigations]` against the arm `none` (the variant tuned as it
//! is), on three axes, each a change in percentage points with its 95% interval:
//! - safety and over-refusal: the primary judge's `mitigation` effects (the factor-effects
//!   engine: paired over prompts, run-to-run variance over seeds);
//! - multiple-choice accuracy: the same engine over the questions (an answer is "correct"
//!   instead of "refused");
//! - held-out loss (nats per token): the mean over seeds of the arm's loss minus `none`'s at
//!   the same variant and seed, with a t interval over those pairs (charted as the perplexity
//!   change in percent, `exp(change) - 1`).
//!
//! The Pareto front is the set of arms (with `none` at zero on every axis) that no other arm
//! beats on safety, accuracy, over-refusal and held-out loss at once (at least as good on all
//! four, better on one). An arm off the front is marked "not distinguishable from the front" when some
//! front arm that beats it lies, on every axis, within the arm's interval (or the arm within
//! the front arm's): the data do not tell the two apart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use safetune_eval::effects::dist::t_quantile;
use safetune_eval::effects::{analyze, Answer, EffectRow, Outcome};

use super::{charts, esc, pct, Condition, Rate};
use crate::step::UtilityFigures;

/// One condition's utility.
#[derive(Debug, Clone, Serialize)]
pub struct UtilityRow {
    pub condition: String,
    pub factors: BTreeMap<String, String>,
    pub mcq: Rate,
    pub mcq_chance: f64,
    pub loss: f64,
    pub perplexity: f64,
    pub heldout_examples: usize,
    #[serde(skip)]
    pub mcq_items: Vec<(String, bool)>,
}

/// A change against `none` in points (or nats for the loss), with its 95% interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Delta {
    pub estimate: f64,
    pub ci95: Option<[f64; 2]>,
    /// Runs (seeds x variants) of the arm the change reads.
    pub n_runs: usize,
}

impl Delta {
    fn from_effect(e: &EffectRow) -> Delta {
        Delta {
            estimate: e.estimate_points,
            ci95: e.ci95,
            n_runs: e.n_runs_b,
        }
    }
    fn zero() -> Delta {
        Delta {
            estimate: 0.0,
            ci95: None,
            n_runs: 0,
        }
    }
    fn contains(&self, v: f64) -> bool {
        self.ci95.is_some_and(|[lo, hi]| lo <= v && v <= hi)
    }
    pub fn text(&self) -> String {
        match self.ci95 {
            Some([lo, hi]) => format!("{:+.1} [{lo:+.1}, {hi:+.1}]", self.estimate),
            None => format!("{:+.1}", self.estimate),
        }
    }
}

/// One arm, pooled over its runs, and its changes against `none`.
#[derive(Debug, Clone, Serialize)]
pub struct ArmRow {
    pub arm: String,
    pub runs: usize,
    pub safety: Option<Rate>,
    pub over_refusal: Option<Rate>,
    pub mcq: Option<Rate>,
    pub loss: Option<f64>,
    pub d_safety: Option<Delta>,
    pub d_over_refusal: Option<Delta>,
    pub d_mcq: Option<Delta>,
    /// Nats per token (arm - none).
    pub d_loss: Option<Delta>,
    /// On the Pareto front of (safety up, accuracy up, over-refusal down, held-out loss down).
    pub pareto: bool,
    /// Off the front, but within its intervals of a front arm that beats it.
    pub near_front: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MitigationAnalysis {
    pub method: String,
    /// The variants the arms were applied to.
    pub variants: Vec<String>,
    pub arms: Vec<ArmRow>,
}

pub const METHOD: &str = "Each arm is tuned at every seed beside the variant it is applied to, and compared with that variant tuned as it is (`none`), run by run. Safety and over-refusal changes are the primary judge's `mitigation` effects (percentage points, paired over prompts, with run-to-run variance over seeds; see Factor effects). The accuracy change is the same analysis over the multiple-choice questions. The held-out loss change is the mean over seeds of the arm's loss minus none's (nats per answer token, t interval over seeds); held-out answers are in the base set's own format, so an arm that changes the answers' format pays for it here. Pareto front: arms no other arm beats on safety, accuracy, over-refusal and held-out loss at once; 'within intervals' marks an arm off the front that a front arm beats by less than the intervals can tell.";

/// The utility rows of the `utility` steps: (condition name, condition factors, output).
pub(super) fn utility_rows(
    steps: &[(String, BTreeMap<String, String>, UtilityFigures)],
) -> Vec<UtilityRow> {
    steps
        .iter()
        .map(|(name, factors, u)| UtilityRow {
            condition: name.clone(),
            factors: factors.clone(),
            mcq: Rate::new(u.mcq_correct as u64, u.mcq_total as u64),
            mcq_chance: u.mcq_chance,
            loss: u.loss,
            perplexity: u.perplexity,
            heldout_examples: u.heldout_examples,
            mcq_items: u.mcq_items.clone(),
        })
        .collect()
}

/// The multiple-choice accuracy changes of each arm against `none`, by arm.
fn accuracy_effects(utility: &[UtilityRow]) -> BTreeMap<String, Delta> {
    // The tuned runs in plan order: `none` comes first, so it is every contrast's reference.
    let tuned: Vec<&UtilityRow> = utility
        .iter()
        .filter(|u| u.factors.contains_key("mitigation"))
        .collect();
    let answers: Vec<Answer> = tuned
        .iter()
        .flat_map(|u| {
            u.mcq_items.iter().map(|(q, correct)| Answer {
                run: u.condition.clone(),
                prompt: q.clone(),
                refused: *correct,
            })
        })
        .collect();
    if answers.is_empty() {
        return BTreeMap::new();
    }
    let (design, runs) =
        super::effects::design_of(tuned.iter().map(|u| (u.condition.as_str(), &u.factors)));
    analyze(&design, &runs, &answers, Outcome::Utility)
        .effects
        .iter()
        .filter(|e| e.factor.as_deref() == Some("mitigation"))
        .filter_map(|e| {
            let arm = e.contrast.strip_suffix(" - none")?;
            Some((arm.to_string(), Delta::from_effect(e)))
        })
        .collect()
}

/// The held-out loss change of `arm` against `none`: per (variant, seed) pair, arm minus none.
fn loss_change(utility: &[UtilityRow], arm: &str) -> Option<Delta> {
    let key = |u: &UtilityRow| -> BTreeMap<String, String> {
        u.factors
            .iter()
            .filter(|(k, _)| k.as_str() != "mitigation")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let none: BTreeMap<_, f64> = utility
        .iter()
        .filter(|u| u.factors.get("mitigation").map(String::as_str) == Some("none"))
        .map(|u| (key(u), u.loss))
        .collect();
    let diffs: Vec<f64> = utility
        .iter()
        .filter(|u| u.factors.get("mitigation").map(String::as_str) == Some(arm))
        .filter_map(|u| none.get(&key(u)).map(|n| u.loss - n))
        .collect();
    if diffs.is_empty() {
        return None;
    }
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let ci95 = (diffs.len() >= 2).then(|| {
        let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let half = t_quantile(0.975, n - 1.0) * (var / n).sqrt();
        [mean - half, mean + half]
    });
    Some(Delta {
        estimate: mean,
        ci95,
        n_runs: diffs.len(),
    })
}

fn pool(rates: impl Iterator<Item = Rate>) -> Option<Rate> {
    let (mut k, mut n) = (0, 0);
    for r in rates {
        k += r.count;
        n += r.total;
    }
    (n > 0).then(|| Rate::new(k, n))
}

/// The section's analysis; `None` when the study has no `[mitigations]` arms.
pub(super) fn analyse(
    conditions: &[Condition],
    utility: &[UtilityRow],
    primary: &[EffectRow],
) -> Option<MitigationAnalysis> {
    let tuned: Vec<&Condition> = conditions
        .iter()
        .filter(|c| c.factors.contains_key("mitigation"))
        .collect();
    let mut arms: Vec<String> = vec!["none".into()];
    for c in &tuned {
        let a = &c.factors["mitigation"];
        if !arms.contains(a) {
            arms.push(a.clone());
        }
    }
    if arms.len() < 2 {
        return None;
    }
    // The variants that have arms.
    let variants: BTreeSet<String> = tuned
        .iter()
        .filter(|c| c.factors["mitigation"] != "none")
        .filter_map(|c| c.factors.get("variant").cloned())
        .collect();
    let in_scope =
        |f: &BTreeMap<String, String>| f.get("variant").is_some_and(|v| variants.contains(v));
    let acc = accuracy_effects(utility);
    let effect = |arm: &str, o: Outcome| {
        primary
            .iter()
            .find(|e| {
                e.factor.as_deref() == Some("mitigation")
                    && e.outcome == o
                    && e.contrast == format!("{arm} - none")
            })
            .map(Delta::from_effect)
    };
    let mut rows: Vec<ArmRow> = arms
        .iter()
        .map(|arm| {
            let of_arm =
                |f: &BTreeMap<String, String>| f.get("mitigation") == Some(arm) && in_scope(f);
            let cs: Vec<&&Condition> = tuned.iter().filter(|c| of_arm(&c.factors)).collect();
            let us: Vec<&UtilityRow> = utility.iter().filter(|u| of_arm(&u.factors)).collect();
            let is_none = arm == "none";
            ArmRow {
                arm: arm.clone(),
                runs: cs.len(),
                safety: pool(cs.iter().filter_map(|c| c.safety.clone())),
                over_refusal: pool(cs.iter().filter_map(|c| c.over_refusal.clone())),
                mcq: pool(us.iter().map(|u| u.mcq.clone())),
                loss: (!us.is_empty())
                    .then(|| us.iter().map(|u| u.loss).sum::<f64>() / us.len() as f64),
                d_safety: if is_none {
                    Some(Delta::zero())
                } else {
                    effect(arm, Outcome::Safety)
                },
                d_over_refusal: if is_none {
                    Some(Delta::zero())
                } else {
                    effect(arm, Outcome::OverRefusal)
                },
                d_mcq: if is_none {
                    (!us.is_empty()).then(Delta::zero)
                } else {
                    acc.get(arm).copied()
                },
                d_loss: if is_none {
                    (!us.is_empty()).then(Delta::zero)
                } else {
                    loss_change(utility, arm)
                },
                pareto: false,
                near_front: false,
            }
        })
        .collect();
    mark_front(&mut rows);
    Some(MitigationAnalysis {
        method: METHOD.to_string(),
        variants: variants.into_iter().collect(),
        arms: rows,
    })
}

/// The four axes of an arm, each oriented so that larger is better.
fn axes(r: &ArmRow) -> Option<[(f64, Delta); 4]> {
    let s = r.d_safety?;
    let a = r.d_mcq?;
    let o = r.d_over_refusal?;
    let l = r.d_loss?;
    Some([
        (s.estimate, s),
        (a.estimate, a),
        (-o.estimate, o),
        (-l.estimate, l),
    ])
}

/// Does `a` beat `b`: at least as good on every axis, better on one?
fn beats(a: &[(f64, Delta); 4], b: &[(f64, Delta); 4]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.0 >= y.0) && a.iter().zip(b).any(|(x, y)| x.0 > y.0)
}

/// Marks the Pareto front and the arms within intervals of it. Arms without all four
/// changes are left off both.
pub(super) fn mark_front(rows: &mut [ArmRow]) {
    let ax: Vec<Option<[(f64, Delta); 4]>> = rows.iter().map(axes).collect();
    for i in 0..rows.len() {
        let Some(a) = &ax[i] else { continue };
        let beaten_by: Vec<usize> = (0..rows.len())
            .filter(|&j| j != i && ax[j].as_ref().is_some_and(|b| beats(b, a)))
            .collect();
        rows[i].pareto = beaten_by.is_empty();
        rows[i].near_front = !beaten_by.is_empty()
            && beaten_by.iter().any(|&j| {
                let b = ax[j].as_ref().expect("checked above");
                // Orientation does not matter for containment: compare raw estimates.
                a.iter()
                    .zip(b)
                    .all(|((_, da), (_, db))| da.contains(db.estimate) || db.contains(da.estimate))
            });
    }
}

fn rate_text(r: &Option<Rate>) -> String {
    r.as_ref()
        .map(|r| format!("{} [{}, {}]", pct(r.value), pct(r.lo), pct(r.hi)))
        .unwrap_or_else(|| "-".into())
}

fn delta_text(d: &Option<Delta>) -> String {
    d.map(|d| d.text()).unwrap_or_else(|| "-".into())
}

fn loss_text(d: &Option<Delta>) -> String {
    match d {
        Some(d) => match d.ci95 {
            Some([lo, hi]) => format!("{:+.3} [{lo:+.3}, {hi:+.3}]", d.estimate),
            None => format!("{:+.3}", d.estimate),
        },
        None => "-".into(),
    }
}

fn verdict(r: &ArmRow) -> &'static str {
    if r.pareto {
        "on the front"
    } else if r.near_front {
        "within intervals of the front"
    } else if axes(r).is_some() {
        "beaten"
    } else {
        "incomplete"
    }
}

/// The two trade-off charts: safety change against accuracy change, and against over-refusal
/// change, each point with its intervals.
fn charts(m: &MitigationAnalysis) -> Vec<String> {
    let pts = |x: &dyn Fn(&ArmRow) -> Option<Delta>| -> Vec<charts::TradeoffPoint> {
        m.arms
            .iter()
            .filter_map(|r| {
                let (xd, yd) = (x(r)?, r.d_safety?);
                Some(charts::TradeoffPoint {
                    label: r.arm.clone(),
                    x: xd.estimate,
                    x_ci: xd.ci95,
                    y: yd.estimate,
                    y_ci: yd.ci95,
                    front: r.pareto,
                })
            })
            .collect()
    };
    let mut out = Vec::new();
    let a = pts(&|r| r.d_mcq);
    if a.len() >= 2 {
        out.push(charts::tradeoff(
            &a,
            "Safety change against accuracy change (points, vs none)",
            "multiple-choice accuracy change (points; right = more useful)",
            "safety change (points; up = safer)",
        ));
    }
    let ppl = |r: &ArmRow| {
        r.d_loss.map(|d| Delta {
            estimate: 100.0 * d.estimate.exp_m1(),
            ci95: d
                .ci95
                .map(|[lo, hi]| [100.0 * lo.exp_m1(), 100.0 * hi.exp_m1()]),
            n_runs: d.n_runs,
        })
    };
    let l = pts(&ppl);
    if l.len() >= 2 {
        out.push(charts::tradeoff(
            &l,
            "Safety change against held-out perplexity change (vs none)",
            "held-out perplexity change (%; left = fits the tuning domain better)",
            "safety change (points; up = safer)",
        ));
    }
    let o = pts(&|r| r.d_over_refusal);
    if o.len() >= 2 {
        out.push(charts::tradeoff(
            &o,
            "Safety change against over-refusal change (points, vs none)",
            "over-refusal change (points; left = refuses fewer benign prompts)",
            "safety change (points; up = safer)",
        ));
    }
    out
}

/// The utility table and the mitigations section, as HTML.
pub(super) fn html(utility: &[UtilityRow], m: Option<&MitigationAnalysis>) -> String {
    let mut h = String::new();
    if !utility.is_empty() {
        h.push_str("<h2>Utility</h2><p class=\"note\">Multiple-choice accuracy by log-likelihood (Wilson 95% interval) and mean negative log-likelihood per answer token on held-out conversations of the tuning domain (f32 weights, adapter merged).</p><table><tr><th>condition</th><th class=\"num\">accuracy</th><th class=\"num\">chance</th><th class=\"num\">held-out loss</th><th class=\"num\">perplexity</th><th class=\"num\">held-out n</th></tr>");
        for u in utility {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.2}</td><td class=\"num\">{}</td></tr>",
                esc(&u.condition),
                esc(&rate_text(&Some(u.mcq.clone()))),
                pct(u.mcq_chance),
                u.loss,
                u.perplexity,
                u.heldout_examples
            );
        }
        h.push_str("</table>");
    }
    let Some(m) = m else { return h };
    let _ = write!(
        h,
        "<h2>Mitigations</h2><p class=\"note\">{}</p><p>Applied to: {}.</p>",
        esc(&m.method),
        esc(&m.variants.join(", "))
    );
    for c in charts(m) {
        h.push_str(&c);
    }
    h.push_str("<table><tr><th>arm</th><th class=\"num\">runs</th><th class=\"num\">safety</th><th class=\"num\">over-refusal</th><th class=\"num\">accuracy</th><th class=\"num\">safety change</th><th class=\"num\">over-refusal change</th><th class=\"num\">accuracy change</th><th class=\"num\">held-out loss change</th><th>verdict</th></tr>");
    for r in &m.arms {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&r.arm),
            r.runs,
            esc(&rate_text(&r.safety)),
            esc(&rate_text(&r.over_refusal)),
            esc(&rate_text(&r.mcq)),
            esc(&delta_text(&r.d_safety)),
            esc(&delta_text(&r.d_over_refusal)),
            esc(&delta_text(&r.d_mcq)),
            esc(&loss_text(&r.d_loss)),
            verdict(r)
        );
    }
    h.push_str("</table>");
    h
}

/// The same, as Markdown.
pub(super) fn markdown(utility: &[UtilityRow], m: Option<&MitigationAnalysis>) -> String {
    let mut o = String::new();
    if !utility.is_empty() {
        o.push_str("\n## Utility\n\n| condition | accuracy | chance | held-out loss | perplexity | n |\n|---|---:|---:|---:|---:|---:|\n");
        for u in utility {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.3} | {:.2} | {} |",
                u.condition,
                rate_text(&Some(u.mcq.clone())),
                pct(u.mcq_chance),
                u.loss,
                u.perplexity,
                u.heldout_examples
            );
        }
    }
    let Some(m) = m else { return o };
    let _ = write!(
        o,
        "\n## Mitigations\n\n{}\n\nApplied to: {}.\n\n| arm | runs | safety | over-refusal | accuracy | safety change | over-refusal change | accuracy change | held-out loss change | verdict |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        m.method,
        m.variants.join(", ")
    );
    for r in &m.arms {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.arm,
            r.runs,
            rate_text(&r.safety),
            rate_text(&r.over_refusal),
            rate_text(&r.mcq),
            delta_text(&r.d_safety),
            delta_text(&r.d_over_refusal),
            delta_text(&r.d_mcq),
            loss_text(&r.d_loss),
            verdict(r)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(estimate: f64, half: f64) -> Option<Delta> {
        Some(Delta {
            estimate,
            ci95: (half > 0.0).then_some([estimate - half, estimate + half]),
            n_runs: 3,
        })
    }

    fn arm(name: &str, s: f64, a: f64, o: f64, half: f64) -> ArmRow {
        ArmRow {
            arm: name.into(),
            runs: 3,
            safety: None,
            over_refusal: None,
            mcq: None,
            loss: None,
            d_safety: d(s, half),
            d_over_refusal: d(o, half),
            d_mcq: d(a, half),
            d_loss: d(0.0, 0.0).map(|x| Delta {
                ci95: Some([-0.1, 0.1]),
                ..x
            }),
            pareto: false,
            near_front: false,
        }
    }

    #[test]
    fn the_front_keeps_unbeaten_arms_and_marks_those_within_intervals() {
        let mut rows = vec![
            arm("none", 0.0, 0.0, 0.0, 0.0),
            // Safer and no less accurate or more refusing: beats none.
            arm("replay", 20.0, 0.0, 0.0, 5.0),
            // Safer than none but less accurate: a trade-off, on the front.
            arm("data", 30.0, -10.0, 5.0, 4.0),
            // Beaten by replay on every axis, by more than its intervals.
            arm("anchor", 5.0, -2.0, 1.0, 1.0),
            // Beaten by replay, but replay lies within its wide intervals on every axis.
            arm("project", 15.0, -1.0, 1.0, 8.0),
            // Replay's rates, but a worse held-out loss: beaten on the fourth axis alone.
            ArmRow {
                d_loss: Some(Delta {
                    estimate: 0.5,
                    ci95: Some([0.4, 0.6]),
                    n_runs: 3,
                }),
                ..arm("replay-worse-loss", 20.0, 0.0, 0.0, 5.0)
            },
        ];
        mark_front(&mut rows);
        let got: Vec<(&str, bool, bool)> = rows
            .iter()
            .map(|r| (r.arm.as_str(), r.pareto, r.near_front))
            .collect();
        assert_eq!(
            got,
            vec![
                ("none", false, false),
                ("replay", true, false),
                ("data", true, false),
                ("anchor", false, false),
                ("project", false, true),
                ("replay-worse-loss", false, false),
            ]
        );
        // An arm missing an axis is on neither.
        let mut rows = vec![
            arm("none", 0.0, 0.0, 0.0, 0.0),
            arm("x", 1.0, 0.0, 0.0, 1.0),
        ];
        rows[1].d_mcq = None;
        mark_front(&mut rows);
        assert!(rows[0].pareto && !rows[1].pareto && !rows[1].near_front);
        assert_eq!(verdict(&rows[1]), "incomplete");
    }

    #[test]
    fn the_loss_change_pairs_each_arm_run_with_none_at_its_seed() {
        let row = |arm: &str, seed: &str, loss: f64| UtilityRow {
            condition: format!("{arm} {seed}"),
            factors: [
                ("variant".to_string(), "plain".to_string()),
                ("mitigation".to_string(), arm.to_string()),
                ("seed".to_string(), seed.to_string()),
            ]
            .into_iter()
            .collect(),
            mcq: Rate::new(1, 2),
            mcq_chance: 0.25,
            loss,
            perplexity: loss.exp(),
            heldout_examples: 4,
            mcq_items: vec![],
        };
        let rows = vec![
            row("none", "0", 1.0),
            row("none", "1", 2.0),
            row("data", "0", 1.5),
            row("data", "1", 2.7),
        ];
        let dl = loss_change(&rows, "data").unwrap();
        assert!((dl.estimate - 0.6).abs() < 1e-9, "{dl:?}");
        assert_eq!(dl.n_runs, 2);
        // Differences 0.5 and 0.7: sd 0.1414, se 0.1, t(1) = 12.706.
        let [lo, hi] = dl.ci95.unwrap();
        assert!((hi - lo - 2.0 * 1.2706).abs() < 1e-3, "{lo} {hi}");
        assert!(loss_change(&rows, "replay").is_none());
    }
}
