//! Which instruction set the training matrix products use, chosen at run time.
//!
//! Every f32 matrix product of training (the fused ops' products, and the dense linears of full
//! fine-tuning and of projections without an adapter) goes through [`matmul_with`], which runs
//! the gemm crate's blocked algorithm (`gemm_common::gemm::gemm_basic_generic`) with the
//! microkernel table of the chosen [`Isa`]: 16-wide AVX-512 kernels, 8-wide AVX2 + FMA kernels,
//! or portable scalar ones. The gemm crate's own entry point picks its kernels once per process
//! with no override, so this module holds our own choice:
//!
//! - [`set_isa`] (process-wide; benchmarks and tests), else
//! - the environment variable [`ISA_ENV`] (`SAFETUNE_ISA=auto|avx512|avx2|scalar`), read once,
//!   else
//! - the best the CPU has ([`Isa::detect`]).
//!
//! [`Isa`], the variable's parsing ([`parse_isa`], [`isa_from_env`]) and the operand view
//! [`MatRef`] live in `safetune_model::isa` (the model crate's bf16 kernels honour the same
//! variable) and are re-exported here. [`isa_from_env`] validates the variable (an unknown
//! value, or an ISA the CPU lacks, is an error naming the variable); `tune` calls it before
//! training.

use std::sync::atomic::{AtomicU8, Ordering};

pub use safetune_model::isa::{isa_from_env, parse_isa, Isa, MatRef, ISA_ENV};

/// 0: no override; else 1 + the index in [`Isa::ALL`].
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Forces `isa` for every later training matrix product (process-wide), or with `None` goes
/// back to the environment's choice. Panics if the CPU lacks it.
pub fn set_isa(isa: Option<Isa>) {
    if let Some(i) = isa {
        assert!(i.available(), "set_isa: this CPU lacks {}", i.name());
    }
    let code = isa.map_or(0, |i| {
        1 + Isa::ALL.iter().position(|&x| x == i).expect("in ALL") as u8
    });
    OVERRIDE.store(code, Ordering::Relaxed);
}

/// The ISA the training matrix products use now. An invalid [`ISA_ENV`] falls back to the best
/// available here (with one warning on stderr); `tune` rejects it before it gets this far.
pub fn isa() -> Isa {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => safetune_model::isa::env_isa(),
        c => Isa::ALL[c as usize - 1],
    }
}

/// The name of [`isa()`]: `avx512f`, `avx2+fma` or `scalar`.
pub fn isa_name() -> &'static str {
    isa().name()
}

/// `dst (m, n) = (accumulate ? dst : 0) + scale * a (m, k) @ b (k, n)` on `isa`, dst row-major
/// with row stride `dst_rs`; `parallel` splits the work over rayon's threads.
///
/// # Safety
/// `dst` must be valid for writes of the (m, n) block at row stride `dst_rs`, `a` and `b` valid
/// for reads of (m, k) and (k, n) at their strides, and `isa` available on this CPU.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_with(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    scale: f32,
    parallel: bool,
) {
    let par = if parallel {
        gemm_common::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm_common::Parallelism::None
    };
    // The gemm crate's arguments: dst, lhs and rhs as (pointer, column stride, row stride);
    // `alpha` scales the old dst (read only when `accumulate`), `beta` the product. Its
    // microkernels write column-major blocks, so the row-major dst (m, n) = a b is computed as
    // the column-major dst^T (n, m) = b^T a^T, the transpose the crate's own entry point makes
    // (without it a LoRA step ran about 1.5x slower, bench/README.md).
    if m == 0 || n == 0 {
        return;
    }
    macro_rules! run {
        ($simd:expr, $kern:path, $lanes:expr) => {{
            use $kern as kern;
            // SAFETY: the caller guarantees the operands and that the CPU has this ISA (the
            // SIMD token's construction checks the latter again).
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    { $lanes },
                    { kern::MR_DIV_N * $lanes },
                    { kern::NR },
                    { kern::MR_DIV_N },
                    { kern::H_M },
                    { kern::H_N },
                >(
                    $simd,
                    n,
                    m,
                    k,
                    dst,
                    dst_rs,
                    1,
                    accumulate,
                    b.ptr,
                    b.rs,
                    b.cs,
                    a.ptr,
                    a.rs,
                    a.cs,
                    1.0,
                    scale,
                    false,
                    false,
                    false,
                    |x, y, z| x * y + z,
                    &kern::UKR,
                    &kern::H_UKR,
                    false,
                    par,
                )
            }
        }};
    }
    use gemm_common::simd::MixedSimd;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512f => run!(
            <gemm_common::simd::V4 as MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("matmul: this CPU lacks avx512f"),
            gemm_f32::microkernel::avx512f::f32,
            16
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => run!(
            <gemm_common::simd::V3 as MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("matmul: this CPU lacks avx2+fma"),
            gemm_f32::microkernel::fma::f32,
            8
        ),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512f | Isa::Avx2Fma => panic!("matmul: {} needs x86_64", isa.name()),
        Isa::Scalar => run!(
            gemm_common::simd::Scalar,
            gemm_f32::microkernel::scalar::f32,
            1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values uniform in [-1, 1).
    use safetune_model::testing::uniform_values as values;

    /// Every ISA this CPU has against an f64 product, on shapes that hit the microkernels'
    /// edges, the matrix-vector paths and several cache blocks, with a transposed and a strided
    /// operand, accumulation and a scale. Says which ISAs it could not test.
    #[test]
    fn every_available_isa_computes_the_product() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (5, 1, 40),
            (1, 40, 5),
            (64, 64, 64),
            (100, 37, 130),
            (48, 200, 600),
        ];
        let mut tested = Vec::new();
        for isa in Isa::ALL {
            if !isa.available() {
                eprintln!("could not test {}: this CPU lacks it", isa.name());
                continue;
            }
            for &(m, n, k) in &shapes {
                for (accumulate, transposed, parallel) in [
                    (false, false, true),
                    (true, true, false),
                    (true, false, true),
                ] {
                    let a = values(m * k, 1 + m as u64);
                    // b is stored (n, k) and read transposed, or stored (k, n) with a row
                    // stride of n + 3.
                    let b_rs = if transposed { 1 } else { n + 3 };
                    let b = values(if transposed { n * k } else { k * b_rs }, 2 + n as u64);
                    let bref = MatRef {
                        ptr: b.as_ptr(),
                        rs: if transposed { 1 } else { b_rs as isize },
                        cs: if transposed { k as isize } else { 1 },
                    };
                    let at = |i: usize, j: usize| a[i * k + j] as f64;
                    let bt = |i: usize, j: usize| {
                        if transposed {
                            b[j * k + i] as f64
                        } else {
                            b[i * b_rs + j] as f64
                        }
                    };
                    let old = values(m * n, 3);
                    let mut dst = old.clone();
                    let scale = 0.5f32;
                    // SAFETY: the operands cover the stated shapes; the ISA is available.
                    unsafe {
                        matmul_with(
                            isa,
                            (m, n, k),
                            dst.as_mut_ptr(),
                            n as isize,
                            accumulate,
                            MatRef {
                                ptr: a.as_ptr(),
                                rs: k as isize,
                                cs: 1,
                            },
                            bref,
                            scale,
                            parallel,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                            let want = if accumulate {
                                old[i * n + j] as f64
                            } else {
                                0.0
                            } + scale as f64 * dot;
                            let got = dst[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6,
                                "{}: ({m}, {n}, {k}) accumulate {accumulate}: [{i}, {j}] {got} vs {want}",
                                isa.name()
                            );
                        }
                    }
                }
            }
            tested.push(isa.name());
        }
        eprintln!("tested: {}", tested.join(", "));
        assert!(tested.contains(&"scalar"));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(tested.contains(&"avx2+fma"));
        }
    }
}
