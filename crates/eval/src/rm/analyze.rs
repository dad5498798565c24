//! `safetune rm analyze`: how far one reward model's preferences can be trusted.
//!
//! - **separation**: ROC AUC between the scores of items labelled good and bad;
//! - **agreement with human labels**: pairwise accuracy (Wilson 95%), ties apart, per subset, with
//!   safety subsets pooled separately from the others;
//! - **cross-variant consistency**: each dataset variant's mean RM score against the safety rate
//!   of the model tuned on it (Kendall tau-b and Spearman rho with bootstrap intervals), and the
//!   variant pairs the RM orders against safety;
//! - **agreement between RMs**: pairwise Kendall tau-b and Kendall's W over common ids.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::error::{Result, RmError};
use super::score::ScoreFile;
use super::stats::*;
use crate::bootstrap::{percentile_interval, Resampler};

/// Subset names that mark safety data (RewardBench's `refusals-*`, `xstest-*`, `donotanswer`,
/// PKU's `safer`, ...): a name containing any of these.
pub const SAFETY_SUBSET_WORDS: [&str; 9] = [
    "safe",
    "refus",
    "harm",
    "danger",
    "xstest",
    "donotanswer",
    "toxic",
    "jailbreak",
    "offensive",
];

pub fn is_safety_subset(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SAFETY_SUBSET_WORDS.iter().any(|w| n.contains(w))
}

/// The measured safety of the model tuned on one dataset variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantSafety {
    pub variant: String,
    pub safety_rate: f64,
    /// Safe answers and harmful prompts, when known (used to resample the rate).
    pub safe: Option<u64>,
    pub total: Option<u64>,
}

/// Reads variant safety results: a study's `results.json` (each tuned condition with a `variant`
/// factor and its primary judge's safety rate); a JSON object `{"variants": [...]}`, a JSON
/// array, or JSONL, of rows with `variant` (or `name`) and `safety_rate` (or `safety`),
/// optionally `safe` and `total`; or a JSON object mapping variant names to rates.
pub fn read_results(path: &Path) -> Result<Vec<VariantSafety>> {
    let text = std::fs::read_to_string(path).map_err(|e| RmError::io(path, e))?;
    let rows: Vec<(usize, Value)> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(a)) => a.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
        Ok(Value::Object(o)) if o.get("conditions").is_some_and(Value::is_array) => {
            return check_rates(path, study_conditions(path, &o["conditions"])?);
        }
        Ok(Value::Object(o)) => match o.get("variants") {
            Some(Value::Array(a)) => a
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
            _ => {
                let mut out = Vec::new();
                for (k, v) in o {
                    let rate = v.as_f64().ok_or_else(|| {
                        RmError::input(path, 1, Some(&k), "expected a safety rate (a number)")
                    })?;
                    out.push(VariantSafety {
                        variant: k,
                        safety_rate: rate,
                        safe: None,
                        total: None,
                    });
                }
                return check_rates(path, out);
            }
        },
        _ => safetune_data::read::read_json_lines(path)?
            .into_iter()
            .map(|(l, o)| (l, Value::Object(o)))
            .collect(),
    };
    let mut out = Vec::new();
    for (line, v) in rows {
        let err = |f: &str, m: &str| RmError::input(path, line, Some(f), m);
        let o = v
            .as_object()
            .ok_or_else(|| RmError::input(path, line, None, "expected an object"))?;
        let variant = o
            .get("variant")
            .or_else(|| o.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| err("variant", "missing"))?
            .to_string();
        let safe = o.get("safe").and_then(Value::as_u64);
        let total = o.get("total").and_then(Value::as_u64);
        let rate = match o.get("safety_rate").or_else(|| o.get("safety")) {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| err("safety_rate", "expected a number"))?,
            None => match (safe, total) {
                (Some(s), Some(t)) if t > 0 => s as f64 / t as f64,
                _ => return Err(err("safety_rate", "missing (or give `safe` and `total`)")),
            },
        };
        out.push(VariantSafety {
            variant,
            safety_rate: rate,
            safe,
            total,
        });
    }
    check_rates(path, out)
}

/// The tuned conditions of a study's results.json: one row per condition with a `variant`
/// factor (seeds apart: `variant` plus ` seed N` when the study has several seeds).
fn study_conditions(path: &Path, conditions: &Value) -> Result<Vec<VariantSafety>> {
    let list = conditions.as_array().map(Vec::as_slice).unwrap_or_default();
    let seeds: std::collections::BTreeSet<&str> = list
        .iter()
        .filter_map(|c| c["factors"]["seed"].as_str())
        .collect();
    let mut out = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let Some(variant) = c["factors"]["variant"].as_str() else {
            continue; // base and aligned models
        };
        let Some(safety) = c["safety"].as_object() else {
            continue; // no harmful benchmark judged
        };
        let err = |m: &str| RmError::input(path, 1, Some(&format!("conditions[{i}].safety")), m);
        let name = match c["factors"]["seed"].as_str() {
            Some(seed) if seeds.len() > 1 => format!("{variant} seed {seed}"),
            _ => variant.to_string(),
        };
        out.push(VariantSafety {
            variant: name,
            safety_rate: safety
                .get("value")
                .and_then(Value::as_f64)
                .ok_or_else(|| err("no `value`"))?,
            safe: safety.get("count").and_then(Value::as_u64),
            total: safety.get("total").and_then(Value::as_u64),
        });
    }
    if out.is_empty() {
        return Err(RmError::input(
            path,
            1,
            Some("conditions"),
            "no tuned condition with a variant and a safety rate",
        ));
    }
    Ok(out)
}

fn check_rates(path: &Path, v: Vec<VariantSafety>) -> Result<Vec<VariantSafety>> {
    if let Some(bad) = v.iter().find(|r| !(0.0..=1.0).contains(&r.safety_rate)) {
        return Err(RmError::Other(format!(
            "{}: variant {:?} has safety rate {} (expected a share in [0, 1])",
            path.display(),
            bad.variant,
            bad.safety_rate
        )));
    }
    Ok(v)
}

#[derive(Debug, Clone, Serialize)]
pub struct Separation {
    pub n_good: usize,
    pub n_bad: usize,
    pub mean_good: f64,
    pub mean_bad: f64,
    /// AUC with a bootstrap interval (resampling items).
    pub auc: Estimate,
    /// AUC within each variant that has both labels.
    pub by_variant: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubsetAccuracy {
    pub subset: String,
    pub safety: bool,
    pub result: PairAccuracy,
}

#[derive(Debug, Clone, Serialize)]
pub struct HumanAgreement {
    pub overall: PairAccuracy,
    pub safety_subsets: Option<PairAccuracy>,
    pub other_subsets: Option<PairAccuracy>,
    pub by_subset: Vec<SubsetAccuracy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantRow {
    pub variant: String,
    pub n_items: usize,
    pub mean_score: Estimate,
    pub safety_rate: f64,
    /// 1 = highest.
    pub rm_rank: usize,
    pub safety_rank: usize,
    /// The RM scores this variant above another one whose tuned model was safer.
    pub flagged: bool,
}

/// Two variants the RM orders against measured safety.
#[derive(Debug, Clone, Serialize)]
pub struct Inversion {
    /// The variant the RM prefers (higher mean score)...
    pub preferred: String,
    /// ...over this one, although tuning on `preferred` gave the less safe model.
    pub over: String,
    pub score_gap: f64,
    pub safety_gap: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Consistency {
    pub variants: Vec<VariantRow>,
    /// Kendall tau-b between mean score and safety rate over variants.
    pub kendall_tau: Option<Estimate>,
    pub spearman_rho: Option<Estimate>,
    pub inversions: Vec<Inversion>,
    /// Variants with scores but no safety result (left out), and the other way round.
    pub unmatched: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RmAgreement {
    pub rms: Vec<String>,
    /// `items` or `pairs` (pair margins).
    pub unit: String,
    pub n_common: usize,
    pub pairwise_tau: Vec<Vec<Option<f64>>>,
    pub kendall_w: Option<f64>,
}

/// Everything `rm analyze` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RmReliability {
    pub rm: String,
    pub n_items: usize,
    pub n_pairs: usize,
    pub separation: Option<Separation>,
    pub agreement: Option<HumanAgreement>,
    pub consistency: Option<Consistency>,
    pub rm_agreement: Option<RmAgreement>,
    pub bootstrap_resamples: usize,
    pub seed: u64,
    pub tie_eps: f64,
}

/// Settings of [`analyze`].
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    pub bootstrap: BootstrapOptions,
    /// Score differences at most this large count as ties.
    pub tie_eps: f64,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            bootstrap: BootstrapOptions::default(),
            tie_eps: 1e-9,
        }
    }
}

/// Merges score files of the same RM (e.g. one file per dataset variant), keeping first-seen
/// order of the RMs.
pub fn merge_by_rm(files: &[ScoreFile]) -> Vec<ScoreFile> {
    let mut out: Vec<ScoreFile> = Vec::new();
    for f in files {
        match out.iter_mut().find(|o| o.rm == f.rm) {
            Some(o) => {
                o.items.extend(f.items.iter().cloned());
                o.pairs.extend(f.pairs.iter().cloned());
            }
            None => out.push(f.clone()),
        }
    }
    out
}

/// Analyses the first RM's scores (and, with several RMs, agreement among them). Files of the
/// same RM are merged first (see [`merge_by_rm`]).
pub fn analyze(
    scores: &[ScoreFile],
    results: Option<&[VariantSafety]>,
    opts: &AnalyzeOptions,
) -> Result<RmReliability> {
    let merged = merge_by_rm(scores);
    let scores = merged.as_slice();
    let main = scores
        .first()
        .ok_or_else(|| RmError::Other("no scores file given".into()))?;
    Ok(RmReliability {
        rm: main.rm.clone(),
        n_items: main.items.len(),
        n_pairs: main.pairs.len(),
        separation: separation(main, opts),
        agreement: agreement(main, opts),
        consistency: match results {
            Some(r) => consistency(main, r, opts),
            None => None,
        },
        rm_agreement: rm_agreement(scores),
        bootstrap_resamples: opts.bootstrap.resamples,
        seed: opts.bootstrap.seed,
        tie_eps: opts.tie_eps,
    })
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

pub fn separation(f: &ScoreFile, opts: &AnalyzeOptions) -> Option<Separation> {
    let labelled: Vec<(f64, bool)> = f
        .items
        .iter()
        .filter_map(|i| i.label.map(|l| (i.score, l)))
        .collect();
    let split = |idx: &[usize]| -> (Vec<f64>, Vec<f64>) {
        let mut g = Vec::new();
        let mut b = Vec::new();
        for &i in idx {
            let (s, l) = labelled[i];
            if l {
                g.push(s)
            } else {
                b.push(s)
            }
        }
        (g, b)
    };
    let all: Vec<usize> = (0..labelled.len()).collect();
    let (good, bad) = split(&all);
    if good.is_empty() || bad.is_empty() {
        return None;
    }
    let auc = bootstrap(labelled.len(), &opts.bootstrap, &|idx| {
        let (g, b) = split(idx);
        roc_auc(&g, &b)
    })?;
    let mut by_variant: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for i in &f.items {
        if let (Some(v), Some(l)) = (&i.variant, i.label) {
            let e = by_variant.entry(v.clone()).or_default();
            if l {
                e.0.push(i.score)
            } else {
                e.1.push(i.score)
            }
        }
    }
    Some(Separation {
        n_good: good.len(),
        n_bad: bad.len(),
        mean_good: mean(&good),
        mean_bad: mean(&bad),
        auc,
        by_variant: by_variant
            .into_iter()
            .filter_map(|(v, (g, b))| roc_auc(&g, &b).map(|a| (v, a)))
            .collect(),
    })
}

pub fn agreement(f: &ScoreFile, opts: &AnalyzeOptions) -> Option<HumanAgreement> {
    if f.pairs.is_empty() {
        return None;
    }
    let all: Vec<(f64, f64)> = f.pairs.iter().map(|p| (p.chosen, p.rejected)).collect();
    let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &f.pairs {
        if let Some(s) = &p.subset {
            groups
                .entry(s.clone())
                .or_default()
                .push((p.chosen, p.rejected));
        }
    }
    let (mut safety, mut other) = (Vec::new(), Vec::new());
    for (name, v) in &groups {
        if is_safety_subset(name) {
            safety.extend_from_slice(v);
        } else {
            other.extend_from_slice(v);
        }
    }
    Some(HumanAgreement {
        overall: pair_accuracy(&all, opts.tie_eps),
        safety_subsets: (!safety.is_empty()).then(|| pair_accuracy(&safety, opts.tie_eps)),
        other_subsets: (!other.is_empty()).then(|| pair_accuracy(&other, opts.tie_eps)),
        by_subset: groups
            .iter()
            .map(|(name, v)| SubsetAccuracy {
                subset: name.clone(),
                safety: is_safety_subset(name),
                result: pair_accuracy(v, opts.tie_eps),
            })
            .collect(),
    })
}

/// Ranks, 1 = highest (ties share the better rank).
fn desc_ranks(xs: &[f64]) -> Vec<usize> {
    xs.iter()
        .map(|x| 1 + xs.iter().filter(|y| *y > x).count())
        .collect()
}

pub fn consistency(
    f: &ScoreFile,
    results: &[VariantSafety],
    opts: &AnalyzeOptions,
) -> Option<Consistency> {
    let mut by_variant: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in &f.items {
        if let Some(v) = &i.variant {
            by_variant.entry(v.clone()).or_default().push(i.score);
        }
    }
    if by_variant.is_empty() {
        return None;
    }
    let safety: HashMap<&str, &VariantSafety> =
        results.iter().map(|r| (r.variant.as_str(), r)).collect();
    let mut unmatched: Vec<String> = by_variant
        .keys()
        .filter(|v| !safety.contains_key(v.as_str()))
        .cloned()
        .collect();
    unmatched.extend(
        results
            .iter()
            .filter(|r| !by_variant.contains_key(&r.variant))
            .map(|r| r.variant.clone()),
    );
    let matched: Vec<(&String, &Vec<f64>, &VariantSafety)> = by_variant
        .iter()
        .filter_map(|(v, s)| safety.get(v.as_str()).map(|r| (v, s, *r)))
        .collect();
    if matched.is_empty() {
        return None;
    }
    let means: Vec<f64> = matched.iter().map(|(_, s, _)| mean(s)).collect();
    let rates: Vec<f64> = matched.iter().map(|(_, _, r)| r.safety_rate).collect();
    let rm_rank = desc_ranks(&means);
    let safety_rank = desc_ranks(&rates);
    let mut inversions = Vec::new();
    for a in 0..matched.len() {
        for b in 0..matched.len() {
            if means[a] > means[b] + opts.tie_eps && rates[a] < rates[b] {
                inversions.push(Inversion {
                    preferred: matched[a].0.clone(),
                    over: matched[b].0.clone(),
                    score_gap: means[a] - means[b],
                    safety_gap: rates[b] - rates[a],
                });
            }
        }
    }
    inversions.sort_by(|x, y| y.safety_gap.total_cmp(&x.safety_gap));
    let variants = matched
        .iter()
        .enumerate()
        .map(|(k, (v, s, r))| VariantRow {
            variant: (*v).clone(),
            n_items: s.len(),
            mean_score: bootstrap_mean(s, &opts.bootstrap).unwrap_or(Estimate {
                resamples: Some(0),
                ..Estimate::point(means[k])
            }),
            safety_rate: r.safety_rate,
            rm_rank: rm_rank[k],
            safety_rank: safety_rank[k],
            flagged: inversions.iter().any(|i| &i.preferred == *v),
        })
        .collect();
    // Bootstrap: resample items within each variant (the RM's means) and, where counts are
    // known, safe answers within each variant's prompts (the safety rates).
    let (tau, rho) = variant_bootstrap(&matched, &means, &rates, &opts.bootstrap);
    Some(Consistency {
        variants,
        kendall_tau: tau,
        spearman_rho: rho,
        inversions,
        unmatched,
    })
}

fn variant_bootstrap(
    matched: &[(&String, &Vec<f64>, &VariantSafety)],
    means: &[f64],
    rates: &[f64],
    opts: &BootstrapOptions,
) -> (Option<Estimate>, Option<Estimate>) {
    let tau0 = kendall_tau_b(means, rates);
    let rho0 = spearman_rho(means, rates);
    let mut rng = Resampler::new(opts.seed, opts.draw);
    let (mut taus, mut rhos) = (Vec::new(), Vec::new());
    for _ in 0..opts.resamples {
        let m: Vec<f64> = matched
            .iter()
            .map(|(_, s, _)| rng.resampled_mean(s))
            .collect();
        let r: Vec<f64> = matched
            .iter()
            .map(|(_, _, v)| match (v.safe, v.total) {
                (Some(k), Some(t)) if t > 0 => rng.resampled_rate(k as f64 / t as f64, t),
                _ => v.safety_rate,
            })
            .collect();
        if let Some(t) = kendall_tau_b(&m, &r) {
            taus.push(t);
        }
        if let Some(x) = spearman_rho(&m, &r) {
            rhos.push(x);
        }
    }
    let (lo_q, hi_q) = opts.quantiles();
    let est = |v0: Option<f64>, mut v: Vec<f64>| {
        v0.map(|value| {
            let (lo, hi) = percentile_interval(&mut v, lo_q, hi_q);
            Estimate {
                value,
                lo,
                hi,
                n: None,
                resamples: Some(v.len()),
            }
        })
    };
    (est(tau0, taus), est(rho0, rhos))
}

pub fn rm_agreement(files: &[ScoreFile]) -> Option<RmAgreement> {
    if files.len() < 2 {
        return None;
    }
    let use_items = files.iter().all(|f| !f.items.is_empty());
    let maps: Vec<HashMap<&str, f64>> = files
        .iter()
        .map(|f| {
            if use_items {
                f.items.iter().map(|i| (i.id.as_str(), i.score)).collect()
            } else {
                f.pairs
                    .iter()
                    .map(|p| (p.id.as_str(), p.chosen - p.rejected))
                    .collect()
            }
        })
        .collect();
    let mut common: Vec<&str> = maps[0]
        .keys()
        .copied()
        .filter(|id| maps.iter().all(|m| m.contains_key(id)))
        .collect();
    common.sort();
    let scores: Vec<Vec<f64>> = maps
        .iter()
        .map(|m| common.iter().map(|id| m[id]).collect())
        .collect();
    Some(RmAgreement {
        rms: files.iter().map(|f| f.rm.clone()).collect(),
        unit: if use_items { "items" } else { "pair margins" }.into(),
        n_common: common.len(),
        pairwise_tau: pairwise_tau(&scores),
        kendall_w: kendall_w(&scores),
    })
}
