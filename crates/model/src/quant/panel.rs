//! Row panels of a [`QMatrix`] as f32: what a product with the transposed weight (the input
//! gradient `dX = dY W` of a frozen quantized layer in training) needs, a few rows at a time,
//! without an f32 copy of the whole matrix.

use super::{packed, QFormat, QMatrix, BLOCK};

impl QMatrix {
    /// Writes weight rows `r0 .. r0 + out.len() / cols` as f32 into `out` (row after row), the
    /// same values as [`QMatrix::dequantize`] gives for those rows, in either layout.
    ///
    /// # Panics
    /// If `out.len()` is not a multiple of `cols` or the rows run past the matrix.
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) {
        assert!(
            out.len().is_multiple_of(self.cols),
            "QMatrix::dequantize_rows_into: {} values is not a whole number of {}-value rows",
            out.len(),
            self.cols
        );
        let n = out.len() / self.cols;
        assert!(
            r0 + n <= self.rows,
            "QMatrix::dequantize_rows_into: rows {r0}..{} of {}",
            r0 + n,
            self.rows
        );
        let nb = self.blocks_per_row();
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let r = r0 + i;
            for (b, o) in row.chunks_exact_mut(BLOCK).enumerate() {
                if let Some(p) = &self.packed {
                    let (u, d, m) = p.block(r, b);
                    for (v, &q) in o.iter_mut().zip(&u) {
                        *v = d * q as f32 + m;
                    }
                    continue;
                }
                let blk = r * nb + b;
                let d = self.d[blk];
                match self.format {
                    QFormat::Q8_0 => {
                        let q = &self.qs[blk * 32..blk * 32 + 32];
                        for (v, &q) in o.iter_mut().zip(q) {
                            *v = d * q as i8 as f32;
                        }
                    }
                    QFormat::Q4_0 | QFormat::Q4_1 => {
                        let q = &self.qs[blk * 16..blk * 16 + 16];
                        let m = self.m[blk];
                        for j in 0..16 {
                            o[j] = d * (q[j] & 0x0f) as f32 + m;
                            o[j + 16] = d * (q[j] >> 4) as f32 + m;
                        }
                    }
                }
            }
        }
    }

    /// Bytes the blocks take in memory (scales, offsets and values, either layout).
    pub fn size_bytes(&self) -> usize {
        match &self.packed {
            Some(p) => {
                // Per (group, block): 8 scales and 8 offsets, and 128 (Q4) or 256 (Q8) bytes.
                let qb = if self.format == QFormat::Q8_0 {
                    256
                } else {
                    128
                };
                p.groups * p.nb * (2 * 4 * packed::LANES + qb)
            }
            None => 4 * (self.d.len() + self.m.len()) + self.qs.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::rand_vec;
    use super::super::Layout;
    use super::*;
    use crate::generate::Rng;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn row_panels_match_the_whole_dequantization_in_every_format_and_layout() {
        let mut rng = Rng::new(11);
        // 13 rows: the packed layout's second group is partly padding.
        let (rows, cols) = (13, 64);
        let w = rand_vec(&mut rng, rows * cols);
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&wt, dt).unwrap();
            let format = QFormat::from_ggml(dt).unwrap();
            for layout in [Layout::Rows, Layout::Packed] {
                let m = QMatrix::from_gguf_bytes_in(format, rows, cols, &q.data().unwrap(), layout)
                    .unwrap();
                let whole = m.dequantize();
                for (r0, n) in [(0, 1), (3, 7), (8, 5), (0, 13), (12, 1)] {
                    let mut out = vec![f32::NAN; n * cols];
                    m.dequantize_rows_into(r0, &mut out);
                    assert_eq!(
                        out,
                        whole[r0 * cols..(r0 + n) * cols],
                        "{dt:?} {layout:?} rows {r0}..{}",
                        r0 + n
                    );
                }
                assert!(m.size_bytes() < rows * cols * 4 / 2, "{dt:?} {layout:?}");
            }
        }
    }
}
