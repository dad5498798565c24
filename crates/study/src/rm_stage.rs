//! Reward-model steps through safetune-eval's `RewardModel` (local sequence classifiers, HTTP
//! scoring endpoints, Bradley-Terry heads, implicit rewards): scoring generations, and RM-guided
//! selection of tuning data (keep the top, bottom or a random share of a dataset by score).
//! Scores are committed chunk by chunk; a resumed step scores only the rows it lacks.

use std::collections::HashMap;
use std::sync::Arc;

use safetune_data::{Message, Role};
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

/// The reward models of a stage: opened once each (the demo head is trained on first use, with
/// the step's progress), then shared by its steps.
pub struct RewardModels {
    opener: Arc<RmOpener>,
    opened: Opened<dyn RewardModel>,
}

impl RewardModels {
    pub fn new(opener: Arc<RmOpener>) -> RewardModels {
        RewardModels {
            opener,
            opened: Opened::default(),
        }
    }

    fn open(
        &self,
        spec: &str,
        step: &PlannedStep,
        ctx: &mut StepContext<'_>,
    ) -> Result<Arc<dyn RewardModel>, StageError> {
        self.opened.get_or_open(spec, || {
            if spec == "bt:demo" || spec.starts_with("bt:demo:") {
                safetune_eval::rm::bt::demo_head(spec, &mut |done, total| {
                    (ctx.progress)(&StepProgress { done, total })
                })
                .map_err(|e| StageError::Other(format!("{}: {e}", step.label)))?;
            }
            (self.opener)(spec)
        })
    }
}

pub struct ScoreStage(RewardModels);

impl ScoreStage {
    pub fn new() -> ScoreStage {
        ScoreStage::with_opener(Arc::new(default_rm))
    }

    pub fn with_opener(opener: Arc<RmOpener>) -> ScoreStage {
        ScoreStage(RewardModels::new(opener))
    }
}

/// Scores `items` (row id, input) that the step has no score for yet, committing each batch.
/// The reward model is opened only when something is left to score.
fn score_pending(
    rms: &RewardModels,
    spec: &str,
    items: &[(String, RmInput)],
    step: &PlannedStep,
    ctx: &mut StepContext<'_>,
) -> Result<(), StageError> {
    let mut done = ctx.store.score_ids(ctx.key)?;
    done.extend(
        ctx.store
            .missing_scores(ctx.key)?
            .into_iter()
            .map(|(id, _)| id),
    );
    let pending: Vec<&(String, RmInput)> =
        items.iter().filter(|(id, _)| !done.contains(id)).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let rm = rms.open(spec, step, ctx)?;
    in_batches(
        step,
        ctx,
        items.len(),
        &pending,
        rm.max_batch(),
        "scored",
        |part| {
            let batch: Vec<RmInput> = part.iter().map(|(_, x)| x.clone()).collect();
            rm.score(&batch).map_err(|e| e.to_string())
        },
        |store, key, part, scores| {
            // A NaN or infinite score is recorded as missing with its reason, not retried: the
            // same model gives the same answer on every rerun.
            let mut rows: Vec<ScoreRow> = Vec::with_capacity(part.len());
            let mut missing: Vec<(String, String)> = Vec::new();
            for ((id, _), score) in part.iter().zip(scores) {
                if score.is_finite() {
                    rows.push(ScoreRow {
                        row_id: id.clone(),
                        score,
                    });
                } else {
                    missing.push((
                        id.clone(),
                        format!("reward model {} returned {score} for row {id}", rm.name()),
                    ));
                }
            }
            store.insert_scores(key, &rows)?;
            Ok(store.insert_missing_scores(key, &missing)?)
        },
    )
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
            return Err(step.not_a("score"));
        };
        input_generations(step, inputs)?;
        let gen_key = ctx
            .input_keys
            .first()
            .cloned()
            .ok_or_else(|| StageError::Other(format!("{}: no generate input", step.label)))?;
        let items: Vec<(String, RmInput)> = ctx
            .store
            .generations(&gen_key)?
            .into_iter()
            .map(|g| {
                let input = RmInput {
                    context: vec![Message::user(g.prompt)],
                    response: g.response,
                };
                (g.row_id, input)
            })
            .collect();
        score_pending(&self.0, spec, &items, step, ctx)?;
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
            missing: ctx.store.missing_scores(ctx.key)?.len(),
        })
    }
}

/// RM-guided selection: scores every example of the input dataset (the last assistant turn
/// against the turns before it) and keeps the top, the bottom or a seeded random `keep` share.
pub struct SelectStage(RewardModels);

impl SelectStage {
    pub fn new() -> SelectStage {
        SelectStage::with_opener(Arc::new(default_rm))
    }

    pub fn with_opener(opener: Arc<RmOpener>) -> SelectStage {
        SelectStage(RewardModels::new(opener))
    }
}

impl Default for SelectStage {
    fn default() -> Self {
        Self::new()
    }
}

/// Indices of the examples a selection keeps, in input order. `scores[i]` is example i's score.
pub fn select_indices(
    scores: &[f64],
    keep: f64,
    strategy: crate::config::SelectStrategy,
    seed: u64,
) -> Vec<usize> {
    use crate::config::SelectStrategy;
    let n = scores.len();
    let k = ((n as f64 * keep).round() as usize).clamp(usize::from(n > 0), n);
    let mut order: Vec<usize> = (0..n).collect();
    // Examples without a finite score come last either way: never kept before a scored one.
    let unscored = |i: usize| !scores[i].is_finite();
    match strategy {
        // Ties keep input order (a stable sort).
        SelectStrategy::Top => order.sort_by(|&a, &b| {
            unscored(a)
                .cmp(&unscored(b))
                .then(scores[b].total_cmp(&scores[a]))
        }),
        SelectStrategy::Bottom => order.sort_by(|&a, &b| {
            unscored(a)
                .cmp(&unscored(b))
                .then(scores[a].total_cmp(&scores[b]))
        }),
        SelectStrategy::Random => safetune_eval::rm::stats::SplitMix::new(seed).shuffle(&mut order),
    }
    let mut kept = order[..k].to_vec();
    kept.sort_unstable();
    kept
}

impl Stage for SelectStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Select {
            rm_spec,
            keep,
            strategy,
            seed,
            ..
        } = &step.spec
        else {
            return Err(step.not_a("select"));
        };
        let (path, _, _) = input_dataset(step, inputs)?;
        let convs = crate::stages::read_dataset(path)?;
        let mut items = Vec::with_capacity(convs.len());
        for (i, c) in convs.iter().enumerate() {
            let Some(last) = c.messages.iter().rposition(|m| m.role == Role::Assistant) else {
                return Err(StageError::Other(format!(
                    "{}: example {} of {} has no assistant turn to score",
                    step.label,
                    i + 1,
                    path.display()
                )));
            };
            let input = RmInput {
                context: c.messages[..last].to_vec(),
                response: c.messages[last].content.clone(),
            };
            items.push((format!("ex{i:06}"), input));
        }
        score_pending(&self.0, rm_spec, &items, step, ctx)?;
        let by_id: HashMap<String, f64> = ctx
            .store
            .scores(ctx.key)?
            .into_iter()
            .map(|s| (s.row_id, s.score))
            .collect();
        let scores: Vec<f64> = items
            .iter()
            .map(|(id, _)| by_id.get(id).copied().unwrap_or(f64::NAN))
            .collect();
        let kept: Vec<_> = select_indices(&scores, *keep, *strategy, *seed)
            .into_iter()
            .map(|i| {
                let mut c = convs[i].clone();
                if let Some(s) = serde_json::Number::from_f64(scores[i]) {
                    c.meta
                        .insert("rm_score".into(), serde_json::Value::Number(s));
                }
                c
            })
            .collect();
        crate::stages::write_dataset(ctx, &kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SelectStrategy;

    #[test]
    fn selection_keeps_the_top_bottom_or_a_seeded_random_share_in_input_order() {
        let scores = [0.5, 2.0, -1.0, 2.0, 0.0, 1.0];
        assert_eq!(
            select_indices(&scores, 0.5, SelectStrategy::Top, 0),
            [1, 3, 5]
        );
        assert_eq!(
            select_indices(&scores, 0.5, SelectStrategy::Bottom, 0),
            [0, 2, 4]
        );
        let r = select_indices(&scores, 0.5, SelectStrategy::Random, 7);
        assert_eq!(r.len(), 3);
        assert!(r.windows(2).all(|w| w[0] < w[1]), "{r:?}");
        assert_eq!(r, select_indices(&scores, 0.5, SelectStrategy::Random, 7));
        // A tiny share still keeps one example.
        assert_eq!(select_indices(&scores, 0.01, SelectStrategy::Top, 0), [1]);
    }
}
