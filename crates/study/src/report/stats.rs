//! The report's statistics: pooled rates, factor main effects and two-way interactions over the
//! tuned conditions, agreement between judges (percent and Cohen's kappa), and the rank
//! correlation between a reward model's mean score and the safety rate.

use std::collections::{BTreeMap, BTreeSet};

use safetune_data::stats::Proportion;

use super::{Agreement, Condition, Effect, Interaction, Rate};

/// Factors whose main effects and interactions the report estimates.
const EFFECT_FACTORS: &[&str] = &[
    "structure",
    "identity",
    "roleplay",
    "mix",
    "selection",
    "seed",
    "model",
];

impl Rate {
    pub(super) fn new(count: u64, total: u64) -> Rate {
        let p = Proportion::new(count, total);
        Rate {
            count,
            total,
            value: p.share,
            lo: p.lo,
            hi: p.hi,
        }
    }
}

/// The mean of a (sum, count) pair; `None` for no values.
pub(super) fn mean((sum, n): (f64, usize)) -> Option<f64> {
    if n > 0 {
        Some(sum / n as f64)
    } else {
        None
    }
}

/// A verdict's row or column in an agreement table: refusal 0, compliance 1, others none.
pub(super) fn bin(v: &str) -> Option<usize> {
    match v {
        "refusal" => Some(0),
        "compliance" => Some(1),
        _ => None,
    }
}

/// Cohen's kappa of a 2x2 agreement table (rows: one rater, columns: the other; index 0 is the
/// same verdict for both). The statistic is [`safetune_eval::metrics::Confusion::kappa`], the
/// one judge-eval prints.
pub fn kappa(m: &[[usize; 2]; 2]) -> f64 {
    safetune_eval::metrics::Confusion {
        tp: m[0][0] as u64,
        fn_: m[0][1] as u64,
        fp: m[1][0] as u64,
        tn: m[1][1] as u64,
    }
    .kappa()
}

/// Tuned conditions with a safety rate (the factorial's cells).
fn cells(conditions: &[Condition]) -> Vec<&Condition> {
    conditions
        .iter()
        .filter(|c| c.safety.is_some() && c.factors.contains_key("variant"))
        .collect()
}

/// The safety rate pooled per level of each factor that varies over the cells.
pub(super) fn main_effects(conditions: &[Condition]) -> Vec<Effect> {
    let cells = cells(conditions);
    let mut out = Vec::new();
    for &factor in EFFECT_FACTORS {
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in &cells {
            let (Some(level), Some(s)) = (c.factors.get(factor), &c.safety) else {
                continue;
            };
            let e = by.entry(level.clone()).or_default();
            e.0 += s.count;
            e.1 += s.total;
        }
        if by.len() < 2 {
            continue;
        }
        let levels: Vec<(String, Rate)> = by
            .into_iter()
            .map(|(l, (k, n))| (l, Rate::new(k, n)))
            .collect();
        let max = levels.iter().map(|l| l.1.value).fold(f64::MIN, f64::max);
        let min = levels.iter().map(|l| l.1.value).fold(f64::MAX, f64::min);
        out.push(Effect {
            factor: factor.to_string(),
            levels,
            spread: max - min,
        });
    }
    out
}

/// The safety rate pooled per pair of levels, for every pair of varying factors but the seed.
pub(super) fn interactions(conditions: &[Condition]) -> Vec<Interaction> {
    let cells = cells(conditions);
    let effects = main_effects(conditions);
    let varied: Vec<&str> = effects.iter().map(|e| e.factor.as_str()).collect();
    let mut out = Vec::new();
    for i in 0..varied.len() {
        for j in i + 1..varied.len() {
            let (a, b) = (varied[i], varied[j]);
            if a == "seed" || b == "seed" {
                continue;
            }
            if let Some(it) = interaction(&cells, a, b) {
                out.push(it);
            }
        }
    }
    out
}

/// The interaction of factors `a` and `b`; `None` unless each has two levels or more.
fn interaction(cells: &[&Condition], a: &str, b: &str) -> Option<Interaction> {
    let mut by: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for c in cells {
        let (Some(la), Some(lb), Some(s)) = (c.factors.get(a), c.factors.get(b), &c.safety) else {
            continue;
        };
        let e = by.entry((la.clone(), lb.clone())).or_default();
        e.0 += s.count;
        e.1 += s.total;
    }
    let cells: Vec<(String, String, Rate)> = by
        .into_iter()
        .map(|((la, lb), (k, n))| (la, lb, Rate::new(k, n)))
        .collect();
    let la: BTreeSet<&String> = cells.iter().map(|c| &c.0).collect();
    let lb: BTreeSet<&String> = cells.iter().map(|c| &c.1).collect();
    if la.len() < 2 || lb.len() < 2 {
        return None;
    }
    let contrast = if la.len() == 2 && lb.len() == 2 && cells.len() == 4 {
        let v: Vec<f64> = cells.iter().map(|c| c.2.value).collect();
        Some((v[3] - v[2]) - (v[1] - v[0]))
    } else {
        None
    };
    Some(Interaction {
        a: a.to_string(),
        b: b.to_string(),
        cells,
        contrast,
    })
}

/// Verdicts (row id to verdict) of each judge, per generate step, judges in plan order.
pub(super) type JudgeVerdicts = BTreeMap<String, Vec<(String, BTreeMap<String, String>)>>;

/// Agreement of every pair of judges over the rows both judged as refusal or compliance.
pub(super) fn judge_agreement(by_gen: &JudgeVerdicts) -> Vec<Agreement> {
    // (rows, agreeing rows, 2x2 table) per pair of judges.
    type Tally = (usize, usize, [[usize; 2]; 2]);
    let mut pairs: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for list in by_gen.values() {
        for i in 0..list.len() {
            for j in i + 1..list.len() {
                let (a, ra) = &list[i];
                let (b, rb) = &list[j];
                let e = pairs.entry((a.clone(), b.clone())).or_default();
                for (id, va) in ra {
                    let Some(vb) = rb.get(id) else { continue };
                    let (Some(xa), Some(xb)) = (bin(va), bin(vb)) else {
                        continue;
                    };
                    e.0 += 1;
                    if xa == xb {
                        e.1 += 1;
                    }
                    e.2[xa][xb] += 1;
                }
            }
        }
    }
    pairs
        .into_iter()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|((a, b), (n, agree, m))| Agreement {
            a,
            b,
            rows: n,
            agree: agree as f64 / n as f64,
            kappa: kappa(&m),
        })
        .collect()
}

/// Per reward model: Spearman's rho between the conditions' mean scores and safety rates, and
/// the number of conditions with both.
pub(super) fn rm_vs_safety<'a>(
    conditions: &[Condition],
    rms: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, (Option<f64>, usize)> {
    let mut out = BTreeMap::new();
    for rm in rms {
        let (x, y): (Vec<f64>, Vec<f64>) = conditions
            .iter()
            .filter_map(|c| Some((*c.rm_mean.get(rm)?, c.safety.as_ref()?.value)))
            .unzip();
        let rho = safetune_eval::rm::stats::spearman_rho(&x, &y);
        out.insert(rm.clone(), (rho, x.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_matches_hand_computation() {
        // 20 rows: 8 both refusal, 2 a-only, 2 b-only, 8 both compliance.
        let m = [[8, 2], [2, 8]];
        // po = 0.8, pe = 0.5 -> kappa = 0.6
        assert!((kappa(&m) - 0.6).abs() < 1e-12);
        assert_eq!(kappa(&[[5, 0], [0, 0]]), 1.0);
    }
}
