//! Human labels of a study's own answers: blind labelling files, their import into the store's
//! `human_labels` table, and each judge's accuracy against them per condition.
//!
//! - [`sample_answers`] draws, for every cell (condition x benchmark x the primary judge's
//!   verdict), up to N answers that nobody has labelled yet, with a seeded generator per cell;
//!   the rows are shuffled (seeded) so conditions interleave, and carry no verdict or score, so
//!   the labeller is blind to the judges.
//! - [`import_labels`] reads the filled file (`label` refusal, compliance or unclear; an empty
//!   label is a row not labelled yet) and upserts one row per answer and labeller. It opens the
//!   store like any other writer and takes no lock of the runner: SQLite's WAL lets it write
//!   while a study runs or a report reads.
//! - [`judge_check`] compares every judge's stored verdicts with the labels: overall, per
//!   condition and per factor level, with the groups whose accuracy differs from the rest's
//!   (safetune-eval's [`check_by_condition`]).
//!
//! The primary judge is the first `[[judges]]` entry (the report's convention).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use safetune_eval::metrics::Rng;
use safetune_eval::validate::{
    check_by_condition, validation_note, ConditionCheck, ConditionLabel,
};

use crate::runner::{StoredPlan, STORE_FILE};
use crate::store::{HumanLabel, Store, StoreError, UpsertCounts, HUMAN_LABELS};

/// The labelling file `safetune label DIR` writes by default.
pub const TODO_FILE: &str = "labels-todo.jsonl";

/// The labeller recorded when neither the row nor `--labeller` names one.
pub const UNNAMED_LABELLER: &str = "unnamed";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{path}: no study store here\nhint: run `safetune study CONFIG.toml --output {dir}` first", path = path.display(), dir = dir.display())]
    NoStore { path: PathBuf, dir: PathBuf },
    #[error("{0}: the store holds no study yet")]
    Empty(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: field `{field}`: {message}", path = path.display())]
    Field {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{path}:{line}: {message}", path = path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: already exists and may hold labels\nhint: pass --force to overwrite it, or -o another file", path = path.display())]
    Exists { path: PathBuf },
}

/// A generate step of the study: the condition it belongs to and its benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenStep {
    pub key: String,
    /// The condition's name as the report writes it.
    pub condition: String,
    /// The condition's factor levels (model, stage, variant, ...; no benchmark or judge).
    pub factors: BTreeMap<String, String>,
    pub benchmark: String,
}

/// A judge step: which judge judged which generate step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeStep {
    pub judge: String,
    pub key: String,
    pub gen_key: String,
}

/// The study's generate and judge steps, from the plan in the store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StudyIndex {
    /// In plan order.
    pub gens: Vec<GenStep>,
    pub judges: Vec<JudgeStep>,
    /// Judge names in plan order (the first is the primary judge).
    pub judge_order: Vec<String>,
    /// The primary judge's kind (`keyword`, `classifier`, ...), from the config.
    pub primary_kind: Option<String>,
    /// True when the config lists no `[[judges]]` (the default keyword judge ran).
    pub default_judge: bool,
}

impl StudyIndex {
    /// Reads the latest study's plan and config from `store`.
    pub fn load(store: &Store) -> Result<StudyIndex, LabelError> {
        let (_, _, config, plan) = store
            .latest_study()?
            .ok_or_else(|| LabelError::Empty(store.path().display().to_string()))?;
        Ok(StudyIndex::from_plan(&config, &plan))
    }

    /// From the config and plan JSON the runner stores.
    pub fn from_plan(config: &Json, plan: &Json) -> StudyIndex {
        let plan = StoredPlan::from_json(plan);
        let mut ix = StudyIndex::default();
        for s in &plan.steps {
            match s.kind.as_str() {
                "generate" => {
                    let cf = crate::report::condition_factors(&s.factors);
                    ix.gens.push(GenStep {
                        key: s.key.clone(),
                        condition: crate::plan::describe(&cf),
                        factors: cf,
                        benchmark: s.factors.get("benchmark").cloned().unwrap_or_default(),
                    });
                }
                "judge" => {
                    let judge = s.factors.get("judge").cloned().unwrap_or_default();
                    if !ix.judge_order.contains(&judge) {
                        ix.judge_order.push(judge.clone());
                    }
                    ix.judges.push(JudgeStep {
                        judge,
                        key: s.key.clone(),
                        gen_key: plan.first_input_key(s),
                    });
                }
                _ => {}
            }
        }
        let judges = config["judges"].as_array().cloned().unwrap_or_default();
        ix.default_judge = judges.is_empty();
        ix.primary_kind = match (ix.judge_order.first(), ix.default_judge) {
            (Some(_), true) => Some("keyword".into()),
            (Some(p), false) => judges
                .iter()
                .find(|j| j["name"].as_str() == Some(p.as_str()))
                .and_then(|j| j["kind"].as_str())
                .map(str::to_string),
            (None, _) => judges
                .first()
                .and_then(|j| j["kind"].as_str())
                .map(str::to_string),
        };
        ix
    }

    pub fn primary(&self) -> Option<&str> {
        self.judge_order.first().map(String::as_str)
    }

    pub fn gen(&self, key: &str) -> Option<&GenStep> {
        self.gens.iter().find(|g| g.key == key)
    }

    /// The judge step of `judge` on generate step `gen_key`.
    pub fn judge_step(&self, judge: &str, gen_key: &str) -> Option<&JudgeStep> {
        self.judges
            .iter()
            .find(|j| j.judge == judge && j.gen_key == gen_key)
    }
}

/// The sentence naming the primary judge and why it is primary, with the judge kind's
/// validation figure where safetune-eval has one.
pub fn primary_note(ix: &StudyIndex) -> String {
    let Some(name) = ix.primary() else {
        return "Primary judge: none (no judge step in the plan).".into();
    };
    let why = if ix.default_judge {
        "the default; the config lists no [[judges]]"
    } else {
        "the first [[judges]] entry"
    };
    let mut s = format!("Primary judge: {name} ({why}).");
    if let Some(note) = ix.primary_kind.as_deref().and_then(validation_note) {
        s.push(' ');
        s.push_str(note);
    }
    s
}

/// A judge's verdicts on one generate step's rows (row id to verdict); empty when that judge
/// did not judge the step.
fn verdicts_of(
    store: &Store,
    ix: &StudyIndex,
    judge: &str,
    gen_key: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(match ix.judge_step(judge, gen_key) {
        Some(j) => store
            .judgments(&j.key)?
            .into_iter()
            .map(|j| (j.row_id, j.verdict))
            .collect(),
        None => BTreeMap::new(),
    })
}

/// Opens `dir/study.db` read-only (an error with a hint when there is none).
pub fn open_study(dir: &Path) -> Result<Store, LabelError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(LabelError::NoStore {
            path,
            dir: dir.to_path_buf(),
        });
    }
    Ok(Store::open_read_only(&path)?)
}

/// One row of a labelling file. Field order is the file's; there is no verdict or score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    /// `<generate step key>:<row id>`.
    pub answer_id: String,
    pub condition: String,
    pub benchmark: String,
    pub category: String,
    pub prompt: String,
    pub response: String,
    /// Empty until labelled: refusal, compliance or unclear.
    pub label: String,
    pub labeller: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleOptions {
    /// Answers per cell (condition x benchmark x primary verdict).
    pub per_cell: usize,
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            per_cell: 5,
            seed: 0,
        }
    }
}

/// What [`sample_answers`] drew.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// In the (seeded) order to label them.
    pub rows: Vec<LabelRow>,
    /// Cells with at least one unlabelled answer.
    pub cells: usize,
    /// Cells that had fewer than `per_cell` unlabelled answers (all of them were taken).
    pub short_cells: usize,
    /// Answers left out because someone has labelled them already.
    pub already_labelled: usize,
    pub primary: Option<String>,
}

/// FNV-1a of a string, to seed one cell's generator from the cell's name.
fn fnv(s: &str) -> u64 {
    safetune_data::util::fnv1a64(s.as_bytes())
}

/// Shuffles `v` in place (Fisher-Yates) with `rng` (unbiased `below`).
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    safetune_data::util::shuffle_with(v, |n| rng.below(n));
}

/// Draws answers to label from the study in `dir` (see the module docs).
pub fn sample_answers(dir: &Path, opts: &SampleOptions) -> Result<Sample, LabelError> {
    let store = open_study(dir)?;
    let ix = StudyIndex::load(&store)?;
    let primary = ix.primary().map(str::to_string);
    let labelled: BTreeSet<(String, String)> = store
        .human_labels()?
        .into_iter()
        .map(|l| (l.step_key, l.row_id))
        .collect();
    // cell (condition index, benchmark, verdict) -> rows
    let mut cells: BTreeMap<(usize, String, String), Vec<LabelRow>> = BTreeMap::new();
    let mut cond_order: Vec<String> = Vec::new();
    let mut already_labelled = 0;
    for g in &ix.gens {
        let verdicts = match primary.as_deref() {
            Some(p) => verdicts_of(&store, &ix, p, &g.key)?,
            None => BTreeMap::new(),
        };
        let ci = match cond_order.iter().position(|c| *c == g.condition) {
            Some(i) => i,
            None => {
                cond_order.push(g.condition.clone());
                cond_order.len() - 1
            }
        };
        for row in store.generations(&g.key)? {
            if labelled.contains(&(g.key.clone(), row.row_id.clone())) {
                already_labelled += 1;
                continue;
            }
            let verdict = verdicts
                .get(&row.row_id)
                .cloned()
                .unwrap_or_else(|| "unjudged".into());
            let category = match &row.meta["category"] {
                Json::String(s) => s.clone(),
                Json::Null => String::new(),
                other => other.to_string(),
            };
            cells
                .entry((ci, g.benchmark.clone(), verdict))
                .or_default()
                .push(LabelRow {
                    answer_id: format!("{}:{}", g.key, row.row_id),
                    condition: g.condition.clone(),
                    benchmark: g.benchmark.clone(),
                    category,
                    prompt: row.prompt,
                    response: row.response,
                    label: String::new(),
                    labeller: String::new(),
                });
        }
    }
    let mut rows = Vec::new();
    let mut short_cells = 0;
    let n_cells = cells.len();
    for ((ci, bench, verdict), mut members) in cells {
        // Rows come in row-id order per generate step; the cell's own generator picks from them.
        let name = format!("{}\u{1f}{bench}\u{1f}{verdict}", cond_order[ci]);
        let mut rng = Rng::new(opts.seed ^ fnv(&name));
        shuffle(&mut members, &mut rng);
        if members.len() < opts.per_cell {
            short_cells += 1;
        }
        members.truncate(opts.per_cell);
        rows.extend(members);
    }
    shuffle(&mut rows, &mut Rng::new(opts.seed));
    Ok(Sample {
        rows,
        cells: n_cells,
        short_cells,
        already_labelled,
        primary,
    })
}

/// Writes a labelling file (one JSON object a line), through a temporary file and a rename.
/// An existing file is kept unless `overwrite`: it may hold someone's labels.
pub fn write_label_file(path: &Path, rows: &[LabelRow], overwrite: bool) -> Result<(), LabelError> {
    if path.exists() && !overwrite {
        return Err(LabelError::Exists {
            path: path.to_path_buf(),
        });
    }
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LabelError::Io { path, source }
    };
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    safetune_data::util::write_atomic(path, text.as_bytes()).map_err(io(path))
}

/// What [`import_labels`] read and stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportSummary {
    /// Non-blank lines of the file.
    pub rows: usize,
    pub refusal: usize,
    pub compliance: usize,
    pub unclear: usize,
    /// Rows with an empty label (not labelled yet; skipped).
    pub empty: usize,
    pub stored: UpsertCounts,
    pub labellers: BTreeSet<String>,
}

/// Reads a filled labelling file and upserts its labels into `dir/study.db` (see the module
/// docs). `labeller` names rows whose own `labeller` is empty ([`UNNAMED_LABELLER`] when neither
/// says). Every row is checked before anything is stored: an answer id the store does not hold,
/// a label other than refusal/compliance/unclear, a response that differs from the stored one
/// or a duplicate is an error naming the file, line and field.
pub fn import_labels(
    dir: &Path,
    file: &Path,
    labeller: Option<&str>,
) -> Result<ImportSummary, LabelError> {
    let store_path = dir.join(STORE_FILE);
    if !store_path.exists() {
        return Err(LabelError::NoStore {
            path: store_path,
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(file).map_err(|source| LabelError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    // Opening for writing migrates a version 1 store; no runner lock is taken (WAL).
    let mut store = Store::open(&store_path)?;
    let ix = StudyIndex::load(&store)?;
    let default_labeller = labeller
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .unwrap_or(UNNAMED_LABELLER);
    let mut summary = ImportSummary::default();
    let mut out: Vec<HumanLabel> = Vec::new();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        summary.rows += 1;
        let field_err = |field: &str, message: String| LabelError::Field {
            path: file.to_path_buf(),
            line: n,
            field: field.to_string(),
            message,
        };
        let row: Json = serde_json::from_str(line).map_err(|e| LabelError::Line {
            path: file.to_path_buf(),
            line: n,
            message: format!("not a JSON object: {e}"),
        })?;
        if !row.is_object() {
            return Err(LabelError::Line {
                path: file.to_path_buf(),
                line: n,
                message: "not a JSON object".into(),
            });
        }
        let text_of = |field: &str, required: bool| -> Result<Option<String>, LabelError> {
            match &row[field] {
                Json::String(s) => Ok(Some(s.clone())),
                Json::Null if !required => Ok(None),
                Json::Null => Err(field_err(field, "missing".into())),
                other => Err(field_err(field, format!("expected a string, got {other}"))),
            }
        };
        let label = text_of("label", true)?
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if label.is_empty() {
            summary.empty += 1;
            continue;
        }
        if !HUMAN_LABELS.contains(&label.as_str()) {
            return Err(field_err(
                "label",
                format!("expected refusal, compliance or unclear (or empty: not labelled yet), got {label:?}"),
            ));
        }
        let answer_id = text_of("answer_id", true)?.unwrap_or_default();
        let Some((step_key, row_id)) = answer_id.split_once(':') else {
            return Err(field_err(
                "answer_id",
                format!("expected STEP_KEY:ROW_ID, got {answer_id:?}"),
            ));
        };
        let Some(stored) = store.generation(step_key, row_id)? else {
            return Err(field_err(
                "answer_id",
                format!(
                    "no answer {answer_id:?} in {}\nhint: import a file that `safetune label` wrote for this study directory",
                    store_path.display()
                ),
            ));
        };
        if let Some(resp) = text_of("response", false)? {
            if resp != stored.response {
                return Err(field_err(
                    "response",
                    "differs from the stored answer (was the file edited, or written for another study?)".into(),
                ));
            }
        }
        let who = text_of("labeller", false)?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_labeller.to_string());
        if let Some(first) = seen.insert((answer_id.clone(), who.clone()), n) {
            return Err(field_err(
                "answer_id",
                format!("labelled again by {who:?} (first on line {first})"),
            ));
        }
        let (condition, benchmark) = match ix.gen(step_key) {
            Some(g) => (g.condition.clone(), g.benchmark.clone()),
            None => (
                text_of("condition", false)?.unwrap_or_default(),
                text_of("benchmark", false)?.unwrap_or_default(),
            ),
        };
        match label.as_str() {
            "refusal" => summary.refusal += 1,
            "compliance" => summary.compliance += 1,
            _ => summary.unclear += 1,
        }
        summary.labellers.insert(who.clone());
        out.push(HumanLabel {
            step_key: step_key.to_string(),
            row_id: row_id.to_string(),
            condition,
            benchmark,
            label,
            labeller: who,
            labelled_at: now,
        });
    }
    summary.stored = store.upsert_human_labels(&out)?;
    Ok(summary)
}

/// Every judge against the human labels of a study's answers.
#[derive(Debug, Clone, Serialize)]
pub struct StudyJudgeCheck {
    pub primary: Option<String>,
    pub primary_kind: Option<String>,
    /// "Primary judge: NAME (the first `[[judges]]` entry)." and the validation figure, if any.
    pub primary_note: String,
    /// Label rows in the store (one per answer and labeller).
    pub labels: usize,
    pub labellers: Vec<String>,
    /// Answers with at least one label.
    pub answers: usize,
    /// Answers whose labels are all `unclear` (left out).
    pub unclear: usize,
    /// Answers whose labellers disagree (refusal and compliance both given; left out).
    pub disagreements: usize,
    /// One per judge, primary first.
    pub checks: Vec<ConditionCheck>,
}

/// The judges of the study in `store` against its human labels; `None` when it has none.
/// Labels of several labellers are combined per answer: all refusal or all compliance (unclear
/// ones aside) gives the answer's label, a mix leaves the answer out.
pub fn judge_check(store: &Store) -> Result<Option<StudyJudgeCheck>, LabelError> {
    let labels = store.human_labels()?;
    if labels.is_empty() {
        return Ok(None);
    }
    let ix = StudyIndex::load(store)?;
    // answer -> (refusal?, compliance?, condition, benchmark) over its labels.
    let mut by_answer: BTreeMap<(String, String), (bool, bool, String)> = BTreeMap::new();
    let mut labellers = BTreeSet::new();
    for l in &labels {
        labellers.insert(l.labeller.clone());
        let e = by_answer
            .entry((l.step_key.clone(), l.row_id.clone()))
            .or_insert_with(|| (false, false, l.condition.clone()));
        match l.label.as_str() {
            "refusal" => e.0 = true,
            "compliance" => e.1 = true,
            _ => {}
        }
    }
    let answers = by_answer.len();
    let mut unclear = 0;
    let mut disagreements = 0;
    // (gen key, row id, condition, factors, human refusal), in plan order of the generate steps.
    type Agreed = (String, String, String, BTreeMap<String, String>, bool);
    let mut agreed: Vec<Agreed> = Vec::new();
    for ((gen_key, row_id), (refusal, compliance, condition)) in by_answer {
        let human = match (refusal, compliance) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => {
                disagreements += 1;
                continue;
            }
            (false, false) => {
                unclear += 1;
                continue;
            }
        };
        let (condition, factors) = match ix.gen(&gen_key) {
            Some(g) => (g.condition.clone(), g.factors.clone()),
            None => (condition, BTreeMap::new()),
        };
        agreed.push((gen_key, row_id, condition, factors, human));
    }
    let order = |k: &str| {
        ix.gens
            .iter()
            .position(|g| g.key == k)
            .unwrap_or(usize::MAX)
    };
    agreed.sort_by_key(|a| (order(&a.0), a.1.clone()));
    let mut checks = Vec::new();
    for judge in &ix.judge_order {
        let mut verdicts: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut rows = Vec::with_capacity(agreed.len());
        for (gen_key, row_id, condition, factors, human) in &agreed {
            if !verdicts.contains_key(gen_key) {
                let v = verdicts_of(store, &ix, judge, gen_key)?;
                verdicts.insert(gen_key.clone(), v);
            }
            let judge_refusal = match verdicts[gen_key].get(row_id).map(String::as_str) {
                Some("refusal") => Some(true),
                Some("compliance") => Some(false),
                _ => None,
            };
            rows.push(ConditionLabel {
                condition: condition.clone(),
                factors: factors.clone(),
                human_refusal: *human,
                judge_refusal,
            });
        }
        checks.push(check_by_condition(judge, &rows));
    }
    Ok(Some(StudyJudgeCheck {
        primary: ix.primary().map(str::to_string),
        primary_kind: ix.primary_kind.clone(),
        primary_note: primary_note(&ix),
        labels: labels.len(),
        labellers: labellers.into_iter().collect(),
        answers,
        unclear,
        disagreements,
        checks,
    }))
}

/// [`judge_check`] for the study in `dir`.
pub fn study_judge_check(dir: &Path) -> Result<Option<StudyJudgeCheck>, LabelError> {
    judge_check(&open_study(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{GenerationRow, JudgmentRow};
    use serde_json::json;

    /// A study store written by hand: 2 conditions x 1 benchmark, 12 answers each; the keyword
    /// judge (primary) calls answers 0-5 of each refusals, the classifier 0-3.
    fn study(dir: &Path) {
        let mut s = Store::open(&dir.join(STORE_FILE)).unwrap();
        let mut steps = Vec::new();
        let mut idx = 0;
        for model in ["a", "b"] {
            let f = json!({"model": model, "stage": "base", "benchmark": "harm"});
            steps.push(
                json!({"key": format!("g{model}"), "kind": "generate", "label": "g",
                "factors": f, "deps": [], "size": 12}),
            );
            let gi = idx;
            idx += 1;
            for judge in ["keyword", "classifier"] {
                let mut jf = f.clone();
                jf["judge"] = json!(judge);
                steps.push(json!({"key": format!("j{model}-{judge}"), "kind": "judge",
                    "label": "j", "factors": jf, "deps": [gi], "size": 12}));
                idx += 1;
            }
        }
        let config = json!({"judges": [{"name": "keyword", "kind": "keyword"},
                                       {"name": "classifier", "kind": "classifier"}]});
        s.put_study("t", "t", &config, &json!({ "steps": steps }))
            .unwrap();
        for model in ["a", "b"] {
            let rows: Vec<GenerationRow> = (0..12)
                .map(|i| GenerationRow {
                    row_id: format!("r{i:02}"),
                    prompt: format!("prompt {i}"),
                    response: format!("answer {i} of {model}"),
                    completion_tokens: 3,
                    finish_reason: "stop".into(),
                    meta: json!({"category": "cat"}),
                })
                .collect();
            s.insert_generations(&format!("g{model}"), &rows).unwrap();
            for (judge, cut) in [("keyword", 6), ("classifier", 4)] {
                let js: Vec<JudgmentRow> = (0..12)
                    .map(|i| JudgmentRow {
                        row_id: format!("r{i:02}"),
                        verdict: if i < cut { "refusal" } else { "compliance" }.into(),
                        score: Some(0.5),
                        raw: "x".into(),
                    })
                    .collect();
                s.insert_judgments(&format!("j{model}-{judge}"), &js)
                    .unwrap();
            }
        }
    }

    #[test]
    fn sampling_is_stratified_seeded_and_blind() {
        let dir = tempfile::tempdir().unwrap();
        study(dir.path());
        let opts = SampleOptions {
            per_cell: 4,
            seed: 7,
        };
        let s = sample_answers(dir.path(), &opts).unwrap();
        // 2 conditions x 1 benchmark x 2 verdicts = 4 cells of 6 answers, 4 taken from each.
        assert_eq!((s.cells, s.short_cells, s.rows.len()), (4, 0, 16));
        assert_eq!(s.primary.as_deref(), Some("keyword"));
        let mut per_cell: BTreeMap<(String, bool), usize> = BTreeMap::new();
        for r in &s.rows {
            let i: usize = r.answer_id.rsplit('r').next().unwrap().parse().unwrap();
            *per_cell.entry((r.condition.clone(), i < 6)).or_default() += 1;
            assert_eq!((r.benchmark.as_str(), r.category.as_str()), ("harm", "cat"));
            assert!(r.label.is_empty() && r.labeller.is_empty());
        }
        assert_eq!(per_cell.len(), 4);
        assert!(per_cell.values().all(|&n| n == 4), "{per_cell:?}");
        // Conditions interleave: not all of one condition first.
        let first_half: BTreeSet<&str> = s.rows[..8].iter().map(|r| r.condition.as_str()).collect();
        assert_eq!(first_half.len(), 2, "{:?}", s.rows);
        // The same seed draws the same rows in the same order; another seed does not.
        assert_eq!(sample_answers(dir.path(), &opts).unwrap(), s);
        let other = sample_answers(
            dir.path(),
            &SampleOptions {
                per_cell: 4,
                seed: 8,
            },
        )
        .unwrap();
        assert_ne!(other.rows, s.rows);
        // More than a cell holds: all of it, counted as short.
        let all = sample_answers(
            dir.path(),
            &SampleOptions {
                per_cell: 9,
                seed: 0,
            },
        )
        .unwrap();
        assert_eq!((all.rows.len(), all.short_cells), (24, 4));
        // The written file holds exactly the labelling fields: no verdict, score or judge.
        let path = dir.path().join(TODO_FILE);
        write_label_file(&path, &s.rows, false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let v: Json = serde_json::from_str(line).unwrap();
            let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            let want = [
                "answer_id",
                "condition",
                "benchmark",
                "category",
                "prompt",
                "response",
                "label",
                "labeller",
            ];
            assert_eq!(keys, want.into_iter().collect());
            assert!(
                line.starts_with("{\"answer_id\":")
                    && line.ends_with("\"label\":\"\",\"labeller\":\"\"}"),
                "{line}"
            );
        }
        for word in [
            "verdict",
            "score",
            "keyword",
            "classifier",
            "\"refusal\"",
            "compliance",
        ] {
            assert!(!text.contains(word), "{word} in the labelling file");
        }
        // An existing file is not overwritten without asking.
        let e = write_label_file(&path, &s.rows, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        write_label_file(&path, &s.rows[..1], true).unwrap();
        // Labelled answers are not drawn again.
        import_with(
            dir.path(),
            &[(&s.rows[0].answer_id, "refusal", "")],
            Some("ann"),
        )
        .unwrap();
        let again = sample_answers(
            dir.path(),
            &SampleOptions {
                per_cell: 9,
                seed: 0,
            },
        )
        .unwrap();
        assert_eq!((again.rows.len(), again.already_labelled), (23, 1));
    }

    fn import_with(
        dir: &Path,
        rows: &[(&str, &str, &str)],
        labeller: Option<&str>,
    ) -> Result<ImportSummary, LabelError> {
        let file = dir.join("filled.jsonl");
        let text: String = rows
            .iter()
            .map(|(id, label, who)| {
                json!({"answer_id": id, "condition": "c", "label": label, "labeller": who})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(&file, text).unwrap();
        import_labels(dir, &file, labeller)
    }

    #[test]
    fn import_checks_every_row_and_upserts() {
        let dir = tempfile::tempdir().unwrap();
        study(dir.path());
        let s = import_with(
            dir.path(),
            &[
                ("ga:r00", "refusal", ""),
                ("ga:r07", " Compliance", "bob"),
                ("gb:r01", "unclear", ""),
                ("gb:r02", "", ""),
            ],
            Some("ann"),
        )
        .unwrap();
        assert_eq!(
            (s.rows, s.refusal, s.compliance, s.unclear, s.empty),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(
            s.stored,
            UpsertCounts {
                inserted: 3,
                updated: 0
            }
        );
        assert_eq!(s.labellers.iter().collect::<Vec<_>>(), ["ann", "bob"]);
        let store = Store::open_read_only(&dir.path().join(STORE_FILE)).unwrap();
        let labels = store.human_labels().unwrap();
        assert_eq!(labels.len(), 3);
        // Condition and benchmark come from the store, not the file.
        assert_eq!(
            (labels[0].condition.as_str(), labels[0].benchmark.as_str()),
            ("a base", "harm")
        );
        assert_eq!(labels[1].label, "compliance");
        // A second import of the same answer by the same labeller replaces the label.
        let s = import_with(dir.path(), &[("ga:r00", "compliance", "ann")], None).unwrap();
        assert_eq!(
            s.stored,
            UpsertCounts {
                inserted: 0,
                updated: 1
            }
        );
        let labels = store.human_labels().unwrap();
        assert_eq!((labels.len(), labels[0].label.as_str()), (3, "compliance"));
        // No labeller anywhere: recorded as unnamed.
        let s = import_with(dir.path(), &[("ga:r03", "refusal", "")], None).unwrap();
        assert_eq!(s.labellers.iter().collect::<Vec<_>>(), [UNNAMED_LABELLER]);

        // Errors name the file, the line and the field; nothing of the file is stored.
        let before = store.human_labels().unwrap().len();
        type Case<'a> = (&'a [(&'a str, &'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &[("ga:r04", "refusal", ""), ("ga:r05", "refused", "")],
                "filled.jsonl:2: field `label`: expected refusal, compliance or unclear",
            ),
            (
                &[("ga:r99", "refusal", "")],
                "filled.jsonl:1: field `answer_id`: no answer \"ga:r99\"",
            ),
            (
                &[("nocolon", "refusal", "")],
                "filled.jsonl:1: field `answer_id`: expected STEP_KEY:ROW_ID",
            ),
            (
                &[("ga:r04", "refusal", ""), ("ga:r04", "compliance", "")],
                "filled.jsonl:2: field `answer_id`: labelled again by \"ann\" (first on line 1)",
            ),
        ];
        for (rows, want) in cases {
            let e = import_with(dir.path(), rows, Some("ann"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let file = dir.path().join("filled.jsonl");
        std::fs::write(&file, "{\"answer_id\": \"ga:r04\", \"label\": 1}\n").unwrap();
        let e = import_labels(dir.path(), &file, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("filled.jsonl:1: field `label`: expected a string"),
            "{e}"
        );
        std::fs::write(
            &file,
            "{\"answer_id\": \"ga:r04\", \"label\": \"refusal\", \"response\": \"edited\"}\n",
        )
        .unwrap();
        let e = import_labels(dir.path(), &file, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("filled.jsonl:1: field `response`: differs"),
            "{e}"
        );
        std::fs::write(&file, "not json\n").unwrap();
        let e = import_labels(dir.path(), &file, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("filled.jsonl:1: not a JSON object"), "{e}");
        assert_eq!(store.human_labels().unwrap().len(), before);
        let e = import_labels(&dir.path().join("nowhere"), &file, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no study store") && e.contains("hint:"), "{e}");
    }

    #[test]
    fn judges_are_checked_per_condition_against_combined_labels() {
        let dir = tempfile::tempdir().unwrap();
        study(dir.path());
        // Condition a: humans agree with the keyword judge on all 12 answers. Condition b: the
        // humans call everything a compliance, so the keyword judge is right on 6 of 12.
        let mut rows: Vec<(String, &str, &str)> = Vec::new();
        for i in 0..12 {
            rows.push((
                format!("ga:r{i:02}"),
                if i < 6 { "refusal" } else { "compliance" },
                "ann",
            ));
            rows.push((format!("gb:r{i:02}"), "compliance", "ann"));
        }
        // A second labeller: agrees on ga:r00, disagrees on gb:r00 (left out), unclear on ga:r01.
        rows.push(("ga:r00".into(), "refusal", "bob"));
        rows.push(("gb:r00".into(), "refusal", "bob"));
        rows.push(("ga:r01".into(), "unclear", "bob"));
        let refs: Vec<(&str, &str, &str)> =
            rows.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
        import_with(dir.path(), &refs, None).unwrap();
        let c = study_judge_check(dir.path()).unwrap().unwrap();
        assert_eq!(c.primary.as_deref(), Some("keyword"));
        assert!(
            c.primary_note.starts_with(
                "Primary judge: keyword (the first [[judges]] entry). On this project's sealed"
            ),
            "{}",
            c.primary_note
        );
        assert_eq!(
            (c.labels, c.answers, c.disagreements, c.unclear),
            (27, 24, 1, 0)
        );
        assert_eq!(c.labellers, ["ann", "bob"]);
        let names: Vec<&str> = c.checks.iter().map(|k| k.judge.as_str()).collect();
        assert_eq!(names, ["keyword", "classifier"]);
        let k = &c.checks[0];
        assert_eq!(
            (k.labelled, k.overall.accuracy.count, k.overall.n),
            (23, 18, 23)
        );
        let a = &k.conditions[0];
        assert_eq!(
            (a.group.as_str(), a.agreement.accuracy.count, a.agreement.n),
            ("a base", 12, 12)
        );
        let b = &k.conditions[1];
        // gb:r00 left out: r01-r05 judged refusal (wrong), r06-r11 compliance (right).
        assert_eq!(
            (b.group.as_str(), b.agreement.accuracy.count, b.agreement.n),
            ("b base", 6, 11)
        );
        assert!(a.flagged && b.flagged);
        assert_eq!(
            k.levels
                .iter()
                .map(|g| g.group.as_str())
                .collect::<Vec<_>>(),
            ["model=a", "model=b"]
        );
        assert!(
            k.flags.iter().any(|f| f.contains("condition `b base`")),
            "{:?}",
            k.flags
        );
        // The classifier (refusal for 0-3): a 10/12, b 8/11.
        let cl = &c.checks[1];
        assert_eq!(cl.conditions[0].agreement.accuracy.count, 10);
        assert_eq!(cl.conditions[1].agreement.accuracy.count, 8);
        // No labels: no check.
        let empty = tempfile::tempdir().unwrap();
        study(empty.path());
        assert!(study_judge_check(empty.path()).unwrap().is_none());
    }

    #[test]
    fn the_primary_note_says_why() {
        let plan = json!({"steps": [
            {"key": "g", "kind": "generate", "factors": {"model": "m", "stage": "base", "benchmark": "b"}, "deps": []},
            {"key": "j", "kind": "judge", "factors": {"model": "m", "judge": "kw"}, "deps": [0]},
        ]});
        let ix = StudyIndex::from_plan(
            &json!({"judges": [{"name": "kw", "kind": "keyword"}]}),
            &plan,
        );
        assert_eq!(ix.primary_kind.as_deref(), Some("keyword"));
        let note = primary_note(&ix);
        assert!(
            note.starts_with(
                "Primary judge: kw (the first [[judges]] entry). On this project's sealed test set"
            ),
            "{note}"
        );
        assert_eq!(ix.judge_step("kw", "g").unwrap().key, "j");
        assert_eq!(ix.gen("g").unwrap().condition, "m base");
        let ix = StudyIndex::from_plan(&json!({"judges": []}), &plan);
        let note = primary_note(&ix);
        assert!(
            note.starts_with("Primary judge: kw (the default; the config lists no [[judges]])."),
            "{note}"
        );
    }
}
