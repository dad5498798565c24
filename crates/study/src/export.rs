//! `safetune export --to llama-factory|axolotl|trl`: writes the study's dataset variants (and
//! the alignment set, if the study has one) with a training config per variant, made from the
//! study itself: the model is the first `[[models]]` entry's `train_model` (else its spec; an
//! `[export] base_model` overrides it) and the settings are `[tune]`'s (`[align]`'s for the
//! alignment set), written through the same mapping as the external trainer backends
//! ([`crate::external_train::MAPPING`]), so the exported runs train what the study's tune
//! steps train.
//!
//! Layout of the output directory, one folder per variant `NAME/`: `data/` (LLaMA-Factory:
//! `train.json` and `dataset_info.json`; Axolotl: messages JSONL; TRL: prompt-completion
//! JSONL), the config (`train.yaml`; TRL: `trl_args.txt`, its flags) and `output/` for the
//! trainer's adapter; `export.json` lists the variants with their factor levels, files and
//! exact commands.
//!
//! The variants are made by the study's own transform/mix steps (run and cached in
//! `OUT/.study`), so they are the very files a local study would tune on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{StudyConfig, TrainerOptions};
use crate::external_train::{
    command_line, trainer_config, write_data, Backend, ExternalTrain, JobPaths,
};
use crate::plan::{plan, Plan, PlanError};
use crate::runner::{run_plan, RunError, RunEvent};
use crate::stages::builtin_registry;
use crate::step::{StepKind, StepOutput};
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    LlamaFactory,
    Axolotl,
    Trl,
}

impl Target {
    /// The external backend that trains for this target.
    pub fn backend(self) -> Backend {
        match self {
            Target::LlamaFactory => Backend::LlamaFactory,
            Target::Axolotl => Backend::Axolotl,
            Target::Trl => Backend::Trl,
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llama-factory" | "llamafactory" => Ok(Target::LlamaFactory),
            "axolotl" => Ok(Target::Axolotl),
            "trl" => Ok(Target::Trl),
            _ => Err(format!(
                "unknown export target `{s}` (expected llama-factory, axolotl or trl)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("step `{0}` failed: {1}")]
    Step(String, String),
    #[error(transparent)]
    Data(#[from] safetune_data::DataError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The study cannot be written for the target (its model or settings); names the key.
    #[error("`{field}`: {message}")]
    Settings { field: String, message: String },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedVariant {
    pub name: String,
    pub factors: std::collections::BTreeMap<String, String>,
    pub examples: usize,
    pub data: PathBuf,
    pub config: PathBuf,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub target: Target,
    pub out_dir: PathBuf,
    pub variants: Vec<ExportedVariant>,
}

/// A file-name-safe dataset name.
fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Only the dataset-producing steps of a plan (transform, mix, alignment set), reindexed.
fn dataset_plan(full: &Plan) -> Plan {
    let keep: Vec<bool> = full
        .steps
        .iter()
        .map(|s| {
            matches!(
                s.kind(),
                StepKind::Transform | StepKind::Mix | StepKind::AlignData
            )
        })
        .collect();
    let mut new_index = vec![usize::MAX; full.steps.len()];
    let mut steps = Vec::new();
    for (i, s) in full.steps.iter().enumerate() {
        if keep[i] && s.deps.iter().all(|&d| keep[d]) {
            let mut s = s.clone();
            s.deps = s.deps.iter().map(|&d| new_index[d]).collect();
            new_index[i] = steps.len();
            steps.push(s);
        }
    }
    Plan {
        name: full.name.clone(),
        steps,
    }
}

fn variant_name(
    f: &std::collections::BTreeMap<String, String>,
    seeds: usize,
    kind: StepKind,
) -> String {
    if kind == StepKind::AlignData {
        return "alignment".into();
    }
    let mut n = f.get("variant").cloned().unwrap_or_else(|| "data".into());
    if let Some(m) = f.get("mix") {
        let _ = write!(n, "-mix{m}");
    }
    if seeds > 1 {
        let _ = write!(n, "-s{}", f.get("seed").map(String::as_str).unwrap_or("0"));
    }
    safe_name(&n)
}

/// The model the exported configs train: `[export] base_model`, else the first model's
/// `train_model`, else its spec (an `hf:` spec without its prefix).
fn base_model(cfg: &StudyConfig) -> Result<String, ExportError> {
    if let Some(b) = cfg.export.as_ref().and_then(|e| e.base_model.clone()) {
        return Ok(b);
    }
    let bad = |field: &str, message: &str| ExportError::Settings {
        field: field.into(),
        message: message.into(),
    };
    let m = cfg.models.first().ok_or_else(|| {
        bad(
            "models",
            "the study lists no model: add a [[models]] entry with train_model, or set [export] base_model",
        )
    })?;
    if let Some(t) = &m.train_model {
        return Ok(t.clone());
    }
    if m.spec.starts_with("openai:") {
        return Err(bad(
            "models[0].train_model",
            "the model is served over HTTP: set train_model to its Hugging Face id or directory",
        ));
    }
    let spec = crate::config::resolve_model_spec(&m.spec).unwrap_or_else(|_| m.spec.clone());
    Ok(spec.strip_prefix("hf:").map(String::from).unwrap_or(spec))
}

pub fn export(
    cfg: &StudyConfig,
    target: Target,
    out: &Path,
    events: &mut dyn FnMut(&RunEvent),
) -> Result<ExportSummary, ExportError> {
    let backend = target.backend();
    let model = base_model(cfg)?;
    // The trainer options of the study's sections, when they name this backend.
    let section = |t: Option<TrainerOptions<'_>>| -> (toml::Table, Option<String>, toml::Table) {
        match t {
            Some(t) if t.backend == backend => (
                t.settings.clone(),
                t.command.map(String::from),
                t.backend_settings.clone(),
            ),
            Some(t) => (t.settings.clone(), None, toml::Table::new()),
            None => (toml::Table::new(), None, toml::Table::new()),
        }
    };
    let tune = section(cfg.tune.as_ref().map(|t| t.trainer()));
    let align = section(cfg.align.as_ref().map(|a| a.trainer()));
    let template = cfg.export.as_ref().and_then(|e| e.template.clone());
    let full = plan(cfg)?;
    let dplan = dataset_plan(&full);
    std::fs::create_dir_all(out).map_err(|e| ExportError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let out_abs = std::fs::canonicalize(out).map_err(|e| ExportError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let work = out.join(".study");
    let config_json = serde_json::to_value(cfg).unwrap_or_default();
    let summary = run_plan(&dplan, &config_json, &work, &builtin_registry(), events)?;
    if let Some((label, err)) = summary.failed.first() {
        return Err(ExportError::Step(label.clone(), err.clone()));
    }
    let store = Store::open_read_only(&work.join(crate::runner::STORE_FILE))?;
    let keys = crate::runner::step_keys(&dplan);
    let mut variants = Vec::new();
    for (i, s) in dplan.steps.iter().enumerate() {
        let rec = store.step(&keys[i])?;
        let Some(out_json) = rec.and_then(|r| r.output) else {
            continue;
        };
        let Ok(StepOutput::Dataset { path, examples, .. }) =
            serde_json::from_value::<StepOutput>(out_json)
        else {
            continue;
        };
        let name = variant_name(&s.factors, cfg.study.seeds.len(), s.kind());
        let seed: u64 = s
            .factors
            .get("seed")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (sname, (settings, command, mut extra)) = if s.kind() == StepKind::AlignData {
            ("align", align.clone())
        } else {
            ("tune", tune.clone())
        };
        if let Some(t) = &template {
            extra.insert("template".into(), toml::Value::String(t.clone()));
        }
        if backend == Backend::LlamaFactory && !extra.contains_key("template") {
            return Err(ExportError::Settings {
                field: format!("{sname}.backend_settings.template"),
                message: "LLaMA-Factory needs its chat template's name: set [export] template or [tune] backend_settings.template (e.g. \"llama3\", \"qwen\")".into(),
            });
        }
        let ext = ExternalTrain {
            backend,
            command: command
                .or_else(|| backend.default_command().map(String::from))
                .unwrap_or_default(),
            launcher: None,
            env: Default::default(),
            backend_settings: serde_json::to_value(&extra).unwrap_or_default(),
            base_model: model.clone(),
            max_parallel_train: 1,
            shared_dir: None,
        };
        let settings = serde_json::to_value(&settings).unwrap_or_default();
        let paths = JobPaths::new(backend, &out_abs.join(&name));
        write_data(backend, &path, &paths)
            .map_err(|e| ExportError::Step(name.clone(), e.to_string()))?;
        let (text, args) = trainer_config(&ext, &settings, seed, &model, &paths, &s.label)
            .map_err(|e| ExportError::Settings {
                field: format!("{sname}.settings.{}", e.key),
                message: e.message,
            })?;
        write_text(&paths.config, &text)?;
        let command = command_line(&ext, &paths, &model, seed, &name, &args).map_err(|m| {
            ExportError::Settings {
                field: format!("{sname}.command"),
                message: m,
            }
        })?;
        variants.push(ExportedVariant {
            name,
            factors: s.factors.clone(),
            examples,
            data: paths.data.clone(),
            config: paths.config.clone(),
            command,
        });
    }
    let summary = ExportSummary {
        target,
        out_dir: out.to_path_buf(),
        variants,
    };
    write_text(
        &out.join("export.json"),
        &(serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n"),
    )?;
    Ok(summary)
}

fn write_text(path: &Path, text: &str) -> Result<(), ExportError> {
    std::fs::write(path, text).map_err(|e| ExportError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}
