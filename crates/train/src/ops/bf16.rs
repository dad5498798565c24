//! bf16 matrix products for training (`tune --bf16`): both operands rounded to bf16
//! (round-to-nearest-even, subnormals flushed to zero), products summed in f32, the result f32.
//! Master weights, gradients and the optimizer state stay f32; only the large products of the
//! linears and the lm_head go through here ([`super::fused`] decides which).
//!
//! The kernels (AMX-BF16 and the portable emulation), the rounding and the packed layout live
//! in `safetune_model::bf16`, shared with bf16 generation, and are re-exported here. This
//! module holds the training switch ([`set_bf16`], [`bf16_enabled`]) and the check that takes
//! the training crate's ISA override into account ([`bf16_unavailable`]). Training packs the
//! activations and the trained weights per product; frozen weights are packed once per run
//! (the frozen-weight cache of `fused::util`).

use std::sync::atomic::{AtomicBool, Ordering};

pub use safetune_model::bf16::{
    amx_available, bf16_to_f32, f32_to_bf16, kernel, matmul_bf16, matmul_packed, pack_a, pack_b,
    set_emulated, Bf16Kernel, PackedA, PackedB,
};

use super::isa;

/// Why bf16 training cannot run here, or `None` when it can: it needs AMX-BF16 (with the OS's
/// permission) and the AVX-512 training kernels (so `SAFETUNE_ISA=avx2` or `scalar`, or
/// [`isa::set_isa`] below AVX-512, rules it out).
pub fn bf16_unavailable() -> Option<String> {
    safetune_model::bf16::bf16_unavailable_on(isa::isa())
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Switches bf16 products on for every later training step (process-wide), after checking
/// [`bf16_unavailable`] (unless [`set_emulated`]); off always succeeds.
pub fn set_bf16(on: bool) -> Result<(), String> {
    if on && kernel() == Bf16Kernel::Amx {
        if let Some(e) = bf16_unavailable() {
            return Err(e);
        }
    }
    ENABLED.store(on, Ordering::Relaxed);
    Ok(())
}

/// Whether the large training products run in bf16 now.
pub fn bf16_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}
