//! A top-level JSON array of records, read element by element.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::record::RawRecord;

use super::report::parse_json;
use super::Source;

/// A top-level JSON array read element by element: the splitter tracks nesting and strings, so
/// only one element is in memory at a time.
pub(super) struct JsonArraySource {
    path: PathBuf,
    bytes: std::iter::Peekable<std::io::Bytes<BufReader<File>>>,
    line: usize,
    started: bool,
    done: bool,
}

impl JsonArraySource {
    pub(super) fn open(path: &Path) -> Result<Self> {
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
