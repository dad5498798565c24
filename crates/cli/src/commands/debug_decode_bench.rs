//! `safetune debug-decode-bench` (hidden): greedy decoding of exactly N new tokens after
//! fixed-length prompts, in one batch, timed; prints JSON (bench/decode_throughput.py).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_model::bench::{decode_throughput, synthetic_prompts};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

#[derive(Debug, Args)]
pub struct DebugDecodeBenchArgs {
    /// The model: a .gguf file or a Hugging Face directory.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    /// GGUF only: keep weights quantized.
    #[arg(long)]
    pub quantized: bool,

    /// Quantize dense weights at load (`q8_0`), as `generate --quantize`.
    #[arg(long, value_name = "FORMAT", conflicts_with_all = ["quantized", "bf16"])]
    pub quantize: Option<super::common::QuantizeFormat>,

    /// Every matrix in bf16 on the AMX kernel, as `generate --bf16` (needs AMX-BF16).
    #[arg(long, conflicts_with = "quantized")]
    pub bf16: bool,

    /// Prompts decoded together (ignored with --prompts).
    #[arg(long = "batch-size", alias = "batch", default_value_t = 1)]
    pub batch: usize,

    /// Tokens in every prompt (ignored with --prompts).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,

    /// New tokens per prompt; end-of-turn tokens do not stop a row.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,

    /// A JSON array of token-id arrays, all the same length, instead of the built-in prompts.
    #[arg(long, value_name = "FILE.json")]
    pub prompts: Option<PathBuf>,

    /// Measured runs after one untimed warm-up; the fastest decode is printed.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

pub fn run(args: DebugDecodeBenchArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::parse(&args.model)?;
    let engine = LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: args.quantized,
            quantize_dense: args.quantize.is_some(),
            bf16: args.bf16,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load {spec}"))?;
    let prompts: Vec<Vec<u32>> = match &args.prompts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected a JSON array of token-id arrays",
                    path.display()
                )
            })?
        }
        None => synthetic_prompts(&engine.tok, args.batch, args.prompt_tokens)?,
    };
    // Warm-up: first-touch of weights and caches, thread-pool start.
    let warm: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p[..p.len().min(8)].to_vec())
        .collect();
    decode_throughput(&engine.model, &engine.tok, &warm, 4)?;
    let mut best: Option<safetune_model::bench::DecodeRun> = None;
    for _ in 0..args.runs.max(1) {
        let r = decode_throughput(&engine.model, &engine.tok, &prompts, args.new_tokens)?;
        match &best {
            Some(b) if b.decode_s <= r.decode_s => {}
            _ => best = Some(r),
        }
    }
    let run = best.expect("at least one run");
    let mut json = serde_json::to_value(&run)?;
    json["model"] = engine.model_id.clone().into();
    json["quantized"] = args.quantized.into();
    json["weights"] = if args.bf16 {
        "bf16"
    } else if args.quantize.is_some() {
        "q8_0"
    } else if args.quantized {
        "gguf-blocks"
    } else {
        "f32"
    }
    .into();
    json["prompt_ids"] = serde_json::to_value(&prompts)?;
    println!("{}", serde_json::to_string(&json)?);
    Ok(())
}
