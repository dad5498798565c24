//! Flags shared by several commands, defined once.

use std::path::Path;

use clap::{Args, ValueEnum};
use safetune_data::read::{Columns, InputFormat, ReadOptions, SkipReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormatArg {
    Auto,
    Messages,
    Alpaca,
    Sharegpt,
    PromptResponse,
    Csv,
    Parquet,
}

/// How to read a dataset file.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Record layout; `auto` looks at the extension and the first record.
    #[arg(long, value_enum, default_value_t = InputFormatArg::Auto)]
    pub input_format: InputFormatArg,

    /// Skip records that cannot be read (and report how many and why) instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,

    /// CSV/Parquet column holding the prompt (default: guessed, e.g. `prompt`, `instruction`).
    #[arg(long, value_name = "NAME")]
    pub prompt_column: Option<String>,

    /// CSV/Parquet column holding the response (default: guessed, e.g. `response`, `output`).
    #[arg(long, value_name = "NAME")]
    pub response_column: Option<String>,

    /// CSV/Parquet column holding a system prompt.
    #[arg(long, value_name = "NAME")]
    pub system_column: Option<String>,
}

impl InputArgs {
    pub fn read_options(&self) -> ReadOptions {
        let format = match self.input_format {
            InputFormatArg::Auto => InputFormat::Auto,
            InputFormatArg::Messages => InputFormat::Messages,
            InputFormatArg::Alpaca => InputFormat::Alpaca,
            InputFormatArg::Sharegpt => InputFormat::ShareGpt,
            InputFormatArg::PromptResponse => InputFormat::PromptResponse,
            InputFormatArg::Csv => InputFormat::Csv,
            InputFormatArg::Parquet => InputFormat::Parquet,
        };
        ReadOptions {
            format,
            skip_invalid: self.skip_invalid,
            columns: Columns {
                id: None,
                prompt: self.prompt_column.clone(),
                response: self.response_column.clone(),
                system: self.system_column.clone(),
            },
        }
    }
}

/// Prints what `--skip-invalid` skipped to stderr.
pub fn report_skipped(skipped: &SkipReport, path: &Path) {
    if skipped.count == 0 {
        return;
    }
    eprintln!(
        "warning: skipped {} invalid record(s) in {}",
        skipped.count,
        path.display()
    );
    for (reason, n) in &skipped.reasons {
        eprintln!("  {n:>6}  {reason}");
    }
    for e in &skipped.examples {
        eprintln!("  e.g. {e}");
    }
}

/// A LoRA adapter applied to a local model (`generate`, `serve`, `merge`).
#[derive(Debug, Clone, Args)]
pub struct AdapterArgs {
    /// LoRA adapter directory in the PEFT layout (adapter_config.json,
    /// adapter_model.safetensors), e.g. from `safetune tune` or Python PEFT.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,

    /// Merge the adapter into the weights at load time (faster decoding; dense weights only,
    /// quantized ones keep a separate low-rank path).
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
}

impl AdapterArgs {
    /// Refuses an adapter on a remote model: it can only be applied to weights loaded here.
    pub fn check_spec(&self, spec: &safetune_model::ModelSpec) -> anyhow::Result<()> {
        if self.adapter.is_some() && matches!(spec, safetune_model::ModelSpec::OpenAi { .. }) {
            anyhow::bail!(
                "--adapter needs a local model, not {spec}\nhint: serve the base model with `safetune serve --model BASE --adapter DIR` and point openai: at it"
            );
        }
        Ok(())
    }
}
