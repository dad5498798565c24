//! What `--input-format` names, and what a file holds: its container (from the format, the
//! extension or the first bytes) and, where the format fixes it, its record layout.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::record::Schema;

/// What `--input-format` accepts. `Auto` looks at the extension and the first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputFormat {
    #[default]
    Auto,
    Messages,
    Alpaca,
    ShareGpt,
    PromptResponse,
    Csv,
    Parquet,
}

impl InputFormat {
    pub const NAMES: [&'static str; 7] = [
        "auto",
        "messages",
        "alpaca",
        "sharegpt",
        "prompt-response",
        "csv",
        "parquet",
    ];

    pub(super) fn schema(self) -> Option<Schema> {
        match self {
            InputFormat::Messages => Some(Schema::Messages),
            InputFormat::Alpaca => Some(Schema::Alpaca),
            InputFormat::ShareGpt => Some(Schema::ShareGpt),
            InputFormat::PromptResponse => Some(Schema::PromptResponse),
            _ => None,
        }
    }
}

impl std::str::FromStr for InputFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => InputFormat::Auto,
            "messages" | "openai" => InputFormat::Messages,
            "alpaca" => InputFormat::Alpaca,
            "sharegpt" => InputFormat::ShareGpt,
            "prompt-response" | "prompt" => InputFormat::PromptResponse,
            "csv" => InputFormat::Csv,
            "parquet" => InputFormat::Parquet,
            _ => {
                return Err(format!(
                    "unknown input format `{s}` (expected one of {})",
                    Self::NAMES.join(", ")
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Container {
    Jsonl,
    JsonArray,
    Csv,
    Parquet,
}

impl Container {
    pub(super) fn detect(path: &Path, format: InputFormat) -> Result<Container> {
        match format {
            InputFormat::Csv => return Ok(Container::Csv),
            InputFormat::Parquet => return Ok(Container::Parquet),
            _ => {}
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "csv" | "tsv" => return Ok(Container::Csv),
            "parquet" | "pq" => return Ok(Container::Parquet),
            _ => {}
        }
        // Sniff the first bytes: Parquet magic, a JSON array, or JSON lines.
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut head = [0u8; 4096];
        let n = read_some(&mut file, &mut head).map_err(|e| DataError::io(path, e))?;
        let head = &head[..n];
        if head.starts_with(b"PAR1") {
            return Ok(Container::Parquet);
        }
        let first = head
            .strip_prefix(b"\xEF\xBB\xBF")
            .unwrap_or(head)
            .iter()
            .find(|b| !b.is_ascii_whitespace());
        match first {
            Some(b'[') => Ok(Container::JsonArray),
            Some(b'{') => Ok(Container::Jsonl),
            None => Ok(Container::Jsonl), // empty file: zero records
            Some(_) if ext == "jsonl" || ext == "json" || ext == "ndjson" => Ok(Container::Jsonl),
            Some(_) => Err(DataError::file(
                path,
                "cannot tell the file format from its extension or first bytes; hint: pass --input-format (messages, alpaca, sharegpt, prompt-response, csv, parquet)",
            )),
        }
    }
}

fn read_some(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
