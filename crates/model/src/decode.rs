//! One decode step (one new token per row) on plain f32 buffers: the same decoder as
//! [`Llama::hidden_states`], without building a tensor graph for every small operation. Norms,
//! RoPE, the KV-cache append, attention over the cache and SwiGLU run as loops over slices; the
//! projections go through [`Linear::forward_rows`] (this crate's quantized or bf16 kernels, or candle's
//! matmul for dense and LoRA layers). Generation only: no gradient flows through it.

use candle_core::{Device, Module, Tensor};

use crate::llama::{KvCache, Llama, RmsNorm, MASK_VALUE};
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
        if let (LinearWeight::Bf16(m), None) = (&self.weight, &self.lora) {
            // bf16 (AMX) without an adapter: straight on the slices.
            let mut y = m.matmul(x, n)?;
            if let Some(b) = &self.bias {
                let b = b.to_vec1::<f32>()?;
                for row in y.chunks_exact_mut(self.out_dim) {
                    row.iter_mut().zip(&b).for_each(|(v, bv)| *v += bv);
                }
            }
            return Ok(y);
        }
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

/// Where one batch row's keys live in a cache buffer, for one decode step.
struct RowKeys<'a> {
    /// Index of the row's block in the cache buffers (`(block, K, capacity, D)`).
    block: usize,
    /// Column the new key and value are written to; the row attends to columns `0..=write`.
    write: usize,
    /// Additive mask over the `write + 1` keys.
    mask: &'a [f32],
}

/// A KV cache whose rows are independent slots for continuous batching: each slot holds one
/// sequence from column 0 with its own length, so a row that finishes frees its slot and the
/// next prompt, prefilled on its own, is copied in while the other rows go on decoding. A row
/// attends to exactly its own keys, so its results do not depend on the other slots.
#[derive(Debug, Clone)]
pub struct SlotCache {
    /// Per layer: k and v, each (slots, K, capacity, D) row-major.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Positions cached per slot (0: free or empty).
    lens: Vec<usize>,
}

impl SlotCache {
    /// `slots` empty slots of `capacity` positions each (grown on demand).
    pub fn new(cfg: &crate::config::Config, slots: usize, capacity: usize) -> SlotCache {
        let capacity = capacity.max(1);
        let size = slots * cfg.num_key_value_heads * capacity * cfg.head_dim;
        SlotCache {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| (vec![0f32; size], vec![0f32; size]))
                .collect(),
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            capacity,
            lens: vec![0; slots],
        }
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Adds an empty slot; returns its index.
    pub fn add_slot(&mut self) -> usize {
        let block = self.kv_heads * self.capacity * self.head_dim;
        for (k, v) in self.layers.iter_mut() {
            k.resize(k.len() + block, 0.0);
            v.resize(v.len() + block, 0.0);
        }
        self.lens.push(0);
        self.lens.len() - 1
    }

    /// Positions cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Frees `slot` (its contents are overwritten by the next sequence put there).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Makes every slot hold at least `need` positions: doubles the capacity, or more.
    fn reserve(&mut self, need: usize) {
        if need <= self.capacity {
            return;
        }
        let new_cap = (self.capacity * 2).max(need);
        let (rows, d, old) = (
            self.lens.len() * self.kv_heads,
            self.head_dim,
            self.capacity,
        );
        let used = self.lens.iter().copied().max().unwrap_or(0);
        for (k, v) in self.layers.iter_mut() {
            for buf in [k, v] {
                let mut grown = vec![0f32; rows * new_cap * d];
                for r in 0..rows {
                    grown[r * new_cap * d..(r * new_cap + used) * d]
                        .copy_from_slice(&buf[r * old * d..(r * old + used) * d]);
                }
                *buf = grown;
            }
        }
        self.capacity = new_cap;
    }

    /// Puts row `row` of a prefilled batch cache into `slot`: its last `len` positions (the
    /// real tokens of a left-padded prompt) become the slot's columns `0..len`.
    pub fn put(
        &mut self,
        slot: usize,
        from: &KvCache,
        row: usize,
        len: usize,
    ) -> candle_core::Result<()> {
        if slot >= self.lens.len() || row >= from.batch() || len > from.len() {
            candle_core::bail!(
                "slot cache: slot {slot} of {}, row {row} of {}, {len} of {} positions",
                self.lens.len(),
                from.batch(),
                from.len()
            );
        }
        self.reserve(len + 1);
        let (kh, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
        let (fcap, skip) = (from.capacity, from.len() - len);
        for ((dk, dv), (sk, sv)) in self.layers.iter_mut().zip(&from.layers) {
            for (dst, src) in [(dk, sk), (dv, sv)] {
                for g in 0..kh {
                    let to = (slot * kh + g) * cap * d;
                    let at = ((row * kh + g) * fcap + skip) * d;
                    dst[to..to + len * d].copy_from_slice(&src[at..at + len * d]);
                }
            }
        }
        self.lens[slot] = len;
        Ok(())
    }
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
        let rows: Vec<RowKeys> = (0..b)
            .map(|r| RowKeys {
                block: r,
                write: len,
                mask: &mask[r * s..(r + 1) * s],
            })
            .collect();
        let out = self.step_rows(ids, positions, &rows, &mut cache.layers, cap)?;
        cache.advance(1);
        Ok(out)
    }

    /// One new token for each of B sequences held in the slots `slots` (B) of a [`SlotCache`]:
    /// each row attends to its own cached positions plus the new one (within the sliding
    /// window, if the model has one). Appends to each slot and returns the final hidden states
    /// (B, 1, C) after the last norm.
    pub fn decode_step_slots(
        &self,
        ids: &[u32],
        positions: &[u32],
        slots: &[usize],
        cache: &mut SlotCache,
    ) -> candle_core::Result<Tensor> {
        let b = ids.len();
        if positions.len() != b || slots.len() != b {
            candle_core::bail!(
                "decode_step_slots: {b} ids, {} positions, {} slots",
                positions.len(),
                slots.len()
            );
        }
        if let Some(&bad) = slots.iter().find(|&&s| s >= cache.slots()) {
            candle_core::bail!("decode_step_slots: slot {bad} of {}", cache.slots());
        }
        let need = slots.iter().map(|&s| cache.lens[s] + 1).max().unwrap_or(0);
        cache.reserve(need);
        let window = self.cfg.sliding_window;
        let masks: Vec<Vec<f32>> = slots
            .iter()
            .map(|&slot| {
                let s = cache.lens[slot] + 1;
                (0..s)
                    .map(|j| {
                        if window.is_some_and(|w| s - 1 - j >= w) {
                            MASK_VALUE
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<RowKeys> = slots
            .iter()
            .zip(&masks)
            .map(|(&slot, m)| RowKeys {
                block: slot,
                write: cache.lens[slot],
                mask: m,
            })
            .collect();
        let cap = cache.capacity;
        let out = self.step_rows(ids, positions, &rows, &mut cache.layers, cap)?;
        for &slot in slots {
            cache.lens[slot] += 1;
        }
        Ok(out)
    }

    /// The decoder for one new token per row, each row's keys where `rows` says.
    fn step_rows(
        &self,
        ids: &[u32],
        positions: &[u32],
        rows: &[RowKeys],
        layers: &mut [(Vec<f32>, Vec<f32>)],
        cap: usize,
    ) -> candle_core::Result<Tensor> {
        let b = ids.len();
        let cfg = &self.cfg;
        let (c, h, kh, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = h / kh;
        let scale = 1.0 / (d as f32).sqrt();
        let max_s = rows.iter().map(|r| r.write + 1).max().unwrap_or(0);

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
            let (ck, cv) = &mut layers[li];
            for (r, row) in rows.iter().enumerate() {
                for g in 0..kh {
                    let at = ((row.block * kh + g) * cap + row.write) * d;
                    ck[at..at + d].copy_from_slice(&k[(r * kh + g) * d..(r * kh + g + 1) * d]);
                    cv[at..at + d].copy_from_slice(&v[(r * kh + g) * d..(r * kh + g + 1) * d]);
                }
            }
            let (ck, cv) = (&*ck, &*cv);
            let out = SendPtr(att.as_mut_ptr());
            // One item per (row, query head): scores over the row's keys, softmax, weighted values.
            let head = |item: usize| {
                let out = &out;
                let (r, hh) = (item / h, item % h);
                let g = hh / rep;
                let row = &rows[r];
                let s = row.write + 1;
                let base = (row.block * kh + g) * cap * d;
                let qv = &q[(r * h + hh) * d..(r * h + hh + 1) * d];
                let mut scores = vec![0f32; s];
                vecmath::scores(qv, &ck[base..base + s * d], scale, row.mask, &mut scores);
                vecmath::softmax(&mut scores);
                let mut o = vec![0f32; d];
                vecmath::weighted_sum(&scores, &cv[base..base + s * d], &mut o);
                // SAFETY: item (r, hh) writes only its own D values of `att`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(item * d), d) };
                dst.copy_from_slice(&o);
            };
            let items = b * h;
            if items * max_s * d < PAR_ATTENTION_MIN {
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
        let w = tensor_vec(&self.norm.weight)?;
        rms_norm_rows(&x, &self.norm, &w, &mut normed);
        Tensor::from_vec(normed, (b, 1, c), &Device::Cpu)
    }
}
