//! `safetune rm score|analyze|train`: reward-model scoring and reliability. Flags and printing
//! only; the work lives in `safetune_eval::rm`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use safetune_data::preference::read_preferences;
use safetune_data::stats::Proportion;
use safetune_eval::rm::analyze::{analyze, read_results, AnalyzeOptions, RmReliability};
use safetune_eval::rm::bt::{train_bt, BtOptions};
use safetune_eval::rm::score::{load_task, read_scores, run_scoring, ScoreOptions};
use safetune_eval::rm::select::{select, write_selection};
use safetune_eval::rm::stats::{BootstrapOptions, Estimate, PairAccuracy};
use safetune_eval::rm::{open_rm, RmOptions};

use super::common::{resolve_input, ClientArgs, InputArgs, OutputFormat, ReadArgs};

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(subcommand)]
    pub command: RmCommand,
}

#[derive(Debug, Subcommand)]
pub enum RmCommand {
    /// Score items or preference pairs with a reward model into JSONL (resumable).
    Score(ScoreArgs),
    /// Measure how far a reward model's scores can be trusted (separation, agreement with human
    /// labels, cross-variant consistency, agreement between RMs, RM-guided selection).
    Analyze(AnalyzeArgs),
    /// Train a small Bradley-Terry reward head on encoder features from preference pairs.
    Train(TrainArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.required(true).help(
    "Items (a dataset in any supported layout; the last assistant turn is scored; `label`, \
     `variant` and `subset` fields are kept) or preference pairs (chosen/rejected, PKU-SafeRLHF \
     or RewardBench rows); demo:NAME names a built-in set (e.g. demo:preferences)"
)))]
pub struct ScoreArgs {
    /// The reward model: a sequence-classification model directory (Hugging Face layout),
    /// pooling:URL#MODEL, score:URL#MODEL or classify:URL#MODEL (vLLM-style endpoints at the
    /// server root), bt:HEAD.json (from `rm train`), or implicit:POLICY,REFERENCE (DPO implicit
    /// reward of a tuned model against its base).
    #[arg(long, value_name = "RM")]
    pub rm: String,

    #[command(flatten)]
    pub data: InputArgs,

    /// Output JSONL, one row per item or pair. Rows already there are kept and skipped.
    #[arg(long, short, value_name = "OUT.jsonl")]
    pub output: PathBuf,

    /// Treat the file as preference pairs (default: detected from the first record).
    #[arg(long, conflicts_with = "items")]
    pub pairs: bool,

    /// Treat the file as single items even if it has chosen/rejected fields.
    #[arg(long)]
    pub items: bool,

    /// Record this dataset variant name on every item (for cross-variant consistency).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,

    /// Which output of a multi-label head or classify endpoint is the score (default: the only
    /// one, or the last).
    #[arg(long, value_name = "N")]
    pub label: Option<usize>,

    /// Implicit rewards: beta of beta * (log p_policy - log p_ref).
    #[arg(long, default_value_t = 0.1, value_name = "B")]
    pub beta: f64,

    /// Inputs scored together (local models) or requests in flight (endpoints).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch_size: usize,

    /// GGUF models (implicit rewards): keep weights quantized.
    #[arg(long)]
    pub quantized: bool,

    #[command(flatten)]
    pub read: ReadArgs,

    // The endpoints' client (pooling:, score:, classify:).
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Scores from `rm score` (repeat: files of the same RM, e.g. one per variant, are merged;
    /// several RMs are compared, the first analysed in full).
    #[arg(long, value_name = "SCORES.jsonl", required = true)]
    pub scores: Vec<PathBuf>,

    /// Post-tuning safety per dataset variant (JSON or JSONL rows with `variant` and
    /// `safety_rate`, optionally `safe` and `total`) for cross-variant consistency.
    #[arg(long, value_name = "FILE")]
    pub results: Option<PathBuf>,

    /// A dataset to select from with the first scores file (ids must match its items); a file
    /// or demo:NAME.
    #[arg(long, value_name = "DATASET")]
    pub select: Option<String>,

    /// Share of the dataset to keep, in percent, for the top-k and random-k variants.
    #[arg(long, default_value_t = 20.0, value_name = "K")]
    pub top_percent: f64,

    /// Where the selected variants go (default: next to the dataset).
    #[arg(long, value_name = "DIR")]
    pub select_out: Option<PathBuf>,

    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub resamples: usize,

    /// Seed for bootstrap resampling and random selection.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,

    /// Score differences at most this large count as ties.
    #[arg(long, default_value_t = 1e-9, value_name = "E")]
    pub tie_eps: f64,

    /// Write the full report as JSON here.
    #[arg(long, short, value_name = "REPORT.json")]
    pub output: Option<PathBuf>,

    /// Print the report as a table or as JSON.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.alias("pairs").default_value("demo:preferences").help(
    "Preference pairs (chosen/rejected, PKU-SafeRLHF or RewardBench rows); demo:preferences is \
     this project's built-in set"
)))]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: InputArgs,

    /// Encoder whose mean-pooled hidden states are the features (default: SmolLM2 from the
    /// asset cache).
    #[arg(long, value_name = "MODEL")]
    pub encoder: Option<String>,

    /// Output head file (JSON); score with --rm bt:HEAD.json.
    #[arg(long, short, value_name = "HEAD.json")]
    pub output: PathBuf,

    /// L2 penalty on the head's weights.
    #[arg(long, default_value_t = 0.01, value_name = "L")]
    pub l2: f64,

    /// Gradient steps.
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub steps: usize,

    /// Seed of the held-out split.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,

    /// Share of pairs held out to measure accuracy.
    #[arg(long, default_value_t = 0.2, value_name = "F")]
    pub holdout: f64,

    /// GGUF encoders: dequantize to f32 instead of the faster quantized path.
    #[arg(long)]
    pub f32: bool,
}

pub fn run(args: RmArgs) -> anyhow::Result<()> {
    match args.command {
        RmCommand::Score(a) => score(a),
        RmCommand::Analyze(a) => analyze_cmd(a),
        RmCommand::Train(a) => train(a),
    }
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let path = args.data.path()?;
    let pairs = if args.pairs {
        Some(true)
    } else if args.items {
        Some(false)
    } else {
        None
    };
    let task = load_task(
        &path,
        &args.read.read_options(),
        pairs,
        args.variant.as_deref(),
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    let opts = RmOptions {
        label: args.label,
        beta: args.beta,
        batch_size: args.batch_size.max(1),
        quantized: args.quantized,
        remote: args.client.remote_options(args.batch_size),
    };
    eprintln!("loading reward model {}", args.rm);
    let rm = open_rm(&args.rm, &opts)
        .with_context(|| format!("cannot open reward model {}", args.rm))?;
    eprintln!(
        "scoring {} {} from {} with {}",
        task.len(),
        task.kind(),
        path.display(),
        rm.name()
    );
    let prog = run_scoring(
        rm.as_ref(),
        &task,
        &args.output,
        &ScoreOptions::default(),
        &mut |p| {
            eprintln!(
                "[{}/{}]{}",
                p.skipped + p.done,
                p.total,
                if p.skipped > 0 {
                    format!(" ({} already done)", p.skipped)
                } else {
                    String::new()
                }
            )
        },
    )?;
    eprintln!(
        "wrote {} rows to {} ({} already there) in {:.1}s",
        prog.done,
        args.output.display(),
        prog.skipped,
        prog.elapsed_s
    );
    // A one-line summary of what was scored.
    let f = read_scores(&args.output)?;
    if !f.pairs.is_empty() {
        let acc = safetune_eval::rm::stats::pair_accuracy(
            &f.pairs
                .iter()
                .map(|p| (p.chosen, p.rejected))
                .collect::<Vec<_>>(),
            1e-9,
        );
        println!(
            "{} pairs: chosen scored higher in {}",
            f.pairs.len(),
            fmt_acc(&acc)
        );
    }
    if !f.items.is_empty() {
        let m = f.items.iter().map(|i| i.score).sum::<f64>() / f.items.len() as f64;
        println!("{} items: mean score {m:.4}", f.items.len());
    }
    Ok(())
}

fn fmt_prop(p: &Proportion) -> String {
    format!(
        "{}/{} = {:.1}% [{:.1}, {:.1}]",
        p.count,
        p.total,
        100.0 * p.share,
        100.0 * p.lo,
        100.0 * p.hi
    )
}

fn fmt_acc(a: &PairAccuracy) -> String {
    format!("{}, ties {}", fmt_prop(&a.accuracy), a.ties)
}

fn fmt_est(e: &Estimate) -> String {
    format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi)
}

fn analyze_cmd(args: AnalyzeArgs) -> anyhow::Result<()> {
    let select_path = args.select.as_deref().map(resolve_input).transpose()?;
    let files = args
        .scores
        .iter()
        .map(|p| read_scores(p).with_context(|| format!("cannot read scores {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let results = match &args.results {
        Some(p) => {
            Some(read_results(p).with_context(|| format!("cannot read results {}", p.display()))?)
        }
        None => None,
    };
    let opts = AnalyzeOptions {
        bootstrap: BootstrapOptions {
            resamples: args.resamples,
            seed: args.seed,
            level: 0.95,
            ..Default::default()
        },
        tie_eps: args.tie_eps,
    };
    let report = analyze(&files, results.as_deref(), &opts)?;
    let mut json = serde_json::to_value(&report)?;
    if let Some(path) = select_path {
        let (convs, _) = safetune_data::read::read_all(&path, &args.read.read_options())
            .with_context(|| format!("cannot read {}", path.display()))?;
        let scores: HashMap<String, f64> = files[0]
            .items
            .iter()
            .map(|i| (i.id.clone(), i.score))
            .collect();
        let sel = select(&convs, &scores, args.top_percent, args.seed)?;
        let dir = args
            .select_out
            .clone()
            .or_else(|| path.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into());
        let (top, random) = write_selection(&sel, &dir, &stem)?;
        json["selection"] = serde_json::to_value(&sel.summary)?;
        json["selection"]["top_file"] = top.display().to_string().into();
        json["selection"]["random_file"] = random.display().to_string().into();
        if args.format == OutputFormat::Text {
            print_report(&report);
            let s = &sel.summary;
            println!(
                "\nRM-guided selection: top {}% of {} scored items (seed {})",
                s.percent, s.n_scored, s.seed
            );
            println!(
                "  {:<8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9}",
                "", "n", "mean score", "markdown", "itemized", "plain", "identity"
            );
            for (name, side) in [("all", &s.all), ("top", &s.top), ("random", &s.random)] {
                println!(
                    "  {:<8} {:>5} {:>10.4} {:>8.1}% {:>8.1}% {:>8.1}% {:>8.1}%",
                    name,
                    side.n,
                    side.mean_score,
                    100.0 * side.markdown.share,
                    100.0 * side.itemized.share,
                    100.0 * side.plain.share,
                    100.0 * side.identity.share
                );
            }
            println!("  wrote {} and {}", top.display(), random.display());
        }
    } else if args.format == OutputFormat::Text {
        print_report(&report);
    }
    if args.format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if let Some(out) = &args.output {
        std::fs::write(out, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn print_report(r: &RmReliability) {
    println!(
        "reward model {}: {} items, {} pairs",
        r.rm, r.n_items, r.n_pairs
    );
    if let Some(s) = &r.separation {
        println!(
            "\nwithin-dataset separation: AUC {} ({} good, mean {:.4}; {} bad, mean {:.4})",
            fmt_est(&s.auc),
            s.n_good,
            s.mean_good,
            s.n_bad,
            s.mean_bad
        );
        for (v, a) in &s.by_variant {
            println!("  variant {v:<24} AUC {a:.3}");
        }
    }
    if let Some(a) = &r.agreement {
        println!("\nagreement with human preferences (chosen scored higher; ties apart):");
        println!("  {:<28} {}", "all pairs", fmt_acc(&a.overall));
        if let Some(s) = &a.safety_subsets {
            println!("  {:<28} {}", "safety subsets", fmt_acc(s));
        }
        if let Some(s) = &a.other_subsets {
            println!("  {:<28} {}", "other subsets", fmt_acc(s));
        }
        for s in &a.by_subset {
            println!(
                "    {:<26} {}{}",
                s.subset,
                fmt_acc(&s.result),
                if s.safety { "  (safety)" } else { "" }
            );
        }
    }
    if let Some(c) = &r.consistency {
        println!("\ncross-variant consistency (mean RM score vs post-tuning safety rate):");
        println!(
            "  {:<20} {:>6} {:>28} {:>8} {:>8} {:>8}",
            "variant", "items", "mean score [95% CI]", "safety", "RM rank", "safe rank"
        );
        for v in &c.variants {
            println!(
                "  {:<20} {:>6} {:>28} {:>7.1}% {:>8} {:>8}{}",
                v.variant,
                v.n_items,
                fmt_est(&v.mean_score),
                100.0 * v.safety_rate,
                v.rm_rank,
                v.safety_rank,
                if v.flagged { "  FLAG" } else { "" }
            );
        }
        match &c.kendall_tau {
            Some(t) => println!("  Kendall tau-b  {}", fmt_est(t)),
            None => println!("  Kendall tau-b  undefined (fewer than two variants, or constant)"),
        }
        if let Some(t) = &c.spearman_rho {
            println!("  Spearman rho   {}", fmt_est(t));
        }
        for i in &c.inversions {
            println!(
                "  FLAG: the RM prefers {} over {} (+{:.4} mean score) although it tuned into a less safe model ({:.1} points lower safety)",
                i.preferred,
                i.over,
                i.score_gap,
                100.0 * i.safety_gap
            );
        }
        if !c.unmatched.is_empty() {
            println!(
                "  not matched between scores and results: {}",
                c.unmatched.join(", ")
            );
        }
    }
    if let Some(g) = &r.rm_agreement {
        println!(
            "\nagreement between reward models ({} common {}):",
            g.n_common, g.unit
        );
        for (i, name) in g.rms.iter().enumerate() {
            let row: Vec<String> = g.pairwise_tau[i]
                .iter()
                .map(|t| t.map_or("   n/a".into(), |t| format!("{t:+.3}")))
                .collect();
            println!("  {:<28} {}", name, row.join("  "));
        }
        match g.kendall_w {
            Some(w) => println!("  Kendall's W {w:.3}"),
            None => println!("  Kendall's W undefined"),
        }
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let pairs_path = args.data.path()?;
    let (pairs, fmt) = read_preferences(&pairs_path, None)
        .with_context(|| format!("cannot read pairs {}", args.data.spec()))?;
    let encoder = match &args.encoder {
        Some(e) => e.clone(),
        None => safetune_data::assets::asset(safetune_data::assets::SMOLLM2_GGUF)?
            .display()
            .to_string(),
    };
    eprintln!(
        "encoding {} pairs ({} layout) with {encoder}",
        pairs.len(),
        fmt.name()
    );
    let opts = BtOptions {
        l2: args.l2,
        steps: args.steps,
        seed: args.seed,
        holdout: args.holdout,
    };
    let mut last = 0;
    let head = train_bt(&encoder, !args.f32, &pairs, &opts, &mut |done, total| {
        if done * 10 / total != last || done == total {
            last = done * 10 / total;
            eprintln!("[{done}/{total}] answers encoded");
        }
    })?;
    std::fs::write(&args.output, serde_json::to_string(&head)? + "\n")
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let r = &head.report;
    println!(
        "trained a Bradley-Terry head on {} pairs (held out {}): train loss {:.4}, train accuracy {:.1}%, held-out accuracy {}",
        r.n_train,
        r.n_holdout,
        r.train_loss,
        100.0 * r.train_accuracy,
        r.holdout_accuracy
            .map_or("n/a".into(), |a| format!("{:.1}% ({}/{})", 100.0 * a, r.holdout_correct, r.n_holdout))
    );
    println!(
        "wrote {}; score with --rm bt:{}",
        args.output.display(),
        args.output.display()
    );
    Ok(())
}
