//! `safetune quickstart`

use std::path::PathBuf;

use clap::Args;
use safetune_study::quickstart::{run as run_quickstart, QuickstartConfig};

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Where to write the variants, audits and quickstart.json.
    #[arg(short, long, default_value = "safetune-quickstart")]
    pub output: PathBuf,

    /// Demo domain set to make variants of.
    #[arg(long, default_value = "medical", value_parser = ["medical", "code", "stem"])]
    pub domain: String,

    /// Seed for the transforms.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Smallest run (same steps today; the study stages honour it as they arrive).
    #[arg(long)]
    pub tiny: bool,
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let cfg = QuickstartConfig {
        out_dir: args.output,
        domain: args.domain,
        seed: args.seed,
    };
    let report = run_quickstart(&cfg, &mut |line| eprintln!("  {line}"))?;
    print!("{}", report.render());
    Ok(())
}
