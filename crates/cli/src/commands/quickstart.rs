//! `safetune quickstart`: runs the embedded quickstart study (examples/quickstart.toml, or
//! examples/quickstart-tiny.toml with `--tiny`) into one directory, resuming what a previous run
//! finished, and prints the summary and the report's path.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use safetune_study::plan::plan;
use safetune_study::quickstart::config;

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// The study directory (store, step files, report.html). A rerun into it reuses every
    /// finished step.
    #[arg(short, long, default_value = "safetune-quickstart")]
    pub output: PathBuf,

    /// The smallest run of the same stages (under 3 minutes on two cores): 8 tuning examples,
    /// two variants, 8 prompts per benchmark, 20-token answers.
    #[arg(long)]
    pub tiny: bool,

    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let cfg = config(args.tiny)?;
    let plan = plan(&cfg).context("planning the quickstart study")?;
    if args.dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    eprintln!(
        "quickstart{}: {} steps into {} (the same study as `safetune study examples/{}`)",
        if args.tiny { " --tiny" } else { "" },
        plan.steps.len(),
        args.output.display(),
        if args.tiny {
            "quickstart-tiny.toml"
        } else {
            "quickstart.toml"
        }
    );
    super::study::execute(&cfg, &plan, &args.output, true)
}
