//! A generation run over a prompt file: reads prompts (JSONL with `prompt` or `messages`),
//! generates with any [`Generator`], and appends one JSON row per prompt to the output, flushed
//! as it goes. A rerun skips ids already in the output, so a killed run resumes where it stopped.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
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

/// Ids already written to `out`. A last line cut by a kill is removed from the file.
pub fn finished_ids(out: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    if !out.exists() {
        return Ok(ids);
    }
    let text = std::fs::read_to_string(out).map_err(|e| ModelError::io(out, e))?;
    let mut good_len = 0;
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break; // partial last line
        }
        match serde_json::from_str::<Json>(line) {
            Ok(v) => {
                if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                    ids.insert(id.to_string());
                }
            }
            Err(_) => break,
        }
        good_len += line.len();
    }
    if good_len < text.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(|e| ModelError::io(out, e))?;
        f.set_len(good_len as u64)
            .map_err(|e| ModelError::io(out, e))?;
    }
    Ok(ids)
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
        // A partial line from a kill is dropped on resume.
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
