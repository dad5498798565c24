//! Reward-model backends behind one trait, and the spec strings that name them:
//!
//! | spec | backend |
//! |---|---|
//! | `DIR` (config.json names `*ForSequenceClassification`) | local sequence-classification RM |
//! | `pooling:URL#MODEL`, `score:URL#MODEL`, `classify:URL#MODEL` | vLLM-style HTTP endpoints ([`super::remote`]) |
//! | `bt:HEAD.json` | a Bradley-Terry head trained by `safetune rm train` ([`super::bt`]) |
//! | `implicit:POLICY,REFERENCE` | DPO implicit reward `beta * (log p_policy - log p_ref)` |

use std::path::Path;

use safetune_data::{Message, Role};
use safetune_model::reward::{response_logprob, SeqClsRewardModel};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

use super::error::{Result, RmError};

/// What a reward model scores: an answer after its context.
#[derive(Debug, Clone, PartialEq)]
pub struct RmInput {
    pub context: Vec<Message>,
    pub response: String,
}

impl RmInput {
    /// The whole conversation, answer last.
    pub fn conversation(&self) -> Vec<Message> {
        let mut m = self.context.clone();
        m.push(Message::assistant(self.response.clone()));
        m
    }

    /// Splits a conversation at its last assistant turn; `None` when it has none.
    pub fn from_conversation(messages: &[Message]) -> Option<RmInput> {
        let i = messages.iter().rposition(|m| m.role == Role::Assistant)?;
        Some(RmInput {
            context: messages[..i].to_vec(),
            response: messages[i].content.clone(),
        })
    }

    /// The last user turn of the context.
    pub fn prompt_text(&self) -> &str {
        self.context
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

/// A reward model: one number per (context, answer), higher is better.
pub trait RewardModel: Send + Sync {
    /// A short name recorded with every score.
    fn name(&self) -> &str;
    /// Inputs handed to `score` at once (the resumable runner's chunk size).
    fn max_batch(&self) -> usize {
        8
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>>;
}

/// Settings for opening a reward model from a spec.
#[derive(Debug, Clone)]
pub struct RmOptions {
    /// Which output of a multi-label head (or classify endpoint) is the score; `None` uses the
    /// only label, or the last one of several (the "positive" class of a two-way classifier).
    pub label: Option<usize>,
    /// Implicit rewards: the DPO temperature.
    pub beta: f64,
    pub batch_size: usize,
    /// HTTP backends.
    pub remote: super::remote::RemoteOptions,
    /// GGUF models: keep weights quantized.
    pub quantized: bool,
}

impl Default for RmOptions {
    fn default() -> Self {
        RmOptions {
            label: None,
            beta: 0.1,
            batch_size: 8,
            remote: Default::default(),
            quantized: false,
        }
    }
}

/// Opens the reward model a spec names (see the module table).
pub fn open_rm(spec: &str, opts: &RmOptions) -> Result<Box<dyn RewardModel>> {
    let bad = |message: String| RmError::Spec {
        spec: spec.to_string(),
        message,
    };
    if let Some(kind) = super::remote::EndpointKind::from_spec(spec) {
        let rest = &spec[kind.prefix().len()..];
        return Ok(Box::new(
            super::remote::RemoteRm::new(kind, rest, opts.label, opts.remote.clone())
                .map_err(bad)?,
        ));
    }
    // `bt:demo[:N]` names the built-in head (a head file called `demo` is `bt:./demo`).
    if spec == "bt:demo" || spec.starts_with("bt:demo:") {
        let path = super::bt::demo_head(spec, &mut |_, _| {})?;
        return Ok(Box::new(super::bt::BtRewardModel::open(&path)?));
    }
    if let Some(path) = spec.strip_prefix("bt:") {
        return Ok(Box::new(super::bt::BtRewardModel::open(Path::new(path))?));
    }
    if let Some(rest) = spec.strip_prefix("implicit:") {
        let (policy, reference) = rest.split_once(',').ok_or_else(|| {
            bad("write implicit:POLICY,REFERENCE (two model specs separated by a comma)".into())
        })?;
        return Ok(Box::new(ImplicitRm::load(policy, reference, opts)?));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        if safetune_model::reward::is_seq_cls_dir(path) {
            let mut m = SeqClsRewardModel::load(path)?;
            m.batch_size = opts.batch_size.max(1);
            let label = opts.label.unwrap_or(m.num_labels - 1);
            if label >= m.num_labels {
                return Err(bad(format!(
                    "--label {label} but the head has {} label(s)",
                    m.num_labels
                )));
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            return Ok(Box::new(SeqClsRm {
                model: m,
                label,
                name,
            }));
        }
        return Err(bad(
            "config.json names no *ForSequenceClassification architecture\nhint: a causal LM is not a reward model; use implicit:POLICY,REFERENCE to score with a tuned model and its base".into(),
        ));
    }
    Err(bad(format!(
        "not a directory and no known prefix\nhint: give a sequence-classification model directory, {}, bt:HEAD.json or implicit:POLICY,REFERENCE",
        super::remote::EndpointKind::ALL
            .iter()
            .map(|k| format!("{}URL#MODEL", k.prefix()))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A local sequence-classification RM.
pub struct SeqClsRm {
    pub model: SeqClsRewardModel,
    pub label: usize,
    pub name: String,
}

impl RewardModel for SeqClsRm {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        self.model.batch_size
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        let convos: Vec<Vec<Message>> = inputs.iter().map(RmInput::conversation).collect();
        let out = self.model.score_all(&convos)?;
        Ok(out.iter().map(|row| row[self.label] as f64).collect())
    }
}

/// The implicit reward of a policy against a reference model (DPO):
/// `beta * (log p_policy(y | x) - log p_ref(y | x))`, summed over the answer's tokens.
pub struct ImplicitRm {
    pub policy: LocalEngine,
    pub reference: LocalEngine,
    pub beta: f64,
    name: String,
}

impl ImplicitRm {
    pub fn load(policy: &str, reference: &str, opts: &RmOptions) -> Result<ImplicitRm> {
        let load = |s: &str| -> Result<LocalEngine> {
            let spec = ModelSpec::parse(s.trim())?;
            Ok(LocalEngine::load(
                &spec,
                &LoadOptions {
                    quantized: opts.quantized,
                    ..LoadOptions::default()
                },
            )?)
        };
        Ok(ImplicitRm::new(load(policy)?, load(reference)?, opts.beta))
    }

    pub fn new(policy: LocalEngine, reference: LocalEngine, beta: f64) -> ImplicitRm {
        let name = format!("implicit:{}|{}", policy.model_id, reference.model_id);
        ImplicitRm {
            policy,
            reference,
            beta,
            name,
        }
    }
}

impl RewardModel for ImplicitRm {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        inputs
            .iter()
            .map(|i| {
                let (lp, _) = response_logprob(&self.policy, &i.context, &i.response)?;
                let (lr, _) = response_logprob(&self.reference, &i.context, &i.response)?;
                Ok(self.beta * (lp - lr))
            })
            .collect()
    }
}
