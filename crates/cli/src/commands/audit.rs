//! `safetune audit FILE`

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_data::audit::{Auditor, ExampleAudit};
use safetune_data::demo::resolve_dataset;
use safetune_data::read::DatasetReader;

use super::common::{InputArgs, OutputFormat};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Dataset file (JSONL, JSON, CSV or Parquet), or `demo:NAME` for a built-in demo set.
    pub file: String,

    #[command(flatten)]
    pub input: InputArgs,

    /// Print one JSON object per example (in input order) instead of the summary.
    #[arg(long)]
    pub per_example: bool,

    /// How to print the summary.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let path: PathBuf = resolve_dataset(&args.file)?;
    let opts = args.input.read_options();
    let mut reader = DatasetReader::open(&path, &opts)
        .with_context(|| format!("cannot open dataset {}", path.display()))?;
    let mut auditor = Auditor::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut index = 0;
    while let Some(ex) = reader.next_ref() {
        let ex = ex.map_err(|e| {
            anyhow::anyhow!(e)
                .context("hint: fix the record, or pass --skip-invalid to skip bad records")
        })?;
        let tags = auditor.add_ref(&ex);
        if args.per_example {
            let index_id;
            let id = match ex.id() {
                Some(id) => id,
                None => {
                    index_id = ex.index.to_string();
                    &index_id
                }
            };
            let row = ExampleAudit {
                index,
                id,
                line: ex.line,
                tags,
            };
            serde_json::to_writer(&mut out, &row)?;
            out.write_all(b"\n")?;
        }
        index += 1;
    }
    super::common::report_skipped(reader.skipped(), &path);
    if !args.per_example {
        let summary = auditor.summary();
        match args.format {
            OutputFormat::Json => {
                let mut v = serde_json::to_value(&summary)?;
                v["file"] = serde_json::Value::String(path.display().to_string());
                v["skipped"] = reader.skipped().count.into();
                serde_json::to_writer_pretty(&mut out, &v)?;
                out.write_all(b"\n")?;
            }
            OutputFormat::Text => out.write_all(summary.render_text(&args.file).as_bytes())?,
        }
    }
    out.flush()?;
    Ok(())
}
