//! Block weights with 8 output rows interleaved 4 bytes at a time, for the VNNI instruction
//! `vpdpbusd` (AVX-VNNI, or AVX512-VNNI with AVX512VL, on 256-bit registers). One `vpdpbusd`
//! multiplies 4 unsigned weight bytes of each of 8 rows by the same 4 signed activation bytes
//! (broadcast) and adds the 8 sums into 8 lanes: a block of 32 inputs for 8 rows is 8 such
//! instructions, with no horizontal sum at the end. The row layout's AVX2 kernel needs about 2.3
//! times as many instructions for the same products.
//!
//! Every format is stored as unsigned values `u` with `w = d * u + m` per block and row: Q4_1 as
//! is; Q4_0 with `m = -8 d`; Q8_0 with `u = q + 128` and `m = -128 d`. A block product is then
//! `d_w d_x sum(u * q_x) + m * s_x`, where `s_x = d_x sum(q_x)` comes with the activation block.
//!
//! Layout, per (row group, block): 8 scales, 8 offsets, then the values. Q4: 4 vectors of 32
//! bytes, byte `4 r + i` of vector `p` holding row `r`'s GGUF byte `4 p + i` (inputs `4 p + i` in
//! its low nibble and `16 + 4 p + i` in its high one). Q8: 8 vectors, byte `4 r + i` of vector `p`
//! holding row `r`'s input `4 p + i`. Rows past the matrix's last are zero.

use super::{QFormat, XBlock, BLOCK};

/// Rows per group.
pub const LANES: usize = 8;

#[derive(Clone)]
pub struct Packed {
    /// Row groups (rows padded to a multiple of 8).
    pub groups: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Packed value bytes per (group, block): 128 for Q4, 256 for Q8.
    qb: usize,
    q4: bool,
    /// (group, block, lane)
    d: Vec<f32>,
    m: Vec<f32>,
    /// (group, block, qb bytes)
    q: Vec<u8>,
}

impl Packed {
    /// From the row layout: per block `d`, `m` (unused for Q8_0) and the GGUF value bytes.
    pub fn from_rows(
        format: QFormat,
        rows: usize,
        cols: usize,
        d: &[f32],
        m: &[f32],
        qs: &[u8],
    ) -> Packed {
        let nb = cols / BLOCK;
        let groups = rows.div_ceil(LANES);
        let q4 = format != QFormat::Q8_0;
        let qb = if q4 { 128 } else { 256 };
        let row_bytes = if q4 { 16 } else { 32 };
        let mut pd = vec![0f32; groups * nb * LANES];
        let mut pm = vec![0f32; groups * nb * LANES];
        let mut pq = vec![0u8; groups * nb * qb];
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..nb {
                let src = r * nb + b;
                let dst = (g * nb + b) * LANES + lane;
                pd[dst] = d[src];
                pm[dst] = if q4 { m[src] } else { -128.0 * d[src] };
                let s = &qs[src * row_bytes..(src + 1) * row_bytes];
                let o = &mut pq[(g * nb + b) * qb..(g * nb + b + 1) * qb];
                for p in 0..row_bytes / 4 {
                    for i in 0..4 {
                        let v = s[4 * p + i];
                        o[p * 32 + 4 * lane + i] =
                            if q4 { v } else { (v as i8 as i16 + 128) as u8 };
                    }
                }
            }
        }
        Packed {
            groups,
            nb,
            qb,
            q4,
            d: pd,
            m: pm,
            q: pq,
        }
    }

    /// Weight row `r`'s 32 values `u` of block `b` (input order) with its `d` and `m`.
    pub(super) fn block(&self, r: usize, b: usize) -> ([u8; BLOCK], f32, f32) {
        let (g, lane) = (r / LANES, r % LANES);
        let gb = g * self.nb + b;
        let o = &self.q[gb * self.qb..(gb + 1) * self.qb];
        let mut u = [0u8; BLOCK];
        for k in 0..BLOCK {
            u[k] = if self.q4 {
                let (p, i) = ((k % 16) / 4, k % 4);
                let byte = o[p * 32 + 4 * lane + i];
                if k < 16 {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            } else {
                o[(k / 4) * 32 + 4 * lane + k % 4]
            };
        }
        (u, self.d[gb * LANES + lane], self.m[gb * LANES + lane])
    }

    /// The weights as f32, `rows` rows of `nb * 32` values.
    pub fn dequantize(&self, rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.nb * BLOCK];
        for r in 0..rows {
            for b in 0..self.nb {
                let (u, d, m) = self.block(r, b);
                let o = &mut out[(r * self.nb + b) * BLOCK..(r * self.nb + b + 1) * BLOCK];
                for (v, &q) in o.iter_mut().zip(&u) {
                    *v = d * q as f32 + m;
                }
            }
        }
        out
    }

    /// Outputs of row group `g` for the `n` activation rows in `x` (`n * nb` blocks): writes
    /// `out[i * ld + 8 g + lane]` for the lanes below `rows` (the matrix's row count).
    ///
    /// # Safety
    /// `out` must be valid for those writes, and no other thread may write them.
    pub unsafe fn group_product(
        &self,
        g: usize,
        x: &[XBlock],
        n: usize,
        out: *mut f32,
        ld: usize,
        rows: usize,
    ) {
        unsafe {
            debug_assert!(x.len() >= n * self.nb && g < self.groups);
            #[cfg(target_arch = "x86_64")]
            match vnni::kind() {
                vnni::Kind::Avx => return vnni::group_product_avx(self, g, x, n, out, ld, rows),
                vnni::Kind::Avx512 => return vnni::group_product_512(self, g, x, n, out, ld, rows),
                vnni::Kind::None => {}
            }
            self.group_product_scalar(g, x, n, out, ld, rows)
        }
    }

    /// Portable version of [`Packed::group_product`].
    unsafe fn group_product_scalar(
        &self,
        g: usize,
        x: &[XBlock],
        n: usize,
        out: *mut f32,
        ld: usize,
        rows: usize,
    ) {
        unsafe {
            let lanes = LANES.min(rows - g * LANES);
            for i in 0..n {
                for lane in 0..lanes {
                    let mut acc = 0f32;
                    for b in 0..self.nb {
                        let (u, d, m) = self.block(g * LANES + lane, b);
                        let xb = &x[i * self.nb + b];
                        let s: i32 = u
                            .iter()
                            .zip(&xb.qs)
                            .map(|(&w, &v)| w as i32 * v as i32)
                            .sum();
                        acc += d * xb.d * s as f32 + m * xb.s;
                    }
                    *out.add(i * ld + g * LANES + lane) = acc;
                }
            }
        }
    }
}

/// Whether this CPU runs the VNNI kernels (else the row layout's AVX2 kernels are faster).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::kind() != vnni::Kind::None
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Packed, XBlock, LANES};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Avx,
        Avx512,
        None,
    }

    pub fn kind() -> Kind {
        static K: OnceLock<Kind> = OnceLock::new();
        *K.get_or_init(|| {
            let base = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if base && is_x86_feature_detected!("avxvnni") {
                Kind::Avx
            } else if base
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                Kind::Avx512
            } else {
                Kind::None
            }
        })
    }

    /// The kernel, once per VNNI encoding (`$dp` is the 256-bit `vpdpbusd`).
    macro_rules! kernel {
        ($name:ident, $tile:ident, $features:literal, $dp:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                p: &Packed,
                g: usize,
                x: &[XBlock],
                n: usize,
                out: *mut f32,
                ld: usize,
                rows: usize,
            ) {
                unsafe {
                    let lanes = LANES.min(rows - g * LANES);
                    let mut i = 0;
                    while i < n {
                        let t = (n - i).min(4);
                        let mut acc = [_mm256_setzero_ps(); 4];
                        match t {
                            4 => $tile::<4>(p, g, x.as_ptr().add(i * p.nb), &mut acc),
                            3 => $tile::<3>(p, g, x.as_ptr().add(i * p.nb), &mut acc),
                            2 => $tile::<2>(p, g, x.as_ptr().add(i * p.nb), &mut acc),
                            _ => $tile::<1>(p, g, x.as_ptr().add(i * p.nb), &mut acc),
                        }
                        for (j, a) in acc.iter().enumerate().take(t) {
                            let dst = out.add((i + j) * ld + g * LANES);
                            if lanes == LANES {
                                _mm256_storeu_ps(dst, *a);
                            } else {
                                let mut tmp = [0f32; LANES];
                                _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, lanes);
                            }
                        }
                        i += t;
                    }
                }
            }

            /// `T` activation rows (`x`: T * nb blocks) against row group `g`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $tile<const T: usize>(
                p: &Packed,
                g: usize,
                x: *const XBlock,
                acc: &mut [__m256; 4],
            ) {
                unsafe {
                    let nb = p.nb;
                    let mask = _mm256_set1_epi8(0x0f);
                    for b in 0..nb {
                        let gb = g * nb + b;
                        let dv = _mm256_loadu_ps(p.d.as_ptr().add(gb * LANES));
                        let mv = _mm256_loadu_ps(p.m.as_ptr().add(gb * LANES));
                        let qp = p.q.as_ptr().add(gb * p.qb) as *const __m256i;
                        // The 8 weight vectors of this block: inputs 4k..4k+4 of each row in w[k].
                        let mut w = [_mm256_setzero_si256(); 8];
                        if p.q4 {
                            for k in 0..4 {
                                let raw = _mm256_loadu_si256(qp.add(k));
                                w[k] = _mm256_and_si256(raw, mask);
                                w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                            }
                        } else {
                            for (k, wk) in w.iter_mut().enumerate() {
                                *wk = _mm256_loadu_si256(qp.add(k));
                            }
                        }
                        for (t, a) in acc.iter_mut().enumerate().take(T) {
                            let xb = &*x.add(t * nb + b);
                            let xq = xb.qs.as_ptr() as *const i32;
                            let mut s0 = _mm256_setzero_si256();
                            let mut s1 = _mm256_setzero_si256();
                            for k in 0..4 {
                                let x0 = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(k)));
                                let x1 = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(k + 4)));
                                s0 = $dp(s0, w[k], x0);
                                s1 = $dp(s1, w[k + 4], x1);
                            }
                            let s = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                            *a = _mm256_fmadd_ps(s, _mm256_mul_ps(dv, _mm256_set1_ps(xb.d)), *a);
                            *a = _mm256_fmadd_ps(mv, _mm256_set1_ps(xb.s), *a);
                        }
                    }
                }
            }
        };
    }

    kernel!(
        group_product_avx,
        tile_avx,
        "avx2,fma,avxvnni",
        _mm256_dpbusd_avx_epi32
    );
    kernel!(
        group_product_512,
        tile_512,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32
    );
}

#[cfg(test)]
mod tests {
    use super::super::{quantize_rows, QMatrix};
    use super::*;
    use crate::generate::Rng;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The CPU's kernel (VNNI where present) against the portable one, on every tile size.
    #[test]
    fn simd_and_portable_group_products_agree() {
        let mut rng = Rng::new(11);
        let (rows, cols, n) = (21, 32 * 5, 7);
        let rand = |rng: &mut Rng, k: usize| -> Vec<f32> {
            (0..k)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        let w = Tensor::from_vec(rand(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let x = rand(&mut rng, n * cols);
        let mut xq = Vec::new();
        quantize_rows(&x, cols, &mut xq);
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let format = QFormat::from_ggml(dt).unwrap();
            let m = QMatrix::from_gguf_bytes_in(
                format,
                rows,
                cols,
                &q.data().unwrap(),
                super::super::Layout::Packed,
            )
            .unwrap();
            let p = m.packed.as_ref().unwrap();
            let (mut fast, mut slow) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            for g in 0..p.groups {
                // SAFETY: both buffers hold n * rows values and this thread alone writes them.
                unsafe {
                    p.group_product(g, &xq, n, fast.as_mut_ptr(), rows, rows);
                    p.group_product_scalar(g, &xq, n, slow.as_mut_ptr(), rows, rows);
                }
            }
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{dt:?}: {a} vs {b}"
                );
            }
        }
    }
}
