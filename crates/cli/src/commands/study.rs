//! `safetune study CONFIG.toml`: plans the factorial study, runs (or resumes) it against the
//! study store, and writes the report. Flags, progress and printing only; the planner, runner
//! and stages live in `safetune_study`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use safetune_study::config::StudyConfig;
use safetune_study::plan::{plan, Plan};
use safetune_study::power::dry_run;
use safetune_study::report::write_report;
use safetune_study::runner::{run_plan, RunEvent, STORE_FILE};
use safetune_study::stages::builtin_registry;

#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study config (TOML; see examples/quickstart.toml and examples/paper-factors.toml).
    #[arg(value_name = "CONFIG.toml")]
    pub config: PathBuf,

    /// The study directory (store, step files, report). Default: runs/<study.name>.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Print the plan (steps by kind, counts, total size), the smallest effect each main effect
    /// can detect and the compute it takes (tokens, wall time of local models), and stop.
    #[arg(long)]
    pub dry_run: bool,

    /// Continue a study whose directory already has a store: finished steps and rows are
    /// reused, the rest is run.
    #[arg(long)]
    pub resume: bool,

    /// Do not write the report at the end.
    #[arg(long)]
    pub no_report: bool,
}

pub fn run(args: StudyArgs) -> anyhow::Result<()> {
    let cfg = StudyConfig::load(&args.config)?;
    let plan = plan(&cfg).with_context(|| format!("planning {}", args.config.display()))?;
    if args.dry_run {
        let power = dry_run(&cfg, &plan).with_context(|| {
            format!("estimating power and compute of {}", args.config.display())
        })?;
        let dir = args
            .output
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.study.name));
        print!(
            "{}{}{}",
            plan.render(),
            power.render(),
            safetune_study::external_train::render_commands(&plan, &dir)
        );
        return Ok(());
    }
    let dir = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.study.name));
    cfg.check_shared_dir()?;
    let store = dir.join(STORE_FILE);
    if store.exists() && !args.resume {
        bail!(
            "{} already holds a study store\nhint: pass --resume to continue it (finished steps are reused), or --output a new directory",
            dir.display()
        );
    }
    execute(&cfg, &plan, &dir, !args.no_report)
}

/// Runs (or resumes) a planned study in `dir` with a progress bar per step, writes the report
/// and prints summary.md and the report's path. Shared with `safetune quickstart`.
pub fn execute(cfg: &StudyConfig, plan: &Plan, dir: &Path, report: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let config_json = serde_json::to_value(cfg)?;
    let registry = builtin_registry();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut reused = 0usize;
    let summary = run_plan(plan, &config_json, dir, &registry, &mut |e| match e {
        RunEvent::Start {
            index,
            total,
            label,
            size,
            ..
        } => {
            bar.set_prefix(format!("[{}/{}]", index + 1, total));
            bar.set_message(label.clone());
            bar.set_length(*size as u64);
            bar.set_position(0);
        }
        RunEvent::Reused { .. } => reused += 1,
        RunEvent::Interrupted { label, .. } => say(
            &bar,
            format!("  redo    {label} (left running by a run that stopped)"),
        ),
        RunEvent::Progress { done, total, .. } => {
            bar.set_length(*total as u64);
            bar.set_position(*done as u64);
        }
        RunEvent::Finished { label, .. } => say(&bar, format!("  done    {label}")),
        RunEvent::Failed { label, error, .. } => {
            let first = error.lines().next().unwrap_or("");
            say(&bar, format!("  FAILED  {label}: {first}"))
        }
        RunEvent::Skipped { label, .. } => {
            say(&bar, format!("  skipped {label} (an input failed)"))
        }
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{} steps: {} run, {} reused from the store, {} failed, {} skipped ({:.0} s)",
        summary.steps,
        summary.executed,
        summary.reused,
        summary.failed.len(),
        summary.skipped,
        started.elapsed().as_secs_f64()
    );
    if report {
        let (_, files) = write_report(dir)?;
        print!(
            "{}",
            std::fs::read_to_string(&files.markdown).unwrap_or_default()
        );
        println!("\nReport: {}", files.html.display());
    }
    if !summary.failed.is_empty() {
        let mut msg = format!("{} step(s) failed:", summary.failed.len());
        for (label, err) in summary.failed.iter().take(5) {
            msg.push_str(&format!(
                "\n  {label}: {}",
                err.lines().next().unwrap_or("")
            ));
        }
        let hints: Vec<&str> = summary
            .failed
            .iter()
            .flat_map(|(_, e)| e.lines().filter(|l| l.starts_with("hint:")))
            .collect();
        if let Some(h) = hints.first() {
            msg.push_str(&format!("\n{h}"));
        }
        msg.push_str(&format!(
            "\nhint: fix the cause and rerun with --resume; finished steps are kept in {}",
            dir.display()
        ));
        bail!(msg);
    }
    Ok(())
}

/// A line above the progress bar; on standard error directly where the bar is hidden (not a
/// terminal: CI logs, pipes), so finished steps are still listed with their time.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}  [at {:.0} s]", bar.elapsed().as_secs_f64());
    } else {
        bar.println(line);
    }
}
