//! Reward heads over the Llama-family decoder:
//!
//! - [`SeqClsRewardModel`]: a Hugging Face sequence-classification reward model
//!   (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`, ...): the decoder under
//!   `model.` plus `score.weight` (num_labels, C). The conversation is rendered with the model's
//!   chat template (no generation prompt), and the score is the head applied to the hidden state
//!   of the last non-pad token, as transformers does.
//! - [`mean_pooled_features`]: mean-pooled final hidden states of any loaded model, the encoder
//!   features a small Bradley-Terry head is trained on.
//! - [`response_logprob`]: `log p(response | context)` summed over the response tokens, from which
//!   an implicit (DPO) reward `beta * (log p_policy - log p_ref)` is built.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use safetune_data::Message;

use crate::config::HfConfig;
use crate::engine::LocalEngine;
use crate::error::{CandleContext, ModelError, Result};
use crate::llama::{Llama, MASK_VALUE};
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::Tok;
use crate::weights::{SafetensorsFiles, Weights};

/// A sequence-classification reward model loaded from a Hugging Face directory.
pub struct SeqClsRewardModel {
    pub model: Llama,
    /// (num_labels, C)
    pub score: Tensor,
    pub num_labels: usize,
    pub tok: Tok,
    pub template: ChatTemplate,
    pub pad_token_id: Option<u32>,
    /// The architecture named in config.json.
    pub architecture: String,
    /// Conversations scored together.
    pub batch_size: usize,
}

impl std::fmt::Debug for SeqClsRewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqClsRewardModel")
            .field("architecture", &self.architecture)
            .field("num_labels", &self.num_labels)
            .finish()
    }
}

/// Whether the config.json in `dir` names a sequence-classification architecture.
pub fn is_seq_cls_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    v.get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .any(|x| x.ends_with("ForSequenceClassification"))
        })
}

impl SeqClsRewardModel {
    /// Loads `dir` (config.json with a `*ForSequenceClassification` architecture, safetensors,
    /// tokenizer.json and tokenizer_config.json).
    pub fn load(dir: &Path) -> Result<SeqClsRewardModel> {
        let cfg_path = dir.join("config.json");
        let mut hf = HfConfig::from_file(&cfg_path)?;
        let architecture = hf
            .architectures
            .iter()
            .find(|a| a.ends_with("ForSequenceClassification"))
            .cloned()
            .ok_or_else(|| ModelError::Config {
                field: "architectures".into(),
                message: format!(
                    "{}: {:?} names no *ForSequenceClassification model (supported: LlamaForSequenceClassification, Qwen2ForSequenceClassification, MistralForSequenceClassification)",
                    cfg_path.display(),
                    hf.architectures
                ),
            })?;
        if hf.model_type.is_none() {
            hf.model_type = Some(
                architecture
                    .trim_end_matches("ForSequenceClassification")
                    .to_ascii_lowercase(),
            );
        }
        let cfg = hf.resolve()?;
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?,
        )
        .map_err(|e| ModelError::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        let pad_token_id = raw
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let labels_hint = raw.get("num_labels").and_then(|v| v.as_u64()).or_else(|| {
            raw.get("id2label")
                .and_then(|v| v.as_object())
                .map(|o| o.len() as u64)
        });
        let tok = Tok::from_hf_dir(dir, &cfg.eos_token_ids)?;
        let files = SafetensorsFiles::open(&SafetensorsFiles::find_in_dir(dir)?)?;
        let w = Weights::from_safetensors(files);
        // transformers writes `id2label` (and so num_labels); a reward model has one label.
        let num_labels = labels_hint.unwrap_or(1) as usize;
        let score = w.get(&[num_labels, cfg.hidden_size], "score.weight")?;
        let model = Llama::load(&w, &cfg)?;
        let template = ChatTemplate::new(tok.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE))?;
        Ok(SeqClsRewardModel {
            model,
            score,
            num_labels,
            tok,
            template,
            pad_token_id,
            architecture,
            batch_size: 8,
        })
    }

    /// Token ids of a whole conversation (answer included) as the RM reads it.
    pub fn conversation_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let bos = self.tok.bos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        let eos = self.tok.eos.as_ref().map(|(t, _)| t.as_str()).unwrap_or("");
        let text = self.template.render(messages, false, bos, eos)?;
        let mut ids = self.tok.encode(&text, false)?;
        if let Some((bos_text, bos_id)) = &self.tok.bos {
            let adds_bos = self.tok.encode("a", true)?.first() == Some(bos_id);
            if adds_bos && !text.starts_with(bos_text.as_str()) {
                ids.insert(0, *bos_id);
            }
        }
        if ids.is_empty() {
            return Err(ModelError::Tokenizer(
                "the conversation renders to no tokens".into(),
            ));
        }
        Ok(ids)
    }

    /// The head's outputs (num_labels values) for each conversation.
    pub fn score_all(&self, conversations: &[Vec<Message>]) -> Result<Vec<Vec<f32>>> {
        let ids = conversations
            .iter()
            .map(|c| self.conversation_ids(c))
            .collect::<Result<Vec<_>>>()?;
        let max_pos = self.model.cfg.max_position_embeddings;
        if let Some((i, s)) = ids.iter().enumerate().find(|(_, s)| s.len() > max_pos) {
            return Err(ModelError::Other(format!(
                "conversation {i} has {} tokens, the reward model's context is {max_pos}",
                s.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.batch_size.max(1)) {
            let last = last_hidden(&self.model, chunk, self.pad_id())?; // (B, C)
            let logits = last
                .matmul(&self.score.t().ctx(|| "score.weight".into())?)
                .ctx(|| "score head".into())?; // (B, L)
            let rows: Vec<Vec<f32>> = logits.to_vec2().ctx(|| "score head".into())?;
            out.extend(rows);
        }
        Ok(out)
    }

    fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or_else(|| self.tok.eos.as_ref().map(|(_, id)| *id))
            .unwrap_or(0)
    }
}

/// Right-pads `seqs` into one batch and runs the decoder: returns the final hidden states of
/// each sequence's last real token, (B, C).
pub fn last_hidden(model: &Llama, seqs: &[Vec<u32>], pad: u32) -> Result<Tensor> {
    let (hidden, lens) = padded_hidden(model, seqs, pad)?; // (B, T, C)
    let rows = lens
        .iter()
        .enumerate()
        .map(|(b, &len)| hidden.get(b)?.get(len - 1))
        .collect::<candle_core::Result<Vec<_>>>()
        .ctx(|| "last token".into())?;
    Tensor::stack(&rows, 0).ctx(|| "last token".into())
}

/// Right-padded batch through the decoder: (B, T, C) hidden states and each row's length.
fn padded_hidden(model: &Llama, seqs: &[Vec<u32>], pad: u32) -> Result<(Tensor, Vec<usize>)> {
    let (ids, positions, mask, lens) = padded_inputs(seqs, pad)?;
    let h = model
        .hidden_states(&ids, &positions, Some(&mask), None)
        .ctx(|| "decoder".into())?;
    Ok((h, lens))
}

/// A right-padded batch's token ids (B, T), positions (B, T), additive mask (B, 1, T, T) and
/// each row's length.
fn padded_inputs(seqs: &[Vec<u32>], pad: u32) -> Result<(Tensor, Tensor, Tensor, Vec<usize>)> {
    let b = seqs.len();
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || t == 0 {
        return Err(ModelError::Other("no tokens to score".into()));
    }
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0f32; b * t * t];
    let mut lens = Vec::with_capacity(b);
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        lens.push(s.len());
        for i in 0..t {
            for j in 0..t {
                // Causal, and padding keys hidden (padding queries keep their own key so their
                // softmax stays finite; their outputs are never read).
                let hidden = j > i || (j >= s.len() && j != i);
                if hidden {
                    mask[(r * t + i) * t + j] = MASK_VALUE;
                }
            }
        }
    }
    let dev = Device::Cpu;
    let ids_t = Tensor::from_vec(ids, (b, t), &dev).ctx(|| "token ids".into())?;
    let positions = Tensor::arange(0u32, t as u32, &dev)
        .and_then(|p| p.unsqueeze(0)?.repeat((b, 1)))
        .ctx(|| "positions".into())?;
    let mask = Tensor::from_vec(mask, (b, 1, t, t), &dev).ctx(|| "mask".into())?;
    Ok((ids_t, positions, mask, lens))
}

/// Conversations run through the decoder together by [`mean_pooled_features`].
pub const FEATURE_BATCH: usize = 16;

/// Mean of the final hidden states over every token of each conversation (rendered with the
/// engine's chat template, no generation prompt): one feature vector of size C per conversation.
/// Conversations of similar length go through the decoder [`FEATURE_BATCH`] at a time, right-
/// padded (padding keys are masked and padded positions are left out of the mean), so a
/// feature does not depend on its batch beyond float rounding.
pub fn mean_pooled_features(
    engine: &LocalEngine,
    conversations: &[Vec<Message>],
) -> Result<Vec<Vec<f32>>> {
    let bos = engine
        .tok
        .bos
        .as_ref()
        .map(|(t, _)| t.as_str())
        .unwrap_or("");
    let eos = engine
        .tok
        .eos
        .as_ref()
        .map(|(t, _)| t.as_str())
        .unwrap_or("");
    let pad = engine.tok.eos.as_ref().map(|(_, id)| *id).unwrap_or(0);
    let max_pos = engine.model.cfg.max_position_embeddings;
    let mut seqs = Vec::with_capacity(conversations.len());
    for c in conversations {
        let text = engine.template.render(c, false, bos, eos)?;
        let mut ids = engine.tok.encode(&text, false)?;
        ids.truncate(max_pos);
        if ids.is_empty() {
            return Err(ModelError::Tokenizer(
                "the conversation renders to no tokens".into(),
            ));
        }
        seqs.push(ids);
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out = vec![Vec::new(); seqs.len()];
    for group in order.chunks(FEATURE_BATCH) {
        let batch: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].clone()).collect();
        let (h, lens) = padded_hidden(&engine.model, &batch, pad)?; // (B, T, C)
        for (r, (&i, &len)) in group.iter().zip(&lens).enumerate() {
            out[i] = h
                .get(r)
                .and_then(|row| {
                    row.narrow(0, 0, len)?
                        .mean(0)?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()
                })
                .ctx(|| "mean pooling".into())?;
        }
    }
    Ok(out)
}

/// Features of a response in its context for a linear probe: the context is rendered with the
/// generation prompt and followed by the response's tokens and the end-of-turn token (as in
/// [`response_logprob`]; at most `max_response_tokens` of the response); for each depth in
/// `layers` (decoder blocks run, from 1) the normed hidden states are averaged over the
/// response's positions, and the state at its last position is appended: `2 * C` values a
/// depth, depths in the order given. Items go through the decoder [`FEATURE_BATCH`] at a time,
/// sorted by length and right-padded (padding masked), so a row's features do not depend on
/// its batch beyond float rounding.
pub fn response_features(
    engine: &LocalEngine,
    items: &[(Vec<Message>, String)],
    layers: &[usize],
    max_response_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let max_pos = engine.model.cfg.max_position_embeddings;
    let mut seqs = Vec::with_capacity(items.len());
    for (context, response) in items {
        let mut ids = engine.prompt_ids(&crate::backend::Prompt::Chat(context.clone()))?;
        let start = ids.len();
        let mut resp = engine.tok.encode(response, false)?;
        resp.truncate(max_response_tokens);
        if let Some((_, eos)) = &engine.tok.eos {
            resp.push(*eos);
        }
        ids.extend_from_slice(&resp);
        if ids.len() > max_pos || resp.is_empty() {
            return Err(ModelError::Other(format!(
                "context and response have {} tokens ({} of response), the model's context is {max_pos}",
                ids.len(),
                resp.len()
            )));
        }
        seqs.push((ids, start));
    }
    let pad = engine.tok.eos.as_ref().map(|(_, id)| *id).unwrap_or(0);
    let c = engine.model.cfg.hidden_size;
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].0.len());
    let mut out = vec![Vec::new(); seqs.len()];
    for group in order.chunks(FEATURE_BATCH) {
        let batch: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].0.clone()).collect();
        let (ids, positions, mask, lens) = padded_inputs(&batch, pad)?;
        let hs = engine
            .model
            .hidden_states_at(&ids, &positions, Some(&mask), layers)
            .ctx(|| "decoder".into())?;
        for (r, (&i, &len)) in group.iter().zip(&lens).enumerate() {
            let start = seqs[i].1;
            let mut f = Vec::with_capacity(2 * c * layers.len());
            for h in &hs {
                let row = h.get(r).ctx(|| "hidden states".into())?;
                let mean: Vec<f32> = row
                    .narrow(0, start, len - start)
                    .and_then(|x| x.mean(0)?.to_dtype(DType::F32)?.to_vec1())
                    .ctx(|| "mean over the response".into())?;
                let last: Vec<f32> = row
                    .get(len - 1)
                    .and_then(|x| x.to_dtype(DType::F32)?.to_vec1())
                    .ctx(|| "last token".into())?;
                f.extend(mean);
                f.extend(last);
            }
            out[i] = f;
        }
    }
    Ok(out)
}

/// `log p(response | context)` under `engine`, summed over the response's tokens: the context
/// is rendered with the generation prompt, the response tokenized without special tokens and
/// followed by the end-of-turn token when the tokenizer has one. Also returns the number of
/// response tokens scored.
pub fn response_logprob(
    engine: &LocalEngine,
    context: &[Message],
    response: &str,
) -> Result<(f64, usize)> {
    let prompt = engine.prompt_ids(&crate::backend::Prompt::Chat(context.to_vec()))?;
    let mut resp = engine.tok.encode(response, false)?;
    if let Some((_, eos)) = &engine.tok.eos {
        resp.push(*eos);
    }
    let n_prompt = prompt.len();
    let mut ids = prompt;
    ids.extend_from_slice(&resp);
    let max_pos = engine.model.cfg.max_position_embeddings;
    if ids.len() > max_pos {
        return Err(ModelError::Other(format!(
            "context and response have {} tokens, the model's context is {max_pos}",
            ids.len()
        )));
    }
    let t = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).ctx(|| "token ids".into())?;
    let logits = engine
        .model
        .forward(&input, None)
        .ctx(|| "decoder".into())?; // (1, T, V)
                                    // Position i predicts token i + 1: rows n_prompt-1 .. T-2 predict the response.
    let logits = logits
        .squeeze(0)
        .and_then(|l| l.narrow(0, n_prompt - 1, resp.len()))
        .and_then(|l| l.to_dtype(DType::F32))
        .ctx(|| "response logits".into())?; // (R, V)
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).ctx(|| "log_softmax".into())?;
    let rows: Vec<Vec<f32>> = logp.to_vec2().ctx(|| "log_softmax".into())?;
    let total: f64 = rows
        .iter()
        .zip(&resp)
        .map(|(row, &tok)| row[tok as usize] as f64)
        .sum();
    Ok((total, resp.len()))
}

/// Test fixture: writes a tiny random sequence-classification reward model into `dir` (the tiny
/// decoder of [`crate::testing::TinyModel`], no `lm_head`, a `score.weight` of shape
/// (num_labels, C), and config.json naming `architecture`, e.g.
/// `LlamaForSequenceClassification` or `Qwen2ForSequenceClassification`).
pub fn write_tiny_seq_cls(
    dir: &Path,
    tiny: &crate::testing::TinyModel,
    architecture: &str,
    num_labels: usize,
) -> std::io::Result<std::path::PathBuf> {
    use std::collections::HashMap;
    let err = |e: candle_core::Error| std::io::Error::other(e.to_string());
    tiny.write(dir)?;
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    let model_type = architecture
        .trim_end_matches("ForSequenceClassification")
        .to_ascii_lowercase();
    cfg["architectures"] = serde_json::json!([architecture]);
    cfg["model_type"] = serde_json::json!(model_type);
    cfg["pad_token_id"] = serde_json::json!(TINY_PAD_ID);
    let id2label: serde_json::Map<String, serde_json::Value> = (0..num_labels)
        .map(|i| (i.to_string(), serde_json::json!(format!("LABEL_{i}"))))
        .collect();
    cfg["id2label"] = serde_json::Value::Object(id2label);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
    let st_path = dir.join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&st_path, &Device::Cpu).map_err(err)?;
    tensors.remove("lm_head.weight");
    let c = tiny.hidden_size;
    let mut rng = crate::generate::Rng::new(tiny.seed ^ 0x5eed);
    let w: Vec<f32> = (0..num_labels * c)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) / (c as f64).sqrt()) as f32)
        .collect();
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(w, (num_labels, c), &Device::Cpu).map_err(err)?,
    );
    candle_core::safetensors::save(&tensors, &st_path).map_err(err)?;
    Ok(dir.to_path_buf())
}

/// The pad token id [`write_tiny_seq_cls`] writes (`<|endoftext|>` of the tiny vocabulary).
pub const TINY_PAD_ID: u32 = 262;
