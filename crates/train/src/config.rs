//! The settings of one tuning run: read from a TOML file (unknown keys rejected), overridden by
//! flags, resolved into one [`TuneConfig`] that is printed, logged in the manifest and stored in
//! every checkpoint.
//!
//! A config file uses the flag names with `_` for `-`:
//! ```toml
//! # safetune tune --config lora.toml
//! model = "SmolLM2-135M-Instruct.Q4_1.gguf"  # .gguf file or Hugging Face directory
//! data = "data/medical.jsonl"                # conversations (messages JSONL, Alpaca, ...)
//! output = "runs/medical-lora"               # adapter, metrics.jsonl, manifest.json, checkpoints/
//! rank = 16                                  # LoRA rank r
//! alpha = 32.0                               # LoRA alpha (scale = alpha / r)
//! targets = ["q", "k", "v", "o", "gate", "up", "down"]
//! lr = 2e-4
//! epochs = 1
//! batch_size = 8
//! grad_accum = 1
//! max_len = 512
//! seed = 0
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::{LoraSettings, Mode, Target};

/// The keys that name a run's model, training data and output directory. A caller that supplies
/// them itself (the study's align and tune steps) takes every other key from its settings.
pub const RUN_KEYS: [&str; 3] = ["model", "data", "output"];

/// What is wrong with a table of run settings ([`TuneConfig::from_settings`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("`{key}`: unknown setting (accepted: {})", accepted.join(", "))]
    Unknown { key: String, accepted: Vec<String> },
    #[error("`{key}`: set by the caller, not by settings")]
    RunKey { key: String },
    /// A wrong type or a value out of range; `key` is empty when no one key is to blame.
    #[error("`{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl SettingsError {
    pub fn key(&self) -> &str {
        match self {
            SettingsError::Unknown { key, .. }
            | SettingsError::RunKey { key }
            | SettingsError::Invalid { key, .. } => key,
        }
    }
}

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// The reference of anchored tuning, as [`TuneConfig::anchor`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor<'a> {
    /// No KL term.
    Off,
    /// The tuning base with the adapter switched off.
    Base,
    /// A separate model (a .gguf file or Hugging Face directory), loaded frozen.
    Model(&'a str),
}

/// Every setting of a run. Field docs are the reference for the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuneConfig {
    /// The base model: a .gguf file (dequantized to f32) or a Hugging Face directory.
    pub model: String,
    /// Training conversations (any format safetune reads).
    pub data: PathBuf,
    /// Output directory.
    pub output: PathBuf,
    /// Train every weight instead of a LoRA adapter.
    pub full: bool,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha; the adapter's output is scaled by alpha / rank.
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f32,
    /// Projections that get adapters: q, k, v, o, gate, up, down.
    pub targets: Vec<Target>,
    /// Passes over the training set.
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run every epoch).
    pub max_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps from 0 to `lr`.
    pub warmup_steps: usize,
    /// Decay after warmup (to 0 at the last step).
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest example (tokens); longer ones are cut.
    pub max_len: usize,
    /// Pack several examples per row (block-diagonal attention) instead of padding.
    pub packing: bool,
    pub seed: u64,
    /// Fraction of examples held out for the eval loss (at least one when `eval_every` > 0).
    pub eval_fraction: f64,
    /// Eval loss every N optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0: only on interrupt).
    pub save_every: usize,
    /// Checkpoints kept (older ones are removed).
    pub keep_checkpoints: usize,
    /// Rows of logits computed at a time by the fused lm_head + cross-entropy.
    pub loss_chunk: usize,
    /// Activation recomputation (gradient checkpointing): each decoder block keeps only its
    /// input and runs again in the backward pass; far less memory for about a third more work.
    pub recompute: bool,
    /// bf16 matrix products (operands rounded to bf16, sums in f32) for the linears and the
    /// lm_head; weights, gradients and optimizer state stay f32. Needs a CPU with AMX-BF16
    /// (an error before anything loads otherwise); see `ops::bf16`.
    pub bf16: bool,
    /// LoRA on a quantized base (QLoRA on the CPU): the frozen projections stay in GGUF
    /// blocks (Q4_0, Q4_1 and Q8_0 as stored in a .gguf; a safetensors base, or other GGUF
    /// formats, quantized to Q8_0 at load), for the forward pass and the input gradient. The
    /// adapters, norms, embeddings and head stay f32. Not with `full`.
    pub quantized: bool,
    /// Anchored tuning: a KL term to a reference model's next-token distribution, added to the
    /// loss as `anchor_beta` times the mean KL(p_ref || p) per anchored token. "" (off),
    /// "base" (the tuning base with the adapter switched off; LoRA only, no second copy of the
    /// weights) or a model path (.gguf or Hugging Face directory, loaded frozen; it must share
    /// the tokenizer's vocabulary).
    pub anchor: String,
    /// Weight of the KL term (> 0 when `anchor` is set).
    pub anchor_beta: f64,
    /// A separate anchor set (any format safetune reads): unset, the KL term is on every
    /// answer token of the training batches; set, each optimizer step also runs one micro-batch
    /// of `anchor_batch_size` examples of this set whose loss is the KL term alone, and the
    /// training batches carry cross-entropy only.
    pub anchor_data: Option<PathBuf>,
    /// Examples per anchor micro-batch (with `anchor_data`), drawn cycling through the set in
    /// a seeded order.
    pub anchor_batch_size: usize,
}

impl Default for TuneConfig {
    fn default() -> Self {
        TuneConfig {
            model: String::new(),
            data: PathBuf::new(),
            output: PathBuf::new(),
            full: false,
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            epochs: 1,
            max_steps: 0,
            lr: 2e-4,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            batch_size: 8,
            grad_accum: 1,
            max_len: 512,
            packing: false,
            seed: 0,
            eval_fraction: 0.05,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            loss_chunk: 256,
            recompute: false,
            bf16: false,
            quantized: false,
            anchor: String::new(),
            anchor_beta: 0.1,
            anchor_data: None,
            anchor_batch_size: 4,
        }
    }
}

impl TuneConfig {
    /// Reads a TOML file; unknown keys and wrong types are errors naming the file and key.
    pub fn from_toml_file(path: &Path) -> Result<TuneConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<TuneConfig> {
        toml::from_str(text).map_err(|e| TrainError::config(origin, e.to_string().trim_end()))
    }

    /// The resolved settings as TOML (printed at the start of a run).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Checks values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            Some((k, m)) => Err(TrainError::config(format!("key `{k}`"), m)),
            None => Ok(()),
        }
    }

    /// The first value out of range, as (key, what is wrong); `None` when every value is fine.
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        let bad = |k: &'static str, m: &'static str| Some((k, m));
        if self.model.is_empty() {
            return bad("model", "no model given");
        }
        if self.data.as_os_str().is_empty() {
            return bad("data", "no training data given");
        }
        if self.output.as_os_str().is_empty() {
            return bad("output", "no output directory given");
        }
        if self.full && self.quantized {
            return bad(
                "quantized",
                "full fine-tuning needs f32 weights; a quantized base trains LoRA adapters only (drop `full` or `quantized`)",
            );
        }
        if !self.full {
            if self.rank == 0 {
                return bad("rank", "must be at least 1");
            }
            if self.targets.is_empty() {
                return bad(
                    "targets",
                    "choose at least one of q, k, v, o, gate, up, down",
                );
            }
            if !(self.dropout >= 0.0 && self.dropout < 1.0) {
                return bad("dropout", "must be in [0, 1)");
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs", "must be at least 1 (or set max_steps)");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("eval_fraction", "must be in [0, 1)");
        }
        if self.loss_chunk == 0 {
            return bad("loss_chunk", "must be at least 1");
        }
        if self.max_grad_norm < 0.0 {
            return bad("max_grad_norm", "must be 0 (off) or positive");
        }
        match self.anchor_kind() {
            Anchor::Off => {
                if self.anchor_data.is_some() {
                    return bad(
                        "anchor_data",
                        "needs `anchor` (\"base\" or a reference model path)",
                    );
                }
            }
            Anchor::Base if self.full => {
                return bad(
                    "anchor",
                    "\"base\" is the tuning base with the adapter switched off, so it needs LoRA; under full tuning give the reference model's path",
                );
            }
            Anchor::Base | Anchor::Model(_) => {
                if !(self.anchor_beta > 0.0 && self.anchor_beta.is_finite()) {
                    return bad(
                        "anchor_beta",
                        "must be a positive number when `anchor` is set",
                    );
                }
                if self
                    .anchor_data
                    .as_ref()
                    .is_some_and(|p| p.as_os_str().is_empty())
                {
                    return bad("anchor_data", "an empty path");
                }
                if self.anchor_batch_size == 0 {
                    return bad("anchor_batch_size", "must be at least 1");
                }
            }
        }
        None
    }

    /// Every key of a config file, sorted; read from the struct itself, so it is the one list.
    pub fn keys() -> Vec<String> {
        let mut keys: Vec<String> = match serde_json::to_value(TuneConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        keys.sort();
        keys
    }

    /// The keys a settings table may hold: every key but [`RUN_KEYS`].
    pub fn settings_keys() -> Vec<String> {
        Self::keys()
            .into_iter()
            .filter(|k| !RUN_KEYS.contains(&k.as_str()))
            .collect()
    }

    /// Reads a table of run settings (every key but [`RUN_KEYS`], which the caller supplies):
    /// each key is checked for its name and read on its own through this struct's
    /// deserializer, then the whole is checked by [`TuneConfig::problem`]. The model, data and
    /// output of the result are placeholders.
    pub fn from_settings(table: &toml::Table) -> std::result::Result<TuneConfig, SettingsError> {
        let accepted = Self::settings_keys();
        for (key, value) in table {
            if RUN_KEYS.contains(&key.as_str()) {
                return Err(SettingsError::RunKey { key: key.clone() });
            }
            if !accepted.contains(key) {
                return Err(SettingsError::Unknown {
                    key: key.clone(),
                    accepted,
                });
            }
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            TuneConfig::deserialize(toml::Value::Table(one)).map_err(|e| {
                SettingsError::Invalid {
                    key: key.clone(),
                    message: e.message().trim_end().to_string(),
                }
            })?;
        }
        let mut all = table.clone();
        for k in RUN_KEYS {
            all.insert(k.to_string(), toml::Value::String(format!("<{k}>")));
        }
        let cfg = TuneConfig::deserialize(toml::Value::Table(all)).map_err(|e| {
            SettingsError::Invalid {
                key: String::new(),
                message: e.message().trim_end().to_string(),
            }
        })?;
        if let Some((key, message)) = cfg.problem() {
            return Err(SettingsError::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            });
        }
        Ok(cfg)
    }

    pub fn mode(&self) -> Mode {
        if self.full {
            Mode::Full
        } else {
            Mode::Lora(LoraSettings {
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                targets: self.targets.clone(),
            })
        }
    }

    /// The settings that shape the training trajectory: a checkpoint resumes only under the
    /// same ones (eval, save cadence and output may change).
    pub fn trajectory_key(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            // Settings that change memory or bookkeeping, never the losses: a run killed for
            // memory can resume with `--recompute` or a smaller `loss_chunk`.
            for k in [
                "output",
                "eval_every",
                "save_every",
                "keep_checkpoints",
                "recompute",
                "loss_chunk",
            ] {
                m.remove(k);
            }
            // Without an anchor its settings change nothing (and checkpoints written before
            // they existed still resume); the batch size matters only with an anchor set.
            // Off, bf16 leaves the key as runs before it had it (their checkpoints resume).
            if !self.bf16 {
                m.remove("bf16");
            }
            if self.anchor_kind() == Anchor::Off {
                for k in ["anchor", "anchor_beta", "anchor_data", "anchor_batch_size"] {
                    m.remove(k);
                }
            } else if self.anchor_data.is_none() {
                m.remove("anchor_batch_size");
            }
            // An f32 base leaves the key out (checkpoints written before it existed resume).
            if !self.quantized {
                m.remove("quantized");
            }
        }
        v
    }

    /// What `anchor` names.
    pub fn anchor_kind(&self) -> Anchor<'_> {
        match self.anchor.trim() {
            "" => Anchor::Off,
            "base" => Anchor::Base,
            path => Anchor::Model(path),
        }
    }

    /// Learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let decay_steps = total.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - progress),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

impl Target {
    /// Parses a comma-separated list (`q,k,v` or `all`).
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Target>, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(Target::ALL.to_vec());
        }
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let t = Target::parse(part).ok_or_else(|| {
                format!("unknown target module `{part}` (choose from q, k, v, o, gate, up, down, or all)")
            })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_keys_are_the_fields_and_settings_leave_out_the_run_keys() {
        let keys = TuneConfig::keys();
        for k in ["lr", "rank", "alpha", "max_len", "model", "recompute"] {
            assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
        }
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted: {keys:?}");
        let settings = TuneConfig::settings_keys();
        assert_eq!(settings.len(), keys.len() - RUN_KEYS.len());
        assert!(!settings.iter().any(|k| k == "model" || k == "data"));
    }

    #[test]
    fn anchor_settings_enter_the_trajectory_only_when_an_anchor_is_set() {
        let keys = |c: &TuneConfig| -> Vec<String> {
            let v = c.trajectory_key();
            let mut k: Vec<String> = v
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with("anchor"))
                .cloned()
                .collect();
            k.sort();
            k
        };
        // Off: none of them, so checkpoints written before these settings existed resume.
        let off = TuneConfig {
            anchor_beta: 3.0,
            ..TuneConfig::default()
        };
        assert!(keys(&off).is_empty());
        assert_eq!(off.trajectory_key(), TuneConfig::default().trajectory_key());
        let base = TuneConfig {
            anchor: "base".into(),
            ..TuneConfig::default()
        };
        assert_eq!(keys(&base), ["anchor", "anchor_beta", "anchor_data"]);
        let other_beta = TuneConfig {
            anchor_beta: 0.2,
            ..base.clone()
        };
        assert_ne!(base.trajectory_key(), other_beta.trajectory_key());
        let set = TuneConfig {
            anchor_data: Some("a.jsonl".into()),
            ..base.clone()
        };
        assert_eq!(
            keys(&set),
            ["anchor", "anchor_batch_size", "anchor_beta", "anchor_data"]
        );
    }

    #[test]
    fn settings_are_checked_by_name_type_and_value() {
        let cfg = TuneConfig::from_settings(&table("lr = 1e-4\nrank = 4\nmax_len = 64")).unwrap();
        assert_eq!((cfg.lr, cfg.rank, cfg.max_len), (1e-4, 4, 64));
        let e = TuneConfig::from_settings(&table("learning_rate = 1e-4")).unwrap_err();
        assert_eq!(e.key(), "learning_rate");
        assert!(
            matches!(&e, SettingsError::Unknown { accepted, .. } if accepted.iter().any(|k| k == "lr"))
        );
        let e = TuneConfig::from_settings(&table("model = \"x.gguf\"")).unwrap_err();
        assert_eq!(
            e,
            SettingsError::RunKey {
                key: "model".into()
            }
        );
        let e = TuneConfig::from_settings(&table("lr = \"fast\"")).unwrap_err();
        assert_eq!(e.key(), "lr");
        assert!(e.to_string().contains("string"), "{e}");
        let e = TuneConfig::from_settings(&table("schedule = \"wavy\"")).unwrap_err();
        assert!(
            e.key() == "schedule" && e.to_string().contains("wavy"),
            "{e}"
        );
        let e = TuneConfig::from_settings(&table("batch_size = 0")).unwrap_err();
        assert_eq!(
            e,
            SettingsError::Invalid {
                key: "batch_size".into(),
                message: "must be at least 1".into()
            }
        );
    }
}
