//! RMSNorm, SiLU-gate product, RoPE: forward and backward in one pass each.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use safetune_model::vecmath;

use super::util::{slice, strided, with_f32, with_strided};

/// Rows per rayon task for row-wise kernels.
fn rows_per_task(rows: usize) -> usize {
    (rows / (4 * rayon::current_num_threads()).max(1)).max(1)
}

// ---------------------------------------------------------------- RMSNorm

pub(crate) struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "safetune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let c = w.len();
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(x.len() / c) * c;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    let ss: f32 = x.iter().map(|v| v * v).sum();
                    let r = 1.0 / (ss / c as f32 + self.eps).sqrt();
                    for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_w = w.track_op();
        let c = w.elem_count();
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(grad, |g| {
                    let mut dx = vec![0f32; x.len()];
                    let per = rows_per_task(x.len() / c) * c;
                    let partial: Vec<Vec<f32>> = dx
                        .par_chunks_mut(per)
                        .zip(x.par_chunks(per).zip(g.par_chunks(per)))
                        .map(|(dx, (x, g))| {
                            let mut dw = if want_w { vec![0f32; c] } else { Vec::new() };
                            for ((dx, x), g) in dx
                                .chunks_exact_mut(c)
                                .zip(x.chunks_exact(c))
                                .zip(g.chunks_exact(c))
                            {
                                let ss: f32 = x.iter().map(|v| v * v).sum();
                                let r = 1.0 / (ss / c as f32 + self.eps).sqrt();
                                let dot: f32 =
                                    x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                                let k = r * r * r * dot / c as f32;
                                for i in 0..c {
                                    dx[i] = r * g[i] * w[i] - x[i] * k;
                                }
                                if want_w {
                                    for i in 0..c {
                                        dw[i] += g[i] * x[i] * r;
                                    }
                                }
                            }
                            dw
                        })
                        .collect();
                    let dw = want_w.then(|| {
                        let mut acc = vec![0f32; c];
                        for p in &partial {
                            for (a, b) in acc.iter_mut().zip(p) {
                                *a += b;
                            }
                        }
                        acc
                    });
                    (dx, dw)
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = match dw {
            Some(d) => Some(Tensor::from_vec(d, w.shape(), w.device())?),
            None => None,
        };
        Ok((Some(dx), dw))
    }
}

// ---------------------------------------------------------------- SiLU * up

pub(crate) struct SiluMul;

const ELEMS_PER_TASK: usize = 1 << 14;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "safetune-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1)?;
        let u = slice(s2, l2)?;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                g.par_chunks(ELEMS_PER_TASK)
                    .zip(u.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(o, (g, u))| {
                o.copy_from_slice(g);
                vecmath::silu_mul(o, u);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let (dg, du) = with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(grad, |d| {
                    let mut dg = vec![0f32; n];
                    let mut du = vec![0f32; n];
                    dg.par_chunks_mut(ELEMS_PER_TASK)
                        .zip(du.par_chunks_mut(ELEMS_PER_TASK))
                        .zip(
                            g.par_chunks(ELEMS_PER_TASK)
                                .zip(u.par_chunks(ELEMS_PER_TASK))
                                .zip(d.par_chunks(ELEMS_PER_TASK)),
                        )
                        .for_each(|((dg, du), ((g, u), d))| {
                            // The sigmoid goes into dg first, then dg is overwritten in place.
                            vecmath::sigmoid(g, dg);
                            for i in 0..g.len() {
                                let s = dg[i];
                                du[i] = d[i] * g[i] * s;
                                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                            }
                        });
                    (dg, du)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

// ---------------------------------------------------------------- RoPE

/// Rotate-halves RoPE on x (B, H, T, D) with any strides whose last one is 1; cos/sin
/// contiguous (B, T, D/2) or (T, D/2). Output contiguous (B, H, T, D).
pub(crate) struct Rope;

#[allow(clippy::too_many_arguments)]
fn rope_kernel(
    dims: (usize, usize, usize, usize),
    x: &[f32],
    off: usize,
    st: &[usize],
    cos: &[f32],
    sin: &[f32],
    cos_batched: bool,
    inverse: bool,
) -> Vec<f32> {
    let (b, h, t, d) = dims;
    let half = d / 2;
    let mut out = vec![0f32; b * h * t * d];
    let sign = if inverse { -1.0f32 } else { 1.0 };
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
        let (bi, hi) = (bh / h, bh % h);
        let cbase = if cos_batched { bi * t * half } else { 0 };
        for ti in 0..t {
            let xs = off + bi * st[0] + hi * st[1] + ti * st[2];
            let xr = &x[xs..xs + d];
            let c = &cos[cbase + ti * half..cbase + (ti + 1) * half];
            let s = &sin[cbase + ti * half..cbase + (ti + 1) * half];
            let orow = &mut o[ti * d..(ti + 1) * d];
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                let si = sign * s[i];
                orow[i] = x1 * c[i] - x2 * si;
                orow[i + half] = x2 * c[i] + x1 * si;
            }
        }
    });
    out
}

fn check_rope(shape: &Shape, cos_shape: &Shape) -> Result<((usize, usize, usize, usize), bool)> {
    let (b, h, t, d) = shape.dims4()?;
    let half = d / 2;
    let batched = match cos_shape.dims() {
        [bb, tt, hh] if *bb == b && *tt == t && *hh == half => true,
        [tt, hh] if *tt == t && *hh == half => false,
        _ => candle_core::bail!(
            "rope: cos/sin of shape {cos_shape:?} do not fit x of shape {shape:?} (want (B, T, D/2) or (T, D/2))"
        ),
    };
    Ok(((b, h, t, d), batched))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "safetune-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, batched) = check_rope(l1.shape(), l2.shape())?;
        if l1.stride()[3] != 1 {
            candle_core::bail!("rope: last dimension must be contiguous");
        }
        let (x, off, st) = strided(s1, l1)?;
        let cos = slice(s2, l2)?;
        let sin = slice(s3, l3)?;
        let out = rope_kernel(dims, x, off, &st, cos, sin, batched, false);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dims, batched) = check_rope(x.shape(), cos.shape())?;
        let grad = if grad.stride()[3] == 1 {
            grad.clone()
        } else {
            grad.contiguous()?
        };
        let dx = with_strided(&grad, |g, off, st| {
            with_f32(cos, |c| {
                with_f32(sin, |s| rope_kernel(dims, g, off, st, c, s, batched, true))
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}
