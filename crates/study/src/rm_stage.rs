//! Reward-model scoring of generations through safetune-eval's `RewardModel` (local sequence
//! classifiers, HTTP scoring endpoints, Bradley-Terry heads, implicit rewards). Scores are
//! committed chunk by chunk; a resumed step scores only the rows it lacks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use safetune_data::Message;
use safetune_eval::rm::{open_rm, RewardModel, RmInput, RmOptions};

use crate::step::*;
use crate::store::ScoreRow;

/// Opens the reward model of a score step (`spec`).
pub type RmOpener = dyn Fn(&str) -> Result<Arc<dyn RewardModel>, StageError> + Send + Sync;

pub fn default_rm(spec: &str) -> Result<Arc<dyn RewardModel>, StageError> {
    open_rm(spec, &RmOptions::default())
        .map(Arc::from)
        .map_err(|e| StageError::Other(e.to_string()))
}

pub struct ScoreStage {
    opener: Arc<RmOpener>,
    cache: Mutex<HashMap<String, Arc<dyn RewardModel>>>,
}

impl ScoreStage {
    pub fn new() -> ScoreStage {
        ScoreStage::with_opener(Arc::new(default_rm))
    }

    pub fn with_opener(opener: Arc<RmOpener>) -> ScoreStage {
        ScoreStage {
            opener,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl Default for ScoreStage {
    fn default() -> Self {
        Self::new()
    }
}

impl Stage for ScoreStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Score { name, spec, .. } = &step.spec else {
            return Err(StageError::Other(format!(
                "{}: not a score step",
                step.label
            )));
        };
        input_generations(step, inputs)?;
        let gen_key = ctx
            .input_keys
            .first()
            .cloned()
            .ok_or_else(|| StageError::Other(format!("{}: no generate input", step.label)))?;
        let gens = ctx.store.generations(&gen_key)?;
        let done = ctx.store.score_ids(ctx.key)?;
        let pending: Vec<_> = gens.iter().filter(|g| !done.contains(&g.row_id)).collect();
        let total = gens.len();
        let mut finished = total - pending.len();
        (ctx.progress)(&StepProgress {
            done: finished,
            total,
        });
        if !pending.is_empty() {
            let rm = {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                match cache.get(spec) {
                    Some(rm) => rm.clone(),
                    None => {
                        let rm = (self.opener)(spec)?;
                        cache.insert(spec.clone(), rm.clone());
                        rm
                    }
                }
            };
            for part in pending.chunks(rm.max_batch().max(1)) {
                let batch: Vec<RmInput> = part
                    .iter()
                    .map(|g| RmInput {
                        context: vec![Message::user(g.prompt.clone())],
                        response: g.response.clone(),
                    })
                    .collect();
                let scores = rm.score(&batch).map_err(|e| {
                    StageError::Other(format!(
                        "{}: {e} ({finished} of {total} rows are scored; a rerun resumes)",
                        step.label
                    ))
                })?;
                if scores.len() != part.len() {
                    return Err(StageError::Other(format!(
                        "{}: the reward model returned {} scores for {} inputs",
                        step.label,
                        scores.len(),
                        part.len()
                    )));
                }
                let rows: Vec<ScoreRow> = part
                    .iter()
                    .zip(scores)
                    .map(|(g, score)| ScoreRow {
                        row_id: g.row_id.clone(),
                        score,
                    })
                    .collect();
                ctx.store.insert_scores(ctx.key, &rows)?;
                finished += rows.len();
                (ctx.progress)(&StepProgress {
                    done: finished,
                    total,
                });
            }
        }
        let all = ctx.store.scores(ctx.key)?;
        let mean = if all.is_empty() {
            0.0
        } else {
            all.iter().map(|s| s.score).sum::<f64>() / all.len() as f64
        };
        Ok(StepOutput::Scores {
            reward_model: name.clone(),
            rows: all.len(),
            mean,
        })
    }
}
