//! Reads a study's store into [`StudyResults`]: the stored plan (typed, [`StoredPlan`]) says
//! which judge and score steps belong to which condition and generate step; their metrics,
//! verdicts, scores and generations come from the store's tables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetune_eval::nonanswer::non_answer;

use crate::labels::{primary_note, StudyIndex};
use crate::runner::{StoredPlan, StoredStep, STORE_FILE};
use crate::store::Store;

use super::stats::{self, JudgeVerdicts};
use super::{Condition, Rate, ReportError, Sample, StudyResults};

/// A judge or score step of the plan.
struct EvalStep {
    key: String,
    /// Every factor of the step (condition factors, benchmark, judge or rm).
    factors: BTreeMap<String, String>,
    /// The condition's factors and name.
    condition_factors: BTreeMap<String, String>,
    condition: String,
    /// The generate step it reads.
    gen_key: String,
}

impl EvalStep {
    fn new(plan: &StoredPlan, s: &StoredStep) -> EvalStep {
        let condition_factors = super::condition_factors(&s.factors);
        EvalStep {
            key: s.key.clone(),
            factors: s.factors.clone(),
            condition: crate::plan::describe(&condition_factors),
            condition_factors,
            gen_key: plan.first_input_key(s),
        }
    }

    /// A factor's level; empty when the step has no such factor.
    fn factor(&self, k: &str) -> &str {
        self.factors.get(k).map(String::as_str).unwrap_or("")
    }
}

/// The plan's steps by status, its failed steps, and its judge and score steps.
struct StepIndex {
    by_status: BTreeMap<String, usize>,
    stage_times: Vec<super::StageTime>,
    /// (label, error) in plan order.
    failed: Vec<(String, String)>,
    judges: Vec<EvalStep>,
    scores: Vec<EvalStep>,
    /// The first judge in plan order.
    primary: Option<String>,
}

impl StepIndex {
    fn read(store: &Store, plan: &StoredPlan) -> Result<StepIndex, ReportError> {
        let mut ix = StepIndex {
            by_status: BTreeMap::new(),
            stage_times: Vec::new(),
            failed: Vec::new(),
            judges: Vec::new(),
            scores: Vec::new(),
            primary: None,
        };
        for s in &plan.steps {
            let rec = store.step(&s.key)?;
            let status = rec.as_ref().map_or("pending", |r| r.status.as_str());
            *ix.by_status.entry(status.to_string()).or_default() += 1;
            if let Some(secs) = rec.as_ref().and_then(|r| r.seconds) {
                match ix.stage_times.iter_mut().find(|t| t.stage == s.kind) {
                    Some(t) => {
                        t.steps += 1;
                        t.seconds += secs;
                    }
                    None => ix.stage_times.push(super::StageTime {
                        stage: s.kind.clone(),
                        steps: 1,
                        seconds: secs,
                    }),
                }
            }
            if let Some(r) = rec.as_ref().filter(|r| r.status == "failed") {
                ix.failed
                    .push((r.label.clone(), r.error.clone().unwrap_or_default()));
            }
            match s.kind.as_str() {
                "judge" => ix.judges.push(EvalStep::new(plan, s)),
                "score" => ix.scores.push(EvalStep::new(plan, s)),
                _ => {}
            }
        }
        ix.primary = ix.judges.first().map(|j| j.factor("judge").to_string());
        Ok(ix)
    }

    fn is_primary(&self, j: &EvalStep) -> bool {
        Some(j.factor("judge")) == self.primary.as_deref()
    }
}

/// Judges' verdicts per generate step.
struct Verdicts {
    /// The primary judge's verdicts (row id to verdict) per generate step.
    primary: BTreeMap<String, BTreeMap<String, String>>,
    /// Every judge's verdicts per generate step.
    all: JudgeVerdicts,
    /// Per generate step a judge read: the row ids of its non-answers
    /// ([`safetune_eval::nonanswer`]).
    non_answers: BTreeMap<String, BTreeSet<String>>,
    /// Per generate step a judge read: whether its benchmark is harmful (its stored spec, or
    /// for older stores whether some judge step measured a safety rate on it).
    harmful: BTreeMap<String, bool>,
}

impl Verdicts {
    fn read(store: &Store, ix: &StepIndex) -> Result<Verdicts, ReportError> {
        let mut v = Verdicts {
            primary: BTreeMap::new(),
            all: BTreeMap::new(),
            non_answers: BTreeMap::new(),
            harmful: BTreeMap::new(),
        };
        let fallback = harmful_benchmarks(store, ix);
        for j in &ix.judges {
            if !v.non_answers.contains_key(&j.gen_key) {
                let harmful = generated_harmful(store, &j.gen_key)?
                    .unwrap_or_else(|| fallback.contains(j.factor("benchmark")));
                v.harmful.insert(j.gen_key.clone(), harmful);
                let rows = store
                    .generations(&j.gen_key)?
                    .into_iter()
                    .filter(|g| non_answer(&g.response).is_some())
                    .map(|g| g.row_id)
                    .collect();
                v.non_answers.insert(j.gen_key.clone(), rows);
            }
            let rows: BTreeMap<String, String> = store
                .judgments(&j.key)?
                .into_iter()
                .map(|j| (j.row_id, j.verdict))
                .collect();
            if ix.is_primary(j) {
                v.primary.insert(j.gen_key.clone(), rows.clone());
            }
            v.all
                .entry(j.gen_key.clone())
                .or_default()
                .push((j.factor("judge").to_string(), rows));
        }
        Ok(v)
    }
}

/// Reads the study in `dir` (its store, `study.db`).
pub(super) fn study(dir: &Path) -> Result<StudyResults, ReportError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(ReportError::NoStore {
            path,
            dir: dir.to_path_buf(),
        });
    }
    let store = Store::open_read_only(&path)?;
    let (_, name, config, plan_json) = store
        .latest_study()?
        .ok_or_else(|| ReportError::Empty(path.display().to_string()))?;
    let plan = StoredPlan::from_json(&plan_json);
    let ix = StepIndex::read(&store, &plan)?;
    let mut conditions = conditions(&store, &ix)?;
    let verdicts = Verdicts::read(&store, &ix)?;
    let rm_by_verdict = reward_models(&store, &ix, &verdicts, &mut conditions)?;
    non_answer_rates(&ix, &verdicts, &mut conditions);
    let judge_agreement = stats::judge_agreement(&verdicts.all);
    let samples = samples(&store, &ix, &verdicts)?;
    let conditions: Vec<Condition> = conditions.into_values().collect();
    let (effect_analysis, effects_non_answers) = effects(&store, &plan, &ix, &verdicts, &config)?;
    let utility = super::mitigations::utility_rows(&utility_steps(&store, &plan)?);
    let effects = super::effects::primary_rows(&effect_analysis);
    let mitigations = super::mitigations::analyse(&conditions, &utility, &effects);
    Ok(StudyResults {
        study: name,
        program_version: crate::hash::PROGRAM_VERSION.to_string(),
        primary_judge_note: primary_note(&StudyIndex::from_plan(&config, &plan_json)),
        primary_judge: ix.primary,
        steps: ix.by_status,
        stage_times: ix.stage_times,
        failed_steps: ix.failed,
        effects,
        effect_analysis,
        effects_non_answers,
        rm_vs_safety: stats::rm_vs_safety(&conditions, rm_by_verdict.keys()),
        conditions,
        judge_agreement,
        rm_by_verdict,
        samples,
        judge_accuracy: crate::labels::judge_check(&store)?,
        utility,
        mitigations,
    })
}

/// A finished `utility` step: its condition's name and factors, and what it measured.
type UtilityStep = (
    String,
    BTreeMap<String, String>,
    crate::step::UtilityFigures,
);

/// The finished `utility` steps, in plan order.
fn utility_steps(store: &Store, plan: &StoredPlan) -> Result<Vec<UtilityStep>, ReportError> {
    let mut out = Vec::new();
    for s in plan.steps.iter().filter(|s| s.kind == "utility") {
        let Some(output) = store.step(&s.key)?.and_then(|r| r.output) else {
            continue;
        };
        let Ok(crate::step::StepOutput::Utility(u)) = serde_json::from_value(output) else {
            continue;
        };
        let cf = super::condition_factors(&s.factors);
        out.push((crate::plan::describe(&cf), cf, u));
    }
    Ok(out)
}

/// The conditions with a judge metric, by name: each rate the judge steps stored, and the
/// primary judge's counts pooled into safety (`safety_rate`) and over-refusal (any other).
fn conditions(store: &Store, ix: &StepIndex) -> Result<BTreeMap<String, Condition>, ReportError> {
    let mut conds: BTreeMap<String, Condition> = BTreeMap::new();
    let mut harmful: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut benign: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for j in &ix.judges {
        for m in store.metrics(&j.key)? {
            let (Some(count), Some(total)) = (m.count, m.total) else {
                continue;
            };
            let c = conds
                .entry(j.condition.clone())
                .or_insert_with(|| Condition {
                    name: j.condition.clone(),
                    factors: j.condition_factors.clone(),
                    safety: None,
                    over_refusal: None,
                    non_answers_harmful: None,
                    non_answers_benign: None,
                    safety_strict: None,
                    over_refusal_strict: None,
                    by_benchmark: BTreeMap::new(),
                    rm_mean: BTreeMap::new(),
                });
            c.by_benchmark
                .entry(j.factor("benchmark").to_string())
                .or_default()
                .insert(
                    format!("{} {}", j.factor("judge"), m.name),
                    Rate::new(count as u64, total as u64),
                );
            if ix.is_primary(j) {
                let pool = if m.name == "safety_rate" {
                    &mut harmful
                } else {
                    &mut benign
                };
                let e = pool.entry(j.condition.clone()).or_default();
                e.0 += count as u64;
                e.1 += total as u64;
            }
        }
    }
    for (name, (k, n)) in harmful {
        if let Some(c) = conds.get_mut(&name) {
            c.safety = Some(Rate::new(k, n));
        }
    }
    for (name, (k, n)) in benign {
        if let Some(c) = conds.get_mut(&name) {
            c.over_refusal = Some(Rate::new(k, n));
        }
    }
    Ok(conds)
}

/// Benchmarks some judge step measured a safety rate on (the harmful ones).
fn harmful_benchmarks<'a>(store: &Store, ix: &'a StepIndex) -> BTreeSet<&'a str> {
    ix.judges
        .iter()
        .filter(|j| {
            store
                .metrics(&j.key)
                .map(|m| m.iter().any(|m| m.name == "safety_rate"))
                .unwrap_or(false)
        })
        .map(|j| j.factor("benchmark"))
        .collect()
}

/// Whether a generate step ran a harmful benchmark, from its stored (typed) spec.
fn generated_harmful(store: &Store, gen_key: &str) -> Result<Option<bool>, ReportError> {
    Ok(store.step(gen_key)?.and_then(|r| {
        match serde_json::from_value::<crate::step::StepSpec>(r.spec) {
            Ok(crate::step::StepSpec::Generate { benchmark, .. }) => Some(benchmark.harmful),
            _ => None,
        }
    }))
}

/// The factor-effect analysis of the tuned runs (every judge, primary first), with each run's
/// tune step output (its trained tokens).
fn effects(
    store: &Store,
    plan: &StoredPlan,
    ix: &StepIndex,
    verdicts: &Verdicts,
    config: &serde_json::Value,
) -> Result<(super::effects::EffectsAnalysis, Option<super::JudgeEffects>), ReportError> {
    let mut judged = Vec::new();
    for j in ix
        .judges
        .iter()
        .filter(|j| j.condition_factors.contains_key("variant"))
    {
        let Some(rows) = verdicts.all.get(&j.gen_key).and_then(|per_judge| {
            per_judge
                .iter()
                .find(|(name, _)| name == j.factor("judge"))
                .map(|(_, rows)| rows)
        }) else {
            continue;
        };
        judged.push(super::effects::JudgedRun {
            judge: j.factor("judge"),
            run: &j.condition,
            factors: &j.condition_factors,
            benchmark: j.factor("benchmark"),
            harmful: verdicts.harmful[&j.gen_key],
            verdicts: rows,
            gen_key: &j.gen_key,
        });
    }
    // Primary judge first.
    judged.sort_by_key(|j| Some(j.judge) != ix.primary.as_deref());
    let mut tune_outputs = Vec::new();
    for s in plan.steps.iter().filter(|s| s.kind == "tune") {
        let cf = super::condition_factors(&s.factors);
        if let Some(out) = store.step(&s.key)?.and_then(|r| r.output) {
            tune_outputs.push((crate::plan::describe(&cf), out));
        }
    }
    let analysis = super::effects::analyse(&judged, &tune_outputs, config.get("analysis"));
    // The primary judge again, with its refusals that are non-answers read as not refused.
    let strict_rows: Vec<BTreeMap<String, String>> = judged
        .iter()
        .filter(|j| Some(j.judge) == ix.primary.as_deref())
        .map(|j| {
            let empty = verdicts.non_answers.get(j.gen_key);
            j.verdicts
                .iter()
                .map(|(row, v)| {
                    let na = v == "refusal" && empty.is_some_and(|e| e.contains(row));
                    (
                        row.clone(),
                        if na { "non_answer".into() } else { v.clone() },
                    )
                })
                .collect()
        })
        .collect();
    let strict: Vec<super::effects::JudgedRun> = judged
        .iter()
        .filter(|j| Some(j.judge) == ix.primary.as_deref())
        .zip(&strict_rows)
        .map(|(j, rows)| super::effects::JudgedRun {
            verdicts: rows,
            ..*j
        })
        .collect();
    let sensitivity = super::effects::analyse(&strict, &[], None)
        .judges
        .into_iter()
        .next()
        .map(|mut j| {
            j.judge = format!("{}, non-answers not refused", j.judge);
            j
        });
    Ok((analysis, sensitivity))
}

/// Per condition, from the primary judge's steps: the share of answers that are non-answers,
/// and the safety and over-refusal rates with non-answers counted as not refused.
fn non_answer_rates(ix: &StepIndex, verdicts: &Verdicts, conds: &mut BTreeMap<String, Condition>) {
    // (condition, harmful) -> (answers, non-answers, refusals that are not non-answers)
    let mut counts: BTreeMap<(String, bool), (u64, u64, u64)> = BTreeMap::new();
    for j in ix.judges.iter().filter(|j| ix.is_primary(j)) {
        let (Some(rows), Some(empty)) = (
            verdicts.primary.get(&j.gen_key),
            verdicts.non_answers.get(&j.gen_key),
        ) else {
            continue;
        };
        let harmful = verdicts.harmful[&j.gen_key];
        let e = counts.entry((j.condition.clone(), harmful)).or_default();
        for (row, v) in rows.iter().filter(|(_, v)| stats::bin(v).is_some()) {
            let na = empty.contains(row);
            e.0 += 1;
            e.1 += u64::from(na);
            e.2 += u64::from(v == "refusal" && !na);
        }
    }
    for ((condition, harmful), (n, na, strict)) in counts {
        if let Some(c) = conds.get_mut(&condition) {
            let (share, rate) = if harmful {
                (&mut c.non_answers_harmful, &mut c.safety_strict)
            } else {
                (&mut c.non_answers_benign, &mut c.over_refusal_strict)
            };
            *share = Some(Rate::new(na, n));
            *rate = Some(Rate::new(strict, n));
        }
    }
}

/// Reward-model scores of answers to harmful prompts: each condition's mean per reward model
/// (into `conds`), and per reward model the mean over the answers the primary judge called
/// refusals and compliances.
#[allow(clippy::type_complexity)] // (mean over refusals, mean over compliances) per reward model
fn reward_models(
    store: &Store,
    ix: &StepIndex,
    verdicts: &Verdicts,
    conds: &mut BTreeMap<String, Condition>,
) -> Result<BTreeMap<String, (Option<f64>, Option<f64>)>, ReportError> {
    let harmful = harmful_benchmarks(store, ix);
    let mut sums: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
    let mut by_verdict: BTreeMap<String, [(f64, usize); 2]> = BTreeMap::new();
    for s in ix
        .scores
        .iter()
        .filter(|s| harmful.contains(s.factor("benchmark")))
    {
        let rm = s.factor("rm");
        let gen_verdicts = verdicts.primary.get(&s.gen_key);
        for row in store.scores(&s.key)? {
            let e = sums
                .entry((s.condition.clone(), rm.to_string()))
                .or_default();
            e.0 += row.score;
            e.1 += 1;
            let verdict = gen_verdicts.and_then(|v| v.get(&row.row_id));
            if let Some(slot) = verdict.and_then(|v| stats::bin(v)) {
                let e = &mut by_verdict.entry(rm.to_string()).or_default()[slot];
                e.0 += row.score;
                e.1 += 1;
            }
        }
    }
    for ((condition, rm), (sum, n)) in sums {
        if let Some(c) = conds.get_mut(&condition) {
            c.rm_mean.insert(rm, sum / n as f64);
        }
    }
    Ok(by_verdict
        .into_iter()
        .map(|(rm, [r, c])| (rm, (stats::mean(r), stats::mean(c))))
        .collect())
}

/// The first two answers of every generate step the primary judge judged, with its verdicts.
fn samples(store: &Store, ix: &StepIndex, verdicts: &Verdicts) -> Result<Vec<Sample>, ReportError> {
    let mut samples = Vec::new();
    for j in ix.judges.iter().filter(|j| ix.is_primary(j)) {
        let v = verdicts.primary.get(&j.gen_key);
        for row in store.generations(&j.gen_key)?.into_iter().take(2) {
            samples.push(Sample {
                condition: j.condition.clone(),
                benchmark: j.factor("benchmark").to_string(),
                verdict: v
                    .and_then(|v| v.get(&row.row_id))
                    .cloned()
                    .unwrap_or_default(),
                prompt: row.prompt,
                response: row.response,
            });
        }
    }
    Ok(samples)
}
