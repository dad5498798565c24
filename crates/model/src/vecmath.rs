//! Small vector kernels for the f32 loops around the matrix products (attention over the KV
//! cache, softmax, log-sum-exp): AVX2 with FMA where the CPU has them (checked once at run time;
//! the crate is built for the baseline x86-64, which has only SSE2), plain Rust otherwise.
//!
//! `exp` is a vector exponential: `2^n * p(r)` with `n = round(x / ln 2)`, `r = x - n ln 2`
//! (ln 2 split in two parts) and `p` the degree-7 Taylor polynomial of `e^r` on |r| <= ln2 / 2,
//! whose truncation error is below 7e-9 relative. Results are within 2 ulp of `f32::exp`.
//! Inputs below -87.3 give 0 (`f32::exp` gives subnormals down to -103.9) and inputs above 88.37
//! give infinity (`f32::exp` overflows above 88.72): the callers take exponentials of values
//! shifted to at most 0.

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `sum(a[i] * b[i])` over the shorter length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present; both slices hold n values.
        return unsafe { x86::dot(&a[..n], &b[..n]) };
    }
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

/// `y[i] += alpha * x[i]`.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::axpy(y, alpha, x) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `x[i] = exp(x[i] - shift)` in place; returns the sum of the results.
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::exp_shifted(x, shift) };
    }
    let mut total = 0f32;
    for v in x.iter_mut() {
        *v = exp_scalar(*v - shift);
        total += *v;
    }
    total
}

/// Attention scores of one query against `out.len()` keys stored one after another in `keys`
/// (each `q.len()` values): `out[j] = scale * q . key_j + mask[j]`.
pub fn scores(q: &[f32], keys: &[f32], scale: f32, mask: &[f32], out: &mut [f32]) {
    let d = q.len();
    assert!(
        keys.len() >= out.len() * d && mask.len() >= out.len(),
        "scores: short input"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2() && (d == 64 || d == 128) {
        // SAFETY: as in `dot`; the lengths were checked above.
        unsafe {
            return match d {
                64 => x86::scores::<8>(q, keys, scale, mask, out),
                _ => x86::scores::<16>(q, keys, scale, mask, out),
            };
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(q, &keys[j * d..(j + 1) * d]) * scale + mask[j];
    }
}

/// `out = sum_j weights[j] * row_j`, the rows (each `out.len()` values) one after another in
/// `rows`.
pub fn weighted_sum(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(rows.len() >= weights.len() * d, "weighted_sum: short input");
    #[cfg(target_arch = "x86_64")]
    if avx2() && (d == 64 || d == 128) {
        // SAFETY: as in `dot`; the lengths were checked above.
        unsafe {
            return match d {
                64 => x86::weighted_sum::<8>(weights, rows, out),
                _ => x86::weighted_sum::<16>(weights, rows, out),
            };
        }
    }
    out.fill(0.0);
    for (j, &w) in weights.iter().enumerate() {
        axpy(out, w, &rows[j * d..(j + 1) * d]);
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`, with `silu(g) = g / (1 + e^-g)` (the SwiGLU product).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::silu_mul(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_scalar(-*g)) * u;
    }
}

/// `out[i] = 1 / (1 + e^-x[i])`.
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "sigmoid: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::sigmoid(x, out) };
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + exp_scalar(-*v));
    }
}

/// `log(sum(exp(x[i])))`, shifted by the maximum so that it neither overflows nor underflows.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return m + unsafe { x86::sum_exp_shifted(x, m) }.ln();
    }
    m + x.iter().map(|&v| exp_scalar(v - m)).sum::<f32>().ln()
}

/// The largest value (negative infinity for an empty slice).
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::max(x) };
    }
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `softmax` in place over `x`.
pub fn softmax(x: &mut [f32]) {
    let m = max(x);
    let total = exp_shifted(x, m);
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The scalar fallback of the vector exponential: the same method in f64 (same limits).
pub fn exp_scalar(x: f32) -> f32 {
    if x < LO {
        return 0.0;
    }
    if x > HI {
        return f32::INFINITY;
    }
    let x = x as f64;
    let n = (x * std::f64::consts::LOG2_E).round();
    let r = x - n * std::f64::consts::LN_2;
    let mut p = C[7] as f64;
    for c in C[..7].iter().rev() {
        p = p * r + *c as f64;
    }
    (p * 2f64.powi(n as i32)) as f32
}

const LO: f32 = -87.3;
/// Largest input whose `n` (127) still fits the exponent field.
const HI: f32 = 88.37;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with 9 significant bits so that `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1/k! for k = 0..=7.
const C: [f32; 8] = [
    1.0,
    1.0,
    0.5,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{C, HI, LN2_HI, LN2_LO, LO, LOG2E};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        unsafe {
            let n = a.len();
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, ak) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    *ak = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(o)),
                        _mm256_loadu_ps(pb.add(o)),
                        *ak,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            for j in i..n {
                s += a[j] * b[j];
            }
            s
        }
    }

    /// Head size `8 * NV`: the query stays in registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores<const NV: usize>(
        q: &[f32],
        keys: &[f32],
        scale: f32,
        mask: &[f32],
        out: &mut [f32],
    ) {
        unsafe {
            let d = 8 * NV;
            let mut qv = [_mm256_setzero_ps(); NV];
            for (k, v) in qv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(q.as_ptr().add(8 * k));
            }
            let kp = keys.as_ptr();
            for (j, o) in out.iter_mut().enumerate() {
                let row = kp.add(j * d);
                let mut a0 = _mm256_mul_ps(qv[0], _mm256_loadu_ps(row));
                let mut a1 = _mm256_mul_ps(qv[1], _mm256_loadu_ps(row.add(8)));
                let mut k = 2;
                while k + 1 < NV {
                    a0 = _mm256_fmadd_ps(qv[k], _mm256_loadu_ps(row.add(8 * k)), a0);
                    a1 = _mm256_fmadd_ps(qv[k + 1], _mm256_loadu_ps(row.add(8 * k + 8)), a1);
                    k += 2;
                }
                *o = hsum(_mm256_add_ps(a0, a1)) * scale + *mask.get_unchecked(j);
            }
        }
    }

    /// Head size `8 * NV`: the sum stays in registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum<const NV: usize>(weights: &[f32], rows: &[f32], out: &mut [f32]) {
        unsafe {
            let d = 8 * NV;
            let mut acc = [_mm256_setzero_ps(); NV];
            let rp = rows.as_ptr();
            for (j, &w) in weights.iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let row = rp.add(j * d);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), *a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        unsafe {
            let n = y.len();
            let (py, px) = (y.as_mut_ptr(), x.as_ptr());
            let a = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
            for j in i..n {
                y[j] += alpha * x[j];
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        unsafe {
            let n = x.len();
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 8 <= n {
                m = _mm256_max_ps(m, _mm256_loadu_ps(x.as_ptr().add(i)));
                i += 8;
            }
            let mut buf = [0f32; 8];
            _mm256_storeu_ps(buf.as_mut_ptr(), m);
            let mut r = buf.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            for &v in &x[i..] {
                r = r.max(v);
            }
            r
        }
    }

    /// e^x for 8 lanes (see the module's note).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let live = _mm256_cmp_ps(x, _mm256_set1_ps(LO), _CMP_GE_OQ);
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(C[7]);
        for c in C[..7].iter().rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let pow = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(pow));
        // Above HI: infinity (2^128 does not fit the exponent field); below LO: zero.
        let big = _mm256_cmp_ps(x, _mm256_set1_ps(HI), _CMP_GT_OQ);
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), big);
        _mm256_and_ps(y, live)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        unsafe {
            let n = gate.len();
            let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
            let one = _mm256_set1_ps(1.0);
            let zero = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let g = _mm256_loadu_ps(pg.add(i));
                let e = exp8(_mm256_sub_ps(zero, g));
                let v = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(v, _mm256_loadu_ps(pu.add(i))));
                i += 8;
            }
            for j in i..n {
                let g = gate[j];
                gate[j] = g / (1.0 + super::exp_scalar(-g)) * up[j];
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
        unsafe {
            let n = x.len();
            let one = _mm256_set1_ps(1.0);
            let zero = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let e = exp8(_mm256_sub_ps(zero, _mm256_loadu_ps(x.as_ptr().add(i))));
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(i),
                    _mm256_div_ps(one, _mm256_add_ps(one, e)),
                );
                i += 8;
            }
            for j in i..n {
                out[j] = 1.0 / (1.0 + super::exp_scalar(-x[j]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
        unsafe {
            let n = x.len();
            let s = _mm256_set1_ps(shift);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                acc = _mm256_add_ps(
                    acc,
                    exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s)),
                );
                i += 8;
            }
            hsum(acc)
                + x[i..]
                    .iter()
                    .map(|&v| super::exp_scalar(v - shift))
                    .sum::<f32>()
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        unsafe {
            let n = x.len();
            let p = x.as_mut_ptr();
            let s = _mm256_set1_ps(shift);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
                i += 8;
            }
            let mut total = hsum(acc);
            if i < n {
                let mut buf = [LO - 1.0; 8];
                buf[..n - i].copy_from_slice(&x[i..]);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), s));
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
                for (k, v) in x[i..].iter_mut().enumerate() {
                    *v = buf[k];
                    total += buf[k];
                }
            }
            total
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_and_handles_the_ends() {
        let mut xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.00876).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 88.3, -87.2]);
        let mut v = xs.clone();
        exp_shifted(&mut v, 0.0);
        for (&x, &got) in xs.iter().zip(&v) {
            let want = x.exp();
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, std {want}");
            let sc = exp_scalar(x);
            assert!(ulps(sc, want) <= 2, "scalar exp({x}) = {sc}, std {want}");
        }
        let mut ends = vec![f32::NEG_INFINITY, -1e30, -88.0, 89.0, f32::INFINITY, 0.5];
        let total = exp_shifted(&mut ends, 0.0);
        assert_eq!(&ends[..5], &[0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        assert!(ulps(ends[5], 0.5f32.exp()) <= 2);
        assert!(total.is_infinite());
        assert_eq!(exp_scalar(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_scalar(100.0), f32::INFINITY);
    }

    #[test]
    fn softmax_dot_axpy_and_max_match_plain_loops() {
        // Lengths around the vector widths, tails included.
        for n in [1usize, 7, 8, 9, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "dot n={n}");
            let mut y = b.clone();
            axpy(&mut y, 0.25, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.25 * a[i])).abs() < 1e-6, "axpy n={n}");
            }
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&a), m, "max n={n}");
            let mut s = a.clone();
            softmax(&mut s);
            let z: f64 = a.iter().map(|v| ((v - m) as f64).exp()).sum();
            for i in 0..n {
                let p = ((a[i] - m) as f64).exp() / z;
                assert!((s[i] as f64 - p).abs() < 1e-6, "softmax n={n} i={i}");
            }
            let mut sg = vec![0f32; n];
            sigmoid(&a, &mut sg);
            for i in 0..n {
                let want = 1.0 / (1.0 + (-a[i] as f64).exp());
                assert!((sg[i] as f64 - want).abs() < 1e-6, "sigmoid n={n} i={i}");
            }
            let lse: f64 = m as f64 + a.iter().map(|v| ((v - m) as f64).exp()).sum::<f64>().ln();
            assert!(
                (log_sum_exp(&a) as f64 - lse).abs() < 1e-5,
                "log_sum_exp n={n}"
            );
            let mut g = a.clone();
            silu_mul(&mut g, &b);
            for i in 0..n {
                let want = a[i] as f64 / (1.0 + (-a[i] as f64).exp()) * b[i] as f64;
                assert!((g[i] as f64 - want).abs() < 1e-6, "silu_mul n={n} i={i}");
            }
        }
        // Attention pieces, for head sizes on and off the specialised ones.
        for d in [8usize, 24, 64, 128, 136, 5] {
            let keys = 37;
            let q: Vec<f32> = (0..d).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.1).collect();
            let kv: Vec<f32> = (0..keys * d)
                .map(|i| ((i * 11 % 13) as f32 - 6.0) * 0.05)
                .collect();
            let mask: Vec<f32> = (0..keys)
                .map(|j| if j % 5 == 4 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let mut sc = vec![0f32; keys];
            scores(&q, &kv, 0.125, &mask, &mut sc);
            for j in 0..keys {
                let want = dot(&q, &kv[j * d..(j + 1) * d]) * 0.125 + mask[j];
                assert!(
                    sc[j] == want || (sc[j] - want).abs() < 1e-5,
                    "scores d={d} j={j}"
                );
            }
            let w: Vec<f32> = (0..keys).map(|j| j as f32 * 0.01).collect();
            let mut out = vec![f32::NAN; d];
            weighted_sum(&w, &kv, &mut out);
            for c in 0..d {
                let want: f32 = (0..keys).map(|j| w[j] * kv[j * d + c]).sum();
                assert!((out[c] - want).abs() < 1e-5, "weighted_sum d={d} c={c}");
            }
        }
        // A masked key (negative infinity) gets exactly zero weight.
        let mut s = vec![0.0, f32::NEG_INFINITY, 1.0];
        softmax(&mut s);
        assert_eq!(s[1], 0.0);
    }
}
