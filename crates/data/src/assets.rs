//! Where fetched assets and embedded demo data live.

use std::path::PathBuf;

use crate::error::{DataError, Result};

/// `$SAFETUNE_HOME`, default `~/.cache/safetune`.
pub fn safetune_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SAFETUNE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("safetune")
}

pub use crate::util::unique_tmp_path;

/// The asset cache that `scripts/fetch-assets` fills.
pub fn asset_dir() -> PathBuf {
    safetune_home().join("assets")
}

/// Path of one asset file (relative to the cache), or an error telling how to fetch it.
pub fn asset(rel: &str) -> Result<PathBuf> {
    let p = asset_dir().join(rel);
    if p.exists() {
        Ok(p)
    } else {
        Err(DataError::Other(format!(
            "asset {} is missing\nhint: run scripts/fetch-assets (it fills {})",
            p.display(),
            asset_dir().display()
        )))
    }
}

/// The embedded SmolLM2 model file.
pub const SMOLLM2_GGUF: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MINILM_DIR: &str = "minilm";
pub const REFUSAL_CSV: &str = "refusal/refusal.csv";
pub const REFUSAL_EXTRA_CSV: &str = "refusal/refusal_extra.csv";
