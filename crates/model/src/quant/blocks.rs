//! GGUF blocks in and out of a [`QMatrix`]: f16 scales, loading in either layout, dequantization.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::{Layout, Packed, QFormat, QMatrix, BLOCK};

/// IEEE half to f32 (exact, subnormals included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value m * 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}
impl QMatrix {
    /// From a GGUF tensor of shape (rows, cols) in a supported format; `None` otherwise.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<QMatrix>> {
        let Some(format) = QFormat::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = match q.shape().dims() {
            [r, c] => (*r, *c),
            _ => return Ok(None),
        };
        if !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = q.data()?;
        Ok(Some(QMatrix::from_gguf_bytes(format, rows, cols, &data)?))
    }

    /// From raw GGUF block bytes, row after row.
    pub fn from_gguf_bytes(
        format: QFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> candle_core::Result<QMatrix> {
        QMatrix::from_gguf_bytes_in(format, rows, cols, data, Layout::for_this_cpu())
    }

    /// As [`QMatrix::from_gguf_bytes`], in a chosen layout (a packed matrix on a CPU without
    /// VNNI runs a slow portable kernel: for tests).
    pub fn from_gguf_bytes_in(
        format: QFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
        layout: Layout,
    ) -> candle_core::Result<QMatrix> {
        let nblocks = rows * cols / BLOCK;
        let bb = format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || data.len() != nblocks * bb {
            candle_core::bail!(
                "{format:?} matrix {rows}x{cols}: expected {} bytes, got {}",
                nblocks * bb,
                data.len()
            );
        }
        let h = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
        let qbytes = if format == QFormat::Q8_0 { 32 } else { 16 };
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::with_capacity(nblocks);
        let mut qs = Vec::with_capacity(nblocks * qbytes);
        for b in data.chunks_exact(bb) {
            match format {
                QFormat::Q4_0 => {
                    let dd = h(b, 0);
                    d.push(dd);
                    m.push(-8.0 * dd);
                    qs.extend_from_slice(&b[2..18]);
                }
                QFormat::Q4_1 => {
                    d.push(h(b, 0));
                    m.push(h(b, 2));
                    qs.extend_from_slice(&b[4..20]);
                }
                QFormat::Q8_0 => {
                    d.push(h(b, 0));
                    qs.extend_from_slice(&b[2..34]);
                }
            }
        }
        if layout == Layout::Packed {
            let p = Packed::from_rows(format, rows, cols, &d, &m, &qs);
            return Ok(QMatrix {
                format,
                rows,
                cols,
                d: Vec::new(),
                m: Vec::new(),
                qs: Vec::new(),
                packed: Some(p),
            });
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            d,
            m,
            qs,
            packed: None,
        })
    }
    /// The weights as f32 (rows, cols).
    pub fn dequantize(&self) -> Vec<f32> {
        if let Some(p) = &self.packed {
            return p.dequantize(self.rows);
        }
        let mut out = vec![0f32; self.rows * self.cols];
        let nb = self.rows * self.blocks_per_row();
        for blk in 0..nb {
            let o = &mut out[blk * BLOCK..(blk + 1) * BLOCK];
            let d = self.d[blk];
            match self.format {
                QFormat::Q8_0 => {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = d * self.qs[blk * 32 + i] as i8 as f32;
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
        out
    }

    /// The weights as an f32 (rows, cols) tensor.
    pub fn dequantize_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize(), (self.rows, self.cols), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
