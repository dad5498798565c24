//! `safetune results DIR`: every answer of a study as one table row, for pandas, R or a
//! spreadsheet, written as CSV, JSON Lines or Parquet; and the same rows for `safetune view`.
//!
//! One row per answer (a `generations` row): its condition and factor levels, seed, benchmark,
//! category, prompt id, prompt and answer, each judge's verdict (`judge_NAME`: refusal,
//! compliance, unscored; empty where that judge has not judged it yet), each reward model's score
//! (`rm_NAME`) and the human label (`human_label`: the labellers' common label; `mixed` when
//! they gave both refusal and compliance).
//!
//! The store is opened read-only, so an export works while the study runs; answers of steps
//! still running are exported as far as they are written.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::labels::{open_study, LabelError, StudyIndex};
use crate::parquet::{self, ColumnData, ParquetColumn};
use crate::runner::StoredPlan;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown format `{0}`; expected csv, jsonl or parquet")]
    Format(String),
}

/// One answer of a study with everything the store says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// `<generate step key>:<row id>`, as in labelling files.
    pub answer_id: String,
    pub step_key: String,
    pub row_id: String,
    pub condition: String,
    /// Condition factor levels (model, stage, variant, ...; seed included).
    pub factors: BTreeMap<String, String>,
    pub benchmark: String,
    pub category: String,
    pub prompt: String,
    pub response: String,
    pub finish_reason: String,
    pub completion_tokens: i64,
    /// Verdict per judge, in [`Answers::judges`] order; `None` where not judged (yet).
    pub verdicts: Vec<Option<String>>,
    /// Score per reward model, in [`Answers::rms`] order.
    pub scores: Vec<Option<f64>>,
    /// The labellers' common label (`mixed` when refusal and compliance were both given).
    pub human_label: Option<String>,
    /// Who labelled it, sorted.
    pub labellers: Vec<String>,
}

impl Answer {
    /// The seed factor as a number, when the condition has one.
    pub fn seed(&self) -> Option<i64> {
        self.factors.get("seed").and_then(|s| s.parse().ok())
    }

    /// True when two judges gave opposite verdicts (refusal and compliance).
    pub fn judges_disagree(&self) -> bool {
        let has = |w: &str| self.verdicts.iter().any(|v| v.as_deref() == Some(w));
        has("refusal") && has("compliance")
    }
}

/// Every answer of a study, in plan order of the generate steps and row-id order within each.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    /// Judge names, primary first.
    pub judges: Vec<String>,
    /// Reward model names, in plan order.
    pub rms: Vec<String>,
    /// Condition factor names present in any condition, sorted (seed included).
    pub factor_names: Vec<String>,
    /// Condition names in plan order.
    pub conditions: Vec<String>,
    /// Benchmarks in plan order.
    pub benchmarks: Vec<String>,
    pub rows: Vec<Answer>,
}

/// Reads every answer of the study in `store` (see the module docs).
pub fn answers(store: &Store) -> Result<Answers, ResultsError> {
    let ix = StudyIndex::load(store)?;
    let plan = store
        .latest_study()?
        .map(|(_, _, _, p)| StoredPlan::from_json(&p))
        .unwrap_or_default();
    // rm name -> [(score step key, gen key)]
    let mut rm_steps: Vec<(String, String, String)> = Vec::new();
    let mut rms: Vec<String> = Vec::new();
    for s in plan.steps.iter().filter(|s| s.kind == "score") {
        let rm = s.factors.get("rm").cloned().unwrap_or_default();
        if !rms.contains(&rm) {
            rms.push(rm.clone());
        }
        rm_steps.push((rm, s.key.clone(), plan.first_input_key(s)));
    }
    // (gen key, row id) -> labels
    let mut labels: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
    for l in store.human_labels()? {
        labels
            .entry((l.step_key, l.row_id))
            .or_default()
            .push((l.labeller, l.label));
    }
    let mut out = Answers {
        judges: ix.judge_order.clone(),
        rms,
        ..Answers::default()
    };
    let mut factor_names = BTreeSet::new();
    for g in &ix.gens {
        factor_names.extend(g.factors.keys().cloned());
        if !out.conditions.contains(&g.condition) {
            out.conditions.push(g.condition.clone());
        }
        if !out.benchmarks.contains(&g.benchmark) {
            out.benchmarks.push(g.benchmark.clone());
        }
        let mut verdicts: Vec<BTreeMap<String, String>> = Vec::new();
        for judge in &out.judges {
            verdicts.push(match ix.judge_step(judge, &g.key) {
                Some(j) => store
                    .judgments(&j.key)?
                    .into_iter()
                    .map(|r| (r.row_id, r.verdict))
                    .collect(),
                None => BTreeMap::new(),
            });
        }
        let mut scores: Vec<BTreeMap<String, f64>> = Vec::new();
        for rm in &out.rms {
            let mut m = BTreeMap::new();
            for (_, key, _) in rm_steps.iter().filter(|(r, _, gk)| r == rm && *gk == g.key) {
                m.extend(store.scores(key)?.into_iter().map(|s| (s.row_id, s.score)));
            }
            scores.push(m);
        }
        for row in store.generations(&g.key)? {
            let category = match &row.meta["category"] {
                Json::String(s) => s.clone(),
                Json::Null => String::new(),
                other => other.to_string(),
            };
            let (human_label, labellers) = match labels.get(&(g.key.clone(), row.row_id.clone())) {
                Some(ls) => combine_labels(ls),
                None => (None, Vec::new()),
            };
            out.rows.push(Answer {
                answer_id: format!("{}:{}", g.key, row.row_id),
                step_key: g.key.clone(),
                verdicts: verdicts
                    .iter()
                    .map(|v| v.get(&row.row_id).cloned())
                    .collect(),
                scores: scores.iter().map(|s| s.get(&row.row_id).copied()).collect(),
                row_id: row.row_id,
                condition: g.condition.clone(),
                factors: g.factors.clone(),
                benchmark: g.benchmark.clone(),
                category,
                prompt: row.prompt,
                response: row.response,
                finish_reason: row.finish_reason,
                completion_tokens: row.completion_tokens,
                human_label,
                labellers,
            });
        }
    }
    out.factor_names = factor_names.into_iter().collect();
    Ok(out)
}

/// The common label of several labellers' labels: the one label all gave, `unclear` when only
/// unclear was given, else refusal or compliance when the others are unclear, `mixed` when
/// refusal and compliance were both given.
fn combine_labels(ls: &[(String, String)]) -> (Option<String>, Vec<String>) {
    let mut labellers: Vec<String> = ls.iter().map(|(who, _)| who.clone()).collect();
    labellers.sort();
    labellers.dedup();
    let has = |w: &str| ls.iter().any(|(_, l)| l == w);
    let label = match (has("refusal"), has("compliance")) {
        (true, true) => "mixed",
        (true, false) => "refusal",
        (false, true) => "compliance",
        (false, false) => "unclear",
    };
    (Some(label.to_string()), labellers)
}

/// An export format of `safetune results`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, ResultsError> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "parquet" => Ok(Format::Parquet),
            other => Err(ResultsError::Format(other.to_string())),
        }
    }

    /// The format an output file's extension names, if any.
    pub fn from_path(p: &Path) -> Option<Format> {
        let ext = p.extension()?.to_str()?;
        Format::parse(ext).ok()
    }
}

/// A cell of the export table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
}

/// The export table: named, typed columns (see [`table`]).
#[derive(Debug, Clone)]
pub struct Table {
    pub columns: Vec<ParquetColumn>,
    pub rows: usize,
}

fn str_col(name: &str, required: bool, values: Vec<Option<String>>) -> ParquetColumn {
    ParquetColumn {
        name: name.to_string(),
        required,
        data: ColumnData::Str(values),
    }
}

/// The answers as export columns, in this order: `answer_id`, `condition`, one column per
/// condition factor except seed (sorted), `seed`, `benchmark`, `category`, `prompt_id`,
/// `prompt`, `answer`, `finish_reason`, `completion_tokens`, `judge_NAME` per judge,
/// `judges_disagree` (0 or 1), `rm_NAME` per reward model, `human_label`, `human_labellers`.
pub fn table(a: &Answers) -> Table {
    let col = |f: &dyn Fn(&Answer) -> String| -> Vec<Option<String>> {
        a.rows.iter().map(|r| Some(f(r))).collect()
    };
    let mut columns = vec![
        str_col("answer_id", true, col(&|r| r.answer_id.clone())),
        str_col("condition", true, col(&|r| r.condition.clone())),
    ];
    for f in a.factor_names.iter().filter(|f| *f != "seed") {
        let values = a.rows.iter().map(|r| r.factors.get(f).cloned()).collect();
        columns.push(str_col(f, false, values));
    }
    columns.push(ParquetColumn {
        name: "seed".into(),
        required: false,
        data: ColumnData::Int(a.rows.iter().map(Answer::seed).collect()),
    });
    columns.push(str_col("benchmark", true, col(&|r| r.benchmark.clone())));
    columns.push(str_col("category", true, col(&|r| r.category.clone())));
    columns.push(str_col("prompt_id", true, col(&|r| r.row_id.clone())));
    columns.push(str_col("prompt", true, col(&|r| r.prompt.clone())));
    columns.push(str_col("answer", true, col(&|r| r.response.clone())));
    columns.push(str_col(
        "finish_reason",
        true,
        col(&|r| r.finish_reason.clone()),
    ));
    columns.push(ParquetColumn {
        name: "completion_tokens".into(),
        required: true,
        data: ColumnData::Int(a.rows.iter().map(|r| Some(r.completion_tokens)).collect()),
    });
    for (i, j) in a.judges.iter().enumerate() {
        let values = a.rows.iter().map(|r| r.verdicts[i].clone()).collect();
        columns.push(str_col(&format!("judge_{j}"), false, values));
    }
    columns.push(ParquetColumn {
        name: "judges_disagree".into(),
        required: true,
        data: ColumnData::Int(
            a.rows
                .iter()
                .map(|r| Some(i64::from(r.judges_disagree())))
                .collect(),
        ),
    });
    for (i, m) in a.rms.iter().enumerate() {
        columns.push(ParquetColumn {
            name: format!("rm_{m}"),
            required: false,
            data: ColumnData::Float(a.rows.iter().map(|r| r.scores[i]).collect()),
        });
    }
    columns.push(str_col(
        "human_label",
        false,
        a.rows.iter().map(|r| r.human_label.clone()).collect(),
    ));
    columns.push(str_col(
        "human_labellers",
        false,
        a.rows
            .iter()
            .map(|r| (!r.labellers.is_empty()).then(|| r.labellers.join(",")))
            .collect(),
    ));
    Table {
        columns,
        rows: a.rows.len(),
    }
}

impl Table {
    fn cell(&self, col: usize, row: usize) -> Cell {
        match &self.columns[col].data {
            ColumnData::Str(v) => v[row].clone().map_or(Cell::Null, Cell::Str),
            ColumnData::Int(v) => v[row].map_or(Cell::Null, Cell::Int),
            ColumnData::Float(v) => v[row].map_or(Cell::Null, Cell::Float),
        }
    }

    /// CSV (RFC 4180: every field quoted when it holds a comma, quote, CR or LF; a header row;
    /// null as an empty field).
    pub fn to_csv(&self) -> Vec<u8> {
        let mut out = String::new();
        let header: Vec<String> = self.columns.iter().map(|c| csv_field(&c.name)).collect();
        out.push_str(&header.join(","));
        out.push_str("\r\n");
        for r in 0..self.rows {
            for c in 0..self.columns.len() {
                if c > 0 {
                    out.push(',');
                }
                match self.cell(c, r) {
                    Cell::Null => {}
                    Cell::Str(s) => out.push_str(&csv_field(&s)),
                    Cell::Int(i) => out.push_str(&i.to_string()),
                    Cell::Float(f) => out.push_str(&float_text(f)),
                }
            }
            out.push_str("\r\n");
        }
        out.into_bytes()
    }

    /// One JSON object a line, keys in column order, null where a value is missing.
    pub fn to_jsonl(&self) -> Vec<u8> {
        let mut out = String::new();
        for r in 0..self.rows {
            out.push('{');
            for (c, col) in self.columns.iter().enumerate() {
                if c > 0 {
                    out.push(',');
                }
                let v = match self.cell(c, r) {
                    Cell::Null => Json::Null,
                    Cell::Str(s) => Json::String(s),
                    Cell::Int(i) => Json::from(i),
                    Cell::Float(f) => {
                        serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)
                    }
                };
                out.push_str(&Json::String(col.name.clone()).to_string());
                out.push(':');
                out.push_str(&v.to_string());
            }
            out.push_str("}\n");
        }
        out.into_bytes()
    }

    /// A Parquet file (see [`crate::parquet`]).
    pub fn to_parquet(&self) -> Vec<u8> {
        parquet::write(&self.columns, self.rows)
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Csv => self.to_csv(),
            Format::Jsonl => self.to_jsonl(),
            Format::Parquet => self.to_parquet(),
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn float_text(f: f64) -> String {
    if f.is_finite() {
        format!("{f}")
    } else {
        String::new()
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub rows: usize,
    pub columns: usize,
    pub bytes: usize,
}

/// Writes every answer of the study in `dir` to `out` (or to `sink` when `out` is `None`),
/// through a temporary file and a rename.
pub fn export(
    dir: &Path,
    format: Format,
    out: Option<&Path>,
    sink: &mut dyn Write,
) -> Result<ExportSummary, ResultsError> {
    let store = open_study(dir)?;
    let t = table(&answers(&store)?);
    let bytes = t.encode(format);
    match out {
        Some(path) => {
            safetune_data::util::write_atomic(path, &bytes).map_err(|e| ResultsError::Io {
                path: path.to_path_buf(),
                source: e,
            })?
        }
        None => sink.write_all(&bytes).map_err(|e| ResultsError::Io {
            path: PathBuf::from("<stdout>"),
            source: e,
        })?,
    }
    Ok(ExportSummary {
        rows: t.rows,
        columns: t.columns.len(),
        bytes: bytes.len(),
    })
}
