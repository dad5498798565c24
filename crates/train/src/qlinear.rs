//! Frozen linear layers whose weight stays in GGUF blocks ([`QMatrix`]: Q4_0, Q4_1, Q8_0) while
//! LoRA trains on them (`tune --quantized`, QLoRA on the CPU).
//!
//! - Forward: `x W^T` runs on the inference kernels (`QMatrix::matmul`: activations quantized to
//!   8 bits per 32-value block, VNNI or AVX2 dot products), then the bias and the adapter's
//!   `scale * (m * x) A^T B^T` in f32.
//! - Backward: the input gradient `dX = dY W` is computed from the blocks too, a panel of
//!   [`PANEL_ROWS`] weight rows dequantized into a small f32 buffer at a time and multiplied
//!   with the training matmul (`ops::fused::util::matmul`, on the ISA `ops::isa` chooses), so no
//!   f32 copy of W ever exists. The adapter half (its output, A's and B's gradients and its part
//!   of x's) is the dense fused op's own (`ops::fused::lora::Adapter`); the base weight gets no
//!   gradient.
//! - Both ops keep nothing but their inputs for the backward pass (the small (N, r) `x A^T` is
//!   recomputed), like the dense fused `lora_linear`.
//!
//! Rounding: the forward product sees the activations rounded to 8 bits (relative error about
//! 1/254 of each block's largest value), the input gradient is exact for the dequantized
//! weights. Tests compare both against the f32 linear over the dequantized weights.

use std::sync::Arc;

use candle_core::{CpuStorage, Device, Layout, Result, Shape, Tensor};
use safetune_model::quant::QMatrix;

use crate::ops::fused::lora::Adapter;
use crate::ops::fused::util::{matmul, slice, with_f32, with_f32s, Mat};

/// Weight rows dequantized at a time by the input-gradient product (a (256, in) f32 buffer:
/// 2 MiB at in = 2048).
pub const PANEL_ROWS: usize = 256;

/// `dX = dY W` for `dy` of `n` rows of `w.rows` values: `n` rows of `w.cols` values, from the
/// blocks one panel of [`PANEL_ROWS`] rows at a time (accumulated into `dx` when `accumulate`).
pub fn input_grad_into(w: &QMatrix, dy: &[f32], dx: &mut [f32], accumulate: bool) {
    let (out, inp) = (w.rows, w.cols);
    let n = dy.len() / out.max(1);
    assert_eq!(dy.len(), n * out, "input_grad: dy is not whole rows");
    assert_eq!(dx.len(), n * inp, "input_grad: dx has the wrong size");
    if !accumulate {
        dx.fill(0.0);
    }
    let mut panel = vec![0f32; PANEL_ROWS.min(out) * inp];
    let mut r0 = 0;
    while r0 < out {
        let p = PANEL_ROWS.min(out - r0);
        let buf = &mut panel[..p * inp];
        w.dequantize_rows_into(r0, buf);
        // dX (n, in) += dY[:, r0..r0+p] (n, p) @ panel (p, in)
        let (dym, pm) = (Mat::rm(&dy[r0..], out), Mat::rm(buf, inp));
        matmul(n, inp, p, dx, inp, true, dym, pm, 1.0, true);
        r0 += p;
    }
}

/// [`input_grad_into`] into a new buffer.
pub fn input_grad(w: &QMatrix, dy: &[f32]) -> Vec<f32> {
    let n = dy.len() / w.rows.max(1);
    let mut dx = vec![0f32; n * w.cols];
    input_grad_into(w, dy, &mut dx, false);
    dx
}

/// A CPU f32 tensor's values (a copy).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    if !matches!(t.device(), Device::Cpu) {
        candle_core::bail!("quantized linear: tensors must be on the CPU");
    }
    t.flatten_all()?.to_vec1::<f32>()
}

/// The frozen part shared by both ops: blocks and bias.
struct Base {
    w: Arc<QMatrix>,
    /// (out)
    bias: Option<Vec<f32>>,
}

impl Base {
    /// x (N, in) -> x W^T + bias (N, out).
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = self.w.matmul(x);
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(self.w.rows) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        y
    }
}

/// A frozen quantized linear layer without an adapter, as an op over x.
struct QLinearOp(Base);

impl candle_core::CustomOp1 for QLinearOp {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let n = l.shape().dims2()?.0;
        Ok((
            CpuStorage::F32(self.0.forward(x)),
            Shape::from((n, self.0.w.rows)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(0)?;
        let gx = with_f32(g, |g| input_grad(&self.0.w, g))?;
        Ok(Some(Tensor::from_vec(
            gx,
            (n, self.0.w.cols),
            &Device::Cpu,
        )?))
    }
}

/// A frozen quantized linear layer with a LoRA adapter, as an op over (x, A, B).
struct QLoraOp {
    base: Base,
    scale: f32,
    /// (N, in): 0 or 1 / (1 - p).
    mask: Option<Vec<f32>>,
}

impl QLoraOp {
    /// The adapter half of the layer over raw data (the dense op's own).
    fn adapter<'a>(
        &'a self,
        a: &'a [f32],
        b: &'a [f32],
        dims: (usize, usize, usize, usize),
    ) -> Adapter<'a> {
        Adapter {
            a,
            b,
            mask: self.mask.as_deref(),
            scale: self.scale,
            dims,
        }
    }
}

impl candle_core::CustomOp3 for QLoraOp {
    fn name(&self) -> &'static str {
        "quantized-lora-linear"
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
        let mut y = self.base.forward(x);
        self.adapter(a, b, (n, inp, r, out)).add_forward(x, &mut y);
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
        let (grad_x, grad_a, grad_b) = with_f32s(&[x, a, b, g], |d| {
            // grad x = g W (from the blocks) + the adapter's part
            let mut grad_x = input_grad(&self.base.w, d[3]);
            let (ga, gb) =
                self.adapter(d[1], d[2], (n, inp, r, out))
                    .backward(d[0], d[3], &mut grad_x);
            (grad_x, ga, gb)
        })?;
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(grad_x, (n, inp), dev)?),
            Some(Tensor::from_vec(grad_a, (r, inp), dev)?),
            Some(Tensor::from_vec(grad_b, (out, r), dev)?),
        ))
    }
}

fn check_input(x: &Tensor, w: &QMatrix) -> Result<usize> {
    let (n, inp) = x.dims2()?;
    if inp != w.cols {
        candle_core::bail!(
            "quantized linear: input has {inp} features, the weight {}",
            w.cols
        );
    }
    Ok(n)
}

/// A frozen quantized linear layer: x (N, in) -> x W^T + bias (N, out). The gradient flows to
/// x (if tracked), computed from the blocks.
pub fn qlinear(x: &Tensor, w: &Arc<QMatrix>, bias: Option<&Tensor>) -> Result<Tensor> {
    check_input(x, w)?;
    let op = QLinearOp(Base {
        w: w.clone(),
        bias: bias.map(values).transpose()?,
    });
    x.contiguous()?.apply_op1(op)
}

/// A frozen quantized linear layer with a LoRA adapter:
/// `x W^T + bias + scale * (mask * x) A^T B^T`; x (N, in), a (r, in), b (out, r), mask (N, in)
/// -> (N, out). Gradients flow to x, a and b (the blocks and the bias are frozen).
pub fn qlora_linear(
    x: &Tensor,
    w: &Arc<QMatrix>,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_input(x, w)?;
    let (r, ain) = a.dims2()?;
    let (bout, br) = b.dims2()?;
    if ain != w.cols || bout != w.rows || br != r {
        candle_core::bail!(
            "quantized lora linear: A {:?} and B {:?} do not fit a {}x{} weight",
            a.dims(),
            b.dims(),
            w.rows,
            w.cols
        );
    }
    let op = QLoraOp {
        base: Base {
            w: w.clone(),
            bias: bias.map(values).transpose()?,
        },
        scale: scale as f32,
        mask: mask.map(values).transpose()?,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}
