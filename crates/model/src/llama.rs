//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, RoPE (with llama3
//! scaling), grouped-query attention, SwiGLU MLP, tied embeddings, KV cache, built from candle ops.
//!
//! Every layer is `load(weights, cfg)` plus `forward`; tensor names are exactly the Hugging Face
//! checkpoint's keys. Shapes: B batch, T new tokens, S cached + new tokens, C hidden size,
//! H query heads, K key/value heads, D head size, V vocabulary.
//!
//! This is the reference forward pass, for inference: prefill, scoring and reward heads. Norm,
//! softmax and RoPE use candle's fused kernels when no gradient is being tracked, and
//! differentiable primitives when one is (the fused kernels have no backward pass). Training does
//! not run this decoder: safetune-train rebuilds it from differentiable ops (`TrainModel` in
//! `crates/train/src/model.rs`), and generation's one-token step is [`Llama::decode_step`]
//! (`decode.rs`); tests compare both with this one (ARCHITECTURE.md section 3).

use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::Config;
use crate::error::{CandleContext, Result};
use crate::weights::{Linear, Weights};

/// Additive mask value for hidden keys: large and finite, so a fully masked (padding) row stays
/// finite instead of turning into NaN and poisoning later layers.
pub const MASK_VALUE: f32 = -1e9;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (C)
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: w.get(&[size], &format!("{name}.weight"))?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    /// (..., C) -> (..., C)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.track_op() || self.weight.track_op() {
            let c = x.dim(D::Minus1)? as f64;
            let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / c)?; // (..., 1)
            x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
                .broadcast_mul(&self.weight)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Rotary embeddings for one forward pass: cos and sin at each row's own positions.
pub struct Rope {
    /// (B, T, D/2)
    pub cos: Tensor,
    /// (B, T, D/2)
    pub sin: Tensor,
}

impl Rope {
    /// `positions`: (B, T) u32. `inv_freq`: (D/2).
    pub fn new(positions: &Tensor, inv_freq: &Tensor) -> candle_core::Result<Rope> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (B, T, 1)
        let freqs = pos.broadcast_mul(&inv_freq.reshape((1, 1, ()))?)?; // (B, T, D/2)
        Ok(Rope {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Rotates halves (the Hugging Face layout). x: (B, heads, T, D) -> same.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.track_op() {
            let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.unsqueeze(1)?; // (B, 1, T, D)
            let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.unsqueeze(1)?; // (B, 1, T, D)
            let d = x.dim(D::Minus1)?;
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // (B, heads, T, D)
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
        }
    }
}

/// Keys and values of past tokens, preallocated to `capacity` positions. Plain f32 buffers, so a
/// decode step appends one position in place and reads the cache without copying it.
pub struct KvCache {
    /// Per layer: k and v, each (B, K, capacity, D) row-major.
    pub(crate) layers: Vec<(Vec<f32>, Vec<f32>)>,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    pub(crate) len: usize,
    pub(crate) capacity: usize,
}

impl KvCache {
    pub fn new(cfg: &Config, batch: usize, capacity: usize) -> candle_core::Result<KvCache> {
        let size = batch * cfg.num_key_value_heads * capacity * cfg.head_dim;
        Ok(KvCache {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| (vec![0f32; size], vec![0f32; size]))
                .collect(),
            batch,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            len: 0,
            capacity,
        })
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Makes room for `t` more positions: doubles the capacity, or more if needed.
    pub(crate) fn reserve(&mut self, t: usize) {
        if self.len + t <= self.capacity {
            return;
        }
        let new_cap = (self.capacity * 2).max(self.len + t);
        let (rows, d, old) = (self.batch * self.kv_heads, self.head_dim, self.capacity);
        for (k, v) in self.layers.iter_mut() {
            for buf in [k, v] {
                let mut grown = vec![0f32; rows * new_cap * d];
                for r in 0..rows {
                    grown[r * new_cap * d..(r * new_cap + self.len) * d]
                        .copy_from_slice(&buf[r * old * d..(r * old + self.len) * d]);
                }
                *buf = grown;
            }
        }
        self.capacity = new_cap;
    }

    /// Writes new k, v (B, K, T, D) after the cached ones; returns all of them (B, K, S, D).
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, kh, t, d) = k.dims4()?;
        self.reserve(t);
        let (cap, len) = (self.capacity, self.len);
        let s = len + t;
        let kn = k.flatten_all()?.to_vec1::<f32>()?;
        let vn = v.flatten_all()?.to_vec1::<f32>()?;
        let (ck, cv) = &mut self.layers[layer];
        let mut outs = Vec::with_capacity(2);
        for (buf, new) in [(ck, kn), (cv, vn)] {
            let mut all = vec![0f32; b * kh * s * d];
            for r in 0..b * kh {
                buf[(r * cap + len) * d..(r * cap + s) * d]
                    .copy_from_slice(&new[r * t * d..(r + 1) * t * d]);
                all[r * s * d..(r + 1) * s * d]
                    .copy_from_slice(&buf[r * cap * d..(r * cap + s) * d]);
            }
            outs.push(Tensor::from_vec(all, (b, kh, s, d), &Device::Cpu)?);
        }
        let v_all = outs.pop().expect("two");
        let k_all = outs.pop().expect("two");
        Ok((k_all, v_all))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps only the given batch rows (finished rows leave the batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let block = self.kv_heads * self.capacity * self.head_dim;
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= self.batch) {
            candle_core::bail!("KV cache has {} rows, asked for row {bad}", self.batch);
        }
        for (k, v) in self.layers.iter_mut() {
            for buf in [k, v] {
                let mut kept = Vec::with_capacity(rows.len() * block);
                for &r in rows {
                    kept.extend_from_slice(&buf[r as usize * block..(r as usize + 1) * block]);
                }
                *buf = kept;
            }
        }
        self.batch = rows.len();
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn load(w: &Weights, cfg: &Config) -> Result<Attention> {
        let (c, h, k, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: w.linear("q_proj", c, h * d, bias)?,
            k_proj: w.linear("k_proj", c, k * d, bias)?,
            v_proj: w.linear("v_proj", c, k * d, bias)?,
            o_proj: w.linear("o_proj", h * d, c, false)?,
            num_heads: h,
            num_kv_heads: k,
            head_dim: d,
        })
    }

    /// x: (B, T, C); mask: (B, 1, T, S) additive; returns (B, T, C).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?; // (B, H, T, D)
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, kh, d))?
            .transpose(1, 2)?; // (B, K, T, D)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kh, d))?
            .transpose(1, 2)?; // (B, K, T, D)
        let q = rope.apply(&q)?; // (B, H, T, D)
        let k = rope.apply(&k)?; // (B, K, T, D)
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?, // (B, K, S, D)
            None => (k, v.contiguous()?),
        };
        let s = k.dim(2)?;
        let rep = h / kh;
        // Grouped-query attention without copying k, v: fold each group's query heads into rows.
        let q = q.contiguous()?.reshape((b, kh, rep * t, d))?; // (B, K, rep*T, D)
        let scale = 1.0 / (d as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?; // (B, K, rep*T, S)
        let att = att.reshape((b, h, t, s))?; // (B, H, T, S)
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = softmax_last(&att)?.reshape((b, kh, rep * t, s))?; // (B, K, rep*T, S)
        let y = att.matmul(&v)?; // (B, K, rep*T, D)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?; // (B, T, H*D)
        self.o_proj.forward(&y) // (B, T, C)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(w: &Weights, cfg: &Config) -> Result<Mlp> {
        let (c, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: w.linear("gate_proj", c, i, bias)?,
            up_proj: w.linear("up_proj", c, i, bias)?,
            down_proj: w.linear("down_proj", i, c, bias)?,
        })
    }
}

impl Module for Mlp {
    /// SwiGLU: (B, T, C) -> (B, T, C)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?; // (B, T, I)
        let up = self.up_proj.forward(x)?; // (B, T, I)
        self.down_proj.forward(&(gate * up)?) // (B, T, C)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn load(w: &Weights, cfg: &Config) -> Result<Block> {
        Ok(Block {
            input_layernorm: RmsNorm::load(
                w,
                "input_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                "post_attention_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    /// (B, T, C) -> (B, T, C)
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let h =
            (x + self
                .self_attn
                .forward(&self.input_layernorm.forward(x)?, rope, mask, cache)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: Config,
    /// (V, C)
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    /// (D/2)
    pub(crate) inv_freq: Tensor,
}

impl Llama {
    /// Loads every tensor under its Hugging Face name (`model.layers.N...`, `lm_head.weight`).
    pub fn load(w: &Weights, cfg: &Config) -> Result<Llama> {
        let m = w.pp("model");
        let embed_tokens = m.get(&[cfg.vocab_size, cfg.hidden_size], "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(&m.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m, "norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let lm_head = if !tied {
            w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        } else if w.is_quantized() {
            // Keep the tied head quantized too: it is the largest matmul of a decode step.
            let mut l = m.linear("embed_tokens", cfg.hidden_size, cfg.vocab_size, false)?;
            l.name = "lm_head".into();
            l
        } else {
            Linear::dense("lm_head", embed_tokens.clone(), None).ctx(|| "lm_head".into())?
        };
        let inv_freq =
            Tensor::new(cfg.inv_freq(), &Device::Cpu).ctx(|| "rope frequencies".into())?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Final hidden states after the last norm.
    /// ids: (B, T) u32; positions: (B, T) u32; mask: (B, 1, T, S) additive, or `None` for a
    /// single unpadded causal sequence with T > 1 (a causal mask is built) or T == 1.
    /// Returns (B, T, C).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let causal;
        let mask = match mask {
            Some(m) => Some(m),
            None if t > 1 => {
                causal = causal_mask(b, t, past, self.cfg.sliding_window)?;
                Some(&causal)
            }
            None => None,
        };
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?; // (B, T, C)
        let rope = Rope::new(positions, &self.inv_freq)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope, mask, cache.as_deref_mut().map(|c| (c, i)))?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.norm.forward(&x) // (B, T, C)
    }

    /// The final norm applied to the residual stream after each of `layers` decoder blocks
    /// (1-based counts of blocks run, each at most the model's depth), in one pass: hidden
    /// states of intermediate depth, for linear probes. `mask` as in [`Llama::hidden_states`]
    /// (no cache). Returns one (B, T, C) tensor per entry of `layers`, in their order.
    pub fn hidden_states_at(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        layers: &[usize],
    ) -> candle_core::Result<Vec<Tensor>> {
        let (b, t) = ids.dims2()?;
        let deepest = layers.iter().copied().max().unwrap_or(0);
        if deepest > self.layers.len() || layers.contains(&0) {
            candle_core::bail!(
                "layers {layers:?}: the model has {} decoder blocks (counted from 1)",
                self.layers.len()
            );
        }
        let causal;
        let mask = match mask {
            Some(m) => Some(m),
            None if t > 1 => {
                causal = causal_mask(b, t, 0, self.cfg.sliding_window)?;
                Some(&causal)
            }
            None => None,
        };
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let rope = Rope::new(positions, &self.inv_freq)?;
        let mut out: Vec<Option<Tensor>> = vec![None; layers.len()];
        for (i, layer) in self.layers.iter().take(deepest).enumerate() {
            x = layer.forward(&x, &rope, mask, None)?;
            for (slot, &l) in out.iter_mut().zip(layers) {
                if l == i + 1 {
                    *slot = Some(self.norm.forward(&x)?);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every layer was reached"))
            .collect())
    }

    /// (B, T, C) -> (B, T, V)
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits of every position of unpadded sequences: ids (B, T) -> (B, T, V).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0) as u32;
        let positions = Tensor::arange(past, past + t as u32, &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((b, 1))?; // (B, T)
        let h = self.hidden_states(ids, &positions, None, cache)?;
        self.logits(&h)
    }
}

/// Causal mask for T new tokens after `past` cached ones: (B, 1, T, past + T).
pub fn causal_mask(
    b: usize,
    t: usize,
    past: usize,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let s = past + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let qpos = past + i;
        for j in 0..s {
            let hidden = j > qpos || window.is_some_and(|w| qpos - j.min(qpos) >= w);
            if hidden {
                m[i * s + j] = MASK_VALUE;
            }
        }
    }
    Tensor::from_vec(m, (1, 1, t, s), &Device::Cpu)?.repeat((b, 1, 1, 1))
}
