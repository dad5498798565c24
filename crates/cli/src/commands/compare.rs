//! `safetune compare DIR_A DIR_B`: two eval runs on shared prompts.

use std::path::PathBuf;

use clap::Args;
use safetune_eval::compare::{compare_dirs, format_comparison};

use super::common::OutputFormat;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// First eval output directory (the reference).
    pub a: PathBuf,
    /// Second eval output directory; differences are B - A.
    pub b: PathBuf,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let c = compare_dirs(&args.a, &args.b, args.seed)?;
    match args.format {
        OutputFormat::Text => print!("{}", format_comparison(&c)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&c)?),
    }
    Ok(())
}
