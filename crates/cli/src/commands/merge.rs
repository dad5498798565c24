//! `safetune merge`: fold a LoRA adapter into its base model and write a Hugging Face model
//! directory. Flags and printing only; the work is `safetune_train::peft::merge`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use safetune_model::ModelSpec;
use safetune_train::peft::{merge, SaveDType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a .gguf file (dequantized), a Hugging Face directory or hf:ORG/NAME.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    /// LoRA adapter directory in the PEFT layout (adapter_config.json,
    /// adapter_model.safetensors). Without one, the base model is written as it is (e.g. a GGUF
    /// file converted to a Hugging Face directory).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Output directory (must not exist or be empty): config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json.
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,

    /// Precision of the stored weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::parse(&args.model)?;
    super::common::check_adapter(args.adapter.is_some(), &spec)?;
    let dtype = match args.dtype {
        DTypeArg::F32 => SaveDType::F32,
        DTypeArg::Bf16 => SaveDType::Bf16,
        DTypeArg::F16 => SaveDType::F16,
    };
    match &args.adapter {
        Some(a) => eprintln!("loading {spec} and {}", a.display()),
        None => eprintln!("loading {spec} (no adapter: writing the base model)"),
    }
    let s =
        merge(&spec, args.adapter.as_deref(), &args.output, dtype).with_context(|| match &args
            .adapter
        {
            Some(a) => format!("cannot merge {} into {spec}", a.display()),
            None => format!("cannot write {spec} to {}", args.output.display()),
        })?;
    eprintln!(
        "merged the adapter into {} layers; wrote {} tensors ({:.1}M parameters{}) and {} to {}",
        s.adapted_layers,
        s.export.tensors,
        s.export.parameters as f64 / 1e6,
        if s.export.tied { ", tied LM head" } else { "" },
        s.export
            .files
            .iter()
            .filter(|f| *f != "model.safetensors")
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        s.out.display()
    );
    Ok(())
}
