//! Cross-entropy with an ignore index (fused log-softmax), and the chunked lm_head +
//! cross-entropy that never holds all logits.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use safetune_model::vecmath;

use super::util::{matmul, slice, with_f32, Mat};
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
        for part in rows.chunks(chunk) {
            let m = part.len();
            // Gather the kept rows: (m, C).
            for (j, &i) in part.iter().enumerate() {
                hbuf[j * c..(j + 1) * c].copy_from_slice(&h[i * c..(i + 1) * c]);
            }
            let hb = &hbuf[..m * c];
            let lg = &mut logits[..m * v];
            // (m, C) @ (C, V) -> (m, V)
            matmul(
                m,
                v,
                c,
                lg,
                v,
                false,
                Mat::rm(hb, c),
                Mat::rm_t(w, c),
                1.0,
                true,
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
                matmul(
                    m,
                    c,
                    v,
                    db,
                    c,
                    false,
                    Mat::rm(lg, v),
                    Mat::rm(w, c),
                    1.0,
                    true,
                );
                for (j, &i) in part.iter().enumerate() {
                    dh[i * c..(i + 1) * c].copy_from_slice(&db[j * c..(j + 1) * c]);
                }
            }
            if let Some(dw) = dw.as_mut() {
                // (V, m) @ (m, C) -> (V, C), accumulated over chunks.
                matmul(
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
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        // Taken, not cloned: the backward pass of a graph runs once.
        let (dh, dw) = std::mem::take(
            &mut *self
                .grads
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?,
        );
        if (self.want_h && dh.is_none()) || (self.want_w && dw.is_none()) {
            candle_core::bail!("lm_head cross-entropy: backward ran twice over one forward pass");
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
}
