//! Quantized linear layers for decoding on the CPU: GGUF Q4_0, Q4_1 and Q8_0 weights stay in their
//! 32-value blocks (so a decode step reads 0.56-1.06 bytes per weight instead of 4), and each
//! product runs against the activations quantized to 8 bits per 32-value block (a scale and the
//! block's sum, as llama.cpp's Q8_1). Kernels use AVX2 (with FMA and F16C) when the CPU has them
//! and plain Rust otherwise; the output features are split across [`crate::pool`]. On CPUs with
//! VNNI the blocks are repacked at load, 8 rows interleaved (see [`packed`]), for kernels built on
//! `vpdpbusd`; that layout keeps each block's scale and offset as f32 (0.75 bytes per weight for
//! Q4, 1.25 for Q8_0).
//!
//! Block layouts are GGUF's: Q4_0 `{d: f16, qs: [u8; 16]}` (value `d * (q - 8)`), Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` (value `d * q + m`), both with element `j` in the low nibble of
//! `qs[j]` and element `j + 16` in its high nibble; Q8_0 `{d: f16, qs: [i8; 32]}`.
use candle_core::quantized::GgmlDType;

mod activation;
mod blocks;
mod matmul;
pub mod packed;
mod panel;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use activation::{quantize_rows, XBlock};
pub use blocks::f16_to_f32;
use packed::Packed;

/// Values per block.
pub const BLOCK: usize = 32;

/// A supported block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub fn from_ggml(d: GgmlDType) -> Option<QFormat> {
        match d {
            GgmlDType::Q4_0 => Some(QFormat::Q4_0),
            GgmlDType::Q4_1 => Some(QFormat::Q4_1),
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
}

/// How a [`QMatrix`] keeps its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// GGUF's: row after row (the AVX2 and portable kernels).
    Rows,
    /// 8 rows interleaved for the VNNI kernels ([`packed`]).
    Packed,
}

impl Layout {
    /// `Packed` where the CPU has VNNI, else `Rows`; `SAFETUNE_QKERNEL=avx2` forces `Rows` (to
    /// compare the two).
    pub fn for_this_cpu() -> Layout {
        use std::sync::OnceLock;
        static L: OnceLock<Layout> = OnceLock::new();
        *L.get_or_init(|| {
            if packed::available() && std::env::var("SAFETUNE_QKERNEL").as_deref() != Ok("avx2") {
                Layout::Packed
            } else {
                Layout::Rows
            }
        })
    }
}

/// An (out, in) weight matrix kept in GGUF blocks.
#[derive(Clone)]
pub struct QMatrix {
    pub format: QFormat,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns), a multiple of 32.
    pub cols: usize,
    /// Per block: scale `d` as f32.
    d: Vec<f32>,
    /// Per block: Q4_1 offset `m`; Q4_0 stores `-8 d` here so both share one kernel.
    m: Vec<f32>,
    /// Q4: 16 bytes per block; Q8_0: 32 signed bytes per block.
    qs: Vec<u8>,
    /// The same blocks in the packed layout; `d`, `m` and `qs` are then empty.
    packed: Option<Packed>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.format, self.rows, self.cols)
    }
}
impl QMatrix {
    pub fn layout(&self) -> Layout {
        if self.packed.is_some() {
            Layout::Packed
        } else {
            Layout::Rows
        }
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Rng;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    pub(super) fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    }
    #[test]
    fn every_format_matches_candles_dequantization_and_a_dense_product() {
        let mut rng = Rng::new(3);
        // 70 rows: the packed layout's last group is partly padding. 67 activation rows: two
        // chunks of X_CHUNK, and tiles of 4 and of 3.
        let (rows, cols, n) = (70, 96, 67);
        let w = rand_vec(&mut rng, rows * cols);
        let x = rand_vec(&mut rng, n * cols);
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for (dt, layout) in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
            .into_iter()
            .flat_map(|dt| [(dt, Layout::Rows), (dt, Layout::Packed)])
        {
            let q = QTensor::quantize(&wt, dt).unwrap();
            let format = QFormat::from_ggml(dt).unwrap();
            let m = QMatrix::from_gguf_bytes_in(format, rows, cols, &q.data().unwrap(), layout)
                .unwrap();
            assert_eq!(m.layout(), layout);
            let ours = m.dequantize();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{dt:?} {layout:?} dequantization");
            // The product against the dequantized weights: exact for the 8-bit activations the
            // kernel sees, and within their rounding error of the f32 activations.
            let y = m.matmul(&x);
            let mut xq = Vec::new();
            quantize_rows(&x, cols, &mut xq);
            let nb = cols / BLOCK;
            for i in 0..n {
                for r in 0..rows {
                    let (mut exact, mut seen) = (0f64, 0f64);
                    for c in 0..cols {
                        let xb = &xq[i * nb + c / BLOCK];
                        let w = ours[r * cols + c] as f64;
                        exact += x[i * cols + c] as f64 * w;
                        seen += (xb.d * xb.qs[c % BLOCK] as f32) as f64 * w;
                    }
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - seen).abs() < 1e-4 * (1.0 + seen.abs()),
                        "{dt:?} {layout:?} row {i} col {r}: {got} vs {seen}"
                    );
                    assert!(
                        (got - exact).abs() < 0.05,
                        "{dt:?} {layout:?} row {i} col {r}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
