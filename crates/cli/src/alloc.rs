//! Process settings made at start: the allocator (glibc only) and SIGPIPE.
//!
//! A training step allocates and frees buffers of megabytes to tens of megabytes (activations,
//! gradients, logits chunks). glibc serves those above its mmap threshold with fresh mappings and
//! returns them on free, so every step faults the same memory in again: 9.8% of a LoRA step on
//! SmolLM2 went to page faults. Keeping such buffers in the heap (threshold 32 MiB, glibc's
//! largest; no trimming; the heap grown 64 MiB at a time) made paired 5-step runs 3-17% faster on
//! two cores. A `MALLOC_MMAP_THRESHOLD_` set in the environment wins.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn configure() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn configure() {}

/// Restores the default action of SIGPIPE (end the process quietly), which the Rust runtime sets
/// to "ignore": without it, `safetune prompts show advbench | head` panics or prints "Broken
/// pipe" once `head` has read enough. Not for `serve`, which must outlive a closed connection.
#[cfg(unix)]
pub fn quiet_broken_pipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: resets one signal's disposition to the default before any other thread exists.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
pub fn quiet_broken_pipe() {}
