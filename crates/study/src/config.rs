//! The study config (`safetune study CONFIG.toml`): a TOML file, every key documented in
//! `examples/quickstart.toml` and `examples/paper-factors.toml`. Unknown keys are rejected with
//! their name and line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySection {
    pub name: String,
    /// Training / transform seeds; each is a level of the `seed` factor.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Seed of the train/test split of every benchmark.
    #[serde(default)]
    pub split_seed: u64,
    /// Share of each benchmark in the test split.
    #[serde(default = "half")]
    pub test_fraction: f64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    Keep,
    Add,
    Remove,
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
    #[serde(default)]
    pub design: Design,
}

impl Default for FactorsSection {
    fn default() -> Self {
        FactorsSection {
            structure: keep_structure(),
            identity: keep_toggle(),
            roleplay: keep_toggle(),
            persona_type: professional(),
            placement: system(),
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
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeKind {
    /// Refusal phrases (built in, or a phrase file in `settings.phrases`; a baseline).
    Keyword,
    /// The refusal classifier (MiniLM features and the shipped head, or `settings.head`).
    Classifier,
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
    /// Rows per store transaction (0: the backend's batch size).
    #[serde(default)]
    pub chunk_size: usize,
}

impl Default for GenerationSection {
    fn default() -> Self {
        GenerationSection {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            chunk_size: 0,
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
    /// Harmful prompts; only their train split is used.
    #[serde(default = "default_harmful")]
    pub harmful: String,
    /// Benign examples with helpful answers.
    #[serde(default = "default_benign")]
    pub benign: String,
    pub harmful_limit: Option<usize>,
    pub benign_limit: Option<usize>,
    /// Training settings passed to the trainer as they are (epochs, lr, lora_rank, ...).
    #[serde(default)]
    pub settings: toml::Table,
}

fn default_refusals() -> String {
    "demo:refusals".into()
}
fn default_harmful() -> String {
    "advbench".into()
}
fn default_benign() -> String {
    "demo:stem".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneSection {
    #[serde(default)]
    pub settings: toml::Table,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// The base model the exported trainer configs tune (a hub name or path).
    pub base_model: String,
    /// LLaMA-Factory chat template name.
    #[serde(default = "default_template")]
    pub template: String,
    #[serde(default = "default_rank")]
    pub lora_rank: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    #[serde(default = "default_seq")]
    pub sequence_len: usize,
    #[serde(default = "default_mbs")]
    pub micro_batch_size: usize,
    #[serde(default = "default_ga")]
    pub gradient_accumulation_steps: usize,
}

fn default_template() -> String {
    "llama3".into()
}
fn default_rank() -> usize {
    8
}
fn default_alpha() -> usize {
    16
}
fn default_lr() -> f64 {
    1e-4
}
fn default_epochs() -> f64 {
    3.0
}
fn default_seq() -> usize {
    2048
}
fn default_mbs() -> usize {
    4
}
fn default_ga() -> usize {
    4
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection {
            base_model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            template: default_template(),
            lora_rank: default_rank(),
            lora_alpha: default_alpha(),
            learning_rate: default_lr(),
            epochs: default_epochs(),
            sequence_len: default_seq(),
            micro_batch_size: default_mbs(),
            gradient_accumulation_steps: default_ga(),
        }
    }
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
        Ok(cfg)
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
}
