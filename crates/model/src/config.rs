//! Model configuration: a serde mirror of Hugging Face `config.json` (transformers 4.x and 5.x
//! layouts) and of GGUF `llama.*` metadata, both resolved into one [`Config`] the decoder reads.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Which member of the Llama family a checkpoint is. They share one decoder; the differences
/// are flags in [`Config`] (QKV bias, sliding window, RoPE layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        match model_type.to_ascii_lowercase().as_str() {
            "llama" | "smollm" | "smollm2" | "smollm3" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

/// How RoPE frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors as GGUF stores them (`rope_freqs.weight`), one per rotary pair.
    Factors(Vec<f32>),
}

/// The resolved configuration of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2).
    pub attention_bias: bool,
    /// Bias on the MLP projections (rare; some Llama variants).
    pub mlp_bias: bool,
    /// Keys further back than this many positions are masked (Mistral v0.1, some Qwen2).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` is an int or a list of ints in config.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` (4.x) or `rope_parameters` (5.x). Both may carry `rope_type` (or the older
/// `type`); 5.x also moves `rope_theta` in here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfRopeParams {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// A mirror of the fields of a Hugging Face `config.json` that the decoder needs. Unknown keys
/// are ignored (config.json carries many that do not concern inference).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 4.x.
    #[serde(default)]
    pub rope_scaling: Option<HfRopeParams>,
    /// transformers 5.x: `rope_theta` and the scaling live here.
    #[serde(default)]
    pub rope_parameters: Option<HfRopeParams>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 writes a `sliding_window` but only uses it when this is true.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    /// Reads and parses `config.json`; errors name the file and serde's line and column.
    pub fn from_file(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            source: e,
        })
    }

    /// Resolves defaults and layout differences into a [`Config`].
    pub fn resolve(&self) -> Result<Config> {
        let model_type = self
            .model_type
            .clone()
            .or_else(|| {
                self.architectures
                    .first()
                    .map(|a| a.to_ascii_lowercase().replace("forcausallm", ""))
            })
            .unwrap_or_else(|| "llama".to_string());
        let arch = Arch::from_model_type(&model_type).ok_or_else(|| ModelError::Config {
            field: "model_type".into(),
            message: format!(
                "unsupported model type {model_type:?} (supported: llama, mistral, qwen2)"
            ),
        })?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim.is_none()
        {
            return Err(ModelError::Config {
                field: "num_attention_heads".into(),
                message: format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        let num_kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv == 0 || !self.num_attention_heads.is_multiple_of(num_kv) {
            return Err(ModelError::Config {
                field: "num_key_value_heads".into(),
                message: format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv}",
                    self.num_attention_heads
                ),
            });
        }
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match params {
            None => None,
            Some(p) => match p.rope_type.as_deref().unwrap_or("default") {
                "default" => None,
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: p.factor.unwrap_or(8.0),
                    low_freq_factor: p.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: p.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                }),
                other => {
                    return Err(ModelError::Config {
                        field: "rope_scaling.rope_type".into(),
                        message: format!(
                            "unsupported RoPE scaling {other:?} (supported: default, llama3)"
                        ),
                    })
                }
            },
        };
        let sliding_window = match arch {
            Arch::Qwen2 if !self.use_sliding_window.unwrap_or(false) => None,
            _ => self.sliding_window,
        };
        let cfg = Config {
            arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(|e| e.to_vec())
                .unwrap_or_default(),
        };
        cfg.check()
            .map_err(|(field, message)| ModelError::Config { field, message })?;
        Ok(cfg)
    }
}

impl Config {
    /// Reads `config.json` and resolves it; an unusable value is an error naming the file and
    /// the field.
    pub fn from_hf_file(path: &Path) -> Result<Config> {
        HfConfig::from_file(path)?.resolve().map_err(|e| match e {
            ModelError::Config { field, message } => {
                ModelError::format(path, format!("field `{field}`: {message}"))
            }
            e => e,
        })
    }

    /// Checks the sizes a crafted file could set to values that break the decoder (zero heads,
    /// an odd head size) or make it allocate absurdly before any weight is read. The error is
    /// `(field, message)`; the caller names the file.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_string(), message));
        let limits: [(&str, usize, usize); 8] = [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 14),
            ("vocab_size", self.vocab_size, 1 << 24),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
        ];
        for (field, value, max) in limits {
            if value == 0 || value > max {
                return bad(field, format!("{value} is out of range (1 to {max})"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE rotates pairs", self.head_dim),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a finite value >= 0", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope_theta",
                format!("{} is not a finite value > 0", self.rope_theta),
            );
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per rotary pair: `theta^(-2i/d)`, scaled as configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base.into_iter().map(|f| f as f32).collect(),
            Some(RopeScaling::Factors(fs)) => base
                .iter()
                .enumerate()
                .map(|(i, f)| (f / fs.get(i).copied().unwrap_or(1.0) as f64) as f32)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Config {
        serde_json::from_str::<HfConfig>(json)
            .unwrap()
            .resolve()
            .unwrap()
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn transformers_4_layout_with_llama3_scaling() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3",
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            "tie_word_embeddings": true, "eos_token_id": [1, 2]}}"#
        ));
        assert_eq!(c.rope_theta, 500000.0);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.head_dim, 16);
        assert!(!c.attention_bias);
        // The highest frequency is untouched, the lowest divided by the factor.
        let plain = Config {
            rope_scaling: None,
            ..c.clone()
        }
        .inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[7] / scaled[7] - 32.0).abs() < 1e-3);
    }

    #[test]
    fn transformers_5_layout() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "default", "rope_theta": 100000.0}}}}"#
        ));
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_ignores_unused_window() {
        let c = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "sliding_window": 4096, "use_sliding_window": false}}"#
        ));
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.attention_bias);
        assert_eq!(c.sliding_window, None);
        let m = parse(&format!(
            r#"{{"model_type": "mistral", {BASE}, "sliding_window": 4096}}"#
        ));
        assert_eq!(m.sliding_window, Some(4096));
    }

    #[test]
    fn unknown_model_type_is_an_error_naming_the_field() {
        let err = serde_json::from_str::<HfConfig>(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("model_type"), "{err}");
    }
}
