//! Batched generation with a KV cache, two ways. [`generate_continuous`] (what the local engine
//! runs): each row in its own slot of a [`SlotCache`], a finished row's slot taken at once by the
//! next waiting prompt, prompts prefilled without padding, so every answer is the one its prompt
//! gets alone. [`generate_batch`] (static batches): prompts left-padded into one batch, each row
//! with its own positions and an attention mask over its real tokens, rows leaving the batch as
//! they finish (end-of-turn token, stop string or length). Every row samples with its own seeded
//! RNG. In a static batch the padding moves the sums of the attention softmax in the last bits,
//! which can flip a near-tied greedy choice on a real model (SmolLM2: 1 of 10 prompts in
//! `tests/smollm2.rs`); the tiny test models have no such near-ties.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::backend::{FinishReason, Sampling};
use crate::decode::SlotCache;
use crate::error::{CandleContext, ModelError, Result};
use crate::llama::{KvCache, Llama, MASK_VALUE};
use crate::tokenizer::Tok;
use safetune_data::util::SplitMix64;

/// One sequence to continue.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: Sampling,
}

/// What one sequence produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    /// Generated token ids (the stop token included when one ended the row).
    pub ids: Vec<u32>,
    /// Decoded text without special tokens, cut before any stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// A small, fast, seedable generator (SplitMix64); one per row.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token: greedy when `temperature <= 0`, else softmax at `temperature`
/// restricted to the `top_k` most likely tokens (0: all) and the smallest set whose
/// probability reaches `top_p`.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if s.top_k > 0 && s.top_k < idx.len() {
        idx.select_nth_unstable_by(s.top_k - 1, by_logit_desc);
        idx.truncate(s.top_k);
    }
    idx.sort_unstable_by(by_logit_desc);
    let max = logits[idx[0] as usize];
    let t = s.temperature as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64 / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[i];
        }
        u -= p;
    }
    idx[idx.len() - 1]
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: text that
/// must be held back from streaming until we know it does not start a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

struct Row {
    /// Index in the caller's request list.
    req: usize,
    ids: Vec<u32>,
    /// Text already handed to the sink.
    emitted: usize,
    rng: Rng,
    /// Position of the next token.
    next_pos: u32,
    done: Option<FinishReason>,
    text: String,
}

/// Where the wall time of one [`generate_batch_timed`] call went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchTiming {
    /// Building the batch and the forward pass over every prompt token, up to the first logits.
    pub prefill: Duration,
    /// Everything after: sampling, text decoding, stop checks and the one-token decode steps.
    pub decode: Duration,
    /// One-token forward passes run (the first new token of each row comes from the prefill).
    pub decode_steps: usize,
    /// Tokens generated over all rows.
    pub new_tokens: usize,
}

/// Continues every request in one batch. `sink(i, piece)` receives text as it is decoded.
/// [`generate_batch_cancellable`] can stop rows early.
pub fn generate_batch(
    model: &Llama,
    tok: &Tok,
    reqs: &[SeqRequest],
    sink: &mut dyn FnMut(usize, &str),
) -> Result<Vec<SeqOutput>> {
    generate_batch_timed(model, tok, reqs, sink).map(|(out, _)| out)
}

/// [`generate_batch`], stopping row `i` as soon as `cancelled(i)` is true: it is asked before
/// the prefill and before every token, and a cancelled row leaves the batch with what it has
/// generated so far and [`FinishReason::Cancelled`]; the other rows go on as if it had never been
/// there.
pub fn generate_batch_cancellable(
    model: &Llama,
    tok: &Tok,
    reqs: &[SeqRequest],
    sink: &mut dyn FnMut(usize, &str),
    cancelled: &dyn Fn(usize) -> bool,
) -> Result<Vec<SeqOutput>> {
    run_batch(model, tok, reqs, sink, cancelled).map(|(out, _)| out)
}

/// [`generate_batch`], also reporting where the time went.
pub fn generate_batch_timed(
    model: &Llama,
    tok: &Tok,
    reqs: &[SeqRequest],
    sink: &mut dyn FnMut(usize, &str),
) -> Result<(Vec<SeqOutput>, BatchTiming)> {
    run_batch(model, tok, reqs, sink, &|_| false)
}

fn run_batch(
    model: &Llama,
    tok: &Tok,
    reqs: &[SeqRequest],
    sink: &mut dyn FnMut(usize, &str),
    cancelled: &dyn Fn(usize) -> bool,
) -> Result<(Vec<SeqOutput>, BatchTiming)> {
    let start = Instant::now();
    let mut timing = BatchTiming::default();
    let b = reqs.len();
    if b == 0 {
        return Ok((Vec::new(), timing));
    }
    if let Some(i) = reqs.iter().position(|r| r.prompt_ids.is_empty()) {
        return Err(ModelError::Other(format!(
            "request {i}: the prompt has no tokens"
        )));
    }
    let l = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let max_new = reqs
        .iter()
        .map(|r| r.sampling.max_new_tokens)
        .max()
        .unwrap_or(0);
    let mut outputs: Vec<Option<SeqOutput>> = vec![None; b];
    let mut rows: Vec<Row> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| Row {
            req: i,
            ids: Vec::new(),
            emitted: 0,
            rng: Rng::new(r.sampling.seed),
            next_pos: r.prompt_ids.len() as u32,
            done: if r.sampling.max_new_tokens == 0 {
                Some(FinishReason::Length)
            } else if cancelled(i) {
                Some(FinishReason::Cancelled)
            } else {
                None
            },
            text: String::new(),
        })
        .collect();
    // Nothing to generate (every row wants no tokens or is cancelled already): no prefill.
    if max_new == 0 || rows.iter().all(|r| r.done.is_some()) {
        let out = rows
            .iter()
            .map(|r| SeqOutput {
                ids: vec![],
                text: String::new(),
                finish_reason: r.done.unwrap_or(FinishReason::Length),
            })
            .collect();
        timing.prefill = start.elapsed();
        return Ok((out, timing));
    }

    // Prefill: left-padded ids (B, L), per-row positions (B, L), mask (B, 1, L, L).
    let pads: Vec<usize> = reqs.iter().map(|r| l - r.prompt_ids.len()).collect();
    let mut ids = vec![0u32; b * l];
    let mut pos = vec![0u32; b * l];
    let mut mask = vec![0f32; b * l * l];
    let window = model.cfg.sliding_window;
    for (r, req) in reqs.iter().enumerate() {
        let pad = pads[r];
        for (j, &id) in req.prompt_ids.iter().enumerate() {
            ids[r * l + pad + j] = id;
            pos[r * l + pad + j] = j as u32;
        }
        for i in 0..l {
            for j in 0..l {
                let hidden = j < pad || j > i || window.is_some_and(|w| i - j.min(i) >= w);
                if hidden {
                    mask[(r * l + i) * l + j] = MASK_VALUE;
                }
            }
        }
    }
    // Which cache columns hold real tokens, per row: grows by one column each step.
    let mut key_valid: Vec<Vec<bool>> = pads
        .iter()
        .map(|&p| (0..l).map(|j| j >= p).collect())
        .collect();
    let dev = Device::Cpu;
    let mut cache =
        KvCache::new(&model.cfg, b, l + max_new).ctx(|| "allocating the KV cache".into())?;
    let ids_t = Tensor::from_vec(ids, (b, l), &dev)?;
    let pos_t = Tensor::from_vec(pos, (b, l), &dev)?;
    let mask_t = Tensor::from_vec(mask, (b, 1, l, l), &dev)?;
    let hidden = model
        .hidden_states(&ids_t, &pos_t, Some(&mask_t), Some(&mut cache))
        .ctx(|| "prefill".into())?;
    let last = hidden.narrow(1, l - 1, 1)?; // (B, 1, C)
    let mut logits: Vec<Vec<f32>> = model.logits(&last)?.squeeze(1)?.to_vec2::<f32>()?; // (B, V)
    timing.prefill = start.elapsed();
    let decode_start = Instant::now();

    // `active[k]` is the index in `rows` of batch row k.
    let mut active: Vec<usize> = (0..b).collect();
    loop {
        // Sample, decode, check stops for every active row.
        for (k, &ri) in active.iter().enumerate() {
            let row = &mut rows[ri];
            if row.done.is_some() {
                continue;
            }
            // A cancelled row keeps what it generated so far and leaves the batch below.
            if cancelled(row.req) {
                row.done = Some(FinishReason::Cancelled);
                continue;
            }
            next_token(row, &logits[k], &reqs[row.req].sampling, tok, sink)?;
        }
        // Drop finished rows from the batch.
        let keep: Vec<usize> = (0..active.len())
            .filter(|&k| rows[active[k]].done.is_none())
            .collect();
        for &ri in active.iter() {
            if let Some(reason) = rows[ri].done {
                let r = &rows[ri];
                outputs[r.req] = Some(SeqOutput {
                    ids: r.ids.clone(),
                    text: r.text.clone(),
                    finish_reason: reason,
                });
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            let sel: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
            cache
                .select_rows(&sel)
                .ctx(|| "shrinking the KV cache".into())?;
            key_valid = keep
                .iter()
                .map(|&k| std::mem::take(&mut key_valid[k]))
                .collect();
            active = keep.iter().map(|&k| active[k]).collect();
        }
        // One decode step for the remaining rows: ids (B', 1), positions (B', 1), mask (B', 1, 1, S).
        let bb = active.len();
        let s_len = cache.len() + 1;
        let step_ids: Vec<u32> = active
            .iter()
            .map(|&ri| *rows[ri].ids.last().unwrap_or(&0))
            .collect();
        let step_pos: Vec<u32> = active.iter().map(|&ri| rows[ri].next_pos).collect();
        let mut step_mask = vec![0f32; bb * s_len];
        for (k, kv) in key_valid.iter_mut().enumerate() {
            kv.push(true);
            for (j, &valid) in kv.iter().enumerate() {
                let hidden = !valid || window.is_some_and(|w| s_len - 1 - j >= w);
                if hidden {
                    step_mask[k * s_len + j] = MASK_VALUE;
                }
            }
        }
        for &ri in &active {
            rows[ri].next_pos += 1;
        }
        let hidden = model
            .decode_step(&step_ids, &step_pos, &step_mask, &mut cache)
            .ctx(|| "decode step".into())?;
        logits = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?; // (B', V)
        timing.decode_steps += 1;
    }
    timing.decode = decode_start.elapsed();
    timing.new_tokens = rows.iter().map(|r| r.ids.len()).sum();
    let out = outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| ModelError::Other(format!("request {i} produced no output"))))
        .collect::<Result<Vec<_>>>()?;
    Ok((out, timing))
}

/// A source of sequences for [`generate_continuous`] and the receiver of their results, keyed
/// by the caller's own numbers.
pub trait SeqFeed {
    /// The next sequence to start, if one is waiting now; asked whenever a slot is free.
    /// `None` means none is waiting: the running rows go on, and the feed is asked again at the
    /// next free slot or step.
    fn next(&mut self) -> Option<(usize, SeqRequest)>;
    /// Text decoded for sequence `key`, as soon as it is certain.
    fn piece(&mut self, key: usize, piece: &str);
    /// Sequence `key` finished.
    fn done(&mut self, key: usize, out: SeqOutput);
    /// Asked before a sequence's prefill and before each of its tokens: `true` stops it with
    /// what it has ([`FinishReason::Cancelled`]).
    fn cancelled(&self, key: usize) -> bool {
        let _ = key;
        false
    }
}

/// A row of the continuous batch: its state, settings, slot and the logits it samples next.
struct Running {
    row: Row,
    sampling: Sampling,
    slot: usize,
    logits: Vec<f32>,
}

/// Continuous batching: up to `max_batch` sequences decode together, each in its own slot of a
/// [`SlotCache`]; when one finishes, its slot takes the next waiting sequence at once (prefilled
/// on its own, or with the others of its prompt length that join at the same step, then copied
/// into the slot) while the other rows go on. No row ever sees padding or another row's keys,
/// and each samples with its own seeded RNG, so a sequence gets the same tokens as it would
/// alone ([`generate_batch`] with one request). Returns when no row is running and the feed has
/// nothing waiting.
pub fn generate_continuous(
    model: &Llama,
    tok: &Tok,
    max_batch: usize,
    feed: &mut dyn SeqFeed,
) -> Result<BatchTiming> {
    let max_batch = max_batch.max(1);
    let mut timing = BatchTiming::default();
    let mut running: Vec<Running> = Vec::new();
    let mut cache: Option<SlotCache> = None;
    let mut free: Vec<usize> = Vec::new();
    loop {
        // Fill the free slots with waiting sequences; those with nothing to do finish here.
        let mut joiners: Vec<(usize, SeqRequest)> = Vec::new();
        let mut drained = false;
        while running.len() + joiners.len() < max_batch {
            let Some((key, req)) = feed.next() else {
                drained = true;
                break;
            };
            if req.prompt_ids.is_empty() {
                return Err(ModelError::Other(format!(
                    "request {key}: the prompt has no tokens"
                )));
            }
            let reason = if req.sampling.max_new_tokens == 0 {
                Some(FinishReason::Length)
            } else if feed.cancelled(key) {
                Some(FinishReason::Cancelled)
            } else {
                None
            };
            match reason {
                Some(finish_reason) => feed.done(
                    key,
                    SeqOutput {
                        ids: vec![],
                        text: String::new(),
                        finish_reason,
                    },
                ),
                None => joiners.push((key, req)),
            }
        }
        if !joiners.is_empty() {
            let t = Instant::now();
            let cache = cache.get_or_insert_with(|| {
                let cap = joiners
                    .iter()
                    .map(|(_, r)| r.prompt_ids.len() + r.sampling.max_new_tokens)
                    .max()
                    .unwrap_or(1);
                SlotCache::new(&model.cfg, 0, cap)
            });
            // Prompts of one length are prefilled together, without padding: padding would move
            // the sums of the attention softmax, and with them near-tied greedy choices.
            joiners.sort_by_key(|(_, r)| r.prompt_ids.len());
            let mut rest = joiners.as_slice();
            while let Some((_, first)) = rest.first() {
                let n = first.prompt_ids.len();
                let same = rest
                    .iter()
                    .take_while(|(_, r)| r.prompt_ids.len() == n)
                    .count();
                let (group, tail) = rest.split_at(same);
                rest = tail;
                let reqs: Vec<SeqRequest> = group.iter().map(|(_, r)| r.clone()).collect();
                let (pcache, logits) = prefill(model, &reqs)?;
                for (j, ((key, req), logits)) in group.iter().zip(logits).enumerate() {
                    let slot = match free.pop() {
                        Some(s) => s,
                        None => cache.add_slot(),
                    };
                    cache
                        .put(slot, &pcache, j, n)
                        .ctx(|| "joining a prompt to the batch".into())?;
                    running.push(Running {
                        row: Row {
                            req: *key,
                            ids: Vec::new(),
                            emitted: 0,
                            rng: Rng::new(req.sampling.seed),
                            next_pos: n as u32,
                            done: None,
                            text: String::new(),
                        },
                        sampling: req.sampling.clone(),
                        slot,
                        logits,
                    });
                }
            }
            timing.prefill += t.elapsed();
        }
        let t = Instant::now();
        // Sample every running row; finished rows hand back their output and free their slot.
        let mut k = 0;
        while k < running.len() {
            let r = &mut running[k];
            if feed.cancelled(r.row.req) {
                r.row.done = Some(FinishReason::Cancelled);
            } else {
                let mut pieces: Vec<(usize, String)> = Vec::new();
                next_token(&mut r.row, &r.logits, &r.sampling, tok, &mut |i, p| {
                    pieces.push((i, p.to_string()))
                })?;
                for (i, p) in pieces {
                    feed.piece(i, &p);
                }
            }
            if let Some(finish_reason) = running[k].row.done {
                let r = running.swap_remove(k);
                timing.new_tokens += r.row.ids.len();
                if let Some(c) = cache.as_mut() {
                    c.clear(r.slot);
                }
                free.push(r.slot);
                feed.done(
                    r.row.req,
                    SeqOutput {
                        ids: r.row.ids,
                        text: r.row.text,
                        finish_reason,
                    },
                );
            } else {
                k += 1;
            }
        }
        if running.is_empty() {
            timing.decode += t.elapsed();
            if drained {
                break;
            }
            continue;
        }
        // One decode step for every running row, each in its own slot.
        let cache = cache.as_mut().expect("rows run in the slot cache");
        let ids: Vec<u32> = running
            .iter()
            .map(|r| *r.row.ids.last().unwrap_or(&0))
            .collect();
        let pos: Vec<u32> = running.iter().map(|r| r.row.next_pos).collect();
        let slots: Vec<usize> = running.iter().map(|r| r.slot).collect();
        let hidden = model
            .decode_step_slots(&ids, &pos, &slots, cache)
            .ctx(|| "decode step".into())?;
        let logits = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?; // (B, V)
        for (r, l) in running.iter_mut().zip(logits) {
            r.row.next_pos += 1;
            r.logits = l;
        }
        timing.decode_steps += 1;
        timing.decode += t.elapsed();
    }
    Ok(timing)
}

/// The prefill of left-padded prompts in one batch: the batch's KV cache (its length the
/// longest prompt) and each row's logits for its first new token.
fn prefill(model: &Llama, reqs: &[SeqRequest]) -> Result<(KvCache, Vec<Vec<f32>>)> {
    let b = reqs.len();
    let l = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; b * l];
    let mut pos = vec![0u32; b * l];
    let mut mask = vec![0f32; b * l * l];
    let window = model.cfg.sliding_window;
    for (r, req) in reqs.iter().enumerate() {
        let pad = l - req.prompt_ids.len();
        for (j, &id) in req.prompt_ids.iter().enumerate() {
            ids[r * l + pad + j] = id;
            pos[r * l + pad + j] = j as u32;
        }
        for i in 0..l {
            for j in 0..l {
                let hidden = j < pad || j > i || window.is_some_and(|w| i - j.min(i) >= w);
                if hidden {
                    mask[(r * l + i) * l + j] = MASK_VALUE;
                }
            }
        }
    }
    let dev = Device::Cpu;
    let mut cache = KvCache::new(&model.cfg, b, l).ctx(|| "allocating the KV cache".into())?;
    let ids_t = Tensor::from_vec(ids, (b, l), &dev)?;
    let pos_t = Tensor::from_vec(pos, (b, l), &dev)?;
    let mask_t = Tensor::from_vec(mask, (b, 1, l, l), &dev)?;
    let hidden = model
        .hidden_states(&ids_t, &pos_t, Some(&mask_t), Some(&mut cache))
        .ctx(|| "prefill".into())?;
    let last = hidden.narrow(1, l - 1, 1)?; // (B, 1, C)
    let logits = model.logits(&last)?.squeeze(1)?.to_vec2::<f32>()?; // (B, V)
    Ok((cache, logits))
}

/// Samples row `row`'s next token from `logits`, decodes its text, checks the stop token, stop
/// strings and length, and streams what is certain to `sink` (keyed by `row.req`).
fn next_token(
    row: &mut Row,
    logits: &[f32],
    s: &Sampling,
    tok: &Tok,
    sink: &mut dyn FnMut(usize, &str),
) -> Result<()> {
    let next = sample(logits, s, &mut row.rng);
    row.ids.push(next);
    let stop_token = tok.stop_ids.contains(&next);
    let gen_ids: &[u32] = if stop_token {
        &row.ids[..row.ids.len() - 1]
    } else {
        &row.ids
    };
    let mut text = tok.decode(gen_ids, true)?;
    let mut finished = None;
    if let Some(cut) = s
        .stop
        .iter()
        .filter(|st| !st.is_empty())
        .filter_map(|st| text.find(st.as_str()))
        .min()
    {
        text.truncate(cut);
        finished = Some(FinishReason::Stop);
    } else if stop_token {
        finished = Some(FinishReason::Stop);
    } else if row.ids.len() >= s.max_new_tokens {
        finished = Some(FinishReason::Length);
    }
    // Stream what is certain: complete characters, not a possible start of a stop string.
    let safe = if finished.is_some() {
        text.len()
    } else if text.ends_with('\u{FFFD}') {
        row.emitted
    } else {
        text.len() - held_back(&text, &s.stop)
    };
    if safe > row.emitted && text.is_char_boundary(row.emitted) && text.is_char_boundary(safe) {
        sink(row.req, &text[row.emitted..safe]);
        row.emitted = safe;
    }
    row.text = text;
    row.done = finished;
    Ok(())
}

#[cfg(test)]
mod golden {
    use super::Rng;

    /// Sampling streams must never move (a resumed run samples what an uninterrupted one did).
    #[test]
    fn rng_stream_is_pinned() {
        let expect = [
            (
                0,
                [
                    10786525211432574597,
                    6740194258388256784,
                    11207529336503023463,
                    15186486883677466135,
                    12753636102373639391,
                ],
                [0.7838319607265645, 0.8723779720412156, 0.1681871729738369],
            ),
            (
                42,
                [
                    151597071426654995,
                    6923057654035761052,
                    1365566442647465929,
                    14821891791639346923,
                    14177075638051382140,
                ],
                [0.5956710680202763, 0.5430810502667588, 0.46290775707766874],
            ),
        ];
        for (seed, draws, units) in expect {
            let mut r = Rng::new(seed);
            let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
            assert_eq!(got, draws);
            let got: Vec<f64> = (0..3).map(|_| r.next_f64()).collect();
            assert_eq!(got, units);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_and_respects_top_k() {
        let logits = vec![1.0, 3.0, 2.0, 0.5, 2.9];
        let s = Sampling {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Sampling::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| sample(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(draw(7).iter().all(|&t| t == 1 || t == 4));
        let greedy = Sampling::default();
        assert_eq!(sample(&logits, &greedy, &mut Rng::new(0)), 1);
        let tight_p = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            ..Sampling::default()
        };
        assert!((0..20).all(|i| sample(&logits, &tight_p, &mut Rng::new(i)) == 1));
    }

    #[test]
    fn held_back_text_is_a_prefix_of_a_stop_string() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(held_back("hello\nUs", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
