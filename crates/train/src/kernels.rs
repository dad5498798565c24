//! The differentiable ops the trainable decoder is built from, in one place, so the decoder reads
//! as the model and the choice of kernel is made here: [`crate::ops`] (fused CPU kernels
//! with forward and backward, or the unfused reference from candle primitives).
//!
//! Never candle's fused inference kernels (`rms_norm`, `softmax_last_dim`, `rope`): they have no
//! backward and would silently cut the graph, so almost no gradient would arrive.

use candle_core::{Result, Tensor};

use crate::ops;

/// RMSNorm over the last dimension. x: (..., C), weight: (C) -> (..., C).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    ops::rms_norm(x, weight, eps)
}

/// Rotary embedding, halves layout. x: (B, H, T, D); cos, sin: (B, T, D/2) -> (B, H, T, D).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    ops::rope(x, cos, sin)
}

/// Causal grouped-query attention. q: (B, H, T, D); k, v: (B, K, T, D); mask: (B, 1, T, T)
/// additive, applied on top of the causal mask (block-diagonal for packed rows).
/// Returns (B, H, T, D).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let d = q.dim(3)?;
    ops::causal_attention(q, k, v, 1.0 / (d as f64).sqrt(), Some(mask))
}

/// SwiGLU's gate: silu(gate) * up, both (..., I).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    ops::silu_mul(gate, up)
}
