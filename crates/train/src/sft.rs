//! The SFT data pipeline: conversations rendered with the model's chat template, tokenized, with
//! the loss on assistant tokens only (every assistant turn), truncated, then batched by length or
//! packed into rows whose examples cannot see each other.
//!
//! An assistant turn is located by rendering prefixes of the conversation: the text before turn i
//! with the generation prompt appended ends where the answer starts, and the text through turn i
//! ends where it stops (its end-of-turn token included, trailing whitespace not). Tokens that
//! start inside such a span are trained.

use candle_core::{Device, Tensor};
use safetune_data::{Conversation, Role};
use safetune_model::{ChatTemplate, Tok};

use crate::error::{Result, TrainError};
use crate::model::segment_mask;
use crate::rng::TrainRng;

/// Label of a position that carries no loss.
pub const IGNORE: u32 = u32::MAX;

/// One tokenized conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub id: String,
    pub ids: Vec<u32>,
    /// Per token: is it an assistant token the model learns to produce?
    pub trained: Vec<bool>,
    /// Tokens cut off by the length limit.
    pub truncated: usize,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Tokens that carry loss (a token is predicted from the one before it, so the first never
    /// does).
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Renders and tokenizes conversations for one model.
pub struct Encoder<'a> {
    pub tok: &'a Tok,
    pub template: &'a ChatTemplate,
    /// Longest example, in tokens; longer ones are cut at the end.
    pub max_len: usize,
}

impl Encoder<'_> {
    fn render(&self, conv: &Conversation, upto: usize, gen: bool) -> Result<String> {
        let bos = self.tok.bos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        let eos = self.tok.eos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        self.template
            .render(&conv.messages[..upto], gen, bos, eos)
            .map_err(|e| TrainError::Dataset(format!("example `{}`: {e}", conv.id)))
    }

    /// Byte spans of the assistant turns in the full rendering, and that rendering.
    pub fn assistant_spans(&self, conv: &Conversation) -> Result<(String, Vec<(usize, usize)>)> {
        let full = self.render(conv, conv.messages.len(), false)?;
        let mut spans = Vec::new();
        for (i, m) in conv.messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.render(conv, i, true)?;
            let through = self.render(conv, i + 1, false)?;
            if !full.starts_with(&before) || !full.starts_with(&through) {
                return Err(TrainError::Dataset(format!(
                    "example `{}`: the chat template does not render turn {} as a prefix of the whole conversation, so its answer cannot be located",
                    conv.id,
                    i + 1
                )));
            }
            let start = before.len();
            let end = start.max(through.trim_end().len());
            if end > start {
                spans.push((start, end));
            }
        }
        if spans.is_empty() {
            return Err(TrainError::Dataset(format!(
                "example `{}` has no assistant answer to train on",
                conv.id
            )));
        }
        Ok((full, spans))
    }

    /// Tokens of a conversation with the assistant tokens marked, truncated to `max_len`.
    pub fn encode(&self, conv: &Conversation) -> Result<Encoded> {
        let (text, spans) = self.assistant_spans(conv)?;
        let enc =
            self.tok.inner.encode(text.as_str(), false).map_err(|e| {
                TrainError::Dataset(format!("example `{}`: tokenizer: {e}", conv.id))
            })?;
        let mut ids = enc.get_ids().to_vec();
        let mut trained: Vec<bool> = enc
            .get_offsets()
            .iter()
            .map(|&(s, _)| spans.iter().any(|&(a, b)| s >= a && s < b))
            .collect();
        // Templates that do not write bos rely on the tokenizer adding it (as generation does).
        if let Some((bos_text, bos_id)) = &self.tok.bos {
            let adds_bos = self
                .tok
                .encode("a", true)
                .map(|v| v.first() == Some(bos_id))
                .unwrap_or(false);
            if adds_bos && !text.starts_with(bos_text.as_str()) {
                ids.insert(0, *bos_id);
                trained.insert(0, false);
            }
        }
        let truncated = ids.len().saturating_sub(self.max_len);
        ids.truncate(self.max_len);
        trained.truncate(self.max_len);
        Ok(Encoded {
            id: conv.id.clone(),
            ids,
            trained,
            truncated,
        })
    }

    /// Encodes a dataset; examples left with nothing to train (e.g. the answer was cut off)
    /// are dropped and counted.
    pub fn encode_all(&self, convs: &[Conversation]) -> Result<(Vec<Encoded>, EncodeStats)> {
        let mut out = Vec::with_capacity(convs.len());
        let mut stats = EncodeStats::default();
        for c in convs {
            let e = self.encode(c)?;
            if e.truncated > 0 {
                stats.truncated += 1;
            }
            stats.longest = stats.longest.max(e.len() + e.truncated);
            if e.trained_tokens() == 0 {
                stats.dropped_empty += 1;
                continue;
            }
            stats.tokens += e.len();
            stats.trained_tokens += e.trained_tokens();
            out.push(e);
        }
        stats.examples = out.len();
        Ok((out, stats))
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncodeStats {
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// Examples cut at the length limit.
    pub truncated: usize,
    /// Examples with no assistant token left after truncation (not used).
    pub dropped_empty: usize,
    /// Tokens of the longest example before truncation (the `max_len` that fits every one).
    #[serde(default)]
    pub longest: usize,
}

/// The rendered example with trained spans between `[[` and `]]`.
pub fn show_masks(tok: &Tok, e: &Encoded) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < e.ids.len() {
        let flag = e.trained[i];
        let mut j = i;
        while j < e.ids.len() && e.trained[j] == flag {
            j += 1;
        }
        let piece = tok
            .decode(&e.ids[i..j], false)
            .map_err(|err| TrainError::Dataset(format!("example `{}`: {err}", e.id)))?;
        if flag {
            out.push_str("[[");
            out.push_str(&piece);
            out.push_str("]]");
        } else {
            out.push_str(&piece);
        }
        i = j;
    }
    Ok(out)
}

/// How examples become rows of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One example per row; rows of similar length batched together, padded to the longest.
    Grouped,
    /// Several examples per row up to `max_len` tokens; attention is block-diagonal.
    Packed { max_len: usize },
}

/// A batch plan entry: each row lists the examples it holds.
pub type PlannedBatch = Vec<Vec<usize>>;

/// The batches of one epoch: a pure function of the seed and the epoch, so a resumed run
/// rebuilds exactly the plan it was following.
pub fn plan_epoch(
    lengths: &[usize],
    batch_size: usize,
    layout: Layout,
    seed: u64,
    epoch: usize,
) -> Vec<PlannedBatch> {
    let batch_size = batch_size.max(1);
    let mut rng = TrainRng::derive(seed, 0xE90C_0000 + epoch as u64);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches: Vec<PlannedBatch> = match layout {
        Layout::Grouped => {
            // Sort within windows of 16 batches: similar lengths meet, the order stays random.
            let mut out = Vec::new();
            for window in order.chunks(batch_size * 16) {
                let mut w = window.to_vec();
                w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                for b in w.chunks(batch_size) {
                    out.push(b.iter().map(|&i| vec![i]).collect());
                }
            }
            out
        }
        Layout::Packed { max_len } => {
            let mut rows: Vec<Vec<usize>> = Vec::new();
            let mut cur: Vec<usize> = Vec::new();
            let mut used = 0;
            for &i in &order {
                let n = lengths[i];
                if !cur.is_empty() && used + n > max_len {
                    rows.push(std::mem::take(&mut cur));
                    used = 0;
                }
                cur.push(i);
                used += n;
            }
            if !cur.is_empty() {
                rows.push(cur);
            }
            rows.chunks(batch_size).map(|c| c.to_vec()).collect()
        }
    };
    rng.shuffle(&mut batches);
    batches
}

/// A batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, T) u32
    pub ids: Tensor,
    /// (B, T) u32: positions restart at 0 for each packed example.
    pub positions: Tensor,
    /// (B, 1, T, T) additive.
    pub mask: Tensor,
    /// B*T next-token labels; [`IGNORE`] where no loss is taken.
    pub labels: Vec<u32>,
    /// Labels that are not [`IGNORE`].
    pub n_tokens: usize,
    /// Tokens in the batch, padding excluded.
    pub n_input: usize,
    pub b: usize,
    pub t: usize,
}

/// Builds the tensors of a planned batch. `pad_id` fills short rows (never trained, never seen).
pub fn make_batch(examples: &[Encoded], rows: &[Vec<usize>], pad_id: u32) -> Result<Batch> {
    let b = rows.len();
    let t = rows
        .iter()
        .map(|r| r.iter().map(|&i| examples[i].len()).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let mut positions = vec![0u32; b * t];
    let mut labels = vec![IGNORE; b * t];
    let mut segments = vec![vec![0u32; t]; b];
    let mut n_input = 0;
    for (bi, row) in rows.iter().enumerate() {
        let mut at = 0;
        for (si, &ei) in row.iter().enumerate() {
            let e = &examples[ei];
            for (k, &id) in e.ids.iter().enumerate() {
                let p = bi * t + at + k;
                ids[p] = id;
                positions[p] = k as u32;
                segments[bi][at + k] = si as u32 + 1;
                if k + 1 < e.len() && e.trained[k + 1] {
                    labels[p] = e.ids[k + 1];
                }
            }
            at += e.len();
            n_input += e.len();
        }
    }
    let n_tokens = labels.iter().filter(|&&l| l != IGNORE).count();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        positions: Tensor::from_vec(positions, (b, t), &Device::Cpu)?,
        mask: segment_mask(&segments)?,
        labels,
        n_tokens,
        n_input,
        b,
        t,
    })
}
