//! Cross-entropy with an ignore index (fused log-softmax), and the chunked lm_head +
//! cross-entropy that never holds all logits.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use safetune_model::vecmath;

use super::util::{matmul_big, matmul_big_packed, pack_frozen, slice, with_f32, with_f32s, Mat};
use crate::ops::Targets;

/// Summed cross-entropy over logits (N, V). Saves each row's log-sum-exp for the backward pass.
pub(crate) struct CrossEntropy {
    pub targets: Targets,
    pub lse: Mutex<Vec<f32>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "safetune-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = slice(s, l)?;
        let mut lses = vec![0f32; n];
        let total: f64 = lses
            .par_iter_mut()
            .enumerate()
            .map(|(i, out)| {
                let row = &x[i * v..(i + 1) * v];
                match self.targets.get(i) {
                    Some(t) => {
                        let l = vecmath::log_sum_exp(row);
                        *out = l;
                        (l - row[t]) as f64
                    }
                    None => 0.0,
                }
            })
            .sum();
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = lses;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let (n, v) = logits.dims2()?;
        let lses = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone();
        let d = with_f32(logits, |x| {
            let mut d = vec![0f32; n * v];
            d.par_chunks_mut(v).enumerate().for_each(|(i, drow)| {
                if let Some(t) = self.targets.get(i) {
                    let row = &x[i * v..(i + 1) * v];
                    drow.copy_from_slice(row);
                    vecmath::exp_shifted(drow, lses[i]);
                    drow.iter_mut().for_each(|d| *d *= g);
                    drow[t] -= g;
                }
            });
            d
        })?;
        Ok(Some(Tensor::from_vec(d, (n, v), logits.device())?))
    }
}

/// d loss / d hidden (N, C) and d loss / d weight (V, C), when wanted.
pub(crate) type HeadGrads = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Summed cross-entropy of hidden (N, C) @ weight (V, C)^T, `chunk` kept rows at a time.
/// Ignored rows are skipped entirely (no logits computed for them). When gradients are wanted
/// they are computed during the forward pass (d loss / d hidden, and d loss / d weight if
/// `want_w`), since the backward pass only scales them by the incoming scalar gradient.
pub(crate) struct LmHeadCe {
    pub targets: Targets,
    pub chunk: usize,
    pub want_h: bool,
    pub want_w: bool,
    /// The weight's key in the bf16 frozen-weight cache ([`super::util::frozen_key`]).
    pub w_key: Option<candle_core::TensorId>,
    pub grads: Mutex<HeadGrads>,
}

impl CustomOp2 for LmHeadCe {
    fn name(&self) -> &'static str {
        "safetune-lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (v, c2) = l2.shape().dims2()?;
        if c != c2 {
            candle_core::bail!("lm_head cross-entropy: hidden width {c} but weight {v}x{c2}");
        }
        let h = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let rows: Vec<usize> = (0..n).filter(|&i| self.targets.get(i).is_some()).collect();
        let chunk = self.chunk.max(1);
        let mut dh = self.want_h.then(|| vec![0f32; n * c]);
        let mut dw = self.want_w.then(|| vec![0f32; v * c]);
        let mut logits = vec![0f32; chunk.min(rows.len().max(1)) * v];
        let mut hbuf = vec![0f32; chunk.min(rows.len().max(1)) * c];
        let mut dhbuf = vec![0f32; chunk.min(rows.len().max(1)) * c];
        let mut total = 0f64;
        // In bf16, the weight is packed once for all chunks (W^T for the logits, W for dh).
        // A frozen weight (a LoRA run's tied head) comes from the cache after the first step.
        let w_t = pack_frozen(self.w_key, true, c, v, Mat::rm_t(w, c));
        let w_n = if self.want_h {
            pack_frozen(self.w_key, false, v, c, Mat::rm(w, c))
        } else {
            None
        };
        for part in rows.chunks(chunk) {
            let m = part.len();
            // Gather the kept rows: (m, C).
            for (j, &i) in part.iter().enumerate() {
                hbuf[j * c..(j + 1) * c].copy_from_slice(&h[i * c..(i + 1) * c]);
            }
            let hb = &hbuf[..m * c];
            let lg = &mut logits[..m * v];
            // (m, C) @ (C, V) -> (m, V)
            matmul_big_packed(
                m,
                v,
                c,
                lg,
                v,
                false,
                Mat::rm(hb, c),
                Mat::rm_t(w, c),
                w_t.as_deref(),
                1.0,
            );
            let want_grad = self.want_h || self.want_w;
            let loss: f64 = lg
                .par_chunks_mut(v)
                .zip(part.par_iter())
                .map(|(row, &i)| {
                    let t = self.targets.get(i).unwrap_or(0);
                    let target = row[t];
                    // The row becomes its softmax (the exponentials once, then scaled).
                    let m = vecmath::max(row);
                    let s = vecmath::exp_shifted(row, m);
                    let loss = (m + s.ln() - target) as f64;
                    if want_grad {
                        // Softmax minus one-hot: d loss_i / d logits_i.
                        let inv = 1.0 / s;
                        row.iter_mut().for_each(|x| *x *= inv);
                        row[t] -= 1.0;
                    }
                    loss
                })
                .sum();
            total += loss;
            if let Some(dh) = dh.as_mut() {
                // (m, V) @ (V, C) -> (m, C)
                let db = &mut dhbuf[..m * c];
                matmul_big_packed(
                    m,
                    c,
                    v,
                    db,
                    c,
                    false,
                    Mat::rm(lg, v),
                    Mat::rm(w, c),
                    w_n.as_deref(),
                    1.0,
                );
                for (j, &i) in part.iter().enumerate() {
                    dh[i * c..(i + 1) * c].copy_from_slice(&db[j * c..(j + 1) * c]);
                }
            }
            if let Some(dw) = dw.as_mut() {
                // (V, m) @ (m, C) -> (V, C), accumulated over chunks.
                matmul_big(
                    v,
                    c,
                    m,
                    dw,
                    c,
                    true,
                    Mat::rm_t(lg, v),
                    Mat::rm(hb, c),
                    1.0,
                    true,
                );
            }
        }
        *self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = (dh, dw);
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not cloned: the backward pass of a graph runs once.
        take_scaled(
            &self.grads,
            (self.want_h, self.want_w),
            "lm_head cross-entropy",
            hidden,
            weight,
            grad,
        )
    }
}

/// KL(p_ref || p) of one row. `t` holds the tuned logits and becomes d KL / d logits
/// (softmax(t) - p_ref) when `grad`; `r` holds the reference logits.
fn kl_row(t: &mut [f32], r: &[f32], grad: bool) -> f64 {
    let lse_t = vecmath::log_sum_exp(t);
    let lse_r = vecmath::log_sum_exp(r);
    let mut kl = 0f64;
    for (x, &y) in t.iter_mut().zip(r) {
        let lp_ref = y - lse_r;
        let lp = *x - lse_t;
        let p_ref = lp_ref.exp();
        kl += (p_ref * (lp_ref - lp)) as f64;
        if grad {
            *x = lp.exp() - p_ref;
        }
    }
    kl
}

/// Summed KL(softmax(r Wr^T) || softmax(h W^T)) over the rows of hidden h (N, C) and the
/// reference's hidden states r (N, Cr), `chunk` rows of both logits at a time. The reference
/// side is a constant (no gradient); `ref_weight` None means the reference shares `W`.
/// Gradients are computed during the forward pass, as in [`LmHeadCe`].
pub(crate) struct LmHeadKl {
    /// (N, Cr), detached and contiguous.
    pub ref_hidden: Tensor,
    /// (V, Cr), detached and contiguous; None: the tuned head itself.
    pub ref_weight: Option<Tensor>,
    pub chunk: usize,
    pub want_h: bool,
    pub want_w: bool,
    pub grads: Mutex<HeadGrads>,
}

impl LmHeadKl {
    fn forward(
        &self,
        h: &[f32],
        w: &[f32],
        r: &[f32],
        wr: &[f32],
        (n, c, cr, v): (usize, usize, usize, usize),
    ) -> (f64, HeadGrads) {
        let chunk = self.chunk.max(1).min(n.max(1));
        let want_grad = self.want_h || self.want_w;
        let mut dh = self.want_h.then(|| vec![0f32; n * c]);
        let mut dw = self.want_w.then(|| vec![0f32; v * c]);
        let mut lt = vec![0f32; chunk * v];
        let mut lr = vec![0f32; chunk * v];
        let mut total = 0f64;
        let mut start = 0;
        while start < n {
            let m = chunk.min(n - start);
            let hb = &h[start * c..(start + m) * c];
            let rb = &r[start * cr..(start + m) * cr];
            let (t, rf) = (&mut lt[..m * v], &mut lr[..m * v]);
            // (m, C) @ (C, V) -> (m, V), both sides.
            matmul_big(
                m,
                v,
                c,
                t,
                v,
                false,
                Mat::rm(hb, c),
                Mat::rm_t(w, c),
                1.0,
                true,
            );
            matmul_big(
                m,
                v,
                cr,
                rf,
                v,
                false,
                Mat::rm(rb, cr),
                Mat::rm_t(wr, cr),
                1.0,
                true,
            );
            // One value per row, summed in order so the total does not depend on threads.
            let rows: Vec<f64> = t
                .par_chunks_mut(v)
                .zip(rf.par_chunks(v))
                .map(|(tr, rr)| kl_row(tr, rr, want_grad))
                .collect();
            total += rows.iter().sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                // (m, V) @ (V, C) -> (m, C), straight into the rows of dh.
                let db = &mut dh[start * c..(start + m) * c];
                matmul_big(
                    m,
                    c,
                    v,
                    db,
                    c,
                    false,
                    Mat::rm(t, v),
                    Mat::rm(w, c),
                    1.0,
                    true,
                );
            }
            if let Some(dw) = dw.as_mut() {
                // (V, m) @ (m, C) -> (V, C), accumulated over chunks.
                matmul_big(
                    v,
                    c,
                    m,
                    dw,
                    c,
                    true,
                    Mat::rm_t(t, v),
                    Mat::rm(hb, c),
                    1.0,
                    true,
                );
            }
            start += m;
        }
        (total, (dh, dw))
    }
}

impl CustomOp2 for LmHeadKl {
    fn name(&self) -> &'static str {
        "safetune-lm-head-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (v, c2) = l2.shape().dims2()?;
        if c != c2 {
            candle_core::bail!("lm_head KL: hidden width {c} but weight {v}x{c2}");
        }
        let (nr, cr) = self.ref_hidden.dims2()?;
        if nr != n {
            candle_core::bail!("lm_head KL: {n} tuned rows but {nr} reference rows");
        }
        if let Some(wr) = &self.ref_weight {
            let (vr, cr2) = wr.dims2()?;
            if vr != v || cr2 != cr {
                candle_core::bail!(
                    "lm_head KL: reference head {vr}x{cr2} for a vocabulary of {v} and reference hidden width {cr}"
                );
            }
        } else if cr != c {
            candle_core::bail!("lm_head KL: reference hidden width {cr} but weight {v}x{c}");
        }
        let h = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let mut refs = vec![&self.ref_hidden];
        refs.extend(self.ref_weight.as_ref());
        let (total, grads) = with_f32s(&refs, |d| {
            let wr = if d.len() > 1 { d[1] } else { w };
            self.forward(h, w, d[0], wr, (n, c, cr, v))
        })?;
        *self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = grads;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        take_scaled(
            &self.grads,
            (self.want_h, self.want_w),
            "lm_head KL",
            hidden,
            weight,
            grad,
        )
    }
}

/// The gradients a fused head op stored in its forward pass, taken (the backward pass of a
/// graph runs once) and scaled by the incoming gradient `grad`; `want` says which of the
/// hidden states and the head weight need one, and `what` names the op in the error.
fn take_scaled(
    grads: &Mutex<HeadGrads>,
    want: (bool, bool),
    what: &str,
    hidden: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let (dh, dw) = std::mem::take(
        &mut *grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?,
    );
    if (want.0 && dh.is_none()) || (want.1 && dw.is_none()) {
        candle_core::bail!("{what}: backward ran twice over one forward pass");
    }
    let scale = |mut d: Vec<f32>| {
        if g != 1.0 {
            d.par_iter_mut().for_each(|x| *x *= g);
        }
        d
    };
    let dh = match dh {
        Some(d) => Some(Tensor::from_vec(scale(d), hidden.shape(), hidden.device())?),
        None => None,
    };
    let dw = match dw {
        Some(d) => Some(Tensor::from_vec(scale(d), weight.shape(), weight.device())?),
        None => None,
    };
    Ok((dh, dw))
}
