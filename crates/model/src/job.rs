//! Resumable JSONL jobs. [`run_resumable`] is the one runner every resuming command appends its
//! rows with (generate, judge, rm score, the HTTP row runner): a rerun skips ids already in the
//! output, so a killed run resumes where it stopped, and a line that holds no finished row is
//! moved to `OUT.corrupt` ([`recover_output`]). On it, [`run_generation`] reads prompts (JSONL
//! with `prompt` or `messages`), generates with any [`Generator`], and appends one JSON row per
//! prompt.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use safetune_data::{Message, Role};
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

use crate::backend::{
    BackendError, GenOutput, GenRequest, Generator, Prompt, RequestFeed, Sampling,
};
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
    /// Finished rows appended to the output at once. The generator takes prompts as it has room
    /// for them (its own batch size is set when it is loaded).
    pub batch_size: usize,
    /// Send `prompt` as raw text instead of a chat turn.
    pub raw: bool,
}

/// Progress of a resumable run ([`run_resumable`]), reported after each chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobProgress {
    /// Input rows.
    pub total: usize,
    /// Rows already in the output before this run.
    pub skipped: usize,
    /// Rows written by this run.
    pub done: usize,
    /// Tokens generated by this run (0 for work that generates none).
    pub completion_tokens: usize,
    pub elapsed_s: f64,
}

impl JobProgress {
    /// Rows in the output now.
    pub fn finished(&self) -> usize {
        self.skipped + self.done
    }

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

/// The work of [`run_resumable`] on one chunk: the chunk's rows and the progress so far, to one
/// output row each.
pub type ChunkWork<'a, T, E> =
    dyn FnMut(&[&T], &mut JobProgress) -> std::result::Result<Vec<Json>, E> + 'a;

/// Why [`run_resumable`] stopped.
#[derive(Debug)]
pub enum ResumeError<E> {
    /// Two input rows share this id, so a rerun could not tell them apart.
    DuplicateId(String),
    /// Reading, repairing or appending to the output failed.
    Output(ModelError),
    /// The work on a chunk failed; every earlier chunk is in the output.
    Work(E),
}

/// The one resumable JSONL runner, under every command that resumes (`safetune generate`,
/// `judge`, `rm score`, and the row runner of the HTTP stages): runs `work` over the rows of
/// `rows` whose id is not yet in `out`, `chunk_size` (at least 1) rows at a time, and appends the
/// JSON objects it returns, one line per row.
///
/// Rules: ids must be unique ([`ResumeError::DuplicateId`], checked before anything is read or
/// written); the output is repaired first ([`finished_ids`]: a line that holds no finished row
/// is moved to `OUT.corrupt` and its row redone); missing parent directories are created; each
/// chunk's rows are appended in one write, flushed and synced before `progress` hears of them,
/// so a failure or a kill loses at most the chunk in flight. `work` gets the chunk and the
/// progress so far (to count tokens, or to say how many rows are kept in its error) and must
/// return one row per input row.
pub fn run_resumable<T, E>(
    rows: &[T],
    id: impl Fn(&T) -> &str,
    out: &Path,
    chunk_size: usize,
    work: &mut ChunkWork<'_, T, E>,
    progress: &mut dyn FnMut(&JobProgress),
) -> std::result::Result<JobProgress, ResumeError<E>> {
    let (pending, mut output) = ResumableOutput::open(rows, id, out)?;
    progress(&output.prog);
    for chunk in pending.chunks(chunk_size.max(1)) {
        let rows = work(chunk, &mut output.prog).map_err(ResumeError::Work)?;
        if rows.len() != chunk.len() {
            return Err(ResumeError::Output(ModelError::Other(format!(
                "{}: {} rows came back for a chunk of {}; {} of {} rows are kept and a rerun resumes",
                out.display(),
                rows.len(),
                chunk.len(),
                output.prog.finished(),
                output.prog.total
            ))));
        }
        output.append(&rows).map_err(ResumeError::Output)?;
        progress(&output.prog);
    }
    Ok(output.finish())
}

/// The output of a resumable run, opened for appending after its bad lines were moved aside.
pub struct ResumableOutput<'a> {
    path: &'a Path,
    file: std::fs::File,
    start: Instant,
    /// Rows of the run so far (`done` counts the rows appended).
    pub prog: JobProgress,
}

impl<'a> ResumableOutput<'a> {
    /// Checks that ids are unique, repairs `out` and opens it: the rows of `rows` still to do,
    /// and the output to append them to (see [`run_resumable`] for the rules).
    pub fn open<T, E>(
        rows: &'a [T],
        id: impl Fn(&T) -> &str,
        out: &'a Path,
    ) -> std::result::Result<(Vec<&'a T>, ResumableOutput<'a>), ResumeError<E>> {
        let mut seen = HashSet::new();
        for r in rows {
            if !seen.insert(id(r)) {
                return Err(ResumeError::DuplicateId(id(r).to_string()));
            }
        }
        let done_ids = finished_ids(out).map_err(ResumeError::Output)?;
        let pending: Vec<&T> = rows.iter().filter(|r| !done_ids.contains(id(r))).collect();
        let prog = JobProgress {
            total: rows.len(),
            skipped: rows.len() - pending.len(),
            ..Default::default()
        };
        let io = |p: &Path, e| ResumeError::Output(ModelError::io(p, e));
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .map_err(|e| io(out, e))?;
        let output = ResumableOutput {
            path: out,
            file,
            start: Instant::now(),
            prog,
        };
        Ok((pending, output))
    }

    /// Appends `rows` in one write, flushed and synced, and counts them as done.
    pub fn append(&mut self, rows: &[Json]) -> Result<()> {
        let mut text = String::new();
        for row in rows {
            text.push_str(&row.to_string());
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ModelError::io(self.path, e))?;
        self.prog.done += rows.len();
        self.prog.elapsed_s = self.start.elapsed().as_secs_f64();
        Ok(())
    }

    /// The run's progress at its end.
    pub fn finish(mut self) -> JobProgress {
        self.prog.elapsed_s = self.start.elapsed().as_secs_f64();
        self.prog
    }
}

/// Why [`run_fed`] stopped.
#[derive(Debug)]
pub enum FedError<E> {
    /// A request or the generator failed; every row finished before it was committed.
    Generator(BackendError),
    /// `commit` failed; no request started after it.
    Commit(E),
}

/// Runs requests `0..n` (built by `request`) through [`Generator::generate_fed`], so a backend
/// that can refills a finished row's slot with the next request at once, and hands finished rows
/// to `commit` on this thread while generation goes on: `(index, output)` pairs, `group` at a
/// time (0: every row finished since the last call). After the first failed request no new one
/// starts; the running ones finish and are committed, then the error is returned.
pub fn run_fed<E>(
    generator: &dyn Generator,
    n: usize,
    request: &(dyn Fn(usize) -> GenRequest + Sync),
    group: usize,
    commit: &mut dyn FnMut(Vec<(usize, GenOutput)>) -> std::result::Result<(), E>,
) -> std::result::Result<(), FedError<E>> {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let mut feed = ChannelFeed {
        n,
        request,
        next: 0,
        stop: &stop,
        tx,
    };
    let mut failed: Option<FedError<E>> = None;
    let mut buf = Vec::new();
    let mut flush = |buf: &mut Vec<(usize, GenOutput)>, failed: &mut Option<FedError<E>>| {
        if buf.is_empty() || matches!(failed, Some(FedError::Commit(_))) {
            return;
        }
        if let Err(e) = commit(std::mem::take(buf)) {
            stop.store(true, Ordering::SeqCst);
            *failed = Some(FedError::Commit(e));
        }
    };
    let ran = std::thread::scope(|scope| {
        let worker = scope.spawn(move || generator.generate_fed(&mut feed));
        // Ends when the worker has returned and so dropped the feed's sender.
        while let Ok(first) = rx.recv() {
            for (key, out) in std::iter::once(first).chain(rx.try_iter()) {
                match out {
                    Ok(o) => buf.push((key, o)),
                    Err(e) => {
                        failed.get_or_insert(FedError::Generator(e));
                    }
                }
                if group > 0 && buf.len() >= group {
                    flush(&mut buf, &mut failed);
                }
            }
            if group == 0 {
                flush(&mut buf, &mut failed);
            }
        }
        worker.join()
    });
    flush(&mut buf, &mut failed);
    match ran {
        Err(_) => Err(FedError::Generator(BackendError::Other(
            "the generator panicked".into(),
        ))),
        Ok(Err(e)) => Err(failed.unwrap_or(FedError::Generator(e))),
        Ok(Ok(())) => failed.map_or(Ok(()), Err),
    }
}

/// The feed of [`run_fed`]: requests in index order until they run out or `stop` is set; finished
/// ones go back to the committing thread over `tx`.
struct ChannelFeed<'a> {
    n: usize,
    request: &'a (dyn Fn(usize) -> GenRequest + Sync),
    next: usize,
    stop: &'a AtomicBool,
    tx: mpsc::Sender<(usize, std::result::Result<GenOutput, BackendError>)>,
}

impl RequestFeed for ChannelFeed<'_> {
    fn next(&mut self) -> Option<(usize, GenRequest)> {
        if self.stop.load(Ordering::SeqCst) || self.next >= self.n {
            return None;
        }
        self.next += 1;
        Some((self.next - 1, (self.request)(self.next - 1)))
    }

    fn piece(&mut self, _key: usize, _piece: &str) {}

    fn done(&mut self, key: usize, out: std::result::Result<GenOutput, BackendError>) {
        if out.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
        // The receiver lives until the generator's call has returned.
        let _ = self.tx.send((key, out));
    }

    fn cancelled(&self, _key: usize) -> bool {
        false
    }
}

/// A seed per row from the run's seed and the row id, so a resumed run samples what an
/// uninterrupted one would have.
fn row_seed(seed: u64, id: &str) -> u64 {
    seed ^ safetune_data::util::fnv1a64(id.as_bytes())
}

/// Generates for every prompt not yet in `out`, appending rows
/// `{id, prompt, messages, response, finish_reason, prompt_tokens, completion_tokens, model, meta}`
/// in the order they finish (in input order within one append). The prompts are fed to the generator ([`run_fed`]), so a local
/// engine gives a finished row's slot to the next prompt at once; finished rows are appended
/// `batch_size` at a time (and the rest at the end, or when a request fails).
pub fn run_generation(
    generator: &dyn Generator,
    prompts: &[PromptRow],
    out: &Path,
    opts: &JobOptions,
    progress: &mut dyn FnMut(&JobProgress),
) -> Result<JobProgress> {
    let model = generator.model_id().to_string();
    let (pending, mut output) =
        ResumableOutput::open(prompts, |p| p.id.as_str(), out).map_err(|e| match e {
            ResumeError::DuplicateId(id) => ModelError::Other(format!(
                "prompt id {id:?} appears twice; ids must be unique for a run to resume"
            )),
            ResumeError::Output(e) | ResumeError::Work(e) => e,
        })?;
    progress(&output.prog);
    let request = |i: usize| gen_request(pending[i], opts);
    let mut commit = |mut done: Vec<(usize, GenOutput)>| -> Result<()> {
        done.sort_by_key(|d| d.0);
        let rows: Vec<Json> = done
            .into_iter()
            .map(|(i, o)| {
                let p = pending[i];
                output.prog.completion_tokens += o.completion_tokens;
                json!({
                    "id": p.id,
                    "prompt": p.prompt_text(),
                    "messages": p.messages,
                    "response": o.text,
                    "finish_reason": o.finish_reason.as_str(),
                    "prompt_tokens": o.prompt_tokens,
                    "completion_tokens": o.completion_tokens,
                    "model": model,
                    "meta": p.meta,
                })
            })
            .collect();
        output.append(&rows)?;
        progress(&output.prog);
        Ok(())
    };
    match run_fed(
        generator,
        pending.len(),
        &request,
        opts.batch_size.max(1),
        &mut commit,
    ) {
        Ok(()) => Ok(output.finish()),
        Err(FedError::Commit(e)) => Err(e),
        Err(FedError::Generator(e)) => Err(ModelError::Other(format!("generation failed: {e}"))),
    }
}

/// The request for one prompt: its chat turns (or, `raw`, their text joined by newlines) with the
/// row's own seed.
fn gen_request(p: &PromptRow, opts: &JobOptions) -> GenRequest {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::{FinishReason, TokenSink};
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn row_seed_is_pinned() {
        assert_eq!(row_seed(0, "p-1"), 8681573497451636757);
        assert_eq!(row_seed(42, "advbench:17"), 9511817318546591284);
    }

    /// Echoes the last user turn, two requests a call; fails every call after the first
    /// `fail_after` to mimic a kill.
    struct Echo {
        calls: AtomicUsize,
        fail_after: usize,
    }

    impl Generator for Echo {
        fn model_id(&self) -> &str {
            "echo"
        }
        fn max_batch(&self) -> usize {
            2
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

    /// The shared runner on its own: ids checked before anything is touched, chunks appended as
    /// they finish, a failed chunk leaving the earlier ones, a short chunk refused, and a rerun
    /// doing only what is missing.
    #[test]
    fn run_resumable_appends_chunks_and_resumes_from_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub").join("o.jsonl");
        let rows = ["a", "b", "c", "d", "e"];
        let row = |id: &&str| json!({"id": id, "v": id.to_uppercase()});
        let dup = run_resumable(
            &["x", "y", "x"],
            |r| *r,
            &out,
            2,
            &mut |c: &[&&str], _: &mut JobProgress| {
                Ok::<_, String>(c.iter().map(|r| row(r)).collect())
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(dup, ResumeError::DuplicateId(ref id) if id == "x"),
            "{dup:?}"
        );
        assert!(!out.exists() && !dir.path().join("sub").exists());
        // The second chunk fails: the first is kept and reported, nothing of the second is.
        let mut calls = 0;
        let mut seen = Vec::new();
        let err = run_resumable(
            &rows,
            |r| *r,
            &out,
            2,
            &mut |c: &[&&str], p: &mut JobProgress| {
                calls += 1;
                if calls == 2 {
                    return Err(format!("failed with {} kept", p.finished()));
                }
                p.completion_tokens += 10;
                Ok(c.iter().map(|r| row(r)).collect())
            },
            &mut |p| seen.push((p.done, p.completion_tokens)),
        )
        .unwrap_err();
        assert!(
            matches!(err, ResumeError::Work(ref m) if m == "failed with 2 kept"),
            "{err:?}"
        );
        assert_eq!(seen, [(0, 0), (2, 10)]);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":\"a\",\"v\":\"A\"}\n{\"id\":\"b\",\"v\":\"B\"}\n"
        );
        // A chunk that comes back short is refused, naming the file; nothing of it is written.
        let short = run_resumable(
            &rows,
            |r| *r,
            &out,
            2,
            &mut |c: &[&&str], _: &mut JobProgress| Ok::<_, String>(vec![row(c[0])]),
            &mut |_| {},
        )
        .unwrap_err();
        let ResumeError::Output(e) = short else {
            panic!("{short:?}")
        };
        assert!(
            e.to_string()
                .contains("o.jsonl: 1 rows came back for a chunk of 2"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
        // The rerun skips a and b and writes the rest.
        let mut asked = Vec::new();
        let prog = run_resumable(
            &rows,
            |r| *r,
            &out,
            2,
            &mut |c: &[&&str], _: &mut JobProgress| {
                asked.extend(c.iter().map(|r| r.to_string()));
                Ok::<_, String>(c.iter().map(|r| row(r)).collect())
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(asked, ["c", "d", "e"]);
        assert_eq!(
            (prog.total, prog.skipped, prog.done, prog.finished()),
            (5, 2, 3, 5)
        );
        let ids: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Json>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids, rows);
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

    /// Runs the feed two requests at a time, refilling a slot as soon as a request finishes; the
    /// 1-based request `fail_at` fails. With `wait_for_store`, it waits after each finished
    /// request until the stage has stored it.
    struct Slots {
        calls: AtomicUsize,
        fail_at: Option<usize>,
        wait_for_store: Option<Arc<AtomicUsize>>,
        started: Mutex<Vec<usize>>,
    }

    impl Generator for Slots {
        fn model_id(&self) -> &str {
            "slots"
        }
        fn max_batch(&self) -> usize {
            2
        }
        fn generate_streaming(
            &self,
            _: &[GenRequest],
            _: TokenSink<'_>,
        ) -> Result<Vec<GenOutput>, BackendError> {
            unreachable!("the stage feeds requests")
        }
        fn generate_fed(&self, feed: &mut dyn RequestFeed) -> Result<(), BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut running = std::collections::VecDeque::new();
            let mut finished = 0;
            loop {
                while running.len() < 2 {
                    match feed.next() {
                        Some(r) => {
                            self.started.lock().unwrap().push(r.0);
                            running.push_back(r);
                        }
                        None => break,
                    }
                }
                let Some((key, req)) = running.pop_front() else {
                    return Ok(());
                };
                finished += 1;
                let out = if Some(finished) == self.fail_at {
                    Err(BackendError::Unavailable("outage".into()))
                } else {
                    let Prompt::Chat(m) = &req.prompt else {
                        unreachable!()
                    };
                    Ok(GenOutput {
                        text: format!("answer to {}", m[0].content),
                        prompt_tokens: 1,
                        completion_tokens: 2,
                        finish_reason: FinishReason::Stop,
                    })
                };
                let ok = out.is_ok();
                feed.done(key, out);
                if let (Some(stored), true) = (&self.wait_for_store, ok) {
                    let t = Instant::now();
                    while stored.load(Ordering::SeqCst) < finished {
                        assert!(
                            t.elapsed() < Duration::from_secs(20),
                            "row {key} not stored"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }

    fn slots(fail_at: Option<usize>, wait: Option<Arc<AtomicUsize>>) -> Slots {
        Slots {
            calls: AtomicUsize::new(0),
            fail_at,
            wait_for_store: wait,
            started: Mutex::new(Vec::new()),
        }
    }

    fn request(i: usize) -> GenRequest {
        GenRequest {
            prompt: Prompt::Chat(vec![Message::user(format!("prompt {i}"))]),
            sampling: Sampling::default(),
        }
    }

    /// Rows by index as `run_fed` commits them, and the size of each commit.
    type Committed = (Vec<(usize, String)>, Vec<usize>);

    fn commits<'a>(
        out: &'a mut Committed,
        stored: Option<&'a AtomicUsize>,
    ) -> impl FnMut(Vec<(usize, GenOutput)>) -> std::result::Result<(), String> + 'a {
        move |rows| {
            out.1.push(rows.len());
            if let Some(s) = stored {
                s.fetch_add(rows.len(), Ordering::SeqCst);
            }
            out.0.extend(rows.into_iter().map(|(i, o)| (i, o.text)));
            Ok(())
        }
    }

    #[test]
    fn one_call_feeds_every_request_and_rows_are_committed_while_it_runs() {
        let stored = Arc::new(AtomicUsize::new(0));
        let g = slots(None, Some(stored.clone()));
        let mut out = Committed::default();
        run_fed(&g, 5, &request, 0, &mut commits(&mut out, Some(&stored))).unwrap();
        // One call for 5 requests on 2 slots: the slots refill across the run.
        assert_eq!(g.calls.load(Ordering::SeqCst), 1);
        // The generator waited for each row to be committed, so each was committed alone.
        assert_eq!(out.1, vec![1; 5]);
        let want: Vec<(usize, String)> = (0..5)
            .map(|i| (i, format!("answer to prompt {i}")))
            .collect();
        assert_eq!(out.0, want);
    }

    #[test]
    fn a_group_size_commits_rows_in_groups() {
        let g = slots(None, None);
        let mut out = Committed::default();
        run_fed(&g, 5, &request, 2, &mut commits(&mut out, None)).unwrap();
        assert_eq!(out.1, vec![2, 2, 1]);
    }

    #[test]
    fn after_a_failed_request_no_new_one_starts_and_finished_rows_are_committed() {
        let g = slots(Some(3), None);
        let mut out = Committed::default();
        let r = run_fed(&g, 6, &request, 0, &mut commits(&mut out, None));
        assert!(
            matches!(r, Err(FedError::Generator(BackendError::Unavailable(ref m))) if m == "outage"),
            "{r:?}"
        );
        // 0 and 1 finished; 2 failed; 3 was running beside it and finishes; 4 never starts.
        let mut done: Vec<usize> = out.0.iter().map(|r| r.0).collect();
        done.sort();
        assert_eq!(done, [0, 1, 3]);
        assert_eq!(*g.started.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_commit_error_stops_the_run() {
        let g = slots(None, None);
        let mut calls = 0;
        let r = run_fed(&g, 6, &request, 1, &mut |_| {
            calls += 1;
            Err("disk full")
        });
        assert!(matches!(r, Err(FedError::Commit("disk full"))), "{r:?}");
        assert_eq!(calls, 1, "nothing is committed after a commit failed");
    }
}
