//! Unfused reference implementations built only from differentiable candle primitives.
//!
//! These run on any device and dtype and are the ground truth the fused CPU kernels are tested
//! against. Shapes: B batch, T tokens, C hidden, H query heads, K key/value heads, D head size,
//! N rows (B*T), V vocabulary.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::{AdamWParams, Targets};

/// (..., C) -> (..., C): x / sqrt(mean(x^2) + eps) * weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / c)?; // (..., 1)
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Rotate-halves RoPE (the Hugging Face layout, as `llama::Rope`).
/// x: (B, H, T, D); cos, sin: (B, T, D/2) or (T, D/2). Returns (B, H, T, D).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = if cos.rank() == 2 {
        (cos.unsqueeze(0)?, sin.unsqueeze(0)?)
    } else {
        (cos.clone(), sin.clone())
    };
    let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(1)?; // (B, 1, T, D)
    let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?.unsqueeze(1)?; // (B, 1, T, D)
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // (B, H, T, D)
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Additive causal mask (1, 1, T, T): 0 on and below the diagonal, `MASK_VALUE` above.
pub fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            m[i * t + j] = safetune_model::llama::MASK_VALUE;
        }
    }
    Tensor::from_vec(m, (1, 1, t, t), device)?.to_dtype(dtype)
}

/// Causal grouped-query attention. q: (B, H, T, D); k, v: (B, K, T, D) with H a multiple of K
/// (query head h reads key/value head h / (H/K)); mask: additive, broadcastable to
/// (B, 1, T, T), applied on top of the causal mask. Returns (B, H, T, D).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kh = k.dim(1)?;
    let rep = h / kh;
    let q = q.contiguous()?.reshape((b, kh, rep * t, d))?; // (B, K, rep*T, D)
    let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // (B, K, rep*T, T)
    let att = att.reshape((b, h, t, t))?; // (B, H, T, T)
    let att = att.broadcast_add(&causal_mask(t, att.dtype(), att.device())?)?;
    let att = match mask {
        Some(m) => att.broadcast_add(m)?,
        None => att,
    };
    let att = candle_nn::ops::softmax(&att, D::Minus1)?.reshape((b, kh, rep * t, t))?;
    att.matmul(&v.contiguous()?)?.reshape((b, h, t, d)) // (B, H, T, D)
}

/// silu(gate) * up, elementwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Mean cross-entropy over rows whose target is not `ignore_index` (0 when there are none).
/// logits: (N, V); targets: (N) u32 or i64.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (sum, count) = cross_entropy_sum(logits, targets, ignore_index)?;
    sum / count.max(1) as f64
}

/// Sum of -log softmax(logits)\[target\] over rows whose target is not `ignore_index`, and the
/// number of those rows. logits: (N, V); targets: (N) u32 or i64.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    let targets = Targets::new(targets, ignore_index, n, v)?;
    ce_sum(logits, &targets)
}

fn ce_sum(logits: &Tensor, targets: &Targets) -> Result<(Tensor, usize)> {
    let n = targets.len();
    let dev = logits.device();
    let safe: Vec<u32> = targets.safe_ids();
    let keep: Vec<f32> = targets.keep_mask();
    let count = targets.count();
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?; // (N, V)
    let idx = Tensor::from_vec(safe, (n, 1), dev)?;
    let picked = lsm.gather(&idx, 1)?.squeeze(1)?; // (N)
    let keep = Tensor::from_vec(keep, n, dev)?.to_dtype(picked.dtype())?;
    let sum = (picked * keep)?.sum_all()?.neg()?;
    Ok((sum, count))
}

/// Chunked lm_head + cross-entropy: hidden (N, C), weight (V, C). Same value as
/// `cross_entropy_sum(hidden @ weight^T, targets)`; the chunks only bound the size of each
/// matmul (autograd still keeps every chunk's logits).
pub fn lm_head_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let (n, _c) = hidden.dims2()?;
    let targets = Targets::new(targets, ignore_index, n, weight.dim(0)?)?;
    let chunk = chunk_rows.max(1);
    let wt = weight.t()?;
    let mut total: Option<Tensor> = None;
    let mut count = 0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = hidden.narrow(0, start, len)?.matmul(&wt)?; // (len, V)
        let (s, c) = ce_sum(&logits, &targets.slice(start, len))?;
        count += c;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
        start += len;
    }
    let total = match total {
        Some(t) => t,
        None => Tensor::zeros((), hidden.dtype(), hidden.device())?,
    };
    Ok((total, count))
}

/// Chunked lm_head + KL(p_ref || p) from primitives: hidden (N, C) with weight (V, C) gives p,
/// ref_hidden (N, Cr) with ref_weight (V, Cr) (or `weight` when None) gives p_ref. Returns the
/// KL summed over the rows; the reference side is detached, so only hidden and weight get
/// gradients (softmax(z) - p_ref per row of logits z). Autograd keeps every chunk's logits.
pub fn lm_head_kl_sum(
    hidden: &Tensor,
    ref_hidden: &Tensor,
    weight: &Tensor,
    ref_weight: Option<&Tensor>,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (n, _c) = hidden.dims2()?;
    let (nr, _cr) = ref_hidden.dims2()?;
    if nr != n {
        candle_core::bail!("lm_head KL: {n} tuned rows but {nr} reference rows");
    }
    let chunk = chunk_rows.max(1);
    let wt = weight.t()?;
    let wrt = ref_weight.unwrap_or(weight).detach().t()?;
    let ref_hidden = ref_hidden.detach();
    let mut total: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = hidden.narrow(0, start, len)?.matmul(&wt)?; // (len, V)
        let ref_logits = ref_hidden.narrow(0, start, len)?.matmul(&wrt)?; // (len, V)
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let lp_ref = candle_nn::ops::log_softmax(&ref_logits, D::Minus1)?;
        let kl = (lp_ref.exp()? * (lp_ref - lp)?)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + kl)?,
            None => kl,
        });
        start += len;
    }
    match total {
        Some(t) => Ok(t),
        None => Tensor::zeros((), hidden.dtype(), hidden.device()),
    }
}

/// One AdamW step with primitives (decoupled weight decay; the maths of PyTorch's AdamW).
/// `mv` is the (2, numel) moment buffer (row 0: m, row 1: v); returns the new buffer.
pub(crate) fn adamw_update(
    var: &Var,
    grad: &Tensor,
    mv: &Tensor,
    p: &AdamWParams,
    step: usize,
    grad_scale: f64,
) -> Result<Tensor> {
    let shape = var.shape().clone();
    let g = (grad.flatten_all()? * grad_scale)?;
    let m = mv.get(0)?;
    let v = mv.get(1)?;
    let m = ((m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
    let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
    let bc1 = 1.0 - p.beta1.powi(step as i32);
    let bc2 = 1.0 - p.beta2.powi(step as i32);
    let m_hat = (&m / bc1)?;
    let v_hat = (&v / bc2)?;
    let theta = (var.as_tensor().flatten_all()? * (1.0 - p.lr * p.weight_decay))?;
    let theta = (theta - ((m_hat / (v_hat.sqrt()? + p.eps)?)? * p.lr)?)?;
    var.set(&theta.reshape(shape)?)?;
    Tensor::stack(&[&m, &v], 0)
}

/// A linear layer without adapter from primitives: `x W^T`. A tracked w (full fine-tuning) uses
/// candle's matmul; a frozen f32 one uses `FrozenMatmul`, whose backward only forms x's
/// gradient (other dtypes take candle's matmul of the detached w).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        x.matmul(&w.t()?)
    } else if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        x.matmul(&w.detach().t()?)
    } else {
        x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
    }
}

/// `x W^T` for a frozen W (out, in): forward as a matmul, backward only `grad W` for x.
struct FrozenMatmul {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let data = storage.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: input must be contiguous");
        };
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?; // (N, in)
        let y = x.matmul(&self.w.t()?)?; // (N, out)
        let shape = y.shape().clone();
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(v), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?)) // (N, out) x (out, in) -> (N, in)
    }
}

/// A frozen linear layer with a LoRA adapter from primitives: `x W^T + bias + scale * (mask * x)
/// A^T B^T` (w and bias detached, so no gradient is formed for them).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = x.matmul(&w.detach().t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach())?;
    }
    let xd = match mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let delta = xd.matmul(&a.t()?)?.matmul(&b.t()?)?;
    y + (delta * scale)?
}
