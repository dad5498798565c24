//! CSV and TSV with named columns, the prompt, response, system and id columns named or guessed.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};
use crate::record::RawRecord;

use super::{Columns, Source};

/// Column guesses, in order of preference.
const ID_COLUMNS: &[&str] = &["id", "uid", "example_id"];
const PROMPT_COLUMNS: &[&str] = &[
    "prompt",
    "instruction",
    "question",
    "query",
    "user",
    "forbidden_prompt",
    "objective",
    "goal",
    "behavior",
    "text",
];
const RESPONSE_COLUMNS: &[&str] = &[
    "response",
    "output",
    "answer",
    "completion",
    "assistant",
    "assistant_response",
    "target",
    "chosen",
];
const SYSTEM_COLUMNS: &[&str] = &["system", "system_prompt"];

fn pick_column(
    header: &[String],
    explicit: &Option<String>,
    guesses: &[&str],
    path: &Path,
    what: &str,
) -> Result<Option<usize>> {
    if let Some(name) = explicit {
        return header
            .iter()
            .position(|h| h == name)
            .map(Some)
            .ok_or_else(|| {
                DataError::file(
                    path,
                    format!(
                        "no column `{name}` for the {what}; columns are: {}",
                        header.join(", ")
                    ),
                )
            });
    }
    Ok(guesses
        .iter()
        .find_map(|g| header.iter().position(|h| h.eq_ignore_ascii_case(g))))
}

pub(super) struct CsvSource {
    path: PathBuf,
    reader: csv::Reader<BufReader<File>>,
    /// Comment lines before the header, added to the reader's line numbers.
    lines_before: usize,
    header: Vec<String>,
    id: Option<usize>,
    prompt: usize,
    response: Option<usize>,
    system: Option<usize>,
    /// Alpaca-style CSV: `instruction` + `input` columns.
    input: Option<usize>,
    record: csv::StringRecord,
}

impl CsvSource {
    pub(super) fn open(path: &Path, cols: &Columns) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let tsv = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
        // `#` lines are comments only before the header: a data row whose first field starts
        // with `#` (a hashtag, "#1 tip") is data, never dropped.
        let mut file = BufReader::new(file);
        let mut lines_before = 0;
        loop {
            let starts_comment =
                file.fill_buf().map_err(|e| DataError::io(path, e))?.first() == Some(&b'#');
            if !starts_comment {
                break;
            }
            let mut skipped = Vec::new();
            file.read_until(b'\n', &mut skipped)
                .map_err(|e| DataError::io(path, e))?;
            lines_before += 1;
        }
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(if tsv { b'\t' } else { b',' })
            .flexible(false)
            .from_reader(file);
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| DataError::file(path, format!("cannot read the CSV header: {e}")))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let prompt = pick_column(&header, &cols.prompt, PROMPT_COLUMNS, path, "prompt")?.ok_or_else(|| {
            DataError::file(
                path,
                format!("no prompt column (looked for {}); columns are: {}; hint: pass --prompt-column", PROMPT_COLUMNS.join(", "), header.join(", ")),
            )
        })?;
        let response = pick_column(&header, &cols.response, RESPONSE_COLUMNS, path, "response")?;
        let system = pick_column(&header, &cols.system, SYSTEM_COLUMNS, path, "system prompt")?;
        let id = pick_column(&header, &cols.id, ID_COLUMNS, path, "id")?;
        let input = (header[prompt] == "instruction")
            .then(|| header.iter().position(|h| h == "input"))
            .flatten();
        Ok(CsvSource {
            path: path.to_path_buf(),
            reader,
            lines_before,
            header,
            id,
            prompt,
            response,
            system,
            input,
            record: csv::StringRecord::new(),
        })
    }
}

impl Source for CsvSource {
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0) + self.lines_before;
                let message = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("expected {expected_len} fields, found {len}")
                    }
                    _ => e.to_string(),
                };
                // An I/O error ends the file; a malformed row is a record error.
                Some(Err(if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    DataError::file(&self.path, message)
                } else {
                    DataError::record(&self.path, line, None, message)
                }))
            }
            Ok(true) => {
                let line = self
                    .record
                    .position()
                    .map(|p| p.line() as usize)
                    .unwrap_or(0)
                    + self.lines_before;
                let get = |i: Option<usize>| i.and_then(|i| self.record.get(i)).map(str::to_string);
                let mut rec = RawRecord {
                    id: get(self.id).filter(|s| !s.is_empty()),
                    ..Default::default()
                };
                let prompt = get(Some(self.prompt));
                if self.input.is_some() {
                    rec.instruction = prompt;
                    rec.input = get(self.input);
                    rec.output = get(self.response);
                } else {
                    rec.prompt = prompt;
                    rec.response = get(self.response);
                }
                rec.system = get(self.system);
                let used = [
                    self.id,
                    Some(self.prompt),
                    self.response,
                    self.system,
                    self.input,
                ];
                for (i, h) in self.header.iter().enumerate() {
                    if !used.contains(&Some(i)) {
                        if let Some(v) = self.record.get(i) {
                            rec.extra.insert(h.clone(), Value::String(v.to_string()));
                        }
                    }
                }
                Some(Ok((line, rec)))
            }
        }
    }
}
