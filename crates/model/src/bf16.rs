//! bf16 matrix products: both operands rounded to bf16 (round-to-nearest-even, subnormals
//! flushed to zero), products summed in f32, the result f32. Used by training (`tune --bf16`,
//! through `safetune_train::ops::bf16`, which packs both operands per product) and by
//! generation (`--bf16`, [`Bf16Matrix`]: a linear layer's weight rounded and packed once at
//! load, the activations packed per call).
//!
//! Kernels:
//! - [`Bf16Kernel::Amx`]: Intel AMX-BF16 (`tdpbf16ps` on 16x16 f32 tiles, 32 bf16 per dot
//!   product), written with `asm!` (the AMX intrinsics are not stable in Rust). Needs the
//!   `amx-bf16` and `amx-tile` CPUID bits and the kernel's permission for the tile data
//!   (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once per process).
//! - [`Bf16Kernel::Emulated`]: portable code with the same rounding and f32 accumulation; the
//!   reference the AMX kernel is tested against, and the path on every other CPU in tests
//!   ([`set_emulated`]).
//!
//! AVX512-BF16's `vdpbf16ps` was measured first on the development machine (an Intel Xeon with
//! AVX-512 and AMX): 107 GFLOP/s on one core against 215 for AVX-512 f32 FMA, so a product built on
//! it is slower than the f32 one there; AMX reached about 3,100 GFLOP/s in the same test. That is
//! why the fast kernel is AMX and `--bf16` requires it.
//!
//! Both kernels share one packed layout: the left operand (m, k) as bf16 rows (k padded to a
//! multiple of 32, m to a multiple of 32), the right operand (k, n) in panels of 16 columns,
//! each panel (k/2) rows of 16 pairs `(b[2p][j], b[2p+1][j])` (the pair-interleaved layout
//! the dot-product instructions read), n padded to a multiple of 32. Packing costs O(mk + kn)
//! against the product's O(mkn).
//!
//! Work is split into tasks of up to 128 rows and 256 columns; with few rows (decoding: 1 to 32)
//! the columns are split finer so that every thread gets several tasks, and such small products
//! run on [`crate::pool`] (whose workers stay awake between the many short regions of a decode
//! step) instead of rayon's pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::isa::{self, Isa, MatRef};

/// Rounds f32 to bf16 (round to nearest, ties to even); subnormals become signed zero, a NaN
/// stays a (quiet) NaN. Returns the bf16 bits.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    (round_bits(x.to_bits()) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16, as f32 (the value a bf16 product uses in place of `x`).
#[inline(always)]
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(round_bits(x.to_bits()))
}

/// [`f32_to_bf16`] on the bits, the result in the upper half (the lower half zero).
#[inline(always)]
fn round_bits(b: u32) -> u32 {
    let exp = b & 0x7f80_0000;
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let special = if b & 0x007f_ffff != 0 {
        (b | 0x0040_0000) & 0xffff_0000
    } else {
        b & 0xffff_0000
    };
    if exp == 0 {
        b & 0x8000_0000
    } else if exp == 0x7f80_0000 {
        special
    } else {
        rounded
    }
}

/// [`round_bits`] without branches, so that loops over it vectorize: the same bits for every
/// input (tested).
#[inline(always)]
fn round_bits_select(b: u32) -> u32 {
    let exp = b & 0x7f80_0000;
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let v = if nan {
        (b | 0x0040_0000) & 0xffff_0000
    } else {
        rounded
    };
    if exp == 0 {
        b & 0x8000_0000
    } else {
        v
    }
}

/// `dst[i] = f32_to_bf16(src[i])`, vectorized where the CPU has AVX-512.
fn convert_row(dst: &mut [u16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { convert_row_avx512(dst, src) };
    }
    convert_row_portable(dst, src)
}

#[inline(always)]
fn convert_row_portable(dst: &mut [u16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (round_bits_select(s.to_bits()) >> 16) as u16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_row_avx512(dst: &mut [u16], src: &[f32]) {
    convert_row_portable(dst, src)
}

/// Pair-interleaves two rows: `dst[j] = bf16(lo[j]) | bf16(hi[j]) << 16` (a zero where a row is
/// shorter than `dst`), vectorized where the CPU has AVX-512.
fn convert_pairs(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { convert_pairs_avx512(dst, lo, hi) };
    }
    convert_pairs_portable(dst, lo, hi)
}

#[inline(always)]
fn convert_pairs_portable(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    if lo.len() == dst.len() && hi.len() == dst.len() {
        for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
            *d = (round_bits_select(l.to_bits()) >> 16) | round_bits_select(h.to_bits());
        }
    } else {
        for (j, d) in dst.iter_mut().enumerate() {
            let l = lo
                .get(j)
                .map_or(0, |v| round_bits_select(v.to_bits()) >> 16);
            let h = hi.get(j).map_or(0, |v| round_bits_select(v.to_bits()));
            *d = l | h;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_pairs_avx512(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    convert_pairs_portable(dst, lo, hi)
}

/// Which bf16 kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// Intel AMX-BF16 tiles.
    Amx,
    /// Portable emulation (same rounding, f32 sums).
    Emulated,
}

/// Whether this CPU and OS can run the AMX kernel (checked once: the CPUID bits, then the
/// kernel's permission to use the tile data, asked for the whole process).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(amx_probe)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_probe() -> bool {
    // CPUID leaf 7, subleaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): 0 when granted.
    let ret: i64;
    // SAFETY: a plain Linux system call that only changes this process's permitted xstate
    // features; rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") 0x1023i64,
            in("rsi") 18i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_probe() -> bool {
    false
}

/// Why bf16 products cannot run here when the matrix kernels use `chosen`, or `None` when they
/// can: they need AMX-BF16 (with the OS's permission), and an ISA forced below AVX-512 (with
/// [`isa::ISA_ENV`], or the training crate's override) rules them out. Every message names
/// AMX-BF16.
pub fn bf16_unavailable_on(chosen: Isa) -> Option<String> {
    if !amx_available() {
        return Some(
            "--bf16 needs a CPU with AMX-BF16 (the tdpbf16ps instruction, with the OS's \
             permission to use the AMX tiles); this CPU or OS lacks it"
                .to_string(),
        );
    }
    if chosen != Isa::Avx512f {
        return Some(format!(
            "--bf16 needs AMX-BF16 and the AVX-512 kernels, but {}={} chose {}",
            isa::ISA_ENV,
            std::env::var(isa::ISA_ENV).unwrap_or_default(),
            chosen.name()
        ));
    }
    None
}

/// [`bf16_unavailable_on`] the ISA the environment chooses ([`isa::env_isa`]): the check
/// `--bf16` generation makes before a model loads.
pub fn bf16_unavailable() -> Option<String> {
    bf16_unavailable_on(isa::env_isa())
}

static EMULATED: AtomicBool = AtomicBool::new(false);

/// For tests on CPUs without AMX-BF16 (process-wide): bf16 products run on the portable
/// [`Bf16Kernel::Emulated`] kernel (same rounding, f32 sums, far slower), and the checks for
/// AMX (`safetune_train::ops::set_bf16`, loading a model with bf16 weights) are skipped.
pub fn set_emulated(on: bool) {
    EMULATED.store(on, Ordering::Relaxed);
}

/// The kernel bf16 products run on now.
pub fn kernel() -> Bf16Kernel {
    if EMULATED.load(Ordering::Relaxed) {
        Bf16Kernel::Emulated
    } else {
        Bf16Kernel::Amx
    }
}

/// Rows and columns of the output block one AMX step computes (2 x 2 tiles of 16 x 16).
const BLOCK: usize = 32;
/// bf16 values of k per tile step.
const KB: usize = 32;
/// Output rows and columns one task computes at most (its packed operands stay in L2).
const TASK_M: usize = 128;
const TASK_N: usize = 256;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The left operand packed: (mp, kp) bf16, row-major, zero-padded.
pub struct PackedA {
    data: Vec<u16>,
    mp: usize,
    kp: usize,
}

/// The right operand packed: `np / 16` panels of `kp / 2` rows of 16 pairs.
pub struct PackedB {
    data: Vec<u32>,
    np: usize,
    kp: usize,
}

impl PackedB {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Element (p, j) of the packed (k, n) operand, as f32 (zero in the padding).
    fn get(&self, p: usize, j: usize) -> f32 {
        let pair = self.data[(j / 16) * (self.kp / 2) * 16 + (p / 2) * 16 + j % 16];
        bf16_to_f32((pair >> (16 * (p % 2))) as u16)
    }
}

/// Rows of the left operand one packing task converts; a strided view is read in blocks of
/// `PACK_ROWS` rows by `PACK_COLS` columns, so every cache line read and written is used whole.
const PACK_ROWS: usize = 16;
const PACK_COLS: usize = 64;

/// Packs a (m, k) view into bf16 rows.
///
/// # Safety
/// `a` must be valid for reads of (m, k).
pub unsafe fn pack_a(m: usize, k: usize, a: MatRef) -> PackedA {
    let (mp, kp) = (round_up(m.max(1), BLOCK), round_up(k.max(1), KB));
    let mut data = vec![0u16; mp * kp];
    let ptr = a.ptr as usize;
    // Rows i0.. of `a` into `rows` (whole packed rows of kp values each).
    let pack_rows = |(t, rows): (usize, &mut [u16])| {
        let base = ptr as *const f32;
        let i0 = t * PACK_ROWS;
        let nr = m.saturating_sub(i0).min(rows.len() / kp);
        if nr == 0 {
            return;
        }
        if a.cs == 1 {
            for (r, row) in rows.chunks_mut(kp).take(nr).enumerate() {
                // SAFETY: row i0 + r of a covers k contiguous values (caller's guarantee).
                let src =
                    unsafe { std::slice::from_raw_parts(base.offset((i0 + r) as isize * a.rs), k) };
                convert_row(&mut row[..k], src);
            }
            return;
        }
        // Strided (a transposed matrix): column by column inside blocks of PACK_COLS columns;
        // with rows contiguous down a column, a column's nr values convert together.
        let mut col_bf = [0u16; PACK_ROWS];
        for p0 in (0..k).step_by(PACK_COLS) {
            for p in p0..(p0 + PACK_COLS).min(k) {
                // SAFETY: (i0 + r, p) lies inside the (m, k) view for r < nr.
                let col = unsafe { base.offset(i0 as isize * a.rs + p as isize * a.cs) };
                if a.rs == 1 {
                    // SAFETY: as above, the nr values are contiguous.
                    let src = unsafe { std::slice::from_raw_parts(col, nr) };
                    convert_row(&mut col_bf[..nr], src);
                    for (r, &v) in col_bf[..nr].iter().enumerate() {
                        rows[r * kp + p] = v;
                    }
                } else {
                    for r in 0..nr {
                        rows[r * kp + p] = f32_to_bf16(unsafe { *col.offset(r as isize * a.rs) });
                    }
                }
            }
        }
    };
    if m <= BLOCK {
        // Decoding: a few rows, not worth waking rayon's threads.
        data.chunks_mut(PACK_ROWS * kp)
            .enumerate()
            .for_each(pack_rows);
    } else {
        data.par_chunks_mut(PACK_ROWS * kp)
            .enumerate()
            .for_each(pack_rows);
    }
    PackedA { data, mp, kp }
}

/// Packs a (k, n) view into pair-interleaved panels of 16 columns.
///
/// # Safety
/// `b` must be valid for reads of (k, n).
pub unsafe fn pack_b(k: usize, n: usize, b: MatRef) -> PackedB {
    let (np, kp) = (round_up(n.max(1), BLOCK), round_up(k.max(1), KB));
    let rows = kp / 2;
    let mut data = vec![0u32; np * rows];
    let ptr = b.ptr as usize;
    data.par_chunks_mut(rows * 16)
        .enumerate()
        .for_each(|(q, panel)| {
            let base = ptr as *const f32;
            let cols = n.saturating_sub(q * 16).min(16);
            if cols == 0 {
                return;
            }
            // SAFETY (both closures): (r, j) lies inside the (k, n) view for r < k, j < n.
            let at = |r: usize, j: usize| -> u32 {
                if r >= k {
                    return 0;
                }
                let v = unsafe { *base.offset(r as isize * b.rs + (q * 16 + j) as isize * b.cs) };
                round_bits(v.to_bits())
            };
            let pairs = k.div_ceil(2);
            if b.rs == 1 {
                // Columns contiguous in memory (a transposed row-major matrix): each column's
                // values convert together, a block of PACK_COLS pair rows at a time (so the
                // block's part of the panel stays in L1 while its 16 columns are written).
                let mut pair_bf = [0u32; PACK_COLS];
                for p0 in (0..pairs).step_by(PACK_COLS) {
                    let np_ = (p0 + PACK_COLS).min(pairs) - p0;
                    for j in 0..cols {
                        for (t, d) in pair_bf[..np_].iter_mut().enumerate() {
                            let p = p0 + t;
                            *d = (at(2 * p, j) >> 16) | at(2 * p + 1, j);
                        }
                        for (t, &v) in pair_bf[..np_].iter().enumerate() {
                            panel[(p0 + t) * 16 + j] = v;
                        }
                    }
                }
            } else if b.cs == 1 {
                for p in 0..pairs {
                    // SAFETY: rows 2p and 2p + 1 (when below k) cover the panel's cols values.
                    let row = |r: usize| -> &[f32] {
                        if r >= k {
                            return &[];
                        }
                        unsafe {
                            std::slice::from_raw_parts(
                                base.offset(r as isize * b.rs + (q * 16) as isize),
                                cols,
                            )
                        }
                    };
                    convert_pairs(
                        &mut panel[p * 16..p * 16 + cols],
                        row(2 * p),
                        row(2 * p + 1),
                    );
                }
            } else {
                for p in 0..pairs {
                    let row = &mut panel[p * 16..p * 16 + cols];
                    for (j, d) in row.iter_mut().enumerate() {
                        *d = (at(2 * p, j) >> 16) | at(2 * p + 1, j);
                    }
                }
            }
        });
    PackedB { data, np, kp }
}

/// `dst (m, n) = (accumulate ? dst : 0) + scale * a (m, k) @ b (k, n)` with bf16 operands and
/// f32 sums, on `kernel`. dst is row-major with row stride `dst_rs`.
///
/// # Safety
/// `dst` valid for writes of the (m, n) block at row stride `dst_rs`, `a` and `b` valid for
/// reads of (m, k) and (k, n) at their strides; for [`Bf16Kernel::Amx`], [`amx_available`]
/// must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_bf16(
    kernel: Bf16Kernel,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's guarantees.
    let (pa, pb) = unsafe { (pack_a(m, k, a), pack_b(k, n, b)) };
    // SAFETY: as above.
    unsafe { matmul_packed(kernel, (m, n), dst, dst_rs, accumulate, &pa, &pb, scale) }
}

/// The product of two packed operands into dst (m, n) (m, n at most the packed sizes, and the
/// packed k equal).
///
/// # Safety
/// dst valid for writes of (m, n) at row stride `dst_rs`; for [`Bf16Kernel::Amx`],
/// [`amx_available`] must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_packed(
    kernel: Bf16Kernel,
    (m, n): (usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    pa: &PackedA,
    pb: &PackedB,
    scale: f32,
) {
    assert!(
        pa.kp == pb.kp && m <= pa.mp && n <= pb.np,
        "bf16 matmul: packed shapes"
    );
    if kernel == Bf16Kernel::Amx {
        assert!(amx_available(), "bf16 matmul: this CPU lacks AMX-BF16");
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let tasks_m = m.div_ceil(TASK_M);
    // Few row blocks (decoding): narrower column tasks, at least four per thread.
    let want_n = (4 * threads).div_ceil(tasks_m);
    let task_n = round_up(n.div_ceil(want_n), BLOCK).clamp(BLOCK, TASK_N);
    let tasks_n = n.div_ceil(task_n);
    let dst = dst as usize;
    let task = |t: usize| {
        let (ti, tj) = (t / tasks_n, t % tasks_n);
        let (i0, j0) = (ti * TASK_M, tj * task_n);
        let (i1, j1) = ((i0 + TASK_M).min(m), (j0 + task_n).min(n));
        let mut c = [0f32; BLOCK * BLOCK];
        #[cfg(target_arch = "x86_64")]
        if kernel == Bf16Kernel::Amx {
            // SAFETY: AMX checked above.
            unsafe { amx::configure() };
        }
        for i in (i0..i1).step_by(BLOCK) {
            let rows = (m - i).min(BLOCK);
            for j in (j0..j1).step_by(BLOCK) {
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the block lies inside the padded operands; tiles configured.
                    Bf16Kernel::Amx => unsafe { amx::block(pa, pb, i, j, rows <= 16, &mut c) },
                    #[cfg(not(target_arch = "x86_64"))]
                    Bf16Kernel::Amx => unreachable!(),
                    Bf16Kernel::Emulated => emulated_block(pa, pb, i, j, rows, &mut c),
                }
                let cols = (n - j).min(BLOCK);
                for r in 0..rows {
                    // SAFETY: row i + r, columns j..j + cols lie inside dst (caller); tasks
                    // write disjoint blocks.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            (dst as *mut f32).offset((i + r) as isize * dst_rs + j as isize),
                            cols,
                        )
                    };
                    let src = &c[r * BLOCK..r * BLOCK + cols];
                    if accumulate {
                        out.iter_mut().zip(src).for_each(|(o, s)| *o += scale * s);
                    } else {
                        out.iter_mut().zip(src).for_each(|(o, s)| *o = scale * s);
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == Bf16Kernel::Amx {
            // SAFETY: releases the tiles this task configured.
            unsafe { amx::release() };
        }
    };
    let tasks = tasks_m * tasks_n;
    if m <= BLOCK {
        crate::pool::par_chunks(tasks, |range| range.for_each(&task));
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// The portable kernel: the first `rows` rows of the (32, 32) block at (i, j), each output a
/// sum in f32 of the pairs' products, pair by pair in k order.
fn emulated_block(
    pa: &PackedA,
    pb: &PackedB,
    i: usize,
    j: usize,
    rows: usize,
    c: &mut [f32; BLOCK * BLOCK],
) {
    let pairs = pa.kp / 2;
    for r in 0..rows {
        let arow = &pa.data[(i + r) * pa.kp..(i + r + 1) * pa.kp];
        for col in 0..BLOCK {
            let (q, jj) = ((j + col) / 16, (j + col) % 16);
            let panel = &pb.data[q * pairs * 16..(q + 1) * pairs * 16];
            let mut acc = 0f32;
            for p in 0..pairs {
                let pair = panel[p * 16 + jj];
                acc += bf16_to_f32(arow[2 * p]) * bf16_to_f32(pair as u16);
                acc += bf16_to_f32(arow[2 * p + 1]) * bf16_to_f32((pair >> 16) as u16);
            }
            c[r * BLOCK + col] = acc;
        }
    }
}

/// A linear layer's (out, in) weight for generation: rounded to bf16 and packed once as the
/// right operand of `x W^T` (k = in, n = out), 2 bytes per weight. [`Bf16Matrix::matmul`] packs
/// the activations per call and runs [`kernel`].
pub struct Bf16Matrix {
    packed: PackedB,
    out_dim: usize,
    in_dim: usize,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Matrix")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .finish()
    }
}

impl Bf16Matrix {
    /// Rounds and packs a row-major (out, in) weight.
    pub fn from_rows(w: &[f32], out_dim: usize, in_dim: usize) -> Bf16Matrix {
        assert_eq!(w.len(), out_dim * in_dim, "bf16 weight: shape");
        // W^T as a (in, out) view: element (p, j) = w[j * in + p].
        let view = MatRef {
            ptr: w.as_ptr(),
            rs: 1,
            cs: in_dim as isize,
        };
        // SAFETY: the view covers w, checked above.
        let packed = unsafe { pack_b(in_dim, out_dim, view) };
        Bf16Matrix {
            packed,
            out_dim,
            in_dim,
        }
    }

    /// Rounds and packs an (out, in) f32 tensor.
    pub fn from_tensor(w: &candle_core::Tensor) -> candle_core::Result<Bf16Matrix> {
        let (out_dim, in_dim) = w.dims2()?;
        let v = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Bf16Matrix::from_rows(&v, out_dim, in_dim))
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes the packed weight holds (2 per value, padding included).
    pub fn bytes(&self) -> usize {
        self.packed.bytes()
    }

    /// The weight's bf16 values as a row-major (out, in) f32 vector.
    pub fn to_rows(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for (j, row) in w.chunks_exact_mut(self.in_dim.max(1)).enumerate() {
            for (p, v) in row.iter_mut().enumerate() {
                *v = self.packed.get(p, j);
            }
        }
        w
    }

    /// The weight's bf16 values as an (out, in) f32 tensor.
    pub fn to_tensor(&self) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(
            self.to_rows(),
            (self.out_dim, self.in_dim),
            &candle_core::Device::Cpu,
        )
    }

    /// `x W^T` for `rows` rows of `in_dim` values (row-major) on [`kernel`]: `rows` rows of
    /// `out_dim` values. An error where the kernel is AMX and this CPU lacks it.
    pub fn matmul(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let kernel = kernel();
        if kernel == Bf16Kernel::Amx && !amx_available() {
            candle_core::bail!(
                "bf16 weights need a CPU with AMX-BF16 (tdpbf16ps); this CPU or OS lacks it"
            );
        }
        Ok(self.matmul_with(kernel, x, rows))
    }

    /// [`Bf16Matrix::matmul`] on the given kernel. Panics where `kernel` is AMX and
    /// [`amx_available`] is false, or when `x` does not hold `rows` rows.
    pub fn matmul_with(&self, kernel: Bf16Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "bf16 matmul: input shape");
        let mut out = vec![0f32; rows * self.out_dim];
        if rows == 0 || self.out_dim == 0 {
            return out;
        }
        let view = MatRef {
            ptr: x.as_ptr(),
            rs: self.in_dim as isize,
            cs: 1,
        };
        // SAFETY: the view covers x (checked above); out holds (rows, out_dim); matmul_packed
        // checks AMX itself.
        unsafe {
            let pa = pack_a(rows, self.in_dim, view);
            matmul_packed(
                kernel,
                (rows, self.out_dim),
                out.as_mut_ptr(),
                self.out_dim as isize,
                false,
                &pa,
                &self.packed,
                1.0,
            );
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{PackedA, PackedB, BLOCK, KB};

    /// The tile configuration: palette 1; tiles 0-3 the f32 output (16 rows of 64 bytes),
    /// 4-5 the left operand (16 rows of 32 bf16), 6-7 the right (16 rows of 16 pairs).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The CPU must have AMX and the process the permission ([`super::amx_available`]).
    pub(super) unsafe fn configure() {
        // SAFETY: CONFIG is a valid palette-1 configuration, 64-byte aligned.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
    }

    /// Releases the tiles on this thread.
    ///
    /// # Safety
    /// As [`configure`].
    pub(super) unsafe fn release() {
        // SAFETY: tilerelease only resets the tile state.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }

    /// The (32, 32) f32 block at rows i, columns j of the product, into c (row-major); with
    /// `half`, only its first 16 rows (c's other rows are left as they were).
    ///
    /// # Safety
    /// Tiles configured ([`configure`]); i + 32 and j + 32 within the padded operands.
    pub(super) unsafe fn block(
        pa: &PackedA,
        pb: &PackedB,
        i: usize,
        j: usize,
        half: bool,
        c: &mut [f32; 1024],
    ) {
        let a_stride = pa.kp * 2;
        let rows = pa.kp / 2;
        let a0 = pa.data[i * pa.kp..].as_ptr();
        let a1 = pa.data[(i + 16) * pa.kp..].as_ptr();
        let b0 = pb.data[(j / 16) * rows * 16..].as_ptr();
        let b1 = pb.data[(j / 16 + 1) * rows * 16..].as_ptr();
        let cp = c.as_mut_ptr();
        // SAFETY: every tile load reads 16 rows of 64 bytes inside the packed operands (the
        // left one padded to a multiple of 32 rows and of KB columns, the right one to whole
        // panels of kp / 2 rows); the stores write the 32 x 32 block of c (its first 16 rows
        // with `half`).
        unsafe {
            if half {
                // At most 16 rows (decoding): the lower row tile would multiply padding.
                std::arch::asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                for kb in 0..pa.kp / KB {
                    std::arch::asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        a0 = in(reg) a0.add(kb * KB),
                        b0 = in(reg) b0.add(kb * KB / 2 * 16),
                        b1 = in(reg) b1.add(kb * KB / 2 * 16),
                        sa = in(reg) a_stride,
                        sb = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                std::arch::asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    c0 = in(reg) cp,
                    c1 = in(reg) cp.add(16),
                    s = in(reg) BLOCK * 4,
                    options(nostack)
                );
                return;
            }
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for kb in 0..pa.kp / KB {
                std::arch::asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(kb * KB),
                    a1 = in(reg) a1.add(kb * KB),
                    b0 = in(reg) b0.add(kb * KB / 2 * 16),
                    b1 = in(reg) b1.add(kb * KB / 2 * 16),
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
            std::arch::asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) cp,
                c1 = in(reg) cp.add(16),
                c2 = in(reg) cp.add(16 * BLOCK),
                c3 = in(reg) cp.add(16 * BLOCK + 16),
                s = in(reg) BLOCK * 4,
                options(nostack)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values uniform in [-1, 1).
    use crate::testing::uniform_values as values;

    #[test]
    fn rounding_is_nearest_even_and_flushes_subnormals() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (down to 1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway too: ties to even (up to 1 + 2^-6... the odd neighbour).
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        // Just above halfway rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(-2.5), 0xc020);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds to infinity
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_bf16(-f32::from_bits(0x0040_0000)), 0x8000);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(bf16_to_f32(0x3f81), 1.0078125);
    }

    /// The branch-free rounding and the row converters give the bits of [`f32_to_bf16`] on
    /// every special class and on random values.
    #[test]
    fn vector_rounding_matches_the_scalar_one() {
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::from_bits(0x3f80_8001),
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_8000),
            f32::from_bits(1),
            -f32::from_bits(0x0040_0000),
            f32::MIN_POSITIVE,
        ];
        x.extend(values(1000, 11).iter().map(|v| v * 1e3));
        x.extend((0..1000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        let want: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        for &v in &x {
            assert_eq!(
                round_bits_select(v.to_bits()),
                round_bits(v.to_bits()),
                "{v:e}"
            );
        }
        let mut got = vec![0u16; x.len()];
        convert_row(&mut got, &x);
        assert_eq!(got, want);
        let (lo, hi) = x.split_at(x.len() / 2);
        let mut pairs = vec![0u32; hi.len()];
        convert_pairs(&mut pairs, lo, hi);
        for (j, &p) in pairs.iter().enumerate() {
            let l = lo.get(j).map_or(0, |&v| f32_to_bf16(v));
            assert_eq!(p, l as u32 | (f32_to_bf16(hi[j]) as u32) << 16);
        }
    }

    /// The product with bf16-rounded operands, in f64.
    fn want(a: &[f32], b: &[f32], (n, k): (usize, usize), i: usize, j: usize) -> f64 {
        (0..k)
            .map(|p| {
                bf16_to_f32(f32_to_bf16(a[i * k + p])) as f64
                    * bf16_to_f32(f32_to_bf16(b[p * n + j])) as f64
            })
            .sum::<f64>()
    }

    fn run(
        kernel: Bf16Kernel,
        a: &[f32],
        bt: bool,
        b: &[f32],
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
        old: &[f32],
    ) -> Vec<f32> {
        let mut dst = old.to_vec();
        let bref = if bt {
            // b given as (n, k) row-major, read transposed.
            MatRef {
                ptr: b.as_ptr(),
                rs: 1,
                cs: k as isize,
            }
        } else {
            MatRef {
                ptr: b.as_ptr(),
                rs: n as isize,
                cs: 1,
            }
        };
        // SAFETY: operands cover the shapes; AMX is only asked for when available.
        unsafe {
            matmul_bf16(
                kernel,
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
                0.5,
            )
        };
        dst
    }

    fn transpose(b: &[f32], k: usize, n: usize) -> Vec<f32> {
        let mut t = vec![0f32; n * k];
        for p in 0..k {
            for j in 0..n {
                t[j * k + p] = b[p * n + j];
            }
        }
        t
    }

    /// Both kernels (the AMX one where the CPU has it) against the f64 product of the rounded
    /// operands, on shapes that are not multiples of the blocks, with both layouts of b and
    /// accumulation. The tolerance is f32 summation error, far below bf16 rounding: an f32
    /// product (unrounded operands) fails it.
    #[test]
    fn kernels_match_the_rounded_product() {
        let mut kernels = vec![Bf16Kernel::Emulated];
        if amx_available() {
            kernels.push(Bf16Kernel::Amx);
        } else {
            eprintln!("could not test the AMX-BF16 kernel: this CPU or OS lacks it (tested the emulation only)");
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (33, 17, 65),
            (40, 290, 129),
            (150, 47, 31),
            (7, 300, 600),
            (1, 700, 96),
            (17, 90, 40),
        ] {
            let a = values(m * k, 1 + m as u64);
            let b = values(k * n, 2 + n as u64);
            let old = values(m * n, 3);
            for &kernel in &kernels {
                for (bt, accumulate) in [(false, false), (true, true)] {
                    let bb = if bt { transpose(&b, k, n) } else { b.clone() };
                    let got = run(kernel, &a, bt, &bb, (m, n, k), accumulate, &old);
                    let mut f32_differs = false;
                    for i in 0..m {
                        for j in 0..n {
                            let w = want(&a, &b, (n, k), i, j);
                            let base = if accumulate {
                                old[i * n + j] as f64
                            } else {
                                0.0
                            };
                            let w = base + 0.5 * w;
                            let g = got[i * n + j] as f64;
                            let tol = 2e-6 * (k as f64).sqrt() + 1e-6;
                            assert!(
                                (g - w).abs() <= tol,
                                "{kernel:?} ({m},{n},{k}) bt {bt}: [{i},{j}] {g} vs {w}"
                            );
                            let exact: f64 = (0..k)
                                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                                .sum();
                            if (base + 0.5 * exact - w).abs() > 10.0 * tol {
                                f32_differs = true;
                            }
                        }
                    }
                    // The operands really were rounded (except on shapes too small to tell).
                    if k >= 31 {
                        assert!(
                            f32_differs,
                            "{kernel:?} ({m},{n},{k}): indistinguishable from f32"
                        );
                    }
                }
            }
        }
    }

    /// Small integers make every sum exact, so each kernel must give the exact product bit for
    /// bit: this checks the packed layout and (for AMX) the tile layout and instruction
    /// encodings.
    #[test]
    fn kernels_are_exact_on_exact_sums() {
        let (m, n, k) = (37, 45, 70);
        let a: Vec<f32> = (0..m * k).map(|x| ((x * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|x| ((x * 5) % 13) as f32 - 6.0).collect();
        let exact: Vec<f32> = (0..m * n)
            .map(|x| (0..k).map(|p| a[(x / n) * k + p] * b[p * n + x % n]).sum())
            .collect();
        let old = vec![0f32; m * n];
        let mut kernels = vec![Bf16Kernel::Emulated];
        if amx_available() {
            kernels.push(Bf16Kernel::Amx);
        } else {
            eprintln!("could not test the AMX-BF16 kernel: this CPU or OS lacks it (tested the emulation only)");
        }
        for kernel in kernels {
            let got = run(kernel, &a, false, &b, (m, n, k), false, &old);
            let want: Vec<f32> = exact.iter().map(|v| 0.5 * v).collect();
            assert_eq!(got, want, "{kernel:?}");
        }
        assert!(exact.iter().any(|&v| v != 0.0));
    }

    /// A strided view (a transposed matrix) packs to exactly what its row-major copy packs to,
    /// for either operand, on shapes that are not multiples of the packing blocks.
    #[test]
    fn strided_views_pack_like_their_row_major_copies() {
        for &(r, c) in &[(1, 1), (5, 3), (17, 70), (33, 129), (100, 15), (40, 300)] {
            let x = values(r * c, 4 + r as u64);
            let xt = transpose(&x, r, c); // (c, r) row-major
            let rows = MatRef {
                ptr: x.as_ptr(),
                rs: c as isize,
                cs: 1,
            };
            let strided = MatRef {
                ptr: xt.as_ptr(),
                rs: 1,
                cs: r as isize,
            };
            // SAFETY: both views cover (r, c).
            let (a1, a2) = unsafe { (pack_a(r, c, rows), pack_a(r, c, strided)) };
            assert_eq!((a1.mp, a1.kp), (a2.mp, a2.kp));
            assert!(a1.data == a2.data, "pack_a ({r}, {c})");
            // SAFETY: as above, read as the (k, n) right operand.
            let (b1, b2) = unsafe { (pack_b(r, c, rows), pack_b(r, c, strided)) };
            assert_eq!((b1.np, b1.kp), (b2.np, b2.kp));
            assert!(b1.data == b2.data, "pack_b ({r}, {c})");
            assert_eq!(b1.get(r - 1, c - 1), round_to_bf16(x[r * c - 1]));
        }
    }

    /// The packed weight of a generation layer gives back exactly its rounded values.
    #[test]
    fn a_packed_weight_unpacks_to_its_rounded_values() {
        let (out, inp) = (35, 70);
        let w = values(out * inp, 9);
        let m = Bf16Matrix::from_rows(&w, out, inp);
        let back = m.to_rows();
        let want: Vec<f32> = w.iter().map(|&x| round_to_bf16(x)).collect();
        assert_eq!(back, want);
        assert!(back.iter().zip(&w).any(|(a, b)| a != b));
        // 2 bytes per value, padded to whole 32 x 32 blocks.
        assert_eq!(m.bytes(), 64 * 96 * 2);
    }

    /// Forcing an ISA below AVX-512 rules bf16 out, and every refusal names AMX-BF16.
    #[test]
    fn refusals_name_what_is_missing() {
        let e = bf16_unavailable_on(Isa::Scalar).expect("scalar is refused");
        assert!(e.contains("--bf16") && e.contains("AMX-BF16"), "{e}");
        if amx_available() {
            assert!(e.contains("AVX-512") && e.contains("scalar"), "{e}");
            assert_eq!(bf16_unavailable_on(Isa::Avx512f), None);
        } else {
            assert!(e.contains("tdpbf16ps"), "{e}");
            assert!(bf16_unavailable_on(Isa::Avx512f).is_some());
        }
    }
}
