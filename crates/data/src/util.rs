//! Small helpers every crate shares (this crate is the one all the others depend on): the
//! SplitMix64 generator, the FNV-1a 64 hash and the atomic file write (every file this workspace
//! replaces by write-then-rename goes through [`commit_atomic`]).
//!
//! The generators and hashes seed benchmark splits, transforms, training and sampling: their
//! output is pinned by the golden tests below and by the callers' own, and must never change.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
pub const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a 64, fed piece by piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(FNV_OFFSET)
    }
}

impl Fnv1a64 {
    /// A hasher starting from `basis` instead of the standard offset basis (for seeded hashes).
    pub const fn with_basis(basis: u64) -> Self {
        Fnv1a64(basis)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u8(b);
        }
    }

    pub fn write_u8(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::default();
    h.write(bytes);
    h.finish()
}

/// The SplitMix64 increment (the golden ratio in 64 bits), also used to spread seeds.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step on a bare state: advances `state` and returns the next output. For
/// generators whose state must stay a plain `u64` (checkpointed, serialised).
pub fn splitmix64_next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x` mapped into `0..n` by remainder (`n = 0` counts as 1). Slightly biased for large `n`.
pub fn below_mod(x: u64, n: usize) -> usize {
    (x % n.max(1) as u64) as usize
}

/// `x` mapped into `0..n` by the high half of `x * n` (`n = 0` gives 0).
pub fn below_mul(x: u64, n: usize) -> usize {
    ((x as u128 * n as u128) >> 64) as usize
}

/// `x` as a uniform f64 in [0, 1) (its top 53 bits).
pub fn unit_f64(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// `x` as a uniform f32 in [0, 1) (its top 24 bits).
pub fn unit_f32(x: u64) -> f32 {
    (x >> 40) as f32 / (1u64 << 24) as f32
}

/// A small, fast, seedable generator (SplitMix64) whose state is one `u64`.
///
/// The ways of drawing below `n` differ between callers and each caller's streams are pinned,
/// so each has its own name: [`SplitMix64::below_mod`], [`SplitMix64::below_mul`] and
/// [`SplitMix64::below_unbiased`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose state is `state` as given (callers mix their own seeds).
    pub const fn new(state: u64) -> Self {
        SplitMix64 { state }
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix64_next(&mut self.state)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// In `0..n` by remainder ([`below_mod`]); `n = 0` gives 0.
    pub fn below_mod(&mut self, n: usize) -> usize {
        below_mod(self.next_u64(), n)
    }

    /// In `0..n` by multiply-shift ([`below_mul`]); `n = 0` gives 0.
    pub fn below_mul(&mut self, n: usize) -> usize {
        below_mul(self.next_u64(), n)
    }

    /// Uniform in `0..n` (`n > 0`) by rejection, so there is no modulo bias.
    pub fn below_unbiased(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }
}

/// Fisher-Yates shuffle of `xs`, drawing each index with `below(i + 1)`.
pub fn shuffle_with<T>(xs: &mut [T], mut below: impl FnMut(usize) -> usize) {
    for i in (1..xs.len()).rev() {
        let j = below(i + 1);
        xs.swap(i, j);
    }
}

/// Why one JSONL line is not a JSON object.
#[derive(Debug)]
pub enum JsonLineError {
    /// Not JSON at all (serde's message).
    Invalid(serde_json::Error),
    /// JSON, but not an object.
    NotObject,
}

impl std::fmt::Display for JsonLineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonLineError::Invalid(e) => write!(f, "invalid JSON: {e}"),
            JsonLineError::NotObject => f.write_str("expected a JSON object"),
        }
    }
}

/// One line of a JSONL file of objects: `None` for a blank line, else the object or why not.
/// A leading byte-order mark is dropped first, so a BOM-only line counts as blank. Each reader
/// keeps its own error wording and line numbering.
pub fn json_object_line(
    line: &str,
) -> Option<Result<serde_json::Map<String, serde_json::Value>, JsonLineError>> {
    let line = line.trim_start_matches('\u{feff}');
    if line.trim().is_empty() {
        return None;
    }
    Some(match serde_json::from_str(line) {
        Ok(serde_json::Value::Object(o)) => Ok(o),
        Ok(_) => Err(JsonLineError::NotObject),
        Err(e) => Err(JsonLineError::Invalid(e)),
    })
}

/// Writes `bytes` to `path` atomically: to a temporary file next to it ([`atomic_tmp_path`], so
/// concurrent writers never share one), flushed to disk (fsync), then renamed over `path`. A
/// reader sees the old file or the new one, never a part; on an error the temporary file is
/// removed. The parent directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(
        path,
        |tmp| std::fs::File::create(tmp)?.write_all(bytes),
        |_, e| e,
    )
}

/// [`write_atomic`] for writers that must be handed a file name (a library's `save(path)`):
/// `write` fills the temporary path, which is then synced and renamed over `path`
/// ([`commit_atomic`]). On any error the temporary file is removed; `io` turns an I/O error of
/// the sync (on the temporary path) or the rename (on `path`) into the caller's error type.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let tmp = atomic_tmp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    commit_atomic(&tmp, path).map_err(|(p, e)| io(p, e))
}

/// The last step of every atomic file write here: syncs the complete temporary file `tmp` to
/// disk, then renames it over `path`. On an error `tmp` is removed and the error comes with the
/// path it concerns (`tmp` for the sync, `path` for the rename).
pub fn commit_atomic<'a>(tmp: &'a Path, path: &'a Path) -> Result<(), (&'a Path, std::io::Error)> {
    let sync = std::fs::File::open(tmp).and_then(|f| f.sync_all());
    let result = match sync {
        Err(e) => Err((tmp, e)),
        Ok(()) => std::fs::rename(tmp, path).map_err(|e| (path, e)),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The temporary sibling of `path` that an atomic write of it fills first
/// ([`unique_tmp_path`] in `path`'s directory, `.` when it has none).
pub fn atomic_tmp_path(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(
        || std::borrow::Cow::Borrowed("file"),
        |n| n.to_string_lossy(),
    );
    unique_tmp_path(dir, &name)
}

/// A temporary path in `dir` for writing `name` before renaming it into place, unique to this
/// writer: several processes, and several threads of one process (the tests), may fill the same
/// shared cache at once, and each must rename its own file.
pub fn unique_tmp_path(dir: &Path, name: &str) -> PathBuf {
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: [usize; 8] = [1, 2, 3, 7, 10, 100, 1000, 1 << 40];

    #[test]
    fn splitmix64_stream_is_pinned() {
        let mut r = SplitMix64::new(0);
        let v: Vec<u64> = (0..20).map(|_| r.next_u64()).collect();
        assert_eq!(
            v,
            [
                16294208416658607535,
                7960286522194355700,
                487617019471545679,
                17909611376780542444,
                1961750202426094747,
                6038094601263162090,
                3207296026000306913,
                14232521865600346940,
                4532161160992623299,
                17561866513979060390,
                7313543279846440201,
                14038607207048404726,
                9665182471527586683,
                10241033088150448431,
                13064396156225473817,
                9564308153959284907,
                9018883062403043925,
                14109521515791744902,
                3775962213208117092,
                15571913878924461484,
            ]
        );
        let mut s = 42u64;
        let v: Vec<u64> = (0..20).map(|_| splitmix64_next(&mut s)).collect();
        assert_eq!(
            v,
            [
                13679457532755275413,
                2949826092126892291,
                5139283748462763858,
                6349198060258255764,
                701532786141963250,
                16015981125662989062,
                4028864712777624925,
                14769051326987775908,
                6270620877612482005,
                11408980392250668974,
                3779771651426294207,
                9094045341461139646,
                9470486766231111398,
                9592552252706221495,
                12270025419241524956,
                3752715396868486130,
                1910607418205583989,
                9140336935745592861,
                1723436047706647047,
                12708817412199463008,
            ]
        );
    }

    #[test]
    fn below_variants_are_pinned() {
        // After three draws, as the copies this replaced drew them (eval's `SplitMix` and
        // `metrics::Rng`).
        let mut r = SplitMix64::new(0);
        for _ in 0..3 {
            r.next_u64();
        }
        let b: Vec<usize> = NS.iter().map(|&n| r.below_mul(n)).collect();
        assert_eq!(b, [0, 0, 0, 1, 7, 24, 952, 435921149244]);
        let mut r = SplitMix64::new(42);
        for _ in 0..3 {
            r.next_u64();
        }
        let b: Vec<usize> = NS.iter().map(|&n| r.below_unbiased(n)).collect();
        assert_eq!(b, [0, 0, 0, 2, 8, 5, 974, 319830038975]);
        let u: Vec<f64> = (0..3).map(|_| r.next_f64()).collect();
        assert_eq!(
            u,
            [0.4929891857946924, 0.5133961163221494, 0.5200132996032402]
        );
        assert_eq!(below_mod(17, 0), 0);
        assert_eq!(below_mod(17, 5), 2);
        assert_eq!(below_mul(u64::MAX, 10), 9);
        assert_eq!(below_mul(123, 0), 0);
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(fnv1a64(b"safetune"), 0x273d3757c655ccf6);
        assert_eq!(fnv1a64("ga:r04\u{e9}".as_bytes()), 0x661558a34b2b08f5);
        let mut h = Fnv1a64::default();
        h.write(b"foo");
        h.write(b"bar");
        assert_eq!(h.finish(), fnv1a64(b"foobar"));
    }

    #[test]
    fn json_object_line_skips_blanks_and_the_bom() {
        assert!(json_object_line("").is_none());
        assert!(json_object_line("  \t").is_none());
        assert!(json_object_line("\u{feff}").is_none());
        let o = json_object_line("\u{feff}{\"a\": 1}").unwrap().unwrap();
        assert_eq!(o["a"], 1);
        let e = json_object_line("[1]").unwrap().unwrap_err();
        assert_eq!(e.to_string(), "expected a JSON object");
        let e = json_object_line("{").unwrap().unwrap_err();
        assert!(e.to_string().starts_with("invalid JSON: "), "{e}");
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.json"]);
        // A missing directory is the write's error, and nothing is left behind.
        assert!(write_atomic(&dir.path().join("no/such.json"), b"x").is_err());
    }

    #[test]
    fn write_atomic_with_hands_over_a_sibling_and_cleans_up_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        let mut seen = None;
        write_atomic_with(
            &p,
            |tmp| {
                seen = Some(tmp.to_path_buf());
                std::fs::write(tmp, b"abc")
            },
            |_, e| e,
        )
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let tmp = seen.unwrap();
        assert_eq!(tmp.parent(), Some(dir.path()));
        assert!(!tmp.exists());
        // The writer fails after writing part: its error comes back, the old file stays, and
        // no temporary file is left.
        let e = write_atomic_with(
            &p,
            |tmp| {
                std::fs::write(tmp, b"part").unwrap();
                Err("save failed")
            },
            |_, _| "io",
        )
        .unwrap_err();
        assert_eq!(e, "save failed");
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        // A writer that writes nothing: the sync fails on the temporary path.
        let e = write_atomic_with(&p, |_| Ok(()), |at, e| format!("{}: {e}", at.display()))
            .unwrap_err();
        assert!(e.contains(".w.bin."), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["w.bin"]);
    }
}
