//! A frozen linear layer with a LoRA adapter as one op over (x, A, B):
//! `y = x W^T + bias + scale * (m * x) A^T B^T`, m an optional dropout mask.
//!
//! Built from candle primitives, the graph would keep three (N, out) intermediates per layer for
//! the backward pass (the base output, the adapter's output and its scaled copy) and allocate
//! and copy several more. Here the forward pass writes y once (two gemm calls into the same
//! buffer), and the backward pass recomputes the small (N, r) `x A^T`.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::util::{matmul, slice, with_f32, Mat};

pub(crate) struct LoraLinear {
    /// (out, in), frozen.
    pub w: Tensor,
    /// (out), frozen.
    pub bias: Option<Tensor>,
    pub scale: f32,
    /// (N, in): 0 or 1 / (1 - p).
    pub mask: Option<Tensor>,
}

/// `x * mask` when there is a mask (a new buffer), else `x` itself.
fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match mask {
        Some(m) => {
            *buf = x.iter().zip(m).map(|(a, b)| a * b).collect();
            buf
        }
        None => x,
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
        let mut y = vec![0f32; n * out];
        with_f32(&self.w, |w| {
            // y = x W^T
            matmul(
                n,
                out,
                inp,
                &mut y,
                out,
                false,
                Mat::rm(x, inp),
                Mat::rm_t(w, inp),
                1.0,
                true,
            );
        })?;
        let mask = match &self.mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let mut buf = Vec::new();
        let xd = masked(x, mask.as_deref(), &mut buf);
        // h = xd A^T (N, r); y += scale * h B^T
        let mut h = vec![0f32; n * r];
        matmul(
            n,
            r,
            inp,
            &mut h,
            r,
            false,
            Mat::rm(xd, inp),
            Mat::rm_t(a, inp),
            1.0,
            true,
        );
        matmul(
            n,
            out,
            r,
            &mut y,
            out,
            true,
            Mat::rm(&h, r),
            Mat::rm_t(b, r),
            self.scale,
            true,
        );
        if let Some(bias) = &self.bias {
            with_f32(bias, |bias| {
                for row in y.chunks_exact_mut(out) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            })?;
        }
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
        let s = self.scale;
        let mask = match &self.mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let (a, b, g) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
            g.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut buf = Vec::new();
        let xd = masked(&x, mask.as_deref(), &mut buf);
        let mut h = vec![0f32; n * r]; // xd A^T
        matmul(
            n,
            r,
            inp,
            &mut h,
            r,
            false,
            Mat::rm(xd, inp),
            Mat::rm_t(&a, inp),
            1.0,
            true,
        );
        let mut grad_b = vec![0f32; out * r]; // s g^T h
        matmul(
            out,
            r,
            n,
            &mut grad_b,
            r,
            false,
            Mat::rm_t(&g, out),
            Mat::rm(&h, r),
            s,
            true,
        );
        let mut gh = vec![0f32; n * r]; // s g B
        matmul(
            n,
            r,
            out,
            &mut gh,
            r,
            false,
            Mat::rm(&g, out),
            Mat::rm(&b, r),
            s,
            true,
        );
        let mut grad_a = vec![0f32; r * inp]; // gh^T xd
        matmul(
            r,
            inp,
            n,
            &mut grad_a,
            inp,
            false,
            Mat::rm_t(&gh, r),
            Mat::rm(xd, inp),
            1.0,
            true,
        );
        // grad x = g W + m * (gh A)
        let mut grad_x = vec![0f32; n * inp];
        with_f32(&self.w, |w| {
            matmul(
                n,
                inp,
                out,
                &mut grad_x,
                inp,
                false,
                Mat::rm(&g, out),
                Mat::rm(w, inp),
                1.0,
                true,
            );
        })?;
        match &mask {
            None => matmul(
                n,
                inp,
                r,
                &mut grad_x,
                inp,
                true,
                Mat::rm(&gh, r),
                Mat::rm(&a, inp),
                1.0,
                true,
            ),
            Some(m) => {
                let mut t = vec![0f32; n * inp];
                matmul(
                    n,
                    inp,
                    r,
                    &mut t,
                    inp,
                    false,
                    Mat::rm(&gh, r),
                    Mat::rm(&a, inp),
                    1.0,
                    true,
                );
                grad_x
                    .iter_mut()
                    .zip(t.iter().zip(m))
                    .for_each(|(gx, (t, m))| *gx += t * m);
            }
        }
        let dev = &candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(grad_x, (n, inp), dev)?),
            Some(Tensor::from_vec(grad_a, (r, inp), dev)?),
            Some(Tensor::from_vec(grad_b, (out, r), dev)?),
        ))
    }
}
