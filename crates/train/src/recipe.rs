//! The SFT recipe, read top to bottom: load the model and data, build the trainable decoder and
//! the optimizer, (resume,) then loop: micro-batches with gradient accumulation, loss normalised
//! by the labelled tokens of the whole optimizer step, global-norm clipping, scheduled learning
//! rate, AdamW; eval loss, metrics line, checkpoint; finally the adapter and a manifest.
//! Anchored tuning (`anchor` set) adds beta * KL(p_ref || p) to the loss: on the training
//! batches' answer tokens, or on one micro-batch of the anchor set per step (`anchor_data`).
//!
//! Output directory:
//! - `adapter_config.json`, `adapter_model.safetensors`: the LoRA adapter (PEFT layout); or
//!   `model.safetensors` with every tuned weight under `--full`;
//! - `metrics.jsonl`: one line per optimizer step (`"kind": "train"`) and per evaluation
//!   (`"kind": "eval"`); under anchored tuning a step's line also holds its KL term and the
//!   seconds of the reference's forward passes (see [`StepLog`]);
//! - `manifest.json`: format version, status, resolved settings, input hash, results;
//! - `checkpoints/step-NNNNNN/`: see [`crate::checkpoint`].

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Var;
use serde::Serialize;

use safetune_data::read::{read_all, ReadOptions};
use safetune_model::adapter::{Adapter, AdapterConfig, LoraPair};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

use crate::checkpoint::{self, TrainerState};
use crate::config::{Anchor, TuneConfig};
use crate::error::{Result, TrainError};
use crate::loss::{head_kl_sum, head_loss_sum};
use crate::model::{SideGrads, Step, TrainModel};
use crate::ops::{self, AdamW, AdamWParams};
use crate::rng::TrainRng;
use crate::sft::{
    make_batch, plan_epoch, Batch, EncodeStats, Encoded, Encoder, Layout, PlannedBatch,
};

pub const MANIFEST_FORMAT: &str = "safetune-tune-manifest";
pub const MANIFEST_VERSION: u32 = 1;

/// How a run is driven (not part of its settings).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions<'a> {
    /// Continue from the newest checkpoint in the output directory.
    pub resume: bool,
    /// Set (e.g. by SIGINT) to stop after the current step with a checkpoint.
    pub stop: Option<&'a AtomicBool>,
    /// Stop with a checkpoint once this many optimizer steps are done.
    pub stop_after: Option<usize>,
}

/// One optimizer step, as logged to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub kind: &'static str,
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// The objective of this step: `ce`, plus `anchor_beta * kl` under anchored tuning.
    pub loss: f64,
    /// Mean cross-entropy per labelled token of the training batches.
    pub ce: f64,
    /// Anchored tuning: mean KL(p_ref || p) per anchored token (the training batches' answer
    /// tokens, or the anchor micro-batch's with `anchor_data`), before this step's update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Anchored tokens of this step (0 without an anchor).
    #[serde(skip_serializing_if = "is_zero")]
    pub anchor_tokens: usize,
    /// Seconds of this step spent on the reference's forward passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_forward_s: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Labelled tokens.
    pub tokens: usize,
    /// Input tokens (padding excluded).
    pub input_tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalLog {
    pub kind: &'static str,
    pub step: usize,
    pub eval_loss: f64,
    pub tokens: usize,
}

/// What the caller hears about while a run goes on.
#[derive(Debug)]
pub enum Event<'a> {
    Started {
        start_step: usize,
        total_steps: usize,
        trainable: usize,
        train_examples: usize,
        eval_examples: usize,
        stats: &'a EncodeStats,
    },
    Step(&'a StepLog),
    Eval(&'a EvalLog),
    Saved {
        step: usize,
        path: &'a Path,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    /// Stopped by the stop flag, with a checkpoint.
    Interrupted,
    /// Stopped at `stop_after`, with a checkpoint.
    Paused,
}

#[derive(Debug, Clone)]
pub struct TuneSummary {
    pub status: Status,
    /// Optimizer steps done in total (resumed ones included).
    pub steps: usize,
    pub total_steps: usize,
    /// The loss (the objective) of each step run by this call, as (step, loss).
    pub losses: Vec<(usize, f64)>,
    /// The cross-entropy part of each step run by this call (equal to `losses` without an
    /// anchor).
    pub ce_losses: Vec<(usize, f64)>,
    /// Anchored tuning: the mean KL per anchored token of each step run by this call.
    pub kl_losses: Vec<(usize, f64)>,
    /// Anchored tuning: seconds per step spent on the reference's forward passes (mean over
    /// the steps run by this call; 0 without an anchor).
    pub ref_forward_s: f64,
    pub final_eval_loss: Option<f64>,
    pub output: PathBuf,
    pub checkpoint: Option<PathBuf>,
    /// What the whole run trains on (every epoch, resumed steps included), from its data plan.
    pub tokens: TokenCounts,
}

/// The tokens a run feeds its model, summed over its optimizer steps (so over every epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TokenCounts {
    /// Training examples (held-out eval examples excluded).
    pub examples: usize,
    /// Tokens that carry loss (the labelled assistant tokens).
    pub trained_tokens: usize,
    /// Every token fed (padding excluded).
    pub input_tokens: usize,
}

fn layout(cfg: &TuneConfig) -> Layout {
    if cfg.packing {
        Layout::Packed {
            max_len: cfg.max_len,
        }
    } else {
        Layout::Grouped
    }
}

/// The optimizer steps a run of `cfg` takes over examples of these lengths.
fn total_steps(cfg: &TuneConfig, lengths: &[usize]) -> usize {
    if cfg.epochs == 0 {
        return cfg.max_steps;
    }
    let all: usize = (0..cfg.epochs)
        .map(|e| {
            plan_epoch(lengths, cfg.batch_size, layout(cfg), cfg.seed, e)
                .len()
                .div_ceil(cfg.grad_accum)
        })
        .sum();
    if cfg.max_steps > 0 {
        all.min(cfg.max_steps)
    } else {
        all
    }
}

/// Calls `each` with the (trained, input) tokens of every optimizer step of `cfg`'s data plan
/// over `train`, in order, for at most `steps` steps and `epochs` epochs (0: no epoch limit).
fn walk_steps(
    cfg: &TuneConfig,
    train: &[Encoded],
    steps: usize,
    epochs: usize,
    each: &mut dyn FnMut(usize, usize, usize) -> bool,
) {
    let lengths: Vec<usize> = train.iter().map(|e| e.len()).collect();
    let (mut step, mut epoch) = (0usize, 0usize);
    while step < steps && (epochs == 0 || epoch < epochs) {
        let plan = plan_epoch(&lengths, cfg.batch_size, layout(cfg), cfg.seed, epoch);
        if plan.is_empty() {
            return;
        }
        for chunk in plan.chunks(cfg.grad_accum.max(1)) {
            if step >= steps {
                return;
            }
            let (mut trained, mut input) = (0, 0);
            for &i in chunk.iter().flatten().flatten() {
                trained += train[i].trained_tokens();
                input += train[i].len();
            }
            step += 1;
            if !each(epoch, trained, input) {
                return;
            }
        }
        epoch += 1;
    }
}

/// The tokens a run of `cfg` over the encoded training examples `train` feeds, from the same
/// data plan [`run`] follows (so exact, and the same for a resumed run).
pub fn planned_tokens(cfg: &TuneConfig, train: &[Encoded]) -> TokenCounts {
    let lengths: Vec<usize> = train.iter().map(|e| e.len()).collect();
    let mut c = TokenCounts {
        examples: train.len(),
        ..TokenCounts::default()
    };
    walk_steps(
        cfg,
        train,
        total_steps(cfg, &lengths),
        cfg.epochs,
        &mut |_, t, i| {
            c.trained_tokens += t;
            c.input_tokens += i;
            true
        },
    );
    c
}

/// `cfg` with its length set in optimizer steps so that the run trains on as close to
/// `target` loss-carrying tokens as whole steps allow (fractional epochs): `epochs` becomes
/// the epochs begun and `max_steps` the steps. At most 1000 epochs.
pub fn match_trained_tokens(cfg: &TuneConfig, train: &[Encoded], target: usize) -> TuneConfig {
    let (mut done, mut steps, mut epochs) = (0usize, 0usize, 0usize);
    walk_steps(cfg, train, usize::MAX, 1000, &mut |epoch, t, _| {
        if done >= target {
            return false;
        }
        // Take this step when it brings the total nearer the target.
        if (done + t).abs_diff(target) > target - done {
            return false;
        }
        done += t;
        steps += 1;
        epochs = epoch + 1;
        true
    });
    let mut out = cfg.clone();
    out.epochs = epochs.max(1);
    out.max_steps = steps.max(1);
    out
}

/// Encodes the training data of `cfg` as [`prepare`] does (the same held-out examples left
/// out), loading only what the tokenizer and chat template need from the model.
pub fn encode_train(cfg: &TuneConfig) -> Result<(Vec<Encoded>, EncodeStats)> {
    let spec = ModelSpec::parse(&cfg.model)?;
    let engine = LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: true,
            batch_size: 1,
            ..LoadOptions::default()
        },
    )?;
    let (convs, _skipped) = read_all(&cfg.data, &ReadOptions::default())?;
    let encoder = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: cfg.max_len,
    };
    let (mut examples, stats) = encoder.encode_all(&convs)?;
    hold_out(cfg, &mut examples);
    Ok((examples, stats))
}

/// Removes the held-out eval examples from `examples` (a seeded draw, the same on every run
/// with this seed) and returns them in order.
fn hold_out(cfg: &TuneConfig, examples: &mut Vec<Encoded>) -> Vec<Encoded> {
    let mut eval = Vec::new();
    if cfg.eval_fraction > 0.0 && examples.len() >= 2 {
        let n = ((examples.len() as f64 * cfg.eval_fraction).ceil() as usize)
            .clamp(1, examples.len() - 1);
        let mut order: Vec<usize> = (0..examples.len()).collect();
        TrainRng::derive(cfg.seed, 0xE7A1).shuffle(&mut order);
        let mut held: Vec<usize> = order[..n].to_vec();
        held.sort_unstable();
        for &i in held.iter().rev() {
            eval.push(examples.remove(i));
        }
        eval.reverse();
    }
    eval
}

/// Model, tokenizer and data, loaded and encoded.
pub struct Prepared {
    pub model: TrainModel,
    pub model_id: String,
    pub train: Vec<Encoded>,
    pub eval: Vec<Encoded>,
    pub stats: EncodeStats,
    pub data_hash: String,
    pub pad_id: u32,
    /// The reference of anchored tuning (None without an anchor).
    pub reference: Option<Reference>,
    /// The encoded anchor set (`anchor_data`; empty without one).
    pub anchor_set: Vec<Encoded>,
}

/// The reference model of anchored tuning, run without gradients.
pub struct Reference {
    /// The tuning base with its adapters off ([`TrainModel::adapters_off`]), or a separate
    /// model loaded frozen ([`TrainModel::frozen`]).
    pub model: TrainModel,
    /// The reference reads the tuned model's own (frozen) head.
    pub shares_head: bool,
}

impl Reference {
    /// The head of the reference for [`head_kl_sum`]: None when it is the tuned model's.
    pub fn head(&self) -> Option<&candle_core::Tensor> {
        (!self.shares_head).then_some(&self.model.lm_head)
    }

    /// Final hidden states of the reference (B, T, C), detached.
    pub fn hidden_states(&self, b: &crate::sft::Batch) -> Result<candle_core::Tensor> {
        Ok(self
            .model
            .hidden_states(&b.ids, &b.positions, &b.mask, &mut Step::eval())?
            .detach())
    }
}

/// The reference `cfg.anchor` names, built beside the tuned `model` (whose vocabulary a
/// separate reference must share).
fn load_reference(cfg: &TuneConfig, model: &TrainModel) -> Result<Option<Reference>> {
    Ok(match cfg.anchor_kind() {
        Anchor::Off => None,
        Anchor::Base => Some(Reference {
            model: model.adapters_off(),
            shares_head: true,
        }),
        Anchor::Model(path) => {
            let cannot = |e: &dyn std::fmt::Display| {
                TrainError::config(
                    "key `anchor`",
                    format!("cannot load the reference model {path}: {e}"),
                )
            };
            let spec = ModelSpec::parse(path).map_err(|e| cannot(&e))?;
            let engine = LocalEngine::load(
                &spec,
                &LoadOptions {
                    quantized: false,
                    batch_size: 1,
                    ..LoadOptions::default()
                },
            )
            .map_err(|e| cannot(&e))?;
            let reference = TrainModel::frozen(&engine.model)?;
            let (v, vr) = (model.lm_head.dim(0)?, reference.lm_head.dim(0)?);
            if v != vr {
                return Err(TrainError::config(
                    format!("key `anchor` ({path})"),
                    format!("the reference has a vocabulary of {vr} tokens, the tuned model {v}; the reference must share the tokenizer"),
                ));
            }
            Some(Reference {
                model: reference,
                shares_head: false,
            })
        }
    })
}

/// The anchor set `cfg.anchor_data` names, encoded like the training data.
fn encode_anchor_set(cfg: &TuneConfig, encoder: &Encoder) -> Result<Vec<Encoded>> {
    let Some(path) = &cfg.anchor_data else {
        return Ok(Vec::new());
    };
    let (convs, _skipped) = read_all(path, &ReadOptions::default())?;
    let (examples, _stats) = encoder
        .encode_all(&convs)
        .map_err(|e| TrainError::Dataset(format!("{} (anchor_data): {e}", path.display())))?;
    if examples.is_empty() {
        return Err(TrainError::Dataset(format!(
            "{} (anchor_data): no example has an assistant answer to anchor",
            path.display()
        )));
    }
    Ok(examples)
}

/// The rows of the anchor micro-batch of optimizer step `step` (0-based): `anchor_batch_size`
/// examples of a set of `n`, cycling through it in an order reshuffled (seeded) on each pass.
/// A function of the step alone, so a resumed run draws the same ones.
fn anchor_rows(cfg: &TuneConfig, n: usize, step: usize) -> Vec<Vec<usize>> {
    let bs = cfg.anchor_batch_size.max(1);
    let mut order: Vec<usize> = Vec::new();
    let mut pass = usize::MAX;
    (0..bs)
        .map(|j| {
            let k = step * bs + j;
            if k / n != pass {
                pass = k / n;
                order = (0..n).collect();
                TrainRng::derive(cfg.seed, 0xA2C4_0000 + pass as u64).shuffle(&mut order);
            }
            vec![order[k % n]]
        })
        .collect()
}

/// Loads the base model (dequantized f32) and encodes the data.
pub fn prepare(cfg: &TuneConfig) -> Result<Prepared> {
    prepare_checked(cfg, &mut |_| Ok(()))
}

/// [`prepare`], handing the encoding counts to `check` as soon as the data is encoded (before
/// anything else is done with them); an error from `check` is returned as it is. A caller that
/// refuses truncated examples stops there, before training.
pub fn prepare_checked(
    cfg: &TuneConfig,
    check: &mut dyn FnMut(&EncodeStats) -> Result<()>,
) -> Result<Prepared> {
    let spec = ModelSpec::parse(&cfg.model)?;
    // `quantized`: a GGUF base keeps its blocks (taken over as they are by
    // `TrainModel::from_llama_quantized`); a dense one is quantized to Q8_0 layer by layer at
    // load, each f32 matrix freed once its blocks exist.
    let engine = LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: cfg.quantized,
            quantize_dense: cfg.quantized,
            batch_size: 1,
            ..LoadOptions::default()
        },
    )?;
    let LocalEngine {
        model,
        tok,
        template,
        model_id,
        ..
    } = engine;
    let (convs, _skipped) = read_all(&cfg.data, &ReadOptions::default())?;
    let data_hash = file_hash(&cfg.data)?;
    let encoder = Encoder {
        tok: &tok,
        template: &template,
        max_len: cfg.max_len,
    };
    let (mut examples, stats) = encoder.encode_all(&convs)?;
    check(&stats)?;
    if examples.is_empty() {
        return Err(TrainError::Dataset(format!(
            "{}: no example has an assistant answer to train on",
            cfg.data.display()
        )));
    }
    // Held-out examples: a seeded draw, the same on every run with this seed.
    let eval = hold_out(cfg, &mut examples);
    let anchor_set = encode_anchor_set(cfg, &encoder)?;
    let model = if cfg.quantized {
        TrainModel::from_llama_quantized(&model, &cfg.mode(), cfg.seed)?
    } else {
        TrainModel::from_llama(&model, &cfg.mode(), cfg.seed)?
    };
    let reference = load_reference(cfg, &model)?;
    let pad_id = tok.eos.as_ref().map(|(_, id)| *id).unwrap_or(0);
    Ok(Prepared {
        model,
        model_id,
        train: examples,
        eval,
        stats,
        data_hash,
        pad_id,
        reference,
        anchor_set,
    })
}

/// FNV-1a 64 of a file's bytes (identifies the input in the manifest).
fn file_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let h = safetune_data::util::fnv1a64(&bytes);
    Ok(format!("fnv1a64:{h:016x}"))
}

/// Mean loss per labelled token over the held-out examples (no dropout, fixed batches).
pub fn eval_loss(p: &Prepared, cfg: &TuneConfig) -> Result<(f64, usize)> {
    let mut order: Vec<usize> = (0..p.eval.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(p.eval[i].len()));
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in order.chunks(cfg.batch_size) {
        let rows: Vec<Vec<usize>> = chunk.iter().map(|&i| vec![i]).collect();
        let b = make_batch(&p.eval, &rows, p.pad_id)?;
        let h = p
            .model
            .hidden_states(&b.ids, &b.positions, &b.mask, &mut Step::eval())?
            .detach();
        let (ls, n) = head_loss_sum(&h, &p.model.lm_head.detach(), &b.labels, cfg.loss_chunk)?;
        sum += ls.to_scalar::<f32>()? as f64;
        count += n;
    }
    Ok((sum / count.max(1) as f64, count))
}

/// Runs (or resumes) a tuning run; see the module docs for what it writes.
pub fn tune(
    cfg: &TuneConfig,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<TuneSummary> {
    cfg.validate()?;
    // An unknown SAFETUNE_ISA, or one this CPU lacks, stops the run before any work.
    crate::ops::isa_from_env().map_err(|message| TrainError::Config {
        origin: "environment".into(),
        message,
    })?;
    // bf16 on a CPU without AMX-BF16 (or with SAFETUNE_ISA below AVX-512) stops here too.
    crate::ops::set_bf16(cfg.bf16).map_err(|message| TrainError::Config {
        origin: "bf16".into(),
        message,
    })?;
    let out = cfg.output.clone();
    std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
    if !opts.resume && checkpoint::latest(&out).is_some() {
        return Err(TrainError::checkpoint(
            &checkpoint::checkpoints_dir(&out),
            "this output directory already holds a run's checkpoints; resume it (--resume) or choose another output directory",
        ));
    }
    let started = Instant::now();
    let p = prepare(cfg)?;
    run(cfg, opts, p, started, on_event)
}

/// Empties the bf16 frozen-weight cache when made and when dropped.
struct FrozenPacksScope;

impl FrozenPacksScope {
    fn new() -> FrozenPacksScope {
        crate::ops::fused::clear_frozen_packs();
        FrozenPacksScope
    }
}

impl Drop for FrozenPacksScope {
    fn drop(&mut self) {
        crate::ops::fused::clear_frozen_packs();
    }
}

/// The loop, on prepared inputs.
pub fn run(
    cfg: &TuneConfig,
    opts: &RunOptions,
    p: Prepared,
    started: Instant,
    on_event: &mut dyn FnMut(Event),
) -> Result<TuneSummary> {
    // The products' precision is a process-wide switch: set it from this run's config here too,
    // for callers that prepare and run without `tune` (the study's train steps).
    crate::ops::set_bf16(cfg.bf16).map_err(|message| TrainError::Config {
        origin: "bf16".into(),
        message,
    })?;
    // bf16 packs each frozen weight once per run: start with an empty cache and empty it
    // however the run ends.
    let _packs = FrozenPacksScope::new();
    let out = cfg.output.clone();
    let vars: Vec<Var> = p.model.params.iter().map(|x| x.var.clone()).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;

    // The data plan: each epoch's batches are a function of (seed, epoch).
    let layout = layout(cfg);
    let lengths: Vec<usize> = p.train.iter().map(|e| e.len()).collect();
    let plan = |epoch: usize| plan_epoch(&lengths, cfg.batch_size, layout, cfg.seed, epoch);
    let total_steps = total_steps(cfg, &lengths);

    // Fresh start or resume.
    let mut step = 0usize;
    let mut epoch = 0usize;
    let mut next_batch = 0usize;
    let mut rng = TrainRng::derive(cfg.seed, 0xD50F);
    let metrics_path = out.join("metrics.jsonl");
    if opts.resume {
        let dir = checkpoint::latest(&out).ok_or_else(|| {
            TrainError::checkpoint(
                &checkpoint::checkpoints_dir(&out),
                "no checkpoint to resume from",
            )
        })?;
        let ck = checkpoint::load(&dir)?;
        if ck.state.config.trajectory_key() != cfg.trajectory_key() {
            let a = ck.state.config.trajectory_key();
            let b = cfg.trajectory_key();
            let differ: Vec<String> = a
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k} (checkpoint {v}, now {})", b[k.as_str()]))
                .collect();
            return Err(TrainError::checkpoint(
                &dir,
                format!(
                    "was written with other settings: {}; resume with the same settings",
                    differ.join(", ")
                ),
            ));
        }
        let mut moments = Vec::with_capacity(vars.len());
        for prm in &p.model.params {
            let t = ck
                .params
                .get(&prm.name)
                .ok_or_else(|| TrainError::checkpoint(&dir, format!("no tensor `{}`", prm.name)))?;
            if t.dims() != prm.var.dims() {
                return Err(TrainError::checkpoint(
                    &dir,
                    format!(
                        "tensor `{}` has shape {:?}, the model needs {:?}",
                        prm.name,
                        t.dims(),
                        prm.var.dims()
                    ),
                ));
            }
            prm.var.set(t)?;
            moments.push(ck.moments[&prm.name].clone());
        }
        opt.load_state(ck.state.optimizer_step, &moments)?;
        step = ck.state.step;
        epoch = ck.state.epoch;
        next_batch = ck.state.next_batch;
        rng = ck.state.rng.clone();
        truncate_metrics(&metrics_path, step)?;
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path).map_err(|e| TrainError::io(&metrics_path, e))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::io(&metrics_path, e))?;
    let mut log_line = |row: &dyn erased::Row| -> Result<()> {
        writeln!(metrics, "{}", row.json()).map_err(|e| TrainError::io(&metrics_path, e))?;
        metrics
            .flush()
            .map_err(|e| TrainError::io(&metrics_path, e))
    };

    on_event(Event::Started {
        start_step: step,
        total_steps,
        trainable: p.model.num_trainable(),
        train_examples: p.train.len(),
        eval_examples: p.eval.len(),
        stats: &p.stats,
    });

    let mut losses = Vec::new();
    let mut ce_losses = Vec::new();
    let mut kl_losses = Vec::new();
    let mut ref_total_s = 0f64;
    let mut final_eval = None;
    let mut current_plan: Vec<PlannedBatch> = plan(epoch);
    let run_start = Instant::now();
    let mut status = Status::Completed;
    let mut last_checkpoint = None;
    let save = |step: usize,
                epoch: usize,
                next_batch: usize,
                rng: &TrainRng,
                opt: &AdamW|
     -> Result<PathBuf> {
        let (opt_step, moments) = opt.state()?;
        let state = TrainerState {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            step,
            epoch,
            next_batch,
            rng: rng.clone(),
            optimizer_step: opt_step,
            config: cfg.clone(),
        };
        checkpoint::save(
            &out,
            &state,
            &p.model.params,
            &moments,
            cfg.keep_checkpoints,
        )
    };

    while step < total_steps {
        if next_batch >= current_plan.len() {
            epoch += 1;
            next_batch = 0;
            if cfg.epochs > 0 && epoch >= cfg.epochs {
                break;
            }
            current_plan = plan(epoch);
            continue;
        }
        let t0 = Instant::now();
        // 1. The micro-batches of this optimizer step.
        let end = (next_batch + cfg.grad_accum).min(current_plan.len());
        let batches = current_plan[next_batch..end]
            .iter()
            .map(|rows| make_batch(&p.train, rows, p.pad_id))
            .collect::<Result<Vec<_>>>()?;
        let n_tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let n_input: usize = batches.iter().map(|b| b.n_input).sum();
        // 2. Forward and backward each; the loss is divided by the labelled tokens of the whole
        //    step, so accumulated gradients equal those of one big batch. Under anchored tuning
        //    without an anchor set, each batch also carries beta * KL(p_ref || p) on the same
        //    tokens (the reference's forward pass first, without gradients).
        let mut grads: Option<GradStore> = None;
        let mut loss_sum = 0f64;
        let mut kl_sum = 0f64;
        let mut kl_tokens = 0usize;
        let mut ref_s = 0f64;
        let in_batch = p.reference.as_ref().filter(|_| cfg.anchor_data.is_none());
        for b in &batches {
            let ref_h = match in_batch {
                Some(r) => {
                    let t = Instant::now();
                    let h = r.hidden_states(b)?;
                    ref_s += t.elapsed().as_secs_f64();
                    Some((r, h))
                }
                None => None,
            };
            let side = cfg.recompute.then(SideGrads::default);
            let mut fwd = Step {
                rng: Some(&mut rng),
                recompute: side.clone(),
            };
            let h = p
                .model
                .hidden_states(&b.ids, &b.positions, &b.mask, &mut fwd)?; // (B, T, C)
            let (ls, _) = head_loss_sum(&h, &p.model.lm_head, &b.labels, cfg.loss_chunk)?;
            loss_sum += ls.to_scalar::<f32>()? as f64;
            let mut objective = ls;
            if let Some((r, rh)) = &ref_h {
                let (kl, n) = head_kl_sum(
                    &h,
                    rh,
                    &p.model.lm_head,
                    r.head(),
                    &b.labels,
                    cfg.loss_chunk,
                )?;
                kl_sum += kl.to_scalar::<f32>()? as f64;
                kl_tokens += n;
                objective = (objective + (kl * cfg.anchor_beta)?)?;
            }
            let mut g = (objective / n_tokens.max(1) as f64)?.backward()?;
            if let Some(side) = &side {
                side.merge_into(&vars, &mut g)?;
            }
            grads = Some(accumulate(grads, g, &vars)?);
        }
        // With an anchor set: one anchor micro-batch, whose loss is beta times its mean KL.
        if let (Some(r), true) = (&p.reference, cfg.anchor_data.is_some()) {
            let rows = anchor_rows(cfg, p.anchor_set.len(), step);
            let ab: Batch = make_batch(&p.anchor_set, &rows, p.pad_id)?;
            let t = Instant::now();
            let rh = r.hidden_states(&ab)?;
            ref_s += t.elapsed().as_secs_f64();
            let side = cfg.recompute.then(SideGrads::default);
            let mut fwd = Step {
                rng: Some(&mut rng),
                recompute: side.clone(),
            };
            let h = p
                .model
                .hidden_states(&ab.ids, &ab.positions, &ab.mask, &mut fwd)?;
            let (kl, n) = head_kl_sum(
                &h,
                &rh,
                &p.model.lm_head,
                r.head(),
                &ab.labels,
                cfg.loss_chunk,
            )?;
            kl_sum += kl.to_scalar::<f32>()? as f64;
            kl_tokens += n;
            let mut g = (kl * (cfg.anchor_beta / n.max(1) as f64))?.backward()?;
            if let Some(side) = &side {
                side.merge_into(&vars, &mut g)?;
            }
            grads = Some(accumulate(grads, g, &vars)?);
        }
        let grads = grads.expect("a step has at least one micro-batch");
        let ce = loss_sum / n_tokens.max(1) as f64;
        let kl = p
            .reference
            .as_ref()
            .map(|_| kl_sum / kl_tokens.max(1) as f64);
        let loss = ce + kl.map_or(0.0, |k| cfg.anchor_beta * k);
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss: loss as f32,
            });
        }
        // 3. Clip, schedule, update.
        let grad_norm = ops::grad_global_norm(&vars, &grads)?;
        let clip = if cfg.max_grad_norm > 0.0 && grad_norm > cfg.max_grad_norm {
            cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = cfg.lr_at(step, total_steps);
        opt.set_learning_rate(lr);
        opt.step_scaled(&grads, clip)?;
        drop(grads);
        step += 1;
        next_batch = end;
        // 4. Log.
        let dt = t0.elapsed().as_secs_f64();
        let row = StepLog {
            kind: "train",
            step,
            total_steps,
            epoch,
            loss,
            ce,
            kl,
            anchor_tokens: kl_tokens,
            ref_forward_s: p.reference.as_ref().map(|_| ref_s),
            lr,
            grad_norm,
            tokens: n_tokens,
            input_tokens: n_input,
            tokens_per_s: n_input as f64 / dt.max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        log_line(&row)?;
        losses.push((step, loss));
        ce_losses.push((step, ce));
        if let Some(k) = kl {
            kl_losses.push((step, k));
        }
        ref_total_s += ref_s;
        on_event(Event::Step(&row));
        // 5. Evaluate.
        let last = step == total_steps;
        if !p.eval.is_empty()
            && (last || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)))
        {
            let (l, n) = eval_loss(&p, cfg)?;
            let row = EvalLog {
                kind: "eval",
                step,
                eval_loss: l,
                tokens: n,
            };
            log_line(&row)?;
            on_event(Event::Eval(&row));
            final_eval = Some(l);
        }
        // 6. Checkpoint.
        let interrupted = opts.stop.is_some_and(|s| s.load(Ordering::SeqCst));
        let pause = opts.stop_after == Some(step) && !last;
        if (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every)) || interrupted || pause {
            let path = save(step, epoch, next_batch, &rng, &opt)?;
            on_event(Event::Saved { step, path: &path });
            last_checkpoint = Some(path);
        }
        if interrupted {
            status = Status::Interrupted;
            break;
        }
        if pause {
            status = Status::Paused;
            break;
        }
    }
    let _ = run_start;

    if status == Status::Completed {
        write_model_output(cfg, &p)?;
    }
    write_manifest(
        cfg,
        &p,
        status,
        step,
        total_steps,
        &losses,
        kl_losses
            .last()
            .map(|&(_, kl)| (ce_losses.last().map_or(f64::NAN, |x| x.1), kl)),
        final_eval,
        started,
    )?;
    Ok(TuneSummary {
        status,
        steps: step,
        total_steps,
        ref_forward_s: ref_total_s / losses.len().max(1) as f64,
        losses,
        ce_losses,
        kl_losses,
        final_eval_loss: final_eval,
        output: out,
        checkpoint: last_checkpoint,
        tokens: planned_tokens(cfg, &p.train),
    })
}

/// Adds the gradients `g` of `vars` into `acc` (gradient accumulation over micro-batches).
fn accumulate(acc: Option<GradStore>, g: GradStore, vars: &[Var]) -> Result<GradStore> {
    let Some(mut acc) = acc else {
        return Ok(g);
    };
    for v in vars {
        if let Some(new) = g.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(old) => (old + new)?,
                None => new.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Keeps the metric lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body).map_err(|e| TrainError::io(path, e))
}

/// The tuned weights: a PEFT adapter (LoRA) or `model.safetensors` (full).
fn write_model_output(cfg: &TuneConfig, p: &Prepared) -> Result<()> {
    if cfg.full {
        let tensors: HashMap<String, candle_core::Tensor> = p
            .model
            .params
            .iter()
            .map(|x| (x.name.clone(), x.var.as_tensor().clone()))
            .collect();
        let path = cfg.output.join("model.safetensors");
        return safetune_data::util::write_atomic_with(
            &path,
            |tmp| {
                candle_core::safetensors::save(&tensors, tmp)
                    .map_err(|e| TrainError::checkpoint(tmp, e.to_string()))
            },
            TrainError::io,
        );
    }
    let modules: Vec<&str> = cfg.targets.iter().map(|t| t.module()).collect();
    let mut config = AdapterConfig::lora(cfg.rank, cfg.alpha, &modules);
    config.base_model_name_or_path = Some(cfg.model.clone());
    config.lora_dropout = cfg.dropout as f64;
    let tensors = p
        .model
        .lora_tensors()
        .into_iter()
        .map(|(name, a, b, _)| (name, LoraPair { a, b }))
        .collect();
    Adapter {
        config,
        tensors,
        source: None,
    }
    .save(&cfg.output)?;
    Ok(())
}

#[derive(Serialize)]
struct Manifest<'a> {
    format: &'static str,
    version: u32,
    program: String,
    status: Status,
    model: &'a str,
    model_id: &'a str,
    data: &'a Path,
    data_hash: &'a str,
    data_stats: &'a EncodeStats,
    train_examples: usize,
    eval_examples: usize,
    trainable_parameters: usize,
    steps: usize,
    total_steps: usize,
    final_loss: Option<f64>,
    final_eval_loss: Option<f64>,
    /// Anchored tuning: the cross-entropy and the KL of the last step.
    #[serde(skip_serializing_if = "Option::is_none")]
    final_ce: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_kl: Option<f64>,
    elapsed_s: f64,
    /// The instruction set of the training matrix products (`ops::isa_name`).
    kernel_isa: &'static str,
    /// Whether the large products ran in bf16 (`ops::bf16`).
    bf16: bool,
    config: &'a TuneConfig,
}

#[allow(clippy::too_many_arguments)]
fn write_manifest(
    cfg: &TuneConfig,
    p: &Prepared,
    status: Status,
    steps: usize,
    total_steps: usize,
    losses: &[(usize, f64)],
    anchor_last: Option<(f64, f64)>,
    final_eval: Option<f64>,
    started: Instant,
) -> Result<()> {
    let m = Manifest {
        format: MANIFEST_FORMAT,
        version: MANIFEST_VERSION,
        program: format!("safetune {}", env!("CARGO_PKG_VERSION")),
        status,
        model: &cfg.model,
        model_id: &p.model_id,
        data: &cfg.data,
        data_hash: &p.data_hash,
        data_stats: &p.stats,
        train_examples: p.train.len(),
        eval_examples: p.eval.len(),
        trainable_parameters: p.model.num_trainable(),
        steps,
        total_steps,
        final_loss: losses.last().map(|x| x.1),
        final_eval_loss: final_eval,
        final_ce: anchor_last.map(|x| x.0),
        final_kl: anchor_last.map(|x| x.1),
        elapsed_s: started.elapsed().as_secs_f64(),
        kernel_isa: crate::ops::isa_name(),
        bf16: crate::ops::bf16_enabled(),
        config: cfg,
    };
    let path = cfg.output.join("manifest.json");
    let json = serde_json::to_string_pretty(&m).map_err(|e| TrainError::Dataset(e.to_string()))?;
    safetune_data::util::write_atomic(&path, json.as_bytes()).map_err(|e| TrainError::io(&path, e))
}

mod erased {
    /// A metrics row of either kind.
    pub trait Row {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Row for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(i: usize, len: usize, answer: usize) -> Encoded {
        Encoded {
            id: format!("e{i}"),
            ids: vec![1; len],
            trained: (0..len).map(|t| t >= len - answer).collect(),
            truncated: 0,
        }
    }

    #[test]
    fn anchor_batches_cycle_through_the_set_in_a_seeded_order() {
        let cfg = TuneConfig {
            anchor_batch_size: 3,
            ..TuneConfig::default()
        };
        let n = 5;
        let drawn: Vec<usize> = (0..5)
            .flat_map(|step| anchor_rows(&cfg, n, step))
            .flatten()
            .collect();
        assert_eq!(drawn.len(), 15);
        // Each pass over the set takes every example once, in an order of its own.
        let passes: Vec<Vec<usize>> = drawn.chunks(n).map(|c| c.to_vec()).collect();
        for p in &passes {
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "{drawn:?}");
        }
        assert!(
            passes[0] != passes[1] || passes[1] != passes[2],
            "{drawn:?}"
        );
        // A function of the step (so of a resumed run too) and of the seed.
        assert_eq!(anchor_rows(&cfg, n, 3), anchor_rows(&cfg, n, 3));
        let other = TuneConfig {
            seed: 9,
            ..cfg.clone()
        };
        let again: Vec<usize> = (0..5)
            .flat_map(|step| anchor_rows(&other, n, step))
            .flatten()
            .collect();
        assert_ne!(again, drawn);
    }

    #[test]
    fn planned_tokens_sum_every_epoch_and_matching_scales_the_steps() {
        let train: Vec<Encoded> = (0..10).map(|i| example(i, 20 + i, 5 + i)).collect();
        let per_epoch: usize = train.iter().map(|e| e.trained_tokens()).sum();
        let input: usize = train.iter().map(|e| e.len()).sum();
        let cfg = TuneConfig {
            epochs: 2,
            batch_size: 3,
            ..TuneConfig::default()
        };
        let c = planned_tokens(&cfg, &train);
        assert_eq!(c.examples, 10);
        assert_eq!(c.trained_tokens, 2 * per_epoch);
        assert_eq!(c.input_tokens, 2 * input);
        // Matching 1.5 epochs' worth of tokens: two epochs begun, about half the second run.
        let m = match_trained_tokens(&cfg, &train, per_epoch * 3 / 2);
        assert_eq!(m.epochs, 2);
        assert!(m.max_steps > 4 && m.max_steps < 8, "{}", m.max_steps);
        let got = planned_tokens(&m, &train).trained_tokens;
        assert!(got.abs_diff(per_epoch * 3 / 2) <= 3 * 14, "{got}");
        // The same target as the run's own: the same length.
        let same = match_trained_tokens(&cfg, &train, c.trained_tokens);
        assert_eq!(planned_tokens(&same, &train), c);
    }
}
