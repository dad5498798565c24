//! `safetune judge`: a JSONL file of (prompt, response) rows through a judge into a JSONL file of
//! judgments, resumable through the one runner ([`run_resumable`]): ids already in the output are
//! skipped, a line that holds no finished row is moved to `OUT.corrupt` and its row judged again,
//! and rows are appended, flushed and synced batch by batch.

use std::io::{BufRead, BufReader};
use std::path::Path;

use safetune_data::util::json_object_line;
use safetune_model::job::{run_resumable, JobProgress, ResumeError};
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

use crate::error::{EvalError, Result};
use crate::judge::{Judge, JudgeInput, Judgment, ParseStatus};

/// One input row: `prompt` and `response` strings, an id (`id` field or the line number), and
/// every other field, passed through.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeRow {
    pub id: String,
    pub input: JudgeInput,
    pub fields: Map<String, Json>,
}

pub fn read_judge_rows(path: &Path) -> Result<Vec<JudgeRow>> {
    let f = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| EvalError::io(path, e))?;
        let lineno = n + 1;
        let obj: Map<String, Json> = match json_object_line(&line) {
            None => continue,
            Some(Ok(o)) => o,
            Some(Err(e)) => return Err(EvalError::record(path, lineno, e.to_string())),
        };
        let text = |k: &str| -> Result<String> {
            match obj.get(k) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(_) => Err(EvalError::record(
                    path,
                    lineno,
                    format!("`{k}` must be a string"),
                )),
                None => Err(EvalError::record(
                    path,
                    lineno,
                    format!("missing `{k}` (rows need `prompt` and `response`)"),
                )),
            }
        };
        let input = JudgeInput::new(text("prompt")?, text("response")?);
        let id = match obj.get("id") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(x)) => x.to_string(),
            Some(_) => {
                return Err(EvalError::record(
                    path,
                    lineno,
                    "`id` must be a string or number",
                ))
            }
            None => lineno.to_string(),
        };
        if !seen.insert(id.clone()) {
            return Err(EvalError::record(
                path,
                lineno,
                format!("duplicate id {id:?}"),
            ));
        }
        rows.push(JudgeRow {
            id,
            input,
            fields: obj,
        });
    }
    Ok(rows)
}

/// Counts over a judgments file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JudgeSummary {
    pub rows: usize,
    pub refusal: usize,
    pub compliance: usize,
    pub unparseable: usize,
    /// Rows judged by this run (the rest were already in the output).
    pub judged_now: usize,
    pub elapsed_s: f64,
}

/// The output row: the input's fields, then `id`, `judge`, `verdict`, `score`, `score_kind`,
/// `raw`, `parse` (`ok` | `unparseable`), `parse_error` and `categories`.
pub fn judgment_row(row: &JudgeRow, judge: &dyn Judge, j: &Judgment) -> Json {
    let mut o = row.fields.clone();
    o.insert("id".into(), json!(row.id));
    o.insert("judge".into(), json!(judge.name()));
    o.insert("verdict".into(), json!(j.verdict.map(|v| v.as_str())));
    o.insert("score".into(), json!(j.score));
    o.insert("score_kind".into(), json!(judge.score_kind()));
    o.insert("raw".into(), json!(j.raw));
    match &j.parse {
        ParseStatus::Ok => {
            o.insert("parse".into(), json!("ok"));
        }
        ParseStatus::Unparseable(reason) => {
            o.insert("parse".into(), json!("unparseable"));
            o.insert("parse_error".into(), json!(reason));
        }
    }
    if !j.categories.is_empty() {
        o.insert("categories".into(), json!(j.categories));
    }
    Json::Object(o)
}

/// Judges every row whose id is not yet in `out`.
pub fn judge_rows(
    judge: &dyn Judge,
    rows: &[JudgeRow],
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<JudgeSummary> {
    let start = std::time::Instant::now();
    let total = rows.len();
    let mut work = |chunk: &[&JudgeRow], prog: &mut JobProgress| -> Result<Vec<Json>> {
        let inputs: Vec<JudgeInput> = chunk.iter().map(|r| r.input.clone()).collect();
        let js = judge.judge(&inputs).map_err(|e| {
            EvalError::Other(format!(
                "{e}\nhint: {} of {total} rows are judged and kept in {}; rerun to resume",
                prog.finished(),
                out.display()
            ))
        })?;
        if js.len() != inputs.len() {
            return Err(EvalError::Other(format!(
                "judge returned {} judgments for {} inputs",
                js.len(),
                inputs.len()
            )));
        }
        Ok(chunk
            .iter()
            .zip(&js)
            .map(|(r, j)| judgment_row(r, judge, j))
            .collect())
    };
    let prog = run_resumable(
        rows,
        |r| r.id.as_str(),
        out,
        judge.batch_size(),
        &mut work,
        &mut |p| progress(p.finished(), p.total),
    )
    .map_err(|e| match e {
        ResumeError::DuplicateId(id) => {
            EvalError::Other(format!("{}: duplicate input id {id:?}", out.display()))
        }
        ResumeError::Output(e) => e.into(),
        ResumeError::Work(e) => e,
    })?;
    let mut s = summarize_judgments(out)?;
    s.judged_now = prog.done;
    s.elapsed_s = start.elapsed().as_secs_f64();
    Ok(s)
}

/// Reads a judgments file (rows with `verdict`, `parse`).
pub fn read_judgments(path: &Path) -> Result<Vec<Map<String, Json>>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match json_object_line(line) {
            None => {}
            Some(Ok(o)) => rows.push(o),
            Some(Err(_)) => return Err(EvalError::record(path, n + 1, "not a JSON object")),
        }
    }
    Ok(rows)
}

pub fn summarize_judgments(path: &Path) -> Result<JudgeSummary> {
    let rows = read_judgments(path)?;
    let mut s = JudgeSummary {
        rows: rows.len(),
        ..Default::default()
    };
    for r in &rows {
        match r.get("verdict").and_then(|v| v.as_str()) {
            Some("refusal") => s.refusal += 1,
            Some("compliance") => s.compliance += 1,
            _ => s.unparseable += 1,
        }
    }
    Ok(s)
}
