//! Flags shared by several commands, defined once: the input dataset ([`InputArgs`], resolved
//! by [`resolve_input`] and nowhere else), how to read it ([`ReadArgs`]), a LoRA adapter
//! ([`AdapterArgs`]) and the settings of a client of a remote model ([`ClientArgs`]).
//!
//! A command that needs a different help text, a default, or an old spelling for one of these
//! flags changes it with `#[command(mut_arg("data", |a| ...))]` on its own arguments struct, so
//! the flag keeps one name and one resolution everywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};
use safetune_data::demo::{demo_text, resolve_dataset, DEMO_SETS};
use safetune_data::read::{Columns, InputFormat, ReadOptions, SkipReport};
use safetune_eval::rm::remote::RemoteOptions;
use safetune_model::{LoadOptions, ModelSpec};
use safetune_openai::ClientConfig;

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

/// The input dataset of a command: `--data FILE` or `--data demo:NAME`.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// The input dataset: a file, or demo:NAME for a built-in demo set (demo:medical, demo:code,
    /// demo:stem, demo:overrefusal, demo:preferences, ...).
    #[arg(long = "data", value_name = "DATASET")]
    pub data: Option<String>,
}

impl InputArgs {
    /// The dataset as given (`demo:medical` or a path), for messages and reports.
    pub fn spec(&self) -> &str {
        self.data.as_deref().unwrap_or("")
    }

    /// Takes a positional dataset (the old spelling of `audit FILE`, `transform FILE`) when
    /// `--data` is not given.
    pub fn or_positional(mut self, file: Option<String>) -> Self {
        if self.data.is_none() {
            self.data = file;
        }
        self
    }

    /// The file to read: a `demo:NAME` written to the demo cache, or the path, which must exist.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.data {
            Some(spec) => resolve_input(spec),
            None => bail!("no input dataset given\nhint: pass --data FILE or --data demo:NAME"),
        }
    }
}

/// The names of the built-in demo sets, comma-separated.
pub fn demo_names() -> String {
    DEMO_SETS
        .iter()
        .map(|(n, _, _)| format!("demo:{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one place a dataset argument becomes a file: `demo:NAME` is written to the demo cache
/// (an unknown name lists the known ones); any other string is a path that must exist. Called
/// before any work starts, so a missing input is reported as that and nothing else.
pub fn resolve_input(spec: &str) -> anyhow::Result<PathBuf> {
    if let Some(name) = spec.strip_prefix("demo:") {
        if demo_text(name).is_none() {
            bail!(
                "unknown demo set `{spec}`; the demo sets are {}",
                demo_names()
            );
        }
        return Ok(resolve_dataset(spec)?);
    }
    resolve_input_path(Path::new(spec))
}

/// [`resolve_input`] for a path that may not be UTF-8 (e.g. from a config file).
pub fn resolve_input_path(path: &Path) -> anyhow::Result<PathBuf> {
    if let Some(spec) = path.to_str().filter(|s| s.starts_with("demo:")) {
        return resolve_input(spec);
    }
    match std::fs::metadata(path) {
        Ok(_) => Ok(path.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "input file {} does not exist\nhint: give an existing file, or demo:NAME for a built-in set ({})",
            path.display(),
            demo_names()
        ),
        Err(e) => bail!("cannot read input file {}: {e}", path.display()),
    }
}

/// A prompt-set argument (`eval --bench`, `prompts show`): a built-in benchmark name passes
/// through; anything else is a dataset, resolved by [`resolve_input`].
pub fn resolve_prompt_set(spec: &str) -> anyhow::Result<String> {
    if safetune_data::prompts::BUILTIN
        .iter()
        .any(|(n, _, _)| *n == spec)
    {
        return Ok(spec.to_string());
    }
    let path = resolve_input(spec)?;
    match path.to_str() {
        Some(p) => Ok(p.to_string()),
        None => bail!("{}: not a UTF-8 path", path.display()),
    }
}

/// How to read a dataset file.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
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

impl ReadArgs {
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

/// How a local model's matrices are held: the one definition of the weight flags, flattened
/// into `generate`, `eval`, `serve` and `utility` (`#[command(flatten)] weights: WeightsArgs`).
/// A GGUF model decodes on its own quantized blocks by default; `--f32` is the exact
/// dequantized path; `--quantize q8_0` holds dense weights (a safetensors model, or a GGUF
/// dequantized first) as Q8_0; `--bf16` holds them in bf16 for the AMX kernel. `--f32`,
/// `--quantize` and `--bf16` exclude each other (an error naming both flags). The old
/// `--quantized` (now the default) is still accepted and changes nothing; beside `--f32` or
/// `--bf16`, which replace the GGUF blocks it asks to keep, it is a usage error. Meant to be adopted
/// by every command that loads a model for inference, beside `tune`'s own precision flags.
#[derive(Debug, Clone, Args)]
pub struct WeightsArgs {
    /// Exact f32 path: dequantize a GGUF model's blocks to f32 (slower decoding). Without it a
    /// GGUF model decodes on its quantized blocks.
    #[arg(long = "f32", conflicts_with_all = ["quantize", "quantized", "bf16"])]
    pub f32: bool,

    /// Accepted for old command lines: GGUF blocks are kept by default now.
    #[arg(long, hide = true)]
    pub quantized: bool,

    /// Quantize dense f32 weights when loading, after merging any adapter into them (which
    /// this implies): `q8_0`. A safetensors model (e.g. a study's merged aligned model) then
    /// decodes on the fast kernels; greedy answers stay close to the f32 path's, not always
    /// identical. A GGUF model is dequantized first, then quantized to Q8_0.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<QuantizeFormat>,

    /// Hold every matrix in bf16 for the AMX-BF16 kernel (f32 sums), after merging any adapter
    /// into the weights (which this implies); a GGUF model is dequantized first. Half the
    /// memory of f32 and faster decoding; greedy answers stay close to the f32 path's, not always
    /// identical. Needs a CPU with AMX-BF16 (Intel Xeon 4th generation or later): refused
    /// before the model loads elsewhere, and with SAFETUNE_ISA=avx2 or scalar.
    #[arg(long, conflicts_with_all = ["quantize", "quantized"])]
    pub bf16: bool,
}

/// Formats dense weights can be quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeFormat {
    /// 8-bit levels with one f16 scale per 32 values.
    #[value(name = "q8_0")]
    Q8_0,
}

impl WeightsArgs {
    /// The load options for these flags, a batch size and an adapter. `--bf16` where this
    /// process cannot run the bf16 kernel (no AMX-BF16, or SAFETUNE_ISA below AVX-512) is an
    /// error here, before anything loads.
    pub fn load_options(
        &self,
        batch_size: usize,
        adapter: &AdapterArgs,
    ) -> anyhow::Result<LoadOptions> {
        if self.bf16 {
            if let Some(e) = safetune_model::bf16::bf16_unavailable() {
                bail!("{e}");
            }
        }
        let dense = self.quantize.is_some() || self.bf16;
        Ok(LoadOptions {
            quantized: !self.f32 && !dense,
            batch_size,
            adapter: adapter.adapter.clone(),
            merge_adapter: adapter.merge_adapter || dense,
            quantize_dense: self.quantize.is_some(),
            bf16: self.bf16,
        })
    }
}

/// A LoRA adapter applied to the model a command loads (`generate`, `eval`, `serve`, `utility`,
/// `debug-logits`).
#[derive(Debug, Clone, Args)]
pub struct AdapterArgs {
    /// LoRA adapter directory in the PEFT layout (adapter_config.json,
    /// adapter_model.safetensors), e.g. from `safetune tune` or Python PEFT; local models only.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Merge the adapter into the weights at load time (faster decoding; dense weights only,
    /// quantized ones keep a separate low-rank path).
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
}

impl AdapterArgs {
    /// Refuses an adapter on a remote model (see [`check_adapter`]).
    pub fn check_spec(&self, spec: &ModelSpec) -> anyhow::Result<()> {
        check_adapter(self.adapter.is_some(), spec)
    }
}

/// The one check for an adapter on a remote model: an `openai:` model cannot take an adapter
/// directory (its weights are not loaded here); the server must serve the adapted model, and
/// the command names it.
pub fn check_adapter(has_adapter: bool, spec: &ModelSpec) -> anyhow::Result<()> {
    if has_adapter && matches!(spec, ModelSpec::OpenAi { .. }) {
        bail!(
            "an adapter with an openai: model must be served by the server; pass the served adapter name as the model (openai:URL#NAME)\nhint: `safetune serve --model BASE --lora NAME=DIR` serves it as NAME (vLLM: --enable-lora --lora-modules NAME=DIR)"
        );
    }
    Ok(())
}

/// The client of a remote model (openai: models, a proxied server, reward-model endpoints).
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Remote models: retries after the first attempt on connection errors, 408, 429 and 5xx
    /// [default: 5].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,

    /// Remote models: time limit of one request, in seconds [default: 600; 300 for reward-model
    /// endpoints].
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,

    /// Remote models: environment variable holding the API key. The key goes only to https
    /// servers and loopback hosts; a variable named here is an error for plain http elsewhere
    /// (see --allow-insecure), the default one is simply not sent there.
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "VAR")]
    pub api_key_env: String,

    /// Remote models: send the API key over plain http to a host that is not loopback (a
    /// trusted network only).
    #[arg(long)]
    pub allow_insecure: bool,
}

impl ClientArgs {
    /// The openai: client settings, `concurrency` requests at once.
    pub fn client_config(&self, concurrency: usize) -> ClientConfig {
        let d = ClientConfig::default();
        ClientConfig {
            concurrency: concurrency.max(1),
            max_retries: self.retries.unwrap_or(d.max_retries),
            request_timeout: self
                .timeout
                .map(Duration::from_secs)
                .unwrap_or(d.request_timeout),
            api_key_env: self.api_key_env.clone(),
            allow_insecure: self.allow_insecure,
            ..d
        }
    }

    /// The reward-model endpoint settings, `concurrency` requests in flight.
    pub fn remote_options(&self, concurrency: usize) -> RemoteOptions {
        let d = RemoteOptions::default();
        RemoteOptions {
            max_retries: self.retries.unwrap_or(d.max_retries),
            timeout: self.timeout.map(Duration::from_secs).unwrap_or(d.timeout),
            concurrency: concurrency.max(1),
            api_key_env: self.api_key_env.clone(),
            allow_insecure: self.allow_insecure,
            ..d
        }
    }
}

/// The seeded train/test split of a prompt or question set (by each item's id): the same two
/// flags, with the same defaults, on every command that splits (`prompts`, `eval`, `utility`)
/// and as `split_seed` / `test_fraction` in a study's `[study]` table.
#[derive(Debug, Clone, clap::Args)]
pub struct SplitArgs {
    /// Seed of the train/test split.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Share of each set that goes to the test split.
    #[arg(long, default_value_t = 0.5)]
    pub test_fraction: f64,
}

#[cfg(test)]
mod weights_tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        weights: WeightsArgs,
        #[command(flatten)]
        adapter: AdapterArgs,
    }

    fn load(args: &[&str]) -> Result<LoadOptions, String> {
        let argv = std::iter::once("cmd").chain(args.iter().copied());
        let c = Cmd::try_parse_from(argv).map_err(|e| e.to_string())?;
        c.weights
            .load_options(4, &c.adapter)
            .map_err(|e| e.to_string())
    }

    /// `--bf16` excludes the other weight flags (a usage error naming both); alone it holds
    /// the merged dense weights in bf16 where this CPU has AMX-BF16, and is refused naming it
    /// where not.
    #[test]
    fn bf16_excludes_the_other_weight_flags_and_needs_amx() {
        for (args, other) in [
            (&["--bf16", "--f32"][..], "--f32"),
            (&["--f32", "--bf16"][..], "--f32"),
            (&["--bf16", "--quantize", "q8_0"][..], "--quantize <FORMAT>"),
            // The old flag asks to keep GGUF blocks, which bf16 replaces: not a silent no-op.
            (&["--bf16", "--quantized"][..], "--quantized"),
            (&["--quantized", "--bf16"][..], "--quantized"),
        ] {
            let err = load(args).unwrap_err();
            assert!(
                err.contains("--bf16") && err.contains(other) && err.contains("cannot be used"),
                "{args:?}: {err}"
            );
        }
        match safetune_model::bf16::bf16_unavailable() {
            None => {
                let o = load(&["--bf16", "--adapter", "a"]).unwrap();
                assert!(o.bf16 && !o.quantized && !o.quantize_dense && o.merge_adapter);
            }
            Some(_) => {
                let err = load(&["--bf16"]).unwrap_err();
                assert!(err.contains("AMX-BF16"), "{err}");
            }
        }
        assert!(!load(&[]).unwrap().bf16);
    }

    #[test]
    fn gguf_blocks_are_the_default_and_f32_is_the_exact_path() {
        let default = load(&[]).unwrap();
        assert!(default.quantized && !default.quantize_dense && !default.merge_adapter);
        assert_eq!(default.batch_size, 4);
        let old = load(&["--quantized"]).unwrap();
        assert!(
            old.quantized && !old.quantize_dense,
            "the old flag is a no-op"
        );
        let exact = load(&["--f32"]).unwrap();
        assert!(!exact.quantized && !exact.quantize_dense);
        let q8 = load(&["--quantize", "q8_0", "--adapter", "a"]).unwrap();
        assert!(!q8.quantized && q8.quantize_dense && q8.merge_adapter);
    }

    #[test]
    fn conflicting_weight_flags_name_both() {
        for args in [
            &["--f32", "--quantize", "q8_0"][..],
            &["--quantize", "q8_0", "--f32"][..],
            &["--f32", "--quantized"][..],
        ] {
            let err = load(args).unwrap_err();
            let other = if args.contains(&"--quantized") {
                "--quantized"
            } else {
                "--quantize <FORMAT>"
            };
            assert!(
                err.contains("--f32") && err.contains(other),
                "{args:?}: {err}"
            );
        }
        assert!(load(&["--quantize", "q4_0"]).unwrap_err().contains("q8_0"));
    }
}
