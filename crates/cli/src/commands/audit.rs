//! `safetune audit --data DATASET` (or `safetune audit DATASET`)

use std::io::Write;

use anyhow::Context;
use clap::Args;
use safetune_data::audit::{Auditor, ExampleAudit};
use safetune_data::read::DatasetReader;

use super::common::{InputArgs, OutputFormat, ReadArgs};

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.required_unless_present("file").help(
    "The dataset (JSONL, JSON, CSV or Parquet), or demo:NAME for a built-in demo set \
     (demo:medical, demo:code, ...)"
)))]
pub struct AuditArgs {
    #[command(flatten)]
    pub data: InputArgs,

    /// The dataset as a positional argument (the same as --data).
    #[arg(value_name = "DATASET", hide = true, conflicts_with = "data")]
    pub file: Option<String>,

    #[command(flatten)]
    pub input: ReadArgs,

    /// Print one JSON object per example (in input order) instead of the summary.
    #[arg(long)]
    pub per_example: bool,

    /// How to print the summary.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let data = args.data.or_positional(args.file);
    let path = data.path()?;
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
            OutputFormat::Text => out.write_all(summary.render_text(data.spec()).as_bytes())?,
        }
    }
    out.flush()?;
    Ok(())
}
