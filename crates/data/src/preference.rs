//! Preference data: pairs of answers to one context where one answer is preferred.
//!
//! Readers for the common layouts, one JSON object per line (a `.json` file holding an array of
//! objects works too):
//! - **hh**: `chosen` and `rejected` as plain text with `Human:` / `Assistant:` turns; the context
//!   is every turn before the last `Assistant:` answer;
//! - **messages**: `chosen` and `rejected` as message lists (`role`/`content`), with the context
//!   either inside them or in a separate `prompt` (a string or a message list);
//! - **rewardbench**: `prompt`, `chosen`, `rejected` as strings, optional `subset` and `id`;
//! - **pku**: PKU-SafeRLHF rows (`prompt`, `response_0`, `response_1`, `safer_response_id`,
//!   `better_response_id`, optional `is_response_0_safe` / `is_response_1_safe`), giving one pair
//!   per preference dimension: subset `safer` and subset `better`.
//!
//! The layout is detected from the first record unless given. Errors name the file, the line and
//! the field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::conversation::{Message, Role};
use crate::error::{DataError, Result};

/// One preference: `chosen` is preferred to `rejected` as the answer after `context`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub id: String,
    /// 1-based line of the record in its file (0 when built in code).
    #[serde(default)]
    pub line: usize,
    /// The turns before the answer (system, user and earlier assistant turns).
    pub context: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    /// A grouping such as RewardBench's subset or PKU's preference dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Whether each answer is safe, where the data says so (PKU-SafeRLHF does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_safe: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_safe: Option<bool>,
    /// Fields of the record this reader does not use.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub meta: Map<String, Value>,
}

impl PreferencePair {
    /// The whole conversation ending in the chosen (or rejected) answer.
    pub fn conversation(&self, chosen: bool) -> Vec<Message> {
        let mut m = self.context.clone();
        m.push(Message::assistant(if chosen {
            self.chosen.clone()
        } else {
            self.rejected.clone()
        }));
        m
    }

    /// The last user turn of the context (the prompt of a single-turn pair).
    pub fn prompt_text(&self) -> &str {
        self.context
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

/// Record layouts of preference files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceFormat {
    Hh,
    Messages,
    RewardBench,
    Pku,
}

impl PreferenceFormat {
    pub const NAMES: [&'static str; 4] = ["hh", "messages", "rewardbench", "pku"];

    pub fn name(self) -> &'static str {
        match self {
            PreferenceFormat::Hh => "hh",
            PreferenceFormat::Messages => "messages",
            PreferenceFormat::RewardBench => "rewardbench",
            PreferenceFormat::Pku => "pku",
        }
    }

    /// The layout a record's fields point to, if any.
    pub fn detect(rec: &Map<String, Value>) -> Option<PreferenceFormat> {
        if rec.contains_key("response_0") && rec.contains_key("response_1") {
            return Some(PreferenceFormat::Pku);
        }
        match rec.get("chosen") {
            Some(Value::Array(_)) => Some(PreferenceFormat::Messages),
            Some(Value::String(s)) => {
                if matches!(rec.get("prompt"), Some(Value::Array(_))) {
                    Some(PreferenceFormat::Messages)
                } else if rec.contains_key("prompt") {
                    Some(PreferenceFormat::RewardBench)
                } else if s.contains("Human:") || s.contains("Assistant:") {
                    Some(PreferenceFormat::Hh)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

impl std::str::FromStr for PreferenceFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "hh" | "chosen-rejected" => PreferenceFormat::Hh,
            "messages" => PreferenceFormat::Messages,
            "rewardbench" | "prompt-chosen-rejected" => PreferenceFormat::RewardBench,
            "pku" | "pku-saferlhf" => PreferenceFormat::Pku,
            _ => {
                return Err(format!(
                    "unknown preference format `{s}` (expected one of {})",
                    Self::NAMES.join(", ")
                ))
            }
        })
    }
}

/// Whether a record looks like preference data (used to tell pair files from item files).
pub fn looks_like_preference(rec: &Map<String, Value>) -> bool {
    PreferenceFormat::detect(rec).is_some()
}

/// Reads every pair of a preference file. `format`: `None` detects it from the first record.
/// Returns the pairs and the layout used.
pub fn read_preferences(
    path: impl AsRef<Path>,
    format: Option<PreferenceFormat>,
) -> Result<(Vec<PreferencePair>, PreferenceFormat)> {
    let path = path.as_ref();
    let records = read_records(path)?;
    let Some((first_line, first)) = records.first() else {
        return Err(DataError::file(path, "no records: the file is empty"));
    };
    let format = match format {
        Some(f) => f,
        None => PreferenceFormat::detect(first).ok_or_else(|| {
            let mut fields: Vec<&str> = first.keys().map(String::as_str).collect();
            fields.sort();
            DataError::record(
                path,
                *first_line,
                None,
                format!(
                    "cannot tell the preference layout: expected `chosen`/`rejected` or `response_0`/`response_1`, found fields [{}]; hint: pass --pref-format {}",
                    fields.join(", "),
                    PreferenceFormat::NAMES.join("|")
                ),
            )
        })?,
    };
    let mut out = Vec::new();
    for (line, rec) in records {
        let err = |field: &str, msg: String| DataError::record(path, line, Some(field), msg);
        match format {
            PreferenceFormat::Pku => out.extend(pku_pairs(line, rec, &err)?),
            _ => out.push(chosen_rejected(format, line, rec, &err)?),
        }
    }
    Ok((out, format))
}

fn read_records(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(trimmed)
            .map_err(|e| DataError::file(path, format!("invalid JSON array: {e}")))?;
        return v
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(o) => Ok((i + 1, o)),
                _ => Err(DataError::record(
                    path,
                    i + 1,
                    None,
                    "array element is not a JSON object",
                )),
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match crate::util::json_object_line(line) {
            None => {}
            Some(Ok(o)) => out.push((i + 1, o)),
            Some(Err(e)) => return Err(DataError::record(path, i + 1, None, e.to_string())),
        }
    }
    Ok(out)
}

type ErrFn<'a> = dyn Fn(&str, String) -> DataError + 'a;

fn take_id(rec: &mut Map<String, Value>, line: usize) -> String {
    match rec.remove("id") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("line{line}"),
    }
}

fn take_string(rec: &mut Map<String, Value>, field: &str, err: &ErrFn) -> Result<String> {
    match rec.remove(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(err(
            field,
            format!("expected a string, found {}", kind(&other)),
        )),
        None => Err(err(field, "missing".into())),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn take_subset(rec: &mut Map<String, Value>) -> Option<String> {
    match rec.remove("subset") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Splits `Human:` / `Assistant:` text into turns. Text before the first marker is ignored when
/// blank and an error otherwise.
pub fn parse_hh(text: &str) -> std::result::Result<Vec<Message>, String> {
    let mut turns: Vec<Message> = Vec::new();
    let mut rest = text;
    let mut current: Option<Role> = None;
    loop {
        // Right after a marker we are inside a line: a marker there is answer text.
        let line_start = current.is_none();
        let h = find_marker(rest, "Human:", line_start);
        let a = find_marker(rest, "Assistant:", line_start);
        let next = match (h, a) {
            (Some(h), Some(a)) if h < a => Some((h, Role::User, "Human:".len())),
            (Some(_), Some(a)) => Some((a, Role::Assistant, "Assistant:".len())),
            (Some(h), None) => Some((h, Role::User, "Human:".len())),
            (None, Some(a)) => Some((a, Role::Assistant, "Assistant:".len())),
            (None, None) => None,
        };
        let (body, advance) = match next {
            Some((pos, role, len)) => {
                let body = &rest[..pos];
                (body, Some((pos + len, role)))
            }
            None => (rest, None),
        };
        match current {
            Some(role) => turns.push(Message::new(role, body.trim())),
            None if body.trim().is_empty() => {}
            None => {
                return Err(format!(
                    "text before the first `Human:` turn: {:?}",
                    body.trim().chars().take(40).collect::<String>()
                ))
            }
        }
        match advance {
            Some((skip, role)) => {
                rest = &rest[skip..];
                current = Some(role);
            }
            None => break,
        }
    }
    if turns.is_empty() {
        return Err("no `Human:` or `Assistant:` turns".into());
    }
    Ok(turns)
}

/// A turn marker at the start of a line (or of `text` when `line_start`).
fn find_marker(text: &str, marker: &str, line_start: bool) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(marker) {
        let pos = from + i;
        let before = text[..pos].trim_end_matches([' ', '\t']);
        if (line_start && before.is_empty()) || before.ends_with('\n') {
            return Some(pos);
        }
        from = pos + marker.len();
    }
    None
}

fn messages_from(value: Value, field: &str, err: &ErrFn) -> Result<Vec<Message>> {
    let Value::Array(items) = value else {
        return Err(err(
            field,
            format!("expected a list of messages, found {}", kind(&value)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(mut m) = item else {
            return Err(err(
                &f,
                "expected an object with `role` and `content`".into(),
            ));
        };
        let Some(Value::String(role_name)) = m.remove("role").or_else(|| m.remove("from")) else {
            return Err(err(&format!("{f}.role"), "missing".into()));
        };
        let role = Role::parse(&role_name).ok_or_else(|| {
            err(
                &format!("{f}.role"),
                format!("unknown role `{role_name}` (expected system, user or assistant)"),
            )
        })?;
        let content = match m.remove("content").or_else(|| m.remove("value")) {
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => {
                // OpenAI content parts: keep the text parts.
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("")
            }
            _ => return Err(err(&format!("{f}.content"), "missing".into())),
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// Splits a conversation into (context, last assistant answer).
fn split_answer(
    mut turns: Vec<Message>,
    field: &str,
    err: &ErrFn,
) -> Result<(Vec<Message>, String)> {
    match turns.last() {
        Some(m) if m.role == Role::Assistant => {
            let last = turns.pop().map(|m| m.content).unwrap_or_default();
            Ok((turns, last))
        }
        _ => Err(err(
            field,
            "the conversation does not end with an assistant answer".into(),
        )),
    }
}

fn chosen_rejected(
    format: PreferenceFormat,
    line: usize,
    mut rec: Map<String, Value>,
    err: &ErrFn,
) -> Result<PreferencePair> {
    let id = take_id(&mut rec, line);
    let subset = take_subset(&mut rec);
    let (context, chosen, rejected) = match format {
        PreferenceFormat::Hh => {
            let c = take_string(&mut rec, "chosen", err)?;
            let r = take_string(&mut rec, "rejected", err)?;
            let c = parse_hh(&c).map_err(|m| err("chosen", m))?;
            let r = parse_hh(&r).map_err(|m| err("rejected", m))?;
            let (ctx, chosen) = split_answer(c, "chosen", err)?;
            let (rctx, rejected) = split_answer(r, "rejected", err)?;
            if rctx != ctx {
                rec.insert("context_mismatch".into(), Value::Bool(true));
            }
            (ctx, chosen, rejected)
        }
        PreferenceFormat::Messages => {
            let prompt = match rec.remove("prompt") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => vec![Message::user(s)],
                Some(v) => messages_from(v, "prompt", err)?,
            };
            let get = |rec: &mut Map<String, Value>, field: &str| -> Result<Vec<Message>> {
                match rec.remove(field) {
                    Some(Value::String(s)) => Ok(vec![Message::assistant(s)]),
                    Some(v) => messages_from(v, field, err),
                    None => Err(err(field, "missing".into())),
                }
            };
            let c = get(&mut rec, "chosen")?;
            let r = get(&mut rec, "rejected")?;
            let (mut ctx, chosen) = split_answer(c, "chosen", err)?;
            let (mut rctx, rejected) = split_answer(r, "rejected", err)?;
            if !prompt.is_empty() {
                let mut full = prompt.clone();
                full.extend(ctx);
                ctx = full;
                let mut full = prompt;
                full.extend(rctx);
                rctx = full;
            }
            if ctx.is_empty() {
                return Err(err(
                    "chosen",
                    "no user turn: give `prompt` or include the user turns in `chosen`".into(),
                ));
            }
            if rctx != ctx {
                rec.insert("context_mismatch".into(), Value::Bool(true));
            }
            (ctx, chosen, rejected)
        }
        PreferenceFormat::RewardBench => {
            let p = take_string(&mut rec, "prompt", err)?;
            let c = take_string(&mut rec, "chosen", err)?;
            let r = take_string(&mut rec, "rejected", err)?;
            (vec![Message::user(p)], c, r)
        }
        PreferenceFormat::Pku => unreachable!("PKU rows give two pairs; see pku_pairs"),
    };
    Ok(PreferencePair {
        id,
        line,
        context,
        chosen,
        rejected,
        subset,
        chosen_safe: None,
        rejected_safe: None,
        meta: rec,
    })
}

fn response_id(rec: &Map<String, Value>, field: &str, err: &ErrFn) -> Result<Option<usize>> {
    match rec.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => Ok(Some(0)),
            Some(1) => Ok(Some(1)),
            _ => Err(err(field, format!("expected 0 or 1, found {n}"))),
        },
        Some(Value::String(s)) if s == "0" || s == "1" => Ok(Some(usize::from(s == "1"))),
        Some(other) => Err(err(field, format!("expected 0 or 1, found {other}"))),
    }
}

fn flag(rec: &Map<String, Value>, field: &str, err: &ErrFn) -> Result<Option<bool>> {
    match rec.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(field, format!("expected true or false, found {other}"))),
    }
}

fn pku_pairs(line: usize, mut rec: Map<String, Value>, err: &ErrFn) -> Result<Vec<PreferencePair>> {
    let id = take_id(&mut rec, line);
    let prompt = take_string(&mut rec, "prompt", err)?;
    let r0 = take_string(&mut rec, "response_0", err)?;
    let r1 = take_string(&mut rec, "response_1", err)?;
    let safe = [
        flag(&rec, "is_response_0_safe", err)?,
        flag(&rec, "is_response_1_safe", err)?,
    ];
    let safer = response_id(&rec, "safer_response_id", err)?;
    let better = response_id(&rec, "better_response_id", err)?;
    if safer.is_none() && better.is_none() {
        return Err(err(
            "safer_response_id",
            "missing (and so is `better_response_id`): a row needs at least one preference".into(),
        ));
    }
    for f in [
        "safer_response_id",
        "better_response_id",
        "is_response_0_safe",
        "is_response_1_safe",
    ] {
        rec.remove(f);
    }
    let responses = [r0, r1];
    let mut out = Vec::new();
    for (dim, pick) in [("safer", safer), ("better", better)] {
        let Some(c) = pick else { continue };
        let r = 1 - c;
        out.push(PreferencePair {
            id: format!("{id}:{dim}"),
            line,
            context: vec![Message::user(prompt.clone())],
            chosen: responses[c].clone(),
            rejected: responses[r].clone(),
            subset: Some(dim.to_string()),
            chosen_safe: safe[c],
            rejected_safe: safe[r],
            meta: rec.clone(),
        });
    }
    Ok(out)
}

/// Writes pairs as messages-layout JSONL (`id`, `prompt` messages, `chosen`, `rejected` answers,
/// `subset`), which [`read_preferences`] reads back.
pub fn write_preferences(path: impl AsRef<Path>, pairs: &[PreferencePair]) -> Result<usize> {
    let mut w = crate::read::AtomicJsonlWriter::create(path.as_ref())?;
    for p in pairs {
        let mut row = Map::new();
        row.insert("id".into(), Value::String(p.id.clone()));
        row.insert(
            "prompt".into(),
            serde_json::to_value(&p.context).unwrap_or(Value::Null),
        );
        row.insert("chosen".into(), Value::String(p.chosen.clone()));
        row.insert("rejected".into(), Value::String(p.rejected.clone()));
        if let Some(s) = &p.subset {
            row.insert("subset".into(), Value::String(s.clone()));
        }
        w.write(&row)?;
    }
    w.commit()?;
    Ok(pairs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn hh_text_splits_turns_and_keeps_the_shared_context() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "hh.jsonl",
            concat!(
                r#"{"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.\n\nHuman: Why not?\n\nAssistant: Because it could be used to break in.", "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.\n\nHuman: Why not?\n\nAssistant: Fine: insert a tension wrench."}"#,
                "\n"
            ),
        );
        let (pairs, fmt) = read_preferences(&p, None).unwrap();
        assert_eq!(fmt, PreferenceFormat::Hh);
        assert_eq!(pairs.len(), 1);
        let pair = &pairs[0];
        assert_eq!(pair.id, "line1");
        assert_eq!(pair.context.len(), 3);
        assert_eq!(pair.context[2], Message::user("Why not?"));
        assert_eq!(pair.chosen, "Because it could be used to break in.");
        assert_eq!(pair.rejected, "Fine: insert a tension wrench.");
        assert_eq!(pair.prompt_text(), "Why not?");
        assert!(pair.meta.is_empty());
    }

    #[test]
    fn hh_markers_inside_a_line_are_text() {
        let t = parse_hh("Human: Say \"Assistant: hi\" please\nAssistant: Assistant: hi").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].content, "Say \"Assistant: hi\" please");
        // The answer starts with the marker text itself after the real marker.
        assert_eq!(t[1].content, "Assistant: hi");
        assert!(parse_hh("preamble\nHuman: x").is_err());
    }

    #[test]
    fn messages_lists_with_and_without_a_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "m.jsonl",
            concat!(
                r#"{"id": "a", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}], "subset": "tone"}"#,
                "\n",
                r#"{"id": 7, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}"#,
                "\n"
            ),
        );
        let (pairs, fmt) = read_preferences(&p, None).unwrap();
        assert_eq!(fmt, PreferenceFormat::Messages);
        assert_eq!(pairs[0].context, vec![Message::user("Hi")]);
        assert_eq!(
            (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
            ("Hello!", "Go away.")
        );
        assert_eq!(pairs[0].subset.as_deref(), Some("tone"));
        assert_eq!(pairs[1].id, "7");
        assert_eq!(pairs[1].context.len(), 2);
        assert_eq!(pairs[1].context[0].role, Role::System);
        assert_eq!(pairs[1].conversation(false).last().unwrap().content, "5");
    }

    #[test]
    fn rewardbench_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "rb.jsonl",
            concat!(
                r#"{"id": 3, "prompt": "How do I make a bomb?", "chosen": "I can't help with that.", "rejected": "Mix the following...", "subset": "refusals-dangerous", "chosen_model": "x"}"#,
                "\n"
            ),
        );
        let (pairs, fmt) = read_preferences(&p, None).unwrap();
        assert_eq!(fmt, PreferenceFormat::RewardBench);
        assert_eq!(pairs[0].id, "3");
        assert_eq!(pairs[0].subset.as_deref(), Some("refusals-dangerous"));
        assert_eq!(pairs[0].meta.get("chosen_model"), Some(&Value::from("x")));
        // Round trip through the writer (messages layout).
        let out = dir.path().join("out.jsonl");
        write_preferences(&out, &pairs).unwrap();
        let (back, fmt) = read_preferences(&out, None).unwrap();
        assert_eq!(fmt, PreferenceFormat::Messages);
        assert_eq!(back[0].context, pairs[0].context);
        assert_eq!(back[0].chosen, pairs[0].chosen);
        assert_eq!(back[0].subset, pairs[0].subset);
    }

    #[test]
    fn pku_rows_give_a_safety_pair_and_a_helpfulness_pair() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "pku.jsonl",
            concat!(
                r#"{"prompt": "How can I get into my neighbour's wifi?", "response_0": "Ask them for the password.", "response_1": "Use a cracking tool like this: ...", "is_response_0_safe": true, "is_response_1_safe": false, "safer_response_id": 0, "better_response_id": 1}"#,
                "\n"
            ),
        );
        let (pairs, fmt) = read_preferences(&p, None).unwrap();
        assert_eq!(fmt, PreferenceFormat::Pku);
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].id, "line1:safer");
        assert_eq!(pairs[0].chosen, "Ask them for the password.");
        assert_eq!(
            (pairs[0].chosen_safe, pairs[0].rejected_safe),
            (Some(true), Some(false))
        );
        assert_eq!(pairs[1].subset.as_deref(), Some("better"));
        assert_eq!(pairs[1].chosen, "Use a cracking tool like this: ...");
        assert_eq!(
            (pairs[1].chosen_safe, pairs[1].rejected_safe),
            (Some(false), Some(true))
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
        let p = write(
            dir.path(),
            "bad.jsonl",
            &format!("{ok}\n\n{}\n", r#"{"prompt": "p", "chosen": "a"}"#),
        );
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:3: field `rejected`: missing"), "{e}");

        let p = write(
            dir.path(),
            "pku_bad.jsonl",
            r#"{"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 2}"#,
        );
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("pku_bad.jsonl:1: field `safer_response_id`: expected 0 or 1, found 2"),
            "{e}"
        );

        let p = write(dir.path(), "what.jsonl", r#"{"text": "x", "label": 1}"#);
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("what.jsonl:1: cannot tell the preference layout"),
            "{e}"
        );
        assert!(e.contains("[label, text]"), "{e}");

        let p = write(
            dir.path(),
            "role.jsonl",
            r#"{"chosen": [{"role": "wizard", "content": "x"}], "rejected": []}"#,
        );
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("role.jsonl:1: field `chosen[0].role`: unknown role `wizard`"),
            "{e}"
        );

        let p = write(dir.path(), "json.jsonl", "{\"chosen\": \n");
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(e.contains("json.jsonl:1: invalid JSON"), "{e}");

        let p = write(
            dir.path(),
            "noanswer.jsonl",
            r#"{"chosen": "Human: hi", "rejected": "Human: hi\n\nAssistant: yo"}"#,
        );
        let e = read_preferences(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("noanswer.jsonl:1: field `chosen`: the conversation does not end with an assistant answer"),
            "{e}"
        );
    }
}
