//! Products with a [`QMatrix`]: the row layout's dot kernels and the parallel dispatch over
//! output-row groups (both layouts).

use candle_core::{Device, Tensor};

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{packed, quantize_rows, QFormat, QMatrix, XBlock, BLOCK};

impl QMatrix {
    /// Dot product of weight row `r` with one quantized activation row.
    #[inline]
    fn dot(&self, r: usize, x: &[XBlock]) -> f32 {
        let nb = self.blocks_per_row();
        let d = &self.d[r * nb..(r + 1) * nb];
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked once), and every slice below holds
            // exactly `nb` blocks.
            unsafe {
                return match self.format {
                    QFormat::Q8_0 => simd::dot_q8(d, &self.qs[r * nb * 32..(r + 1) * nb * 32], x),
                    _ => simd::dot_q4(
                        d,
                        &self.m[r * nb..(r + 1) * nb],
                        &self.qs[r * nb * 16..(r + 1) * nb * 16],
                        x,
                    ),
                };
            }
        }
        match self.format {
            QFormat::Q8_0 => {
                let qs = &self.qs[r * nb * 32..(r + 1) * nb * 32];
                let mut acc = 0f32;
                for (b, xb) in x.iter().enumerate() {
                    let mut s = 0i32;
                    for i in 0..32 {
                        s += qs[b * 32 + i] as i8 as i32 * xb.qs[i] as i32;
                    }
                    acc += d[b] * xb.d * s as f32;
                }
                acc
            }
            _ => {
                let m = &self.m[r * nb..(r + 1) * nb];
                let qs = &self.qs[r * nb * 16..(r + 1) * nb * 16];
                let mut acc = 0f32;
                for (b, xb) in x.iter().enumerate() {
                    let mut s = 0i32;
                    for j in 0..16 {
                        let q = qs[b * 16 + j];
                        s += (q & 0x0f) as i32 * xb.qs[j] as i32;
                        s += (q >> 4) as i32 * xb.qs[j + 16] as i32;
                    }
                    acc += d[b] * xb.d * s as f32 + m[b] * xb.s;
                }
                acc
            }
        }
    }

    /// Dot products of weight row `r` with four quantized activation rows (`x` holds them one
    /// after another): each weight block is unpacked once for all four.
    #[inline]
    fn dot4(&self, r: usize, x: &[XBlock]) -> [f32; 4] {
        let nb = self.blocks_per_row();
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            let d = &self.d[r * nb..(r + 1) * nb];
            // SAFETY: as in `dot`; `x` holds 4 * nb blocks.
            unsafe {
                return match self.format {
                    QFormat::Q8_0 => {
                        simd::dot4_q8(d, &self.qs[r * nb * 32..(r + 1) * nb * 32], x, nb)
                    }
                    _ => simd::dot4_q4(
                        d,
                        &self.m[r * nb..(r + 1) * nb],
                        &self.qs[r * nb * 16..(r + 1) * nb * 16],
                        x,
                        nb,
                    ),
                };
            }
        }
        std::array::from_fn(|i| self.dot(r, &x[i * nb..(i + 1) * nb]))
    }

    /// `y = x W^T` for `x` of `n` rows of `cols` values: returns `n` rows of `rows` values.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        QMatrix::matmul_many(&[self], x)
            .pop()
            .expect("one output per matrix")
    }

    /// `x W^T` for several matrices with the same input width (e.g. q, k and v): the input is
    /// quantized once and all products share one parallel region.
    pub fn matmul_many(mats: &[&QMatrix], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = mats.first() else {
            return Vec::new();
        };
        let cols = first.cols;
        assert!(
            mats.iter().all(|m| m.cols == cols),
            "QMatrix::matmul_many: different input widths"
        );
        let n = x.len() / cols;
        let nb = cols / BLOCK;
        let mut xq = Vec::new();
        quantize_rows(x, cols, &mut xq);
        let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let outs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
        // Output features in groups of 8, shared out over the thread pool; every item writes
        // its features for every input row, reading each weight row once while it is hot in L1.
        let starts: Vec<usize> = mats
            .iter()
            .scan(0, |acc, m| {
                let s = *acc;
                *acc += m.rows.div_ceil(GROUP);
                Some(s)
            })
            .collect();
        let groups: usize = mats.iter().map(|m| m.rows.div_ceil(GROUP)).sum();
        let work = |items: std::ops::Range<usize>| {
            let outs = &outs;
            // Long inputs (a prefill) in chunks of rows that stay in the cache while each
            // item's weights are read once per chunk.
            for i0 in (0..n).step_by(X_CHUNK) {
                let rows_here = X_CHUNK.min(n - i0);
                let x_here = &xq[i0 * nb..(i0 + rows_here) * nb];
                for item in items.clone() {
                    let mi = starts.partition_point(|&s| s <= item) - 1;
                    let m = mats[mi];
                    let g = item - starts[mi];
                    // SAFETY: rows i0.. of the outputs of group `g` of matrix `mi` are written
                    // by this item only.
                    let out = unsafe { outs[mi].0.add(i0 * m.rows) };
                    // SAFETY: as above; `x_here` holds rows_here * nb blocks.
                    unsafe {
                        match &m.packed {
                            Some(p) => p.group_product(g, x_here, rows_here, out, m.rows, m.rows),
                            None => m.rows_product(g * GROUP, x_here, rows_here, out),
                        }
                    }
                }
            }
        };
        let total_rows: usize = mats.iter().map(|m| m.rows).sum();
        if total_rows * n * nb < 4096 {
            work(0..groups);
        } else {
            crate::pool::par_chunks(groups, work);
        }
        ys
    }

    /// The row layout's product for weight rows `lo..lo + 8` and `n` activation rows, writing
    /// `out[i * rows + r]`.
    ///
    /// # Safety
    /// `out` must be valid for those writes, and no other thread may write them.
    unsafe fn rows_product(&self, lo: usize, xq: &[XBlock], n: usize, out: *mut f32) {
        unsafe {
            let nb = self.blocks_per_row();
            for r in lo..(lo + GROUP).min(self.rows) {
                let mut i = 0;
                while i + 4 <= n {
                    let v = self.dot4(r, &xq[i * nb..(i + 4) * nb]);
                    for (j, vj) in v.iter().enumerate() {
                        *out.add((i + j) * self.rows + r) = *vj;
                    }
                    i += 4;
                }
                for i in i..n {
                    *out.add(i * self.rows + r) = self.dot(r, &xq[i * nb..(i + 1) * nb]);
                }
            }
        }
    }

    /// `x W^T` for a tensor (..., cols) -> (..., rows).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("QMatrix::forward: a scalar input");
        };
        if k != self.cols {
            candle_core::bail!(
                "QMatrix::forward: input has {k} features, the weight {}",
                self.cols
            );
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = self.matmul(&xs);
        let mut out = lead.to_vec();
        out.push(self.rows);
        Tensor::from_vec(y, out, &Device::Cpu)
    }
}

/// Output rows per work item (the packed layout's group).
const GROUP: usize = packed::LANES;
/// Activation rows per pass over the weights in [`QMatrix::matmul_many`].
const X_CHUNK: usize = 64;

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `QMatrix::matmul`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[cfg(test)]
mod tests {
    use super::super::tests::rand_vec;
    use super::super::Layout;
    use super::*;
    use crate::generate::Rng;
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn simd_and_scalar_kernels_agree() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (8, 32 * 7);
        let w =
            Tensor::from_vec(rand_vec(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let x = rand_vec(&mut rng, cols);
        let mut xq = Vec::new();
        quantize_rows(&x, cols, &mut xq);
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let format = QFormat::from_ggml(dt).unwrap();
            let m =
                QMatrix::from_gguf_bytes_in(format, rows, cols, &q.data().unwrap(), Layout::Rows)
                    .unwrap();
            let deq = m.dequantize();
            for r in 0..rows {
                // Scalar reference over the quantized activations.
                let mut exact = 0f64;
                for (b, xb) in xq.iter().enumerate() {
                    for i in 0..BLOCK {
                        exact +=
                            deq[r * cols + b * BLOCK + i] as f64 * (xb.d * xb.qs[i] as f32) as f64;
                    }
                }
                let got = m.dot(r, &xq) as f64;
                let four: Vec<XBlock> = xq
                    .iter()
                    .chain(&xq)
                    .chain(&xq)
                    .chain(&xq)
                    .copied()
                    .collect();
                assert!(m
                    .dot4(r, &four)
                    .iter()
                    .all(|&v| (v as f64 - got).abs() < 1e-5 * (1.0 + got.abs())));
                assert!(
                    (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{dt:?} {got} vs {exact}"
                );
            }
        }
    }
}
