//! Align and tune steps through safetune-train: LoRA SFT of a local model on the step's dataset.
//! `align` tunes the base on the alignment set and merges the adapter into a new model
//! directory (so later tuning starts from the aligned weights); `tune` writes an adapter that
//! generation applies on top of its input model. A killed training step resumes from the
//! trainer's latest checkpoint. A step whose examples do not fit `max_len` fails before its
//! first training step unless `allow_truncation` is set. Both record what they trained on in
//! their output's `training` ([`TrainingCounts`]: examples, trained and input tokens over every
//! epoch). With `[tune] match = "tokens"` a tune step's length is set in optimizer steps so that
//! it trains on as many loss-carrying tokens as its baseline dataset (its last dataset input)
//! does at the configured epochs.

use std::time::Instant;

use serde_json::Value as Json;

use safetune_model::ModelSpec;
use safetune_train::peft::{merge, SaveDType};
use safetune_train::recipe::{
    encode_train, match_trained_tokens, planned_tokens, prepare_checked, run,
};
use safetune_train::sft::EncodeStats;
use safetune_train::{checkpoint, Event, RunOptions, TuneConfig};

use crate::external_train::run_external;
use crate::step::*;

pub struct TrainStage;

fn other(label: &str) -> impl Fn(safetune_train::TrainError) -> StageError + '_ {
    move |e| StageError::Other(format!("{label}: {e}"))
}

/// The trainer config of a step: the study's `settings` table plus model, data, output, seed.
/// Unknown settings are rejected by the trainer with their key (and, before that, when the
/// study config is loaded).
pub fn tune_config(
    step: &PlannedStep,
    settings: &Json,
    model: &str,
    data: &std::path::Path,
    output: &std::path::Path,
    seed: u64,
) -> Result<TuneConfig, StageError> {
    let mut table: toml::Table = match toml::Value::try_from(settings) {
        Ok(toml::Value::Table(t)) => t,
        Ok(_) | Err(_) => toml::Table::new(),
    };
    table.insert("model".into(), toml::Value::String(model.to_string()));
    table.insert(
        "data".into(),
        toml::Value::String(data.display().to_string()),
    );
    table.insert(
        "output".into(),
        toml::Value::String(output.display().to_string()),
    );
    table
        .entry("seed")
        .or_insert(toml::Value::Integer(seed as i64));
    let text = toml::to_string(&table).map_err(|e| StageError::Other(e.to_string()))?;
    TuneConfig::from_toml_str(&text, &format!("settings of `{}`", step.label))
        .map_err(other(&step.label))
}

/// Fails a training step whose examples were cut at `max_len` (the trainer counts them), unless
/// the config allows it; the error names the count and the `max_len` that fits every example.
pub fn check_truncation(
    label: &str,
    section: &str,
    stats: &EncodeStats,
    max_len: usize,
    allow_truncation: bool,
) -> Result<(), StageError> {
    if stats.truncated == 0 || allow_truncation {
        return Ok(());
    }
    let total = stats.examples + stats.dropped_empty;
    let dropped = if stats.dropped_empty > 0 {
        format!(
            "; {} of them lose their whole answer and would be dropped",
            stats.dropped_empty
        )
    } else {
        String::new()
    };
    Err(StageError::Other(format!(
        "{label}: {} of {total} training examples are longer than max_len = {max_len} tokens and would be cut (the longest has {} tokens){dropped}\nhint: raise `max_len` in [{section}] settings to at least {}, or set allow_truncation = true in [{section}]",
        stats.truncated, stats.longest, stats.longest
    )))
}

impl Stage for TrainStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let model = input_model(step, inputs)?;
        let (data, _, _) = input_dataset(step, inputs)?;
        let (settings, seed, align, allow_truncation, match_tokens, anchor_refusals) =
            match &step.spec {
                StepSpec::Align {
                    external: Some(e),
                    settings,
                    ..
                } => return run_external(step, inputs, ctx, e, settings, 0, true),
                StepSpec::Tune {
                    external: Some(e),
                    settings,
                    seed,
                    ..
                } => return run_external(step, inputs, ctx, e, settings, *seed, false),
                StepSpec::Align {
                    settings,
                    allow_truncation,
                    ..
                } => (settings, 0, true, *allow_truncation, false, false),
                StepSpec::Tune {
                    settings,
                    seed,
                    allow_truncation,
                    match_tokens,
                    anchor_refusals,
                    ..
                } => (
                    settings,
                    *seed,
                    false,
                    *allow_truncation,
                    *match_tokens,
                    *anchor_refusals,
                ),
                _ => return Err(step.not_a("training")),
            };
        if model.spec.starts_with("openai:") {
            return Err(StageError::Other(format!(
                "{}: `{}` is served over HTTP and cannot be tuned here\nhint: set `backend` in [tune] (llama-factory, axolotl, trl or command) and `train_model` on the model, so an external trainer tunes it",
                step.label, model.spec
            )));
        }
        if model.adapter.is_some() {
            return Err(StageError::Other(format!(
                "{}: the input model carries an adapter; tuning starts from a model without one",
                step.label
            )));
        }
        let out = ctx.dir.join("adapter");
        let resume = checkpoint::latest(&out).is_some();
        if !resume && out.exists() {
            // A run killed before its first checkpoint: start it again.
            std::fs::remove_dir_all(&out).map_err(|e| StageError::Io {
                path: out.clone(),
                source: e,
            })?;
        }
        // The anchor arm on refusals: its anchor set, as the trainer's `anchor_data`.
        let mut settings = settings.clone();
        if anchor_refusals {
            let path = anchor_set(step, inputs, ctx)?;
            if let Json::Object(m) = &mut settings {
                m.insert(
                    "anchor_data".into(),
                    Json::String(path.display().to_string()),
                );
            }
        }
        let settings = &settings;
        let mut cfg = tune_config(step, settings, &model.spec, data, &out, seed)?;
        let opts = RunOptions {
            resume,
            stop: None,
            stop_after: None,
        };
        // `safetune_train::tune`, with the encoded data checked before the first step.
        cfg.validate().map_err(other(&step.label))?;
        std::fs::create_dir_all(&out).map_err(|e| StageError::Io {
            path: out.clone(),
            source: e,
        })?;
        let started = Instant::now();
        let section = if align { "align" } else { "tune" };
        let mut refused = None;
        // The closure's error type is `prepare_checked`'s `TrainError`, large or not.
        #[allow(clippy::result_large_err)]
        let prepared = prepare_checked(&cfg, &mut |stats| {
            check_truncation(&step.label, section, stats, cfg.max_len, allow_truncation).map_err(
                |e| {
                    let message = e.to_string();
                    refused = Some(e);
                    safetune_train::TrainError::Dataset(message)
                },
            )
        });
        let prepared = match (prepared, refused) {
            (_, Some(e)) => return Err(e),
            (p, None) => p.map_err(other(&step.label))?,
        };
        if match_tokens {
            // The baseline's trained tokens at the configured epochs are this run's target.
            let baseline = inputs
                .iter()
                .filter_map(|o| o.dataset())
                .nth(1)
                .ok_or_else(|| StageError::Input {
                    label: step.label.clone(),
                    expected: "the baseline dataset (match = \"tokens\")".into(),
                })?;
            let base_cfg = tune_config(step, settings, &model.spec, baseline.0, &out, seed)?;
            let (base_train, _) = encode_train(&base_cfg).map_err(other(&step.label))?;
            let target = planned_tokens(&base_cfg, &base_train).trained_tokens;
            cfg = match_trained_tokens(&cfg, &prepared.train, target);
        }
        let per_epoch: usize = prepared.train.iter().map(|e| e.trained_tokens()).sum();
        let progress = &mut *ctx.progress;
        let summary = run(&cfg, &opts, prepared, started, &mut |e| {
            if let Event::Step(log) = e {
                progress(&StepProgress {
                    done: log.step,
                    total: log.total_steps,
                });
            }
        })
        .map_err(other(&step.label))?;
        let training = Some(TrainingCounts {
            examples: summary.tokens.examples,
            trained_tokens: summary.tokens.trained_tokens,
            input_tokens: summary.tokens.input_tokens,
            steps: summary.total_steps,
            epochs: summary.tokens.trained_tokens as f64 / per_epoch.max(1) as f64,
        });
        if align {
            let merged = ctx.dir.join("merged");
            if merged.exists() {
                let _ = std::fs::remove_dir_all(&merged);
            }
            let base = ModelSpec::parse(&model.spec)?;
            merge(&base, Some(&summary.output), &merged, SaveDType::F32)?;
            Ok(StepOutput::Model(ModelArtifact {
                name: model.name.clone(),
                spec: merged.display().to_string(),
                concurrency: model.concurrency,
                endpoints: vec![],
                access: Default::default(),
                adapter: None,
                lora: model.lora.clone(),
                training,
                aligned_from: Some(AlignedFrom {
                    base: model.spec.clone(),
                    adapter: summary.output.clone(),
                }),
            }))
        } else {
            Ok(StepOutput::Model(ModelArtifact {
                adapter: Some(summary.output),
                training,
                ..model.clone()
            }))
        }
    }
}

/// The anchor set of an `anchor` arm on refusals: the examples of the alignment set (the step's
/// last dataset input) that pair a train-split harmful prompt with a refusal, written to the
/// step's directory. Those examples carry `meta.source` [`crate::stages::ALIGN_REFUSAL_SOURCE`].
fn anchor_set(
    step: &PlannedStep,
    inputs: &[StepOutput],
    ctx: &StepContext<'_>,
) -> Result<std::path::PathBuf, StageError> {
    let (align, _, _) = inputs
        .iter()
        .filter_map(|o| o.dataset())
        .next_back()
        .filter(|_| inputs.iter().filter_map(|o| o.dataset()).count() >= 2)
        .ok_or_else(|| StageError::Input {
            label: step.label.clone(),
            expected: "the alignment set (anchor on refusals)".into(),
        })?;
    let text = std::fs::read_to_string(align).map_err(|e| StageError::Io {
        path: align.clone(),
        source: e,
    })?;
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Json>(line) else {
            continue;
        };
        if v.pointer("/meta/source").and_then(Json::as_str)
            == Some(crate::stages::ALIGN_REFUSAL_SOURCE)
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept.is_empty() {
        return Err(StageError::Other(format!(
            "{}: the alignment set {} has no refusal examples to anchor on",
            step.label,
            align.display()
        )));
    }
    std::fs::create_dir_all(&ctx.dir).map_err(|e| StageError::Io {
        path: ctx.dir.clone(),
        source: e,
    })?;
    let path = ctx.dir.join("anchor_refusals.jsonl");
    std::fs::write(&path, kept).map_err(|e| StageError::Io {
        path: path.clone(),
        source: e,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_examples_fail_the_step_with_the_length_that_fits_unless_allowed() {
        let stats = EncodeStats {
            examples: 70,
            truncated: 7,
            dropped_empty: 2,
            longest: 211,
            ..Default::default()
        };
        let e = check_truncation("align smollm2", "align", &stats, 128, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("align smollm2: 7 of 72 training examples are longer than max_len = 128 tokens and would be cut (the longest has 211 tokens); 2 of them lose"),
            "{e}"
        );
        assert!(
            e.ends_with("\nhint: raise `max_len` in [align] settings to at least 211, or set allow_truncation = true in [align]"),
            "{e}"
        );
        assert!(check_truncation("t", "tune", &stats, 128, true).is_ok());
        let fits = EncodeStats {
            examples: 72,
            longest: 120,
            ..Default::default()
        };
        assert!(check_truncation("t", "tune", &fits, 128, false).is_ok());
    }
}
