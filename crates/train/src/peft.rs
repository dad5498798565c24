//! PEFT adapters on the training side: the adapter types (defined in
//! [`safetune_model::adapter`], because loading a model with `--adapter` happens in the model
//! crate), and [`merge`], which folds an adapter into its base model and writes a Hugging Face
//! directory (`safetune merge`).
//!
//! Layout (what peft 0.21 reads and writes): `adapter_config.json` (`peft_type` "LORA", `r`,
//! `lora_alpha`, `target_modules`, ...) and `adapter_model.safetensors` with
//! `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the
//! merged weight is `W + (alpha / r) B A` (`alpha / sqrt(r)` with `use_rslora`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetune_model::export::{write_hf_dir, ExportSummary};
use safetune_model::{LoadOptions, LocalEngine, ModelError, ModelSpec, Result};

pub use safetune_model::adapter::{
    linears, linears_mut, lora_key, Adapter, AdapterConfig, ApplySummary, Layers, LoraInit,
    LoraPair, TargetModules, CONFIG_FILE, KEY_PREFIX, LINEAR_MODULES, WEIGHTS_FILE,
};

/// Stored precision of merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    Bf16,
    F16,
}

impl SaveDType {
    pub fn dtype(self) -> DType {
        match self {
            SaveDType::F32 => DType::F32,
            SaveDType::Bf16 => DType::BF16,
            SaveDType::F16 => DType::F16,
        }
    }
}

/// What [`merge`] did.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub out: PathBuf,
    /// Layers the adapter changed.
    pub adapted_layers: usize,
    pub export: ExportSummary,
}

/// The Hugging Face directory a local spec reads its config and tokenizer files from; `None`
/// for a GGUF file (they are written from its metadata).
fn base_dir(spec: &ModelSpec) -> Result<Option<PathBuf>> {
    match spec {
        ModelSpec::Gguf(_) => Ok(None),
        ModelSpec::HfDir(d) => Ok(Some(d.clone())),
        ModelSpec::Hub { repo, revision } => Ok(Some(safetune_model::hub::download_model(
            repo,
            revision.as_deref(),
        )?)),
        ModelSpec::OpenAi { .. } => Err(ModelError::Spec {
            spec: spec.to_string(),
            message:
                "a remote model cannot be merged; give a GGUF file or a Hugging Face directory"
                    .into(),
        }),
    }
}

/// Loads `base` in f32 (GGUF weights dequantized), merges the adapter at `adapter_dir` (if any)
/// into it and writes a Hugging Face directory at `out` (config.json, model.safetensors with the
/// checkpoint's key names, tokenizer.json and tokenizer_config.json with the chat template).
/// `out` must not exist or be empty; it appears whole or not at all.
pub fn merge(
    base: &ModelSpec,
    adapter_dir: Option<&Path>,
    out: &Path,
    dtype: SaveDType,
) -> Result<MergeSummary> {
    let dir = base_dir(base)?;
    let mut engine = LocalEngine::load(
        base,
        &LoadOptions {
            quantized: false,
            ..LoadOptions::default()
        },
    )?;
    let adapted_layers = match adapter_dir {
        Some(dir) => {
            let applied = Adapter::load(dir)?.apply(&mut engine.model, true)?;
            applied.merged + applied.unmerged
        }
        None => 0,
    };
    let export = write_hf_dir(
        &engine.model,
        &engine.tok,
        dir.as_deref(),
        out,
        dtype.dtype(),
    )?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        adapted_layers,
        export,
    })
}

/// Logits of every position of one token sequence: (T, V) as rows. For comparisons against
/// other implementations (`safetune debug-logits`, bench/peft_compare.py).
pub fn sequence_logits(engine: &LocalEngine, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    if ids.is_empty() {
        return Err(ModelError::Other("no token ids given".into()));
    }
    let vocab = engine.model.cfg.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(ModelError::Other(format!(
            "token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let logits = engine.model.forward(&t, None)?.squeeze(0)?;
    Ok(logits.to_vec2::<f32>()?)
}
