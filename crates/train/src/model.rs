//! The trainable decoder: the same Llama-family network as `safetune_model::Llama`, rebuilt from
//! differentiable ops (see [`crate::kernels`]) with its trainable tensors as candle `Var`s.
//!
//! LoRA (the default) freezes the base weights and adds `scale * B A x` to each target
//! projection, A (r, in) random, B (out, r) zero, scale = alpha / r, so a fresh adapter leaves
//! the model unchanged. Full fine-tuning (`Mode::Full`) makes every weight a `Var`.
//!
//! Shapes: B batch, T tokens, N = B*T rows, C hidden size, H query heads, K key/value heads,
//! D head size, I MLP size, V vocabulary, r LoRA rank.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var, D};
use serde::{Deserialize, Serialize};

use safetune_model::quant::QMatrix;
use safetune_model::{Config, LinearWeight, Llama};

use crate::error::{Result, TensorContext, TrainError};
use crate::kernels;
use crate::ops;
use crate::qlinear;
use crate::rng::TrainRng;

/// A projection LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module name in Hugging Face checkpoints (and PEFT's `target_modules`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Accepts `q` or `q_proj` (any case); `None` for anything else.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => return None,
        })
    }
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input (training only).
    pub dropout: f32,
    pub targets: Vec<Target>,
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Lora(LoraSettings),
    /// Every weight (embeddings, norms, projections, head).
    Full,
}

/// A trainable tensor and its name: the PEFT key for LoRA tensors
/// (`base_model.model.<module>.lora_A.weight`), the checkpoint key for full fine-tuning.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

/// A low-rank adapter with its tensors as `Var`s.
#[derive(Debug, Clone)]
pub struct LoraVars {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// A linear layer of the trainable decoder.
#[derive(Debug, Clone)]
pub struct TrainLinear {
    /// Checkpoint path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// (out, in); the tensor of a `Var` under full fine-tuning. An empty (0, in) placeholder
    /// when the weight is held in `blocks`.
    pub weight: Tensor,
    /// The frozen weight in GGUF blocks (`tune --quantized`): the forward pass and the input
    /// gradient run on them ([`crate::qlinear`]) and `weight` holds nothing.
    pub blocks: Option<Arc<QMatrix>>,
    /// (out)
    pub bias: Option<Tensor>,
    pub lora: Option<LoraVars>,
}

/// Per-forward state: whether dropout is on, and the generator it draws from; and whether the
/// blocks recompute their activations in the backward pass (see `Recomputed`).
pub struct Step<'a> {
    pub rng: Option<&'a mut TrainRng>,
    /// Activation recomputation: each block keeps only its input for the backward pass, and
    /// the gradients of its trainable tensors land here (merge them with [`SideGrads::merge_into`]).
    pub recompute: Option<SideGrads>,
}

impl Step<'_> {
    /// No dropout (evaluation, or dropout 0).
    pub fn eval() -> Step<'static> {
        Step {
            rng: None,
            recompute: None,
        }
    }
}

/// Gradients of trainable tensors computed inside recomputed blocks, which candle's graph does
/// not see: the blocks are opaque custom ops to it.
#[derive(Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl SideGrads {
    fn add(&self, t: &Tensor, g: &Tensor) -> candle_core::Result<()> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let sum = match m.remove(&t.id()) {
            Some(old) => (old + g)?,
            None => g.clone(),
        };
        m.insert(t.id(), sum);
        Ok(())
    }

    /// Adds the side gradients of `vars` into `grads` and empties the store.
    pub fn merge_into(&self, vars: &[Var], grads: &mut GradStore) -> Result<()> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for v in vars {
            if let Some(g) = m.remove(&v.as_tensor().id()) {
                let sum = match grads.get(v.as_tensor()) {
                    Some(old) => (old + g)?,
                    None => g,
                };
                grads.insert(v.as_tensor(), sum);
            }
        }
        m.clear();
        Ok(())
    }
}

impl TrainLinear {
    /// x: (N, in) -> (N, out)
    pub fn forward(&self, x: &Tensor, step: &mut Step) -> Result<Tensor> {
        if let Some(q) = &self.blocks {
            return self.forward_blocks(q, x, step);
        }
        if let (Some(l), false) = (&self.lora, self.weight.is_variable()) {
            // Frozen base with an adapter: `ops::lora_linear` (fused on the CPU, primitives
            // elsewhere), which keeps nothing but its inputs.
            let mask = match step.rng.as_deref_mut() {
                Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
                _ => None,
            };
            return ops::lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
                mask.as_ref(),
            )
            .ctx(|| self.name.clone());
        }
        self.forward_reference(x, step)
    }

    /// The layer over a weight held in blocks: one op for base and adapter.
    fn forward_blocks(&self, q: &Arc<QMatrix>, x: &Tensor, step: &mut Step) -> Result<Tensor> {
        let y = match &self.lora {
            Some(l) => {
                let mask = match step.rng.as_deref_mut() {
                    Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
                    _ => None,
                };
                qlinear::qlora_linear(
                    x,
                    q,
                    self.bias.as_ref(),
                    l.a.as_tensor(),
                    l.b.as_tensor(),
                    l.scale,
                    mask.as_ref(),
                )
            }
            None => qlinear::qlinear(x, q, self.bias.as_ref()),
        };
        y.ctx(|| self.name.clone())
    }

    /// The layer from candle primitives: full fine-tuning, projections without an adapter, and
    /// the reference the fused adapter op is tested against. A weight held in blocks runs as
    /// in [`TrainLinear::forward`].
    pub fn forward_reference(&self, x: &Tensor, step: &mut Step) -> Result<Tensor> {
        if let Some(q) = &self.blocks {
            return self.forward_blocks(q, x, step);
        }
        // A frozen weight gets no gradient (see `ops::linear`).
        let mut y = ops::linear(x, &self.weight).ctx(|| self.name.clone())?; // (N, out)
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xd = match step.rng.as_deref_mut() {
                Some(rng) if l.dropout > 0.0 => dropout(x, l.dropout, rng)?,
                _ => x.clone(),
            };
            let delta = xd.matmul(&l.a.as_tensor().t()?)?; // (N, r)
            let delta = delta.matmul(&l.b.as_tensor().t()?)?; // (N, out)
            y = (y + (delta * l.scale)?)?;
        }
        Ok(y)
    }
}

/// Inverted dropout with a mask drawn from `rng` (reproducible, checkpointable).
fn dropout(x: &Tensor, p: f32, rng: &mut TrainRng) -> Result<Tensor> {
    Ok((x * dropout_mask(x, p, rng)?)?)
}

/// The mask of [`dropout`]: 0 or 1 / (1 - p) per element of `x`.
fn dropout_mask(x: &Tensor, p: f32, rng: &mut TrainRng) -> Result<Tensor> {
    let keep = 1.0 - p;
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.next_f32() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?)
}

#[derive(Debug, Clone)]
pub struct TrainBlock {
    /// (C)
    pub input_norm: Tensor,
    /// (C)
    pub post_norm: Tensor,
    pub q: TrainLinear,
    pub k: TrainLinear,
    pub v: TrainLinear,
    pub o: TrainLinear,
    pub gate: TrainLinear,
    pub up: TrainLinear,
    pub down: TrainLinear,
}

impl TrainBlock {
    /// The block's seven linear layers, in checkpoint order (q, k, v, o, gate, up, down).
    fn linears_mut(&mut self) -> [&mut TrainLinear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// Rotary cos/sin at each row's positions: (B, T, D/2) each.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// The trainable decoder.
#[derive(Debug)]
pub struct TrainModel {
    pub cfg: Config,
    /// (V, C)
    pub embed: Tensor,
    pub blocks: Vec<TrainBlock>,
    /// (C)
    pub norm: Tensor,
    /// (V, C); the embedding tensor itself when tied.
    pub lm_head: Tensor,
    /// Every trainable tensor, in a fixed order (optimizer state and checkpoints follow it).
    pub params: Vec<Param>,
    pub mode: Mode,
    /// (D/2)
    inv_freq: Tensor,
}

/// Makes `t` a `Var` named `name` when `full`, and records it.
fn maybe_var(t: Tensor, name: &str, full: bool, params: &mut Vec<Param>) -> Result<Tensor> {
    if !full {
        return Ok(t);
    }
    let var = Var::from_tensor(&t).ctx(|| name.to_string())?;
    let out = var.as_tensor().clone();
    params.push(Param {
        name: name.to_string(),
        var,
    });
    Ok(out)
}

impl TrainModel {
    /// Builds the trainable decoder from a loaded (dense f32) model. LoRA A matrices are drawn
    /// from `seed` (uniform in +-1/sqrt(in), PEFT's default bound); B matrices start at zero.
    pub fn from_llama(model: &Llama, mode: &Mode, seed: u64) -> Result<TrainModel> {
        TrainModel::build(model, mode, seed, false)
    }

    /// As [`TrainModel::from_llama`], with the frozen projections (q, k, v, o, gate, up, down)
    /// kept in GGUF blocks: Q4_0, Q4_1 and Q8_0 as loaded; any other format (other GGUF
    /// block types, dense f32) quantized to Q8_0 one layer at a time. Embeddings, norms and the
    /// head stay f32 (dequantized), the adapters f32. LoRA only: full fine-tuning is refused.
    pub fn from_llama_quantized(model: &Llama, mode: &Mode, seed: u64) -> Result<TrainModel> {
        TrainModel::build(model, mode, seed, true)
    }

    fn build(model: &Llama, mode: &Mode, seed: u64, quantized: bool) -> Result<TrainModel> {
        if quantized && matches!(mode, Mode::Full) {
            return Err(TrainError::config(
                "quantized",
                "full fine-tuning needs f32 weights to train; a quantized base trains LoRA adapters only (drop `full` or `quantized`)",
            ));
        }
        let cfg = model.cfg.clone();
        let full = matches!(mode, Mode::Full);
        let mut params = Vec::new();
        let mut rng = TrainRng::derive(seed, 0x10_4A);
        let lora = match mode {
            Mode::Lora(l) => {
                if l.rank == 0 {
                    return Err(TrainError::config("lora", "rank must be at least 1"));
                }
                if l.targets.is_empty() {
                    return Err(TrainError::config(
                        "lora",
                        "no target modules (choose from q, k, v, o, gate, up, down)",
                    ));
                }
                Some(l)
            }
            Mode::Full => None,
        };
        let embed = maybe_var(
            model.embed_tokens.clone(),
            "model.embed_tokens.weight",
            full,
            &mut params,
        )?;
        let mut linear = |l: &safetune_model::Linear,
                          target: Target,
                          params: &mut Vec<Param>|
         -> Result<TrainLinear> {
            let (weight, blocks) = if quantized {
                let q = blocks_of(l).ctx(|| l.name.clone())?;
                (
                    Tensor::zeros((0, l.in_dim), DType::F32, &Device::Cpu)?,
                    Some(q),
                )
            } else {
                let w = l.dense_weight().ctx(|| l.name.clone())?;
                (
                    maybe_var(w, &format!("{}.weight", l.name), full, params)?,
                    None,
                )
            };
            let bias = match &l.bias {
                Some(b) => Some(maybe_var(
                    b.clone(),
                    &format!("{}.bias", l.name),
                    full,
                    params,
                )?),
                None => None,
            };
            let lora = match lora {
                Some(s) if s.targets.contains(&target) => {
                    let bound = 1.0 / (l.in_dim as f32).sqrt();
                    let a: Vec<f32> = (0..s.rank * l.in_dim)
                        .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                        .collect();
                    let a = Var::from_vec(a, (s.rank, l.in_dim), &Device::Cpu)?;
                    let b = Var::zeros((l.out_dim, s.rank), DType::F32, &Device::Cpu)?;
                    let key = format!("base_model.model.{}", l.name);
                    params.push(Param {
                        name: format!("{key}.lora_A.weight"),
                        var: a.clone(),
                    });
                    params.push(Param {
                        name: format!("{key}.lora_B.weight"),
                        var: b.clone(),
                    });
                    Some(LoraVars {
                        a,
                        b,
                        scale: s.alpha / s.rank as f64,
                        dropout: s.dropout,
                    })
                }
                _ => None,
            };
            Ok(TrainLinear {
                name: l.name.clone(),
                weight,
                blocks,
                bias,
                lora,
            })
        };
        let mut blocks = Vec::with_capacity(model.layers.len());
        for (i, b) in model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let input_norm = maybe_var(
                b.input_layernorm.weight.clone(),
                &format!("{p}.input_layernorm.weight"),
                full,
                &mut params,
            )?;
            let a = &b.self_attn;
            let q = linear(&a.q_proj, Target::Q, &mut params)?;
            let k = linear(&a.k_proj, Target::K, &mut params)?;
            let v = linear(&a.v_proj, Target::V, &mut params)?;
            let o = linear(&a.o_proj, Target::O, &mut params)?;
            let post_norm = maybe_var(
                b.post_attention_layernorm.weight.clone(),
                &format!("{p}.post_attention_layernorm.weight"),
                full,
                &mut params,
            )?;
            let m = &b.mlp;
            let gate = linear(&m.gate_proj, Target::Gate, &mut params)?;
            let up = linear(&m.up_proj, Target::Up, &mut params)?;
            let down = linear(&m.down_proj, Target::Down, &mut params)?;
            blocks.push(TrainBlock {
                input_norm,
                post_norm,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = maybe_var(
            model.norm.weight.clone(),
            "model.norm.weight",
            full,
            &mut params,
        )?;
        // Tied heads share the embedding tensor (and, under full tuning, its Var).
        let head = model.lm_head.dense_weight().ctx(|| "lm_head".into())?;
        let tied = head.id() == model.embed_tokens.id() || cfg.tie_word_embeddings;
        let lm_head = if tied {
            embed.clone()
        } else {
            maybe_var(head, "lm_head.weight", full, &mut params)?
        };
        let inv_freq = Tensor::new(cfg.inv_freq(), &Device::Cpu)?;
        Ok(TrainModel {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            params,
            mode: mode.clone(),
            inv_freq,
        })
    }

    /// A frozen decoder over a loaded model (no `Var`s, no adapters): a separate reference
    /// model for anchored tuning. Its forward pass builds no graph.
    pub fn frozen(model: &Llama) -> Result<TrainModel> {
        let mut m = TrainModel::from_llama(model, &Mode::Full, 0)?;
        // Unwrap every Var into a plain tensor (the same storage): nothing is tracked.
        let plain = |t: &Tensor| t.detach();
        m.embed = plain(&m.embed);
        m.norm = plain(&m.norm);
        m.lm_head = plain(&m.lm_head);
        for b in &mut m.blocks {
            b.input_norm = plain(&b.input_norm);
            b.post_norm = plain(&b.post_norm);
            for l in b.linears_mut() {
                l.weight = plain(&l.weight);
                l.bias = l.bias.as_ref().map(plain);
            }
        }
        m.params.clear();
        Ok(m)
    }

    /// This decoder with its adapters switched off: the tuning base under LoRA, sharing every
    /// tensor with `self` (no copy of the weights). The adapters stay in place with scale 0
    /// and no dropout, so the base runs through the very kernels the tuned forward pass uses
    /// and a fresh adapter (B = 0) gives bit-identical hidden states. Has no params; call its
    /// forward pass with [`Step::eval`] and detach the result.
    pub fn adapters_off(&self) -> TrainModel {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let mut b = b.clone();
                for l in b.linears_mut() {
                    if let Some(lv) = &mut l.lora {
                        lv.scale = 0.0;
                        lv.dropout = 0.0;
                    }
                }
                b
            })
            .collect();
        TrainModel {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            blocks,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            params: Vec::new(),
            mode: self.mode.clone(),
            inv_freq: self.inv_freq.clone(),
        }
    }

    pub fn num_trainable(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// positions: (B, T) u32 -> cos, sin (B, T, D/2).
    pub fn rope_tables(&self, positions: &Tensor) -> Result<RopeTables> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (B, T, 1)
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?; // (B, T, D/2)
        Ok(RopeTables {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Final hidden states after the last norm.
    /// ids, positions: (B, T) u32; mask: (B, 1, T, T) additive. Returns (B, T, C).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        step: &mut Step,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.hidden_size;
        let rope = self.rope_tables(positions)?;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b * t, c))?; // (N, C)
        if step.recompute.is_some() && !self.embed.is_variable() {
            // The recomputed blocks are custom ops over x: candle walks back through them
            // only if x is tracked, and a frozen embedding's rows are not.
            x = Var::from_tensor(&x)?.as_tensor().clone();
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let y = match step.recompute.clone() {
                None => block_forward(&self.cfg, block, &x, b, t, &rope, mask, step),
                Some(side) => {
                    Recomputed::apply(&self.cfg, block, &x, b, t, &rope, mask, step, side)
                }
            };
            x = y.map_err(|e| match e {
                TrainError::Tensor { context, source } => TrainError::Tensor {
                    context: format!("layer {i}: {context}"),
                    source,
                },
                other => other,
            })?;
        }
        let x = kernels::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?; // (N, C)
        Ok(x.reshape((b, t, c))?)
    }

    /// Full logits (tests and small evaluations): hidden (B, T, C) -> (B, T, V).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.broadcast_matmul(&self.lm_head.t()?)?)
    }

    /// Every LoRA adapter: (module path, A (r, in), B (out, r), alpha / r).
    pub fn lora_tensors(&self) -> Vec<(String, Tensor, Tensor, f64)> {
        let mut out = Vec::new();
        for blk in &self.blocks {
            for l in [
                &blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down,
            ] {
                if let Some(lv) = &l.lora {
                    out.push((
                        l.name.clone(),
                        lv.a.as_tensor().clone(),
                        lv.b.as_tensor().clone(),
                        lv.scale,
                    ));
                }
            }
        }
        out
    }
}

/// One decoder block on x: (N, C) -> (N, C).
#[allow(clippy::too_many_arguments)]
fn block_forward(
    cfg: &Config,
    blk: &TrainBlock,
    x: &Tensor,
    b: usize,
    t: usize,
    rope: &RopeTables,
    mask: &Tensor,
    step: &mut Step,
) -> Result<Tensor> {
    let (h, kh, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    // Attention.
    let xn = kernels::rms_norm(x, &blk.input_norm, cfg.rms_norm_eps)?; // (N, C)
    let q = blk
        .q
        .forward(&xn, step)?
        .reshape((b, t, h, d))?
        .transpose(1, 2)?; // (B, H, T, D)
    let k = blk
        .k
        .forward(&xn, step)?
        .reshape((b, t, kh, d))?
        .transpose(1, 2)?; // (B, K, T, D)
    let v = blk
        .v
        .forward(&xn, step)?
        .reshape((b, t, kh, d))?
        .transpose(1, 2)?; // (B, K, T, D)
    let q = kernels::rope(&q, &rope.cos, &rope.sin)?; // (B, H, T, D)
    let k = kernels::rope(&k, &rope.cos, &rope.sin)?; // (B, K, T, D)
    let y = kernels::attention(&q, &k, &v, mask)?; // (B, H, T, D)
    let y = y.transpose(1, 2)?.reshape((b * t, h * d))?; // (N, H*D)
    let x = (x + blk.o.forward(&y, step)?)?; // (N, C)
                                             // MLP.
    let xn = kernels::rms_norm(&x, &blk.post_norm, cfg.rms_norm_eps)?; // (N, C)
    let g = blk.gate.forward(&xn, step)?; // (N, I)
    let u = blk.up.forward(&xn, step)?; // (N, I)
    let m = blk.down.forward(&kernels::silu_mul(&g, &u)?, step)?; // (N, C)
    Ok((x + m)?)
}

/// A decoder block under activation recomputation. Forward: the block runs on a detached copy of
/// its input, so none of its intermediate tensors outlive the call, and the result enters
/// candle's graph as this op's output. Backward: the block runs again from the saved input (with
/// the same dropout masks, replayed from the generator's state), the local graph is
/// differentiated against the incoming gradient, the gradient for the input goes back to candle
/// and those of the block's trainable tensors go to the [`SideGrads`].
struct Recomputed {
    cfg: Config,
    blk: TrainBlock,
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    /// The generator as it was before the forward pass (None: no dropout).
    rng: Option<TrainRng>,
    /// The forward result, handed to candle by `cpu_fwd`.
    y: Tensor,
    side: SideGrads,
}

impl Recomputed {
    #[allow(clippy::too_many_arguments)]
    fn apply(
        cfg: &Config,
        blk: &TrainBlock,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &RopeTables,
        mask: &Tensor,
        step: &mut Step,
        side: SideGrads,
    ) -> Result<Tensor> {
        let rng = step.rng.as_deref().cloned();
        let y = block_forward(cfg, blk, &x.detach(), b, t, rope, mask, step)?.detach();
        let op = Recomputed {
            cfg: cfg.clone(),
            blk: blk.clone(),
            b,
            t,
            cos: rope.cos.clone(),
            sin: rope.sin.clone(),
            mask: mask.clone(),
            rng,
            y,
            side,
        };
        Ok(x.apply_op1(op)?)
    }

    /// The block's tensors that are `Var`s (LoRA A and B; every weight under full tuning).
    fn trainable(&self) -> Vec<&Tensor> {
        let b = &self.blk;
        let mut out: Vec<&Tensor> = vec![&b.input_norm, &b.post_norm];
        for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
            out.push(&l.weight);
            out.extend(&l.bias);
            if let Some(lv) = &l.lora {
                out.push(lv.a.as_tensor());
                out.push(lv.b.as_tensor());
            }
        }
        out.retain(|t| t.is_variable());
        out
    }
}

impl candle_core::CustomOp1 for Recomputed {
    fn name(&self) -> &'static str {
        "recomputed-block"
    }

    fn cpu_fwd(
        &self,
        _storage: &candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let v = self.y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(v), self.y.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let err = |e: TrainError| candle_core::Error::Msg(format!("recomputed block: {e}"));
        let xv = Var::from_tensor(&x.detach())?;
        let mut rng = self.rng.clone();
        let mut step = Step {
            rng: rng.as_mut(),
            recompute: None,
        };
        let rope = RopeTables {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        };
        let y = block_forward(
            &self.cfg,
            &self.blk,
            xv.as_tensor(),
            self.b,
            self.t,
            &rope,
            &self.mask,
            &mut step,
        )
        .map_err(err)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for t in self.trainable() {
            if let Some(g) = grads.get(t) {
                self.side.add(t, g)?;
            }
        }
        Ok(grads.get(xv.as_tensor()).cloned())
    }
}

/// A projection's weight as GGUF blocks: shared as loaded (Q4_0, Q4_1, Q8_0), else (dense f32,
/// other GGUF formats) dequantized and quantized to Q8_0.
fn blocks_of(l: &safetune_model::Linear) -> candle_core::Result<Arc<QMatrix>> {
    if let LinearWeight::Blocks(q) = &l.weight {
        return Ok(q.clone());
    }
    if !l.in_dim.is_multiple_of(safetune_model::quant::BLOCK) {
        candle_core::bail!(
            "input width {} is not a multiple of {}: the weight cannot be held in blocks",
            l.in_dim,
            safetune_model::quant::BLOCK
        );
    }
    let w = l.dense_weight()?;
    let q = candle_core::quantized::QTensor::quantize(
        &w.contiguous()?,
        candle_core::quantized::GgmlDType::Q8_0,
    )?;
    match QMatrix::from_qtensor(&q)? {
        Some(m) => Ok(Arc::new(m)),
        None => candle_core::bail!("quantizing to Q8_0 failed"),
    }
}

/// Causal attention mask over packed rows: a token sees earlier tokens of its own segment only.
/// `segments[b][t]` is the segment of each token (0 = padding, which sees only itself).
/// Returns (B, 1, T, T) additive.
pub fn segment_mask(segments: &[Vec<u32>]) -> Result<Tensor> {
    let b = segments.len();
    let t = segments.first().map(|s| s.len()).unwrap_or(0);
    let mut m = vec![safetune_model::llama::MASK_VALUE; b * t * t];
    for (bi, seg) in segments.iter().enumerate() {
        for i in 0..t {
            let row = &mut m[(bi * t + i) * t..(bi * t + i + 1) * t];
            for j in 0..=i {
                if j == i || (seg[i] != 0 && seg[j] == seg[i]) {
                    row[j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu)?)
}
