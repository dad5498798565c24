//! `safetune results STUDY_DIR --format csv|jsonl|parquet -o FILE`: every answer of a study as
//! one row (condition, factors, seed, benchmark, prompt id, prompt, answer, each judge's verdict,
//! RM scores, human label). The rows and the writers live in `safetune_study::results`.

use std::path::PathBuf;

use clap::Args;
use safetune_study::results::{export, Format};

#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// A study directory (the one holding study.db); it may still be running.
    #[arg(value_name = "STUDY_DIR")]
    pub dir: PathBuf,

    /// csv, jsonl or parquet. Default: the extension of -o, else csv.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,

    /// The file to write (written whole, then renamed into place). Default: standard output
    /// (not for parquet).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: ResultsArgs) -> anyhow::Result<()> {
    let format = match (&args.format, &args.output) {
        (Some(f), _) => Format::parse(f).map_err(|e| anyhow::anyhow!("--format: {e}"))?,
        (None, Some(p)) => Format::from_path(p).unwrap_or(Format::Csv),
        (None, None) => Format::Csv,
    };
    if format == Format::Parquet && args.output.is_none() {
        anyhow::bail!("--format parquet needs a file\nhint: add -o answers.parquet");
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let s = export(&args.dir, format, args.output.as_deref(), &mut lock)?;
    if let Some(p) = &args.output {
        eprintln!(
            "Wrote {} answers ({} columns, {} bytes) to {}",
            s.rows,
            s.columns,
            s.bytes,
            p.display()
        );
    }
    Ok(())
}
