//! `safetune generate`: answers for a prompt file, appended row by row to a JSONL file; a rerun
//! skips ids already there. Flags and printing only; the run lives in
//! `safetune_model::job::run_generation`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_model::job::{read_prompts, run_generation, JobOptions};
use safetune_model::{ModelSpec, Sampling};
use safetune_openai::load_generator;

use super::common::{AdapterArgs, ClientArgs, InputArgs};

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.required(true).alias("prompts").help(
    "JSONL prompts: each line has `prompt` (optionally `system`) or `messages`, and an `id` \
     (default: the line number); or demo:NAME (e.g. demo:overrefusal)"
)))]
pub struct GenerateArgs {
    /// The model: a .gguf file, a Hugging Face directory, or openai:BASE_URL#MODEL.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    #[command(flatten)]
    pub data: InputArgs,

    /// Output JSONL: one row per prompt with id, prompt, response, finish_reason and token counts.
    /// Rows already there are kept and their ids skipped.
    #[arg(long, short, value_name = "OUT.jsonl")]
    pub output: PathBuf,

    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_new_tokens: usize,

    /// Prompts generated together (a finished prompt's slot takes the next one at once); also
    /// the rows appended to the output at once.
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,

    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,

    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,

    /// Seed for sampling; each prompt's seed also depends on its id, so reruns reproduce.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,

    /// Stop generating at this string (repeatable); end-of-turn tokens always stop.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Send prompts as raw text instead of chat turns rendered with the model's template.
    #[arg(long)]
    pub raw: bool,

    #[command(flatten)]
    pub weights: super::common::WeightsArgs,

    #[command(flatten)]
    pub adapter: AdapterArgs,

    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if args.temperature.is_nan() || args.temperature < 0.0 {
        anyhow::bail!("--temperature must be 0 or more");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    let prompts = read_prompts(&args.data.path()?)?;
    let load = args.weights.load_options(args.batch_size, &args.adapter)?;
    let client = args.client.client_config(args.batch_size);
    eprintln!("loading {spec}");
    let generator =
        load_generator(&spec, &load, &client).with_context(|| format!("cannot load {spec}"))?;
    let opts = JobOptions {
        sampling: Sampling {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            stop: args.stop.clone(),
        },
        batch_size: args.batch_size,
        raw: args.raw,
    };
    let out = &args.output;
    let summary = run_generation(generator.as_ref(), &prompts, out, &opts, &mut |p| {
        eprintln!(
            "[{}/{}] {} tokens, {:.1} tokens/s{}",
            p.skipped + p.done,
            p.total,
            p.completion_tokens,
            p.tokens_per_s(),
            if p.skipped > 0 {
                format!(" ({} already done)", p.skipped)
            } else {
                String::new()
            }
        );
    })
    .with_context(|| {
        format!(
            "generation stopped; finished rows are kept in {} and a rerun resumes",
            out.display()
        )
    })?;
    eprintln!(
        "wrote {} rows to {} ({} skipped as already done; {} tokens in {:.1}s, {:.1} tokens/s)",
        summary.done,
        out.display(),
        summary.skipped,
        summary.completion_tokens,
        summary.elapsed_s,
        summary.tokens_per_s()
    );
    Ok(())
}
