//! Fused CPU kernels (f32): candle custom ops whose forward and backward passes each run as one
//! multi-threaded pass (rayon) over raw memory, with matrix products through the gemm crate's
//! blocked algorithm on the ISA of [`super::isa`].
//! Each function falls back to [`super::reference`] for inputs it does not handle (another dtype
//! or device).

mod adamw;
mod attention;
mod elementwise;
mod linear;
pub(crate) mod lora;
mod loss;
pub(crate) mod util;

pub use util::{clear_frozen_packs, frozen_pack_budget, frozen_pack_stats, FROZEN_PACK_BUDGET_ENV};

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{reference, AdamWParams, Targets};

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu))
}

/// RMSNorm: x (..., C), weight (C).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !cpu_f32(&[x, weight]) {
        return reference::rms_norm(x, weight, eps);
    }
    let c = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [c] {
        candle_core::bail!(
            "rms_norm: weight of shape {:?} for rows of {c}",
            weight.shape()
        );
    }
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        elementwise::RmsNorm { eps: eps as f32 },
    )
}

/// Rotate-halves RoPE: x (B, H, T, D), cos/sin (B, T, D/2) or (T, D/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[x, cos, sin]) {
        return reference::rope(x, cos, sin);
    }
    let x = if x.rank() == 4 && x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, elementwise::Rope)
}

/// Causal GQA attention: q (B, H, T, D), k/v (B, K, T, D), mask broadcastable to (B, 1, T, T).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let all = match mask {
        Some(m) => cpu_f32(&[q, k, v, m]),
        None => cpu_f32(&[q, k, v]),
    };
    if !all {
        return reference::causal_attention(q, k, v, scale, mask);
    }
    let (b, _h, t, _d) = q.dims4()?;
    let mask = match mask {
        None => None,
        Some(m) => {
            let mb = match m.dims() {
                [mb, 1, tq, tk] | [mb, tq, tk]
                    if *tq == t && *tk == t && (*mb == 1 || *mb == b) =>
                {
                    *mb
                }
                [tq, tk] if *tq == t && *tk == t => 1,
                _ => candle_core::bail!(
                    "causal_attention: mask of shape {:?} does not broadcast to ({b}, 1, {t}, {t})",
                    m.shape()
                ),
            };
            Some(m.reshape((mb, t, t))?.contiguous()?)
        }
    };
    // The kernel reads any strides as long as each row of D is contiguous.
    let fix = |x: &Tensor| -> Result<Tensor> {
        if x.rank() == 4 && x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    fix(q)?.apply_op3(
        &fix(k)?,
        &fix(v)?,
        attention::Attention {
            scale: scale as f32,
            mask,
            lse: Mutex::new(Vec::new()),
        },
    )
}

/// silu(gate) * up.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[gate, up]) {
        return reference::silu_mul(gate, up);
    }
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "silu_mul: gate {:?} and up {:?} differ in shape",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, elementwise::SiluMul)
}

/// A linear layer without adapter: x (N, in), w (out, in) -> x W^T (N, out), with gradients for
/// whichever of x and w is tracked.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[x, w]) {
        return reference::linear(x, w);
    }
    let (_, inp) = x.dims2()?;
    let (_, w_in) = w.dims2()?;
    if w_in != inp {
        candle_core::bail!("linear: x {:?} and w {:?} do not fit", x.shape(), w.shape());
    }
    let op = linear::Linear {
        grad_x: x.track_op(),
        grad_w: w.track_op(),
        w_key: util::frozen_key(w),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// A frozen linear layer (w (out, in), bias (out)) with a LoRA adapter (a (r, in), b (out, r)):
/// `x W^T + bias + scale * (mask * x) A^T B^T`, x (N, in) -> (N, out). Gradients flow to x, a
/// and b.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut all = vec![x, w, a, b];
    all.extend(bias);
    all.extend(mask);
    if !cpu_f32(&all) {
        return reference::lora_linear(x, w, bias, a, b, scale, mask);
    }
    let (_, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    if w_in != inp || a_in != inp || b.dims() != [out, r] {
        candle_core::bail!(
            "lora_linear: x {:?}, w {:?}, a {:?}, b {:?} do not fit",
            x.shape(),
            w.shape(),
            a.shape(),
            b.shape()
        );
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        lora::LoraLinear {
            w_key: util::frozen_key(w),
            w: w.detach().contiguous()?,
            bias: bias.map(|t| t.detach()),
            scale: scale as f32,
            mask: mask.map(|t| t.detach()),
        },
    )
}

/// Summed cross-entropy over logits (N, V) and the number of counted rows.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, usize)> {
    if !cpu_f32(&[logits]) {
        return reference::cross_entropy_sum(logits, targets, ignore_index);
    }
    let (n, v) = logits.dims2()?;
    let targets = Targets::new(targets, ignore_index, n, v)?;
    let count = targets.count();
    let sum = logits.contiguous()?.apply_op1(loss::CrossEntropy {
        targets,
        lse: Mutex::new(Vec::new()),
    })?;
    Ok((sum, count))
}

/// Summed cross-entropy of hidden (N, C) @ weight (V, C)^T, `chunk_rows` rows at a time.
pub fn lm_head_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    if !cpu_f32(&[hidden, weight]) {
        return reference::lm_head_cross_entropy_sum(
            hidden,
            weight,
            targets,
            ignore_index,
            chunk_rows,
        );
    }
    let (n, _c) = hidden.dims2()?;
    let (v, _) = weight.dims2()?;
    let targets = Targets::new(targets, ignore_index, n, v)?;
    let count = targets.count();
    let op = loss::LmHeadCe {
        targets,
        chunk: chunk_rows.max(1),
        want_h: hidden.track_op(),
        want_w: weight.track_op(),
        w_key: util::frozen_key(weight),
        grads: Mutex::new((None, None)),
    };
    let sum = hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
    Ok((sum, count))
}

/// Summed KL(softmax(ref_hidden Wr^T) || softmax(hidden W^T)) over the N rows, `chunk_rows`
/// rows at a time; `ref_weight` None: the reference shares `weight`. The reference side gets no
/// gradient.
pub fn lm_head_kl_sum(
    hidden: &Tensor,
    ref_hidden: &Tensor,
    weight: &Tensor,
    ref_weight: Option<&Tensor>,
    chunk_rows: usize,
) -> Result<Tensor> {
    let all = match ref_weight {
        Some(wr) => cpu_f32(&[hidden, ref_hidden, weight, wr]),
        None => cpu_f32(&[hidden, ref_hidden, weight]),
    };
    if !all {
        return reference::lm_head_kl_sum(hidden, ref_hidden, weight, ref_weight, chunk_rows);
    }
    // The same tensor as the tuned head is read through the op's own input.
    let ref_weight = ref_weight
        .filter(|wr| wr.id() != weight.id())
        .map(|wr| wr.detach().contiguous())
        .transpose()?;
    let op = loss::LmHeadKl {
        ref_hidden: ref_hidden.detach().contiguous()?,
        ref_weight,
        chunk: chunk_rows.max(1),
        want_h: hidden.track_op(),
        want_w: weight.track_op(),
        grads: Mutex::new((None, None)),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

pub(crate) fn adamw_update(
    var: &Var,
    grad: &Tensor,
    mv: &mut Tensor,
    p: &AdamWParams,
    step: usize,
    grad_scale: f64,
) -> Result<()> {
    let t = var.as_tensor();
    if !cpu_f32(&[t, grad, mv]) || !t.is_contiguous() {
        *mv = reference::adamw_update(var, grad, mv, p, step, grad_scale)?;
        return Ok(());
    }
    let g = grad.contiguous()?;
    mv.inplace_op2(
        &g,
        &adamw::Moments {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            grad_scale: grad_scale as f32,
        },
    )?;
    t.inplace_op2(
        mv,
        &adamw::Apply {
            lr: p.lr as f32,
            weight_decay: p.weight_decay as f32,
            eps: p.eps as f32,
            bc1: (1.0 - p.beta1.powi(step as i32)) as f32,
            bc2: (1.0 - p.beta2.powi(step as i32)) as f32,
        },
    )
}

pub(crate) fn sum_squares(g: &Tensor) -> Result<f64> {
    if !cpu_f32(&[g]) {
        return g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    util::with_f32(g, adamw::sum_squares)
}
