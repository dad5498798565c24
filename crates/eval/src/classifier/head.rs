//! The classifier head: its file format, loading and saving, the shipped default, and P(refusal).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

#[cfg(doc)]
use super::Features;

pub const HEAD_FORMAT: &str = "safetune-refusal-head/2";

/// The shipped default head.
pub const DEFAULT_HEAD: &str = include_str!("../classifier_head.json");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Head {
    pub format: String,
    pub encoder: String,
    /// Over `[emb(response), emb(opening)]`.
    pub weights: Vec<f32>,
    pub bias: f32,
    pub threshold: f32,
    /// A request/response cosine below this makes the response off-topic (a refusal).
    pub relevance_threshold: f32,
    /// The head also reads the request-response product ([`Features::interaction`]).
    #[serde(default)]
    pub interaction: bool,
    /// How the head was made: sources, counts, settings, training accuracy.
    pub training: serde_json::Value,
}

impl Head {
    pub fn default_head() -> Result<Head> {
        Head::from_json(DEFAULT_HEAD, Path::new("classifier_head.json (built in)"))
    }

    pub fn load(path: &Path) -> Result<Head> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Head::from_json(&text, path)
    }

    fn from_json(text: &str, path: &Path) -> Result<Head> {
        let h: Head = parse_head_json(text, path, "a classifier head")?;
        check_format(&h.format, HEAD_FORMAT, path)?;
        Ok(h)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_head_json(self, path)
    }

    /// P(refusal) for one normalised embedding.
    pub fn prob(&self, x: &[f32]) -> f32 {
        let z: f32 = self.weights.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + self.bias;
        sigmoid(z)
    }
}

/// Parses a head file (the classifier's or the probe's), naming the file and what it is not.
pub(crate) fn parse_head_json<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    what: &str,
) -> Result<T> {
    serde_json::from_str(text).map_err(|e| EvalError::file(path, format!("not {what}: {e}")))
}

/// A head file's `format` must be the one this build reads.
pub(crate) fn check_format(found: &str, expected: &str, path: &Path) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(EvalError::file(
            path,
            format!("format `{found}`, expected `{expected}`"),
        ))
    }
}

/// Writes a head as pretty JSON (atomically), creating its folder.
pub(crate) fn save_head_json<T: Serialize>(head: &T, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(head).map_err(|e| EvalError::Other(e.to_string()))?;
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| EvalError::io(d, e))?;
    }
    safetune_data::util::write_atomic(path, (text + "\n").as_bytes())
        .map_err(|e| EvalError::io(path, e))
}

pub(super) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::feature_len;

    #[test]
    fn shipped_head_loads_and_bad_heads_are_named() {
        let h = Head::default_head().unwrap();
        assert_eq!(h.weights.len(), feature_len(384, h.interaction));
        assert!(h.relevance_threshold > 0.0 && h.relevance_threshold < 0.5);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.json");
        std::fs::write(&p, "{\"format\": \"other\"}").unwrap();
        let e = Head::load(&p).unwrap_err().to_string();
        assert!(e.contains("h.json"), "{e}");
    }
}
