//! Seeded byte mutations of real files, for tests that a parser answers a hostile file with
//! `Ok` or an error and never panics.
//!
//! [`run`] takes a valid file (written by the test), mutates it `iterations` times with a seeded
//! generator and hands each mutant to a check; a panic in the check is caught, the mutant is
//! saved under the system's temporary directory and the run fails with the seed, the iteration
//! and the mutations applied, so the case can be replayed. Mutations: bit flips, random bytes,
//! truncations, deleted and repeated ranges, length-sized fields (1, 2, 4 or 8 bytes, mostly in
//! the first kilobyte, where headers keep their counts and offsets) overwritten with extreme
//! values, and tokens that break text formats (quotes, brackets, huge numbers).
//!
//! Runs are deterministic: the same seed and count give the same mutants. Tests pass a small
//! count for CI; [`iterations`] lets `SAFETUNE_MUTATIONS` raise it (`bench/mutation`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The largest single allocation [`CappedAlloc`] grants: no parser of a file of a few
/// kilobytes needs anything near it in one piece.
pub const MAX_ALLOCATION: usize = 256 << 20;

/// A global allocator for mutation tests: the system allocator, except that a request over
/// [`MAX_ALLOCATION`] returns null, which the standard library turns into an abort ("memory
/// allocation failed"), failing the test. A parser that trusts a length read from a hostile
/// header is caught this way. Install it in a test binary with
/// `#[global_allocator] static ALLOC: CappedAlloc = CappedAlloc;`.
pub struct CappedAlloc;

// SAFETY: every method forwards to the system allocator with the caller's arguments; a refused
// size returns null, which `GlobalAlloc` allows.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Values written over length fields: zero, one, sign and width boundaries, the largest.
pub const EXTREMES: [u64; 11] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// Text that breaks JSON, CSV and templates in interesting ways.
const TOKENS: [&str; 14] = [
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\n",
    "#",
    "\\",
    "-1",
    "1e999",
    "99999999999999999999",
    "\0",
    "{{",
];

/// A splitmix64 generator: small, seeded, the same on every platform.
#[derive(Debug, Clone)]
pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A position in `0..len`, three times in four inside the first kilobyte.
    fn position(&mut self, len: usize) -> usize {
        if self.below(4) < 3 {
            self.below(len.min(1024))
        } else {
            self.below(len)
        }
    }

    /// One to three mutations of `src`; returns the mutant and what was done to it.
    pub fn mutate(&mut self, src: &[u8]) -> (Vec<u8>, String) {
        let mut b = src.to_vec();
        let mut done = Vec::new();
        for _ in 0..1 + self.below(3) {
            if b.is_empty() {
                b.push(self.next() as u8);
                done.push("grew from nothing".to_string());
                continue;
            }
            let len = b.len();
            match self.below(8) {
                0 => {
                    let (at, bit) = (self.position(len), self.below(8));
                    b[at] ^= 1 << bit;
                    done.push(format!("flipped bit {bit} of byte {at}"));
                }
                1 => {
                    let (at, v) = (self.position(len), self.next() as u8);
                    b[at] = v;
                    done.push(format!("set byte {at} to {v:#04x}"));
                }
                2 => {
                    let to = self.below(len);
                    b.truncate(to);
                    done.push(format!("truncated to {to} bytes"));
                }
                3 | 4 => {
                    let width = [1usize, 2, 4, 8][self.below(4)];
                    let at = self.position(len);
                    let v = EXTREMES[self.below(EXTREMES.len())];
                    let end = (at + width).min(len);
                    b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                    done.push(format!("wrote {v:#x} over {width} bytes at {at}"));
                }
                5 => {
                    let at = self.position(len);
                    let n = 1 + self.below(64.min(len - at));
                    b.drain(at..at + n);
                    done.push(format!("deleted {n} bytes at {at}"));
                }
                6 => {
                    let at = self.position(len);
                    let n = 1 + self.below(64.min(len - at));
                    let copy = b[at..at + n].to_vec();
                    let to = self.below(b.len());
                    b.splice(to..to, copy);
                    done.push(format!("repeated {n} bytes from {at} at {to}"));
                }
                _ => {
                    let at = self.below(len);
                    let t = TOKENS[self.below(TOKENS.len())];
                    b.splice(at..at, t.bytes());
                    done.push(format!("inserted {t:?} at {at}"));
                }
            }
        }
        (b, done.join(", "))
    }
}

/// `default`, or the count in the environment variable `SAFETUNE_MUTATIONS` when it is set.
pub fn iterations(default: usize) -> usize {
    std::env::var("SAFETUNE_MUTATIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// What a mutation run saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub ok: usize,
    pub err: usize,
}

/// Mutates `src` `iterations` times (seeded by `seed`) and calls `check` on each mutant, which
/// returns whether the parser accepted it (`Ok`) or refused it with an error (`Err`, its text).
/// Panics, naming the case and where the mutant was saved, if `check` panics; `Err` texts are
/// passed to `on_error`, so a test can require that errors name the file.
pub fn run(
    name: &str,
    src: &[u8],
    seed: u64,
    iterations: usize,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
    mut on_error: impl FnMut(&str, &str),
) -> Outcomes {
    let mut m = Mutator::new(seed);
    let mut out = Outcomes::default();
    for i in 0..iterations {
        let (mutant, what) = m.mutate(src);
        match catch_unwind(AssertUnwindSafe(|| check(&mutant))) {
            Ok(Ok(())) => out.ok += 1,
            Ok(Err(e)) => {
                on_error(&e, &what);
                out.err += 1;
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let saved = std::env::temp_dir().join(format!("safetune-mutant-{name}-{seed}-{i}"));
                let _ = std::fs::write(&saved, &mutant);
                panic!(
                    "{name}: mutant {i} of seed {seed} ({what}) panicked: {msg}; saved as {}",
                    saved.display()
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_seeded_and_vary() {
        let src: Vec<u8> = (0..200u8).collect();
        let a: Vec<_> = (0..20)
            .map(|_| ())
            .scan(Mutator::new(7), |m, _| Some(m.mutate(&src)))
            .collect();
        let b: Vec<_> = (0..20)
            .map(|_| ())
            .scan(Mutator::new(7), |m, _| Some(m.mutate(&src)))
            .collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().map(|(v, _)| v).collect();
        assert!(distinct.len() > 15);
        assert!(a.iter().all(|(v, _)| v != &src));
    }

    #[test]
    fn a_panicking_check_is_reported_with_its_case() {
        let r = catch_unwind(|| {
            run(
                "demo",
                b"abcdef",
                3,
                50,
                |b| if b.len() < 6 { panic!("short") } else { Ok(()) },
                |_, _| {},
            )
        });
        let msg = r.unwrap_err().downcast::<String>().unwrap();
        assert!(
            msg.contains("demo: mutant") && msg.contains("seed 3") && msg.contains("short"),
            "{msg}"
        );
    }
}
