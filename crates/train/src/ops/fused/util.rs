//! Raw f32 access to CPU tensors and the matrix product of the fused ops (on the ISA that
//! [`crate::ops::isa`] chooses).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use crate::ops::{bf16, isa};

/// The contiguous f32 data a layout covers.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("fused op: expected f32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// All f32 data of a storage plus the layout's start offset and strides (for strided reads).
pub(crate) fn strided<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize, Vec<usize>)> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("fused op: expected f32, got {:?}", other.dtype()),
    };
    Ok((data, l.start_offset(), l.stride().to_vec()))
}

/// Runs `f` on a CPU f32 tensor's contiguous data (copying first if it is strided).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cpu) => Ok(f(slice(cpu, l)?)),
        _ => candle_core::bail!("fused op: expected a CPU tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of several CPU tensors at once (each copied first only if
/// it is strided), in the order given.
pub(crate) fn with_f32s<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(st, l)| match &**st {
            Storage::Cpu(cpu) => slice(cpu, l),
            _ => candle_core::bail!("fused op: expected a CPU tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(f(&data))
}

/// Runs `f` on a CPU f32 tensor's storage, start offset and strides (no copy).
pub(crate) fn with_strided<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], usize, &[usize]) -> R,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cpu) => {
            let (d, off, strides) = strided(cpu, l)?;
            Ok(f(d, off, &strides))
        }
        _ => candle_core::bail!("fused op: expected a CPU tensor"),
    }
}

/// A row-major-or-strided matrix view: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl From<Mat> for isa::MatRef {
    fn from(m: Mat) -> isa::MatRef {
        isa::MatRef {
            ptr: m.ptr,
            rs: m.rs,
            cs: m.cs,
        }
    }
}

impl Mat {
    /// Row-major (rows, cols) at the start of `s`.
    pub fn rm(s: &[f32], cols: usize) -> Mat {
        Mat {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major (rows, cols) matrix at the start of `s`.
    pub fn rm_t(s: &[f32], cols: usize) -> Mat {
        Mat {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
    pub fn t(self) -> Mat {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst (m, n), row-major with row stride `dst_rs` = (accumulate ? dst : 0) + scale * a (m, k) @ b (k, n).
///
/// Safety of the raw pointers: callers pass views that lie inside live slices of the stated
/// sizes; `dst` is exclusively borrowed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "matmul: dst too small");
    // SAFETY: dst covers (m, n) with row stride dst_rs (checked above); a and b are views into
    // live slices covering (m, k) and (k, n), guaranteed by the callers; `isa()` only returns an
    // ISA this CPU has.
    unsafe {
        isa::matmul_with(
            isa::isa(),
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs as isize,
            accumulate,
            a.into(),
            b.into(),
            scale,
            parallel,
        )
    }
}

/// [`matmul`] for the large products of the linears and the lm_head: in bf16 (operands rounded,
/// f32 sums, [`crate::ops::bf16`]) when [`bf16::bf16_enabled`], else exactly [`matmul`].
/// The small LoRA products (rank r on one side) stay on [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_big(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    parallel: bool,
) {
    if !bf16::bf16_enabled() || k < 32 {
        return matmul(m, n, k, dst, dst_rs, accumulate, a, b, scale, parallel);
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "matmul: dst too small");
    // SAFETY: as in `matmul`; `set_bf16` only switches bf16 on where AMX is available (or the
    // emulation is chosen).
    unsafe {
        bf16::matmul_bf16(
            bf16::kernel(),
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs as isize,
            accumulate,
            a.into(),
            b.into(),
            scale,
        )
    }
}

/// The right operand (k, n) of [`matmul_big`] packed once for bf16 (for a weight that several
/// products read, e.g. the lm_head's over the loss chunks), or `None` when bf16 is off.
pub(crate) fn pack_big(k: usize, n: usize, b: Mat) -> Option<bf16::PackedB> {
    // SAFETY: callers pass a view inside a live slice covering (k, n).
    (bf16::bf16_enabled() && k >= 32).then(|| unsafe { bf16::pack_b(k, n, b.into()) })
}

/// [`matmul_big`] with the right operand already packed by [`pack_big`] (`packed` from the
/// same b), else exactly [`matmul_big`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_big_packed(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    packed: Option<&bf16::PackedB>,
    scale: f32,
) {
    let Some(pb) = packed.filter(|_| bf16::bf16_enabled()) else {
        return matmul_big(m, n, k, dst, dst_rs, accumulate, a, b, scale, true);
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "matmul: dst too small");
    // SAFETY: as in `matmul_big`; `pb` packs b, whose (k, n) the caller guarantees.
    unsafe {
        let pa = bf16::pack_a(m, k, a.into());
        bf16::matmul_packed(
            bf16::kernel(),
            (m, n),
            dst.as_mut_ptr(),
            dst_rs as isize,
            accumulate,
            &pa,
            pb,
            scale,
        )
    }
}
