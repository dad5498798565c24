//! `safetune debug-logits` (hidden): the logits of one token sequence as JSON, for comparing
//! against other implementations (bench/peft_compare.py).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_train::peft::sequence_logits;

#[derive(Debug, Args)]
pub struct DebugLogitsArgs {
    /// The model: a .gguf file or a Hugging Face directory.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    #[command(flatten)]
    pub adapter: super::common::AdapterArgs,

    /// Comma-separated token ids (no special tokens are added).
    #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,

    /// GGUF only: keep weights quantized.
    #[arg(long)]
    pub quantized: bool,

    /// Output JSON: {"ids": [...], "logits": [[...], ...]} (one row per position).
    #[arg(long, short, value_name = "OUT.json")]
    pub output: PathBuf,
}

pub fn run(args: DebugLogitsArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    let engine = LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: args.quantized,
            adapter: args.adapter.adapter.clone(),
            merge_adapter: args.adapter.merge_adapter,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load {spec}"))?;
    let logits = sequence_logits(&engine, &args.ids)?;
    let json = serde_json::json!({"model": engine.model_id, "ids": args.ids, "logits": logits});
    std::fs::write(&args.output, serde_json::to_vec(&json)?)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "wrote logits for {} positions to {}",
        args.ids.len(),
        args.output.display()
    );
    Ok(())
}
