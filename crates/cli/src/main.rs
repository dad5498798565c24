//! The `safetune` binary: flag definitions, settings resolution, dispatch and printing.
//! Every stage's logic lives in the library crates.

// `unsafe` only in the module that allows it (a libc call).
#![deny(unsafe_code)]

#[allow(unsafe_code)] // mallopt and signal, libc calls
mod alloc;
mod commands;
mod exit;

use clap::{Parser, Subcommand};

/// Safety-aware instruction tuning for Llama-family models.
///
/// Audit a tuning dataset for the three properties that erode safety alignment (answer structure,
/// identity calibration, role-play), transform it into matched variants, tune, generate, judge,
/// and measure how far reward models can be trusted.
#[derive(Debug, Parser)]
#[command(
    name = "safetune",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tag every example of a dataset with the three risk factors and summarise them.
    Audit(commands::audit::AuditArgs),
    /// Write a variant of a dataset with answer structure, identity or role-play changed.
    Transform(commands::transform::TransformArgs),
    /// List or show the benchmark prompt sets (from the asset cache) and their splits.
    Prompts(commands::prompts::PromptsArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (chat, completions, models; streaming).
    Serve(commands::serve::ServeArgs),
    /// Generate answers for a prompt file into JSONL (resumable; local or openai: models).
    Generate(commands::generate::GenerateArgs),
    /// The quickstart study on SmolLM2: align, tune variants, evaluate, score, report.
    Quickstart(commands::quickstart::QuickstartArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(commands::merge::MergeArgs),
    /// Logits of a token sequence as JSON (for comparisons with other implementations).
    #[command(hide = true)]
    DebugLogits(commands::debug_logits::DebugLogitsArgs),
    /// Decode throughput of the local engine as JSON (bench/decode_throughput.py).
    #[command(hide = true)]
    DebugDecodeBench(commands::debug_decode_bench::DebugDecodeBenchArgs),
    /// Run a factorial study from a TOML config (resumable; store, steps, report).
    Study(commands::study::StudyArgs),
    /// Write report.html, summary.md and results.json for a study directory.
    Report(commands::report::ReportArgs),
    /// Write a study's dataset variants and training configs for LLaMA-Factory or Axolotl.
    Export(commands::export::ExportArgs),
    /// Judge (prompt, response) rows: refusal or compliance, with a score (resumable).
    Judge(commands::judge::JudgeCmdArgs),
    /// Check a judge against human refusal labels (label sets or a study's labelled answers).
    JudgeEval(commands::judge_eval::JudgeEvalArgs),
    /// Sample a study's answers into a blind labelling file, or import the filled labels.
    Label(commands::label::LabelArgs),
    /// Train the classifier judge's head on this project's labelled responses.
    Classifier(commands::classifier::ClassifierArgs),
    /// Evaluate a model on a safety benchmark: generate, judge, metrics with intervals.
    Eval(commands::eval::EvalArgs),
    /// Compare two eval runs: differences with bootstrap intervals and McNemar's test.
    Compare(commands::compare::CompareArgs),
    /// Fine-tune a model on conversations: LoRA (PEFT adapter) or --full; resumable.
    Tune(commands::tune::TuneArgs),
    /// Score with reward models and measure how far their preferences can be trusted.
    #[command(subcommand_required = true)]
    Rm(commands::rm::RmArgs),
    /// Utility: held-out loss and perplexity on a domain split, multiple-choice accuracy.
    Utility(commands::utility::UtilityArgs),
    /// Every answer of a study as one row: CSV, JSON Lines or Parquet (for pandas, R).
    Results(commands::results::ResultsArgs),
    /// A local web view of a study: progress, results, answers side by side, labelling.
    View(commands::view::ViewArgs),
    /// Repair a tuned model after training: `mitigate project` projects a LoRA adapter onto the
    /// alignment subspace (Safe LoRA).
    #[command(subcommand_required = true)]
    Mitigate(commands::mitigate::MitigateArgs),
    // -- new commands go above this line, one per module in commands/ --
}

fn main() {
    alloc::configure();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout with exit 0, usage errors to stderr with exit 2.
            e.exit()
        }
    };
    if !matches!(cli.command, Command::Serve(_) | Command::View(_)) {
        alloc::quiet_broken_pipe();
    }
    let result = match cli.command {
        Command::Audit(args) => commands::audit::run(args),
        Command::Rm(args) => commands::rm::run(args),
        Command::Utility(args) => commands::utility::run(args),
        Command::Tune(args) => commands::tune::run(args),
        Command::Quickstart(args) => commands::quickstart::run(args),
        Command::Transform(args) => commands::transform::run(args),
        Command::Prompts(args) => commands::prompts::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Judge(args) => commands::judge::run(args),
        Command::JudgeEval(args) => commands::judge_eval::run(args),
        Command::Label(args) => commands::label::run(args),
        Command::Classifier(args) => commands::classifier::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Compare(args) => commands::compare::run(args),
        Command::Study(args) => commands::study::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Mitigate(args) => commands::mitigate::run(args),
        Command::Results(args) => commands::results::run(args),
        Command::View(args) => commands::view::run(args),
        Command::DebugLogits(args) => commands::debug_logits::run(args),
        Command::DebugDecodeBench(args) => commands::debug_decode_bench::run(args),
    };
    std::process::exit(exit::report(result));
}
