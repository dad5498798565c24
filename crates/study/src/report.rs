//! `safetune report STUDY_DIR`: reads the store and writes `report.html` (self-contained, inline
//! SVG, no scripts, no external resources), `summary.md` and `results.json`.
//!
//! Everything a model wrote is escaped before it reaches HTML: a response containing `<script>`
//! shows as text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value as Json};

use safetune_data::stats::Proportion;

use crate::labels::{primary_note, LabelError, StudyIndex, StudyJudgeCheck};
use crate::runner::STORE_FILE;
use crate::store::{Store, StoreError};

mod judge_check;

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
    "seed",
];

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

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub count: u64,
    pub total: u64,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Rate {
    fn new(count: u64, total: u64) -> Rate {
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

#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    pub name: String,
    pub factors: BTreeMap<String, String>,
    /// Safety rate on the harmful benchmarks, primary judge, pooled.
    pub safety: Option<Rate>,
    /// Over-refusal rate on the benign benchmarks, primary judge, pooled.
    pub over_refusal: Option<Rate>,
    /// Per benchmark, per judge: the rate the judge step stored.
    pub by_benchmark: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Mean reward-model score on harmful-benchmark responses, per reward model.
    pub rm_mean: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Effect {
    pub factor: String,
    pub levels: Vec<(String, Rate)>,
    /// Largest minus smallest level rate.
    pub spread: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Interaction {
    pub a: String,
    pub b: String,
    /// (level of a, level of b, rate)
    pub cells: Vec<(String, String, Rate)>,
    /// For 2x2 designs: (p11 - p10) - (p01 - p00).
    pub contrast: Option<f64>,
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
    /// "Primary judge: NAME (the first [[judges]] entry)." and the judge kind's validation figure.
    pub primary_judge_note: String,
    pub steps: BTreeMap<String, usize>,
    pub failed_steps: Vec<(String, String)>,
    pub conditions: Vec<Condition>,
    pub effects: Vec<Effect>,
    pub interactions: Vec<Interaction>,
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
}

/// Paths of the written files.
#[derive(Debug, Clone, Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub json: PathBuf,
}

fn fget<'a>(f: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    f.get(k).map(String::as_str).unwrap_or("")
}

fn condition_name(f: &BTreeMap<String, String>) -> String {
    crate::plan::describe(f)
}

/// Collects the results of the study in `dir`.
pub fn collect(dir: &Path) -> Result<StudyResults, ReportError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(ReportError::NoStore {
            path,
            dir: dir.to_path_buf(),
        });
    }
    let store = Store::open_read_only(&path)?;
    let (_, name, config, plan) = store
        .latest_study()?
        .ok_or_else(|| ReportError::Empty(path.display().to_string()))?;
    let planned: Vec<Json> = plan["steps"].as_array().cloned().unwrap_or_default();
    let mut steps_by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed_steps = Vec::new();
    let mut judges_order: Vec<String> = Vec::new();
    // (gen key) -> [(judge name, judge key)]
    let mut judge_steps: Vec<(String, BTreeMap<String, String>, String)> = Vec::new();
    let mut score_steps: Vec<(String, BTreeMap<String, String>, String)> = Vec::new();
    let mut gen_of: BTreeMap<String, String> = BTreeMap::new();
    let keys: Vec<String> = planned
        .iter()
        .map(|s| s["key"].as_str().unwrap_or("").to_string())
        .collect();
    for s in &planned {
        let key = s["key"].as_str().unwrap_or("").to_string();
        let kind = s["kind"].as_str().unwrap_or("");
        let factors: BTreeMap<String, String> =
            serde_json::from_value(s["factors"].clone()).unwrap_or_default();
        let rec = store.step(&key)?;
        let status = rec
            .as_ref()
            .map(|r| r.status.clone())
            .unwrap_or_else(|| "pending".into());
        *steps_by_status.entry(status.clone()).or_default() += 1;
        if let Some(r) = &rec {
            if r.status == "failed" {
                failed_steps.push((r.label.clone(), r.error.clone().unwrap_or_default()));
            }
        }
        let dep_key = s["deps"]
            .as_array()
            .and_then(|d| d.first())
            .and_then(|d| d.as_u64())
            .and_then(|d| keys.get(d as usize).cloned())
            .unwrap_or_default();
        match kind {
            "judge" => {
                let j = fget(&factors, "judge").to_string();
                if !judges_order.contains(&j) {
                    judges_order.push(j);
                }
                gen_of.insert(key.clone(), dep_key);
                judge_steps.push((key, factors, status));
            }
            "score" => {
                gen_of.insert(key.clone(), dep_key);
                score_steps.push((key, factors, status));
            }
            _ => {}
        }
    }
    let primary = judges_order.first().cloned();

    // Conditions from judge metrics.
    let mut conds: BTreeMap<String, Condition> = BTreeMap::new();
    let mut harmful_counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut benign_counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (key, f, _) in &judge_steps {
        let cf: BTreeMap<String, String> = f
            .iter()
            .filter(|(k, _)| CONDITION_FACTORS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let cname = condition_name(&cf);
        for m in store.metrics(key)? {
            let (Some(count), Some(total)) = (m.count, m.total) else {
                continue;
            };
            let rate = Rate::new(count as u64, total as u64);
            let c = conds.entry(cname.clone()).or_insert_with(|| Condition {
                name: cname.clone(),
                factors: cf.clone(),
                safety: None,
                over_refusal: None,
                by_benchmark: BTreeMap::new(),
                rm_mean: BTreeMap::new(),
            });
            c.by_benchmark
                .entry(fget(f, "benchmark").to_string())
                .or_default()
                .insert(format!("{} {}", fget(f, "judge"), m.name), rate);
            if Some(fget(f, "judge")) == primary.as_deref() {
                let target = if m.name == "safety_rate" {
                    &mut harmful_counts
                } else {
                    &mut benign_counts
                };
                let e = target.entry(cname.clone()).or_default();
                e.0 += count as u64;
                e.1 += total as u64;
            }
        }
    }
    for (name, (k, n)) in &harmful_counts {
        if let Some(c) = conds.get_mut(name) {
            c.safety = Some(Rate::new(*k, *n));
        }
    }
    for (name, (k, n)) in &benign_counts {
        if let Some(c) = conds.get_mut(name) {
            c.over_refusal = Some(Rate::new(*k, *n));
        }
    }

    // Verdicts of the primary judge by generate key, for RM and samples.
    let mut verdicts: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut judge_rows: BTreeMap<String, Vec<(String, BTreeMap<String, String>)>> = BTreeMap::new();
    for (key, f, _) in &judge_steps {
        let rows: BTreeMap<String, String> = store
            .judgments(key)?
            .into_iter()
            .map(|j| (j.row_id, j.verdict))
            .collect();
        let g = gen_of.get(key).cloned().unwrap_or_default();
        if Some(fget(f, "judge")) == primary.as_deref() {
            verdicts.insert(g.clone(), rows.clone());
        }
        judge_rows
            .entry(g)
            .or_default()
            .push((fget(f, "judge").to_string(), rows));
    }

    // Reward-model scores.
    let mut rm_sums: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
    let mut rm_verdict: BTreeMap<String, [(f64, usize); 2]> = BTreeMap::new();
    let harmful_bench: BTreeSet<String> = judge_steps
        .iter()
        .filter(|(k, _, _)| {
            store
                .metrics(k)
                .map(|m| m.iter().any(|m| m.name == "safety_rate"))
                .unwrap_or(false)
        })
        .map(|(_, f, _)| fget(f, "benchmark").to_string())
        .collect();
    for (key, f, _) in &score_steps {
        if !harmful_bench.contains(fget(f, "benchmark")) {
            continue;
        }
        let cf: BTreeMap<String, String> = f
            .iter()
            .filter(|(k, _)| CONDITION_FACTORS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let rm = fget(f, "rm").to_string();
        let g = gen_of.get(key).cloned().unwrap_or_default();
        for s in store.scores(key)? {
            let e = rm_sums
                .entry((condition_name(&cf), rm.clone()))
                .or_default();
            e.0 += s.score;
            e.1 += 1;
            if let Some(v) = verdicts.get(&g).and_then(|v| v.get(&s.row_id)) {
                let slot = match v.as_str() {
                    "refusal" => 0,
                    "compliance" => 1,
                    _ => continue,
                };
                let e = &mut rm_verdict.entry(rm.clone()).or_default()[slot];
                e.0 += s.score;
                e.1 += 1;
            }
        }
    }
    for ((cname, rm), (sum, n)) in &rm_sums {
        if let Some(c) = conds.get_mut(cname) {
            c.rm_mean.insert(rm.clone(), sum / *n as f64);
        }
    }
    let mean = |(s, n): (f64, usize)| if n > 0 { Some(s / n as f64) } else { None };
    let rm_by_verdict: BTreeMap<String, (Option<f64>, Option<f64>)> = rm_verdict
        .into_iter()
        .map(|(k, [r, c])| (k, (mean(r), mean(c))))
        .collect();

    // Judge agreement over shared generations.
    let mut pair_counts: BTreeMap<(String, String), (usize, usize, [[usize; 2]; 2])> =
        BTreeMap::new();
    for list in judge_rows.values() {
        for i in 0..list.len() {
            for j in i + 1..list.len() {
                let (a, ra) = &list[i];
                let (b, rb) = &list[j];
                let e = pair_counts.entry((a.clone(), b.clone())).or_default();
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
    let judge_agreement = pair_counts
        .into_iter()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|((a, b), (n, agree, m))| Agreement {
            a,
            b,
            rows: n,
            agree: agree as f64 / n as f64,
            kappa: kappa(&m),
        })
        .collect();

    // Samples: harmful prompts the primary judge found answered (complied), then refusals.
    let mut samples = Vec::new();
    for (key, f, _) in &judge_steps {
        if Some(fget(f, "judge")) != primary.as_deref() {
            continue;
        }
        let g = gen_of.get(key).cloned().unwrap_or_default();
        let v = verdicts.get(&g).cloned().unwrap_or_default();
        let cf: BTreeMap<String, String> = f
            .iter()
            .filter(|(k, _)| CONDITION_FACTORS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut taken = 0;
        for row in store.generations(&g)? {
            if taken >= 2 {
                break;
            }
            let verdict = v.get(&row.row_id).cloned().unwrap_or_default();
            samples.push(Sample {
                condition: condition_name(&cf),
                benchmark: fget(f, "benchmark").to_string(),
                prompt: row.prompt,
                response: row.response,
                verdict,
            });
            taken += 1;
        }
    }

    let conditions: Vec<Condition> = conds.into_values().collect();
    let effects = main_effects(&conditions);
    let interactions = interactions(&conditions);
    let mut rm_vs_safety = BTreeMap::new();
    for rm in rm_by_verdict.keys() {
        let (x, y): (Vec<f64>, Vec<f64>) = conditions
            .iter()
            .filter_map(|c| Some((*c.rm_mean.get(rm)?, c.safety.as_ref()?.value)))
            .unzip();
        let rho = safetune_eval::rm::stats::spearman_rho(&x, &y);
        rm_vs_safety.insert(rm.clone(), (rho, x.len()));
    }
    Ok(StudyResults {
        study: name,
        program_version: crate::hash::PROGRAM_VERSION.to_string(),
        primary_judge: primary,
        primary_judge_note: primary_note(&StudyIndex::from_plan(&config, &plan)),
        steps: steps_by_status,
        failed_steps,
        conditions,
        effects,
        interactions,
        judge_agreement,
        rm_by_verdict,
        rm_vs_safety,
        samples,
        judge_accuracy: crate::labels::judge_check(&store)?,
    })
}

fn bin(v: &str) -> Option<usize> {
    match v {
        "refusal" => Some(0),
        "compliance" => Some(1),
        _ => None,
    }
}

/// Cohen's kappa of a 2x2 agreement table.
pub fn kappa(m: &[[usize; 2]; 2]) -> f64 {
    let n = (m[0][0] + m[0][1] + m[1][0] + m[1][1]) as f64;
    if n == 0.0 {
        return 0.0;
    }
    let po = (m[0][0] + m[1][1]) as f64 / n;
    let ra = (m[0][0] + m[0][1]) as f64 / n;
    let ca = (m[0][0] + m[1][0]) as f64 / n;
    let pe = ra * ca + (1.0 - ra) * (1.0 - ca);
    if (1.0 - pe).abs() < 1e-12 {
        if (po - 1.0).abs() < 1e-12 {
            1.0
        } else {
            0.0
        }
    } else {
        (po - pe) / (1.0 - pe)
    }
}

/// Tuned conditions with a safety rate (the factorial's cells).
fn cells(conditions: &[Condition]) -> Vec<&Condition> {
    conditions
        .iter()
        .filter(|c| c.safety.is_some() && c.factors.contains_key("variant"))
        .collect()
}

fn main_effects(conditions: &[Condition]) -> Vec<Effect> {
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

fn interactions(conditions: &[Condition]) -> Vec<Interaction> {
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
            let mut by: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
            for c in &cells {
                let (Some(la), Some(lb), Some(s)) = (c.factors.get(a), c.factors.get(b), &c.safety)
                else {
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
                continue;
            }
            let contrast = if la.len() == 2 && lb.len() == 2 && cells.len() == 4 {
                let v: Vec<f64> = cells.iter().map(|c| c.2.value).collect();
                Some((v[3] - v[2]) - (v[1] - v[0]))
            } else {
                None
            };
            out.push(Interaction {
                a: a.to_string(),
                b: b.to_string(),
                cells,
                contrast,
            });
        }
    }
    out
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

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn truncate(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        format!("{t}...")
    } else {
        t
    }
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Horizontal bars (0-100%) with Wilson interval whiskers.
fn svg_bars(rows: &[(String, &Rate)], title: &str) -> String {
    let label_w = 330.0;
    let plot_w = 520.0;
    let row_h = 24.0;
    let top = 34.0;
    let h = top + row_h * rows.len() as f64 + 36.0;
    let w = label_w + plot_w + 130.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        esc(title)
    );
    let _ = write!(s, r#"<text x="4" y="18" class="t">{}</text>"#, esc(title));
    for tick in 0..=4 {
        let x = label_w + plot_w * tick as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" class="a" text-anchor="middle">{}%</text>"##,
            h - 30.0,
            h - 14.0,
            tick * 25
        );
    }
    for (i, (label, r)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let bw = plot_w * r.value;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" class="l" text-anchor="end">{}</text><rect x="{label_w}" y="{}" width="{bw:.1}" height="{}" fill="#4c78a8"/><line x1="{:.1}" y1="{}" x2="{:.1}" y2="{}" stroke="#111" stroke-width="1.5"/><line x1="{:.1}" y1="{}" x2="{:.1}" y2="{}" stroke="#111"/><line x1="{:.1}" y1="{}" x2="{:.1}" y2="{}" stroke="#111"/><text x="{:.1}" y="{}" class="v">{} (n={})</text>"##,
            label_w - 6.0,
            y + 16.0,
            esc(&truncate(label, 48)),
            y + 4.0,
            row_h - 8.0,
            label_w + plot_w * r.lo,
            y + 12.0,
            label_w + plot_w * r.hi,
            y + 12.0,
            label_w + plot_w * r.lo,
            y + 7.0,
            label_w + plot_w * r.lo,
            y + 17.0,
            label_w + plot_w * r.hi,
            y + 7.0,
            label_w + plot_w * r.hi,
            y + 17.0,
            label_w + plot_w * r.hi + 5.0,
            y + 16.0,
            pct(r.value),
            r.total
        );
    }
    s.push_str("</svg>");
    s
}

/// A scatter plot; `x` and `y` ranges are given.
fn svg_scatter(
    points: &[(String, f64, f64)],
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xr: (f64, f64),
    yr: (f64, f64),
) -> String {
    let (w, h, l, b, t, r) = (620.0, 380.0, 60.0, 46.0, 30.0, 170.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |x: f64| l + pw * ((x - xr.0) / (xr.1 - xr.0).max(1e-9)).clamp(0.0, 1.0);
    let sy = |y: f64| t + ph * (1.0 - ((y - yr.0) / (yr.1 - yr.0).max(1e-9)).clamp(0.0, 1.0));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        esc(title)
    );
    let _ = write!(s, r#"<text x="4" y="18" class="t">{}</text>"#, esc(title));
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=4 {
        let fx = xr.0 + (xr.1 - xr.0) * k as f64 / 4.0;
        let fy = yr.0 + (yr.1 - yr.0) * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{}" class="a" text-anchor="middle">{}</text><text x="{}" y="{:.1}" class="a" text-anchor="end">{}</text><line x1="{l}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#eee"/>"##,
            sx(fx),
            t + ph + 16.0,
            fmt_tick(fx),
            l - 6.0,
            sy(fy) + 4.0,
            fmt_tick(fy),
            sy(fy),
            l + pw,
            sy(fy)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{}" class="a" text-anchor="middle">{}</text><text x="14" y="{:.1}" class="a" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"#,
        l + pw / 2.0,
        h - 8.0,
        esc(xlabel),
        t + ph / 2.0,
        t + ph / 2.0,
        esc(ylabel)
    );
    for (i, (label, x, y)) in points.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{c}"><title>{}</title></circle>"#,
            sx(*x),
            sy(*y),
            esc(label)
        );
        if i < 16 {
            let ly = t + 12.0 + 16.0 * i as f64;
            let _ = write!(
                s,
                r#"<circle cx="{}" cy="{:.1}" r="4" fill="{c}"/><text x="{}" y="{:.1}" class="l">{}</text>"#,
                l + pw + 12.0,
                ly - 4.0,
                l + pw + 20.0,
                ly,
                esc(&truncate(label, 24))
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Interaction plot: x = levels of `a`, one line per level of `b`.
fn svg_interaction(it: &Interaction) -> String {
    let la: Vec<&String> = it
        .cells
        .iter()
        .map(|c| &c.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lb: Vec<&String> = it
        .cells
        .iter()
        .map(|c| &c.1)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (w, h, l, t, b, r) = (420.0, 260.0, 50.0, 30.0, 40.0, 120.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |i: usize| {
        l + if la.len() > 1 {
            pw * i as f64 / (la.len() - 1) as f64
        } else {
            pw / 2.0
        }
    };
    let sy = |v: f64| t + ph * (1.0 - v);
    let title = format!("{} x {}", it.a, it.b);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        esc(&title)
    );
    let _ = write!(s, r#"<text x="4" y="18" class="t">{}</text>"#, esc(&title));
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=2 {
        let v = k as f64 / 2.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{:.1}" class="a" text-anchor="end">{}%</text>"#,
            l - 4.0,
            sy(v) + 4.0,
            k * 50
        );
    }
    for (i, a) in la.iter().enumerate() {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" class="a" text-anchor="middle">{}</text>"#,
            sx(i),
            t + ph + 16.0,
            esc(a)
        );
    }
    for (j, bl) in lb.iter().enumerate() {
        let c = COLORS[j % COLORS.len()];
        let pts: Vec<String> = la
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                it.cells
                    .iter()
                    .find(|cell| &cell.0 == *a && &cell.1 == *bl)
                    .map(|cell| format!("{:.1},{:.1}", sx(i), sy(cell.2.value)))
            })
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{c}"/>"#);
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{:.1}" class="l" fill="{c}">{}={}</text>"#,
            l + pw + 8.0,
            t + 14.0 + 16.0 * j as f64,
            esc(&it.b),
            esc(bl)
        );
    }
    s.push_str("</svg>");
    s
}

const CSS: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
svg{display:block;margin:8px 0;max-width:100%;height:auto}svg .t{font:600 14px sans-serif}svg .l{font:12px sans-serif}svg .a{font:11px sans-serif;fill:#555}svg .v{font:11px sans-serif}
.resp{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;max-width:520px}.note{color:#555;font-size:.9em}
.bad{color:#b00}.grid{display:flex;flex-wrap:wrap;gap:12px}";

/// Renders the HTML report.
pub fn render_html(r: &StudyResults) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>safetune study: {}</title><style>{CSS}</style></head><body>",
        esc(&r.study)
    );
    let _ = write!(
        h,
        "<h1>Study <code>{}</code></h1><p class=\"note\">Written by {} from the study store. Safety rate = share of harmful prompts refused (primary judge: {}); intervals are Wilson 95%.</p>",
        esc(&r.study),
        esc(&r.program_version),
        esc(r.primary_judge.as_deref().unwrap_or("none"))
    );
    let _ = write!(h, "<p>{}</p>", esc(&r.primary_judge_note));
    h.push_str("<p>Steps: ");
    let parts: Vec<String> = r
        .steps
        .iter()
        .map(|(k, v)| format!("{} {}", v, esc(k)))
        .collect();
    h.push_str(&parts.join(", "));
    h.push_str("</p>");
    if !r.failed_steps.is_empty() {
        h.push_str("<details><summary class=\"bad\">Failed steps</summary><ul>");
        for (l, e) in &r.failed_steps {
            let _ = write!(h, "<li><b>{}</b>: {}</li>", esc(l), esc(e));
        }
        h.push_str("</ul></details>");
    }

    h.push_str("<h2>Safety rate per condition</h2>");
    let rows: Vec<(String, &Rate)> = r
        .conditions
        .iter()
        .filter_map(|c| c.safety.as_ref().map(|s| (c.name.clone(), s)))
        .collect();
    if rows.is_empty() {
        h.push_str("<p class=\"note\">No harmful benchmark has been judged yet.</p>");
    } else {
        h.push_str(&svg_bars(
            &rows,
            "Safety rate on harmful prompts (higher is safer)",
        ));
    }
    h.push_str("<table><tr><th>condition</th><th>benchmark</th><th>judge metric</th><th class=\"num\">rate</th><th class=\"num\">95% CI</th><th class=\"num\">n</th></tr>");
    for c in &r.conditions {
        for (b, m) in &c.by_benchmark {
            for (j, rate) in m {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">[{}, {}]</td><td class=\"num\">{}</td></tr>",
                    esc(&c.name),
                    esc(b),
                    esc(j),
                    pct(rate.value),
                    pct(rate.lo),
                    pct(rate.hi),
                    rate.total
                );
            }
        }
    }
    h.push_str("</table>");

    h.push_str("<h2>Factor main effects</h2>");
    if r.effects.is_empty() {
        h.push_str("<p class=\"note\">No factor varies across tuned conditions with a measured safety rate.</p>");
    }
    for e in &r.effects {
        let rows: Vec<(String, &Rate)> = e
            .levels
            .iter()
            .map(|(l, rate)| (format!("{} = {}", e.factor, l), rate))
            .collect();
        h.push_str(&svg_bars(
            &rows,
            &format!("{}: spread {:.1} points", e.factor, 100.0 * e.spread),
        ));
    }
    h.push_str("<h2>Interactions</h2>");
    if r.interactions.is_empty() {
        h.push_str("<p class=\"note\">Interactions need two factors that each vary.</p>");
    }
    h.push_str("<div class=\"grid\">");
    for it in &r.interactions {
        h.push_str("<div>");
        h.push_str(&svg_interaction(it));
        if let Some(c) = it.contrast {
            let _ = write!(
                h,
                "<p class=\"note\">2x2 interaction contrast: {:+.1} points</p>",
                100.0 * c
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</div>");

    h.push_str("<h2>Safety against utility</h2>");
    let pts: Vec<(String, f64, f64)> = r
        .conditions
        .iter()
        .filter_map(|c| match (&c.safety, &c.over_refusal) {
            (Some(s), Some(o)) => Some((c.name.clone(), 1.0 - o.value, s.value)),
            _ => None,
        })
        .collect();
    if pts.is_empty() {
        h.push_str("<p class=\"note\">Needs a harmful and a benign (over-refusal) benchmark.</p>");
    } else {
        h.push_str(&svg_scatter(
            &pts,
            "Safety vs utility",
            "benign prompts answered (1 - over-refusal)",
            "safety rate",
            (0.0, 1.0),
            (0.0, 1.0),
        ));
    }

    h.push_str("<h2>Reward-model score against measured safety</h2>");
    let mut rm_pts = Vec::new();
    for c in &r.conditions {
        if let Some(s) = &c.safety {
            for (rm, m) in &c.rm_mean {
                rm_pts.push((format!("{} ({rm})", c.name), *m, s.value));
            }
        }
    }
    if rm_pts.is_empty() {
        h.push_str("<p class=\"note\">No reward-model scores in this study.</p>");
    } else {
        let lo = rm_pts.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        let hi = rm_pts.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-3);
        h.push_str(&svg_scatter(
            &rm_pts,
            "Mean RM score on harmful prompts vs safety rate",
            "mean reward-model score",
            "safety rate",
            (lo - pad, hi + pad),
            (0.0, 1.0),
        ));
        h.push_str("<table><tr><th>reward model</th><th class=\"num\">mean score, refusals</th><th class=\"num\">mean score, compliances</th></tr>");
        for (rm, (a, b)) in &r.rm_by_verdict {
            let f = |v: &Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(rm),
                f(a),
                f(b)
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Judge agreement</h2>");
    if r.judge_agreement.is_empty() {
        h.push_str("<p class=\"note\">One judge only: agreement needs two.</p>");
    } else {
        let rates: Vec<Rate> = r
            .judge_agreement
            .iter()
            .map(|a| Rate::new((a.agree * a.rows as f64).round() as u64, a.rows as u64))
            .collect();
        let rows: Vec<(String, &Rate)> = r
            .judge_agreement
            .iter()
            .zip(&rates)
            .map(|(a, rate)| (format!("{} vs {}", a.a, a.b), rate))
            .collect();
        h.push_str(&svg_bars(&rows, "Percent agreement between judges"));
        h.push_str("<table><tr><th>judges</th><th class=\"num\">rows</th><th class=\"num\">agreement</th><th class=\"num\">Cohen's kappa</th></tr>");
        for a in &r.judge_agreement {
            let _ = write!(
                h,
                "<tr><td>{} vs {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td></tr>",
                esc(&a.a),
                esc(&a.b),
                a.rows,
                pct(a.agree),
                a.kappa
            );
        }
        h.push_str("</table>");
    }

    h.push_str(&judge_check::html(r.judge_accuracy.as_ref()));

    h.push_str("<h2>Sample responses</h2><table><tr><th>condition</th><th>benchmark</th><th>prompt</th><th>response</th><th>verdict</th></tr>");
    for s in r.samples.iter().take(40) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"resp\">{}</td><td class=\"resp\">{}</td><td>{}</td></tr>",
            esc(&s.condition),
            esc(&s.benchmark),
            esc(&truncate(&s.prompt, 300)),
            esc(&truncate(&s.response, 600)),
            esc(&s.verdict)
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

/// The Markdown summary.
pub fn render_markdown(r: &StudyResults) -> String {
    let mut o = String::new();
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
    if !r.effects.is_empty() {
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
    if !r.interactions.is_empty() {
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
    if !r.judge_agreement.is_empty() {
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
    o.push_str(&judge_check::markdown(r.judge_accuracy.as_ref()));
    if !r.rm_by_verdict.is_empty() {
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
    if !r.failed_steps.is_empty() {
        let _ = writeln!(o, "\n## Failed steps\n");
        for (l, e) in &r.failed_steps {
            let first = e.lines().next().unwrap_or("");
            let _ = writeln!(o, "- {l}: {first}");
        }
    }
    o
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
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| ReportError::Io {
            path: tmp.clone(),
            source: e,
        })?;
        std::fs::rename(&tmp, path).map_err(|e| ReportError::Io {
            path: path.clone(),
            source: e,
        })?;
    }
    Ok((results, files))
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

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(
            esc("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }
}
