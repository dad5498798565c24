//! The training loss: next-token cross-entropy over labelled positions only, through the fused
//! chunked lm_head + cross-entropy of [`crate::ops`] (the (N, V) logits and their
//! log-softmax never exist whole).
//!
//! Rows without a label (prompts, padding) are dropped before the head: they would only cost a
//! (rows, V) matmul each and contribute nothing.

use candle_core::{Device, Tensor};

use crate::error::{Result, TensorContext};
use crate::ops;
use crate::sft::IGNORE;

/// Summed cross-entropy over labelled positions and their number.
/// hidden: (B, T, C) or (N, C); head: (V, C); labels: N entries, [`IGNORE`] for no loss.
/// `chunk` rows of logits are computed at a time.
pub fn head_loss_sum(
    hidden: &Tensor,
    head: &Tensor,
    labels: &[u32],
    chunk: usize,
) -> Result<(Tensor, usize)> {
    let Some((idx, targets)) = labelled_rows(labels)? else {
        return Ok((Tensor::new(0f32, &Device::Cpu)?, 0));
    };
    let n = targets.len();
    let h = rows_of(hidden, &idx)?; // (n, C)
    let targets = Tensor::from_vec(targets, n, &Device::Cpu)?;
    ops::lm_head_cross_entropy_sum(&h, head, &targets, -100, chunk).ctx(|| "lm_head loss".into())
}

/// Summed KL(p_ref || p) over labelled positions and their number, for anchored tuning:
/// hidden (B, T, C) of the tuned model with its head (V, C); ref_hidden (B, T, Cr) of the
/// reference (computed without gradients) with its head, or `head` itself when `ref_head` is
/// None. labels as in [`head_loss_sum`]: only rows with a label carry the term.
pub fn head_kl_sum(
    hidden: &Tensor,
    ref_hidden: &Tensor,
    head: &Tensor,
    ref_head: Option<&Tensor>,
    labels: &[u32],
    chunk: usize,
) -> Result<(Tensor, usize)> {
    let Some((idx, targets)) = labelled_rows(labels)? else {
        return Ok((Tensor::new(0f32, &Device::Cpu)?, 0));
    };
    let n = targets.len();
    let h = rows_of(hidden, &idx)?; // (n, C)
    let r = rows_of(&ref_hidden.detach(), &idx)?; // (n, Cr)
    let kl = ops::lm_head_kl_sum(&h, &r, head, ref_head, chunk).ctx(|| "lm_head KL".into())?;
    Ok((kl, n))
}

/// The positions that carry a label, as an index tensor, and their labels; `None` when no
/// position does.
fn labelled_rows(labels: &[u32]) -> Result<Option<(Tensor, Vec<u32>)>> {
    let rows: Vec<u32> = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE)
        .map(|(i, _)| i as u32)
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let targets = rows.iter().map(|&i| labels[i as usize]).collect();
    let n = rows.len();
    Ok(Some((Tensor::from_vec(rows, n, &Device::Cpu)?, targets)))
}

/// The rows `idx` of `hidden` (B, T, C) or (N, C), flattened to (n, C).
fn rows_of(hidden: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let c = hidden.dim(candle_core::D::Minus1)?;
    Ok(hidden.reshape(((), c))?.index_select(idx, 0)?)
}
