//! Frozen linear layers whose weight stays in GGUF blocks ([`QMatrix`]: Q4_0, Q4_1, Q8_0) while
//! LoRA trains on them (`tune --quantized`, QLoRA on the CPU).
//!
//! - Forward: `x W^T` runs on the inference kernels (`QMatrix::matmul`: activations quantized to
//!   8 bits per 32-value block, VNNI or AVX2 dot products), then the bias and the adapter's
//!   `scale * (m * x) A^T B^T` in f32.
//! - Backward: the input gradient `dX = dY W` is computed from the blocks too, a panel of
//!   [`PANEL_ROWS`] weight rows dequantized into a small f32 buffer at a time and multiplied
//!   with gemm, so no f32 copy of W ever exists. The adapter's gradients (A and B, f32) are as in
//!   the dense fused op; the base weight gets none.
//! - Both ops keep nothing but their inputs for the backward pass (the small (N, r) `x A^T` is
//!   recomputed), like the dense fused `lora_linear`.
//!
//! Rounding: the forward product sees the activations rounded to 8 bits (relative error about
//! 1/254 of each block's largest value), the input gradient is exact for the dequantized
//! weights. Tests compare both against the f32 linear over the dequantized weights.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};
use safetune_model::quant::QMatrix;

/// Weight rows dequantized at a time by the input-gradient product (a (256, in) f32 buffer:
/// 2 MiB at in = 2048).
pub const PANEL_ROWS: usize = 256;

/// `dst (m, n) = (accumulate ? dst : 0) + scale * a (m, k) @ b (k, n)`, every matrix given as
/// (slice, row stride) with unit column stride, dst row-major with row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_t): (&[f32], usize, bool),
    (b, b_rs, b_t): (&[f32], usize, bool),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // Bounds: each operand's last element must lie inside its slice.
    let last = |rows: usize, cols: usize, rs: usize, t: bool| {
        if t {
            (cols - 1) * rs + rows - 1
        } else {
            (rows - 1) * rs + cols - 1
        }
    };
    assert!(
        dst.len() > (m - 1) * dst_rs + n - 1,
        "gemm_rm: dst too small"
    );
    assert!(a.len() > last(m, k, a_rs, a_t), "gemm_rm: a too small");
    assert!(b.len() > last(k, n, b_rs, b_t), "gemm_rm: b too small");
    // (row stride, column stride) of a matrix stored row-major, or of the transpose of one.
    let strides = |rs: usize, t: bool| {
        if t {
            (1isize, rs as isize)
        } else {
            (rs as isize, 1isize)
        }
    };
    let (a_r, a_c) = strides(a_rs, a_t);
    let (b_r, b_c) = strides(b_rs, b_t);
    let par = if rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every (i, j) read or written inside its slice; dst is
    // borrowed exclusively.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_c,
            a_r,
            b.as_ptr(),
            b_c,
            b_r,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

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
        gemm_rm(
            (n, inp, p),
            dx,
            inp,
            true,
            (&dy[r0..], out, false),
            (buf, inp, false),
            1.0,
        );
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

/// The contiguous f32 data a CPU storage's layout covers.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("quantized linear: expected f32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("quantized linear: input is not contiguous"),
    }
}

/// A CPU f32 tensor's values (a copy).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    if !matches!(t.device(), Device::Cpu) {
        candle_core::bail!("quantized linear: tensors must be on the CPU");
    }
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cpu) => Ok(f(slice(cpu, l)?)),
        _ => candle_core::bail!("quantized linear: expected a CPU tensor"),
    }
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
        let gx = with_data(g, |g| input_grad(&self.0.w, g))?;
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
    /// The adapter's input `m * x` and `h = (m * x) A^T` (N, r).
    fn adapter_input(
        &self,
        x: &[f32],
        a: &[f32],
        (n, inp, r): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let xd: Vec<f32> = match &self.mask {
            Some(m) => x.iter().zip(m).map(|(a, b)| a * b).collect(),
            None => Vec::new(),
        };
        let xs = if self.mask.is_some() { &xd[..] } else { x };
        let mut h = vec![0f32; n * r];
        gemm_rm(
            (n, r, inp),
            &mut h,
            r,
            false,
            (xs, inp, false),
            (a, inp, true),
            1.0,
        );
        (xd, h)
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
        let (_, h) = self.adapter_input(x, a, (n, inp, r));
        // y += scale * h B^T
        gemm_rm(
            (n, out, r),
            &mut y,
            out,
            true,
            (&h, r, false),
            (b, r, true),
            self.scale,
        );
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
        let (xv, av, bv, gv) = (values(x)?, values(a)?, values(b)?, values(g)?);
        let s = self.scale;
        let (xd, h) = self.adapter_input(&xv, &av, (n, inp, r));
        let xs = if self.mask.is_some() {
            &xd[..]
        } else {
            &xv[..]
        };
        // grad B = s g^T h (out, r)
        let mut grad_b = vec![0f32; out * r];
        gemm_rm(
            (out, r, n),
            &mut grad_b,
            r,
            false,
            (&gv, out, true),
            (&h, r, false),
            s,
        );
        // gh = s g B (N, r)
        let mut gh = vec![0f32; n * r];
        gemm_rm(
            (n, r, out),
            &mut gh,
            r,
            false,
            (&gv, out, false),
            (&bv, r, false),
            s,
        );
        // grad A = gh^T (m * x) (r, in)
        let mut grad_a = vec![0f32; r * inp];
        gemm_rm(
            (r, inp, n),
            &mut grad_a,
            inp,
            false,
            (&gh, r, true),
            (xs, inp, false),
            1.0,
        );
        // grad x = g W (from the blocks) + m * (gh A)
        let mut grad_x = input_grad(&self.base.w, &gv);
        match &self.mask {
            None => gemm_rm(
                (n, inp, r),
                &mut grad_x,
                inp,
                true,
                (&gh, r, false),
                (&av, inp, false),
                1.0,
            ),
            Some(m) => {
                let mut t = vec![0f32; n * inp];
                gemm_rm(
                    (n, inp, r),
                    &mut t,
                    inp,
                    false,
                    (&gh, r, false),
                    (&av, inp, false),
                    1.0,
                );
                grad_x
                    .iter_mut()
                    .zip(t.iter().zip(m))
                    .for_each(|(gx, (t, m))| *gx += t * m);
            }
        }
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
