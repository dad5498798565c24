//! Causal grouped-query attention with softmax, flash-style: the forward pass keeps only the
//! output and each row's log-sum-exp; the backward pass recomputes the probabilities block by
//! block. Blocks of query rows only touch the keys at or before them (the causal triangle).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use safetune_model::vecmath;

use super::util::{matmul, strided, with_f32, with_strided, Mat};

const BLOCK: usize = 64;

pub(crate) struct Attention {
    pub scale: f32,
    /// Additive mask (MB, T, T) contiguous with MB = 1 or B, or none.
    pub mask: Option<Tensor>,
    /// (B, H, T) log-sum-exp of each score row, written by the forward pass.
    pub lse: Mutex<Vec<f32>>,
}

/// A strided (B, heads, T, D) tensor's data.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    off: usize,
    st: [usize; 4],
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], off: usize, st: &[usize]) -> View<'a> {
        View {
            data,
            off,
            st: [st[0], st[1], st[2], st[3]],
        }
    }
    /// Rows `from..` of the (T, D) matrix of batch b, head h.
    fn mat(&self, b: usize, h: usize, from: usize) -> Mat {
        let start = self.off + b * self.st[0] + h * self.st[1] + from * self.st[2];
        Mat {
            ptr: self.data[start..].as_ptr(),
            rs: self.st[2] as isize,
            cs: self.st[3] as isize,
        }
    }
    fn at(&self, b: usize, h: usize, t: usize, d: usize) -> f32 {
        self.data[self.off + b * self.st[0] + h * self.st[1] + t * self.st[2] + d * self.st[3]]
    }
}

struct Dims {
    b: usize,
    h: usize,
    kh: usize,
    t: usize,
    d: usize,
}

impl Attention {
    fn dims(q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (b, h, t, d) = q.dims4()?;
        let (b2, kh, t2, d2) = k.dims4()?;
        if (b2, t2, d2) != (b, t, d) || v.dims() != k.dims() || kh == 0 || h % kh != 0 {
            candle_core::bail!(
                "causal_attention: q {q:?}, k {k:?}, v {v:?} do not fit (B, H, T, D), (B, K, T, D) with H a multiple of K"
            );
        }
        Ok(Dims { b, h, kh, t, d })
    }

    /// Adds the mask row (if any) to s[..len] for query row i of batch b.
    fn mask_row(&self, mask: Option<&[f32]>, b: usize, t: usize, i: usize, s: &mut [f32]) {
        if let Some(m) = mask {
            let mb = if m.len() == t * t { 0 } else { b };
            let row = &m[mb * t * t + i * t..mb * t * t + i * t + s.len()];
            for (x, m) in s.iter_mut().zip(row) {
                *x += m;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        dm: &Dims,
        q: View,
        k: View,
        v: View,
        mask: Option<&[f32]>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let Dims { b: _, h, kh, t, d } = *dm;
        let rep = h / kh;
        out.par_chunks_mut(rep * t * d)
            .zip(lse.par_chunks_mut(rep * t))
            .enumerate()
            .for_each(|(unit, (out, lse))| {
                let (bi, ki) = (unit / kh, unit % kh);
                let mut s = vec![0f32; BLOCK * t];
                for r in 0..rep {
                    let hi = ki * rep + r;
                    let o = &mut out[r * t * d..(r + 1) * t * d];
                    let lse = &mut lse[r * t..(r + 1) * t];
                    for i0 in (0..t).step_by(BLOCK) {
                        let i1 = (i0 + BLOCK).min(t);
                        let bl = i1 - i0;
                        let sb = &mut s[..bl * i1];
                        // (bl, D) @ (D, i1) -> (bl, i1)
                        matmul(
                            bl,
                            i1,
                            d,
                            sb,
                            i1,
                            false,
                            q.mat(bi, hi, i0),
                            k.mat(bi, ki, 0).t(),
                            self.scale,
                            false,
                        );
                        for (ri, row) in sb.chunks_exact_mut(i1).enumerate() {
                            let i = i0 + ri;
                            let vis = &mut row[..=i];
                            self.mask_row(mask, bi, t, i, vis);
                            let mx = vecmath::max(vis);
                            let sum = vecmath::exp_shifted(vis, mx);
                            let inv = 1.0 / sum;
                            for x in vis.iter_mut() {
                                *x *= inv;
                            }
                            for x in row[i + 1..].iter_mut() {
                                *x = 0.0;
                            }
                            lse[i] = mx + sum.ln();
                        }
                        // (bl, i1) @ (i1, D) -> (bl, D)
                        matmul(
                            bl,
                            d,
                            i1,
                            &mut o[i0 * d..i1 * d],
                            d,
                            false,
                            Mat::rm(sb, i1),
                            v.mat(bi, ki, 0),
                            1.0,
                            false,
                        );
                    }
                }
            });
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dm: &Dims,
        q: View,
        k: View,
        v: View,
        o: View,
        g: View,
        mask: Option<&[f32]>,
        lse: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let Dims { b: _, h, kh, t, d } = *dm;
        let rep = h / kh;
        dq.par_chunks_mut(rep * t * d)
            .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
            .enumerate()
            .for_each(|(unit, (dq, (dk, dv)))| {
                let (bi, ki) = (unit / kh, unit % kh);
                let mut p = vec![0f32; BLOCK * t];
                let mut dp = vec![0f32; BLOCK * t];
                for r in 0..rep {
                    let hi = ki * rep + r;
                    let dq = &mut dq[r * t * d..(r + 1) * t * d];
                    let lse = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
                    for i0 in (0..t).step_by(BLOCK) {
                        let i1 = (i0 + BLOCK).min(t);
                        let bl = i1 - i0;
                        let pb = &mut p[..bl * i1];
                        let dpb = &mut dp[..bl * i1];
                        matmul(
                            bl,
                            i1,
                            d,
                            pb,
                            i1,
                            false,
                            q.mat(bi, hi, i0),
                            k.mat(bi, ki, 0).t(),
                            self.scale,
                            false,
                        );
                        for (ri, row) in pb.chunks_exact_mut(i1).enumerate() {
                            let i = i0 + ri;
                            self.mask_row(mask, bi, t, i, &mut row[..=i]);
                            vecmath::exp_shifted(&mut row[..=i], lse[i]);
                            for x in row[i + 1..].iter_mut() {
                                *x = 0.0;
                            }
                        }
                        // dV[0..i1] += P^T (i1, bl) @ dO (bl, D)
                        matmul(
                            i1,
                            d,
                            bl,
                            &mut dv[..i1 * d],
                            d,
                            true,
                            Mat::rm(pb, i1).t(),
                            g.mat(bi, hi, i0),
                            1.0,
                            false,
                        );
                        // dP = dO (bl, D) @ V^T (D, i1)
                        matmul(
                            bl,
                            i1,
                            d,
                            dpb,
                            i1,
                            false,
                            g.mat(bi, hi, i0),
                            v.mat(bi, ki, 0).t(),
                            1.0,
                            false,
                        );
                        for ri in 0..bl {
                            let i = i0 + ri;
                            let mut di = 0f32;
                            for c in 0..d {
                                di += g.at(bi, hi, i, c) * o.at(bi, hi, i, c);
                            }
                            let prow = &mut pb[ri * i1..(ri + 1) * i1];
                            let dprow = &dpb[ri * i1..(ri + 1) * i1];
                            for j in 0..=i {
                                prow[j] *= dprow[j] - di;
                            }
                        }
                        // dQ = scale dS (bl, i1) @ K (i1, D)
                        matmul(
                            bl,
                            d,
                            i1,
                            &mut dq[i0 * d..i1 * d],
                            d,
                            false,
                            Mat::rm(pb, i1),
                            k.mat(bi, ki, 0),
                            self.scale,
                            false,
                        );
                        // dK[0..i1] += scale dS^T (i1, bl) @ Q (bl, D)
                        matmul(
                            i1,
                            d,
                            bl,
                            &mut dk[..i1 * d],
                            d,
                            true,
                            Mat::rm(pb, i1).t(),
                            q.mat(bi, hi, i0),
                            self.scale,
                            false,
                        );
                    }
                }
            });
    }
}

fn mask_data(m: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    match m {
        Some(m) => Ok(Some(with_f32(m, |s| s.to_vec())?)),
        None => Ok(None),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "safetune-causal-attention"
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
        let dm = Self::dims(l1.shape(), l2.shape(), l3.shape())?;
        let (q, qo, qs) = strided(s1, l1)?;
        let (k, ko, ks) = strided(s2, l2)?;
        let (v, vo, vs) = strided(s3, l3)?;
        let mask = mask_data(&self.mask)?;
        let mut out = vec![0f32; dm.b * dm.h * dm.t * dm.d];
        let mut lse = vec![0f32; dm.b * dm.h * dm.t];
        self.forward(
            &dm,
            View::new(q, qo, &qs),
            View::new(k, ko, &ks),
            View::new(v, vo, &vs),
            mask.as_deref(),
            &mut out,
            &mut lse,
        );
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = lse;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Self::dims(q.shape(), k.shape(), v.shape())?;
        let mask = mask_data(&self.mask)?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone();
        let mut dq = vec![0f32; dm.b * dm.h * dm.t * dm.d];
        let mut dk = vec![0f32; dm.b * dm.kh * dm.t * dm.d];
        let mut dv = vec![0f32; dm.b * dm.kh * dm.t * dm.d];
        with_strided(q, |qd, qo, qs| {
            with_strided(k, |kd, ko, ks| {
                with_strided(v, |vd, vo, vs| {
                    with_strided(res, |od, oo, os| {
                        with_strided(grad, |gd, go, gs| {
                            self.backward(
                                &dm,
                                View::new(qd, qo, qs),
                                View::new(kd, ko, ks),
                                View::new(vd, vo, vs),
                                View::new(od, oo, os),
                                View::new(gd, go, gs),
                                mask.as_deref(),
                                &lse,
                                &mut dq,
                                &mut dk,
                                &mut dv,
                            )
                        })
                    })
                })
            })
        })?????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
