//! The stages of `[mitigations]` and `[utility]`: projecting a tuned adapter onto the
//! alignment subspace ([`ProjectStage`], over [`safetune_train::project`]), and a model's
//! utility ([`UtilityStage`], over [`safetune_eval::utility`]: held-out loss and perplexity on the
//! tuning domain, multiple-choice accuracy by log-likelihood). The other arms are ordinary
//! steps: `data` a transform, `replay` a mix, `anchor` a tune step with the trainer's anchor
//! settings.

use std::time::Instant;

use safetune_data::demo::resolve_dataset;
use safetune_data::read::{read_all, ReadOptions};
use safetune_eval::utility::{heldout_loss, mcq_accuracy, read_mcq};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_train::project::{project, ProjectOptions, Projector, Selection};

use crate::step::*;

/// Projects the adapter of its first input (a tuned model) onto the alignment subspace of its
/// second (the aligned model: the alignment adapter it was merged from, in low-rank factors).
pub struct ProjectStage;

impl Stage for ProjectStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Project {
            projector,
            threshold,
            share,
        } = &step.spec
        else {
            return Err(step.not_a("project"));
        };
        let models: Vec<&ModelArtifact> = inputs.iter().filter_map(|o| o.model()).collect();
        let (Some(tuned), Some(aligned)) = (models.first(), models.get(1)) else {
            return Err(StageError::Input {
                label: step.label.clone(),
                expected: "a tuned model and the aligned model".into(),
            });
        };
        let adapter = tuned.adapter.clone().ok_or_else(|| {
            StageError::Other(format!("{}: the tuned model has no adapter", step.label))
        })?;
        let from = aligned.aligned_from.clone().ok_or_else(|| {
            StageError::Other(format!(
                "{}: the aligned model `{}` does not record the adapter it was merged from (a store written before projection existed)\nhint: rerun the study with a new --output, or delete that align step",
                step.label, aligned.spec
            ))
        })?;
        let selection = match (threshold, share) {
            (_, Some(s)) => Selection::Share(*s),
            (Some(t), None) => Selection::Threshold(*t),
            (None, None) => Selection::Threshold(crate::plan::DEFAULT_PROJECT_THRESHOLD),
        };
        let projector = match projector.as_str() {
            "exact" => Projector::Exact,
            _ => Projector::Scaled,
        };
        let output = ctx.dir.join("adapter");
        let opts = ProjectOptions {
            adapter,
            base: None,
            aligned: from.adapter.display().to_string(),
            output: output.clone(),
            projector,
            selection,
        };
        (ctx.progress)(&StepProgress { done: 0, total: 1 });
        // The per-layer figures go to the adapter's own `projection.json`.
        project(&opts).map_err(|e| StageError::Other(format!("{}: {e}", step.label)))?;
        (ctx.progress)(&StepProgress { done: 1, total: 1 });
        Ok(StepOutput::Model(ModelArtifact {
            adapter: Some(output),
            ..(*tuned).clone()
        }))
    }
}

/// Measures its input model's utility. Local models only (the measures read log-likelihoods).
pub struct UtilityStage;

impl Stage for UtilityStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Utility {
            heldout,
            heldout_skip,
            heldout_limit,
            mcq,
            mcq_limit,
            ..
        } = &step.spec
        else {
            return Err(step.not_a("utility"));
        };
        let model = input_model(step, inputs)?;
        let other = |e: String| StageError::Other(format!("{}: {e}", step.label));
        let spec = ModelSpec::parse(&model.spec)?;
        if matches!(spec, ModelSpec::OpenAi { .. }) {
            return Err(other(format!(
                "`{}` is served over HTTP; utility reads log-likelihoods of a local model",
                model.spec
            )));
        }
        let started = Instant::now();
        let path = resolve_dataset(heldout)?;
        let (convs, _) = read_all(&path, &ReadOptions::default())?;
        let convs: Vec<_> = convs
            .into_iter()
            .skip(*heldout_skip)
            .take(*heldout_limit)
            .collect();
        if convs.is_empty() {
            return Err(other(format!(
                "{} has no conversations after the first {heldout_skip} (the tuning set's)",
                path.display()
            )));
        }
        let mut items = read_mcq(&resolve_dataset(mcq)?).map_err(|e| other(e.to_string()))?;
        if *mcq_limit > 0 {
            items.truncate(*mcq_limit);
        }
        // f32 weights, the adapter merged: the exact path, the same for every model compared.
        let load = LoadOptions {
            adapter: model.adapter.clone(),
            merge_adapter: model.adapter.is_some(),
            ..Default::default()
        };
        let engine = LocalEngine::load(&spec, &load)?;
        let total = convs.len() + items.len();
        let progress = &mut *ctx.progress;
        let loss = heldout_loss(&engine, &convs, &mut |d, _| {
            progress(&StepProgress { done: d, total })
        })
        .map_err(|e| other(e.to_string()))?;
        let n = convs.len();
        let mcq = mcq_accuracy(&engine, &items, &mut |d, _| {
            progress(&StepProgress { done: n + d, total })
        })
        .map_err(|e| other(e.to_string()))?;
        let mcq_items: Vec<(String, bool)> = items
            .iter()
            .zip(&mcq.picks)
            .map(|(i, (_, pick))| (i.id.clone(), *pick == i.answer))
            .collect();
        Ok(StepOutput::Utility(UtilityFigures {
            heldout_examples: loss.examples,
            heldout_skipped: loss.skipped,
            heldout_tokens: loss.tokens,
            loss: loss.loss,
            perplexity: loss.perplexity,
            heldout_items: loss.items,
            mcq_correct: mcq_items.iter().filter(|(_, c)| *c).count(),
            mcq_total: mcq_items.len(),
            mcq_chance: mcq.chance,
            mcq_items,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }
}
