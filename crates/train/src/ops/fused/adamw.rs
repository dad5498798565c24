//! Fused AdamW: one in-place pass updates the moments, a second the parameter.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result};
use rayon::prelude::*;

use super::util::slice;

const PER_TASK: usize = 1 << 15;

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused AdamW: parameter is not contiguous".into())
    })?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => candle_core::bail!("fused AdamW: expected f32, got {:?}", other.dtype()),
    }
}

/// mv (2, n): m = b1 m + (1-b1) g s; v = b2 v + (1-b2) (g s)^2.
pub(crate) struct Moments {
    pub beta1: f32,
    pub beta2: f32,
    pub grad_scale: f32,
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "safetune-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let mv = slice_mut(s1, l1)?;
        let g = slice(s2, l2)?;
        let n = g.len();
        if mv.len() != 2 * n {
            candle_core::bail!(
                "fused AdamW: moments of {} values for {n} gradients",
                mv.len()
            );
        }
        let (m, v) = mv.split_at_mut(n);
        let (b1, b2, s) = (self.beta1, self.beta2, self.grad_scale);
        m.par_chunks_mut(PER_TASK)
            .zip(v.par_chunks_mut(PER_TASK))
            .zip(g.par_chunks(PER_TASK))
            .for_each(|((m, v), g)| {
                for i in 0..g.len() {
                    let gi = g[i] * s;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                }
            });
        Ok(())
    }
}

/// p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps).
pub(crate) struct Apply {
    pub lr: f32,
    pub weight_decay: f32,
    pub eps: f32,
    pub bc1: f32,
    pub bc2: f32,
}

impl InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "safetune-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let p = slice_mut(s1, l1)?;
        let mv = slice(s2, l2)?;
        let n = p.len();
        if mv.len() != 2 * n {
            candle_core::bail!(
                "fused AdamW: moments of {} values for {n} parameters",
                mv.len()
            );
        }
        let (m, v) = mv.split_at(n);
        let decay = 1.0 - self.lr * self.weight_decay;
        let (lr, eps, ibc1, ibc2) = (self.lr, self.eps, 1.0 / self.bc1, 1.0 / self.bc2);
        p.par_chunks_mut(PER_TASK)
            .zip(m.par_chunks(PER_TASK).zip(v.par_chunks(PER_TASK)))
            .for_each(|(p, (m, v))| {
                for i in 0..p.len() {
                    let mh = m[i] * ibc1;
                    let vh = v[i] * ibc2;
                    p[i] = p[i] * decay - lr * mh / (vh.sqrt() + eps);
                }
            });
        Ok(())
    }
}

pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(PER_TASK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}
