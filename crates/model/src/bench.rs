//! Decode throughput of the local engine, measured through the same batched generation loop that
//! `safetune generate` uses (bench/decode_throughput.py compares it against llama.cpp and
//! transformers).

use std::time::Duration;

use serde::Serialize;

use crate::backend::Sampling;
use crate::error::{ModelError, Result};
use crate::generate::{generate_batch_timed, SeqRequest};
use crate::llama::Llama;
use crate::tokenizer::Tok;

/// What one measured batch did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeRun {
    pub batch: usize,
    pub prompt_tokens: usize,
    /// New tokens per row.
    pub new_tokens: usize,
    /// Seconds of the prompt forward pass (to the first logits).
    pub prefill_s: f64,
    /// Seconds from the first logits until every row has `new_tokens` tokens.
    pub decode_s: f64,
    /// `batch * new_tokens / decode_s`.
    pub decode_tokens_per_s: f64,
    /// `batch * new_tokens / (prefill_s + decode_s)`.
    pub end_to_end_tokens_per_s: f64,
    /// The generated ids of every row.
    pub output_ids: Vec<Vec<u32>>,
}

/// `batch` prompts of exactly `len` token ids each, from varied English text (no special
/// tokens), different in every row.
pub fn synthetic_prompts(tok: &Tok, batch: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    const TOPICS: [&str; 8] = [
        "the water cycle",
        "how bridges carry load",
        "the history of printing",
        "why the sky is blue",
        "how vaccines train the immune system",
        "the rules of chess",
        "how a compiler works",
        "the migration of birds",
    ];
    const FILLER: &str = "Please answer carefully and in detail, with examples, the main ideas, \
        common misunderstandings and a short summary at the end. Use plain language that a \
        curious student can follow, define every technical word the first time it appears, and \
        say which parts are still debated among experts. ";
    (0..batch)
        .map(|r| {
            let topic = TOPICS[r % TOPICS.len()];
            let mut text = format!("Question {}: explain {topic}. ", r + 1);
            let mut ids = tok.encode(&text, false)?;
            while ids.len() < len {
                text.push_str(FILLER);
                ids = tok.encode(&text, false)?;
            }
            ids.truncate(len);
            Ok(ids)
        })
        .collect()
}

/// Greedy decoding of exactly `new_tokens` tokens after each prompt, all prompts in one batch
/// (end-of-turn tokens do not stop a row), timed. Prompts must all have the same length.
pub fn decode_throughput(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<DecodeRun> {
    let prompt_tokens = prompts.first().map(Vec::len).unwrap_or(0);
    if prompts.is_empty() || prompt_tokens == 0 || new_tokens == 0 {
        return Err(ModelError::Other(
            "decode benchmark: need at least one non-empty prompt and one new token".into(),
        ));
    }
    if let Some(i) = prompts.iter().position(|p| p.len() != prompt_tokens) {
        return Err(ModelError::Other(format!(
            "decode benchmark: prompt {i} has {} tokens, prompt 0 has {prompt_tokens}",
            prompts[i].len()
        )));
    }
    let max_pos = model.cfg.max_position_embeddings;
    if prompt_tokens + new_tokens > max_pos {
        return Err(ModelError::Other(format!(
            "decode benchmark: {prompt_tokens} + {new_tokens} tokens exceed the model's context \
             of {max_pos}"
        )));
    }
    let mut no_stop = tok.clone();
    no_stop.stop_ids.clear();
    let reqs: Vec<SeqRequest> = prompts
        .iter()
        .map(|p| SeqRequest {
            prompt_ids: p.clone(),
            sampling: Sampling {
                temperature: 0.0,
                max_new_tokens: new_tokens,
                stop: Vec::new(),
                ..Sampling::default()
            },
        })
        .collect();
    let (out, timing) = generate_batch_timed(model, &no_stop, &reqs, &mut |_, _| {})?;
    if let Some((i, o)) = out
        .iter()
        .enumerate()
        .find(|(_, o)| o.ids.len() != new_tokens)
    {
        return Err(ModelError::Other(format!(
            "decode benchmark: row {i} generated {} tokens, not {new_tokens}",
            o.ids.len()
        )));
    }
    let total = (prompts.len() * new_tokens) as f64;
    let secs = |d: Duration| d.as_secs_f64();
    Ok(DecodeRun {
        batch: prompts.len(),
        prompt_tokens,
        new_tokens,
        prefill_s: secs(timing.prefill),
        decode_s: secs(timing.decode),
        decode_tokens_per_s: total / secs(timing.decode).max(1e-9),
        end_to_end_tokens_per_s: total / secs(timing.prefill + timing.decode).max(1e-9),
        output_ids: out.into_iter().map(|o| o.ids).collect(),
    })
}

/// The CPU's model name from `/proc/cpuinfo` (`unknown` where there is none), for the figures
/// the benchmarks print.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
