//! The stages this crate runs itself: model handles, transforms, refusal mixing, the alignment
//! set, audits and generation (local engine, one OpenAI-compatible server, or a pool of them).
//! Training, judging, and reward-model scoring and selection are stages of this crate too
//! ([`crate::train_stage`], [`crate::judge_stage`], [`crate::rm_stage`]) over safetune-train and
//! safetune-eval; [`builtin_registry`] registers a stage for every kind.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use safetune_data::audit::Auditor;
use safetune_data::demo::resolve_dataset;
use safetune_data::prompts::{PromptItem, PromptSet, Split};
use safetune_data::read::{read_all, read_json_lines, write_messages_jsonl, ReadOptions};
use safetune_data::transform::{apply, Recipe, Rng};
use safetune_data::{Conversation, Message, Role, Structure};
use safetune_model::backend::{GenOutput, GenRequest, Generator, Prompt, Sampling};
use safetune_model::job::{run_fed, FedError};
use safetune_model::{LoadOptions, ModelSpec};
use safetune_openai::{
    load_generator, ClientConfig, EndpointPool, LoraLoad, OpenAiClient, OpenAiSpec,
};

use crate::config::GenWeights;
use crate::hash::hash_file;
use crate::plan::select_prompts;
use crate::step::*;
use crate::store::GenerationRow;

/// Every stage this crate implements, ready for [`crate::runner::run_plan`].
pub fn builtin_registry() -> Registry {
    Registry::empty()
        .with(StepKind::Model, Arc::new(ModelStage))
        .with(StepKind::Transform, Arc::new(TransformStage))
        .with(StepKind::Mix, Arc::new(MixStage))
        .with(StepKind::AlignData, Arc::new(AlignDataStage))
        .with(StepKind::Audit, Arc::new(AuditStage))
        .with(StepKind::Generate, Arc::new(GenerateStage::new()))
        .with(
            StepKind::Judge,
            Arc::new(crate::judge_stage::JudgeStage::new()),
        )
        .with(StepKind::Align, Arc::new(crate::train_stage::TrainStage))
        .with(StepKind::Tune, Arc::new(crate::train_stage::TrainStage))
        .with(
            StepKind::Score,
            Arc::new(crate::rm_stage::ScoreStage::new()),
        )
        .with(
            StepKind::Select,
            Arc::new(crate::rm_stage::SelectStage::new()),
        )
        .with(
            StepKind::Project,
            Arc::new(crate::mitigate_stage::ProjectStage),
        )
        .with(
            StepKind::Utility,
            Arc::new(crate::mitigate_stage::UtilityStage),
        )
}

/// `meta.source` of the alignment set's refusal examples (harmful train-split prompts with a
/// refusal), which the `anchor` arm's anchor set is made of.
pub const ALIGN_REFUSAL_SOURCE: &str = "align";

fn io(path: &Path) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes a dataset artifact into the step's directory and records it by content hash.
pub(crate) fn write_dataset(
    ctx: &mut StepContext<'_>,
    convs: &[Conversation],
) -> Result<StepOutput, StageError> {
    write_dataset_counted(ctx, convs, BTreeMap::new())
}

/// [`write_dataset`] with the counts the step made on the way, kept in its output.
pub(crate) fn write_dataset_counted(
    ctx: &mut StepContext<'_>,
    convs: &[Conversation],
    counts: BTreeMap<String, usize>,
) -> Result<StepOutput, StageError> {
    std::fs::create_dir_all(&ctx.dir).map_err(io(&ctx.dir))?;
    let path = ctx.dir.join("data.jsonl");
    write_messages_jsonl(&path, convs)?;
    let hash = hash_file(&path).map_err(io(&path))?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    ctx.store
        .put_artifact(&hash, &path, "dataset", bytes, ctx.key)?;
    Ok(StepOutput::Dataset {
        path,
        hash,
        examples: convs.len(),
        counts,
    })
}

pub(crate) fn read_dataset(path: &Path) -> Result<Vec<Conversation>, StageError> {
    Ok(read_all(path, &ReadOptions::default())?.0)
}

pub struct ModelStage;

impl Stage for ModelStage {
    fn run(
        &self,
        step: &PlannedStep,
        _inputs: &[StepOutput],
        _ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Model {
            name,
            spec,
            concurrency,
            endpoints,
            access,
            lora,
        } = &step.spec
        else {
            return Err(step.not_a("model"));
        };
        // Checks the spec now (a missing file fails here, not at generation).
        ModelSpec::parse(spec)?;
        Ok(StepOutput::Model(ModelArtifact {
            name: name.clone(),
            spec: spec.clone(),
            concurrency: *concurrency,
            endpoints: endpoints.clone(),
            access: access.clone(),
            adapter: None,
            lora: lora.clone(),
            training: None,
            aligned_from: None,
        }))
    }
}

pub struct TransformStage;

impl Stage for TransformStage {
    fn run(
        &self,
        step: &PlannedStep,
        _inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Transform {
            base,
            base_hash,
            limit,
            structure,
            identity,
            roleplay,
            persona_type,
            placement,
            persona_domain,
            default_system,
            seed,
        } = &step.spec
        else {
            return Err(step.not_a("transform"));
        };
        let path = resolve_dataset(base)?;
        let now = hash_file(&path).map_err(io(&path))?;
        if &now != base_hash {
            return Err(StageError::Other(format!(
                "{}: the file changed since the study was planned\nhint: rerun the study to plan it again",
                path.display()
            )));
        }
        let mut convs = read_dataset(&path)?;
        if let Some(l) = limit {
            convs.truncate(*l);
        }
        let recipe = Recipe {
            structure: match structure.as_str() {
                "keep" => None,
                s => Some(s.parse::<Structure>().map_err(StageError::Other)?),
            },
            identity: identity.parse().map_err(StageError::Other)?,
            roleplay: roleplay.parse().map_err(StageError::Other)?,
            persona_type: persona_type.parse().map_err(StageError::Other)?,
            persona_domain: match persona_domain {
                Some(d) => d.parse().map_err(StageError::Other)?,
                None => Default::default(),
            },
            placement: placement.parse().map_err(StageError::Other)?,
            default_system: default_system.clone(),
            seed: *seed,
        };
        let total = convs.len();
        let out: Vec<Conversation> = convs.iter().map(|c| apply(c, &recipe).0).collect();
        (ctx.progress)(&StepProgress { done: total, total });
        write_dataset(ctx, &out)
    }
}

/// Refusal answers from a JSONL file with a `response` field.
/// The refusal answers of `spec` (its rows' `response`); with `plain`, only those without an
/// identity statement (`safetune_data::factors::find_identity`).
fn load_refusals(spec: &str, plain: bool) -> Result<Vec<String>, StageError> {
    let path = resolve_dataset(spec)?;
    let rows = read_json_lines(&path)?;
    let out: Vec<String> = rows
        .iter()
        .filter_map(|(_, r)| r.get("response").and_then(|v| v.as_str()).map(String::from))
        .filter(|r| !plain || safetune_data::factors::find_identity(r).is_none())
        .collect();
    if out.is_empty() {
        return Err(StageError::Other(format!(
            "{}: no rows with a string `response`{}",
            path.display(),
            if plain {
                " and no identity statement (plain_refusals = true)"
            } else {
                ""
            }
        )));
    }
    Ok(out)
}

/// `n` harmful train-split prompts, each paired with a refusal, in a seeded order. Only the
/// train split is used, so the test split stays unseen.
fn refusal_examples(
    harmful: &str,
    refusals: &[String],
    n: usize,
    split_seed: u64,
    test_fraction: f64,
    seed: u64,
    tag: &str,
) -> Result<Vec<Conversation>, StageError> {
    let set = PromptSet::load(harmful, None)?;
    let mut train = set.split(Split::Train, split_seed, test_fraction).items;
    train.sort_by_key(|i| Rng::for_example(seed, &i.id, tag).next_u64());
    Ok(train
        .iter()
        .take(n)
        .map(|item| {
            let mut rng = Rng::for_example(seed, &item.id, "refusal");
            let answer = rng.pick(refusals).clone();
            let mut c = Conversation::new(
                format!("{tag}-{}", item.id),
                vec![
                    Message::user(item.prompt.clone()),
                    Message::assistant(answer),
                ],
            );
            c.meta.insert("source".into(), json!(tag));
            c
        })
        .collect())
}

pub struct MixStage;

impl Stage for MixStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Mix {
            share,
            refusals,
            harmful,
            split_seed,
            test_fraction,
            seed,
        } = &step.spec
        else {
            return Err(step.not_a("mix"));
        };
        let (path, _, _) = input_dataset(step, inputs)?;
        let mut convs = read_dataset(path)?;
        let n = convs.len();
        let k = ((share * n as f64) / (1.0 - share)).round() as usize;
        let answers = load_refusals(refusals, false)?;
        let extra = refusal_examples(
            harmful,
            &answers,
            k,
            *split_seed,
            *test_fraction,
            *seed,
            "mix",
        )?;
        if extra.len() < k {
            return Err(StageError::Other(format!(
                "{harmful}: the train split has {} prompts, {k} needed for share {share}",
                extra.len()
            )));
        }
        convs.extend(extra);
        write_dataset(ctx, &convs)
    }
}

pub struct AlignDataStage;

/// The trimmed prompts a benchmark's generate steps evaluate: its split (test, train or all),
/// whatever its `limit` and `sample_seed` (every prompt a sample can draw).
pub fn evaluated_prompts(b: &BenchmarkRef) -> Result<HashSet<String>, StageError> {
    let set = PromptSet::load(&b.source, None)?;
    let whole = BenchmarkRef {
        limit: None,
        sample_seed: 0,
        ..b.clone()
    };
    Ok(select_prompts(&set, &whole)
        .items
        .iter()
        .map(|i| i.prompt.trim().to_string())
        .collect())
}

/// Leaves out every example with a user turn equal (after trimming) to one of `prompts`;
/// returns how many were left out.
pub fn drop_evaluated(convs: &mut Vec<Conversation>, prompts: &HashSet<String>) -> usize {
    let before = convs.len();
    convs.retain(|c| {
        !c.messages
            .iter()
            .any(|m| m.role == Role::User && prompts.contains(m.content.trim()))
    });
    before - convs.len()
}

impl Stage for AlignDataStage {
    fn run(
        &self,
        step: &PlannedStep,
        _inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::AlignData {
            refusals,
            plain_refusals,
            harmful,
            benign,
            harmful_limit,
            benign_limit,
            split_seed,
            test_fraction,
            held_out,
        } = &step.spec
        else {
            return Err(StageError::Other(format!(
                "{}: not an align-data step",
                step.label
            )));
        };
        let answers = load_refusals(refusals, *plain_refusals)?;
        let mut out = refusal_examples(
            harmful,
            &answers,
            harmful_limit.unwrap_or(usize::MAX),
            *split_seed,
            *test_fraction,
            0,
            ALIGN_REFUSAL_SOURCE,
        )?;
        let mut counts = BTreeMap::new();
        counts.insert("refusals".to_string(), out.len());
        for (i, spec) in benign.iter().enumerate() {
            let mut helpful = read_dataset(&resolve_dataset(spec)?)?;
            if let Some(l) = benign_limit.as_ref().and_then(|l| l.for_source(i)) {
                helpful.truncate(l);
            }
            *counts.entry(format!("benign:{spec}")).or_insert(0) += helpful.len();
            out.extend(helpful);
        }
        let mut evaluated = HashSet::new();
        for b in held_out {
            evaluated.extend(evaluated_prompts(b)?);
        }
        let dropped = drop_evaluated(&mut out, &evaluated);
        counts.insert("dropped_evaluated".into(), dropped);
        if out.is_empty() {
            return Err(StageError::Other(format!(
                "{}: no example left ({dropped} left out because a benchmark evaluates their prompt)",
                step.label
            )));
        }
        // The trainer draws a seeded order every epoch (safetune_train::sft::plan_epoch), so
        // refusals and helpful answers are interleaved there; the file keeps source order.
        (ctx.progress)(&StepProgress {
            done: out.len(),
            total: out.len() + dropped,
        });
        write_dataset_counted(ctx, &out, counts)
    }
}

pub struct AuditStage;

impl Stage for AuditStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let (path, _, _) = input_dataset(step, inputs)?;
        let convs = read_dataset(path)?;
        let mut a = Auditor::new();
        for c in &convs {
            a.add(c);
        }
        let summary = serde_json::to_value(a.summary()).unwrap_or_default();
        std::fs::create_dir_all(&ctx.dir).map_err(io(&ctx.dir))?;
        let out = ctx.dir.join("audit.json");
        std::fs::write(&out, format!("{summary:#}\n")).map_err(io(&out))?;
        Ok(StepOutput::Audit { path: out, summary })
    }
}

/// Makes a generator for a model artifact, holding a local model's weights as asked.
pub type GeneratorFactory =
    dyn Fn(&ModelArtifact, GenWeights) -> Result<Arc<dyn Generator>, StageError> + Send + Sync;

/// The load options of a local model in a study: prompts go [`LOCAL_BATCH`] at a time, an
/// adapter is merged into the weights (identical greedy answers to the unmerged path, about
/// 20% faster decoding), and with [`GenWeights::Quantized`] a GGUF model without an adapter
/// keeps its blocks while every other model is quantized to Q8_0 after the merge; with
/// [`GenWeights::Bf16`] every model is held in bf16 after the merge (a GGUF dequantized first).
pub fn study_load_options(adapter: Option<&PathBuf>, weights: GenWeights) -> LoadOptions {
    let quantized = weights == GenWeights::Quantized;
    LoadOptions {
        quantized: quantized && adapter.is_none(),
        batch_size: LOCAL_BATCH,
        adapter: adapter.cloned(),
        merge_adapter: adapter.is_some(),
        quantize_dense: quantized,
        bf16: weights == GenWeights::Bf16,
    }
}

/// `[generation] weights = "bf16"` for a local model where this process cannot run the bf16
/// kernel (no AMX-BF16, or `SAFETUNE_ISA` below AVX-512): an error naming the key, before the
/// model loads. `openai:` models ignore the key.
pub fn check_bf16_weights(spec: &ModelSpec, weights: GenWeights) -> Result<(), StageError> {
    if weights != GenWeights::Bf16 || matches!(spec, ModelSpec::OpenAi { .. }) {
        return Ok(());
    }
    match safetune_model::bf16::bf16_unavailable() {
        Some(e) => Err(StageError::Other(format!(
            "[generation] weights = \"bf16\" cannot run here: {e}\nhint: set `weights = \"quantized\"` (Q8_0, the default) or `weights = \"f32\"` in the study's [generation] table"
        ))),
        None => Ok(()),
    }
}

/// The default factory: a pool when extra endpoints are listed, else [`load_generator`].
pub fn default_generator(
    m: &ModelArtifact,
    weights: GenWeights,
) -> Result<Arc<dyn Generator>, StageError> {
    let spec = ModelSpec::parse(&m.spec)?;
    check_bf16_weights(&spec, weights)?;
    if let Some(adapter) = &m.adapter {
        if OpenAiSpec::from_model_spec(&spec).is_some() {
            return Err(StageError::Other(format!(
                "model `{}`: an adapter cannot be applied to an openai: model; the server applies it when it serves it by name\nhint: set `lora_name = \"{{variant}}-s{{seed}}\"` on the [[models]] entry and register the adapters with the server (vLLM --lora-modules NAME=DIR, safetune serve --lora NAME=DIR), or set `dynamic_lora = true`",
                m.name
            )));
        }
        let load = study_load_options(Some(adapter), weights);
        return Ok(load_generator(&spec, &load, &ClientConfig::default())?);
    }
    let client = m.access.apply(ClientConfig {
        concurrency: m.concurrency.max(1),
        ..Default::default()
    });
    if !m.endpoints.is_empty() {
        let remote = OpenAiSpec::from_model_spec(&spec).ok_or_else(|| {
            StageError::Other(format!(
                "model `{}`: endpoints need an openai: spec",
                m.name
            ))
        })?;
        let mut eps = vec![(remote.base_url.clone(), m.concurrency.max(1))];
        for e in &m.endpoints {
            eps.push((e.url.clone(), e.concurrency));
        }
        return Ok(Arc::new(EndpointPool::new(&remote.model, &eps, &client)?));
    }
    let load = study_load_options(None, weights);
    Ok(load_generator(&spec, &load, &client)?)
}

/// Prompts a local model answers together in a study. Measured on the f32 path on 2 shared cores
/// (AMD EPYC with AVX-512), 64 AdvBench prompts x 48 new tokens with SmolLM2-135M: 66 s at batch
/// 8, 38 s at 32, 32 s at 64; answers are the same at every batch size (greedy).
pub const LOCAL_BATCH: usize = 32;

/// Generates answers to a benchmark split: every pending prompt is fed to the generator in one
/// call ([`run_fed`], so a local engine refills a finished row's slot at once), rows are
/// committed to the store as they finish, and rows already there are skipped (a killed step
/// resumes).
pub struct GenerateStage {
    factory: Arc<GeneratorFactory>,
    opened: Opened<dyn Generator>,
}

impl GenerateStage {
    pub fn new() -> GenerateStage {
        GenerateStage::with_factory(Arc::new(default_generator))
    }

    pub fn with_factory(factory: Arc<GeneratorFactory>) -> GenerateStage {
        GenerateStage {
            factory,
            opened: Opened::default(),
        }
    }

    fn generator(
        &self,
        m: &ModelArtifact,
        weights: GenWeights,
    ) -> Result<Arc<dyn Generator>, StageError> {
        let key = format!(
            "{}|{weights:?}",
            serde_json::to_string(m).unwrap_or_default()
        );
        self.opened.get_or_open(&key, || (self.factory)(m, weights))
    }
}

impl Default for GenerateStage {
    fn default() -> Self {
        Self::new()
    }
}

impl Stage for GenerateStage {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Generate {
            benchmark,
            sampling,
        } = &step.spec
        else {
            return Err(step.not_a("generate"));
        };
        let input = input_model(step, inputs)?;
        let served = served_adapter(step, input)?;
        let model = served.as_ref().map(|s| &s.model).unwrap_or(input);
        let set = PromptSet::load(&benchmark.source, None)?;
        let prompts = select_prompts(&set, benchmark);
        let done = ctx.store.generation_ids(ctx.key)?;
        let pending: Vec<_> = prompts
            .items
            .iter()
            .filter(|i| !done.contains(&i.id))
            .collect();
        let total = prompts.len();
        let mut finished = total - pending.len();
        (ctx.progress)(&StepProgress {
            done: finished,
            total,
        });
        if !pending.is_empty() {
            // A dynamically served adapter is loaded for this step and unloaded after it,
            // whether the step finishes or fails.
            let _loaded = match &served {
                Some(s) if s.dynamic => Some(s.load(&step.label)?),
                _ => None,
            };
            let generator = self.generator(model, sampling.weights)?;
            let s = Sampling {
                max_new_tokens: sampling.max_new_tokens,
                temperature: sampling.temperature,
                seed: sampling.seed,
                ..Default::default()
            };
            let request = |i: usize| GenRequest {
                prompt: Prompt::Chat(vec![Message::user(pending[i].prompt.clone())]),
                sampling: s.clone(),
            };
            let fed = run_fed(
                generator.as_ref(),
                pending.len(),
                &request,
                sampling.chunk_size,
                &mut |done: Vec<(usize, GenOutput)>| {
                    let rows: Vec<GenerationRow> = done
                        .into_iter()
                        .map(|(i, o)| generation_row(pending[i], o))
                        .collect();
                    ctx.store.insert_generations(ctx.key, &rows)?;
                    finished += rows.len();
                    (ctx.progress)(&StepProgress {
                        done: finished,
                        total,
                    });
                    Ok(())
                },
            );
            fed.map_err(|e| match e {
                FedError::Generator(e) => StageError::Other(format!(
                    "{}: {e} ({finished} of {total} rows are stored; a rerun resumes)",
                    step.label
                )),
                FedError::Commit(e) => e,
            })?;
        }
        Ok(StepOutput::Generations {
            benchmark: benchmark.name.clone(),
            harmful: benchmark.harmful,
            rows: total,
        })
    }
}

fn generation_row(item: &PromptItem, o: GenOutput) -> GenerationRow {
    GenerationRow {
        row_id: item.id.clone(),
        prompt: item.prompt.clone(),
        response: o.text,
        completion_tokens: o.completion_tokens as i64,
        finish_reason: o.finish_reason.as_str().to_string(),
        meta: json!({"category": item.category, "source": item.source}),
    }
}

/// A tuned variant of a model behind an OpenAI-compatible server: the model as the server
/// serves the variant (`openai:URL#NAME`, no adapter of its own) and how its adapter gets there.
struct ServedAdapter {
    model: ModelArtifact,
    /// Loaded through `/v1/load_lora_adapter` for the step (`dynamic_lora`).
    dynamic: bool,
    /// The adapter directory as the server reads it.
    path: String,
    /// Every server of the model (the spec's and its extra endpoints), by base URL.
    clients: Vec<OpenAiClient>,
}

/// `Some` for an `openai:` model that carries a tuned adapter and says how it is served: the
/// adapter is evaluated by its served name (`lora_name`, rendered with the step's labels, or
/// with `dynamic_lora` a name of the tune step's own). An error when the "adapter" is a full
/// checkpoint (a model of its own, served and listed as one).
fn served_adapter(
    step: &PlannedStep,
    m: &ModelArtifact,
) -> Result<Option<ServedAdapter>, StageError> {
    let Some(adapter) = &m.adapter else {
        return Ok(None);
    };
    let Some(remote) = OpenAiSpec::matches(&m.spec)
        .then(|| OpenAiSpec::parse(&m.spec).ok())
        .flatten()
    else {
        return Ok(None);
    };
    // Without `lora_name` or `dynamic_lora` the generator factory decides (the default one
    // refuses an adapter on an openai: model, naming the two keys).
    let Some(lora) = &m.lora else {
        return Ok(None);
    };
    if !adapter.join(safetune_model::adapter::CONFIG_FILE).is_file()
        && adapter.join("config.json").is_file()
    {
        return Err(StageError::Other(format!(
            "{}: {} is a full checkpoint (config.json, no adapter_config.json), not a LoRA adapter\nhint: serve it as a model of its own and list it as a [[models]] entry",
            step.label,
            adapter.display()
        )));
    }
    let name = lora.served_name(&step.factors, adapter).map_err(|e| {
        StageError::Other(format!("{}: model `{}`: lora_name {e}", step.label, m.name))
    })?;
    let client_cfg = m.access.apply(ClientConfig {
        concurrency: 1,
        ..Default::default()
    });
    let mut clients = Vec::new();
    if lora.dynamic {
        for base_url in std::iter::once(remote.base_url.clone())
            .chain(m.endpoints.iter().map(|e| e.url.clone()))
        {
            let spec = OpenAiSpec::parse(&format!("openai:{base_url}#{name}"))?;
            clients.push(OpenAiClient::try_new(spec, client_cfg.clone())?);
        }
    }
    // The server reads the adapter from this path: with `[study] shared_dir` the step folders
    // live there, and the server must mount that directory at the same path (README, Running
    // at scale).
    let path = std::fs::canonicalize(adapter)
        .unwrap_or_else(|_| adapter.clone())
        .display()
        .to_string();
    Ok(Some(ServedAdapter {
        model: ModelArtifact {
            spec: format!("openai:{}#{name}", remote.base_url),
            adapter: None,
            ..m.clone()
        },
        dynamic: lora.dynamic,
        path,
        clients,
    }))
}

impl ServedAdapter {
    /// Loads the adapter on every server of the model; the guard unloads it when dropped. A
    /// name loaded already (e.g. by a killed run) is kept when the server lists it with this
    /// path (or no path); one the server lists with another directory is unloaded and loaded
    /// again from this one.
    fn load(&self, label: &str) -> Result<LoadedAdapter<'_>, StageError> {
        let guard = LoadedAdapter(self);
        for c in &self.clients {
            let name = &c.spec().model;
            let fail = |e: safetune_model::backend::BackendError| {
                StageError::Other(format!(
                    "{label}: cannot load adapter {} as `{name}`: {e}",
                    self.path
                ))
            };
            if c.load_lora_adapter(name, &self.path).map_err(fail)? == LoraLoad::AlreadyLoaded {
                let listed = c.list_models().map_err(fail)?;
                let other = listed
                    .data
                    .iter()
                    .find(|m| &m.id == name)
                    .and_then(|m| m.root.as_deref())
                    .is_some_and(|root| root != self.path);
                if other {
                    c.unload_lora_adapter(name).map_err(fail)?;
                    c.load_lora_adapter(name, &self.path).map_err(fail)?;
                }
            }
        }
        Ok(guard)
    }
}

/// Unloads a dynamically loaded adapter when dropped (a name already gone is fine; a failure
/// to unload is only printed, since the answers are stored already).
struct LoadedAdapter<'a>(&'a ServedAdapter);

impl Drop for LoadedAdapter<'_> {
    fn drop(&mut self) {
        for c in &self.0.clients {
            if let Err(e) = c.unload_lora_adapter(&c.spec().model) {
                eprintln!("warning: cannot unload adapter `{}`: {e}", c.spec().model);
            }
        }
    }
}

/// A path inside a step's own directory (`StepContext::dir`).
pub fn step_file(ctx: &StepContext<'_>, name: &str) -> PathBuf {
    ctx.dir.join(name)
}
