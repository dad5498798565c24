//! JSON lines: the dataset source (one record per line) and a reader of arbitrary objects.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::record::RawRecord;

use super::report::parse_json;
use super::Source;

pub(super) struct JsonlSource {
    path: PathBuf,
    reader: BufReader<File>,
    pub(super) buf: Vec<u8>,
    line: usize,
}

impl JsonlSource {
    pub(super) fn open(path: &Path) -> Result<Self> {
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
    pub(super) fn next_line(&mut self) -> Option<Result<usize>> {
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
/// Reads a JSONL file of arbitrary objects (generations, judgments, prompt files).
pub fn read_json_lines(path: impl AsRef<Path>) -> Result<Vec<(usize, Map<String, Value>)>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        match crate::util::json_object_line(&line) {
            None => {}
            Some(Ok(o)) => out.push((i + 1, o)),
            Some(Err(e)) => return Err(DataError::record(path, i + 1, None, e.to_string())),
        }
    }
    Ok(out)
}
