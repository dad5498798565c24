//! `safetune label STUDY_DIR`: a blind labelling file of a study's answers (stratified by
//! condition, benchmark and the primary judge's verdict; no verdicts in it), and
//! `safetune label import STUDY_DIR FILE`: the filled labels into the study's `human_labels`
//! table. The sampling and the import live in `safetune_study::labels`; this module parses flags
//! and prints.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use safetune_study::labels::{
    import_labels, sample_answers, write_label_file, SampleOptions, TODO_FILE, UNNAMED_LABELLER,
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LabelArgs {
    #[command(subcommand)]
    pub command: Option<LabelCommand>,

    /// A study directory (the one holding study.db).
    #[arg(value_name = "STUDY_DIR", required = true)]
    pub dir: Option<PathBuf>,

    /// Answers drawn per cell (condition x benchmark x primary judge's verdict); a cell with
    /// fewer unlabelled answers gives all of them.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub per_cell: u64,

    /// Seed of the draw and of the order of the rows (the same seed and store give the same file).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,

    /// The labelling file to write. Default: STUDY_DIR/labels-todo.jsonl.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Overwrite the output file if it exists (it may hold labels).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum LabelCommand {
    /// Store the labels of a filled labelling file in the study's database (table human_labels;
    /// one row per answer and labeller, replaced when imported again).
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The study directory the file was written for.
    #[arg(value_name = "STUDY_DIR")]
    pub dir: PathBuf,

    /// The filled labelling file: `label` is refusal, compliance or unclear; rows left empty are
    /// counted and skipped.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Who labelled, for rows whose own `labeller` field is empty (default: unnamed).
    #[arg(long, value_name = "NAME")]
    pub labeller: Option<String>,
}

pub fn run(args: LabelArgs) -> anyhow::Result<()> {
    if let Some(LabelCommand::Import(a)) = args.command {
        return import(a);
    }
    let Some(dir) = args.dir else {
        bail!("STUDY_DIR is required\nhint: safetune label STUDY_DIR [--per-cell N] [-o FILE]");
    };
    let opts = SampleOptions {
        per_cell: args.per_cell as usize,
        seed: args.seed,
    };
    let s = sample_answers(&dir, &opts)?;
    if s.rows.is_empty() {
        if s.already_labelled > 0 {
            bail!(
                "{}: every answer in the store is labelled already ({})",
                dir.display(),
                s.already_labelled
            );
        }
        bail!(
            "{}: the store holds no answers yet\nhint: run the study's generate steps first (safetune study CONFIG.toml --output {} --resume)",
            dir.display(),
            dir.display()
        );
    }
    let out = args.output.unwrap_or_else(|| dir.join(TODO_FILE));
    write_label_file(&out, &s.rows, args.force)?;
    println!(
        "wrote {}: {} answers to label, up to {} from each of {} cells (condition x benchmark x verdict of the primary judge, {}), seed {}",
        out.display(),
        s.rows.len(),
        opts.per_cell,
        s.cells,
        s.primary.as_deref().unwrap_or("none"),
        opts.seed
    );
    if s.short_cells > 0 {
        println!(
            "{} cells had fewer than {} unlabelled answers (all of them are in the file)",
            s.short_cells, opts.per_cell
        );
    }
    if s.already_labelled > 0 {
        println!(
            "{} answers already labelled were left out",
            s.already_labelled
        );
    }
    println!(
        "next: set each row's `label` to refusal, compliance or unclear (the file holds no judge verdicts), then\n  safetune label import {} {} --labeller NAME",
        dir.display(),
        out.display()
    );
    Ok(())
}

fn import(a: ImportArgs) -> anyhow::Result<()> {
    let s = import_labels(&a.dir, &a.file, a.labeller.as_deref())?;
    println!(
        "read {} rows from {}: {} refusal, {} compliance, {} unclear; {} not labelled yet (skipped)",
        s.rows,
        a.file.display(),
        s.refusal,
        s.compliance,
        s.unclear,
        s.empty
    );
    println!(
        "stored in {}: {} new, {} replaced (labellers: {})",
        a.dir.join(safetune_study::runner::STORE_FILE).display(),
        s.stored.inserted,
        s.stored.updated,
        s.labellers.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    if s.labellers.contains(UNNAMED_LABELLER) {
        eprintln!("note: rows without a labeller were stored as `{UNNAMED_LABELLER}`; pass --labeller NAME to name them");
    }
    Ok(())
}
