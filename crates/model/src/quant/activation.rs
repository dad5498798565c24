//! Activations quantized to 8 bits per 32-value block ([`XBlock`]), the kernels' right-hand side.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::BLOCK;

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

#[cfg(test)]
mod tests {
    use super::super::tests::rand_vec;
    use super::*;
    use crate::generate::Rng;

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
}
