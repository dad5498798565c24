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
use safetune_model::{LoadOptions, ModelSpec, Sampling};
use safetune_openai::{load_generator, ClientConfig};

use super::judge::JudgeArgs;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model under test: .gguf, HF directory, hf:ORG/NAME or openai:URL#MODEL.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    /// A LoRA adapter directory (PEFT layout) applied to a local model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// advbench, harmbench, strongreject, donotanswer, overrefusal, a SALAD-Bench file
    /// (base `question` or attack-enhanced `augq`) or a JSONL/CSV prompt file.
    #[arg(long, value_name = "BENCH")]
    pub bench: String,

    #[command(flatten)]
    pub judge: JudgeArgs,

    /// Output directory: generations.jsonl, judgments.jsonl, metrics.json, summary.md.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,

    /// Split of a built-in set (default: test for harmful sets, all for overrefusal).
    #[arg(long, value_parser = |s: &str| s.parse::<Split>())]
    pub split: Option<Split>,

    /// Use every prompt of the set, ignoring the split.
    #[arg(long)]
    pub all: bool,

    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,

    #[arg(long, default_value_t = 0.5)]
    pub test_fraction: f64,

    /// Only the first N prompts.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// A prompt file holds benign prompts (report over-refusal instead of safety).
    #[arg(long)]
    pub benign: bool,

    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_new_tokens: usize,

    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,

    /// GGUF only: keep weights quantized.
    #[arg(long)]
    pub quantized: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let opts = BenchOptions {
        split: args.split,
        all: args.all,
        split_seed: args.split_seed,
        test_fraction: args.test_fraction,
        limit: args.limit,
        harmful: Some(!args.benign),
        prompt_column: None,
    };
    let bench = load_bench(&args.bench, &opts)?;
    eprintln!("{}: {} prompts", bench.name, bench.items.len());
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let gen_path = args.output.join("generations.jsonl");
    let spec = ModelSpec::parse(&args.model)?;
    let load = LoadOptions {
        quantized: args.quantized,
        batch_size: args.batch_size,
        adapter: args.adapter.clone(),
        ..Default::default()
    };
    let client = ClientConfig {
        concurrency: args.batch_size,
        ..ClientConfig::default()
    };
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
