//! Fused CPU kernels (f32). Each function falls back to [`super::reference`] for inputs it does
//! not handle (another dtype or device).

use candle_core::{Result, Tensor, Var};

use super::{reference, AdamWParams};

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    reference::rms_norm(x, weight, eps)
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    reference::rope(x, cos, sin)
}

pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    reference::causal_attention(q, k, v, scale, mask)
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    reference::silu_mul(gate, up)
}

pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, usize)> {
    reference::cross_entropy_sum(logits, targets, ignore_index)
}

pub fn lm_head_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    reference::lm_head_cross_entropy_sum(hidden, weight, targets, ignore_index, chunk_rows)
}

pub(crate) fn adamw_update(
    var: &Var,
    grad: &Tensor,
    mv: &mut Tensor,
    p: &AdamWParams,
    step: usize,
    grad_scale: f64,
) -> Result<()> {
    *mv = reference::adamw_update(var, grad, mv, p, step, grad_scale)?;
    Ok(())
}

pub(crate) fn sum_squares(g: &Tensor) -> Result<f64> {
    g.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}
