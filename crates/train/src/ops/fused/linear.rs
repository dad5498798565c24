//! A linear layer without adapter, `y = x W^T`, as one op over (x, W): the dense projections of
//! full fine-tuning (W a `Var`) and the frozen projections that carry no adapter. Forward and
//! backward run on [`super::util::matmul`], so they use the ISA [`crate::ops::isa`] chooses (candle's
//! own matmul picks its kernels by itself). The backward pass forms a gradient only for the
//! inputs that are tracked: for a frozen W it computes `g W` alone, where candle's matmul
//! backward would also form (and keep) `g^T x`.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::util::{matmul_big as matmul, matmul_weight, slice, with_f32s, Mat};

pub(crate) struct Linear {
    /// Whether x is tracked (else no gradient is formed for it).
    pub grad_x: bool,
    /// Whether W is tracked.
    pub grad_w: bool,
    /// W's key in the bf16 frozen-weight cache when W is frozen ([`super::util::frozen_key`]).
    pub w_key: Option<candle_core::TensorId>,
}

impl candle_core::CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (n, inp) = l1.shape().dims2()?;
        let (out, w_in) = l2.shape().dims2()?;
        if w_in != inp {
            candle_core::bail!(
                "linear: x {:?} and w {:?} do not fit",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = vec![0f32; n * out];
        let wm = Mat::rm_t(w, inp);
        matmul_weight((n, out, inp), &mut y, Mat::rm(x, inp), wm, self.w_key, true);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let out = w.dim(0)?;
        let (gx, gw) = with_f32s(&[x, w, g], |d| {
            let (x, w, g) = (d[0], d[1], d[2]);
            // grad x = g W (N, in)
            let gx = self.grad_x.then(|| {
                let mut gx = vec![0f32; n * inp];
                let (gm, wm) = (Mat::rm(g, out), Mat::rm(w, inp));
                matmul_weight((n, inp, out), &mut gx, gm, wm, self.w_key, false);
                gx
            });
            // grad W = g^T x (out, in)
            let gw = self.grad_w.then(|| {
                let mut gw = vec![0f32; out * inp];
                let gt = Mat::rm_t(g, out);
                matmul(
                    out,
                    inp,
                    n,
                    &mut gw,
                    inp,
                    false,
                    gt,
                    Mat::rm(x, inp),
                    1.0,
                    true,
                );
                gw
            });
            (gx, gw)
        })?;
        let dev = &candle_core::Device::Cpu;
        Ok((
            gx.map(|v| Tensor::from_vec(v, (n, inp), dev)).transpose()?,
            gw.map(|v| Tensor::from_vec(v, (out, inp), dev))
                .transpose()?,
        ))
    }
}
