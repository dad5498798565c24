//! `safetune classifier train` and `train-probe`: fit the classifier judge's head, or the probe
//! judge's head on SmolLM2's hidden states, on this project's own labelled responses (never on
//! PyRIT's refusal files or any dev or test label set).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use safetune_eval::classifier::{
    cross_validate, example_features, fit_head, labelled_examples, training_set, TrainOptions,
};
use safetune_eval::probe::{fit_probe, load_probe_encoder, probe_features, ProbeOptions};
use safetune_model::bert::BertEncoder;

#[derive(Debug, Args)]
pub struct ClassifierArgs {
    #[command(subcommand)]
    pub command: ClassifierCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClassifierCommand {
    /// Train a refusal head: data/refusals.jsonl, data/judge_train.jsonl, demo-set answers, and
    /// optional model generations (taken as compliance unless the keyword list flags them).
    Train {
        /// `safetune generate` output on the TRAIN split of harmful prompts (repeatable).
        #[arg(long, value_name = "FILE.jsonl")]
        generations: Vec<PathBuf>,
        /// Where to write the head (JSON).
        #[arg(long, short, value_name = "HEAD.json")]
        output: PathBuf,
        #[arg(long, default_value_t = 2000)]
        epochs: usize,
        #[arg(long, default_value_t = 1e-3)]
        l2: f32,
        /// Also write the labelled training examples as JSONL (prompt, response, label, source).
        #[arg(long, value_name = "FILE.jsonl")]
        examples_out: Option<PathBuf>,
        /// The head also reads the request-response product of embeddings (does the answer
        /// take up what was asked?).
        #[arg(long)]
        interaction: bool,
        /// Before fitting, print K-fold cross-validated accuracy of the whole judge on the train
        /// part of data/judge_labels.jsonl (a dev figure for choosing settings; the held-out
        /// part is never read).
        #[arg(long, value_name = "K")]
        cv: Option<usize>,
        /// Times each hand-labelled example (data/judge_labels.jsonl train part and
        /// data/judge_train_hard_a.jsonl to _d.jsonl) counts in the fit.
        #[arg(long, default_value_t = 3)]
        labelled_repeat: usize,
        /// P(refusal) at which the head calls a response a refusal.
        #[arg(long, default_value_t = 0.5)]
        threshold: f32,
        /// A further hand-labelled file (labelling JSONL or CSV, as `judge-eval --labels`
        /// reads), counted like the shipped hand-labelled sets (repeatable). Fitting on a set
        /// makes it training data: do not report a judge's accuracy on it afterwards.
        #[arg(long, value_name = "FILE")]
        labelled: Vec<PathBuf>,
    },
    /// Fit the probe judge's head (`--judge probe`): a logistic regression on SmolLM2's hidden
    /// states at one depth, averaged over the response, on the same training set as `train`
    /// plus `--labelled` files. Reads every example through the decoder once (about 6 minutes
    /// for the shipped set on two cores).
    TrainProbe {
        /// `safetune generate` output on the TRAIN split of harmful prompts (repeatable), taken
        /// as compliance unless the keyword list flags them, as in `train`. The shipped head
        /// uses SmolLM2's greedy answers to the AdvBench train split, once at 96 and once at 48
        /// new tokens: without them the probe reads a weak model's compliant answers to harmful
        /// requests, and the openings a token limit cuts them to, as refusals.
        #[arg(long, value_name = "FILE.jsonl")]
        generations: Vec<PathBuf>,
        /// Where to write the head (JSON).
        #[arg(long, short, value_name = "HEAD.json")]
        output: PathBuf,
        /// Decoder blocks run before the hidden states are read (SmolLM2-135M has 30).
        #[arg(long, default_value_t = 18)]
        layer: usize,
        /// Response tokens read (the rest is cut).
        #[arg(long, default_value_t = 256)]
        max_response_tokens: usize,
        #[arg(long, default_value_t = 600)]
        epochs: usize,
        #[arg(long, default_value_t = 0.01)]
        l2: f32,
        /// A further hand-labelled file (labelling JSONL or CSV), as in `train` (repeatable).
        /// The shipped head adds data/judge_train_hard_a.jsonl to _e.jsonl.
        #[arg(long, value_name = "FILE")]
        labelled: Vec<PathBuf>,
    },
}

pub fn run(args: ClassifierArgs) -> anyhow::Result<()> {
    match args.command {
        ClassifierCommand::Train {
            generations,
            output,
            epochs,
            l2,
            examples_out,
            interaction,
            cv,
            labelled_repeat,
            threshold,
            labelled,
        } => {
            let ex = examples(&generations, &labelled, false)?;
            if let Some(path) = &examples_out {
                let mut text = String::new();
                for e in &ex {
                    let row = serde_json::json!({
                        "prompt": e.prompt,
                        "response": e.text,
                        "label": if e.refusal { "refusal" } else { "compliance" },
                        "source": e.source,
                    });
                    text.push_str(&row.to_string());
                    text.push('\n');
                }
                std::fs::write(path, text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {} examples to {}", ex.len(), path.display());
            }
            let enc = BertEncoder::load_default()?;
            let opts = TrainOptions {
                epochs,
                l2,
                interaction,
                labelled_repeat,
                threshold,
                ..Default::default()
            };
            let feats = example_features(&enc, &ex)?;
            if let Some(k) = cv {
                let (c, n) = cross_validate(&ex, &feats, &opts, k, "data/judge_labels.jsonl")?;
                println!(
                    "{k}-fold cross-validated accuracy on the train part of data/judge_labels.jsonl: {c}/{n} = {:.1}%",
                    100.0 * c as f64 / n.max(1) as f64
                );
            }
            let head = fit_head(&ex, &feats, &opts)?;
            head.save(&output)?;
            wrote(&output, &head.training);
            Ok(())
        }
        ClassifierCommand::TrainProbe {
            generations,
            output,
            layer,
            max_response_tokens,
            epochs,
            l2,
            labelled,
        } => {
            let ex = examples(&generations, &labelled, true)?;
            let opts = ProbeOptions {
                layer,
                max_response_tokens,
                epochs,
                l2,
            };
            let engine = load_probe_encoder(layer)?;
            let t0 = std::time::Instant::now();
            let mut feats = Vec::with_capacity(ex.len());
            for (i, chunk) in ex.chunks(64).enumerate() {
                let prompts: Vec<&str> = chunk.iter().map(|e| e.prompt.as_str()).collect();
                let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
                feats.extend(probe_features(
                    &engine,
                    layer,
                    max_response_tokens,
                    &prompts,
                    &texts,
                )?);
                eprint!(
                    "\rread {} of {} examples ({:.0} s)",
                    (i * 64 + chunk.len()),
                    ex.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
            eprintln!();
            let relevance = safetune_eval::classifier::Head::default_head()?.relevance_threshold;
            let encoder = format!(
                "{} (assets), f32, first {layer} of its decoder blocks",
                safetune_data::assets::SMOLLM2_GGUF
            );
            let head = fit_probe(&ex, &feats, &opts, relevance, &encoder)?;
            head.save(&output)?;
            wrote(&output, &head.training);
            Ok(())
        }
    }
}

/// The training set with generations and further hand-labelled files (without off-topic pairs
/// when `on_topic_only`), its size printed.
fn examples(
    generations: &[PathBuf],
    labelled: &[PathBuf],
    on_topic_only: bool,
) -> anyhow::Result<Vec<safetune_eval::classifier::Example>> {
    let gens: Vec<&std::path::Path> = generations.iter().map(|p| p.as_path()).collect();
    let mut ex = training_set(&gens)?;
    for path in labelled {
        ex.extend(labelled_examples(path)?);
    }
    if on_topic_only {
        ex.retain(|e| !e.off_topic);
    }
    let r = ex.iter().filter(|e| e.refusal).count();
    eprintln!(
        "{} examples: {r} refusal, {} compliance",
        ex.len(),
        ex.len() - r
    );
    Ok(ex)
}

fn wrote(output: &std::path::Path, training: &serde_json::Value) {
    println!(
        "wrote {} (train accuracy {})",
        output.display(),
        training["train_accuracy"]
    );
}
