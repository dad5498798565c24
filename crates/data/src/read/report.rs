//! Reporting bad records: the skip report of `--skip-invalid` and JSON parse errors as record
//! errors.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::record::RawRecord;

/// Records skipped under `--skip-invalid`, with the first few messages kept for the report.
#[derive(Debug, Clone, Default)]
pub struct SkipReport {
    pub count: usize,
    /// Reason (the message without the location) -> number of records.
    pub reasons: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

impl SkipReport {
    pub(super) fn add(&mut self, err: &DataError) {
        self.count += 1;
        let reason = match err {
            DataError::Record { field, message, .. } => match field {
                Some(f) => format!("field `{f}`: {message}"),
                None => reason_class(message),
            },
            other => other.to_string(),
        };
        *self.reasons.entry(reason).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples.push(err.to_string());
        }
    }
}

/// Folds serde_json's "at line 1 column 17" suffix away so equal reasons group together.
fn reason_class(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}
/// Parses one JSON object into a raw record, mapping serde errors to record errors.
pub(super) fn parse_json(path: &Path, line: usize, bytes: &[u8]) -> Result<RawRecord> {
    serde_json::from_slice::<RawRecord>(bytes).map_err(|e| {
        let text = e.to_string();
        // Errors raised inside a field keep serde's wording ("EOF while parsing ...").
        let syntax = e.is_syntax()
            || e.is_eof()
            || text.contains("EOF while parsing")
            || text.contains("expected value");
        let message = if syntax {
            format!("invalid JSON: {text}")
        } else {
            reason_class(&text)
        };
        DataError::record(path, line, None, message)
    })
}
