//! A frozen linear layer with a LoRA adapter as one op over (x, A, B):
//! `y = x W^T + bias + scale * (m * x) A^T B^T`, m an optional dropout mask.
//!
//! Built from candle primitives, the graph would keep three (N, out) intermediates per layer for
//! the backward pass (the base output, the adapter's output and its scaled copy) and allocate
//! and copy several more. Here the forward pass writes y once (two gemm calls into the same
//! buffer), and the backward pass recomputes the small (N, r) `x A^T`.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::util::{matmul, matmul_weight, slice, with_f32s, Mat};

pub(crate) struct LoraLinear {
    /// (out, in), frozen.
    pub w: Tensor,
    /// (out), frozen.
    pub bias: Option<Tensor>,
    pub scale: f32,
    /// (N, in): 0 or 1 / (1 - p).
    pub mask: Option<Tensor>,
    /// w's key in the bf16 frozen-weight cache ([`super::util::frozen_key`]).
    pub w_key: Option<candle_core::TensorId>,
}

/// The adapter half of a LoRA layer, `scale * (m * x) A^T B^T` with m an optional dropout mask,
/// on raw f32 data: shared by the dense op here and the quantized one (`crate::qlinear`), which
/// differ only in their base product.
pub(crate) struct Adapter<'a> {
    /// (r, in)
    pub a: &'a [f32],
    /// (out, r)
    pub b: &'a [f32],
    /// (N, in): 0 or 1 / (1 - p).
    pub mask: Option<&'a [f32]>,
    pub scale: f32,
    /// (N, in, r, out)
    pub dims: (usize, usize, usize, usize),
}

impl Adapter<'_> {
    /// The adapter's input `m * x` (a new buffer in `buf` when there is a mask, else `x`
    /// itself) and its product `h = (m * x) A^T` (N, r): computed by the forward pass and again
    /// by the backward.
    fn input<'x>(&self, x: &'x [f32], buf: &'x mut Vec<f32>) -> (&'x [f32], Vec<f32>) {
        let (n, inp, r, _) = self.dims;
        let xd: &[f32] = match self.mask {
            Some(m) => {
                *buf = x.iter().zip(m).map(|(a, b)| a * b).collect();
                buf
            }
            None => x,
        };
        let mut h = vec![0f32; n * r];
        let (xm, am) = (Mat::rm(xd, inp), Mat::rm_t(self.a, inp));
        matmul(n, r, inp, &mut h, r, false, xm, am, 1.0, true);
        (xd, h)
    }

    /// y (N, out) += scale * (m * x) A^T B^T.
    pub fn add_forward(&self, x: &[f32], y: &mut [f32]) {
        let (n, _, r, out) = self.dims;
        let mut buf = Vec::new();
        let (_, h) = self.input(x, &mut buf);
        let (hm, bm) = (Mat::rm(&h, r), Mat::rm_t(self.b, r));
        matmul(n, out, r, y, out, true, hm, bm, self.scale, true);
    }

    /// (grad A, grad B) for the output gradient g (N, out), adding the adapter's part of the
    /// input gradient, `m * (s g B A)`, into `grad_x` (N, in).
    pub fn backward(&self, x: &[f32], g: &[f32], grad_x: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
        let (n, inp, r, out) = self.dims;
        let s = self.scale;
        let mut buf = Vec::new();
        let (xd, h) = self.input(x, &mut buf);
        // grad B = s g^T h (out, r)
        let mut grad_b = vec![0f32; out * r];
        let (gt, hm) = (Mat::rm_t(g, out), Mat::rm(&h, r));
        matmul(out, r, n, &mut grad_b, r, false, gt, hm, s, true);
        // gh = s g B (N, r)
        let mut gh = vec![0f32; n * r];
        let (gm, bm) = (Mat::rm(g, out), Mat::rm(self.b, r));
        matmul(n, r, out, &mut gh, r, false, gm, bm, s, true);
        // grad A = gh^T xd (r, in)
        let mut grad_a = vec![0f32; r * inp];
        let (ght, xdm) = (Mat::rm_t(&gh, r), Mat::rm(xd, inp));
        matmul(r, inp, n, &mut grad_a, inp, false, ght, xdm, 1.0, true);
        // grad x += m * (gh A)
        let (ghm, am) = (Mat::rm(&gh, r), Mat::rm(self.a, inp));
        match self.mask {
            None => matmul(n, inp, r, grad_x, inp, true, ghm, am, 1.0, true),
            Some(m) => {
                let mut t = vec![0f32; n * inp];
                matmul(n, inp, r, &mut t, inp, false, ghm, am, 1.0, true);
                grad_x
                    .iter_mut()
                    .zip(t.iter().zip(m))
                    .for_each(|(gx, (t, m))| *gx += t * m);
            }
        }
        (grad_a, grad_b)
    }
}

impl LoraLinear {
    /// The adapter half over raw data.
    fn adapter<'a>(
        &self,
        a: &'a [f32],
        b: &'a [f32],
        mask: Option<&'a [f32]>,
        dims: (usize, usize, usize, usize),
    ) -> Adapter<'a> {
        Adapter {
            a,
            b,
            mask,
            scale: self.scale,
            dims,
        }
    }

    /// The frozen tensors this op holds, for [`with_f32s`]: w, then the mask and the bias if
    /// present. Returns (w, mask, bias) from the slices in that order.
    fn frozen(&self) -> Vec<&Tensor> {
        [Some(&self.w), self.mask.as_ref(), self.bias.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }

    fn split<'a>(&self, d: &[&'a [f32]]) -> (&'a [f32], Option<&'a [f32]>, Option<&'a [f32]>) {
        let mask = self.mask.as_ref().map(|_| d[1]);
        let bias = self
            .bias
            .as_ref()
            .map(|_| d[1 + usize::from(mask.is_some())]);
        (d[0], mask, bias)
    }

    /// y (N, out) = x W^T + bias + scale * h B^T.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        w: &[f32],
        mask: Option<&[f32]>,
        bias: Option<&[f32]>,
        (n, inp, r, out): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let mut y = vec![0f32; n * out];
        let (xm, wm) = (Mat::rm(x, inp), Mat::rm_t(w, inp));
        matmul_weight((n, out, inp), &mut y, xm, wm, self.w_key, true);
        let adapter = self.adapter(a, b, mask, (n, inp, r, out));
        adapter.add_forward(x, &mut y);
        if let Some(bias) = bias {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        y
    }

    /// (grad x, grad A, grad B) for the output gradient g (N, out).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        g: &[f32],
        w: &[f32],
        mask: Option<&[f32]>,
        (n, inp, r, out): (usize, usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        // grad x = g W + the adapter's part
        let mut grad_x = vec![0f32; n * inp];
        let (gm, wm) = (Mat::rm(g, out), Mat::rm(w, inp));
        matmul_weight((n, inp, out), &mut grad_x, gm, wm, self.w_key, false);
        let adapter = self.adapter(a, b, mask, (n, inp, r, out));
        let (grad_a, grad_b) = adapter.backward(x, g, &mut grad_x);
        (grad_x, grad_a, grad_b)
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
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
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (n, inp) = l1.shape().dims2()?;
        let (r, out) = (l2.shape().dims2()?.0, l3.shape().dims2()?.0);
        let y = with_f32s(&self.frozen(), |d| {
            let (w, mask, bias) = self.split(d);
            self.forward(x, a, b, w, mask, bias, (n, inp, r, out))
        })?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let mut ts = vec![x, a, b, g];
        ts.extend(self.frozen());
        let (gx, ga, gb) = with_f32s(&ts, |d| {
            let (w, mask, _) = self.split(&d[4..]);
            self.backward(d[0], d[1], d[2], d[3], w, mask, (n, inp, r, out))
        })?;
        let dev = &candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(gx, (n, inp), dev)?),
            Some(Tensor::from_vec(ga, (r, inp), dev)?),
            Some(Tensor::from_vec(gb, (out, r), dev)?),
        ))
    }
}
