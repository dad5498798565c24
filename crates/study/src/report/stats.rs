//! The report's statistics: pooled rates, agreement between judges (percent and Cohen's kappa), and the rank
//! correlation between a reward model's mean score and the safety rate.

use std::collections::BTreeMap;

use safetune_data::stats::Proportion;

use super::{Agreement, Condition, Rate};

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
