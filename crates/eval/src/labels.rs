//! Human-labelled refusal data for judge validation, in two layouts:
//!
//! - PyRIT's `refusal.csv` and `refusal_extra.csv` (columns `objective`, `assistant_response`,
//!   `human_score` with 1 = refusal; `#` comment lines before the header). Their misses were
//!   read to choose the classifier's rules, so they are **dev** data now (ARCHITECTURE.md
//!   section 9): kept as regression floors, nothing is fitted on them.
//! - A labelling JSONL: rows with `prompt`, `response` and `label` (`refusal`, `compliance` or
//!   `unclear`; `unclear` rows are left out and counted, an empty label is a row nobody labelled
//!   yet, also counted), optionally `id` (or `answer_id`) and `identity` (true when the response
//!   carries an identity statement). `safetune label` writes this layout, and this project's
//!   labelled set `data/judge_labels.jsonl` (`demo:judge-labels`) uses it.
//!
//! Roles of this project's labelled sets:
//! - `data/judge_labels.jsonl` is split by a seeded hash of each row's `id`
//!   ([`safetune_data::prompts::split_of`] with [`JUDGE_LABELS_SPLIT_SEED`] and
//!   [`JUDGE_LABELS_TEST_FRACTION`]): `judge-labels:train` is what heads, thresholds and rules
//!   may be fitted on; `judge-labels:dev` (the other part) was the test set until its figure was
//!   reported once (2026-12-04), and its misses have since been read to choose features, so it
//!   is dev data now.
//! - `data/judge_test.jsonl` (`judge-labels:test`, written later by a different writer) was the
//!   sealed test set; its figure was reported twice (2026-12-05), then its misses were read to
//!   check that afternoon's rules, so it is dev data now.
//! - `data/judge_dev2.jsonl` (`judge-labels:dev2`, a third writer, 2026-12-05): dev data, its
//!   misses read to choose the rules of that day.
//! - `data/judge_test2.jsonl` (`judge-labels:test2`, a fourth writer under the same brief as
//!   dev2, never read row by row): a test set, its figure reported twice (before and after the
//!   rules chosen on dev3).
//! - `data/judge_dev3.jsonl` (`judge-labels:dev3`, a fifth writer, 2026-12-05 afternoon): dev
//!   data, its misses read to choose that afternoon's rules.
//! - `data/judge_test3.jsonl` (`judge-labels:test3`, a sixth writer under dev2's brief, never
//!   read): the sealed test set, the figure to report.

use std::path::{Path, PathBuf};

use safetune_data::prompts::{split_of, Split};
use serde_json::Value as Json;

use crate::error::{EvalError, Result};
use crate::judge::JudgeInput;

/// Seed of the train/test split of `data/judge_labels.jsonl`.
pub const JUDGE_LABELS_SPLIT_SEED: u64 = 20261204;
/// Share of `data/judge_labels.jsonl` held out as the test part.
pub const JUDGE_LABELS_TEST_FRACTION: f64 = 0.4;

/// Where `judge-labels` errors point.
const JUDGE_LABELS_FILE: &str = "data/judge_labels.jsonl";
/// Where `judge-labels:test` errors point.
const JUDGE_TEST_FILE: &str = "data/judge_test.jsonl";
/// Where `judge-labels:dev2` errors point.
const JUDGE_DEV2_FILE: &str = "data/judge_dev2.jsonl";
/// Where `judge-labels:test2` errors point.
const JUDGE_TEST2_FILE: &str = "data/judge_test2.jsonl";
/// Where `judge-labels:dev3` errors point.
const JUDGE_DEV3_FILE: &str = "data/judge_dev3.jsonl";
/// Where `judge-labels:test3` errors point.
const JUDGE_TEST3_FILE: &str = "data/judge_test3.jsonl";

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledResponse {
    /// 1-based line of the record's start in the file.
    pub line: usize,
    pub input: JudgeInput,
    /// The human label: true = refusal.
    pub refusal: bool,
    /// The row's `id` (or `answer_id`), where it has one.
    pub id: Option<String>,
    /// Whether the response carries an identity statement ("As an AI assistant, ..."), where the
    /// row says.
    pub identity: Option<bool>,
}

/// A labelled set as read: the usable rows and what was left out.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    /// The spec it was loaded from (`refusal`, `judge-labels:test`, a path).
    pub name: String,
    /// The file (or, for the embedded set, the file it was built from).
    pub path: PathBuf,
    pub rows: Vec<LabelledResponse>,
    /// Rows labelled `unclear` (left out).
    pub unclear: usize,
    /// Rows with an empty label (not labelled yet; left out).
    pub unlabelled: usize,
    /// The set's role for this project (train, dev or test: ARCHITECTURE.md section 9), where
    /// known.
    pub role: Option<&'static str>,
}

/// The role a named label set plays: `judge-labels:test` is test data, `judge-labels:train`
/// train data, PyRIT's two files dev data (regression floors). `None` for other files.
pub fn label_role(spec: &str) -> Option<&'static str> {
    match spec {
        "judge-labels:test3" | "judge-test3" | "demo:judge-test3" => Some("test"),
        "judge-labels:test2" | "judge-test2" | "demo:judge-test2" => {
            Some("test (reported twice: before and after the rules chosen on dev3)")
        }
        "judge-labels:test" | "judge-test" | "demo:judge-test" => {
            Some("dev (a test set until 2026-12-05; its misses were then read)")
        }
        "judge-labels:dev" | "judge-labels:dev2" | "judge-dev2" | "demo:judge-dev2"
        | "judge-labels:dev3" | "judge-dev3" | "demo:judge-dev3" => Some("dev"),
        "judge-labels:train" => Some("train"),
        "judge-labels" | "demo:judge-labels" => Some("train and dev together (not a test figure)"),
        "refusal" | "pyrit" | "refusal_extra" | "refusal-extra" => Some("dev (regression floor)"),
        _ => None,
    }
}

/// `refusal` / `refusal_extra` name the asset files; anything else is a path.
pub fn resolve_labels(spec: &str) -> Result<PathBuf> {
    match spec {
        "refusal" | "pyrit" => Ok(safetune_data::assets::asset("refusal/refusal.csv")?),
        "refusal_extra" | "refusal-extra" => {
            Ok(safetune_data::assets::asset("refusal/refusal_extra.csv")?)
        }
        p => Ok(PathBuf::from(p)),
    }
}

/// Loads a label set by spec: `judge-labels:test` (the sealed `data/judge_test.jsonl`),
/// `judge-labels`, `judge-labels:dev`, `judge-labels:train` (`data/judge_labels.jsonl`, all
/// of it or one side of its split), `refusal`, `refusal_extra` (PyRIT's files from the asset
/// cache) or a CSV/JSONL path; the embedded sets are also named `demo:NAME`. An empty set is
/// returned as it is; the caller decides whether that is an error.
pub fn load_labels(spec: &str) -> Result<LabelSet> {
    // (embedded demo set, the file it was built from, the side of the split kept)
    let embedded = match spec {
        "judge-labels:test" | "judge-test" | "demo:judge-test" => {
            Some(("judge-test", JUDGE_TEST_FILE, None))
        }
        "judge-labels:test2" | "judge-test2" | "demo:judge-test2" => {
            Some(("judge-test2", JUDGE_TEST2_FILE, None))
        }
        "judge-labels:dev2" | "judge-dev2" | "demo:judge-dev2" => {
            Some(("judge-dev2", JUDGE_DEV2_FILE, None))
        }
        "judge-labels:dev3" | "judge-dev3" | "demo:judge-dev3" => {
            Some(("judge-dev3", JUDGE_DEV3_FILE, None))
        }
        "judge-labels:test3" | "judge-test3" | "demo:judge-test3" => {
            Some(("judge-test3", JUDGE_TEST3_FILE, None))
        }
        "judge-labels" | "demo:judge-labels" => Some(("judge-labels", JUDGE_LABELS_FILE, None)),
        "judge-labels:dev" => Some(("judge-labels", JUDGE_LABELS_FILE, Some(Split::Test))),
        "judge-labels:train" => Some(("judge-labels", JUDGE_LABELS_FILE, Some(Split::Train))),
        _ => None,
    };
    let mut set = match embedded {
        Some((demo, file, part)) => {
            let mut set = embedded_set(demo, file)?;
            if let Some(part) = part {
                set.rows = split_part(set.rows, part);
            }
            set
        }
        None => read_label_set(&resolve_labels(spec)?)?,
    };
    set.name = spec.to_string();
    set.role = label_role(spec);
    Ok(set)
}

/// This project's labelled set, all rows (unclear rows left out).
pub fn judge_labels_all() -> Result<Vec<LabelledResponse>> {
    Ok(embedded_set("judge-labels", JUDGE_LABELS_FILE)?.rows)
}

/// One part of `data/judge_labels.jsonl`: [`Split::Train`] (fit on it) or [`Split::Test`]
/// (`judge-labels:dev`: held out from fitting, read to choose designs). Unclear rows are left out.
pub fn judge_labels_part(part: Split) -> Result<Vec<LabelledResponse>> {
    Ok(split_part(judge_labels_all()?, part))
}

/// The rows of `rows` on one side of the judge-labels split (rows without an id on neither).
pub fn split_part(rows: Vec<LabelledResponse>, part: Split) -> Vec<LabelledResponse> {
    rows.into_iter()
        .filter(|r| {
            r.id.as_deref()
                .map(|id| split_of(id, JUDGE_LABELS_SPLIT_SEED, JUDGE_LABELS_TEST_FRACTION))
                == Some(part)
        })
        .collect()
}

/// A labelled set built into the binary as the demo set `demo` (from `file`), every row with
/// an id.
fn embedded_set(demo: &str, file: &str) -> Result<LabelSet> {
    let path = Path::new(file);
    let text = safetune_data::demo::demo_text(demo).ok_or_else(|| {
        EvalError::file(
            path,
            format!("not built into this safetune (the demo set `{demo}` is missing)"),
        )
    })?;
    parse_judge_labels(path, text)
}

/// Parses text in the layout of `data/judge_labels.jsonl`: a labelling JSONL whose every row
/// has an `id`.
pub fn parse_judge_labels(path: &Path, text: &str) -> Result<LabelSet> {
    let set = parse_jsonl_labels(path, text)?;
    // Every row needs an id: the split is a hash of it.
    if let Some(r) = set.rows.iter().find(|r| r.id.is_none()) {
        return Err(EvalError::record(
            path,
            r.line,
            "field `id`: missing (the train/test split is a hash of the id)",
        ));
    }
    Ok(set)
}

/// Whether `path` holds JSONL rather than CSV: by extension, else by the first character that
/// is not blank or part of a `#` comment line.
fn is_jsonl(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "json" | "ndjson") => return true,
        Some("csv") => return false,
        _ => {}
    }
    text.lines()
        .map(str::trim_start)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with('{'))
}

/// Reads a labelled CSV or JSONL file (see the module docs); unclear and unlabelled rows left
/// out. An error when no labelled row remains.
pub fn read_labels(path: &Path) -> Result<Vec<LabelledResponse>> {
    let set = read_label_set(path)?;
    if set.rows.is_empty() {
        return Err(EvalError::file(path, "no labelled rows"));
    }
    Ok(set.rows)
}

/// Reads a labelled CSV or JSONL file into a [`LabelSet`] (possibly empty).
pub fn read_label_set(path: &Path) -> Result<LabelSet> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    if is_jsonl(path, &text) {
        parse_jsonl_labels(path, &text)
    } else {
        let rows = parse_csv_labels(path, &text)?;
        Ok(LabelSet {
            name: path.display().to_string(),
            path: path.to_path_buf(),
            rows,
            unclear: 0,
            unlabelled: 0,
            role: None,
        })
    }
}

/// Parses a labelling JSONL text; `path` names it in errors.
pub fn parse_jsonl_labels(path: &Path, text: &str) -> Result<LabelSet> {
    let mut set = LabelSet {
        name: path.display().to_string(),
        path: path.to_path_buf(),
        rows: Vec::new(),
        unclear: 0,
        unlabelled: 0,
        role: None,
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| EvalError::record(path, n, msg);
        let row: Json =
            serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let Some(obj) = row.as_object() else {
            return Err(bad("not a JSON object".into()));
        };
        let text_field = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!(
                    "field `{name}`: expected a string, got {}",
                    kind_of(other)
                ))),
                None => Err(bad(format!("field `{name}`: missing"))),
            }
        };
        let label = match obj.get("label") {
            Some(Json::String(s)) => s.trim().to_ascii_lowercase(),
            Some(Json::Null) => String::new(),
            Some(other) => {
                return Err(bad(format!(
                    "field `label`: expected refusal, compliance or unclear, got {}",
                    kind_of(other)
                )))
            }
            None => return Err(bad("field `label`: missing".into())),
        };
        let refusal = match label.as_str() {
            "refusal" => true,
            "compliance" => false,
            "unclear" => {
                set.unclear += 1;
                continue;
            }
            "" => {
                set.unlabelled += 1;
                continue;
            }
            other => {
                return Err(bad(format!(
                    "field `label`: expected refusal, compliance or unclear, got {other:?}"
                )))
            }
        };
        let prompt = text_field("prompt")?;
        let response = text_field("response")?;
        let identity = match obj.get("identity") {
            None | Some(Json::Null) => None,
            Some(Json::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(bad(format!(
                    "field `identity`: expected true or false, got {}",
                    kind_of(other)
                )))
            }
        };
        let id = match obj.get("id").or_else(|| obj.get("answer_id")) {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Number(x)) => Some(x.to_string()),
            Some(other) => {
                return Err(bad(format!(
                    "field `id`: expected a string or a number, got {}",
                    kind_of(other)
                )))
            }
        };
        set.rows.push(LabelledResponse {
            line: n,
            input: JudgeInput::new(prompt, response),
            refusal,
            id,
            identity,
        });
    }
    Ok(set)
}

fn kind_of(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Parses a labelled CSV. Prompt column: `objective` or `prompt`; response column:
/// `assistant_response` or `response`; label: `human_score` (0/1).
fn parse_csv_labels(path: &Path, text: &str) -> Result<Vec<LabelledResponse>> {
    // Skip leading comment lines, remembering how many to report true line numbers.
    let mut skipped_lines = 0;
    let mut rest = text;
    while rest.starts_with('#') {
        match rest.find('\n') {
            Some(i) => {
                rest = &rest[i + 1..];
                skipped_lines += 1;
            }
            None => rest = "",
        }
    }
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(rest.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| EvalError::file(path, format!("cannot read the CSV header: {e}")))?
        .clone();
    let col = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
    let need = |names: &[&str]| {
        col(names).ok_or_else(|| {
            EvalError::file(
                path,
                format!(
                    "no `{}` column (header: {})",
                    names.join("` or `"),
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let p_col = need(&["objective", "prompt"])?;
    let r_col = need(&["assistant_response", "response"])?;
    let s_col = need(&["human_score", "label"])?;
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0) + skipped_lines;
            EvalError::record(path, line, format!("bad CSV record: {e}"))
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0) + skipped_lines;
        let field = |i: usize| rec.get(i).unwrap_or("").to_string();
        let refusal = match field(s_col).trim() {
            "1" | "1.0" | "true" => true,
            "0" | "0.0" | "false" => false,
            other => {
                return Err(EvalError::record(
                    path,
                    line,
                    format!("`human_score` must be 0 or 1, got {other:?}"),
                ))
            }
        };
        out.push(LabelledResponse {
            line,
            input: JudgeInput::new(field(p_col), field(r_col)),
            refusal,
            id: None,
            identity: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_commented_csv_with_multiline_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.csv");
        std::fs::write(
            &p,
            "# version\n# note\nobjective,assistant_response,human_score,data_type\n\
             q1,\"line one\nline two\",1,text\nq2,sure,0,text\n",
        )
        .unwrap();
        let rows = read_labels(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input.response, "line one\nline two");
        assert!(rows[0].refusal && !rows[1].refusal);
        assert_eq!(rows[0].line, 4);
        assert_eq!((rows[0].id.clone(), rows[0].identity), (None, None));
        std::fs::write(&p, "objective,assistant_response,human_score\nq,r,7\n").unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(
            e.contains("l.csv") && e.contains("line 2") && e.contains("human_score"),
            "{e}"
        );
        std::fs::write(&p, "prompt,text,human_score\nq,r,1\n").unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(e.contains("assistant_response"), "{e}");
    }

    #[test]
    fn reads_the_pyrit_assets() {
        let a = read_labels(&resolve_labels("refusal").unwrap()).unwrap();
        let b = read_labels(&resolve_labels("refusal_extra").unwrap()).unwrap();
        assert_eq!((a.len(), a.iter().filter(|r| r.refusal).count()), (105, 70));
        assert_eq!((b.len(), b.iter().filter(|r| r.refusal).count()), (64, 39));
        let set = load_labels("refusal").unwrap();
        assert_eq!(set.role, Some("dev (regression floor)"));
        assert_eq!(set.rows.len(), 105);
    }

    #[test]
    fn reads_a_labelling_jsonl_counting_unclear_and_unlabelled_rows() {
        let dir = tempfile::tempdir().unwrap();
        // No .jsonl extension: recognised by its first character.
        let p = dir.path().join("labels.txt");
        std::fs::write(
            &p,
            concat!(
                r#"{"id": "a1", "prompt": "q", "response": "No.", "label": "refusal", "identity": false}"#,
                "\n\n",
                r#"{"answer_id": "k:7", "prompt": "q", "response": "As an AI, here it is.", "label": " Compliance ", "identity": true, "kind": "x"}"#,
                "\n",
                r#"{"prompt": "q", "response": "hm", "label": "unclear"}"#,
                "\n",
                r#"{"prompt": "q", "response": "hm", "label": "", "labeller": ""}"#,
                "\n",
                r#"{"id": 12, "prompt": "q", "response": "ok", "label": "compliance"}"#,
                "\n",
            ),
        )
        .unwrap();
        let set = read_label_set(&p).unwrap();
        assert_eq!((set.rows.len(), set.unclear, set.unlabelled), (3, 1, 1));
        let r = &set.rows[1];
        assert_eq!(r.line, 3);
        assert_eq!(
            (r.id.as_deref(), r.identity, r.refusal),
            (Some("k:7"), Some(true), false)
        );
        assert_eq!(set.rows[0].identity, Some(false));
        assert_eq!(set.rows[2].id.as_deref(), Some("12"));
        assert_eq!(set.rows[2].identity, None);
        // Errors name the file, the line and the field.
        let bad = [
            (
                r#"{"prompt": "q", "response": "r", "label": "refused"}"#,
                "field `label`",
            ),
            (
                r#"{"prompt": "q", "label": "refusal"}"#,
                "field `response`: missing",
            ),
            (
                r#"{"prompt": 3, "response": "r", "label": "refusal"}"#,
                "field `prompt`",
            ),
            (
                r#"{"prompt": "q", "response": "r", "label": "refusal", "identity": "yes"}"#,
                "field `identity`",
            ),
            (
                r#"{"prompt": "q", "response": "r"}"#,
                "field `label`: missing",
            ),
            ("[1, 2]", "not a JSON object"),
        ];
        for (row, want) in bad {
            std::fs::write(
                &p,
                format!("{{\"prompt\":\"q\",\"response\":\"r\",\"label\":\"refusal\"}}\n{row}\n"),
            )
            .unwrap();
            let e = read_label_set(&p).unwrap_err().to_string();
            assert!(
                e.contains("labels.txt") && e.contains("line 2") && e.contains(want),
                "{row}: {e}"
            );
        }
        // Only unlabelled rows: read_labels says so.
        std::fs::write(&p, "{\"prompt\":\"q\",\"response\":\"r\",\"label\":\"\"}\n").unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(e.contains("no labelled rows"), "{e}");
    }

    #[test]
    fn judge_labels_split_by_seeded_id_hash() {
        // A fixture in the layout of data/judge_labels.jsonl: the parts are the two sides of
        // split_of on the id, and together all labelled rows.
        let text: String = (0..200)
            .map(|i| {
                format!(
                    "{{\"id\": \"jl-{i:04}\", \"prompt\": \"q\", \"response\": \"r\", \"label\": \"{}\", \"identity\": {}, \"harmful_prompt\": true, \"kind\": \"x\"}}\n",
                    if i % 2 == 0 { "refusal" } else { "compliance" },
                    i % 3 == 0
                )
            })
            .collect();
        let path = Path::new("data/judge_labels.jsonl");
        let all = parse_judge_labels(path, &text).unwrap().rows;
        assert_eq!(all.len(), 200);
        let test = split_part(all.clone(), Split::Test);
        let train = split_part(all.clone(), Split::Train);
        assert_eq!(test.len() + train.len(), all.len());
        for r in &test {
            let id = r.id.as_deref().unwrap();
            assert_eq!(
                split_of(id, JUDGE_LABELS_SPLIT_SEED, JUDGE_LABELS_TEST_FRACTION),
                Split::Test
            );
        }
        for r in &train {
            assert!(!test.iter().any(|t| t.id == r.id));
        }
        // About 40% held out (binomial sd for n = 200 is 7 rows).
        assert!((56..104).contains(&test.len()), "{}", test.len());
        // Every row needs an id.
        let e = parse_judge_labels(
            path,
            "{\"prompt\": \"q\", \"response\": \"r\", \"label\": \"refusal\"}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("judge_labels.jsonl: line 1: field `id`: missing"),
            "{e}"
        );
        // The embedded set, where this build has one, goes through the same split.
        if safetune_data::demo::demo_text("judge-labels").is_some() {
            let all = judge_labels_all().unwrap();
            let test = judge_labels_part(Split::Test).unwrap();
            let train = judge_labels_part(Split::Train).unwrap();
            assert_eq!(test.len() + train.len(), all.len());
            let set = load_labels("judge-labels:dev").unwrap();
            assert_eq!((set.rows.len(), set.role), (test.len(), Some("dev")));
            assert_eq!(
                load_labels("judge-labels:train").unwrap().role,
                Some("train")
            );
        }
    }

    /// The sealed test set is a file of its own, not a part of the split one: every row
    /// labelled, 60 in each label x identity cell, no id shared with `judge_labels.jsonl`.
    #[test]
    fn the_sealed_test_sets_are_balanced_and_disjoint() {
        for (spec, role) in [
            ("judge-labels:test", "dev"),
            ("judge-labels:dev2", "dev"),
            ("judge-labels:test2", "test"),
            ("judge-labels:dev3", "dev"),
            ("judge-labels:test3", "test"),
        ] {
            let set = load_labels(spec).unwrap();
            assert!(set.role.is_some_and(|r| r.starts_with(role)), "{spec}");
            balanced_and_disjoint(&set, spec);
        }
    }

    fn balanced_and_disjoint(set: &LabelSet, spec: &str) {
        assert_eq!(
            (set.rows.len(), set.unclear, set.unlabelled),
            (240, 0, 0),
            "{spec}"
        );
        for (refusal, identity) in [(true, true), (true, false), (false, true), (false, false)] {
            let n = set
                .rows
                .iter()
                .filter(|r| r.refusal == refusal && r.identity == Some(identity))
                .count();
            assert_eq!(n, 60, "{spec}: refusal {refusal}, identity {identity}");
        }
        // No shared id; the only responses two sets hold are stock one-line refusals
        // ("I can't help with that."), which two writers are bound to share.
        let mut other = judge_labels_all().unwrap();
        for o in [
            "judge-labels:test",
            "judge-labels:dev2",
            "judge-labels:test2",
            "judge-labels:dev3",
            "judge-labels:test3",
        ] {
            if o != spec {
                other.extend(load_labels(o).unwrap().rows);
            }
        }
        for r in &set.rows {
            assert!(other.iter().all(|o| o.id != r.id), "{:?}", r.id);
            if other.iter().any(|o| o.input.response == r.input.response) {
                assert!(
                    r.input.response.split_whitespace().count() <= 10,
                    "{:?}",
                    r.id
                );
            }
        }
    }
}
