//! Align and tune steps through safetune-train: LoRA SFT of a local model on the step's dataset.
//! `align` tunes the base on the alignment set and merges the adapter into a new model
//! directory (so later tuning starts from the aligned weights); `tune` writes an adapter that
//! generation applies on top of its input model. A killed training step resumes from the
//! trainer's latest checkpoint.

use serde_json::Value as Json;

use safetune_model::ModelSpec;
use safetune_train::peft::{merge, SaveDType};
use safetune_train::{checkpoint, tune, Event, RunOptions, TuneConfig};

use crate::step::*;

pub struct TrainStage;

fn other(label: &str) -> impl Fn(safetune_train::TrainError) -> StageError + '_ {
    move |e| StageError::Other(format!("{label}: {e}"))
}

/// The trainer config of a step: the study's `settings` table plus model, data, output, seed.
/// Unknown settings are rejected by the trainer with their key.
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

impl Stage for TrainStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let model = input_model(step, inputs)?;
        let (data, _, _) = input_dataset(step, inputs)?;
        let (settings, seed, align) = match &step.spec {
            StepSpec::Align { settings } => (settings, 0, true),
            StepSpec::Tune { settings, seed } => (settings, *seed, false),
            _ => return Err(step.not_a("training")),
        };
        if model.spec.starts_with("openai:") {
            return Err(StageError::Other(format!(
                "{}: `{}` is served over HTTP and cannot be tuned here\nhint: tune it with `safetune export --to llama-factory|axolotl`, serve the checkpoints, and list them as [[models]] without [align]/[tune]",
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
        let cfg = tune_config(step, settings, &model.spec, data, &out, seed)?;
        let opts = RunOptions {
            resume,
            stop: None,
            stop_after: None,
        };
        let progress = &mut *ctx.progress;
        let summary = tune(&cfg, &opts, &mut |e| {
            if let Event::Step(log) = e {
                progress(&StepProgress {
                    done: log.step,
                    total: log.total_steps,
                });
            }
        })
        .map_err(other(&step.label))?;
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
                adapter: None,
            }))
        } else {
            Ok(StepOutput::Model(ModelArtifact {
                adapter: Some(summary.output),
                ..model.clone()
            }))
        }
    }
}
