//! The study config (`safetune study CONFIG.toml`): a TOML file, every key documented in
//! `examples/quickstart.toml` and `examples/paper-factors.toml`. Unknown keys are rejected with
//! their name and line, and so are trainer settings (`[align]`/`[tune]` `settings`) the trainer
//! does not accept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use safetune_train::{SettingsError, TuneConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}", path = path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{field}`: {message}", path = path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// An invalid value at a known line of the file.
    #[error("{path}:{line}: `{field}`: {message}", path = path.display())]
    At {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    pub study: StudySection,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    pub data: DataSection,
    #[serde(default)]
    pub factors: FactorsSection,
    #[serde(default)]
    pub benchmarks: Vec<BenchmarkConfig>,
    #[serde(default)]
    pub judges: Vec<JudgeConfig>,
    #[serde(default)]
    pub reward_models: Vec<RewardModelConfig>,
    #[serde(default)]
    pub generation: GenerationSection,
    pub align: Option<AlignSection>,
    pub tune: Option<TuneSection>,
    pub mixing: Option<MixingSection>,
    pub selection: Option<SelectionSection>,
    pub export: Option<ExportSection>,
    /// Mitigation arms tuned beside each variant (see [`MitigationsSection`]).
    pub mitigations: Option<MitigationsSection>,
    /// Utility of every model condition (held-out loss, multiple-choice accuracy).
    pub utility: Option<UtilitySection>,
    /// What `--dry-run` assumes for its power and compute estimates.
    #[serde(default)]
    pub analysis: AnalysisSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySection {
    pub name: String,
    /// Training / transform seeds: replicates of every cell (the effects analysis pools them as
    /// runs, never as a factor).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Seed of the train/test split of every benchmark.
    #[serde(default)]
    pub split_seed: u64,
    /// Share of each benchmark in the test split.
    #[serde(default = "half")]
    pub test_fraction: f64,
    /// Seed of the prompt sample a benchmark's `limit` draws from its split (every model of
    /// the study gets the same sample; a larger `limit` draws a superset).
    #[serde(default)]
    pub sample_seed: u64,
    /// A directory the external trainers and the model servers both see (a shared
    /// filesystem): external align/tune steps write their data, config and output under it.
    /// Checked when a study starts: it must exist and be writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_dir: Option<PathBuf>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// A model spec: a .gguf file, a Hugging Face directory, hf:ORG/NAME, or openai:URL#MODEL.
    /// `asset:REL` names a file in the asset cache.
    pub spec: String,
    /// Extra OpenAI-compatible servers of the same model; requests are balanced over the spec's
    /// server and these.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Requests in flight at the spec's own server (openai: specs).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// openai: specs: the environment variable holding this model's API key. Without it,
    /// `OPENAI_API_KEY` is sent to https and loopback servers only.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// openai: specs: send the key over plain http to a server that is not loopback.
    #[serde(default)]
    pub allow_insecure: bool,
    /// The trainer's view of this model for external backends (`{base_model}`): a Hugging
    /// Face id or a directory. Required for an `openai:` model tuned by an external backend;
    /// default: the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_model: Option<String>,
    /// openai: specs: the name under which the server serves a tuned variant's adapter, a
    /// template over the variant's labels, e.g. `"{variant}-s{seed}"` (see
    /// [`crate::step::LORA_NAME_KEYS`]). Without `dynamic_lora` the user registers every name
    /// when starting the server (vLLM `--lora-modules NAME=DIR`, `safetune serve --lora`).
    #[serde(default)]
    pub lora_name: Option<String>,
    /// openai: specs: load each tuned variant's adapter through the server's
    /// `/v1/load_lora_adapter` before generating, and unload it after.
    #[serde(default)]
    pub dynamic_lora: bool,
}

impl ModelConfig {
    /// How a tuned variant's adapter is served, when `lora_name` or `dynamic_lora` is set.
    pub fn lora_serving(&self) -> Option<crate::step::LoraServing> {
        (self.lora_name.is_some() || self.dynamic_lora).then(|| crate::step::LoraServing {
            name: self.lora_name.clone(),
            dynamic: self.dynamic_lora,
        })
    }

    /// Who gets this model's API key.
    pub fn access(&self) -> KeyAccess {
        KeyAccess {
            api_key_env: self.api_key_env.clone(),
            allow_insecure: self.allow_insecure,
        }
    }
}

/// Who gets a remote model's API key (`safetune_openai::access`): the variable named for it,
/// and whether plain http to a host that is not loopback may carry it. Not part of any step's
/// key: changing it re-runs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyAccess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,
}

impl KeyAccess {
    pub fn is_default(&self) -> bool {
        *self == KeyAccess::default()
    }

    /// Client settings with this access applied.
    pub fn apply(
        &self,
        mut client: safetune_openai::ClientConfig,
    ) -> safetune_openai::ClientConfig {
        if let Some(env) = &self.api_key_env {
            client.api_key_env = env.clone();
        }
        client.allow_insecure = self.allow_insecure;
        client
    }
}

fn default_concurrency() -> usize {
    8
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Base URL, e.g. http://gpu2:8000/v1
    pub url: String,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The benign tuning set the variants are made of (a path or demo:NAME).
    pub base: String,
    /// Use only the first N examples.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StructureLevel {
    Keep,
    Plain,
    Itemized,
    Markdown,
}

/// A level of the identity or role-play factor. `placebo` (identity only) and `neutral`
/// (role-play only) are the matched controls for `add`: a length-matched neutral sentence or
/// instruction in the same place, on the same examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    Keep,
    Add,
    Remove,
    Placebo,
    Neutral,
}

impl Toggle {
    pub fn as_str(self) -> &'static str {
        match self {
            Toggle::Keep => "keep",
            Toggle::Add => "add",
            Toggle::Remove => "remove",
            Toggle::Placebo => "placebo",
            Toggle::Neutral => "neutral",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Design {
    /// Every combination of the levels.
    #[default]
    Full,
    /// The all-`keep`/first-level baseline plus one factor changed at a time.
    OneAtATime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactorsSection {
    #[serde(default = "keep_structure")]
    pub structure: Vec<StructureLevel>,
    #[serde(default = "keep_toggle")]
    pub identity: Vec<Toggle>,
    #[serde(default = "keep_toggle")]
    pub roleplay: Vec<Toggle>,
    /// professional | fictional | unrestricted
    #[serde(default = "professional")]
    pub persona_type: String,
    /// system | user
    #[serde(default = "system")]
    pub placement: String,
    /// Where professional personas come from: medical | code | stem | general | auto (from
    /// `data.base`: `demo:medical`, `demo:code`, `demo:stem` their own, else general).
    #[serde(default = "auto")]
    pub persona_domain: String,
    #[serde(default)]
    pub design: Design,
}

impl FactorsSection {
    /// The persona domain, with `auto` resolved from the base dataset.
    pub fn persona_domain(
        &self,
        base: &str,
    ) -> Result<safetune_data::transform::PersonaDomain, String> {
        match self.persona_domain.as_str() {
            "auto" => Ok(safetune_data::transform::PersonaDomain::infer(base)),
            d => d.parse(),
        }
    }
}

impl Default for FactorsSection {
    fn default() -> Self {
        FactorsSection {
            structure: keep_structure(),
            identity: keep_toggle(),
            roleplay: keep_toggle(),
            persona_type: professional(),
            placement: system(),
            persona_domain: auto(),
            design: Design::Full,
        }
    }
}

fn keep_structure() -> Vec<StructureLevel> {
    vec![StructureLevel::Keep]
}
fn keep_toggle() -> Vec<Toggle> {
    vec![Toggle::Keep]
}
fn professional() -> String {
    "professional".into()
}
fn system() -> String {
    "system".into()
}
fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SplitChoice {
    #[default]
    Test,
    Train,
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    pub name: String,
    /// A built-in set (advbench, harmbench, strongreject, donotanswer, overrefusal) or a file.
    pub source: String,
    /// Harmful prompts (safety rate) or benign ones (over-refusal).
    pub harmful: bool,
    #[serde(default)]
    pub split: SplitChoice,
    /// Evaluate a seeded random sample of this many prompts of the split (seed:
    /// `[study] sample_seed`; a larger limit draws a superset), not its first N. All when unset.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeKind {
    /// Refusal phrases (built in, or a phrase file in `settings.phrases`; a baseline).
    Keyword,
    /// The refusal classifier (MiniLM features and the shipped head, or `settings.head`).
    Classifier,
    /// The classifier's checks with a linear probe on SmolLM2's hidden states instead of its
    /// head (the shipped probe head, or `settings.head`): the judge that validates best on this
    /// project's sealed test set.
    Probe,
    /// An LLM rubric judge: the model at `spec` (default: SmolLM2 from the assets). `model` is
    /// accepted as another name for it.
    #[serde(alias = "model")]
    Rubric,
    /// A guard model at `spec` (Llama Guard 3 or MD-Judge prompt formats, `settings.guard_format`).
    Guard,
}

impl JudgeKind {
    /// The judge's name in safetune-eval (`--judge` of `safetune judge`).
    pub fn eval_name(self) -> &'static str {
        match self {
            JudgeKind::Keyword => "keyword",
            JudgeKind::Classifier => "classifier",
            JudgeKind::Probe => "probe",
            JudgeKind::Rubric => "rubric",
            JudgeKind::Guard => "guard",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    pub name: String,
    pub kind: JudgeKind,
    pub spec: Option<String>,
    /// Judge settings passed to the judge stage as they are (rubric, template, ...).
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelConfig {
    pub name: String,
    pub spec: String,
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    /// Rows per store transaction (0: each row as it finishes; rows are generated with slots
    /// refilled either way).
    #[serde(default)]
    pub chunk_size: usize,
    /// How local models hold their matrices while generating (`openai:` models: ignored).
    #[serde(default = "GenWeights::study_default")]
    pub weights: GenWeights,
}

/// How a local model's matrices are held while it generates answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenWeights {
    /// Dense f32 (a GGUF model dequantized): the exact path, several times slower.
    #[default]
    F32,
    /// The fast kernels: a GGUF model keeps its quantized blocks; dense weights (a safetensors
    /// model, or any model with an adapter, merged first) are quantized to Q8_0 at load. Greedy
    /// answers stay close to the f32 path's, not always identical. The study's default.
    Quantized,
    /// Every matrix in bf16 for the AMX-BF16 kernel (f32 sums), an adapter merged first; a
    /// GGUF model is dequantized first. Needs a CPU with AMX-BF16: elsewhere the generate
    /// step fails, naming this key. Greedy answers stay close to the f32 path's.
    Bf16,
}

impl GenWeights {
    pub fn study_default() -> GenWeights {
        GenWeights::Quantized
    }

    pub fn is_f32(&self) -> bool {
        *self == GenWeights::F32
    }
}

impl Default for GenerationSection {
    fn default() -> Self {
        GenerationSection {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            chunk_size: 0,
            weights: GenWeights::study_default(),
        }
    }
}

fn default_max_new_tokens() -> usize {
    128
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignSection {
    /// Refusal answers (JSONL with `response`).
    #[serde(default = "default_refusals")]
    pub refusals: String,
    /// Use only the refusals without an identity statement ("I'm an AI assistant, and I
    /// can't ..."): the aligned model then does not learn "As an AI" as the start of a refusal,
    /// which the identity factor would otherwise meet. Default false (every refusal).
    #[serde(default)]
    pub plain_refusals: bool,
    /// Harmful prompts; only their train split is used.
    #[serde(default = "default_harmful")]
    pub harmful: String,
    /// Benign examples with helpful answers: one dataset spec or an array of them.
    #[serde(default = "default_benign", deserialize_with = "one_or_many")]
    pub benign: Vec<String>,
    pub harmful_limit: Option<usize>,
    /// Examples taken from each benign source (the first N of each): one number for every
    /// source, or a list with one number per source, in the order of `benign`.
    pub benign_limit: Option<PerSource>,
    /// Train even when examples are longer than `settings.max_len` (they are cut at its end);
    /// by default the align step fails and names the `max_len` that fits every example.
    #[serde(default)]
    pub allow_truncation: bool,
    /// Trainer settings (safetune-train's keys: epochs, lr, rank, max_len, ...), checked
    /// against the trainer's keys when the config is loaded.
    #[serde(default)]
    pub settings: toml::Table,
    /// Who trains: `local` (safetune-train, default), `llama-factory`, `axolotl`, `trl` or
    /// `command` (see `crate::external_train`).
    #[serde(default)]
    pub backend: crate::external_train::Backend,
    /// The trainer's command template (required for `command`; overrides the backend's
    /// default otherwise). Placeholders: {config}, {data}, {data_dir}, {output_dir},
    /// {base_model}, {seed}, {name}, {step_dir}, {args}.
    pub command: Option<String>,
    /// A wrapper put in front of the command (`srun`, `sbatch --wait --parsable job.sh`).
    pub launcher: Option<String>,
    /// Environment variables of the trainer's process (e.g. `{ FORCE_TORCHRUN = "1" }`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// External train steps run at once (each a child process); local steps run one at a time.
    #[serde(default = "one_parallel")]
    pub max_parallel_train: usize,
    /// Keys written into the trainer's own config as they are (not validated here).
    #[serde(default)]
    pub backend_settings: toml::Table,
}

/// A limit for every source (`79`) or one per source (`[79, 20]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerSource {
    /// The same limit for every source (serialized as a plain number, as before lists existed).
    Each(usize),
    /// One limit per source, in order.
    List(Vec<usize>),
}

impl PerSource {
    /// The limit of source `i` (`None` past the end of a list: validation rules that out).
    pub fn for_source(&self, i: usize) -> Option<usize> {
        match self {
            PerSource::Each(n) => Some(*n),
            PerSource::List(v) => v.get(i).copied(),
        }
    }
}

fn default_refusals() -> String {
    "demo:refusals".into()
}
fn default_harmful() -> String {
    "advbench".into()
}
fn default_benign() -> Vec<String> {
    vec!["demo:stem".into()]
}

/// A string or an array of strings, read as a list (`benign = "demo:stem"` or
/// `benign = ["demo:stem", "demo:overrefusal-answers"]`).
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a dataset spec or an array of dataset specs")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(x) = seq.next_element::<String>()? {
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visit)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneSection {
    /// Train even when examples are longer than `settings.max_len` (see [`AlignSection`]).
    #[serde(default)]
    pub allow_truncation: bool,
    /// How long each variant trains: `"steps"` (default: the configured epochs for every
    /// variant) or `"tokens"` (each variant's run is cut or lengthened, in whole optimizer
    /// steps, so that its loss-carrying tokens equal those of the study's first variant, the
    /// baseline, at the configured epochs, at the same seed, mixing level and selection).
    #[serde(default, rename = "match")]
    pub match_: TrainMatch,
    /// Trainer settings, checked against the trainer's keys when the config is loaded.
    #[serde(default)]
    pub settings: toml::Table,
    /// Who trains: `local` (safetune-train, default), `llama-factory`, `axolotl`, `trl` or
    /// `command` (see `crate::external_train`).
    #[serde(default)]
    pub backend: crate::external_train::Backend,
    /// The trainer's command template (required for `command`; overrides the backend's
    /// default otherwise). Placeholders: {config}, {data}, {data_dir}, {output_dir},
    /// {base_model}, {seed}, {name}, {step_dir}, {args}.
    pub command: Option<String>,
    /// A wrapper put in front of the command (`srun`, `sbatch --wait --parsable job.sh`).
    pub launcher: Option<String>,
    /// Environment variables of the trainer's process (e.g. `{ FORCE_TORCHRUN = "1" }`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// External train steps run at once (each a child process); local steps run one at a time.
    #[serde(default = "one_parallel")]
    pub max_parallel_train: usize,
    /// Keys written into the trainer's own config as they are (not validated here).
    #[serde(default)]
    pub backend_settings: toml::Table,
}

fn one_parallel() -> usize {
    1
}

/// The trainer options `[align]` and `[tune]` share, beside `settings`.
#[derive(Debug, Clone, Copy)]
pub struct TrainerOptions<'a> {
    pub backend: crate::external_train::Backend,
    pub command: Option<&'a str>,
    pub launcher: Option<&'a str>,
    pub env: &'a BTreeMap<String, String>,
    pub max_parallel_train: usize,
    pub backend_settings: &'a toml::Table,
    pub settings: &'a toml::Table,
}

impl AlignSection {
    pub fn trainer(&self) -> TrainerOptions<'_> {
        TrainerOptions {
            backend: self.backend,
            command: self.command.as_deref(),
            launcher: self.launcher.as_deref(),
            env: &self.env,
            max_parallel_train: self.max_parallel_train,
            backend_settings: &self.backend_settings,
            settings: &self.settings,
        }
    }
}

impl TuneSection {
    pub fn trainer(&self) -> TrainerOptions<'_> {
        TrainerOptions {
            backend: self.backend,
            command: self.command.as_deref(),
            launcher: self.launcher.as_deref(),
            env: &self.env,
            max_parallel_train: self.max_parallel_train,
            backend_settings: &self.backend_settings,
            settings: &self.settings,
        }
    }
}

/// `[tune] match`: what the variants' runs hold equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainMatch {
    /// The same epochs (so optimizer steps per example) for every variant.
    #[default]
    Steps,
    /// The same trained tokens as the baseline variant.
    Tokens,
}

/// `[analysis]`: the assumptions of `--dry-run`'s power and compute estimates. Power
/// assumptions default to `safetune_eval::effects::PowerAssumptions::MEASURED`, rates to
/// [`crate::power::MEASURED_RATES`] (measured on this project's machine).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSection {
    /// SD (points of refusal rate) of a run's rate around its cell's mean.
    pub run_sd_points: Option<f64>,
    /// SD (points) over prompts of a factor's per-prompt effect.
    pub prompt_sd_points: Option<f64>,
    /// The refusal rate (0-1) answer-level noise is taken at.
    pub base_rate: Option<f64>,
    /// Two-sided level of the tests (default 0.05).
    pub alpha: Option<f64>,
    /// Power the detectable effect is computed at (default 0.8).
    pub power: Option<f64>,
    /// Local LoRA training speed, input tokens per second.
    pub train_tokens_per_s: Option<f64>,
    /// Local generation speed, new tokens per second (at the study's batching).
    pub generate_tokens_per_s: Option<f64>,
    /// Local judge speed (classifier judge), rows per second.
    pub judge_rows_per_s: Option<f64>,
    /// Characters per token of the chat-rendered training text (the token estimate).
    pub chars_per_token: Option<f64>,
    /// External trainers' speed, input tokens per second per GPU (the dry run's GPU-hours;
    /// default `safetune_study::power::GPU_TRAIN_TOKENS_PER_S`).
    pub gpu_tokens_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixingSection {
    /// Shares of refusal examples in the tuning set, e.g. [0.0, 0.05, 0.1].
    pub levels: Vec<f64>,
    #[serde(default = "default_refusals")]
    pub refusals: String,
    #[serde(default = "default_harmful")]
    pub harmful: String,
}

/// `[mitigations]`: fixes for a risky tuning set, each tuned as an arm beside the variant it is
/// applied to (the arm `none`, the variant as it is, is the control of every comparison). An arm
/// keeps the variant's factor labels and adds `mitigation = ARM`, so the report compares arms
/// within a variant, seed by seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MitigationsSection {
    /// Variant names the arms apply to (`plain+roleplay`, ...; see the dry run's labels), or
    /// `["all"]`. Default: every variant.
    #[serde(default)]
    pub apply_to: Vec<String>,
    /// The paper's data-side fixes, as a transform preset: the variant's data made again with
    /// these levels (`true` for markdown answers, an identity statement added, role-play
    /// instructions removed).
    pub data: Option<DataArm>,
    /// Safety replay: this share of refusal examples (train-split harmful prompts) mixed in,
    /// from `[mixing]`'s sources, else `[align]`'s, else the demo refusals and AdvBench.
    pub replay: Option<f64>,
    /// Post-hoc projection of the tuned adapter onto the alignment subspace (needs `[align]`).
    pub project: Option<ProjectArm>,
    /// Reference-anchored tuning: a KL term to the aligned model's next-token distribution.
    pub anchor: Option<AnchorArm>,
}

/// `data = true` or a table of levels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataArm {
    On(bool),
    Levels(DataLevels),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataLevels {
    #[serde(default = "default_fix_structure")]
    pub structure: StructureLevel,
    #[serde(default = "default_fix_identity")]
    pub identity: Toggle,
    #[serde(default = "default_fix_roleplay")]
    pub roleplay: Toggle,
}

fn default_fix_structure() -> StructureLevel {
    StructureLevel::Markdown
}
fn default_fix_identity() -> Toggle {
    Toggle::Add
}
fn default_fix_roleplay() -> Toggle {
    Toggle::Remove
}

impl DataArm {
    /// The preset's levels, `None` for `data = false`.
    pub fn levels(&self) -> Option<DataLevels> {
        match self {
            DataArm::On(false) => None,
            DataArm::On(true) => Some(DataLevels {
                structure: default_fix_structure(),
                identity: default_fix_identity(),
                roleplay: default_fix_roleplay(),
            }),
            DataArm::Levels(l) => Some(l.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectArm {
    /// `scaled` (V V^T / ||V||_F, the published method's fast form) or `exact` (the orthogonal
    /// projector onto V's columns).
    #[serde(default = "default_projector")]
    pub projector: String,
    /// Project the layers whose projected update's cosine similarity to the original is below
    /// this (default 0.5 when neither this nor `share` is given).
    pub threshold: Option<f64>,
    /// Or: project this share of the layers, the least similar first.
    pub share: Option<f64>,
}

fn default_projector() -> String {
    "scaled".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorArm {
    /// Weight of the KL term.
    #[serde(default = "default_anchor_beta")]
    pub beta: f64,
    /// `refusals`: the KL term on an anchor set, the alignment set's harmful prompts with their
    /// refusals (train split, disjoint from every evaluated prompt; needs `[align]`);
    /// `answers`: on every answer token of the tuning data.
    #[serde(default = "default_anchor_on")]
    pub on: String,
    /// Anchor rows per optimizer step (`on = "refusals"`).
    #[serde(default = "default_anchor_batch")]
    pub batch_size: usize,
}

fn default_anchor_beta() -> f64 {
    0.1
}
fn default_anchor_on() -> String {
    "refusals".into()
}
fn default_anchor_batch() -> usize {
    4
}

impl MitigationsSection {
    /// Does the arm set apply to the variant `name`?
    pub fn applies_to(&self, name: &str) -> bool {
        self.apply_to.is_empty() || self.apply_to.iter().any(|a| a == "all" || a == name)
    }
}

/// `[utility]`: what each model condition can still do, beside its safety.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UtilitySection {
    /// Conversations whose final answers are scored (loss, perplexity): `"auto"` (default) for
    /// the examples of `[data] base` that the tuning set leaves out (those after `limit`), or a
    /// dataset.
    #[serde(default = "default_heldout")]
    pub heldout: String,
    /// At most this many held-out conversations (the first ones).
    #[serde(default = "default_heldout_limit")]
    pub heldout_limit: usize,
    /// Multiple-choice questions scored by log-likelihood.
    #[serde(default = "default_mcq")]
    pub mcq: String,
    /// At most this many questions (0: all).
    #[serde(default)]
    pub mcq_limit: usize,
}

fn default_heldout() -> String {
    "auto".into()
}
fn default_heldout_limit() -> usize {
    48
}
fn default_mcq() -> String {
    "demo:utility-mcq".into()
}

impl Default for UtilitySection {
    fn default() -> Self {
        UtilitySection {
            heldout: default_heldout(),
            heldout_limit: default_heldout_limit(),
            mcq: default_mcq(),
            mcq_limit: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SelectStrategy {
    #[default]
    Top,
    Bottom,
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionSection {
    /// Name of a `[[reward_models]]` entry that scores the tuning examples.
    pub reward_model: String,
    /// Shares of the tuning set to keep, e.g. [0.5].
    pub keep: Vec<f64>,
    #[serde(default)]
    pub strategies: Vec<SelectStrategy>,
}

/// `[export]`: overrides of what `safetune export` takes from the study (the training
/// settings always come from `[tune]`/`[align]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// The model the exported configs tune (a hub id or path); default: the first model's
    /// `train_model`, else its spec.
    pub base_model: Option<String>,
    /// LLaMA-Factory's chat template name (else `[tune] backend_settings.template`).
    pub template: Option<String>,
}

impl StudyConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<StudyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<StudyConfig, ConfigError> {
        let cfg: StudyConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        cfg.check_trainer_settings(text, path)?;
        cfg.check_external(text, path)?;
        Ok(cfg)
    }

    /// Checks the `settings` of `[align]` and `[tune]` with the trainer's own reader
    /// ([`TuneConfig::from_settings`]): unknown keys, the keys a step sets itself (model, data,
    /// output), wrong types and values out of range are errors naming the key and its line.
    fn check_trainer_settings(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let sections = [
            ("align", self.align.as_ref().map(|a| &a.settings)),
            ("tune", self.tune.as_ref().map(|t| &t.settings)),
        ];
        for (section, settings) in sections {
            let Some(settings) = settings else { continue };
            let Err(e) = TuneConfig::from_settings(settings) else {
                continue;
            };
            let key = e.key().to_string();
            let message = match &e {
                SettingsError::Unknown { accepted, .. } if STAGE_OPTIONS.contains(&key.as_str()) => {
                    format!(
                        "a stage option, not a trainer setting: write it in [{section}] beside `settings` (trainer settings: {})",
                        accepted.join(", ")
                    )
                }
                SettingsError::Unknown { accepted, .. } => format!(
                    "unknown trainer setting (accepted: {})",
                    accepted.join(", ")
                ),
                SettingsError::RunKey { .. } => format!(
                    "set by the {section} step itself (the model, its dataset and its directory), not in settings"
                ),
                SettingsError::Invalid { message, .. } => {
                    format!("invalid trainer setting: {message}")
                }
            };
            let field = if key.is_empty() {
                format!("{section}.settings")
            } else {
                format!("{section}.settings.{key}")
            };
            return Err(match settings_line(text, section, &key) {
                Some(line) => ConfigError::At {
                    path: path.to_path_buf(),
                    line,
                    field,
                    message,
                },
                None => ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    message,
                },
            });
        }
        Ok(())
    }

    /// Checks the external trainer options of `[align]` and `[tune]`: a `command` for the
    /// `command` backend, known placeholders, settings every chosen backend can take (the
    /// mapping of [`crate::external_train::MAPPING`]), a `train_model` for `openai:` models.
    fn check_external(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        use crate::external_train::{check_template, map_settings, Backend};
        let bad = |field: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        let sections = [
            ("align", self.align.as_ref().map(AlignSection::trainer)),
            ("tune", self.tune.as_ref().map(TuneSection::trainer)),
        ];
        for (section, t) in sections {
            let Some(t) = t else { continue };
            if t.max_parallel_train == 0 {
                return Err(bad(
                    format!("{section}.max_parallel_train"),
                    "must be at least 1".into(),
                ));
            }
            if t.backend == Backend::Local {
                for (field, set) in [
                    ("command", t.command.is_some()),
                    ("launcher", t.launcher.is_some()),
                    ("env", !t.env.is_empty()),
                    ("backend_settings", !t.backend_settings.is_empty()),
                ] {
                    if set {
                        return Err(bad(
                            format!("{section}.{field}"),
                            "is read by external backends only: set `backend` (llama-factory, axolotl, trl or command)".into(),
                        ));
                    }
                }
                continue;
            }
            let b = t.backend.as_str();
            if t.backend == Backend::Command && t.command.is_none() {
                return Err(bad(
                    format!("{section}.command"),
                    "the `command` backend needs a command template, e.g. \"my-trainer --config {config}\"".into(),
                ));
            }
            for (field, v) in [("command", t.command), ("launcher", t.launcher)] {
                if let Some(v) = v {
                    check_template(v).map_err(|m| bad(format!("{section}.{field}"), m))?;
                }
            }
            for k in [
                "model",
                "data",
                "output",
                "model_name_or_path",
                "base_model",
                "output_dir",
                "dataset_dir",
                "datasets",
            ] {
                if t.backend_settings.contains_key(k) {
                    return Err(bad(
                        format!("{section}.backend_settings.{k}"),
                        "set by the step itself (the model, its data and its output)".into(),
                    ));
                }
            }
            if t.backend == Backend::LlamaFactory && !t.backend_settings.contains_key("template") {
                return Err(bad(
                    format!("{section}.backend_settings.template"),
                    "llama-factory needs its chat template's name (e.g. template = \"llama3\" or \"qwen\")".into(),
                ));
            }
            if t.backend != Backend::Command {
                if let Err(e) = map_settings(t.backend, t.settings) {
                    let field = format!("{section}.settings.{}", e.key);
                    return Err(match settings_line(text, section, &e.key) {
                        Some(line) => ConfigError::At {
                            path: path.to_path_buf(),
                            line,
                            field,
                            message: e.message,
                        },
                        None => bad(field, e.message),
                    });
                }
            }
            if section == "tune" {
                if self
                    .tune
                    .as_ref()
                    .is_some_and(|x| x.match_ == TrainMatch::Tokens)
                {
                    return Err(bad(
                        "tune.match".into(),
                        format!("`tokens` counts tokens with the local trainer's tokenizer and cuts runs in its optimizer steps; backend `{b}` trains by epochs (use match = \"steps\")"),
                    ));
                }
                if self
                    .mitigations
                    .as_ref()
                    .is_some_and(|m| m.anchor.is_some())
                {
                    return Err(bad(
                        "mitigations.anchor".into(),
                        format!("the anchor arm sets the trainer's anchor keys (anchor, anchor_beta, ...), which have no equivalent in backend `{b}`"),
                    ));
                }
            }
            for (i, m) in self.models.iter().enumerate() {
                let remote = m.spec.starts_with("openai:");
                if remote && section == "align" {
                    return Err(bad(
                        "align.backend".into(),
                        format!("models[{i}] `{}` is served over HTTP: an aligned model is a merged model, which the server must load as its base; align it with the trainer, serve the merged model and list that as the model (without [align])", m.name),
                    ));
                }
                let needs = remote || (t.backend != Backend::Command && m.spec.ends_with(".gguf"));
                if needs && m.train_model.as_deref().is_none_or(|x| x.trim().is_empty()) {
                    return Err(bad(
                        format!("models[{i}].train_model"),
                        format!("backend `{b}` trains `{}` as the trainer sees it: set train_model to its Hugging Face id or directory", m.spec),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks `[study] shared_dir` (when set): it exists and a file can be written there.
    /// Called when a study starts, not when the config is read (a dry run needs no cluster).
    pub fn check_shared_dir(&self) -> Result<(), ConfigError> {
        let Some(d) = &self.study.shared_dir else {
            return Ok(());
        };
        let bad = |message: String| ConfigError::Invalid {
            path: d.clone(),
            field: "study.shared_dir".into(),
            message,
        };
        if !d.is_dir() {
            return Err(bad("does not exist (or is not a directory); create it on the filesystem the trainers and servers share".into()));
        }
        let probe = d.join(format!(".safetune-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"ok").map_err(|e| bad(format!("is not writable: {e}")))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if self.study.name.trim().is_empty() {
            return Err(bad("study.name", "must not be empty".into()));
        }
        if self.study.seeds.is_empty() {
            return Err(bad("study.seeds", "needs at least one seed".into()));
        }
        if !(self.study.test_fraction > 0.0 && self.study.test_fraction < 1.0) {
            return Err(bad(
                "study.test_fraction",
                format!("must be between 0 and 1, got {}", self.study.test_fraction),
            ));
        }
        let an = &self.analysis;
        for (field, v, ok) in [
            (
                "analysis.alpha",
                an.alpha,
                an.alpha.is_none_or(|x| x > 0.0 && x < 1.0),
            ),
            (
                "analysis.power",
                an.power,
                an.power.is_none_or(|x| x > 0.0 && x < 1.0),
            ),
            (
                "analysis.base_rate",
                an.base_rate,
                an.base_rate.is_none_or(|x| (0.0..=1.0).contains(&x)),
            ),
        ] {
            if !ok {
                return Err(bad(
                    field,
                    format!("{} is not in (0, 1)", v.unwrap_or_default()),
                ));
            }
        }
        for (field, v) in [
            ("analysis.run_sd_points", an.run_sd_points),
            ("analysis.prompt_sd_points", an.prompt_sd_points),
        ] {
            if v.is_some_and(|x| !(x >= 0.0 && x.is_finite())) {
                return Err(bad(field, "must be a finite number >= 0".into()));
            }
        }
        for (field, v) in [
            ("analysis.train_tokens_per_s", an.train_tokens_per_s),
            ("analysis.generate_tokens_per_s", an.generate_tokens_per_s),
            ("analysis.judge_rows_per_s", an.judge_rows_per_s),
            ("analysis.chars_per_token", an.chars_per_token),
            ("analysis.gpu_tokens_per_s", an.gpu_tokens_per_s),
        ] {
            if v.is_some_and(|x| !(x > 0.0 && x.is_finite())) {
                return Err(bad(field, "must be a number > 0".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if !names.insert(("model", m.name.clone())) {
                return Err(bad(
                    &format!("models[{i}].name"),
                    format!("`{}` appears twice", m.name),
                ));
            }
            if m.concurrency == 0 {
                return Err(bad(
                    &format!("models[{i}].concurrency"),
                    "must be > 0".into(),
                ));
            }
            if let Some(env) = &m.api_key_env {
                if !m.spec.starts_with("openai:") {
                    return Err(bad(
                        &format!("models[{i}].api_key_env"),
                        "only an openai:URL#MODEL model sends an API key".into(),
                    ));
                }
                if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad(
                        &format!("models[{i}].api_key_env"),
                        format!(
                            "`{env}` is not an environment variable name (the name, never the key itself)"
                        ),
                    ));
                }
            }
            if m.allow_insecure && !m.spec.starts_with("openai:") {
                return Err(bad(
                    &format!("models[{i}].allow_insecure"),
                    "only an openai:URL#MODEL model sends an API key".into(),
                ));
            }
            for (key, set) in [
                ("lora_name", m.lora_name.is_some()),
                ("dynamic_lora", m.dynamic_lora),
            ] {
                if set && !m.spec.starts_with("openai:") {
                    return Err(bad(
                        &format!("models[{i}].{key}"),
                        "only an openai:URL#MODEL model serves adapters by name; a local model applies the tuned adapter itself".into(),
                    ));
                }
            }
            if let Some(t) = &m.lora_name {
                crate::step::LoraServing::placeholders(t)
                    .map_err(|e| bad(&format!("models[{i}].lora_name"), e))?;
            }
            if !m.endpoints.is_empty() && !m.spec.starts_with("openai:") {
                return Err(bad(
                    &format!("models[{i}].endpoints"),
                    "extra endpoints need an openai:URL#MODEL spec".into(),
                ));
            }
            for (j, e) in m.endpoints.iter().enumerate() {
                if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                    return Err(bad(
                        &format!("models[{i}].endpoints[{j}].url"),
                        format!("`{}` must start with http:// or https://", e.url),
                    ));
                }
                if e.concurrency == 0 {
                    return Err(bad(
                        &format!("models[{i}].endpoints[{j}].concurrency"),
                        "must be > 0".into(),
                    ));
                }
            }
        }
        for (i, b) in self.benchmarks.iter().enumerate() {
            if !names.insert(("benchmark", b.name.clone())) {
                return Err(bad(
                    &format!("benchmarks[{i}].name"),
                    format!("`{}` appears twice", b.name),
                ));
            }
        }
        for (i, j) in self.judges.iter().enumerate() {
            if !names.insert(("judge", j.name.clone())) {
                return Err(bad(
                    &format!("judges[{i}].name"),
                    format!("`{}` appears twice", j.name),
                ));
            }
            if let Err(e) = crate::judge_stage::judge_spec(
                j.kind,
                j.spec.as_deref(),
                &serde_json::to_value(&j.settings).unwrap_or_default(),
            ) {
                let (field, message) = e.split_once(": ").unwrap_or(("settings", e.as_str()));
                return Err(bad(&format!("judges[{i}].{field}"), message.to_string()));
            }
        }
        for (i, r) in self.reward_models.iter().enumerate() {
            if !names.insert(("rm", r.name.clone())) {
                return Err(bad(
                    &format!("reward_models[{i}].name"),
                    format!("`{}` appears twice", r.name),
                ));
            }
        }
        if self.factors.structure.is_empty()
            || self.factors.identity.is_empty()
            || self.factors.roleplay.is_empty()
        {
            return Err(bad(
                "factors",
                "every factor needs at least one level (use [\"keep\"] to leave it alone)".into(),
            ));
        }
        self.factors
            .persona_type
            .parse::<safetune_data::transform::PersonaType>()
            .map_err(|m| bad("factors.persona_type", m))?;
        self.factors
            .placement
            .parse::<safetune_data::transform::PersonaPlacement>()
            .map_err(|m| bad("factors.placement", m))?;
        self.factors
            .persona_domain(&self.data.base)
            .map_err(|m| bad("factors.persona_domain", m))?;
        for (field, levels, wrong, right) in [
            (
                "factors.identity",
                &self.factors.identity,
                Toggle::Neutral,
                "placebo",
            ),
            (
                "factors.roleplay",
                &self.factors.roleplay,
                Toggle::Placebo,
                "neutral",
            ),
        ] {
            if levels.contains(&wrong) {
                return Err(bad(
                    field,
                    format!(
                        "`{}` is not a level of this factor (expected keep, add, remove or {right})",
                        wrong.as_str()
                    ),
                ));
            }
        }
        if let Some(m) = &self.mixing {
            if m.levels.is_empty() {
                return Err(bad("mixing.levels", "needs at least one level".into()));
            }
            for l in &m.levels {
                if !(0.0..1.0).contains(l) {
                    return Err(bad(
                        "mixing.levels",
                        format!("{l} is not a share in [0, 1)"),
                    ));
                }
            }
        }
        if let Some(s) = &self.selection {
            if !self.reward_models.iter().any(|r| r.name == s.reward_model) {
                return Err(bad(
                    "selection.reward_model",
                    format!("`{}` is not a [[reward_models]] name", s.reward_model),
                ));
            }
            for k in &s.keep {
                if !(*k > 0.0 && *k <= 1.0) {
                    return Err(bad(
                        "selection.keep",
                        format!("{k} is not a share in (0, 1]"),
                    ));
                }
            }
            if s.keep.is_empty() {
                return Err(bad("selection.keep", "needs at least one share".into()));
            }
        }
        if let Some(a) = &self.align {
            if a.benign.is_empty() {
                return Err(bad(
                    "align.benign",
                    "needs at least one dataset (leave it out for demo:stem)".into(),
                ));
            }
            if let Some(i) = a.benign.iter().position(|b| b.trim().is_empty()) {
                return Err(bad(&format!("align.benign[{i}]"), "is empty".into()));
            }
            if let Some(PerSource::List(v)) = &a.benign_limit {
                if v.len() != a.benign.len() {
                    return Err(bad(
                        "align.benign_limit",
                        format!(
                            "has {} numbers for {} benign datasets (give one number for all, or one per dataset)",
                            v.len(),
                            a.benign.len()
                        ),
                    ));
                }
            }
        }
        if let Some(m) = &self.mitigations {
            self.validate_mitigations(m, &bad)?;
        }
        if let Some(u) = &self.utility {
            if u.heldout == "auto" && self.data.limit.is_none() {
                return Err(bad(
                    "utility.heldout",
                    "`auto` scores the examples of [data] base after its `limit`, and [data] has no limit: set one, or name a held-out dataset".into(),
                ));
            }
            if u.heldout_limit == 0 {
                return Err(bad("utility.heldout_limit", "must be > 0".into()));
            }
        }
        if (self.tune.is_some() || self.align.is_some() || !self.benchmarks.is_empty())
            && self.models.is_empty()
        {
            return Err(bad(
                "models",
                "tuning, alignment and benchmarks need at least one [[models]] entry".into(),
            ));
        }
        Ok(())
    }
}

impl StudyConfig {
    fn validate_mitigations(
        &self,
        m: &MitigationsSection,
        bad: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.tune.is_none() {
            return Err(bad(
                "mitigations",
                "arms are tuned runs: the study needs [tune]".into(),
            ));
        }
        let names: Vec<String> = crate::plan::variant_levels(&self.factors)
            .into_iter()
            .map(|(s, i, r)| crate::plan::variant_name(s, i, r))
            .collect();
        for (i, a) in m.apply_to.iter().enumerate() {
            if a != "all" && !names.contains(a) {
                return Err(bad(
                    &format!("mitigations.apply_to[{i}]"),
                    format!(
                        "`{a}` is not a variant of this design (variants: {}, or \"all\")",
                        names.join(", ")
                    ),
                ));
            }
        }
        if let Some(r) = m.replay {
            if !(r > 0.0 && r < 1.0) {
                return Err(bad(
                    "mitigations.replay",
                    format!("{r} is not a share in (0, 1)"),
                ));
            }
        }
        if let Some(p) = &m.project {
            if self.align.is_none() {
                return Err(bad(
                    "mitigations.project",
                    "projects onto the alignment the study's [align] stage made: the study needs [align]".into(),
                ));
            }
            if !matches!(p.projector.as_str(), "scaled" | "exact") {
                return Err(bad(
                    "mitigations.project.projector",
                    format!("`{}` is not scaled or exact", p.projector),
                ));
            }
            match (p.threshold, p.share) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "mitigations.project",
                        "give `threshold` or `share`, not both".into(),
                    ))
                }
                (Some(t), None) if !(-1.0..=1.0).contains(&t) => {
                    return Err(bad(
                        "mitigations.project.threshold",
                        format!("{t} is not a cosine similarity in [-1, 1]"),
                    ))
                }
                (None, Some(s)) if !(s > 0.0 && s <= 1.0) => {
                    return Err(bad(
                        "mitigations.project.share",
                        format!("{s} is not a share in (0, 1]"),
                    ))
                }
                _ => {}
            }
        }
        if let Some(a) = &m.anchor {
            if !(a.beta > 0.0 && a.beta.is_finite()) {
                return Err(bad(
                    "mitigations.anchor.beta",
                    format!("{} must be > 0", a.beta),
                ));
            }
            match a.on.as_str() {
                "answers" => {}
                "refusals" if self.align.is_some() => {}
                "refusals" => {
                    return Err(bad(
                        "mitigations.anchor.on",
                        "`refusals` anchors on the alignment set's refusals: the study needs [align] (or use on = \"answers\")".into(),
                    ))
                }
                other => {
                    return Err(bad(
                        "mitigations.anchor.on",
                        format!("`{other}` is not refusals or answers"),
                    ))
                }
            }
            if a.batch_size == 0 {
                return Err(bad("mitigations.anchor.batch_size", "must be > 0".into()));
            }
        }
        if m.data.as_ref().and_then(DataArm::levels).is_none()
            && m.replay.is_none()
            && m.project.is_none()
            && m.anchor.is_none()
        {
            return Err(bad(
                "mitigations",
                "lists no arm (data, replay, project, anchor)".into(),
            ));
        }
        Ok(())
    }
}

/// The keys of `[align]`/`[tune]` that are stage options, not trainer settings.
const STAGE_OPTIONS: &[&str] = &["allow_truncation"];

/// The line (1-based) of `[section].settings.KEY` in the config text, or of the settings table
/// itself when `key` is empty or not found.
fn settings_line(text: &str, section: &str, key: &str) -> Option<usize> {
    type Keys = BTreeMap<toml::Spanned<String>, serde::de::IgnoredAny>;
    #[derive(Deserialize)]
    struct Section {
        settings: Option<toml::Spanned<Keys>>,
    }
    #[derive(Deserialize)]
    struct Doc {
        align: Option<Section>,
        tune: Option<Section>,
    }
    let doc: Doc = toml::from_str(text).ok()?;
    let settings = match section {
        "align" => doc.align,
        "tune" => doc.tune,
        _ => None,
    }?
    .settings?;
    let at = settings
        .get_ref()
        .keys()
        .find(|k| k.get_ref() == key)
        .map(|k| k.span().start)
        .unwrap_or(settings.span().start);
    Some(text[..at.min(text.len())].matches('\n').count() + 1)
}

/// Resolves `asset:REL` to a file in the asset cache; other specs are returned as they are.
pub fn resolve_model_spec(spec: &str) -> Result<String, safetune_data::DataError> {
    match spec.strip_prefix("asset:") {
        Some(rel) => Ok(safetune_data::assets::asset(rel)?.display().to_string()),
        None => Ok(spec.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[study]\nname = \"t\"\n[data]\nbase = \"demo:medical\"\n";

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let p = Path::new("cfg.toml");
        let e = StudyConfig::parse(&format!("{MIN}[factors]\nstructur = [\"plain\"]\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("structur") && e.contains("cfg.toml"), "{e}");
        let e = StudyConfig::parse(&format!("{MIN}colour = 1\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = StudyConfig::parse(&format!("{MIN}[factors]\nidentity = [\"maybe\"]\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn api_key_settings_are_checked_and_left_out_of_step_keys() {
        let p = Path::new("k.toml");
        let with = |extra: &str| {
            format!(
                "{MIN}[[models]]\nname = \"m\"\nspec = \"openai:http://10.0.0.2:8000/v1#m\"\n{extra}"
            )
        };
        let plain = StudyConfig::parse(&with(""), p).unwrap();
        let keyed = StudyConfig::parse(
            &with("api_key_env = \"MY_VLLM_KEY\"\nallow_insecure = true\n"),
            p,
        )
        .unwrap();
        assert_eq!(keyed.models[0].api_key_env.as_deref(), Some("MY_VLLM_KEY"));
        assert!(keyed.models[0].allow_insecure);
        // Who gets the key changes no step's key.
        let a = crate::runner::step_keys(&crate::plan::plan(&plain).unwrap());
        let b = crate::runner::step_keys(&crate::plan::plan(&keyed).unwrap());
        assert_eq!(a, b);
        // The setting takes a variable's name, and only on openai: models.
        let e = StudyConfig::parse(&with("api_key_env = \"sk-abc def\"\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api_key_env") && e.contains("environment variable name"),
            "{e}"
        );
        let local =
            format!("{MIN}[[models]]\nname = \"m\"\nspec = \"m.gguf\"\nallow_insecure = true\n");
        let e = StudyConfig::parse(&local, p).unwrap_err().to_string();
        assert!(e.contains("allow_insecure"), "{e}");
    }

    #[test]
    fn control_levels_only_where_they_belong() {
        let p = Path::new("c.toml");
        let e = StudyConfig::parse(&format!("{MIN}[factors]\nidentity = [\"neutral\"]\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("factors.identity") && e.contains("neutral"),
            "{e}"
        );
        let e = StudyConfig::parse(&format!("{MIN}[factors]\nroleplay = [\"placebo\"]\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("factors.roleplay") && e.contains("placebo"),
            "{e}"
        );
        let c = StudyConfig::parse(
            &format!("{MIN}[factors]\nidentity = [\"add\", \"placebo\"]\nroleplay = [\"add\", \"neutral\"]\n"),
            p,
        )
        .unwrap();
        assert_eq!(c.factors.identity, vec![Toggle::Add, Toggle::Placebo]);
        assert_eq!(c.factors.roleplay, vec![Toggle::Add, Toggle::Neutral]);
        use safetune_data::transform::PersonaDomain;
        assert_eq!(
            c.factors.persona_domain(&c.data.base),
            Ok(PersonaDomain::Medical)
        );
        let e = StudyConfig::parse(&format!("{MIN}[factors]\npersona_domain = \"law\"\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("factors.persona_domain") && e.contains("law"),
            "{e}"
        );
        let c =
            StudyConfig::parse(&format!("{MIN}[factors]\npersona_domain = \"code\"\n"), p).unwrap();
        assert_eq!(
            c.factors.persona_domain(&c.data.base),
            Ok(PersonaDomain::Code)
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        let p = Path::new("c.toml");
        let e = StudyConfig::parse(&format!("{MIN}[mixing]\nlevels = [0.2, 1.5]\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mixing.levels") && e.contains("1.5"), "{e}");
        let e = StudyConfig::parse(
            &format!("{MIN}[[benchmarks]]\nname=\"a\"\nsource=\"advbench\"\nharmful=true\n"),
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`models`"), "{e}");
        let cfg = StudyConfig::parse(MIN, p).unwrap();
        assert_eq!(cfg.study.seeds, vec![0]);
        assert_eq!(cfg.factors.structure, vec![StructureLevel::Keep]);
    }

    const MODEL: &str = "[[models]]\nname = \"m\"\nspec = \"m.gguf\"\n";

    fn parse_err(extra: &str) -> String {
        StudyConfig::parse(&format!("{MIN}{MODEL}{extra}"), Path::new("s.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn trainer_settings_are_checked_at_load_with_key_line_and_accepted_keys() {
        // MIN and MODEL are 7 lines.
        let e = parse_err(
            "[align]\nbenign = \"demo:stem\"\nsettings = { epochs = 3, learning_rate = 1e-4 }\n",
        );
        assert!(
            e.starts_with("s.toml:10: `align.settings.learning_rate`: unknown trainer setting (accepted: alpha, anchor, anchor_batch_size, anchor_beta, anchor_data, batch_size, "),
            "{e}"
        );
        // The accepted keys are the trainer's, less those the step sets itself.
        assert!(
            e.contains(" lr, ") && e.contains(" rank, ") && e.contains(" max_len, "),
            "{e}"
        );
        assert!(!e.contains(" model,") && !e.contains(" output,"), "{e}");
        let e = parse_err("[tune]\n[tune.settings]\nepochs = 1\n\nlora_rank = 8\n");
        assert!(
            e.starts_with("s.toml:12: `tune.settings.lora_rank`: unknown"),
            "{e}"
        );
        let e = parse_err("[tune]\nsettings = { model = \"other.gguf\" }\n");
        assert!(
            e.starts_with("s.toml:9: `tune.settings.model`: set by the tune step"),
            "{e}"
        );
        // Types and values go through the trainer's own reader.
        let e = parse_err("[tune]\nsettings = { lr = \"fast\" }\n");
        assert!(
            e.starts_with("s.toml:9: `tune.settings.lr`: invalid trainer setting: "),
            "{e}"
        );
        let e = parse_err("[tune]\nsettings = { batch_size = 0 }\n");
        assert!(
            e.ends_with("`tune.settings.batch_size`: invalid trainer setting: must be at least 1"),
            "{e}"
        );
        // A stage option written inside settings says where it goes.
        let e = parse_err("[align]\nsettings = { allow_truncation = true }\n");
        assert!(
            e.contains("`align.settings.allow_truncation`: a stage option")
                && e.contains("beside `settings`"),
            "{e}"
        );
        let cfg = StudyConfig::parse(
            &format!("{MIN}{MODEL}[tune]\nallow_truncation = true\nsettings = {{ lr = 1e-4, rank = 4, max_len = 64 }}\n"),
            Path::new("s.toml"),
        )
        .unwrap();
        let t = cfg.tune.unwrap();
        assert!(t.allow_truncation);
        assert_eq!(t.settings["rank"].as_integer(), Some(4));
    }

    #[test]
    fn analysis_match_and_sample_seed_are_read_and_checked() {
        let p = Path::new("s.toml");
        let cfg = StudyConfig::parse(
            &format!("[study]\nname = \"t\"\nsample_seed = 7\n[data]\nbase = \"demo:medical\"\n{MODEL}[tune]\nmatch = \"tokens\"\n[analysis]\nrun_sd_points = 4.0\npower = 0.9\n"),
            p,
        )
        .unwrap();
        assert_eq!(cfg.study.sample_seed, 7);
        assert_eq!(cfg.tune.unwrap().match_, TrainMatch::Tokens);
        assert_eq!(cfg.analysis.run_sd_points, Some(4.0));
        assert_eq!(cfg.analysis.power, Some(0.9));
        assert_eq!(cfg.analysis.alpha, None);
        let cfg = StudyConfig::parse(&format!("{MIN}{MODEL}[tune]\n"), p).unwrap();
        assert_eq!(cfg.study.sample_seed, 0);
        assert_eq!(cfg.tune.unwrap().match_, TrainMatch::Steps);
        let e = parse_err("[analysis]\nrun_sd = 4.0\n");
        assert!(e.contains("run_sd"), "{e}");
        let e = parse_err("[tune]\nmatch = \"examples\"\n");
        assert!(e.contains("examples"), "{e}");
        let e = parse_err("[analysis]\nalpha = 1.5\n");
        assert!(e.contains("`analysis.alpha`"), "{e}");
        let e = parse_err("[analysis]\ntrain_tokens_per_s = 0\n");
        assert!(e.contains("`analysis.train_tokens_per_s`"), "{e}");
    }

    #[test]
    fn benign_takes_one_dataset_or_a_list() {
        let p = Path::new("s.toml");
        let one = StudyConfig::parse(&format!("{MIN}{MODEL}[align]\nbenign = \"demo:stem\"\n"), p)
            .unwrap();
        let a = one.align.unwrap();
        assert_eq!(a.benign, vec!["demo:stem"]);
        assert!(!a.allow_truncation);
        let two = StudyConfig::parse(
            &format!("{MIN}{MODEL}[align]\nbenign = [\"demo:stem\", \"demo:overrefusal-answers\"]\nbenign_limit = 5\n"),
            p,
        )
        .unwrap();
        assert_eq!(
            two.align.unwrap().benign,
            vec!["demo:stem", "demo:overrefusal-answers"]
        );
        let per = StudyConfig::parse(
            &format!("{MIN}{MODEL}[align]\nbenign = [\"demo:stem\", \"demo:overrefusal-answers\"]\nbenign_limit = [5, 7]\n"),
            p,
        )
        .unwrap();
        let l = per.align.unwrap().benign_limit.unwrap();
        assert_eq!((l.for_source(0), l.for_source(1)), (Some(5), Some(7)));
        let e = parse_err("[align]\nbenign = [\"demo:stem\"]\nbenign_limit = [5, 7]\n");
        assert!(
            e.contains("`align.benign_limit`: has 2 numbers for 1 benign"),
            "{e}"
        );
        let default = StudyConfig::parse(&format!("{MIN}{MODEL}[align]\n"), p).unwrap();
        assert_eq!(default.align.unwrap().benign, vec!["demo:stem"]);
        let e = parse_err("[align]\nbenign = []\n");
        assert!(e.contains("`align.benign`: needs at least one"), "{e}");
        let e = parse_err("[align]\nbenign = 3\n");
        assert!(
            e.contains("a dataset spec or an array of dataset specs"),
            "{e}"
        );
    }
}
