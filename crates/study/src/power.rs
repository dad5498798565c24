//! Power and compute before a study runs (`safetune study CONFIG --dry-run`): for each main
//! effect of the design and each outcome, the smallest effect detectable at the configured power
//! ([`safetune_eval::effects::detectable_effect`]); and the tokens the study trains on and
//! generates, with the wall time of local models on this project's machine.
//!
//! Trained tokens are estimated, not counted: the training sources (the base dataset, the
//! alignment set's sources) are read, their characters divided by [`CHARS_PER_TOKEN`] (plus
//! [`TEMPLATE_TOKENS_PER_MESSAGE`] per message and [`TEMPLATE_TOKENS_PER_CONVERSATION`]), each
//! example capped at the step's `max_len`,
//! times the step's examples and epochs. The dataset variants are not made for this, so a
//! transform that lengthens the answers (markdown, an identity statement) is not seen. Generated
//! tokens are an upper bound: every answer as long as `max_new_tokens`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

pub use safetune_eval::effects::Outcome;

use safetune_data::demo::resolve_dataset;
use safetune_data::prompts::{PromptSet, Split};
use safetune_data::read::{read_all, read_json_lines, ReadOptions};
use safetune_data::{Conversation, Role};
use safetune_eval::effects::{detectable_effect, PowerAssumptions};
use safetune_train::TuneConfig;

use crate::config::{GenWeights, JudgeKind, StudyConfig, TrainMatch};
use crate::plan::{Plan, PlanError};
use crate::step::{PlannedStep, StepKind, StepSpec};

/// Speeds of the local stages on this project's machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// LoRA training, input tokens per second.
    pub train_tokens_per_s: f64,
    /// Generation, new tokens per second at the study's batching.
    pub generate_tokens_per_s: f64,
    /// The classifier judge, rows per second.
    pub judge_rows_per_s: f64,
}

/// Measured 2026-12-05 on this project's machine (`lscpu`: "AMD EPYC", 2 CPUs, 1 thread per
/// core; load average 0.4-2 from other sessions) with the release build (`cargo build --release
/// -p safetune`), `safetune study` on SmolLM2-135M-Instruct Q4_1 (`asset:smollm2/...`), demo:medical
/// limit 24, the quickstart's tune settings (LoRA rank 16, alpha 32, max_len 224, batch 8, 2
/// epochs), advbench and overrefusal limit 16, max_new_tokens 48, chunk_size 8, classifier judge;
/// rates from the store's step times and outputs, two runs:
/// - training: 6,234 input tokens (22 examples x 2 epochs) in 28.1-29.6 s: 210-222 tokens/s;
///   the quickstart's align step (241 examples x 3 epochs, max_len 320, merge included): 92,142
///   input tokens in 386 s, 239 tokens/s (this module estimated 89,953 tokens, 6 min 58 s);
/// - generation, 16 x 48 new tokens per step: base model 9.5-9.7 s (79-81 tokens/s), tuned (LoRA
///   adapter kept as a separate path) 11.9-12.8 s (60-65 tokens/s counted as rows x
///   max_new_tokens); 65 is taken, as most generate steps of a study are of tuned models;
/// - classifier judge: 16 rows in 0.49-0.58 s (model load included): 27-33 rows/s.
///
/// Generation and judging were measured again on `examples/replicate-smollm2.toml` (same machine
/// and day, after study generation moved to 32 prompts per batch with the adapter merged):
/// 72 generate steps of tuned models, 8,904 answers x 48 max_new_tokens in 2,548 s: 168
/// tokens/s counted the same way (121 tokens/s of tokens actually generated, as many answers
/// stop early); 78 classifier steps, 9,646 rows in 237 s: 41 rows/s. Training there: 24 tune
/// steps, 391,206 input tokens in 1,859 s (210 tokens/s, some of it beside other jobs).
///
/// Those generation figures are of the f32 path (`[generation] weights = "f32"`). The quantized
/// default was measured on the quickstart (same machine, 2026-12-05, release build, 24 medical
/// examples): 20 generate steps, 320 answers x 48 max_new_tokens in 37 s, 415 tokens/s counted
/// the same way ([`QUANTIZED_GENERATE_TOKENS_PER_S`]); its align (64,322 estimated, 64,300
/// trained input tokens) and 8 tune steps (59,094 input tokens) ran at 213 and 220 tokens/s.
pub const MEASURED_RATES: Rates = Rates {
    train_tokens_per_s: 215.0,
    generate_tokens_per_s: 165.0,
    judge_rows_per_s: 40.0,
};

/// A probe judge row's time in classifier judge rows (the probe runs the classifier's checks and
/// 18 of SmolLM2's 30 decoder blocks over the request and the answer). Measured 2026-12-06 with
/// `safetune judge-eval` on the eight built-in label sets (1,774 rows): 263 s against 63 s.
pub const PROBE_ROW_COST: f64 = 4.0;

/// Generation rate of the quantized default (see [`MEASURED_RATES`]), tokens per second counted
/// as answers x max_new_tokens.
pub const QUANTIZED_GENERATE_TOKENS_PER_S: f64 = 415.0;

/// Characters of message text per token for the trained-token estimate: SmolLM2-135M's tokenizer
/// on this project's demo sets (demo:medical and demo:stem 5.0, demo:overrefusal-answers 4.6;
/// 4.9 over the three), measured 2026-12-05 by tokenizing every message's content.
pub const CHARS_PER_TOKEN: f64 = 4.9;

/// Chat-template tokens per message (role markers and separators), added to the estimate.
pub const TEMPLATE_TOKENS_PER_MESSAGE: f64 = 5.0;

/// Chat-template tokens per conversation beyond its messages' (SmolLM2's template adds a default
/// system prompt): with [`TEMPLATE_TOKENS_PER_MESSAGE`], the demo sets' encoded length less
/// their content tokens (14-16 per message, 2 messages per example).
pub const TEMPLATE_TOKENS_PER_CONVERSATION: f64 = 20.0;

/// The detectable effect of one contrast (a factor's level against its first level) on one
/// outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectLine {
    pub factor: String,
    /// The factor's first level (the reference).
    pub level_a: String,
    pub level_b: String,
    pub outcome: Outcome,
    pub runs_a: usize,
    pub runs_b: usize,
    /// Tuned runs per model.
    pub n_runs: usize,
    /// Distinct cells (runs over seeds).
    pub n_cells: usize,
    pub n_prompts: usize,
    /// Points of refusal rate; `None` with one run per cell.
    pub effect: Option<f64>,
}

/// The estimated tokens of one align or tune step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainEstimate {
    pub label: String,
    pub examples: usize,
    pub epochs: f64,
    /// Loss-carrying tokens over every epoch.
    pub trained_tokens: f64,
    /// Input tokens over every epoch.
    pub input_tokens: f64,
    /// Whether the step trains a local model (wall time estimated).
    pub local: bool,
    /// Whether an external trainer runs the step (GPU-hours estimated).
    pub external: bool,
    /// Time per input token relative to plain LoRA SFT ([`ANCHOR_COST`] for an anchored run).
    pub cost: f64,
}

/// The assumed speed of an external trainer, input tokens per second per GPU, for `--dry-run`'s
/// GPU-hours: LoRA SFT of a 7-8B model in bf16 on one 80 GB data-centre GPU. An assumption
/// (nothing here has such a GPU to measure it), stated in the dry run; set your own with
/// `[analysis] gpu_tokens_per_s`.
pub const GPU_TRAIN_TOKENS_PER_S: f64 = 2500.0;

/// Time of an anchored tune step (`anchor = "base"`, on an anchor set) relative to the same
/// step without the anchor. Measured on `examples/mitigations-smollm2.toml` (2026-12-05, this
/// project's machine: AMD EPYC, 2 cores, AVX2 + AVX-512; release build, nothing else running):
/// the three anchored tune steps took 92.8, 86.1 and 86.9 s against 62.7, 65.8 and 60.4 s for
/// the same data without the anchor, 12 optimizer steps each (the reference's forward pass,
/// 0.50 s a step, and the anchor micro-batch of 4 refusals per step): 1.41x.
pub const ANCHOR_COST: f64 = 1.41;

/// Seconds of a `utility` step on a local model, measured on the same run: 85.7 to 96.5 s, mean
/// 89 s, over 17 models (48 held-out medical conversations and 66 four-choice questions each,
/// SmolLM2-135M f32 with the adapter merged, model load included; each choice is a full forward
/// pass of question and answer).
pub const UTILITY_S_PER_STEP: f64 = 89.0;

/// Tokens and time of the whole study.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Compute {
    pub train: Vec<TrainEstimate>,
    pub trained_tokens: f64,
    pub input_tokens: f64,
    /// Generate rows, and new tokens at most (rows x max_new_tokens), local and remote models.
    pub generate_rows_local: usize,
    pub generate_rows_remote: usize,
    pub max_new_tokens: usize,
    /// Classifier judge rows of local models' answers.
    pub classifier_rows: usize,
    /// Probe judge rows of local models' answers (each costs [`PROBE_ROW_COST`] classifier rows).
    pub probe_rows: usize,
    /// `utility` steps (local models).
    pub utility_steps: usize,
    /// Seconds on this machine: training, generation, classifier judging (local models).
    pub train_s: f64,
    pub generate_s: f64,
    pub judge_s: f64,
    pub utility_s: f64,
    pub rates: Rates,
    /// External trainers: input tokens per second per GPU assumed (`[analysis]
    /// gpu_tokens_per_s`, default [`GPU_TRAIN_TOKENS_PER_S`]), and the GPU-hours that gives.
    pub gpu_tokens_per_s: f64,
    pub gpu_hours: f64,
    /// Input tokens of the external train steps.
    pub external_input_tokens: f64,
    /// `[tune] match = "tokens"`.
    pub matched_tokens: bool,
    /// Characters per token of the trained-token estimate.
    pub chars_per_token: f64,
}

/// What `--dry-run` prints beside the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DryRun {
    pub assumptions: PowerAssumptions,
    pub alpha: f64,
    pub power: f64,
    pub effects: Vec<EffectLine>,
    pub compute: Compute,
}

/// The power assumptions, level and power of `cfg`'s `[analysis]` (defaults: the measured
/// assumptions, 0.05, 0.8).
pub fn assumptions(cfg: &StudyConfig) -> (PowerAssumptions, f64, f64) {
    let a = &cfg.analysis;
    let m = PowerAssumptions::MEASURED;
    (
        PowerAssumptions {
            run_sd_points: a.run_sd_points.unwrap_or(m.run_sd_points),
            prompt_sd_points: a.prompt_sd_points.unwrap_or(m.prompt_sd_points),
            base_rate: a.base_rate.unwrap_or(m.base_rate),
        },
        a.alpha.unwrap_or(0.05),
        a.power.unwrap_or(0.8),
    )
}

/// Power and compute of `plan`, planned from `cfg`.
pub fn dry_run(cfg: &StudyConfig, plan: &Plan) -> Result<DryRun, PlanError> {
    let (assumptions, alpha, power) = assumptions(cfg);
    Ok(DryRun {
        assumptions,
        alpha,
        power,
        effects: effects(plan, &assumptions, alpha, power),
        compute: compute(cfg, plan)?,
    })
}

/// Factors that are not main effects of the design.
const NOT_EFFECTS: &[&str] = &["seed", "model", "stage", "variant"];

/// The prompts of each outcome: the sizes of the benchmarks, harmful and benign.
fn prompts_by_outcome(plan: &Plan) -> BTreeMap<&'static str, usize> {
    let mut seen: BTreeMap<String, (bool, usize)> = BTreeMap::new();
    for s in &plan.steps {
        if let StepSpec::Generate { benchmark, .. } = &s.spec {
            seen.insert(benchmark.name.clone(), (benchmark.harmful, s.size));
        }
    }
    let mut out = BTreeMap::new();
    for (harmful, n) in seen.into_values() {
        let o = if harmful {
            Outcome::Safety
        } else {
            Outcome::OverRefusal
        };
        *out.entry(o.as_str()).or_insert(0) += n;
    }
    out
}

/// The detectable effect of every main effect (each factor that varies across one model's tune
/// steps, against its first level, within the strata where both levels were run) on each outcome.
pub fn effects(
    plan: &Plan,
    assumptions: &PowerAssumptions,
    alpha: f64,
    power: f64,
) -> Vec<EffectLine> {
    let tunes: Vec<&PlannedStep> = plan
        .steps
        .iter()
        .filter(|s| s.kind() == StepKind::Tune)
        .collect();
    let Some(first_model) = tunes.first().and_then(|s| s.factors.get("model")) else {
        return Vec::new();
    };
    let runs: Vec<&BTreeMap<String, String>> = tunes
        .iter()
        .map(|s| &s.factors)
        .filter(|f| f.get("model") == Some(first_model))
        .collect();
    let cell = |f: &BTreeMap<String, String>, skip: &str| -> Vec<(String, String)> {
        f.iter()
            .filter(|(k, _)| !NOT_EFFECTS.contains(&k.as_str()) && k.as_str() != skip)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let n_runs = runs.len();
    let mut cells: Vec<Vec<(String, String)>> = runs.iter().map(|f| cell(f, "")).collect();
    cells.sort();
    cells.dedup();
    let n_cells = cells.len();
    // The factors in the order of the first run's keys, levels in order of appearance.
    let mut factors: Vec<(String, Vec<String>)> = Vec::new();
    for f in &runs {
        for (k, v) in f.iter() {
            if NOT_EFFECTS.contains(&k.as_str()) {
                continue;
            }
            match factors.iter_mut().find(|(name, _)| name == k) {
                Some((_, levels)) if !levels.contains(v) => levels.push(v.clone()),
                Some(_) => {}
                None => factors.push((k.clone(), vec![v.clone()])),
            }
        }
    }
    let prompts = prompts_by_outcome(plan);
    let mut out = Vec::new();
    for (factor, levels) in factors.iter().filter(|(_, l)| l.len() > 1) {
        let a = &levels[0];
        for b in &levels[1..] {
            // Strata (the other factors' levels) where both levels were run.
            let strata = |level: &String| -> Vec<Vec<(String, String)>> {
                runs.iter()
                    .filter(|f| f.get(factor) == Some(level))
                    .map(|f| cell(f, factor))
                    .collect()
            };
            let (sa, sb) = (strata(a), strata(b));
            let runs_a = sa.iter().filter(|s| sb.contains(s)).count();
            let runs_b = sb.iter().filter(|s| sa.contains(s)).count();
            for outcome in [Outcome::Safety, Outcome::OverRefusal] {
                let Some(&n_prompts) = prompts.get(outcome.as_str()) else {
                    continue;
                };
                out.push(EffectLine {
                    factor: factor.clone(),
                    level_a: a.clone(),
                    level_b: b.clone(),
                    outcome,
                    runs_a,
                    runs_b,
                    n_runs,
                    n_cells,
                    n_prompts,
                    effect: detectable_effect(
                        runs_a,
                        runs_b,
                        n_runs,
                        n_cells,
                        n_prompts,
                        assumptions,
                        alpha,
                        power,
                    ),
                });
            }
        }
    }
    out
}

/// Estimated (trained, input) tokens of one example, capped at `max_len`.
fn example_tokens(c: &Conversation, cpt: f64, max_len: usize) -> (f64, f64) {
    let mut trained = 0.0;
    let mut input = TEMPLATE_TOKENS_PER_CONVERSATION;
    for m in &c.messages {
        let t = m.content.chars().count() as f64 / cpt + TEMPLATE_TOKENS_PER_MESSAGE;
        input += t;
        if m.role == Role::Assistant {
            trained += t - TEMPLATE_TOKENS_PER_MESSAGE + 1.0;
        }
    }
    let cap = max_len as f64;
    if input > cap {
        // Cut at max_len from the end: the answer loses what overflows.
        trained = (trained - (input - cap)).max(0.0);
        input = cap;
    }
    (trained, input)
}

/// Mean estimated (trained, input) tokens per example of a dataset spec's first `limit` rows.
fn dataset_mean(
    spec: &str,
    limit: Option<usize>,
    cpt: f64,
    max_len: usize,
) -> Result<(f64, f64, usize), PlanError> {
    let field = format!("dataset `{spec}`");
    let path = resolve_dataset(spec).map_err(|e| PlanError::Data {
        field: field.clone(),
        source: e,
    })?;
    let (mut convs, _) = read_all(&path, &ReadOptions::default()).map_err(|e| PlanError::Data {
        field: field.clone(),
        source: e,
    })?;
    if let Some(l) = limit {
        convs.truncate(l);
    }
    let n = convs.len();
    let (t, i) = convs
        .iter()
        .map(|c| example_tokens(c, cpt, max_len))
        .fold((0.0, 0.0), |(a, b), (t, i)| (a + t, b + i));
    let n_f = n.max(1) as f64;
    Ok((t / n_f, i / n_f, n))
}

/// The trainer config of a step's settings (defaults where the settings are not valid, which
/// the config check has already refused).
fn trainer_settings(settings: &serde_json::Value) -> TuneConfig {
    toml::Value::try_from(settings)
        .ok()
        .and_then(|v| match v {
            toml::Value::Table(t) => TuneConfig::from_settings(&t).ok(),
            _ => None,
        })
        .unwrap_or_default()
}

/// The tokens and time of `plan`.
pub fn compute(cfg: &StudyConfig, plan: &Plan) -> Result<Compute, PlanError> {
    let a = &cfg.analysis;
    let cpt = a.chars_per_token.unwrap_or(CHARS_PER_TOKEN);
    let rates = Rates {
        train_tokens_per_s: a
            .train_tokens_per_s
            .unwrap_or(MEASURED_RATES.train_tokens_per_s),
        generate_tokens_per_s: a
            .generate_tokens_per_s
            .unwrap_or(match cfg.generation.weights {
                GenWeights::Quantized => QUANTIZED_GENERATE_TOKENS_PER_S,
                // bf16 has not been timed in a study: the f32 rate is the conservative estimate.
                GenWeights::F32 | GenWeights::Bf16 => MEASURED_RATES.generate_tokens_per_s,
            }),
        judge_rows_per_s: a
            .judge_rows_per_s
            .unwrap_or(MEASURED_RATES.judge_rows_per_s),
    };
    // The model spec of every model step, to tell local models from remote ones.
    let remote = |s: &PlannedStep| -> bool {
        let model = s
            .factors
            .get("model")
            .and_then(|m| cfg.models.iter().find(|x| &x.name == m));
        model.is_some_and(|m| m.spec.starts_with("openai:"))
    };
    let mut train = Vec::new();
    let mut cache: BTreeMap<(String, usize), (f64, f64)> = BTreeMap::new();
    for s in &plan.steps {
        let (settings, align) = match &s.spec {
            StepSpec::Align { settings, .. } => (settings, true),
            StepSpec::Tune { settings, .. } => (settings, false),
            _ => continue,
        };
        let t = trainer_settings(settings);
        let key = (if align { "align" } else { "tune" }.to_string(), t.max_len);
        let (trained, input) = match cache.get(&key) {
            Some(&x) => x,
            None => {
                let x = if align {
                    align_mean(cfg, cpt, t.max_len)?
                } else {
                    let (tr, i, _) = dataset_mean(&cfg.data.base, cfg.data.limit, cpt, t.max_len)?;
                    (tr, i)
                };
                cache.insert(key, x);
                x
            }
        };
        // The trainer holds out ceil(n x eval_fraction) examples, at least one, keeping one.
        let held = if t.eval_fraction > 0.0 && s.size >= 2 {
            ((s.size as f64 * t.eval_fraction).ceil() as usize).clamp(1, s.size - 1)
        } else {
            0
        };
        let examples = s.size - held;
        let epochs = if t.epochs == 0 {
            let per_step = (t.batch_size * t.grad_accum).max(1) as f64;
            t.max_steps as f64 * per_step / examples.max(1) as f64
        } else {
            t.epochs as f64
        };
        let n = examples as f64 * epochs;
        let external = matches!(
            &s.spec,
            StepSpec::Align {
                external: Some(_),
                ..
            } | StepSpec::Tune {
                external: Some(_),
                ..
            }
        );
        train.push(TrainEstimate {
            label: s.label.clone(),
            examples,
            epochs,
            trained_tokens: trained * n,
            input_tokens: input * n,
            local: !remote(s) && !external,
            external,
            cost: if settings
                .get("anchor")
                .and_then(|a| a.as_str())
                .is_some_and(|a| !a.is_empty())
            {
                ANCHOR_COST
            } else {
                1.0
            },
        });
    }
    if cfg.tune.as_ref().map(|t| t.match_) == Some(TrainMatch::Tokens) {
        // Every tuned run trains on the baseline's tokens (the first tune step of its model).
        let mut base: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (e, s) in train.iter_mut().zip(
            plan.steps
                .iter()
                .filter(|s| matches!(s.kind(), StepKind::Align | StepKind::Tune)),
        ) {
            if s.kind() != StepKind::Tune {
                continue;
            }
            let m = s.factors.get("model").cloned().unwrap_or_default();
            let (t, i) = *base.entry(m).or_insert((e.trained_tokens, e.input_tokens));
            if e.trained_tokens > 0.0 {
                let scale = t / e.trained_tokens;
                e.epochs *= scale;
                e.input_tokens *= scale;
                e.trained_tokens = t;
            } else {
                e.input_tokens = i;
            }
        }
    }
    let (mut rows_local, mut rows_remote, mut classifier_rows, mut utility_steps) = (0, 0, 0, 0);
    let mut probe_rows = 0;
    for s in &plan.steps {
        match &s.spec {
            StepSpec::Generate { .. } if remote(s) => rows_remote += s.size,
            StepSpec::Generate { .. } => rows_local += s.size,
            StepSpec::Judge { judge_kind, .. }
                if *judge_kind == JudgeKind::Classifier && !remote(s) =>
            {
                classifier_rows += s.size
            }
            StepSpec::Judge { judge_kind, .. } if *judge_kind == JudgeKind::Probe && !remote(s) => {
                probe_rows += s.size
            }
            StepSpec::Utility { .. } => utility_steps += 1,
            _ => {}
        }
    }
    let max_new_tokens = cfg.generation.max_new_tokens;
    let local_input: f64 = train
        .iter()
        .filter(|e| e.local)
        .map(|e| e.input_tokens * e.cost)
        .sum();
    let gpu_tokens_per_s = a.gpu_tokens_per_s.unwrap_or(GPU_TRAIN_TOKENS_PER_S);
    let external_input_tokens: f64 = train
        .iter()
        .filter(|e| e.external)
        .map(|e| e.input_tokens)
        .sum();
    Ok(Compute {
        gpu_tokens_per_s,
        gpu_hours: external_input_tokens / gpu_tokens_per_s / 3600.0,
        external_input_tokens,
        trained_tokens: train.iter().map(|e| e.trained_tokens).sum(),
        input_tokens: train.iter().map(|e| e.input_tokens).sum(),
        train,
        generate_rows_local: rows_local,
        generate_rows_remote: rows_remote,
        max_new_tokens,
        classifier_rows,
        probe_rows,
        utility_steps,
        utility_s: utility_steps as f64 * UTILITY_S_PER_STEP,
        train_s: local_input / rates.train_tokens_per_s,
        generate_s: (rows_local * max_new_tokens) as f64 / rates.generate_tokens_per_s,
        judge_s: (classifier_rows as f64 + PROBE_ROW_COST * probe_rows as f64)
            / rates.judge_rows_per_s,
        rates,
        matched_tokens: cfg.tune.as_ref().map(|t| t.match_) == Some(TrainMatch::Tokens),
        chars_per_token: cpt,
    })
}

/// Mean estimated (trained, input) tokens of an alignment-set example: the benign sources'
/// examples and the harmful train-split prompts with a refusal, weighted by their counts.
fn align_mean(cfg: &StudyConfig, cpt: f64, max_len: usize) -> Result<(f64, f64), PlanError> {
    let Some(a) = &cfg.align else {
        return Ok((0.0, 0.0));
    };
    let (mut t, mut i, mut n) = (0.0, 0.0, 0usize);
    for (k, spec) in a.benign.iter().enumerate() {
        let limit = a.benign_limit.as_ref().and_then(|l| l.for_source(k));
        let (tb, ib, nb) = dataset_mean(spec, limit, cpt, max_len)?;
        t += tb * nb as f64;
        i += ib * nb as f64;
        n += nb;
    }
    let harmful = PromptSet::load(&a.harmful, None).map_err(|e| PlanError::Data {
        field: "align.harmful".into(),
        source: e,
    })?;
    let train = harmful.split(Split::Train, cfg.study.split_seed, cfg.study.test_fraction);
    let nh = a.harmful_limit.map_or(train.len(), |l| l.min(train.len()));
    let prompt_chars = train
        .items
        .iter()
        .take(nh)
        .map(|p| p.prompt.chars().count() as f64)
        .sum::<f64>()
        / nh.max(1) as f64;
    let refusal_chars = resolve_dataset(&a.refusals)
        .ok()
        .and_then(|p| read_json_lines(&p).ok())
        .map(|rows| {
            let r: Vec<f64> = rows
                .iter()
                .filter_map(|(_, r)| r.get("response").and_then(|v| v.as_str()))
                .map(|s| s.chars().count() as f64)
                .collect();
            r.iter().sum::<f64>() / r.len().max(1) as f64
        })
        .unwrap_or(0.0);
    let refusal = refusal_chars / cpt + 1.0;
    let input = (prompt_chars / cpt
        + refusal
        + 2.0 * TEMPLATE_TOKENS_PER_MESSAGE
        + TEMPLATE_TOKENS_PER_CONVERSATION)
        .min(max_len as f64);
    t += refusal.min(input) * nh as f64;
    i += input * nh as f64;
    n += nh;
    Ok((t / n.max(1) as f64, i / n.max(1) as f64))
}

/// Seconds as `1 h 02 min`, `3 min 20 s` or `12 s`.
fn duration(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

/// Tokens with a thousands separator.
fn tokens(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl DryRun {
    /// The text `--dry-run` prints after the plan.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let a = &self.assumptions;
        let _ = writeln!(
            o,
            "\nPower: detectable effect (points of refusal rate) at {:.0}% power, two-sided alpha {}",
            self.power * 100.0,
            self.alpha
        );
        let _ = writeln!(
            o,
            "  assuming run SD {} points, prompt SD {} points, base rate {} ([analysis] run_sd_points, prompt_sd_points, base_rate)",
            a.run_sd_points, a.prompt_sd_points, a.base_rate
        );
        if self.effects.is_empty() {
            let _ = writeln!(
                o,
                "  no main effect: no factor varies across the tune steps (or no benchmark)"
            );
        }
        for e in &self.effects {
            let what = match e.effect {
                Some(d) => format!("detectable effect {d:.1} points"),
                None => "no interval: one run per cell".to_string(),
            };
            let _ = writeln!(
                o,
                "  {} {} vs {}, {} ({} prompts): {what}  [runs {} vs {}; {} runs, {} cells per model]",
                e.factor,
                e.level_b,
                e.level_a,
                e.outcome.as_str(),
                e.n_prompts,
                e.runs_a,
                e.runs_b,
                e.n_runs,
                e.n_cells
            );
        }
        let c = &self.compute;
        let _ = writeln!(
            o,
            "\nCompute (estimates; trained tokens from the source data at {} chars per token):",
            c.chars_per_token
        );
        const SHOWN: usize = 12;
        for e in c.train.iter().take(SHOWN) {
            let _ = writeln!(
                o,
                "  {:<44} {:>5} examples x {:.2} epochs: ~{} trained tokens, ~{} input tokens",
                e.label,
                e.examples,
                e.epochs,
                tokens(e.trained_tokens),
                tokens(e.input_tokens)
            );
        }
        if c.train.len() > SHOWN {
            let _ = writeln!(o, "  ... and {} more training steps", c.train.len() - SHOWN);
        }
        if c.matched_tokens {
            let _ = writeln!(
                o,
                "  [tune] match = \"tokens\": every tuned run trains on its baseline's tokens"
            );
        }
        let _ = writeln!(
            o,
            "  trained tokens: ~{} (input tokens ~{}) in {} training steps",
            tokens(c.trained_tokens),
            tokens(c.input_tokens),
            c.train.len()
        );
        if c.train.iter().any(|e| e.external) {
            let _ = writeln!(
                o,
                "  external trainers: ~{} input tokens in {} steps: ~{:.1} GPU-hours at {} input tokens/s per GPU ([analysis] gpu_tokens_per_s; an assumed rate for LoRA on a 7-8B model)",
                tokens(c.external_input_tokens),
                c.train.iter().filter(|e| e.external).count(),
                c.gpu_hours,
                c.gpu_tokens_per_s
            );
        }
        let rows = c.generate_rows_local + c.generate_rows_remote;
        let _ = writeln!(
            o,
            "  generated tokens: at most {} ({} answers x {} max_new_tokens; {} by local models, {} by openai: models)",
            tokens((rows * c.max_new_tokens) as f64),
            tokens(rows as f64),
            c.max_new_tokens,
            tokens((c.generate_rows_local * c.max_new_tokens) as f64),
            tokens((c.generate_rows_remote * c.max_new_tokens) as f64)
        );
        let local = c.train.iter().any(|e| e.local) || c.generate_rows_local > 0;
        if local {
            let _ = writeln!(
                o,
                "  local wall time on this machine: ~{} (training ~{} at {} tokens/s, generation at most ~{} at {} tokens/s, classifier judge ~{} at {} rows/s{}; other judges not counted)",
                duration(c.train_s + c.generate_s + c.judge_s + c.utility_s),
                duration(c.train_s),
                c.rates.train_tokens_per_s,
                duration(c.generate_s),
                c.rates.generate_tokens_per_s,
                duration(c.judge_s),
                c.rates.judge_rows_per_s,
                if c.utility_steps > 0 {
                    format!(
                        ", utility ~{} for {} models at {UTILITY_S_PER_STEP:.0} s each",
                        duration(c.utility_s),
                        c.utility_steps
                    )
                } else {
                    String::new()
                }
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StudyConfig;
    use crate::plan::plan;
    use std::path::Path;

    fn config(seeds: &str, design: &str) -> StudyConfig {
        let text = format!(
            r#"
[study]
name = "power"
seeds = {seeds}
[[models]]
name = "m"
spec = "m.gguf"
[data]
base = "demo:medical"
limit = 8
[factors]
structure = ["keep", "markdown"]
identity = ["keep", "add"]
design = "{design}"
[[benchmarks]]
name = "adv"
source = "advbench"
harmful = true
limit = 40
[[benchmarks]]
name = "or"
source = "overrefusal"
harmful = false
limit = 20
[tune]
settings = {{ epochs = 2, max_len = 256 }}
[analysis]
run_sd_points = 5.0
"#
        );
        StudyConfig::parse(&text, Path::new("power.toml")).unwrap()
    }

    fn dry_text(cfg: &StudyConfig) -> (Plan, DryRun, String) {
        let p = plan(cfg).unwrap();
        let d = dry_run(cfg, &p).unwrap();
        let text = format!("{}{}", p.render(), d.render());
        (p, d, text)
    }

    #[test]
    fn dry_run_prints_detectable_effects_per_factor_and_outcome() {
        let cfg = config("[0, 1, 2]", "full");
        let (_, d, text) = dry_text(&cfg);
        assert_eq!(d.assumptions.run_sd_points, 5.0);
        // Not set in the config: the measured default.
        assert_eq!(
            d.assumptions.prompt_sd_points,
            safetune_eval::effects::PowerAssumptions::MEASURED.prompt_sd_points
        );
        // Two varying factors x two outcomes; a full factorial: half the runs at each level.
        assert_eq!(d.effects.len(), 4, "{text}");
        let e = &d.effects[0];
        assert_eq!((e.runs_a, e.runs_b, e.n_runs, e.n_cells), (6, 6, 12, 4));
        assert_eq!(
            (e.factor.as_str(), e.outcome, e.n_prompts),
            ("identity", Outcome::Safety, 40)
        );
        let want = detectable_effect(6, 6, 12, 4, 40, &d.assumptions, 0.05, 0.8).unwrap();
        assert!(
            text.contains(&format!(
                "identity add vs keep, safety (40 prompts): detectable effect {want:.1} points"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "structure markdown vs keep, over_refusal (20 prompts): detectable effect"
            ),
            "{text}"
        );
        assert!(!text.contains("no interval"), "{text}");
        assert!(text.contains("trained tokens: ~"), "{text}");
        // 13 conditions (the base model and 12 tuned runs) x 60 prompts.
        assert!(
            text.contains("generated tokens: at most 99,840 (780 answers x 128 max_new_tokens"),
            "{text}"
        );
        assert!(text.contains("local wall time on this machine"), "{text}");
        // One-at-a-time: the baseline's seeds against the changed cell's.
        let (_, d, _) = dry_text(&config("[0, 1]", "one-at-a-time"));
        let e = &d.effects[0];
        assert_eq!((e.runs_a, e.runs_b, e.n_runs, e.n_cells), (2, 2, 6, 3));
    }

    #[test]
    fn one_seed_has_no_interval() {
        let (_, d, text) = dry_text(&config("[0]", "full"));
        assert!(d.effects.iter().all(|e| e.effect.is_none()));
        assert!(
            text.contains(
                "identity add vs keep, safety (40 prompts): no interval: one run per cell"
            ),
            "{text}"
        );
    }

    #[test]
    fn matching_tokens_gives_every_tuned_run_the_baselines_tokens() {
        let mut cfg = config("[0]", "full");
        cfg.tune.as_mut().unwrap().match_ = TrainMatch::Tokens;
        let (p, d, text) = dry_text(&cfg);
        let c = &d.compute;
        assert_eq!(c.train.len(), 4);
        assert!(c
            .train
            .iter()
            .all(|e| e.trained_tokens == c.train[0].trained_tokens));
        assert!(text.contains("match = \"tokens\""), "{text}");
        // The variants' tune steps depend on the baseline's dataset; the baseline's does not.
        let tunes: Vec<_> = p
            .steps
            .iter()
            .filter(|s| s.kind() == StepKind::Tune)
            .collect();
        assert_eq!(tunes[0].deps.len(), 2);
        assert!(tunes[1..].iter().all(|s| s.deps.len() == 3
            && s.deps[2] == tunes[0].deps[1]
            && matches!(
                s.spec,
                StepSpec::Tune {
                    match_tokens: true,
                    ..
                }
            )));
    }
}
