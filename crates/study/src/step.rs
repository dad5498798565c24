//! Steps: what a study is made of. Each step has a kind, typed settings ([`StepSpec`]), typed
//! inputs (the outputs of the steps it depends on) and one typed output ([`StepOutput`]). A
//! [`Stage`] runs steps of one kind; the [`Registry`] maps kinds to stages. Every kind's stage
//! lives in this crate ([`crate::stages::builtin_registry`]), wrapping the trainer, judges and
//! reward models of the other crates; tests swap in fakes through the same registry.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::{
    EndpointConfig, GenWeights, KeyAccess, PerSource, SelectStrategy, SplitChoice,
};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Resolves a model spec (and its endpoints).
    Model,
    /// Makes a dataset variant with `transform`.
    Transform,
    /// Mixes refusal examples into a tuning set.
    Mix,
    /// Keeps the examples a reward model scores highest (or lowest, or at random).
    Select,
    /// Builds the safety-alignment set (train-split harmful prompts + refusals, benign answers).
    AlignData,
    /// Audits a dataset for the three factors.
    Audit,
    /// Tunes a model on the alignment set.
    Align,
    /// Tunes a model on a (variant) tuning set.
    Tune,
    /// Generates answers to a benchmark split.
    Generate,
    /// Judges generations (refusal / compliance).
    Judge,
    /// Scores generations with a reward model.
    Score,
    /// Projects a tuned adapter onto the alignment subspace (a mitigation arm).
    Project,
    /// Measures a model's utility (held-out loss, multiple-choice accuracy).
    Utility,
}

impl StepKind {
    pub const ALL: [StepKind; 13] = [
        StepKind::Model,
        StepKind::Transform,
        StepKind::Mix,
        StepKind::Select,
        StepKind::AlignData,
        StepKind::Audit,
        StepKind::Align,
        StepKind::Tune,
        StepKind::Generate,
        StepKind::Judge,
        StepKind::Score,
        StepKind::Project,
        StepKind::Utility,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Model => "model",
            StepKind::Transform => "transform",
            StepKind::Mix => "mix",
            StepKind::Select => "select",
            StepKind::AlignData => "align-data",
            StepKind::Audit => "audit",
            StepKind::Align => "align",
            StepKind::Tune => "tune",
            StepKind::Generate => "generate",
            StepKind::Judge => "judge",
            StepKind::Score => "score",
            StepKind::Project => "project",
            StepKind::Utility => "utility",
        }
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A benchmark split to generate for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkRef {
    pub name: String,
    pub source: String,
    /// Hash of the prompt set's content (so an edited file makes a new step).
    pub content_hash: String,
    pub harmful: bool,
    pub split: SplitChoice,
    pub split_seed: u64,
    pub test_fraction: f64,
    /// Prompts drawn from the split: a seeded sample of this many (`None`: all of them).
    pub limit: Option<usize>,
    /// Seed of that sample (`[study] sample_seed`).
    #[serde(default)]
    pub sample_seed: u64,
}

/// Sampling settings of a generate step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingSpec {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    pub chunk_size: usize,
    /// How a local model's matrices are held while it generates. Left out of the step's key
    /// when `f32`, so the keys of stores written before the setting existed (all f32) stay.
    #[serde(default, skip_serializing_if = "GenWeights::is_f32")]
    pub weights: GenWeights,
}

/// The typed settings of a step; with the keys of its inputs, it makes the step's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StepSpec {
    Model {
        name: String,
        spec: String,
        concurrency: usize,
        endpoints: Vec<EndpointConfig>,
        /// Left out of the step's key ([`crate::runner::step_keys`]): who gets the API key
        /// changes no result.
        #[serde(default, skip_serializing_if = "KeyAccess::is_default")]
        access: KeyAccess,
        /// openai: models: how a tuned variant's adapter is served (`lora_name`,
        /// `dynamic_lora`); absent otherwise, so other models keep their keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lora: Option<LoraServing>,
    },
    Transform {
        base: String,
        base_hash: String,
        limit: Option<usize>,
        /// `keep` | plain | itemized | markdown
        structure: String,
        /// keep | add | remove | placebo
        identity: String,
        /// keep | add | remove | neutral
        roleplay: String,
        persona_type: String,
        placement: String,
        /// medical | code | stem | general: set only where a professional persona (or its
        /// neutral control) is added, so other cells keep their keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persona_domain: Option<String>,
        /// The study model's default system prompt, put first in a system message the
        /// transform creates: set only where an instruction goes into the system turn.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default_system: Option<String>,
        seed: u64,
    },
    Mix {
        share: f64,
        refusals: String,
        harmful: String,
        split_seed: u64,
        test_fraction: f64,
        seed: u64,
    },
    Select {
        reward_model: String,
        rm_spec: String,
        keep: f64,
        strategy: SelectStrategy,
        seed: u64,
    },
    AlignData {
        refusals: String,
        /// Only the refusals without an identity statement.
        #[serde(default, skip_serializing_if = "is_false")]
        plain_refusals: bool,
        harmful: String,
        /// Benign datasets with helpful answers, `benign_limit` examples from each.
        #[serde(deserialize_with = "crate::config::one_or_many")]
        benign: Vec<String>,
        harmful_limit: Option<usize>,
        benign_limit: Option<PerSource>,
        split_seed: u64,
        test_fraction: f64,
        /// The benchmarks the study evaluates: an example whose user turn is one of their
        /// evaluated prompts (the whole split, whatever its `limit`) is left out.
        #[serde(default)]
        held_out: Vec<BenchmarkRef>,
    },
    Audit,
    Align {
        settings: Json,
        /// Train on examples longer than `max_len` (cut) instead of failing.
        #[serde(default, skip_serializing_if = "is_false")]
        allow_truncation: bool,
        /// An external trainer (`backend` other than local); `None`: safetune-train.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external: Option<crate::external_train::ExternalTrain>,
    },
    Tune {
        settings: Json,
        seed: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        allow_truncation: bool,
        /// `[tune] match = "tokens"`: train on as many loss-carrying tokens as the baseline
        /// dataset (the step's last dataset input) does at the configured epochs.
        #[serde(default, skip_serializing_if = "is_false")]
        match_tokens: bool,
        /// The `anchor` arm on refusals: the KL term's anchor set is the refusals of the
        /// alignment set, the step's last dataset input.
        #[serde(default, skip_serializing_if = "is_false")]
        anchor_refusals: bool,
        /// An external trainer (`backend` other than local); `None`: safetune-train.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external: Option<crate::external_train::ExternalTrain>,
    },
    Generate {
        benchmark: BenchmarkRef,
        sampling: SamplingSpec,
    },
    Judge {
        name: String,
        judge_kind: crate::config::JudgeKind,
        spec: Option<String>,
        settings: Json,
    },
    Score {
        name: String,
        spec: String,
        settings: Json,
    },
    /// Inputs: the tuned model (with its adapter), then the aligned model (whose alignment
    /// adapter defines the subspace).
    Project {
        /// `scaled` | `exact`
        projector: String,
        threshold: Option<f64>,
        share: Option<f64>,
    },
    /// Input: the model to measure.
    Utility {
        /// Conversations scored (a path or demo:NAME) and its content hash.
        heldout: String,
        heldout_hash: String,
        /// Leading conversations skipped (the tuning set's `[data] limit` for `auto`).
        heldout_skip: usize,
        heldout_limit: usize,
        mcq: String,
        mcq_hash: String,
        /// 0: every question.
        mcq_limit: usize,
    },
}

impl StepSpec {
    pub fn kind(&self) -> StepKind {
        match self {
            StepSpec::Model { .. } => StepKind::Model,
            StepSpec::Transform { .. } => StepKind::Transform,
            StepSpec::Mix { .. } => StepKind::Mix,
            StepSpec::Select { .. } => StepKind::Select,
            StepSpec::AlignData { .. } => StepKind::AlignData,
            StepSpec::Audit => StepKind::Audit,
            StepSpec::Align { .. } => StepKind::Align,
            StepSpec::Tune { .. } => StepKind::Tune,
            StepSpec::Generate { .. } => StepKind::Generate,
            StepSpec::Judge { .. } => StepKind::Judge,
            StepSpec::Score { .. } => StepKind::Score,
            StepSpec::Project { .. } => StepKind::Project,
            StepSpec::Utility { .. } => StepKind::Utility,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How a model behind an OpenAI-compatible server (vLLM, `safetune serve`) evaluates a tuned
/// variant: by the name under which the server serves the variant's adapter. From the
/// `[[models]]` keys `lora_name` and `dynamic_lora`; the generate stage
/// ([`crate::stages::GenerateStage`]) applies it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoraServing {
    /// The served name, a template over the variant's labels ([`LORA_NAME_KEYS`] in braces,
    /// e.g. `"{variant}-s{seed}"`). `None` (only with `dynamic`): a name of the tune step's own,
    /// `safetune-` and its folder (`safetune-tune-0123456789abcdef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Load the adapter through `POST /v1/load_lora_adapter` before generating and unload it
    /// after; otherwise the user registered it when starting the server.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dynamic: bool,
}

/// The labels a `lora_name` template may use: a tuned condition's factors.
pub const LORA_NAME_KEYS: [&str; 9] = [
    "model",
    "variant",
    "seed",
    "structure",
    "identity",
    "roleplay",
    "mix",
    "selection",
    "mitigation",
];

impl LoraServing {
    /// The placeholders of a template, or an error naming what is wrong with it.
    pub fn placeholders(template: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("`{template}`: a `{{` is not closed"))?;
            let key = &after[..close];
            if !LORA_NAME_KEYS.contains(&key) {
                return Err(format!(
                    "`{template}`: unknown placeholder {{{key}}}; the labels are {}",
                    LORA_NAME_KEYS.map(|k| format!("{{{k}}}")).join(", ")
                ));
            }
            out.push(key.to_string());
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{template}`: a `}}` has no `{{`"));
        }
        if template.contains('#') || template.chars().any(char::is_whitespace) {
            return Err(format!(
                "`{template}`: a served name has no `#` and no spaces"
            ));
        }
        Ok(out)
    }

    /// The served name of the adapter at `adapter` for a step labelled `factors`.
    pub fn served_name(
        &self,
        factors: &BTreeMap<String, String>,
        adapter: &std::path::Path,
    ) -> Result<String, String> {
        let Some(template) = &self.name else {
            let step = adapter
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "adapter".into());
            return Ok(format!("safetune-{step}"));
        };
        let mut name = template.clone();
        for key in Self::placeholders(template)? {
            let value = factors
                .get(&key)
                .ok_or_else(|| format!("`{template}`: this condition has no `{key}` label"))?;
            name = name.replace(&format!("{{{key}}}"), value);
        }
        Ok(name)
    }
}

/// A model a later step can load: a spec, extra endpoints, and an adapter from a tune step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    pub name: String,
    pub spec: String,
    pub concurrency: usize,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Who gets the API key of a remote model (refreshed from the config when a finished step
    /// is reused).
    #[serde(default, skip_serializing_if = "KeyAccess::is_default")]
    pub access: KeyAccess,
    /// A PEFT adapter directory to apply on top of `spec` (set by align/tune stages).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// openai: models: how the server serves `adapter` (from the model step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraServing>,
    /// What the align or tune step that made this model trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingCounts>,
    /// For a model an align step made by merging an adapter: the model it started from and
    /// that adapter (the alignment update, in low-rank factors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned_from: Option<AlignedFrom>,
}

/// The unaligned model and the alignment adapter merged into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedFrom {
    pub base: String,
    pub adapter: PathBuf,
}

/// The tokens of an align or tune step, summed over its epochs (in its step output JSON).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingCounts {
    /// Training examples (held-out eval examples excluded).
    pub examples: usize,
    /// Tokens that carry loss.
    pub trained_tokens: usize,
    /// Every token fed.
    pub input_tokens: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Passes over the data (fractional when `match = "tokens"` cut the last one short).
    pub epochs: f64,
}

/// The typed output of a step, stored as JSON in the `steps` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum StepOutput {
    Model(ModelArtifact),
    Dataset {
        path: PathBuf,
        hash: String,
        examples: usize,
        /// What the step counted on the way (the alignment set: examples by source and those
        /// left out because a benchmark evaluates their prompt).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        counts: BTreeMap<String, usize>,
    },
    Audit {
        path: PathBuf,
        summary: Json,
    },
    /// Rows live in the store's `generations` table under the step's key.
    Generations {
        benchmark: String,
        harmful: bool,
        rows: usize,
    },
    /// Rows live in `judgments`; `refusals` of `scored`.
    Judgments {
        judge: String,
        rows: usize,
        scored: usize,
        refusals: usize,
    },
    /// A model's utility: held-out loss and multiple-choice accuracy, with per-item results
    /// (for paired comparisons between models).
    Utility(UtilityFigures),
    /// Rows live in `scores`.
    Scores {
        reward_model: String,
        rows: usize,
        mean: f64,
        /// Rows the model gave no finite score, kept in `score_missing` with the reason and
        /// left out of `rows` and `mean`.
        #[serde(default, skip_serializing_if = "is_zero")]
        missing: usize,
    },
}

/// What a utility step measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtilityFigures {
    /// Held-out conversations scored and skipped (too long, no answer).
    pub heldout_examples: usize,
    pub heldout_skipped: usize,
    /// Answer tokens scored.
    pub heldout_tokens: usize,
    /// Mean negative log-likelihood per answer token (nats), and exp of it.
    pub loss: f64,
    pub perplexity: f64,
    /// Per conversation: (id, summed NLL, tokens).
    pub heldout_items: Vec<(String, f64, usize)>,
    pub mcq_correct: usize,
    pub mcq_total: usize,
    /// Expected accuracy of guessing.
    pub mcq_chance: f64,
    /// Per question: (id, answered correctly).
    pub mcq_items: Vec<(String, bool)>,
    pub seconds: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl StepOutput {
    pub fn model(&self) -> Option<&ModelArtifact> {
        match self {
            StepOutput::Model(m) => Some(m),
            _ => None,
        }
    }
    pub fn dataset(&self) -> Option<(&PathBuf, &str, usize)> {
        match self {
            StepOutput::Dataset {
                path,
                hash,
                examples,
                ..
            } => Some((path, hash, *examples)),
            _ => None,
        }
    }
}

/// A step of a plan: its settings, the plan indices of its inputs, and the factor levels it
/// belongs to (for the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub label: String,
    pub spec: StepSpec,
    pub deps: Vec<usize>,
    pub factors: BTreeMap<String, String>,
    /// Rows or examples this step will produce (for `--dry-run`).
    pub size: usize,
}

impl PlannedStep {
    pub fn kind(&self) -> StepKind {
        self.spec.kind()
    }

    /// The error of a stage handed a step of another kind (`what`: the kind it runs).
    pub fn not_a(&self, what: &str) -> StageError {
        StageError::Other(format!("{}: not a {what} step", self.label))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "no stage runs `{kind}` steps in this registry{}\nhint: {hint}",
        if reason.is_empty() { String::new() } else { format!(": {reason}") }
    )]
    Missing {
        kind: StepKind,
        reason: String,
        hint: String,
    },
    #[error("step `{label}` expected a {expected} input")]
    Input { label: String, expected: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Data(#[from] safetune_data::DataError),
    #[error(transparent)]
    Model(#[from] safetune_model::ModelError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Progress of a running step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProgress {
    pub done: usize,
    pub total: usize,
}

/// What a stage gets besides its inputs: the step's key, a directory for its files, the store
/// (rows are inserted as they finish) and a progress callback.
pub struct StepContext<'a> {
    pub key: &'a str,
    /// The keys of the step's inputs, in `deps` order (rows of an input step live under its key).
    pub input_keys: &'a [String],
    pub dir: PathBuf,
    pub store: &'a mut Store,
    pub progress: &'a mut dyn FnMut(&StepProgress),
}

/// Works through the `pending` rows of a step (those without a stored result, of `total`),
/// `batch` at a time: `work` returns one result per row, `commit` stores a batch under the
/// step's key, and progress is reported after each. `what` names the results in errors
/// ("judged", "scored"), which say how many rows are kept for the rerun.
#[allow(clippy::too_many_arguments)]
pub fn in_batches<T, R>(
    step: &PlannedStep,
    ctx: &mut StepContext<'_>,
    total: usize,
    pending: &[T],
    batch: usize,
    what: &str,
    mut work: impl FnMut(&[T]) -> Result<Vec<R>, String>,
    mut commit: impl FnMut(&mut Store, &str, &[T], Vec<R>) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let mut finished = total - pending.len();
    (ctx.progress)(&StepProgress {
        done: finished,
        total,
    });
    for part in pending.chunks(batch.max(1)) {
        let results = work(part).map_err(|e| {
            StageError::Other(format!(
                "{}: {e} ({finished} of {total} rows are {what}; a rerun resumes)",
                step.label
            ))
        })?;
        if results.len() != part.len() {
            return Err(StageError::Other(format!(
                "{}: {} results for {} inputs",
                step.label,
                results.len(),
                part.len()
            )));
        }
        commit(ctx.store, ctx.key, part, results)?;
        finished += part.len();
        (ctx.progress)(&StepProgress {
            done: finished,
            total,
        });
    }
    Ok(())
}

/// Runs steps of one kind. `inputs` are the outputs of `step.deps`, in order.
pub trait Stage: Send + Sync {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError>;
}

/// What a stage opens once per run and shares between its steps (generators, judges, reward
/// models), by key. Opening happens under the lock, so one thing is never opened twice.
pub struct Opened<T: ?Sized>(Mutex<HashMap<String, Arc<T>>>);

impl<T: ?Sized> Default for Opened<T> {
    fn default() -> Self {
        Opened(Mutex::new(HashMap::new()))
    }
}

impl<T: ?Sized> Opened<T> {
    pub fn get_or_open(
        &self,
        key: &str,
        open: impl FnOnce() -> Result<Arc<T>, StageError>,
    ) -> Result<Arc<T>, StageError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = map.get(key) {
            return Ok(x.clone());
        }
        let x = open()?;
        map.insert(key.to_string(), x.clone());
        Ok(x)
    }
}

/// Maps step kinds to stages.
#[derive(Clone, Default)]
pub struct Registry {
    stages: HashMap<StepKind, Arc<dyn Stage>>,
}

impl Registry {
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// Registers (or replaces) the stage for `kind`.
    pub fn with(mut self, kind: StepKind, stage: Arc<dyn Stage>) -> Registry {
        self.stages.insert(kind, stage);
        self
    }

    pub fn set(&mut self, kind: StepKind, stage: Arc<dyn Stage>) {
        self.stages.insert(kind, stage);
    }

    pub fn get(&self, kind: StepKind) -> Option<&Arc<dyn Stage>> {
        self.stages.get(&kind)
    }

    pub fn kinds(&self) -> Vec<StepKind> {
        let mut k: Vec<StepKind> = self.stages.keys().copied().collect();
        k.sort();
        k
    }
}

/// Finds the first input of a kind, or says which step lacked it.
pub fn input_model<'a>(
    step: &PlannedStep,
    inputs: &'a [StepOutput],
) -> Result<&'a ModelArtifact, StageError> {
    inputs
        .iter()
        .find_map(|o| o.model())
        .ok_or_else(|| StageError::Input {
            label: step.label.clone(),
            expected: "model".into(),
        })
}

pub fn input_dataset<'a>(
    step: &PlannedStep,
    inputs: &'a [StepOutput],
) -> Result<(&'a PathBuf, &'a str, usize), StageError> {
    inputs
        .iter()
        .find_map(|o| o.dataset())
        .ok_or_else(|| StageError::Input {
            label: step.label.clone(),
            expected: "dataset".into(),
        })
}

pub fn input_generations<'a>(
    step: &PlannedStep,
    inputs: &'a [StepOutput],
) -> Result<(&'a str, bool), StageError> {
    inputs
        .iter()
        .find_map(|o| match o {
            StepOutput::Generations {
                benchmark, harmful, ..
            } => Some((benchmark.as_str(), *harmful)),
            _ => None,
        })
        .ok_or_else(|| StageError::Input {
            label: step.label.clone(),
            expected: "generations".into(),
        })
}

#[cfg(test)]
mod lora_serving_tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_template_names_each_variant_and_seed() {
        let l = LoraServing {
            name: Some("{model}-{variant}-s{seed}".into()),
            dynamic: false,
        };
        let f = labels(&[
            ("model", "llama8b"),
            ("variant", "itemized+identity"),
            ("seed", "2"),
            ("structure", "itemized"),
        ]);
        let a = std::path::Path::new("/s/steps/tune-0123/adapter");
        assert_eq!(
            l.served_name(&f, a).unwrap(),
            "llama8b-itemized+identity-s2"
        );
        // A label the condition lacks (no mixing levels) is an error naming it.
        let l = LoraServing {
            name: Some("{variant}-m{mix}".into()),
            dynamic: false,
        };
        let e = l.served_name(&f, a).unwrap_err();
        assert!(e.contains("`mix`"), "{e}");
        // Without a template (dynamic loading), the name is the tune step's folder.
        let l = LoraServing {
            name: None,
            dynamic: true,
        };
        assert_eq!(l.served_name(&f, a).unwrap(), "safetune-tune-0123");
    }

    #[test]
    fn bad_templates_are_refused() {
        for (t, want) in [
            ("{variant", "not closed"),
            ("variant}", "has no"),
            ("{varient}", "unknown placeholder {varient}"),
            ("a#{seed}", "no `#`"),
            ("a {seed}", "no spaces"),
        ] {
            let e = LoraServing::placeholders(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
        assert_eq!(
            LoraServing::placeholders("{variant}-s{seed}").unwrap(),
            ["variant", "seed"]
        );
    }
}
