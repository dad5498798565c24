//! `safetune compare DIR_A DIR_B`: two eval runs on the same prompts. Rates with Wilson
//! intervals, the difference B - A with a paired bootstrap 95% interval over the shared prompt
//! ids, and McNemar's exact test on the discordant pairs. Mean harmfulness difference too when
//! both runs carry rubric scores.

use std::collections::HashMap;
use std::path::Path;

use safetune_data::stats::Proportion;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::error::{EvalError, Result};
use crate::metrics::{
    bootstrap_diff_paired, mcnemar_exact, Estimate, McNemar, BOOTSTRAP_RESAMPLES,
};
use crate::run::read_judgments;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub shared: usize,
    pub only_a: usize,
    pub only_b: usize,
    /// Share of shared, parsed prompts judged `refusal` (safety rate on harmful prompts,
    /// over-refusal rate on benign ones).
    pub refusal_a: Proportion,
    pub refusal_b: Proportion,
    /// refusal_b - refusal_a over the same prompts.
    pub refusal_diff: Estimate,
    /// a_only: refused by A only; b_only: refused by B only.
    pub mcnemar: McNemar,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harmfulness_diff: Option<Estimate>,
}

fn judgments_of(dir: &Path) -> Result<Vec<Map<String, Json>>> {
    let p = if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join("judgments.jsonl")
    };
    if !p.is_file() {
        return Err(EvalError::file(
            &p,
            "not found (expected an eval output directory with judgments.jsonl)",
        ));
    }
    read_judgments(&p)
}

pub fn compare_dirs(a: &Path, b: &Path, seed: u64) -> Result<Comparison> {
    let ra = judgments_of(a)?;
    let rb = judgments_of(b)?;
    let key = |r: &Map<String, Json>| r.get("id").and_then(|i| i.as_str()).map(str::to_string);
    let verdict = |r: &Map<String, Json>| match r.get("verdict").and_then(|v| v.as_str()) {
        Some("refusal") => Some(true),
        Some("compliance") => Some(false),
        _ => None,
    };
    let harm = |r: &Map<String, Json>| {
        (r.get("score_kind").and_then(|k| k.as_str()) == Some("harmfulness_1_5"))
            .then(|| r.get("score").and_then(|s| s.as_f64()))
            .flatten()
    };
    let mb: HashMap<String, &Map<String, Json>> =
        rb.iter().filter_map(|r| key(r).map(|k| (k, r))).collect();
    let mut pairs = Vec::new();
    let mut harm_pairs = Vec::new();
    let mut shared = 0;
    for r in &ra {
        let Some(k) = key(r) else { continue };
        let Some(o) = mb.get(&k) else { continue };
        shared += 1;
        if let (Some(x), Some(y)) = (verdict(r), verdict(o)) {
            pairs.push((x, y));
        }
        if let (Some(x), Some(y)) = (harm(r), harm(o)) {
            harm_pairs.push((x, y));
        }
    }
    if shared == 0 {
        return Err(EvalError::Other(format!(
            "{} and {} share no prompt ids\nhint: compare runs of the same benchmark and split",
            a.display(),
            b.display()
        )));
    }
    let n = pairs.len() as u64;
    let ka = pairs.iter().filter(|p| p.0).count() as u64;
    let kb = pairs.iter().filter(|p| p.1).count() as u64;
    let fpairs: Vec<(f64, f64)> = pairs
        .iter()
        .map(|(x, y)| (*x as u8 as f64, *y as u8 as f64))
        .collect();
    Ok(Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        shared,
        only_a: ra.len() - shared,
        only_b: rb.len() - shared,
        refusal_a: Proportion::new(ka, n),
        refusal_b: Proportion::new(kb, n),
        refusal_diff: bootstrap_diff_paired(&fpairs, BOOTSTRAP_RESAMPLES, seed),
        mcnemar: mcnemar_exact(&pairs),
        harmfulness_diff: (!harm_pairs.is_empty())
            .then(|| bootstrap_diff_paired(&harm_pairs, BOOTSTRAP_RESAMPLES, seed)),
    })
}

pub fn format_comparison(c: &Comparison) -> String {
    let mut s = format!(
        "A: {}\nB: {}\nshared prompts: {} (only in A: {}, only in B: {})\n\
         refusal rate A: {}\nrefusal rate B: {}\n\
         difference B - A: {:+.3} [{:+.3}, {:+.3}] (paired bootstrap 95%)\n\
         McNemar exact: refused by A only {}, by B only {}, p = {:.4}\n",
        c.a,
        c.b,
        c.shared,
        c.only_a,
        c.only_b,
        c.refusal_a,
        c.refusal_b,
        c.refusal_diff.value,
        c.refusal_diff.lo,
        c.refusal_diff.hi,
        c.mcnemar.a_only,
        c.mcnemar.b_only,
        c.mcnemar.p_value
    );
    if let Some(h) = &c.harmfulness_diff {
        s += &format!(
            "mean harmfulness difference B - A: {:+.3} [{:+.3}, {:+.3}]\n",
            h.value, h.lo, h.hi
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_comparison_on_shared_ids() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let mut ta = String::new();
        let mut tb = String::new();
        // 20 shared prompts: A refuses 5 (ids 0-4); B refuses 15 (ids 0-14). One extra in B.
        for i in 0..20 {
            let va = if i < 5 { "refusal" } else { "compliance" };
            let vb = if i < 15 { "refusal" } else { "compliance" };
            ta += &format!("{{\"id\": \"p{i}\", \"verdict\": \"{va}\"}}\n");
            tb += &format!("{{\"id\": \"p{i}\", \"verdict\": \"{vb}\"}}\n");
        }
        tb += "{\"id\": \"extra\", \"verdict\": \"refusal\"}\n";
        std::fs::write(a.join("judgments.jsonl"), ta).unwrap();
        std::fs::write(b.join("judgments.jsonl"), tb).unwrap();
        let c = compare_dirs(&a, &b, 0).unwrap();
        assert_eq!((c.shared, c.only_a, c.only_b), (20, 0, 1));
        assert_eq!((c.refusal_a.count, c.refusal_b.count), (5, 15));
        assert!((c.refusal_diff.value - 0.5).abs() < 1e-12);
        assert!(
            c.refusal_diff.lo > 0.2 && c.refusal_diff.hi <= 0.75,
            "{:?}",
            c.refusal_diff
        );
        // 0 vs 10 discordant: p = 2 / 1024.
        assert_eq!((c.mcnemar.a_only, c.mcnemar.b_only), (0, 10));
        assert!((c.mcnemar.p_value - 2.0 / 1024.0).abs() < 1e-12);
        assert!(format_comparison(&c).contains("B only 10"));
        let e = compare_dirs(&a, &dir.path().join("missing"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("judgments.jsonl"), "{e}");
    }
}
