//! `safetune utility`: held-out loss and perplexity on a domain split, and multiple-choice
//! accuracy by log-likelihood, for a local model with or without an adapter. The measures live
//! in `safetune_eval::utility`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use safetune_data::prompts::{split_of, Split};
use safetune_data::read::{read_all, ReadOptions};
use safetune_eval::utility::{heldout_loss, mcq_accuracy, read_mcq};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

use super::common::{resolve_input, AdapterArgs, InputArgs, SplitArgs};

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.default_value("demo:medical").help(
    "Conversations whose final answers are scored (loss, perplexity); a file or demo:NAME"
)))]
pub struct UtilityArgs {
    /// A local model: .gguf, HF directory or hf:ORG/NAME.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    #[command(flatten)]
    pub adapter: AdapterArgs,

    #[command(flatten)]
    pub data: InputArgs,

    /// Side of the seeded split of --data scored (by example id): test, train or all. Tune on
    /// the other side to keep this one held out.
    #[arg(long, default_value = "test", value_parser = ["test", "train", "all"])]
    pub split: String,

    #[command(flatten)]
    pub split_args: SplitArgs,

    /// Multiple-choice questions (JSONL: id, domain, question, choices, answer); a file or
    /// demo:NAME.
    #[arg(long, value_name = "DATASET", default_value = "demo:utility-mcq")]
    pub mcq: String,

    /// Only the first N conversations and N questions.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    #[command(flatten)]
    pub weights: super::common::WeightsArgs,

    /// Write the figures as JSON here too.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: UtilityArgs) -> anyhow::Result<()> {
    let data_path = args.data.path()?;
    let mcq_path = resolve_input(&args.mcq)?;
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    let data = args.data.spec();
    let engine = LocalEngine::load(
        &spec,
        &args
            .weights
            .load_options(LoadOptions::default().batch_size, &args.adapter)?,
    )
    .with_context(|| format!("cannot load {}", args.model))?;

    let (convs, _) = read_all(&data_path, &ReadOptions::default())?;
    let mut held: Vec<_> = convs
        .into_iter()
        .filter(|c| match args.split.as_str() {
            "test" => {
                split_of(
                    &c.id,
                    args.split_args.split_seed,
                    args.split_args.test_fraction,
                ) == Split::Test
            }
            "train" => {
                split_of(
                    &c.id,
                    args.split_args.split_seed,
                    args.split_args.test_fraction,
                ) == Split::Train
            }
            _ => true,
        })
        .collect();
    if let Some(n) = args.limit {
        held.truncate(n);
    }
    let loss = heldout_loss(&engine, &held, &mut |done, total| {
        if done == total || done % 10 == 0 {
            eprintln!("[{done}/{total}] answers scored");
        }
    })
    .with_context(|| format!("{data} ({} split)", args.split))?;

    let mut items = read_mcq(&mcq_path)?;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let mcq = mcq_accuracy(&engine, &items, &mut |done, total| {
        if done == total || done % 10 == 0 {
            eprintln!("[{done}/{total}] questions scored");
        }
    })?;

    println!(
        "held-out loss on {} ({} split, {} examples, {} answer tokens{}): {:.4} nats/token, perplexity {:.2}",
        data,
        args.split,
        loss.examples,
        loss.tokens,
        if loss.skipped > 0 {
            format!(", {} skipped", loss.skipped)
        } else {
            String::new()
        },
        loss.loss,
        loss.perplexity
    );
    let a = &mcq.accuracy;
    println!(
        "multiple choice on {}: {}/{} = {:.1}% [{:.1}%, {:.1}%] (chance {:.1}%)",
        args.mcq,
        a.count,
        a.total,
        100.0 * a.share,
        100.0 * a.lo,
        100.0 * a.hi,
        100.0 * mcq.chance
    );
    let n = &mcq.accuracy_norm;
    println!(
        "  per-byte log-likelihood: {}/{} = {:.1}% [{:.1}%, {:.1}%]",
        n.count,
        n.total,
        100.0 * n.share,
        100.0 * n.lo,
        100.0 * n.hi
    );
    for (d, p) in &mcq.by_domain {
        println!(
            "  {:<10} {}/{} = {:.1}% [{:.1}%, {:.1}%]",
            if d.is_empty() { "(none)" } else { d },
            p.count,
            p.total,
            100.0 * p.share,
            100.0 * p.lo,
            100.0 * p.hi
        );
    }
    if let Some(out) = &args.output {
        let v = json!({
            "model": args.model,
            "adapter": args.adapter.adapter,
            "data": data,
            "split": args.split,
            "loss": loss,
            "mcq": mcq,
        });
        std::fs::write(out, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
