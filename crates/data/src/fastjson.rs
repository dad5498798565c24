//! A zero-allocation parser for the common shape of a messages-JSONL line:
//! `{"id": "...", "messages": [{"role": "user", "content": "..."}, ...]}`.
//!
//! It exists for throughput (audit reads gigabytes): strings without escapes are borrowed from the
//! line, escaped ones are decoded into one reused buffer, and nothing else is kept. It accepts a
//! strict subset of what the general reader (serde, `record.rs`) accepts and returns `None` for
//! everything else (other keys, other value types, roles other than the three lowercase names,
//! invalid JSON), so the caller parses that line again the general way, which also produces the
//! error message. For every line it accepts, it yields exactly the id and messages the general
//! reader would (tested in `tests/fastjson.rs` and below).

use std::ops::Range;

use crate::conversation::Role;

/// Where a parsed string lives: in the line itself, or decoded into the scratch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buf {
    Line,
    Scratch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    buf: Buf,
    range: Range<usize>,
}

/// The reusable state of the parser; `parse` fills it for one line at a time.
#[derive(Debug, Default)]
pub(crate) struct MessagesLine {
    /// The line, once `parse_owned` found it valid UTF-8; else its raw bytes in `raw`.
    line: String,
    raw: Vec<u8>,
    scratch: String,
    id: Option<Span>,
    messages: Vec<(Role, Span)>,
}

/// One parsed line, borrowing the line and the parser's buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParsedLine<'a> {
    line: &'a str,
    state: &'a MessagesLine,
}

impl<'a> ParsedLine<'a> {
    fn text(&self, s: &Span) -> &'a str {
        match s.buf {
            Buf::Line => &self.line[s.range.clone()],
            Buf::Scratch => &self.state.scratch[s.range.clone()],
        }
    }

    pub(crate) fn id(&self) -> Option<&'a str> {
        self.state.id.as_ref().map(|s| self.text(s))
    }

    pub(crate) fn len(&self) -> usize {
        self.state.messages.len()
    }

    pub(crate) fn message(&self, i: usize) -> (Role, &'a str) {
        let (role, span) = &self.state.messages[i];
        (*role, self.text(span))
    }
}

impl MessagesLine {
    /// Parses one line (with or without its newline: trailing whitespace is allowed), taking
    /// its buffer. `false` means "not the simple shape": parse [`Self::bytes`] the general way.
    /// After `true`, [`Self::view`] gives the parsed example.
    pub(crate) fn parse_owned(&mut self, buf: Vec<u8>) -> bool {
        self.line.clear();
        self.raw.clear();
        match String::from_utf8(buf) {
            Ok(line) => {
                self.line = line;
                let line = std::mem::take(&mut self.line);
                let ok = self.parse_inner(&line).is_some();
                self.line = line;
                ok
            }
            Err(e) => {
                self.raw = e.into_bytes();
                false
            }
        }
    }

    /// The bytes of the line last given to `parse_owned`.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.raw.is_empty() {
            self.line.as_bytes()
        } else {
            &self.raw
        }
    }

    /// Takes the line's buffer back (empty, with its capacity) for the next read.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        let mut buf = if self.raw.capacity() > self.line.capacity() {
            std::mem::take(&mut self.raw)
        } else {
            std::mem::take(&mut self.line).into_bytes()
        };
        buf.clear();
        buf
    }

    /// The example the last successful `parse_owned` found.
    pub(crate) fn view(&self) -> ParsedLine<'_> {
        ParsedLine {
            line: &self.line,
            state: self,
        }
    }

    /// Parses `line`.
    fn parse_inner(&mut self, line: &str) -> Option<()> {
        let bytes = line.as_bytes();
        self.scratch.clear();
        self.id = None;
        self.messages.clear();
        let mut p = Cursor {
            s: line,
            b: bytes,
            i: 0,
        };
        p.ws();
        p.eat(b'{')?;
        let mut seen_messages = false;
        p.ws();
        if p.peek()? == b'}' {
            return None; // no messages: the general reader reports it
        }
        loop {
            p.ws();
            let key = p.plain_string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            match key {
                b"id" if self.id.is_none() => self.id = Some(p.string(&mut self.scratch)?),
                b"messages" if !seen_messages => {
                    seen_messages = true;
                    self.parse_messages(&mut p)?;
                }
                _ => return None,
            }
            p.ws();
            match p.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        p.ws();
        if p.i != bytes.len() || !seen_messages || self.messages.is_empty() {
            return None;
        }
        Some(())
    }

    fn parse_messages(&mut self, p: &mut Cursor) -> Option<()> {
        p.eat(b'[')?;
        p.ws();
        if p.peek()? == b']' {
            p.i += 1;
            return Some(());
        }
        loop {
            p.ws();
            p.eat(b'{')?;
            let (mut role, mut content) = (None, None);
            loop {
                p.ws();
                let key = p.plain_string()?;
                p.ws();
                p.eat(b':')?;
                p.ws();
                match key {
                    b"role" if role.is_none() => {
                        role = Some(match p.plain_string()? {
                            b"user" => Role::User,
                            b"assistant" => Role::Assistant,
                            b"system" => Role::System,
                            _ => return None,
                        })
                    }
                    b"content" if content.is_none() => content = Some(p.string(&mut self.scratch)?),
                    _ => return None,
                }
                p.ws();
                match p.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
            self.messages.push((role?, content?));
            p.ws();
            match p.next()? {
                b',' => continue,
                b']' => return Some(()),
                _ => return None,
            }
        }
    }
}

struct Cursor<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string without escapes, as raw bytes (keys and role names).
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let len = memchr::memchr2(b'"', b'\\', &self.b[start..])?;
        let end = start + len;
        if self.b[end] != b'"' || has_control(&self.b[start..end]) {
            return None;
        }
        self.i = end + 1;
        Some(&self.b[start..end])
    }

    /// A JSON string: borrowed from the line if it has no escapes, else decoded into `scratch`.
    fn string(&mut self, scratch: &mut String) -> Option<Span> {
        self.eat(b'"')?;
        let start = self.i;
        let len = memchr::memchr2(b'"', b'\\', &self.b[start..])?;
        let end = start + len;
        if has_control(&self.b[start..end]) {
            return None;
        }
        if self.b[end] == b'"' {
            self.i = end + 1;
            return Some(Span {
                buf: Buf::Line,
                range: start..end,
            });
        }
        // Escapes: decode the whole string into the scratch buffer.
        let out_start = scratch.len();
        let mut i = start;
        loop {
            let len = memchr::memchr2(b'"', b'\\', &self.b[i..])?;
            let run = &self.b[i..i + len];
            if has_control(run) {
                return None;
            }
            // The run starts after and ends before ASCII bytes: both are char boundaries.
            scratch.push_str(&self.s[i..i + len]);
            i += len;
            if self.b[i] == b'"' {
                self.i = i + 1;
                return Some(Span {
                    buf: Buf::Scratch,
                    range: out_start..scratch.len(),
                });
            }
            let esc = *self.b.get(i + 1)?;
            i += 2;
            let c = match esc {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let hi = hex4(self.b.get(i..i + 4)?)?;
                    i += 4;
                    match hi {
                        0xD800..=0xDBFF => {
                            if self.b.get(i..i + 2)? != b"\\u" {
                                return None;
                            }
                            let lo = hex4(self.b.get(i + 2..i + 6)?)?;
                            if !(0xDC00..=0xDFFF).contains(&lo) {
                                return None;
                            }
                            i += 6;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                        }
                        0xDC00..=0xDFFF => return None,
                        _ => char::from_u32(hi)?,
                    }
                }
                _ => return None,
            };
            scratch.push(c);
        }
    }
}

/// Any byte below 0x20 (JSON forbids raw control characters in strings). Branch-free so it
/// vectorises.
#[inline]
fn has_control(b: &[u8]) -> bool {
    b.iter().fold(false, |acc, &c| acc | (c < 0x20))
}

fn hex4(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::type_complexity)] // test helper: (system, messages) of one line
    fn parse(line: &str) -> Option<(Option<String>, Vec<(Role, String)>)> {
        let mut st = MessagesLine::default();
        if !st.parse_owned(line.as_bytes().to_vec()) {
            return None;
        }
        let p = st.view();
        let msgs = (0..p.len())
            .map(|i| {
                let (r, t) = p.message(i);
                (r, t.to_string())
            })
            .collect();
        Some((p.id().map(str::to_string), msgs))
    }

    #[test]
    fn simple_shape_is_parsed() {
        let (id, msgs) = parse(
            r#" {"id": "a-1", "messages": [{"role": "user", "content": "Hi \"you\"\n\u00e9\ud83d\ude00"}, {"content": "ok", "role":"assistant"}]}  "#,
        )
        .unwrap();
        assert_eq!(id.as_deref(), Some("a-1"));
        assert_eq!(msgs[0], (Role::User, "Hi \"you\"\né😀".to_string()));
        assert_eq!(msgs[1], (Role::Assistant, "ok".to_string()));
    }

    #[test]
    fn anything_else_falls_back() {
        for line in [
            r#"{"messages": [{"role": "user", "content": "x"}], "meta": {}}"#,
            r#"{"id": 3, "messages": [{"role": "user", "content": "x"}]}"#,
            r#"{"messages": [{"role": "User", "content": "x"}]}"#,
            r#"{"messages": [{"role": "user", "content": null}]}"#,
            r#"{"messages": [{"role": "user"}]}"#,
            r#"{"messages": []}"#,
            r#"{"messages": [{"role": "user", "content": "x"}]} trailing"#,
            r#"{"messages": [{"role": "user", "content": "a	tab"}]}"#,
            r#"{"messages": [{"role": "user", "content": "\ud800 lone"}]}"#,
            r#"{"messages": [{"role": "user", "content": "\q"}]}"#,
            r#"{"messages": [{"role": "user", "content": "x"}], "messages": []}"#,
            r#"{"messages": [{"role": "user", "content": "x"}"#,
            r"{}",
            r"[1]",
        ] {
            assert!(parse(line).is_none(), "{line}");
        }
    }
}
