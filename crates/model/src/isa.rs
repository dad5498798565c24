//! The CPU instruction sets the matrix kernels can be forced to, and the operand view they
//! share. The training crate's f32 products (`safetune_train::ops::isa`) dispatch on [`Isa`];
//! the bf16 kernels ([`crate::bf16`]) refuse to run when the environment forces an ISA below
//! AVX-512. The choice comes from:
//!
//! - the environment variable [`ISA_ENV`] (`SAFETUNE_ISA=auto|avx512|avx2|scalar`), read once
//!   ([`env_isa`]), else
//! - the best the CPU has ([`Isa::detect`]).
//!
//! [`isa_from_env`] validates the variable (an unknown value, or an ISA the CPU lacks, is an
//! error naming the variable). The training crate adds a process-wide override on top.

use std::sync::OnceLock;

/// The environment variable that forces the kernels' instruction set.
pub const ISA_ENV: &str = "SAFETUNE_ISA";

/// An instruction set the matrix products can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F: 16 f32 lanes.
    Avx512f,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2Fma,
    /// Portable code, no SIMD assumed.
    Scalar,
}

impl Isa {
    /// Every ISA, widest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512f, Isa::Avx2Fma, Isa::Scalar];

    /// The name reported by `tune` and the benchmarks: `avx512f`, `avx2+fma` or `scalar`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512f => "avx512f",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512f => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512f | Isa::Avx2Fma => false,
            Isa::Scalar => true,
        }
    }

    /// The widest ISA this CPU has.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a setting of [`ISA_ENV`]: `auto` (or empty) is `None`, the best available;
/// `avx512`/`avx512f`, `avx2`/`avx2+fma` and `scalar` name one. An unknown value, or an ISA this
/// CPU lacks, is an error that names the variable and the value.
pub fn parse_isa(value: &str) -> Result<Option<Isa>, String> {
    let isa = match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => return Ok(None),
        "avx512" | "avx512f" => Isa::Avx512f,
        "avx2" | "avx2+fma" | "fma" => Isa::Avx2Fma,
        "scalar" => Isa::Scalar,
        other => {
            return Err(format!(
                "{ISA_ENV}={other:?}: expected auto, avx512, avx2 or scalar"
            ))
        }
    };
    if !isa.available() {
        return Err(format!(
            "{ISA_ENV}={value}: this CPU lacks {} (it has {})",
            isa.name(),
            Isa::detect().name()
        ));
    }
    Ok(Some(isa))
}

/// The ISA the environment asks for (validated), or the best available when [`ISA_ENV`] is
/// unset or `auto`.
pub fn isa_from_env() -> Result<Isa, String> {
    match std::env::var(ISA_ENV) {
        Ok(v) => Ok(parse_isa(&v)?.unwrap_or_else(Isa::detect)),
        Err(std::env::VarError::NotPresent) => Ok(Isa::detect()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ISA_ENV} is not valid UTF-8")),
    }
}

/// [`isa_from_env`], read once per process. An invalid [`ISA_ENV`] falls back to the best
/// available here (with one warning on stderr); commands reject it before they get this far.
pub fn env_isa() -> Isa {
    static FROM_ENV: OnceLock<Isa> = OnceLock::new();
    *FROM_ENV.get_or_init(|| {
        isa_from_env().unwrap_or_else(|e| {
            eprintln!("warning: {e}; using {}", Isa::detect().name());
            Isa::detect()
        })
    })
}

/// A matrix operand: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_unknown_ones_name_the_variable() {
        assert_eq!(parse_isa("auto"), Ok(None));
        assert_eq!(parse_isa(""), Ok(None));
        assert_eq!(parse_isa("Scalar"), Ok(Some(Isa::Scalar)));
        if Isa::Avx2Fma.available() {
            assert_eq!(parse_isa("avx2"), Ok(Some(Isa::Avx2Fma)));
            assert_eq!(parse_isa("avx2+fma"), Ok(Some(Isa::Avx2Fma)));
        }
        if Isa::Avx512f.available() {
            assert_eq!(parse_isa("AVX512"), Ok(Some(Isa::Avx512f)));
        } else {
            let e = parse_isa("avx512").unwrap_err();
            assert!(
                e.contains("SAFETUNE_ISA") && e.contains("lacks avx512f"),
                "{e}"
            );
        }
        let e = parse_isa("sse9").unwrap_err();
        assert!(e.contains("SAFETUNE_ISA") && e.contains("sse9"), "{e}");
        assert!(Isa::detect().available());
    }
}
