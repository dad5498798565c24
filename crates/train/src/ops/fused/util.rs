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

/// Packed bf16 copies of frozen weights, so that a weight no step changes is rounded and packed
/// once per training run instead of once per product (twice a step: `W^T` for the forward pass,
/// `W` for the input gradient). Keyed by the weight tensor's id (candle never reuses one) and the
/// orientation. Only tensors that nothing tracks and that are contiguous are cached: their
/// `detach()` and `contiguous()` return the same tensor, so the id is stable from step to step.
/// The cache holds at most [`frozen_pack_budget`] bytes; beyond that, products pack per call as
/// before. [`clear_frozen_packs`] empties it (at the start and end of every training run).
struct FrozenPacks {
    map: std::collections::HashMap<(candle_core::TensorId, bool), std::sync::Arc<bf16::PackedB>>,
    bytes: usize,
    /// [`frozen_pack_budget`], read once when the cache is made.
    budget: usize,
}

/// Products that took a frozen weight from the cache, since the process started.
static FROZEN_PACK_HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

static FROZEN_PACKS: std::sync::Mutex<Option<FrozenPacks>> = std::sync::Mutex::new(None);

/// The environment variable that caps the frozen-weight cache of bf16 training, in MiB.
pub const FROZEN_PACK_BUDGET_ENV: &str = "SAFETUNE_BF16_WEIGHT_CACHE_MB";

/// The cache's cap in bytes: `SAFETUNE_BF16_WEIGHT_CACHE_MB` (0 turns the cache off), else
/// 8 GiB. A packed copy takes 2 bytes a weight per orientation, so a model's frozen weights take
/// as many bytes cached as they take in f32.
pub fn frozen_pack_budget() -> usize {
    std::env::var(FROZEN_PACK_BUDGET_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(8 << 30, |mb| mb << 20)
}

/// Empties the frozen-weight cache of bf16 training.
pub fn clear_frozen_packs() {
    *FROZEN_PACKS.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// (entries, bytes) of the frozen-weight cache now, and the products that took a weight from it
/// since the process started; for tests and benchmarks.
pub fn frozen_pack_stats() -> (usize, usize, u64) {
    let hits = FROZEN_PACK_HITS.load(std::sync::atomic::Ordering::Relaxed);
    let g = FROZEN_PACKS.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()
        .map_or((0, 0, hits), |c| (c.map.len(), c.bytes, hits))
}

/// The key under which a frozen weight may be cached: its id, when nothing tracks it and it is
/// contiguous; else `None` (pack per call).
pub(crate) fn frozen_key(w: &Tensor) -> Option<candle_core::TensorId> {
    (!w.track_op() && w.is_contiguous()).then(|| w.id())
}

/// The right operand (k, n) of a bf16 product, packed: from the cache when `key` names a frozen
/// weight already packed in this orientation (`transposed`), else packed now (and cached when
/// `key` is given and the budget allows). `None` when bf16 is off.
pub(crate) fn pack_frozen(
    key: Option<candle_core::TensorId>,
    transposed: bool,
    k: usize,
    n: usize,
    b: Mat,
) -> Option<std::sync::Arc<bf16::PackedB>> {
    if !bf16::bf16_enabled() || k < 32 {
        return None;
    }
    let Some(id) = key else {
        return pack_big(k, n, b).map(std::sync::Arc::new);
    };
    {
        let mut g = FROZEN_PACKS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_mut() {
            if let Some(p) = c.map.get(&(id, transposed)) {
                FROZEN_PACK_HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(p.clone());
            }
        }
    }
    let packed = std::sync::Arc::new(pack_big(k, n, b)?);
    let mut g = FROZEN_PACKS.lock().unwrap_or_else(|e| e.into_inner());
    let c = g.get_or_insert_with(|| FrozenPacks {
        map: Default::default(),
        bytes: 0,
        budget: frozen_pack_budget(),
    });
    let size = packed.bytes();
    if c.bytes + size <= c.budget {
        c.bytes += size;
        c.map.insert((id, transposed), packed.clone());
    }
    Some(packed)
}

/// dst (m, n) = a (m, k) @ b (k, n) where b is a view of a weight that `key` may name in the
/// frozen-weight cache (`transposed`: b is W^T): [`pack_frozen`] then [`matmul_big_packed`].
pub(crate) fn matmul_weight(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    key: Option<candle_core::TensorId>,
    transposed: bool,
) {
    let packed = pack_frozen(key, transposed, k, n, b);
    matmul_big_packed(m, n, k, dst, n, false, a, b, packed.as_deref(), 1.0);
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
