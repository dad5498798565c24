//! Streaming dataset readers. A `DatasetReader` yields one `Example` at a time from JSONL, a JSON
//! array, CSV or Parquet, in any record layout of [`crate::record::Schema`] (messages, ShareGPT,
//! Alpaca, prompt/response; ARCHITECTURE.md section 6), so a 1 GB file is never held in memory.
//! Errors name the file, the line (the row for Parquet) and the field.
mod csv_file;
mod detect;
mod json_array;
mod jsonl;
mod parquet_file;
mod report;
mod write;

pub use detect::InputFormat;
pub use jsonl::read_json_lines;
pub use report::SkipReport;
pub use write::{write_messages_jsonl, AtomicJsonlWriter};

use std::path::{Path, PathBuf};

use crate::conversation::{Conversation, Role};
use crate::error::{DataError, Result};
use crate::fastjson::{MessagesLine, ParsedLine};
use crate::record::{RawRecord, Schema};

use csv_file::CsvSource;
use detect::Container;
use json_array::JsonArraySource;
use jsonl::JsonlSource;
use parquet_file::ParquetSource;
use report::parse_json;

/// Column names for CSV (and for Parquet files with flat columns). Unset names are guessed.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub id: Option<String>,
    pub prompt: Option<String>,
    pub response: Option<String>,
    pub system: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub format: InputFormat,
    /// Skip records that cannot be read instead of stopping at the first one.
    pub skip_invalid: bool,
    pub columns: Columns,
}

/// One conversation and where it came from.
#[derive(Debug, Clone)]
pub struct Example {
    /// 1-based line (JSONL, CSV, JSON array element start) or row (Parquet).
    pub line: usize,
    pub conversation: Conversation,
}
trait Source {
    /// Next raw record and its line, `None` at the end.
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>>;

    /// The JSONL source, whose lines the fast path can read raw.
    fn as_jsonl(&mut self) -> Option<&mut JsonlSource> {
        None
    }
}

/// A borrowed view of one example: what a streaming consumer such as the audit needs, without
/// allocating per record. From [`DatasetReader::next_ref`].
#[derive(Debug, Clone, Copy)]
pub struct ExampleRef<'a> {
    /// 1-based line or row, as in [`Example`].
    pub line: usize,
    /// 0-based position among the records read, skipped ones included: a record without an id
    /// is named by it, as the iterator names it.
    pub index: usize,
    inner: RefInner<'a>,
}

#[derive(Debug, Clone, Copy)]
enum RefInner<'a> {
    Fast(ParsedLine<'a>),
    Owned(&'a Conversation),
}

impl<'a> ExampleRef<'a> {
    /// The record's id, or `None` where the record has none (its index names it then).
    pub fn id(&self) -> Option<&'a str> {
        match self.inner {
            RefInner::Fast(p) => p.id(),
            RefInner::Owned(c) => Some(c.id.as_str()),
        }
    }

    /// The messages in order, as (role, text).
    pub fn messages(&self) -> impl Iterator<Item = (Role, &'a str)> + Clone + 'a {
        let inner = self.inner;
        let n = match inner {
            RefInner::Fast(p) => p.len(),
            RefInner::Owned(c) => c.messages.len(),
        };
        (0..n).map(move |i| match inner {
            RefInner::Fast(p) => p.message(i),
            RefInner::Owned(c) => (c.messages[i].role, c.messages[i].content.as_str()),
        })
    }
}

/// How `next_ref` found the next example.
enum RefOutcome {
    Fast(usize),
    Owned(usize),
}

/// A streaming reader over one dataset file.
pub struct DatasetReader {
    path: PathBuf,
    source: Box<dyn Source>,
    schema: Option<Schema>,
    skip_invalid: bool,
    skipped: SkipReport,
    index: usize,
    fatal: bool,
    /// The fast path's parser state and the last example `next_ref` parsed the general way.
    fast: MessagesLine,
    current: Option<Conversation>,
}

impl DatasetReader {
    pub fn open(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let container = Container::detect(&path, opts.format)?;
        let source: Box<dyn Source> = match container {
            Container::Jsonl => Box::new(JsonlSource::open(&path)?),
            Container::JsonArray => Box::new(JsonArraySource::open(&path)?),
            Container::Csv => Box::new(CsvSource::open(&path, &opts.columns)?),
            Container::Parquet => Box::new(ParquetSource::open(&path, &opts.columns)?),
        };
        Ok(DatasetReader {
            path,
            source,
            schema: opts.format.schema(),
            skip_invalid: opts.skip_invalid,
            skipped: SkipReport::default(),
            index: 0,
            fatal: false,
            fast: MessagesLine::default(),
            current: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record layout in use (known after the first record).
    pub fn schema(&self) -> Option<Schema> {
        self.schema
    }

    pub fn skipped(&self) -> &SkipReport {
        &self.skipped
    }

    fn convert(&mut self, line: usize, rec: RawRecord) -> Result<Conversation> {
        let schema = match self.schema {
            Some(s) => s,
            None => {
                let s = Schema::detect(&rec).ok_or_else(|| {
                    let mut fields: Vec<&str> = rec.extra.keys().map(String::as_str).collect();
                    fields.sort();
                    DataError::record(
                        &self.path,
                        line,
                        None,
                        format!(
                            "cannot tell the record layout: expected `messages`, `conversations`, `instruction` or `prompt`, found fields [{}]; hint: pass --input-format",
                            fields.join(", ")
                        ),
                    )
                })?;
                self.schema = Some(s);
                s
            }
        };
        let index = self.index;
        rec.into_conversation(schema, || format!("{index}"))
            .map_err(|e| DataError::record(&self.path, line, Some(&e.field), e.message))
    }
}

impl DatasetReader {
    /// The next example as a borrowed view. Yields the same examples, errors and skip counts as
    /// the iterator, but messages-JSONL lines of the common shape are parsed without allocating
    /// (see `fastjson.rs`); everything else goes through the general reader.
    pub fn next_ref(&mut self) -> Option<Result<ExampleRef<'_>>> {
        if self.fatal {
            return None;
        }
        let outcome = if self.schema == Some(Schema::Messages) && self.source.as_jsonl().is_some() {
            match self.next_jsonl_fast()? {
                Ok(o) => o,
                Err(e) => return Some(Err(e)),
            }
        } else {
            match self.next()? {
                Ok(ex) => {
                    self.current = Some(ex.conversation);
                    RefOutcome::Owned(ex.line)
                }
                Err(e) => return Some(Err(e)),
            }
        };
        let index = self.index - 1;
        Some(Ok(match outcome {
            RefOutcome::Fast(line) => ExampleRef {
                line,
                index,
                inner: RefInner::Fast(self.fast.view()),
            },
            RefOutcome::Owned(line) => ExampleRef {
                line,
                index,
                inner: RefInner::Owned(self.current.as_ref().expect("current example")),
            },
        }))
    }

    fn next_jsonl_fast(&mut self) -> Option<Result<RefOutcome>> {
        loop {
            let src = self.source.as_jsonl().expect("jsonl source");
            if src.buf.capacity() == 0 {
                src.buf = self.fast.take_buffer();
            }
            let line = match src.next_line()? {
                Ok(line) => line,
                Err(e) => {
                    self.fatal = true;
                    return Some(Err(e));
                }
            };
            // The parser takes the line's buffer (validating UTF-8 once, without copying) and
            // hands it back before the next read.
            let buf = std::mem::take(&mut src.buf);
            let fast = self.fast.parse_owned(buf);
            if fast {
                self.index += 1;
                return Some(Ok(RefOutcome::Fast(line)));
            }
            let result = parse_json(&self.path, line, self.fast.bytes())
                .and_then(|rec| self.convert(line, rec));
            match result {
                Ok(conversation) => {
                    self.index += 1;
                    self.current = Some(conversation);
                    return Some(Ok(RefOutcome::Owned(line)));
                }
                Err(e) if self.skip_invalid && e.is_record_error() => {
                    self.index += 1;
                    self.skipped.add(&e);
                }
                Err(e) => {
                    self.fatal = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Iterator for DatasetReader {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.fatal {
            return None;
        }
        loop {
            let item = self.source.next_record()?;
            let result = item.and_then(|(line, rec)| self.convert(line, rec).map(|c| (line, c)));
            match result {
                Ok((line, conversation)) => {
                    self.index += 1;
                    return Some(Ok(Example { line, conversation }));
                }
                Err(e) if self.skip_invalid && e.is_record_error() => {
                    self.index += 1;
                    self.skipped.add(&e);
                }
                Err(e) => {
                    // A file-level error ends the stream; a record error ends it unless skipping.
                    self.fatal = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads a whole dataset into memory (for small sets: demo data, benchmark prompts).
pub fn read_all(
    path: impl AsRef<Path>,
    opts: &ReadOptions,
) -> Result<(Vec<Conversation>, SkipReport)> {
    let mut reader = DatasetReader::open(path, opts)?;
    let mut out = Vec::new();
    for ex in reader.by_ref() {
        out.push(ex?.conversation);
    }
    Ok((out, reader.skipped().clone()))
}
