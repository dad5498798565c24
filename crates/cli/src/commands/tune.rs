//! `safetune tune`: supervised fine-tuning (LoRA by default, `--full` for every weight).
//! Flags and a TOML config resolve into one `TuneConfig` (flags win); the run lives in
//! `safetune_train::recipe`. Progress goes to stderr; the first Ctrl-C stops after the current
//! step with a checkpoint, a second one exits at once.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use safetune_data::read::{read_all, ReadOptions};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_train::config::{Anchor, Schedule};
use safetune_train::recipe::Event;
use safetune_train::sft::{show_masks, Encoder};
use safetune_train::{checkpoint, tune, RunOptions, Status, Target, TuneConfig};

use super::common::{resolve_input_path, InputArgs};

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.help(
    "Training conversations (messages JSONL, Alpaca, ShareGPT, CSV, Parquet), or demo:NAME \
     (e.g. demo:medical)"
)))]
pub struct TuneArgs {
    /// Base model: a .gguf file (dequantized to f32) or a Hugging Face directory.
    #[arg(long, short, value_name = "MODEL")]
    pub model: Option<String>,

    #[command(flatten)]
    pub data: InputArgs,

    /// Output directory: adapter (PEFT layout), metrics.jsonl, manifest.json, checkpoints/.
    #[arg(long, short, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Settings from a TOML file with the flags' names (`batch_size = 8`); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Continue from the newest checkpoint in the output directory (its settings are the
    /// default; they must not change what the run computes).
    #[arg(long)]
    pub resume: bool,

    /// Print one rendered example with the trained (assistant) spans between [[ and ]], and stop.
    #[allow(rustdoc::broken_intra_doc_links)] // clap help text, not markdown
    #[arg(long)]
    pub show_masks: bool,

    /// Train every weight instead of a LoRA adapter.
    #[arg(long)]
    pub full: bool,

    /// LoRA rank [default: 16].
    #[arg(long, value_name = "R")]
    pub rank: Option<usize>,

    /// LoRA alpha; the adapter is scaled by alpha / rank [default: 32].
    #[arg(long, value_name = "A")]
    pub alpha: Option<f64>,

    /// Dropout on the adapter input [default: 0].
    #[arg(long, value_name = "P")]
    pub dropout: Option<f32>,

    /// Projections with adapters, comma-separated: q,k,v,o,gate,up,down or all [default: all].
    #[arg(long, value_name = "LIST", value_parser = parse_targets)]
    pub targets: Option<TargetList>,

    /// Passes over the training data [default: 1].
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,

    /// Stop after N optimizer steps (0: no limit) [default: 0].
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,

    /// Peak learning rate [default: 2e-4].
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,

    /// Linear warmup steps [default: 0].
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<usize>,

    /// Decay after warmup: cosine, linear or constant [default: cosine].
    #[arg(long, value_name = "KIND", value_parser = parse_schedule)]
    pub schedule: Option<Schedule>,

    /// AdamW weight decay [default: 0].
    #[arg(long, value_name = "W")]
    pub weight_decay: Option<f64>,

    /// Clip the global gradient norm (0: off) [default: 1].
    #[arg(long, value_name = "NORM")]
    pub max_grad_norm: Option<f64>,

    /// Rows per micro-batch [default: 8].
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,

    /// Micro-batches per optimizer step [default: 1].
    #[arg(long, value_name = "N")]
    pub grad_accum: Option<usize>,

    /// Longest example in tokens; longer ones are cut [default: 512].
    #[arg(long, value_name = "T")]
    pub max_len: Option<usize>,

    /// Pack several examples per row (they cannot attend to each other).
    #[arg(long)]
    pub packing: bool,

    /// Seed for adapter init, data order, held-out split and dropout [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Fraction of examples held out for the eval loss [default: 0.05].
    #[arg(long, value_name = "F")]
    pub eval_fraction: Option<f64>,

    /// Eval loss every N steps (0: at the end only) [default: 0].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,

    /// Checkpoint every N steps (0: only on Ctrl-C) [default: 0].
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,

    /// Checkpoints kept [default: 2].
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,

    /// Rows of logits computed at a time by the chunked lm_head + cross-entropy [default: 256].
    #[arg(long, value_name = "ROWS")]
    pub loss_chunk: Option<usize>,

    /// Activation recomputation (gradient checkpointing): keep only each block's input and run
    /// the block again in the backward pass. Much less memory, about a third more compute.
    #[arg(long, alias = "gradient-checkpointing")]
    pub recompute: bool,

    /// bf16 matrix products (f32 sums, f32 weights and optimizer state) for the linears and the
    /// lm_head: needs a CPU with AMX-BF16 (an error otherwise, before anything loads).
    #[arg(long)]
    pub bf16: bool,
    /// LoRA on a quantized base (QLoRA): keep the frozen projections in GGUF blocks (Q4_0,
    /// Q4_1, Q8_0 as stored; a safetensors base quantized to Q8_0 at load) for the forward and
    /// backward passes. Adapters stay f32. Not with --full.
    #[arg(long)]
    pub quantized: bool,

    /// Anchored tuning: add a KL term to a reference's next-token distribution. `base` (the
    /// tuning base with the adapter off; LoRA only) or a reference model path [default: off].
    #[arg(long, value_name = "REF")]
    pub anchor: Option<String>,

    /// Weight of the KL term (> 0) [default: 0.1].
    #[arg(long, value_name = "B")]
    pub anchor_beta: Option<f64>,

    /// A separate anchor set (e.g. harmful prompts with refusals), or demo:NAME: each step adds
    /// one micro-batch of it with the KL term alone [default: the training batches' answers].
    #[arg(long, value_name = "FILE")]
    pub anchor_data: Option<PathBuf>,

    /// Examples per anchor micro-batch (with --anchor-data) [default: 4].
    #[arg(long, value_name = "N")]
    pub anchor_batch_size: Option<usize>,
}

/// A comma-separated list of target modules (one flag value).
#[derive(Debug, Clone)]
pub struct TargetList(pub Vec<Target>);

fn parse_targets(s: &str) -> Result<TargetList, String> {
    Target::parse_list(s).map(TargetList)
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    match s.to_ascii_lowercase().as_str() {
        "cosine" => Ok(Schedule::Cosine),
        "linear" => Ok(Schedule::Linear),
        "constant" => Ok(Schedule::Constant),
        _ => Err(format!(
            "unknown schedule `{s}` (cosine, linear or constant)"
        )),
    }
}

impl TuneArgs {
    /// Config file (or the checkpoint's settings when resuming, or defaults), then flags.
    pub fn resolve(&self) -> anyhow::Result<TuneConfig> {
        let mut c = if let Some(path) = &self.config {
            TuneConfig::from_toml_file(path)?
        } else if let (true, Some(out)) = (self.resume, &self.output) {
            match checkpoint::latest(out) {
                Some(dir) => checkpoint::load(&dir)?.state.config,
                None => TuneConfig::default(),
            }
        } else {
            TuneConfig::default()
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        if let Some(d) = &self.data.data {
            c.data = PathBuf::from(d);
        }
        set!(
            model,
            output,
            rank,
            alpha,
            dropout,
            epochs,
            max_steps,
            lr,
            warmup_steps,
            schedule,
            weight_decay,
            max_grad_norm,
            batch_size,
            grad_accum,
            max_len,
            seed,
            eval_fraction,
            eval_every,
            save_every,
            keep_checkpoints,
            loss_chunk,
            anchor,
            anchor_beta,
            anchor_batch_size
        );
        if let Some(d) = &self.anchor_data {
            c.anchor_data = Some(d.clone());
        }
        if let Some(t) = &self.targets {
            c.targets = t.0.clone();
        }
        if self.full {
            c.full = true;
        }
        if self.packing {
            c.packing = true;
        }
        if self.recompute {
            c.recompute = true;
        }
        if self.bf16 {
            c.bf16 = true;
        }
        if self.quantized {
            c.quantized = true;
        }
        Ok(c)
    }
}

pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let mut cfg = args.resolve()?;
    if args.show_masks {
        return show(&mut cfg);
    }
    cfg.validate().map_err(|e| {
        anyhow::anyhow!("{e}\nhint: give --model, --data and -o, or a --config file with them")
    })?;
    // The inputs are checked before anything starts, so a missing one is reported as that.
    cfg.data = resolve_input_path(&cfg.data)?;
    if let Some(d) = &cfg.anchor_data {
        cfg.anchor_data =
            Some(resolve_input_path(d).context("the anchor set (--anchor-data / anchor_data)")?);
    }
    ModelSpec::parse(&cfg.model)?;
    if cfg.bf16 {
        if let Some(e) = safetune_train::ops::bf16_unavailable() {
            anyhow::bail!("{e}");
        }
    }
    if let Anchor::Model(reference) = cfg.anchor_kind() {
        ModelSpec::parse(reference).context("the reference model (--anchor / anchor)")?;
    }
    eprintln!("# resolved settings\n{}", cfg.to_toml());

    // First Ctrl-C: finish the step, checkpoint, stop. Second: exit now.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }

    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut eval_note = String::new();
    let opts = RunOptions {
        resume: args.resume,
        stop: Some(&stop),
        stop_after: None,
    };
    eprintln!("loading {} and {}", cfg.model, cfg.data.display());
    let mut started = false;
    let result = tune(&cfg, &opts, &mut |e| match e {
        Event::Started {
            start_step,
            total_steps,
            trainable,
            train_examples,
            eval_examples,
            stats,
        } => {
            eprintln!(
                "{train_examples} training and {eval_examples} held-out examples ({} tokens, {} trained; {} truncated, {} without answers dropped); {trainable} trainable parameters; {total_steps} steps{}",
                stats.tokens,
                stats.trained_tokens,
                stats.truncated,
                stats.dropped_empty,
                if start_step > 0 { format!(", resuming after step {start_step}") } else { String::new() }
            );
            eprintln!(
                "training kernels: {}{} ({} forces one: auto, avx512, avx2, scalar)",
                safetune_train::ops::isa_name(),
                if safetune_train::ops::bf16_enabled() {
                    ", bf16 products on AMX"
                } else {
                    ""
                },
                safetune_train::ops::ISA_ENV
            );
            started = true;
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_prefix("tune");
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
        }
        Event::Step(s) => {
            bar.set_position(s.step as u64);
            let anchor = match s.kl {
                Some(kl) => format!(" (ce {:.4}, kl {kl:.4})", s.ce),
                None => String::new(),
            };
            bar.set_message(format!(
                "loss {:.4}{anchor} | {:.0} tok/s | lr {:.2e}{eval_note}",
                s.loss, s.tokens_per_s, s.lr
            ));
        }
        Event::Eval(e) => {
            eval_note = format!(" | eval {:.4}", e.eval_loss);
            bar.println(format!("step {}: eval loss {:.4}", e.step, e.eval_loss));
        }
        Event::Saved { step, path } => {
            bar.println(format!("step {step}: checkpoint {}", path.display()));
        }
    });
    bar.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        // Only a run that started can have left checkpoints.
        Err(e) if started => {
            return Err(anyhow::Error::new(e).context(format!(
                "tuning stopped; checkpoints in {} are kept (rerun with --resume to continue)",
                checkpoint::checkpoints_dir(&cfg.output).display()
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let last = summary
        .losses
        .last()
        .map(|(_, l)| format!("{l:.4}"))
        .unwrap_or_else(|| "-".into());
    let last = match summary.kl_losses.last() {
        Some((_, kl)) => format!(
            "{last} (ce {:.4}, kl {kl:.4}; reference forward {:.2} s/step)",
            summary.ce_losses.last().map_or(f64::NAN, |x| x.1),
            summary.ref_forward_s
        ),
        None => last,
    };
    match summary.status {
        Status::Completed => {
            eprintln!(
                "done: {} steps, last loss {last}{}; wrote {} ({}, metrics.jsonl, manifest.json)",
                summary.steps,
                summary
                    .final_eval_loss
                    .map(|l| format!(", eval loss {l:.4}"))
                    .unwrap_or_default(),
                summary.output.display(),
                if cfg.full {
                    "model.safetensors"
                } else {
                    "adapter_config.json, adapter_model.safetensors"
                }
            );
            Ok(())
        }
        Status::Interrupted | Status::Paused => {
            bail!(
                "interrupted after step {} of {}; checkpoint {}\nhint: continue with: safetune tune --resume -o {}",
                summary.steps,
                summary.total_steps,
                summary
                    .checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into()),
                summary.output.display()
            )
        }
    }
}

/// `--show-masks`: the first example as the model sees it, trained spans marked.
fn show(cfg: &mut TuneConfig) -> anyhow::Result<()> {
    if cfg.model.is_empty() || cfg.data.as_os_str().is_empty() {
        bail!("--show-masks needs --model and --data (or a --config with them)");
    }
    cfg.data = resolve_input_path(&cfg.data)?;
    let spec = ModelSpec::parse(&cfg.model)?;
    // Only the tokenizer and template matter here: keep GGUF weights quantized (fast to load).
    let engine = LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: true,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load {spec}"))?;
    let (convs, _) = read_all(&cfg.data, &ReadOptions::default())?;
    let first = convs
        .first()
        .with_context(|| format!("{} holds no conversations", cfg.data.display()))?;
    let enc = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: cfg.max_len,
    };
    let e = enc.encode(first)?;
    println!(
        "# example `{}`: {} tokens, {} trained (between [[ and ]]){}",
        e.id,
        e.len(),
        e.trained_tokens(),
        if e.truncated > 0 {
            format!(", {} cut at max_len {}", e.truncated, cfg.max_len)
        } else {
            String::new()
        }
    );
    println!("{}", show_masks(&engine.tok, &e)?);
    Ok(())
}
