//! `safetune eval`: generate answers for a benchmark (resumable), judge them (resumable) and
//! write metrics.json and summary.md. The stages live in safetune-model (generation) and
//! safetune-eval (judges, benchmarks, metrics).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_data::prompts::Split;
use safetune_eval::bench::{
    load_bench, prompt_rows, safety_metrics, summary_markdown, BenchOptions,
};
use safetune_eval::run::{judge_rows, read_judge_rows, read_judgments};
use safetune_model::job::{run_generation, JobOptions};
use safetune_model::{ModelSpec, Sampling};
use safetune_openai::load_generator;

use super::common::{resolve_prompt_set, AdapterArgs, ClientArgs, SplitArgs};
use super::judge::JudgeArgs;

#[derive(Debug, Args)]
#[command(mut_arg("retries", |a| a.help(
    "An openai: model under test (not the judge model): retries after the first attempt on \
     connection errors, 408, 429 and 5xx [default: 5]"
)))]
pub struct EvalArgs {
    /// The model under test: .gguf, HF directory, hf:ORG/NAME or openai:URL#MODEL.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    #[command(flatten)]
    pub adapter: AdapterArgs,

    /// advbench, harmbench, strongreject, donotanswer, overrefusal, a SALAD-Bench file
    /// (base `question` or attack-enhanced `augq`), a JSONL/CSV prompt file or demo:NAME.
    #[arg(long, value_name = "BENCH")]
    pub bench: String,

    #[command(flatten)]
    pub judge: JudgeArgs,

    /// Output directory: generations.jsonl, judgments.jsonl, metrics.json, summary.md.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,

    /// Split of a built-in set (default: test, for the benign over-refusal probes too: a
    /// study's alignment trains on their train split).
    #[arg(long, value_parser = |s: &str| s.parse::<Split>())]
    pub split: Option<Split>,

    /// Use every prompt of the set, ignoring the split.
    #[arg(long)]
    pub all: bool,

    #[command(flatten)]
    pub split_args: SplitArgs,

    /// A seeded random sample of N prompts of the split (the sample a study with `limit = N`
    /// and the same `--sample-seed` draws), never the first N.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// Seed of the `--limit` sample.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub sample_seed: u64,

    /// A prompt file holds benign prompts (report over-refusal instead of safety).
    #[arg(long)]
    pub benign: bool,

    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_new_tokens: usize,

    /// Prompts generated together (requests in flight for an openai: model).
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,

    #[command(flatten)]
    pub weights: super::common::WeightsArgs,

    // The client of the model under test; an openai: judge model's client keeps its defaults
    // (the judge library takes no such settings).
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    // Everything that can be checked without work is checked first.
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    let bench_spec = resolve_prompt_set(&args.bench)?;
    let opts = BenchOptions {
        split: args.split,
        all: args.all,
        split_seed: args.split_args.split_seed,
        test_fraction: args.split_args.test_fraction,
        limit: args.limit,
        sample_seed: args.sample_seed,
        harmful: Some(!args.benign),
        prompt_column: None,
    };
    let bench = load_bench(&bench_spec, &opts)?;
    eprintln!("{}: {} prompts", bench.name, bench.items.len());
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let gen_path = args.output.join("generations.jsonl");
    let load = args.weights.load_options(args.batch_size, &args.adapter)?;
    let client = args.client.client_config(args.batch_size);
    eprintln!("loading {spec}");
    let generator =
        load_generator(&spec, &load, &client).with_context(|| format!("cannot load {spec}"))?;
    let job = JobOptions {
        sampling: Sampling {
            max_new_tokens: args.max_new_tokens,
            ..Sampling::default()
        },
        batch_size: args.batch_size.max(1),
        raw: false,
    };
    run_generation(
        generator.as_ref(),
        &prompt_rows(&bench),
        &gen_path,
        &job,
        &mut |p| eprintln!("[{}/{}] generated", p.skipped + p.done, p.total),
    )
    .with_context(|| {
        format!(
            "generation stopped; finished rows are kept in {} and a rerun resumes",
            gen_path.display()
        )
    })?;
    drop(generator);
    let judge = args.judge.build(&args.judge.judge)?;
    let jpath = args.output.join("judgments.jsonl");
    let rows = read_judge_rows(&gen_path)?;
    judge_rows(judge.as_ref(), &rows, &jpath, &mut |d, t| {
        eprintln!("[{d}/{t}] judged")
    })?;
    let judged = read_judgments(&jpath)?;
    let m = safety_metrics(&bench.name, bench.harmful, bench.salad, &judged);
    let mpath = args.output.join("metrics.json");
    std::fs::write(&mpath, serde_json::to_string_pretty(&m)? + "\n")
        .with_context(|| format!("cannot write {}", mpath.display()))?;
    let md = summary_markdown(&m);
    std::fs::write(args.output.join("summary.md"), &md)?;
    print!("{md}");
    Ok(())
}
