//! Scoring items and preference pairs with any [`RewardModel`] into JSONL, resumably: ids already
//! in the output are skipped, a line that holds no finished row (cut by a kill, or garbage) is
//! moved to `OUT.corrupt` and its row redone, and rows are appended and synced chunk by chunk, so
//! a failure or a kill loses at most the chunk in flight: the rules of the one resumable runner,
//! [`run_resumable`].
//!
//! Item rows: `{"id", "rm", "kind": "item", "score", "label"?, "variant"?, "subset"?}`.
//! Pair rows: `{"id", "rm", "kind": "pair", "chosen", "rejected", "margin", "subset"?,
//! "chosen_safe"?, "rejected_safe"?}`.
//!
//! A score that is not a finite number (a NaN from the model) is written as `null` with
//! `"missing": REASON` naming the reward model and the row: the row is finished (a rerun would
//! get the same answer), and the analysis counts it apart instead of failing on it.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use safetune_data::preference::{looks_like_preference, read_preferences, PreferencePair};
use safetune_data::read::{read_all, ReadOptions};
use safetune_model::job::{run_resumable, JobProgress, ResumeError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::backend::{RewardModel, RmInput};
use super::error::{Result, RmError};

/// One answer to score, with what the analysis needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemInput {
    pub id: String,
    pub input: RmInput,
    /// Good (true) or bad (false), where the data says.
    pub label: Option<bool>,
    pub variant: Option<String>,
    pub subset: Option<String>,
}

/// What a scoring run scores.
#[derive(Debug, Clone)]
pub enum ScoreTask {
    Items(Vec<ItemInput>),
    Pairs(Vec<PreferencePair>),
}

impl ScoreTask {
    pub fn len(&self) -> usize {
        match self {
            ScoreTask::Items(v) => v.len(),
            ScoreTask::Pairs(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn kind(&self) -> &'static str {
        match self {
            ScoreTask::Items(_) => "items",
            ScoreTask::Pairs(_) => "pairs",
        }
    }
}

/// Reads a label written as a boolean, 1/0, or a word (good/bad, safe/unsafe, chosen/rejected,
/// yes/no, true/false).
pub fn parse_label(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Some(true),
            Some(0.0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "good" | "safe" | "chosen" | "yes" | "true" | "1" | "positive" => Some(true),
            "bad" | "unsafe" | "rejected" | "no" | "false" | "0" | "negative" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn first_record(path: &Path) -> Result<Option<Map<String, Value>>> {
    let f = std::fs::File::open(path).map_err(|e| RmError::io(path, e))?;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| RmError::io(path, e))?;
        let t = line.trim().trim_start_matches('\u{feff}');
        if t.is_empty() {
            continue;
        }
        return Ok(serde_json::from_str::<Value>(t)
            .ok()
            .and_then(|v| v.as_object().cloned()));
    }
    Ok(None)
}

/// Reads what to score from `path`: preference pairs when its records have `chosen`/`rejected`
/// or `response_0`/`response_1` (or `pairs` is `Some(true)`), otherwise conversations read with
/// the dataset readers, whose last assistant turn is the item. An item's `label`, `variant` and
/// `subset` come from the record's fields of those names; `variant` may be set for all items.
pub fn load_task(
    path: &Path,
    read: &ReadOptions,
    pairs: Option<bool>,
    variant: Option<&str>,
) -> Result<ScoreTask> {
    let is_pairs = match pairs {
        Some(p) => p,
        None => {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            (ext == "jsonl" || ext == "json")
                && first_record(path)?.is_some_and(|r| looks_like_preference(&r))
        }
    };
    if is_pairs {
        let (pairs, _) = read_preferences(path, None)?;
        return Ok(ScoreTask::Pairs(pairs));
    }
    let (convs, _) = read_all(path, read)?;
    let mut items = Vec::with_capacity(convs.len());
    for (i, c) in convs.into_iter().enumerate() {
        let input = RmInput::from_conversation(&c.messages).ok_or_else(|| {
            RmError::Other(format!(
                "{}: record {} (id {:?}) has no assistant answer to score",
                path.display(),
                i + 1,
                c.id
            ))
        })?;
        let text = |k: &str| c.meta.get(k).and_then(Value::as_str).map(str::to_string);
        items.push(ItemInput {
            id: c.id.clone(),
            label: c.meta.get("label").and_then(parse_label),
            variant: variant.map(str::to_string).or_else(|| text("variant")),
            subset: text("subset"),
            input,
        });
    }
    Ok(ScoreTask::Items(items))
}

/// Progress of a scoring run: the shared runner's ([`run_resumable`]); `completion_tokens` stays 0.
pub type ScoreProgress = JobProgress;

/// Settings of [`run_scoring`].
#[derive(Debug, Clone, Default)]
pub struct ScoreOptions {
    /// Rows per chunk; 0 uses the model's `max_batch()`.
    pub chunk_size: usize,
}

/// Scores every row of `task` whose id is not yet in `out`, appending rows as described in the
/// module docs.
pub fn run_scoring(
    rm: &dyn RewardModel,
    task: &ScoreTask,
    out: &Path,
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(&ScoreProgress),
) -> Result<ScoreProgress> {
    // Rows by index into the task, with their ids.
    let units: Vec<(usize, &str)> = match task {
        ScoreTask::Items(v) => v.iter().map(|i| i.id.as_str()).enumerate().collect(),
        ScoreTask::Pairs(v) => v.iter().map(|p| p.id.as_str()).enumerate().collect(),
    };
    let chunk = if opts.chunk_size == 0 {
        rm.max_batch().max(1)
    } else {
        opts.chunk_size
    };
    let rm_name = rm.name().to_string();
    let mut work = |part: &[&(usize, &str)], prog: &mut ScoreProgress| -> Result<Vec<Value>> {
        let rows: Vec<Value> = match task {
            ScoreTask::Items(items) => {
                let inputs: Vec<RmInput> =
                    part.iter().map(|&&(i, _)| items[i].input.clone()).collect();
                let scores = rm.score(&inputs).map_err(|e| partial(out, prog, e))?;
                check_count(&rm_name, scores.len(), inputs.len())
                    .map_err(|e| partial(out, prog, e))?;
                part.iter()
                    .zip(scores)
                    .map(|(&&(i, _), s)| item_row(&items[i], &rm_name, s))
                    .collect()
            }
            ScoreTask::Pairs(pairs) => {
                let mut inputs = Vec::with_capacity(part.len() * 2);
                for &&(i, _) in part {
                    let p = &pairs[i];
                    for chosen in [true, false] {
                        inputs.push(RmInput {
                            context: p.context.clone(),
                            response: if chosen {
                                p.chosen.clone()
                            } else {
                                p.rejected.clone()
                            },
                        });
                    }
                }
                let scores = rm.score(&inputs).map_err(|e| partial(out, prog, e))?;
                check_count(&rm_name, scores.len(), inputs.len())
                    .map_err(|e| partial(out, prog, e))?;
                part.iter()
                    .enumerate()
                    .map(|(k, &&(i, _))| {
                        pair_row(&pairs[i], &rm_name, scores[2 * k], scores[2 * k + 1])
                    })
                    .collect()
            }
        };
        check_count(&rm_name, rows.len(), part.len()).map_err(|e| partial(out, prog, e))?;
        Ok(rows)
    };
    run_resumable(&units, |u| u.1, out, chunk, &mut work, progress).map_err(|e| match e {
        ResumeError::DuplicateId(id) => RmError::Other(format!(
            "id {id:?} appears twice in the input; ids must be unique for a run to resume"
        )),
        ResumeError::Output(e) => e.into(),
        ResumeError::Work(e) => e,
    })
}

/// A model must give one score per input: a short (or long) answer is an error, never an
/// index out of bounds.
fn check_count(rm: &str, got: usize, sent: usize) -> Result<()> {
    if got == sent {
        return Ok(());
    }
    Err(RmError::Backend(format!(
        "reward model {rm} returned {got} scores for {sent} inputs"
    )))
}

/// Marks a row whose scores are not all finite: `null` scores and the reason.
fn mark_missing(m: &mut Map<String, Value>, rm: &str, id: &str, scores: &[(&str, f64)]) {
    let bad: Vec<String> = scores
        .iter()
        .filter(|(_, s)| !s.is_finite())
        .map(|(what, s)| format!("{what} {s}"))
        .collect();
    if !bad.is_empty() {
        m.insert(
            "missing".into(),
            format!(
                "reward model {rm} returned no finite score for row {id}: {}",
                bad.join(", ")
            )
            .into(),
        );
    }
}

fn partial(out: &Path, prog: &ScoreProgress, e: RmError) -> RmError {
    RmError::Partial {
        path: out.to_path_buf(),
        finished: prog.skipped + prog.done,
        total: prog.total,
        message: e.to_string(),
    }
}

fn item_row(item: &ItemInput, rm: &str, score: f64) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), item.id.clone().into());
    m.insert("rm".into(), rm.into());
    m.insert("kind".into(), "item".into());
    m.insert("score".into(), finite(score));
    mark_missing(&mut m, rm, &item.id, &[("score", score)]);
    if let Some(l) = item.label {
        m.insert("label".into(), l.into());
    }
    if let Some(v) = &item.variant {
        m.insert("variant".into(), v.clone().into());
    }
    if let Some(s) = &item.subset {
        m.insert("subset".into(), s.clone().into());
    }
    Value::Object(m)
}

fn pair_row(p: &PreferencePair, rm: &str, chosen: f64, rejected: f64) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), p.id.clone().into());
    m.insert("rm".into(), rm.into());
    m.insert("kind".into(), "pair".into());
    m.insert("chosen".into(), finite(chosen));
    m.insert("rejected".into(), finite(rejected));
    m.insert("margin".into(), finite(chosen - rejected));
    mark_missing(
        &mut m,
        rm,
        &p.id,
        &[("chosen", chosen), ("rejected", rejected)],
    );
    if let Some(s) = &p.subset {
        m.insert("subset".into(), s.clone().into());
    }
    if let Some(b) = p.chosen_safe {
        m.insert("chosen_safe".into(), b.into());
    }
    if let Some(b) = p.rejected_safe {
        m.insert("rejected_safe".into(), b.into());
    }
    Value::Object(m)
}

fn finite(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A scored item as read back for analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemScore {
    pub id: String,
    pub score: f64,
    pub label: Option<bool>,
    pub variant: Option<String>,
    pub subset: Option<String>,
}

/// A scored pair as read back for analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairScore {
    pub id: String,
    pub chosen: f64,
    pub rejected: f64,
    pub subset: Option<String>,
}

/// A scores file: the rows one RM produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreFile {
    pub path: PathBuf,
    /// The `rm` of the rows (the file name when absent).
    pub rm: String,
    pub items: Vec<ItemScore>,
    pub pairs: Vec<PairScore>,
    /// Rows written without a finite score: `(id, reason)`.
    pub missing: Vec<(String, String)>,
}

/// Reads a scores file written by [`run_scoring`] (or by hand: rows with `id` and `score`, or
/// `id`, `chosen` and `rejected`). Errors name the file, line and field.
pub fn read_scores(path: &Path) -> Result<ScoreFile> {
    let rows = safetune_data::read::read_json_lines(path)?;
    let mut f = ScoreFile {
        path: path.to_path_buf(),
        ..Default::default()
    };
    for (line, row) in rows {
        let err = |field: &str, msg: &str| RmError::input(path, line, Some(field), msg);
        let id = match row.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(err("id", "missing")),
        };
        if f.rm.is_empty() {
            if let Some(r) = row.get("rm").and_then(Value::as_str) {
                f.rm = r.to_string();
            }
        }
        let num = |field: &str| -> Result<f64> {
            match row.get(field) {
                Some(Value::Number(n)) => n.as_f64().ok_or_else(|| err(field, "not a number")),
                Some(_) => Err(err(field, "expected a number")),
                None => Err(err(field, "missing")),
            }
        };
        let text = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(reason) = text("missing") {
            f.missing.push((id, reason));
            continue;
        }
        if row.contains_key("score") {
            f.items.push(ItemScore {
                id,
                score: num("score")?,
                label: row.get("label").and_then(parse_label),
                variant: text("variant"),
                subset: text("subset"),
            });
        } else if row.contains_key("chosen") || row.contains_key("rejected") {
            f.pairs.push(PairScore {
                id,
                chosen: num("chosen")?,
                rejected: num("rejected")?,
                subset: text("subset"),
            });
        } else {
            return Err(err(
                "score",
                "missing (an item row needs `score`; a pair row `chosen` and `rejected`)",
            ));
        }
    }
    if f.rm.is_empty() {
        f.rm = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each answer by its length, but drops the last score of every call when `short`.
    struct Lengths {
        short: bool,
    }

    impl RewardModel for Lengths {
        fn name(&self) -> &str {
            "len"
        }
        fn max_batch(&self) -> usize {
            2
        }
        fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
            let mut v: Vec<f64> = inputs.iter().map(|i| i.response.len() as f64).collect();
            if self.short {
                v.pop();
            }
            Ok(v)
        }
    }

    fn pairs() -> ScoreTask {
        ScoreTask::Pairs(
            ["p1", "p2", "p3"]
                .iter()
                .map(|id| PreferencePair {
                    id: id.to_string(),
                    line: 0,
                    context: vec![safetune_data::Message::user("q")],
                    chosen: format!("long answer {id}"),
                    rejected: "no".into(),
                    subset: None,
                    chosen_safe: None,
                    rejected_safe: None,
                    meta: Map::new(),
                })
                .collect(),
        )
    }

    /// A reward model that returns too few scores for a chunk of pairs is an error that keeps
    /// the finished rows (it used to index past the scores and panic).
    #[test]
    fn short_scores_for_pairs_are_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.jsonl");
        let task = pairs();
        let e = run_scoring(
            &Lengths { short: true },
            &task,
            &out,
            &ScoreOptions::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("returned 3 scores for 4 inputs"), "{e}");
        assert!(e.contains("0 of 3 rows finished"), "{e}");
        let p = run_scoring(
            &Lengths { short: false },
            &task,
            &out,
            &ScoreOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((p.total, p.skipped, p.done), (3, 0, 3));
        let f = read_scores(&out).unwrap();
        assert_eq!(f.pairs.len(), 3);
        assert_eq!((f.pairs[0].chosen, f.pairs[0].rejected), (14.0, 2.0));
    }
}
