//! Differentiable training ops, each in two implementations: fused CPU kernels (candle custom ops
//! with forward and backward passes, multi-threaded) and an unfused reference built from candle
//! primitives that have backward passes.
//!
//! Contract:
//! - The functions at this module's root dispatch: the fused kernel when [`kernels`] is
//!   [`Kernels::Fused`] (the default) and every tensor input is f32 on the CPU; otherwise the
//!   reference in [`reference`](mod@reference). Both give the same values (to f32 rounding) and the same
//!   gradients, so a caller never needs to know which one ran. A GPU build uses the reference.
//! - [`set_kernels`] switches globally (for benchmarks and A/B checks); [`reference`](mod@reference) and
//!   [`fused`] can also be called directly.
//! - Gradients flow to every floating input that is tracked (a `Var` or computed from one),
//!   except RoPE's cos/sin, attention masks and targets, which are treated as constants.
//! - Shapes: B batch, T tokens, C hidden, H query heads, K key/value heads (H a multiple of K),
//!   D head size, N rows (B*T), V vocabulary, I MLP width.
//! - Cross-entropy targets are u32 or i64 ids; rows whose target equals `ignore_index`
//!   (conventionally -100) add nothing to the loss. `*_sum` variants return the summed loss and
//!   the number of counted rows, for normalising across gradient-accumulation micro-batches.
//! - [`lm_head_cross_entropy_sum`] never materialises the whole (N, V) logits in the fused path:
//!   it works `chunk_rows` rows at a time and computes the input gradients during the forward pass
//!   (the loss is a scalar, so its backward only scales them). [`lm_head_kl_sum`] (KL from a
//!   reference's next-token distribution to the tuned one, for anchored tuning) works the same way.
//! - [`AdamW`] has the maths of PyTorch's `AdamW` (decoupled weight decay, bias correction), in
//!   place on the `Var`s, with an optional gradient scale (for global-norm clipping).

pub mod bf16;
pub mod fused;
pub mod isa;
pub mod reference;

pub use bf16::{bf16_enabled, bf16_unavailable, set_bf16};
pub use isa::{isa, isa_from_env, isa_name, set_isa, Isa, ISA_ENV};

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

/// Which implementation the root functions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused CPU kernels where the inputs allow (f32 on the CPU), else the reference.
    Fused,
    /// Always the unfused reference built from candle primitives.
    Reference,
}

static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Selects the implementation for every later call (process-wide).
pub fn set_kernels(k: Kernels) {
    KERNELS.store(
        match k {
            Kernels::Fused => 0,
            Kernels::Reference => 1,
        },
        Ordering::Relaxed,
    );
}

/// The implementation currently selected.
pub fn kernels() -> Kernels {
    match KERNELS.load(Ordering::Relaxed) {
        0 => Kernels::Fused,
        _ => Kernels::Reference,
    }
}

/// True when the fused kernels are selected and every tensor is f32 on the CPU.
fn use_fused(ts: &[&Tensor]) -> bool {
    kernels() == Kernels::Fused
        && ts
            .iter()
            .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu))
}

/// RMSNorm: x (..., C), weight (C) -> (..., C).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(&[x, weight]) {
        fused::rms_norm(x, weight, eps)
    } else {
        reference::rms_norm(x, weight, eps)
    }
}

/// Rotate-halves RoPE, the convention of [`safetune_model::llama::Rope`]: x (B, H, T, D) (any
/// strides, e.g. a transposed (B, T, H, D) projection), cos and sin (B, T, D/2) or (T, D/2) at
/// each token's position. Returns (B, H, T, D), contiguous in the fused path.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if use_fused(&[x, cos, sin]) {
        fused::rope(x, cos, sin)
    } else {
        reference::rope(x, cos, sin)
    }
}

/// Causal grouped-query attention with softmax: q (B, H, T, D), k and v (B, K, T, D); query head
/// h reads key/value head h / (H/K). `scale` multiplies q·k (usually 1/sqrt(D)). `mask` is
/// additive, broadcastable to (B, 1, T, T) (e.g. block-diagonal for packed sequences, or
/// padding), applied on top of the causal mask; use [`safetune_model::llama::MASK_VALUE`] for
/// hidden keys. Returns (B, H, T, D).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let fused = match mask {
        Some(m) => use_fused(&[q, k, v, m]),
        None => use_fused(&[q, k, v]),
    };
    if fused {
        fused::causal_attention(q, k, v, scale, mask)
    } else {
        reference::causal_attention(q, k, v, scale, mask)
    }
}

/// SwiGLU's product silu(gate) * up; gate and up of the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if use_fused(&[gate, up]) {
        fused::silu_mul(gate, up)
    } else {
        reference::silu_mul(gate, up)
    }
}

/// A linear layer without adapter: x (N, in), w (out, in) -> x W^T (N, out). Gradients flow to
/// whichever of x and w is tracked (w a `Var` in full fine-tuning; a frozen w gets none, and
/// costs no weight-gradient product).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if use_fused(&[x, w]) {
        fused::linear(x, w)
    } else {
        reference::linear(x, w)
    }
}

/// A frozen linear layer with a LoRA adapter: `x W^T + bias + scale * (mask * x) A^T B^T`;
/// x (N, in), w (out, in), bias (out), a (r, in), b (out, r), mask (N, in) -> (N, out).
/// Gradients flow to x, a and b only (w and bias are frozen).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if kernels() == Kernels::Fused {
        fused::lora_linear(x, w, bias, a, b, scale, mask)
    } else {
        reference::lora_linear(x, w, bias, a, b, scale, mask)
    }
}

/// Mean cross-entropy over rows whose target is not `ignore_index` (0 if there are none).
/// logits: (N, V); targets: (N) u32 or i64.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (sum, count) = cross_entropy_sum(logits, targets, ignore_index)?;
    sum / count.max(1) as f64
}

/// Summed cross-entropy (a scalar tensor) over rows whose target is not `ignore_index`, and the
/// number of those rows. logits: (N, V); targets: (N) u32 or i64.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, usize)> {
    if use_fused(&[logits]) {
        fused::cross_entropy_sum(logits, targets, ignore_index)
    } else {
        reference::cross_entropy_sum(logits, targets, ignore_index)
    }
}

/// Mean of [`lm_head_cross_entropy_sum`] over counted rows (0 if there are none).
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (sum, count) =
        lm_head_cross_entropy_sum(hidden, weight, targets, ignore_index, chunk_rows)?;
    sum / count.max(1) as f64
}

/// Cross-entropy of `hidden @ weight^T` without materialising the logits: hidden (N, C) or
/// (B, T, C), weight (V, C) (the lm_head / tied embedding), targets (N) or (B, T).
/// Returns the summed loss (scalar) and the number of counted rows. `chunk_rows` rows of logits
/// exist at a time in the fused path (256-1024 is a good range).
pub fn lm_head_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let c = hidden.dim(candle_core::D::Minus1)?;
    let hidden = hidden.reshape(((), c))?;
    let targets = targets.flatten_all()?;
    if use_fused(&[&hidden, weight]) {
        fused::lm_head_cross_entropy_sum(&hidden, weight, &targets, ignore_index, chunk_rows)
    } else {
        reference::lm_head_cross_entropy_sum(&hidden, weight, &targets, ignore_index, chunk_rows)
    }
}

/// KL(p_ref || p) summed over rows, without materialising the logits: p = softmax(hidden
/// W^T) with hidden (N, C) or (B, T, C) and weight (V, C); p_ref = softmax(ref_hidden Wr^T)
/// with ref_hidden of the same rows and Wr = `ref_weight`, or `weight` itself when None (a
/// reference that shares the head, as the tuning base under LoRA). The reference side is a
/// constant: gradients flow to `hidden` and, when tracked, `weight` only; per row of logits z
/// the gradient is softmax(z) - p_ref. `chunk_rows` rows of both logits exist at a time in the
/// fused path.
pub fn lm_head_kl_sum(
    hidden: &Tensor,
    ref_hidden: &Tensor,
    weight: &Tensor,
    ref_weight: Option<&Tensor>,
    chunk_rows: usize,
) -> Result<Tensor> {
    let c = hidden.dim(candle_core::D::Minus1)?;
    let cr = ref_hidden.dim(candle_core::D::Minus1)?;
    let hidden = hidden.reshape(((), c))?;
    let ref_hidden = ref_hidden.reshape(((), cr))?;
    let fused = match ref_weight {
        Some(wr) => use_fused(&[&hidden, &ref_hidden, weight, wr]),
        None => use_fused(&[&hidden, &ref_hidden, weight]),
    };
    if fused {
        fused::lm_head_kl_sum(&hidden, &ref_hidden, weight, ref_weight, chunk_rows)
    } else {
        reference::lm_head_kl_sum(&hidden, &ref_hidden, weight, ref_weight, chunk_rows)
    }
}

/// Cross-entropy targets read once into host memory.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    /// The target id, or -1 for an ignored row.
    ids: Vec<i64>,
}

impl Targets {
    /// targets: (N) u32 or i64; every non-ignored id must be below `vocab`.
    pub(crate) fn new(t: &Tensor, ignore_index: i64, n: usize, vocab: usize) -> Result<Targets> {
        let t = t.flatten_all()?;
        if t.elem_count() != n {
            candle_core::bail!(
                "cross-entropy: {} targets for {n} rows of logits",
                t.elem_count()
            );
        }
        let raw: Vec<i64> = match t.dtype() {
            DType::U32 => t.to_vec1::<u32>()?.into_iter().map(|x| x as i64).collect(),
            DType::I64 => t.to_vec1::<i64>()?,
            DType::U8 => t.to_vec1::<u8>()?.into_iter().map(|x| x as i64).collect(),
            other => candle_core::bail!("cross-entropy: targets must be u32 or i64, got {other:?}"),
        };
        let mut ids = Vec::with_capacity(n);
        for (row, &x) in raw.iter().enumerate() {
            if x == ignore_index {
                ids.push(-1);
            } else if x < 0 || x as usize >= vocab {
                candle_core::bail!(
                    "cross-entropy: target {x} at row {row} is outside the vocabulary (0..{vocab}) and is not the ignore index {ignore_index}"
                );
            } else {
                ids.push(x);
            }
        }
        Ok(Targets { ids })
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn count(&self) -> usize {
        self.ids.iter().filter(|&&x| x >= 0).count()
    }

    /// The id, or None for an ignored row.
    #[allow(dead_code)]
    pub(crate) fn get(&self, row: usize) -> Option<usize> {
        let x = self.ids[row];
        (x >= 0).then_some(x as usize)
    }

    pub(crate) fn safe_ids(&self) -> Vec<u32> {
        self.ids.iter().map(|&x| x.max(0) as u32).collect()
    }

    pub(crate) fn keep_mask(&self) -> Vec<f32> {
        self.ids
            .iter()
            .map(|&x| if x >= 0 { 1.0 } else { 0.0 })
            .collect()
    }

    pub(crate) fn slice(&self, start: usize, len: usize) -> Targets {
        Targets {
            ids: self.ids[start..start + len].to_vec(),
        }
    }
}

/// AdamW hyper-parameters (PyTorch's defaults except `weight_decay`, which is candle's 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over a fixed list of `Var`s, updating them in place:
/// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p = p (1 - lr wd) - lr m^ / (sqrt(v^) + eps),
/// with m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), g = grad * grad_scale. A var with no gradient
/// in the store is left alone (its step still counts, as in candle's AdamW).
pub struct AdamW {
    vars: Vec<Var>,
    /// Per var: (2, numel) f32 moments, row 0 m, row 1 v.
    moments: Vec<Tensor>,
    step: usize,
    params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<AdamW> {
        let moments = vars
            .iter()
            .map(|v| Tensor::zeros((2, v.elem_count()), DType::F32, v.device()))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            moments,
            step: 0,
            params,
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Steps taken so far (t of the bias correction).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with the gradients as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` first (e.g. the global-norm
    /// clipping factor from [`grad_global_norm`], or 1/accumulation steps).
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        for (var, mv) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if use_fused(&[var.as_tensor(), g]) {
                fused::adamw_update(var, g, mv, &self.params, self.step, grad_scale)?;
            } else {
                *mv = reference::adamw_update(var, g, mv, &self.params, self.step, grad_scale)?;
            }
        }
        Ok(())
    }

    /// The optimizer state: step count and, per var, its first and second moments (each shaped
    /// like the var). For checkpoints.
    pub fn state(&self) -> Result<(usize, Vec<(Tensor, Tensor)>)> {
        let mut out = Vec::with_capacity(self.vars.len());
        for (var, mv) in self.vars.iter().zip(&self.moments) {
            let m = mv.get(0)?.reshape(var.shape())?.copy()?;
            let v = mv.get(1)?.reshape(var.shape())?.copy()?;
            out.push((m, v));
        }
        Ok((self.step, out))
    }

    /// Restores a state written by [`AdamW::state`] for the same vars in the same order.
    pub fn load_state(&mut self, step: usize, moments: &[(Tensor, Tensor)]) -> Result<()> {
        if moments.len() != self.vars.len() {
            candle_core::bail!(
                "optimizer state has {} entries for {} parameters",
                moments.len(),
                self.vars.len()
            );
        }
        let mut new = Vec::with_capacity(moments.len());
        for (i, (var, (m, v))) in self.vars.iter().zip(moments).enumerate() {
            if m.elem_count() != var.elem_count() || v.elem_count() != var.elem_count() {
                candle_core::bail!(
                    "optimizer state entry {i}: moments of {} and {} values for a parameter of shape {:?}",
                    m.elem_count(),
                    v.elem_count(),
                    var.shape()
                );
            }
            let m = m
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_device(var.device())?;
            let v = v
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_device(var.device())?;
            new.push(Tensor::stack(&[&m, &v], 0)?);
        }
        self.moments = new;
        self.step = step;
        Ok(())
    }
}

/// sqrt of the sum of squares of every var's gradient (vars without one count as zero).
pub fn grad_global_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            if use_fused(&[g]) {
                total += fused::sum_squares(g)?;
            } else {
                total += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
    }
    Ok(total.sqrt())
}
