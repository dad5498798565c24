//! One decode step (one new token per row) on plain f32 buffers: the same decoder as
//! [`Llama::hidden_states`], without building a tensor graph for every small operation. Norms,
//! RoPE, the KV-cache append, attention over the cache and SwiGLU run as loops over slices; the
//! projections go through [`Linear::forward_rows`] (this crate's quantized kernels, or candle's
//! matmul for dense and LoRA layers). Generation only: no gradient flows through it.

use candle_core::{Device, Module, Tensor};

use crate::llama::{KvCache, Llama, RmsNorm};
use crate::quant::QMatrix;
use crate::vecmath;
use crate::weights::{Linear, LinearWeight};

/// Raw-pointer wrapper for workers that write disjoint parts of one buffer.
struct SendPtr(*mut f32);
// SAFETY: every user writes disjoint elements (see the call sites).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Below this many multiply-adds the attention runs on the calling thread alone.
const PAR_ATTENTION_MIN: usize = 32 * 1024;

impl Linear {
    /// `x W^T (+ b)` for `n` rows of `in_dim` values; returns `n` rows of `out_dim` values.
    pub fn forward_rows(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        match self.plain_blocks() {
            Some(q) => Ok(q.matmul(x)),
            None => {
                let t = Tensor::from_slice(x, (n, self.in_dim), &Device::Cpu)?;
                self.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// The block weight of a layer with neither bias nor adapter.
    fn plain_blocks(&self) -> Option<&QMatrix> {
        match (&self.weight, &self.bias, &self.lora) {
            (LinearWeight::Blocks(q), None, None) => Some(q),
            _ => None,
        }
    }
}

/// Several layers applied to the same input: one shared quantized product when all of them
/// are plain block weights, else one after another.
fn forward_many(layers: &[&Linear], x: &[f32], n: usize) -> candle_core::Result<Vec<Vec<f32>>> {
    let blocks: Option<Vec<&QMatrix>> = layers.iter().map(|l| l.plain_blocks()).collect();
    match blocks {
        Some(mats) => Ok(QMatrix::matmul_many(&mats, x)),
        None => layers.iter().map(|l| l.forward_rows(x, n)).collect(),
    }
}

fn rms_norm_rows(x: &[f32], norm: &RmsNorm, w: &[f32], out: &mut [f32]) {
    let c = w.len();
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let inv = 1.0 / (ms + norm.eps as f32).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotates the halves of every head of one row in place (the Hugging Face layout).
fn rope_row(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x1 * sin[i] + x2 * cos[i];
        }
    }
}

fn tensor_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl Llama {
    /// One new token for each of the cache's B rows: `ids` and `positions` (B), `mask` (B, S)
    /// additive over the S = cached + 1 keys. Appends to the cache and returns the final hidden
    /// states (B, 1, C) after the last norm, as [`Llama::hidden_states`] does.
    pub fn decode_step(
        &self,
        ids: &[u32],
        positions: &[u32],
        mask: &[f32],
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let b = ids.len();
        let cfg = &self.cfg;
        let (c, h, kh, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        if cache.batch() != b || positions.len() != b {
            candle_core::bail!(
                "decode_step: {b} ids, {} positions, a cache of {} rows",
                positions.len(),
                cache.batch()
            );
        }
        cache.reserve(1);
        let (cap, len) = (cache.capacity, cache.len);
        let s = len + 1;
        if mask.len() != b * s {
            candle_core::bail!(
                "decode_step: mask has {} values, want {}",
                mask.len(),
                b * s
            );
        }
        let rep = h / kh;
        let scale = 1.0 / (d as f32).sqrt();

        // Embeddings (B, C) and per-row rotary tables (B, D/2).
        let ids_t = Tensor::from_slice(ids, b, &Device::Cpu)?;
        let mut x = tensor_vec(&self.embed_tokens.index_select(&ids_t, 0)?)?;
        let inv_freq = tensor_vec(&self.inv_freq)?;
        let mut cos = Vec::with_capacity(b * d / 2);
        let mut sin = Vec::with_capacity(b * d / 2);
        for &p in positions {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }

        let mut normed = vec![0f32; b * c];
        let mut att = vec![0f32; b * h * d];
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention.
            let w = tensor_vec(&layer.input_layernorm.weight)?;
            rms_norm_rows(&x, &layer.input_layernorm, &w, &mut normed);
            let a = &layer.self_attn;
            let mut qkv = forward_many(&[&a.q_proj, &a.k_proj, &a.v_proj], &normed, b)?;
            let v = qkv.pop().expect("three"); // (B, K*D)
            let mut k = qkv.pop().expect("three"); // (B, K*D)
            let mut q = qkv.pop().expect("three"); // (B, H*D)
            for r in 0..b {
                let (cs, sn) = (
                    &cos[r * d / 2..(r + 1) * d / 2],
                    &sin[r * d / 2..(r + 1) * d / 2],
                );
                rope_row(&mut q[r * h * d..(r + 1) * h * d], d, cs, sn);
                rope_row(&mut k[r * kh * d..(r + 1) * kh * d], d, cs, sn);
            }
            let (ck, cv) = &mut cache.layers[li];
            for r in 0..b {
                for g in 0..kh {
                    let at = ((r * kh + g) * cap + len) * d;
                    ck[at..at + d].copy_from_slice(&k[(r * kh + g) * d..(r * kh + g + 1) * d]);
                    cv[at..at + d].copy_from_slice(&v[(r * kh + g) * d..(r * kh + g + 1) * d]);
                }
            }
            let (ck, cv) = (&*ck, &*cv);
            let out = SendPtr(att.as_mut_ptr());
            // One item per (row, query head): scores over the S keys, softmax, weighted values.
            let head = |item: usize| {
                let out = &out;
                let (r, hh) = (item / h, item % h);
                let g = hh / rep;
                let base = (r * kh + g) * cap * d;
                let qv = &q[(r * h + hh) * d..(r * h + hh + 1) * d];
                let m = &mask[r * s..(r + 1) * s];
                let mut scores = vec![0f32; s];
                vecmath::scores(qv, &ck[base..base + s * d], scale, m, &mut scores);
                vecmath::softmax(&mut scores);
                let mut o = vec![0f32; d];
                vecmath::weighted_sum(&scores, &cv[base..base + s * d], &mut o);
                // SAFETY: item (r, hh) writes only its own D values of `att`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(item * d), d) };
                dst.copy_from_slice(&o);
            };
            let items = b * h;
            if items * s * d < PAR_ATTENTION_MIN {
                (0..items).for_each(head);
            } else {
                crate::pool::par_chunks(items, |range| {
                    range.for_each(&head);
                });
            }
            let o = a.o_proj.forward_rows(&att, b)?; // (B, C)
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }

            // SwiGLU MLP.
            let w = tensor_vec(&layer.post_attention_layernorm.weight)?;
            rms_norm_rows(&x, &layer.post_attention_layernorm, &w, &mut normed);
            let mlp = &layer.mlp;
            let mut gu = forward_many(&[&mlp.gate_proj, &mlp.up_proj], &normed, b)?;
            let up = gu.pop().expect("two"); // (B, I)
            let mut gate = gu.pop().expect("two"); // (B, I)
            vecmath::silu_mul(&mut gate, &up);
            let down = mlp.down_proj.forward_rows(&gate, b)?; // (B, C)
            for (xi, di) in x.iter_mut().zip(&down) {
                *xi += di;
            }
        }
        cache.advance(1);
        let w = tensor_vec(&self.norm.weight)?;
        rms_norm_rows(&x, &self.norm, &w, &mut normed);
        Tensor::from_vec(normed, (b, 1, c), &Device::Cpu)
    }
}
