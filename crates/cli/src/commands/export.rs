//! `safetune export CONFIG.toml --to llama-factory|axolotl|trl`: the study's dataset variants with
//! a matching training config each.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use safetune_study::config::StudyConfig;
use safetune_study::export::{export, Target};
use safetune_study::runner::RunEvent;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    LlamaFactory,
    Axolotl,
    Trl,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The study config whose [data] and [factors] (and [mixing], [align]) define the variants;
    /// the model is its first [[models]] entry's train_model and the settings are [tune]'s
    /// ([export] base_model and template override the model and LLaMA-Factory's template).
    #[allow(rustdoc::broken_intra_doc_links)] // clap help text (TOML section names), not markdown
    #[arg(value_name = "CONFIG.toml")]
    pub config: PathBuf,

    /// The trainer to write for.
    #[arg(long, value_enum)]
    pub to: TargetArg,

    /// Output directory.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let cfg = StudyConfig::load(&args.config)?;
    let target = match args.to {
        TargetArg::LlamaFactory => Target::LlamaFactory,
        TargetArg::Axolotl => Target::Axolotl,
        TargetArg::Trl => Target::Trl,
    };
    let summary = export(&cfg, target, &args.output, &mut |e| {
        if let RunEvent::Finished { label, .. } = e {
            eprintln!("  made {label}");
        }
    })?;
    println!(
        "Wrote {} dataset(s) with training configs to {}:",
        summary.variants.len(),
        summary.out_dir.display()
    );
    for v in &summary.variants {
        println!(
            "  {:<40} {:>6} examples   {}",
            v.name, v.examples, v.command
        );
    }
    println!(
        "The commands are listed in {}; or let the study run them: [tune] backend = \"{}\".",
        summary.out_dir.join("export.json").display(),
        summary.target.backend().as_str()
    );
    Ok(())
}
