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

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
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
        let bad = |k: &str, m: &str| Err(TrainError::config(format!("key `{k}`"), m));
        if self.model.is_empty() {
            return bad("model", "no model given");
        }
        if self.data.as_os_str().is_empty() {
            return bad("data", "no training data given");
        }
        if self.output.as_os_str().is_empty() {
            return bad("output", "no output directory given");
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
        Ok(())
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
        }
        v
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
