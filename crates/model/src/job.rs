//! A generation run over a prompt file: reads prompts (JSONL with `prompt` or `messages`),
//! generates with any [`Generator`], and appends one JSON row per prompt to the output, flushed
//! as it goes. A rerun skips ids already in the output, so a killed run resumes where it stopped;
//! a line that holds no finished row is moved to `OUT.corrupt` ([`recover_output`]).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetune_data::{Message, Role};
use serde_json::{json, Map, Value as Json};

use crate::backend::{GenRequest, Generator, Prompt, Sampling};
use crate::error::{ModelError, Result};

/// One prompt of a prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub id: String,
    pub messages: Vec<Message>,
    /// Other fields of the input row, copied to the output under `meta`.
    pub meta: Map<String, Json>,
}

impl PromptRow {
    /// The text shown as `prompt` in the output: the last user turn.
    pub fn prompt_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

/// Reads a JSONL prompt file. Each line has `prompt` (a user turn, with optional `system`) or
/// `messages` (OpenAI style), and optionally `id` (default: the line number).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| ModelError::io(path, e))?;
        let lineno = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| ModelError::format(path, format!("line {lineno}: {msg}"));
        let mut obj: Map<String, Json> = match serde_json::from_str(&line) {
            Ok(Json::Object(o)) => o,
            Ok(_) => return Err(bad("expected a JSON object".into())),
            Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
        };
        let id = match obj.remove("id") {
            Some(Json::String(s)) => s,
            Some(Json::Number(x)) => x.to_string(),
            Some(other) => {
                return Err(bad(format!("`id` must be a string or number, got {other}")))
            }
            None => lineno.to_string(),
        };
        if !seen.insert(id.clone()) {
            return Err(bad(format!("duplicate id {id:?}")));
        }
        let messages = if let Some(m) = obj.remove("messages") {
            let arr = m
                .as_array()
                .ok_or_else(|| bad("`messages` must be an array".into()))?;
            let mut msgs = Vec::new();
            for (k, m) in arr.iter().enumerate() {
                let role = m.get("role").and_then(|r| r.as_str()).and_then(Role::parse);
                let content = m.get("content").and_then(|c| c.as_str());
                match (role, content) {
                    (Some(role), Some(content)) => msgs.push(Message::new(role, content)),
                    _ => {
                        return Err(bad(format!(
                            "messages[{k}] needs a known `role` and a string `content`"
                        )))
                    }
                }
            }
            msgs
        } else if let Some(p) = obj.remove("prompt") {
            let p = p
                .as_str()
                .ok_or_else(|| bad("`prompt` must be a string".into()))?;
            let mut msgs = Vec::new();
            if let Some(Json::String(s)) = obj.remove("system") {
                msgs.push(Message::system(s));
            }
            msgs.push(Message::user(p));
            msgs
        } else {
            return Err(bad("needs a `prompt` or `messages` field".into()));
        };
        if messages.is_empty() {
            return Err(bad("no messages".into()));
        }
        rows.push(PromptRow {
            id,
            messages,
            meta: obj,
        });
    }
    Ok(rows)
}

/// Settings of a generation run.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub sampling: Sampling,
    /// Prompts handed to the generator at once.
    pub batch_size: usize,
    /// Send `prompt` as raw text instead of a chat turn.
    pub raw: bool,
}

/// Progress after each batch.
#[derive(Debug, Clone, Default)]
pub struct JobProgress {
    pub total: usize,
    /// Rows already in the output before this run.
    pub skipped: usize,
    /// Rows written by this run.
    pub done: usize,
    pub completion_tokens: usize,
    pub elapsed_s: f64,
}

impl JobProgress {
    pub fn tokens_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.completion_tokens as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

/// A line of a resumable output that holds no finished row: cut by a kill, or garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptLine {
    /// 1-based line number in the output as it was found.
    pub line: usize,
    /// The line's original bytes, without its newline.
    pub bytes: Vec<u8>,
}

/// What [`recover_output`] found in an output before resuming it.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Ids of the finished rows, which are kept.
    pub ids: HashSet<String>,
    /// Lines moved to [`corrupt_path`]; any row they held is redone.
    pub corrupt: Vec<CorruptLine>,
    /// Whether the output was rewritten (bad lines dropped, a missing last newline added).
    pub rewritten: bool,
}

/// Where [`recover_output`] moves the bad lines of `out`: `OUT.corrupt` next to it.
pub fn corrupt_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".corrupt");
    out.with_file_name(name)
}

/// The id of one output line, if it is a finished row: a JSON object with a string or number
/// `id`.
fn row_id(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    match serde_json::from_str::<Json>(text).ok()?.get("id")? {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads a resumable JSONL output before a run appends to it, and repairs it without losing a
/// finished row. Every line that is a JSON object with an `id` is a finished row and is kept
/// byte for byte; blank lines are dropped; every other line (a last line cut by a kill, garbage
/// anywhere) is appended, as it was, to `OUT.corrupt` ([`corrupt_path`]) and left out of `out`,
/// so its row is redone. The bad lines are saved before `out` is replaced, and `out` is replaced
/// atomically ([`safetune_data::util::write_atomic`]): a crash at any point loses nothing. A
/// complete last row without its newline is kept and the newline added. A missing `out` is an
/// empty one.
pub fn recover_output(out: &Path) -> Result<Recovered> {
    let mut rec = Recovered::default();
    let bytes = match std::fs::read(out) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(rec),
        Err(e) => return Err(ModelError::io(out, e)),
    };
    let mut kept = Vec::with_capacity(bytes.len());
    let mut dirty = false;
    let mut lines = bytes.split(|&b| b == b'\n').peekable();
    let mut n = 0;
    while let Some(line) = lines.next() {
        n += 1;
        let last = lines.peek().is_none();
        if last && line.is_empty() {
            break; // the file ended with a newline
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            dirty = true;
            continue;
        }
        match row_id(line) {
            Some(id) => {
                rec.ids.insert(id);
                kept.extend_from_slice(line);
                kept.push(b'\n');
                dirty |= last; // the newline was missing
            }
            None => {
                rec.corrupt.push(CorruptLine {
                    line: n,
                    bytes: line.to_vec(),
                });
                dirty = true;
            }
        }
    }
    if !dirty {
        return Ok(rec);
    }
    if !rec.corrupt.is_empty() {
        let cpath = corrupt_path(out);
        let mut moved = Vec::new();
        for c in &rec.corrupt {
            moved.extend_from_slice(&c.bytes);
            moved.push(b'\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cpath)
            .map_err(|e| ModelError::io(&cpath, e))?;
        f.write_all(&moved)
            .and_then(|()| f.sync_all())
            .map_err(|e| ModelError::io(&cpath, e))?;
    }
    safetune_data::util::write_atomic(out, &kept).map_err(|e| ModelError::io(out, e))?;
    rec.rewritten = true;
    Ok(rec)
}

/// Ids already written to `out`, after [`recover_output`] has moved its bad lines aside; each
/// moved line is reported on stderr with the file and line number.
pub fn finished_ids(out: &Path) -> Result<HashSet<String>> {
    let rec = recover_output(out)?;
    let cpath = corrupt_path(out);
    for c in &rec.corrupt {
        eprintln!(
            "warning: {}: line {} is not a complete JSON row with an id; moved it to {} (its row, if any, is done again)",
            out.display(),
            c.line,
            cpath.display()
        );
    }
    Ok(rec.ids)
}

/// A seed per row from the run's seed and the row id, so a resumed run samples what an
/// uninterrupted one would have.
fn row_seed(seed: u64, id: &str) -> u64 {
    seed ^ safetune_data::util::fnv1a64(id.as_bytes())
}

/// Generates for every prompt not yet in `out`, appending rows
/// `{id, prompt, messages, response, finish_reason, prompt_tokens, completion_tokens, model, meta}`.
pub fn run_generation(
    generator: &dyn Generator,
    prompts: &[PromptRow],
    out: &Path,
    opts: &JobOptions,
    progress: &mut dyn FnMut(&JobProgress),
) -> Result<JobProgress> {
    let done_ids = finished_ids(out)?;
    let pending: Vec<&PromptRow> = prompts
        .iter()
        .filter(|p| !done_ids.contains(&p.id))
        .collect();
    let mut prog = JobProgress {
        total: prompts.len(),
        skipped: prompts.len() - pending.len(),
        ..Default::default()
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| ModelError::io(out, e))?;
    let start = Instant::now();
    progress(&prog);
    for chunk in pending.chunks(opts.batch_size.max(1)) {
        let requests: Vec<GenRequest> = chunk
            .iter()
            .map(|p| {
                let prompt = if opts.raw {
                    Prompt::Text(
                        p.messages
                            .iter()
                            .map(|m| m.content.as_str())
                            .collect::<Vec<_>>()
                            .join("\n"),
                    )
                } else {
                    Prompt::Chat(p.messages.clone())
                };
                GenRequest {
                    prompt,
                    sampling: Sampling {
                        seed: row_seed(opts.sampling.seed, &p.id),
                        ..opts.sampling.clone()
                    },
                }
            })
            .collect();
        let outputs = generator
            .generate(&requests)
            .map_err(|e| ModelError::Other(format!("generation failed: {e}")))?;
        for (p, o) in chunk.iter().zip(outputs) {
            let row = json!({
                "id": p.id,
                "prompt": p.prompt_text(),
                "messages": p.messages,
                "response": o.text,
                "finish_reason": o.finish_reason.as_str(),
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "model": generator.model_id(),
                "meta": p.meta,
            });
            writeln!(file, "{row}").map_err(|e| ModelError::io(out, e))?;
            prog.completion_tokens += o.completion_tokens;
            prog.done += 1;
        }
        file.flush().map_err(|e| ModelError::io(out, e))?;
        prog.elapsed_s = start.elapsed().as_secs_f64();
        progress(&prog);
    }
    Ok(prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::{BackendError, FinishReason, GenOutput, TokenSink};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn row_seed_is_pinned() {
        assert_eq!(row_seed(0, "p-1"), 8681573497451636757);
        assert_eq!(row_seed(42, "advbench:17"), 9511817318546591284);
    }

    /// Echoes the last user turn; fails once after `fail_after` calls to mimic a kill.
    struct Echo {
        calls: AtomicUsize,
        fail_after: usize,
    }

    impl Generator for Echo {
        fn model_id(&self) -> &str {
            "echo"
        }
        fn generate_streaming(
            &self,
            reqs: &[GenRequest],
            _sink: TokenSink<'_>,
        ) -> Result<Vec<GenOutput>, BackendError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
                return Err(BackendError::Unavailable("killed".into()));
            }
            Ok(reqs
                .iter()
                .map(|r| match &r.prompt {
                    Prompt::Chat(m) => GenOutput {
                        text: m
                            .last()
                            .map(|m| m.content.to_uppercase())
                            .unwrap_or_default(),
                        prompt_tokens: 1,
                        completion_tokens: 2,
                        finish_reason: FinishReason::Stop,
                    },
                    Prompt::Text(t) => GenOutput {
                        text: t.clone(),
                        prompt_tokens: 1,
                        completion_tokens: 2,
                        finish_reason: FinishReason::Length,
                    },
                })
                .collect())
        }
    }

    #[test]
    fn resumes_after_a_failure_and_skips_finished_ids() {
        let dir = tempfile::tempdir().unwrap();
        let prompts_path = dir.path().join("p.jsonl");
        std::fs::write(
            &prompts_path,
            "{\"id\": \"a\", \"prompt\": \"one\", \"category\": \"x\"}\n{\"prompt\": \"two\"}\n\n{\"id\": 7, \"messages\": [{\"role\": \"user\", \"content\": \"three\"}]}\n",
        )
        .unwrap();
        let prompts = read_prompts(&prompts_path).unwrap();
        assert_eq!(
            prompts.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["a", "2", "7"]
        );
        let out = dir.path().join("out").join("gen.jsonl");
        let opts = JobOptions {
            sampling: Sampling::default(),
            batch_size: 2,
            raw: false,
        };
        let failing = Echo {
            calls: AtomicUsize::new(0),
            fail_after: 1,
        };
        assert!(run_generation(&failing, &prompts, &out, &opts, &mut |_| {}).is_err());
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
        // A partial line from a kill is moved to OUT.corrupt on resume and its row redone.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&out)
            .unwrap()
            .write_all(b"{\"id\": \"7\", \"resp")
            .unwrap();
        let ok = Echo {
            calls: AtomicUsize::new(0),
            fail_after: usize::MAX,
        };
        let prog = run_generation(&ok, &prompts, &out, &opts, &mut |_| {}).unwrap();
        assert_eq!((prog.skipped, prog.done), (2, 1));
        let rows: Vec<Json> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["response"], "ONE");
        assert_eq!(rows[0]["meta"]["category"], "x");
        assert_eq!(rows[2]["id"], "7");
        assert_eq!(rows[2]["finish_reason"], "stop");
        assert_eq!(
            std::fs::read_to_string(corrupt_path(&out)).unwrap(),
            "{\"id\": \"7\", \"resp\n"
        );
    }

    #[test]
    fn resume_moves_bad_lines_aside_and_keeps_every_finished_row() {
        let dir = tempfile::tempdir().unwrap();
        let prompts: Vec<PromptRow> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| PromptRow {
                id: id.to_string(),
                messages: vec![Message::user(format!("say {id}"))],
                meta: Map::new(),
            })
            .collect();
        let opts = JobOptions {
            sampling: Sampling::default(),
            batch_size: 3,
            raw: false,
        };
        let ok = || Echo {
            calls: AtomicUsize::new(0),
            fail_after: usize::MAX,
        };
        let clean = dir.path().join("clean.jsonl");
        run_generation(&ok(), &prompts, &clean, &opts, &mut |_| {}).unwrap();
        let clean_text = std::fs::read_to_string(&clean).unwrap();
        let rows: Vec<&str> = clean_text.lines().collect();
        assert_eq!(rows.len(), 4);
        // Row a, garbage in the middle, row c, then row d cut by a kill; row b is missing.
        let out = dir.path().join("gen.jsonl");
        let cut = &rows[3][..rows[3].len() / 2];
        let damaged = format!("{}\nnot json {{\n{}\n{cut}", rows[0], rows[2]);
        std::fs::write(&out, &damaged).unwrap();
        let prog = run_generation(&ok(), &prompts, &out, &opts, &mut |_| {}).unwrap();
        assert_eq!((prog.skipped, prog.done), (2, 2));
        // The finished rows are kept byte for byte and first; b and d are generated again.
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text,
            format!("{}\n{}\n{}\n{}\n", rows[0], rows[2], rows[1], rows[3])
        );
        assert_eq!(
            std::fs::read_to_string(corrupt_path(&out)).unwrap(),
            format!("not json {{\n{cut}\n")
        );
        // A clean output is left alone, and no corrupt file appears.
        let before = std::fs::metadata(&out).unwrap().modified().unwrap();
        let rec = recover_output(&out).unwrap();
        assert!(!rec.rewritten && rec.corrupt.is_empty());
        assert_eq!(rec.ids.len(), 4);
        assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), before);
        assert!(!corrupt_path(&clean).exists());
    }

    #[test]
    fn recover_output_numbers_lines_appends_to_the_corrupt_file_and_keeps_a_complete_last_row() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let cpath = corrupt_path(&out);
        assert_eq!(cpath, dir.path().join("o.jsonl.corrupt"));
        std::fs::write(&cpath, "earlier\n").unwrap();
        // Line 2 is blank, line 3 an object without id, line 4 invalid UTF-8, line 5 a JSON
        // array; line 6 is a complete row whose newline is missing.
        std::fs::write(
            &out,
            b"{\"id\": \"x\"}\n\n{\"no\": 1}\n\xff\xfe\n[1]\n{\"id\": 9}",
        )
        .unwrap();
        let rec = recover_output(&out).unwrap();
        assert!(rec.rewritten);
        assert_eq!(
            rec.ids,
            ["x", "9"]
                .iter()
                .map(|s| s.to_string())
                .collect::<HashSet<_>>()
        );
        let lines: Vec<usize> = rec.corrupt.iter().map(|c| c.line).collect();
        assert_eq!(lines, [3, 4, 5]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"{\"id\": \"x\"}\n{\"id\": 9}\n"
        );
        assert_eq!(
            std::fs::read(&cpath).unwrap(),
            b"earlier\n{\"no\": 1}\n\xff\xfe\n[1]\n"
        );
        // A missing output is an empty one.
        let rec = recover_output(&dir.path().join("none.jsonl")).unwrap();
        assert!(rec.ids.is_empty() && !rec.rewritten);
    }

    #[test]
    fn bad_prompt_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n").unwrap();
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("p.jsonl") && e.contains("line 2"), "{e}");
    }
}
