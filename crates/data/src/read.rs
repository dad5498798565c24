//! Streaming dataset readers. A `DatasetReader` yields one `Example` at a time from JSONL, a JSON
//! array, CSV or Parquet, in any record layout of [`crate::record::Schema`] (messages, ShareGPT,
//! Alpaca, prompt/response; ARCHITECTURE.md section 6), so a 1 GB file is never held in memory.
//! Errors name the file, the line (the row for Parquet) and the field.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::conversation::{Conversation, Role};
use crate::error::{DataError, Result};
use crate::fastjson::{MessagesLine, ParsedLine};
use crate::record::{RawRecord, Schema};

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

    fn schema(self) -> Option<Schema> {
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

/// Records skipped under `--skip-invalid`, with the first few messages kept for the report.
#[derive(Debug, Clone, Default)]
pub struct SkipReport {
    pub count: usize,
    /// Reason (the message without the location) -> number of records.
    pub reasons: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

impl SkipReport {
    fn add(&mut self, err: &DataError) {
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

// ---------------------------------------------------------------------------------------------
// Containers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Jsonl,
    JsonArray,
    Csv,
    Parquet,
}

impl Container {
    fn detect(path: &Path, format: InputFormat) -> Result<Container> {
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

/// Parses one JSON object into a raw record, mapping serde errors to record errors.
fn parse_json(path: &Path, line: usize, bytes: &[u8]) -> Result<RawRecord> {
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

struct JsonlSource {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: usize,
}

impl JsonlSource {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(JsonlSource {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            buf: Vec::with_capacity(1 << 14),
            line: 0,
        })
    }
}

impl JsonlSource {
    /// Reads the next non-blank line into the buffer; its 1-based number.
    fn next_line(&mut self) -> Option<Result<usize>> {
        loop {
            self.buf.clear();
            match read_line(&mut self.reader, &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            }
            self.line += 1;
            if self.line == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(self.line));
        }
    }
}

impl Source for JsonlSource {
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>> {
        let line = match self.next_line()? {
            Ok(line) => line,
            Err(e) => return Some(Err(e)),
        };
        Some(parse_json(&self.path, line, &self.buf).map(|r| (line, r)))
    }

    fn as_jsonl(&mut self) -> Option<&mut JsonlSource> {
        Some(self)
    }
}

/// `BufRead::read_until(b'\n')` with the vectorised memchr; the number of bytes read.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let avail = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (done, used) = match memchr::memchr(b'\n', avail) {
            Some(i) => (true, i + 1),
            None => (avail.is_empty(), avail.len()),
        };
        buf.extend_from_slice(&avail[..used]);
        reader.consume(used);
        read += used;
        if done {
            return Ok(read);
        }
    }
}

/// A top-level JSON array read element by element: the splitter tracks nesting and strings, so
/// only one element is in memory at a time.
struct JsonArraySource {
    path: PathBuf,
    bytes: std::iter::Peekable<std::io::Bytes<BufReader<File>>>,
    line: usize,
    started: bool,
    done: bool,
}

impl JsonArraySource {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(JsonArraySource {
            path: path.to_path_buf(),
            bytes: BufReader::with_capacity(1 << 20, file).bytes().peekable(),
            line: 1,
            started: false,
            done: false,
        })
    }

    fn next_byte(&mut self) -> Option<Result<u8>> {
        match self.bytes.next()? {
            Ok(b) => {
                if b == b'\n' {
                    self.line += 1;
                }
                Some(Ok(b))
            }
            Err(e) => Some(Err(DataError::io(&self.path, e))),
        }
    }

    fn skip_ws_and(&mut self, also: &[u8]) -> Option<Result<u8>> {
        loop {
            let b = match self.next_byte()? {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            if !(b.is_ascii_whitespace()
                || also.contains(&b)
                || b == 0xEF
                || b == 0xBB
                || b == 0xBF)
            {
                return Some(Ok(b));
            }
        }
    }

    fn truncated(&self) -> DataError {
        DataError::record(
            &self.path,
            self.line,
            None,
            "JSON array ends early (truncated file?)",
        )
    }
}

impl Source for JsonArraySource {
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            match self.skip_ws_and(&[]) {
                Some(Ok(b'[')) => {}
                Some(Ok(_)) | None => {
                    self.done = true;
                    return Some(Err(DataError::file(
                        &self.path,
                        "expected a JSON array of records",
                    )));
                }
                Some(Err(e)) => return Some(Err(e)),
            }
        }
        let first = match self.skip_ws_and(b",") {
            Some(Ok(b']')) => {
                self.done = true;
                return None;
            }
            Some(Ok(b)) => b,
            Some(Err(e)) => return Some(Err(e)),
            None => {
                self.done = true;
                return Some(Err(self.truncated()));
            }
        };
        let start_line = self.line;
        let mut elem = vec![first];
        let (mut depth, mut in_str, mut escape) = (0i32, false, false);
        let mut b = first;
        loop {
            if in_str {
                if escape {
                    escape = false;
                } else if b == b'\\' {
                    escape = true;
                } else if b == b'"' {
                    in_str = false;
                }
            } else {
                match b {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth -= 1,
                    _ => {}
                }
            }
            if depth == 0 && !in_str {
                break;
            }
            b = match self.next_byte() {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.done = true;
                    return Some(Err(self.truncated()));
                }
            };
            elem.push(b);
        }
        Some(parse_json(&self.path, start_line, &elem).map(|r| (start_line, r)))
    }
}

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

struct CsvSource {
    path: PathBuf,
    reader: csv::Reader<File>,
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
    fn open(path: &Path, cols: &Columns) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let tsv = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(if tsv { b'\t' } else { b',' })
            .comment(Some(b'#'))
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
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
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
                    .unwrap_or(0);
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

/// Parquet as Hugging Face `datasets` writes it: rows read one row group at a time through the
/// record API, each row turned into a JSON object and read like a JSONL record.
struct ParquetSource {
    path: PathBuf,
    rows: parquet::record::reader::RowIter<'static>,
    row: usize,
    rename: Vec<(String, &'static str)>,
}

impl ParquetSource {
    fn open(path: &Path, cols: &Columns) -> Result<Self> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| DataError::file(path, format!("not a readable Parquet file: {e}")))?;
        let mut rename = Vec::new();
        for (explicit, target) in [
            (&cols.prompt, "prompt"),
            (&cols.response, "response"),
            (&cols.system, "system"),
            (&cols.id, "id"),
        ] {
            if let Some(name) = explicit {
                let schema = reader.metadata().file_metadata().schema_descr();
                if !schema
                    .root_schema()
                    .get_fields()
                    .iter()
                    .any(|f| f.name() == name)
                {
                    return Err(DataError::file(
                        path,
                        format!("no column `{name}` for the {target}"),
                    ));
                }
                rename.push((name.clone(), target));
            }
        }
        let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader));
        Ok(ParquetSource {
            path: path.to_path_buf(),
            rows,
            row: 0,
            rename,
        })
    }
}

impl Source for ParquetSource {
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>> {
        let row = self.rows.next()?;
        self.row += 1;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                return Some(Err(DataError::file(
                    &self.path,
                    format!("row {}: {e}", self.row),
                )))
            }
        };
        let mut value = row.to_json_value();
        if let Value::Object(obj) = &mut value {
            for (from, to) in &self.rename {
                if let Some(v) = obj.remove(from) {
                    obj.insert((*to).to_string(), v);
                }
            }
        }
        let rec = serde_json::from_value::<RawRecord>(value)
            .map_err(|e| DataError::record(&self.path, self.row, None, e.to_string()));
        Some(rec.map(|r| (self.row, r)))
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes conversations as messages JSONL to `path`, atomically: the file appears complete or
/// not at all.
pub fn write_messages_jsonl<'a>(
    path: impl AsRef<Path>,
    conversations: impl IntoIterator<Item = &'a Conversation>,
) -> Result<usize> {
    let path = path.as_ref();
    let mut writer = AtomicJsonlWriter::create(path)?;
    for c in conversations {
        writer.write(c)?;
    }
    let n = writer.count;
    writer.commit()?;
    Ok(n)
}

/// A JSONL writer to a temporary sibling file that is renamed into place on `commit`.
pub struct AtomicJsonlWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    count: usize,
}

impl AtomicJsonlWriter {
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(AtomicJsonlWriter {
            path: path.to_path_buf(),
            tmp,
            out: std::io::BufWriter::new(file),
            count: 0,
        })
    }

    pub fn write<T: serde::Serialize>(&mut self, row: &T) -> Result<()> {
        use std::io::Write;
        serde_json::to_writer(&mut self.out, row)
            .map_err(|e| DataError::Other(format!("{}: {e}", self.path.display())))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| DataError::io(&self.tmp, e))?;
        self.count += 1;
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        use std::io::Write;
        let mut this = self;
        this.out.flush().map_err(|e| DataError::io(&this.tmp, e))?;
        this.out
            .get_ref()
            .sync_all()
            .map_err(|e| DataError::io(&this.tmp, e))?;
        std::fs::rename(&this.tmp, &this.path).map_err(|e| DataError::io(&this.path, e))
        // Drop then finds no temporary file to remove.
    }
}

impl Drop for AtomicJsonlWriter {
    fn drop(&mut self) {
        // Not committed (error or panic): leave no half file behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Reads a JSONL file of arbitrary objects (generations, judgments, prompt files).
pub fn read_json_lines(path: impl AsRef<Path>) -> Result<Vec<(usize, Map<String, Value>)>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line.trim_start_matches('\u{feff}'))
            .map_err(|e| DataError::record(path, i + 1, None, format!("invalid JSON: {e}")))?;
        match v {
            Value::Object(o) => out.push((i + 1, o)),
            _ => {
                return Err(DataError::record(
                    path,
                    i + 1,
                    None,
                    "expected a JSON object",
                ))
            }
        }
    }
    Ok(out)
}
