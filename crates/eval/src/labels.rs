//! Human-labelled refusal data for judge validation: PyRIT's `refusal.csv` and
//! `refusal_extra.csv` (columns `objective`, `assistant_response`, `human_score` with 1 =
//! refusal; `#` comment lines before the header). Evaluation only: nothing in safetune trains
//! on these files.

use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::judge::JudgeInput;

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledResponse {
    /// 1-based line of the record's start in the file.
    pub line: usize,
    pub input: JudgeInput,
    /// The human label: true = refusal.
    pub refusal: bool,
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

/// Reads a labelled CSV. Prompt column: `objective` or `prompt`; response column:
/// `assistant_response` or `response`; label: `human_score` (0/1).
pub fn read_labels(path: &Path) -> Result<Vec<LabelledResponse>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    // Skip leading comment lines, remembering how many to report true line numbers.
    let mut skipped_lines = 0;
    let mut rest = text.as_str();
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
        });
    }
    if out.is_empty() {
        return Err(EvalError::file(path, "no labelled rows"));
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
    }
}
