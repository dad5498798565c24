//! The row layout's AVX2 kernels (with FMA and F16C): activation quantization and block dot
//! products.

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
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(db * xb.d), _mm256_cvtepi32_ps(p), acc[i]);
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
                let p =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, w)), ones);
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
