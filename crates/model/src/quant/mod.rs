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

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub mod packed;
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

/// One 32-value block of activations: `x[i] ~= d * qs[i]`, `s = d * sum(qs)`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub struct XBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; BLOCK],
}

const EMPTY_XBLOCK: XBlock = XBlock {
    d: 0.0,
    s: 0.0,
    qs: [0; BLOCK],
};

/// Quantizes rows of `k` values (k a multiple of 32) into blocks, row after row.
pub fn quantize_rows(x: &[f32], k: usize, out: &mut Vec<XBlock>) {
    let nb = k / BLOCK;
    let rows = x.len() / k;
    out.clear();
    out.resize(rows * nb, EMPTY_XBLOCK);
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        for (chunk, blk) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
            // SAFETY: AVX2 is present (checked once) and the chunk holds 32 values.
            unsafe { simd::quantize_block(chunk, blk) };
        }
        return;
    }
    for (chunk, blk) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.qs.iter_mut().zip(chunk) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        blk.d = d;
        blk.s = d * sum as f32;
    }
}

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

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::XBlock;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One block of 32 activations to 8 bits (round to nearest, ties to even).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_block(x: &[f32], out: &mut XBlock) {
        unsafe {
            let p = x.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let sign = _mm256_set1_ps(-0.0);
            let mut amax = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *vi));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let d = _mm_cvtss_f32(m1) / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let mut q = [_mm256_setzero_si256(); 4];
            for (qi, vi) in q.iter_mut().zip(&v) {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(*vi, id),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                *qi = _mm256_cvtps_epi32(r);
            }
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            let total = _mm_cvtsi128_si32(s1);
            // i32 -> i16 -> i8 packs interleave 128-bit lanes; the permute restores the order.
            let a = _mm256_packs_epi32(q[0], q[1]);
            let b = _mm256_packs_epi32(q[2], q[3]);
            let c = _mm256_packs_epi16(a, b);
            let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(out.qs.as_mut_ptr() as *mut __m256i, c);
            out.d = d;
            out.s = d * total as f32;
        }
    }

    /// Q4 row (nibbles `qs`, scales `d`, offsets `m`) against quantized activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4(d: &[f32], m: &[f32], qs: &[u8], x: &[XBlock]) -> f32 {
        unsafe {
            let mask = _mm256_set1_epi8(0x0f);
            let ones = _mm256_set1_epi16(1);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut off = 0f32;
            let nb = x.len();
            let mut b = 0;
            let q = qs.as_ptr();
            while b + 1 < nb {
                let raw0 = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
                let raw1 = _mm_loadu_si128(q.add(b * 16 + 16) as *const __m128i);
                let w0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw0, 4), raw0), mask);
                let w1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw1, 4), raw1), mask);
                let x0 = _mm256_loadu_si256(x[b].qs.as_ptr() as *const __m256i);
                let x1 = _mm256_loadu_si256(x[b + 1].qs.as_ptr() as *const __m256i);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), ones);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * x[b].d), _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_set1_ps(d[b + 1] * x[b + 1].d),
                    _mm256_cvtepi32_ps(p1),
                    acc1,
                );
                off += m[b] * x[b].s + m[b + 1] * x[b + 1].s;
                b += 2;
            }
            if b < nb {
                let raw = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
                let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
                let xv = _mm256_loadu_si256(x[b].qs.as_ptr() as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * x[b].d), _mm256_cvtepi32_ps(p), acc0);
                off += m[b] * x[b].s;
            }
            hsum(_mm256_add_ps(acc0, acc1)) + off
        }
    }

    /// Q4 row against four activation rows (`x`: 4 * nb blocks, row after row).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4(d: &[f32], m: &[f32], qs: &[u8], x: &[XBlock], nb: usize) -> [f32; 4] {
        unsafe {
            let mask = _mm256_set1_epi8(0x0f);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut off = [0f32; 4];
            let q = qs.as_ptr();
            let xp = x.as_ptr();
            for b in 0..nb {
                let raw = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
                let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
                let (db, mb) = (*d.get_unchecked(b), *m.get_unchecked(b));
                for i in 0..4 {
                    let xb = &*xp.add(i * nb + b);
                    let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                    acc[i] =
                        _mm256_fmadd_ps(_mm256_set1_ps(db * xb.d), _mm256_cvtepi32_ps(p), acc[i]);
                    off[i] += mb * xb.s;
                }
            }
            [
                hsum(acc[0]) + off[0],
                hsum(acc[1]) + off[1],
                hsum(acc[2]) + off[2],
                hsum(acc[3]) + off[3],
            ]
        }
    }

    /// Q8_0 row against four activation rows (`x`: 4 * nb blocks, row after row).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8(d: &[f32], qs: &[u8], x: &[XBlock], nb: usize) -> [f32; 4] {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); 4];
            let q = qs.as_ptr();
            let xp = x.as_ptr();
            for b in 0..nb {
                let w = _mm256_loadu_si256(q.add(b * 32) as *const __m256i);
                let wabs = _mm256_sign_epi8(w, w);
                let db = *d.get_unchecked(b);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xb = &*xp.add(i * nb + b);
                    let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    let p = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, w)),
                        ones,
                    );
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(db * xb.d), _mm256_cvtepi32_ps(p), *a);
                }
            }
            [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
        }
    }

    /// Q8_0 row (signed bytes `qs`, scales `d`) against quantized activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(d: &[f32], qs: &[u8], x: &[XBlock]) -> f32 {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            let q = qs.as_ptr();
            for (b, xb) in x.iter().enumerate() {
                let w = _mm256_loadu_si256(q.add(b * 32) as *const __m256i);
                let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                // maddubs wants unsigned x signed: |w| times x with w's sign.
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                let p = _mm256_madd_epi16(p, ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * xb.d), _mm256_cvtepi32_ps(p), acc);
            }
            hsum(acc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Rng;

    fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    }

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

    #[test]
    fn block_quantization_rounds_and_sums() {
        let mut rng = Rng::new(5);
        let mut x = rand_vec(&mut rng, 3 * BLOCK);
        x[BLOCK..2 * BLOCK].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let mut q = Vec::new();
        quantize_rows(&x, 3 * BLOCK, &mut q);
        assert_eq!(q.len(), 3);
        assert_eq!((q[1].d, q[1].s), (0.0, 0.0));
        assert!(q[1].qs.iter().all(|&v| v == 0));
        for (b, blk) in [(0, &q[0]), (2, &q[2])] {
            let xs = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(blk.d, amax / 127.0);
            for (v, &qi) in xs.iter().zip(&blk.qs) {
                assert_eq!(qi as i32, (v / blk.d).round() as i32, "{v}");
            }
            let sum: i32 = blk.qs.iter().map(|&v| v as i32).sum();
            assert_eq!(blk.s, blk.d * sum as f32);
            assert!(blk.qs.iter().any(|&v| v.abs() == 127));
        }
    }

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
