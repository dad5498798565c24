//! `safetune report STUDY_DIR`: report.html, summary.md and results.json from a study store
//! (also while the study runs).

use std::path::PathBuf;

use clap::Args;
use safetune_study::report::write_report;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A study directory (the one holding study.db).
    #[arg(value_name = "STUDY_DIR")]
    pub dir: PathBuf,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let (_, files) = write_report(&args.dir)?;
    print!(
        "{}",
        std::fs::read_to_string(&files.markdown).unwrap_or_default()
    );
    println!(
        "\nWrote {}, {} and {}",
        files.html.display(),
        files.markdown.display(),
        files.json.display()
    );
    Ok(())
}
