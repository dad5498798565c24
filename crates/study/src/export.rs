//! `safetune export --to llama-factory|axolotl`: writes the study's dataset variants (and the
//! alignment set, if the study has one) with a matching training config per variant, so large
//! models can be tuned on those trainers and evaluated back here by listing the tuned
//! checkpoints as `[[models]]`.
//!
//! Layout of the output directory:
//! - LLaMA-Factory: `data/NAME.json` (OpenAI-style `messages` records), `data/dataset_info.json`,
//!   `NAME.yaml` per variant (`llamafactory-cli train NAME.yaml`);
//! - Axolotl: `data/NAME.jsonl` (`messages` records), `NAME.yaml` with a `chat_template`
//!   dataset (`axolotl train NAME.yaml`);
//! - both: `export.json`, the list of variants with their factor levels, files and commands.
//!
//! The variants are made by the study's own transform/mix steps (run and cached in
//! `OUT/.study`), so they are the very files a local study would tune on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value as Json};

use safetune_data::read::{read_all, ReadOptions};
use safetune_data::Conversation;

use crate::config::{ExportSection, StudyConfig};
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
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llama-factory" | "llamafactory" => Ok(Target::LlamaFactory),
            "axolotl" => Ok(Target::Axolotl),
            _ => Err(format!(
                "unknown export target `{s}` (expected llama-factory or axolotl)"
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

/// A YAML double-quoted scalar (JSON string escapes are valid YAML).
fn q(s: &str) -> String {
    Json::String(s.to_string()).to_string()
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

pub fn export(
    cfg: &StudyConfig,
    target: Target,
    out: &Path,
    events: &mut dyn FnMut(&RunEvent),
) -> Result<ExportSummary, ExportError> {
    let full = plan(cfg)?;
    let dplan = dataset_plan(&full);
    let work = out.join(".study");
    let config_json = serde_json::to_value(cfg).unwrap_or_default();
    let summary = run_plan(&dplan, &config_json, &work, &builtin_registry(), events)?;
    if let Some((label, err)) = summary.failed.first() {
        return Err(ExportError::Step(label.clone(), err.clone()));
    }
    let store = Store::open_read_only(&work.join(crate::runner::STORE_FILE))?;
    let keys = crate::runner::step_keys(&dplan);
    let settings = cfg.export.clone().unwrap_or_default();
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| ExportError::Io {
        path: data_dir.clone(),
        source: e,
    })?;
    let mut variants = Vec::new();
    let mut dataset_info = serde_json::Map::new();
    // A dataset step that feeds a mix step at level 0 is exported once, under its own name.
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
        let (convs, _) = read_all(&path, &ReadOptions::default())?;
        let (data, config, command) = match target {
            Target::LlamaFactory => {
                let file = data_dir.join(format!("{name}.json"));
                let records: Vec<Json> = convs.iter().map(messages_record).collect();
                write_text(
                    &file,
                    &(serde_json::to_string_pretty(&records).unwrap_or_default() + "\n"),
                )?;
                dataset_info.insert(
                    name.clone(),
                    json!({
                        "file_name": format!("{name}.json"),
                        "formatting": "sharegpt",
                        "columns": {"messages": "messages"},
                        "tags": {
                            "role_tag": "role",
                            "content_tag": "content",
                            "user_tag": "user",
                            "assistant_tag": "assistant",
                            "system_tag": "system"
                        }
                    }),
                );
                let yaml = llama_factory_yaml(&name, &s.label, seed, &settings);
                let cfg_path = out.join(format!("{name}.yaml"));
                write_text(&cfg_path, &yaml)?;
                (
                    file,
                    cfg_path,
                    format!("llamafactory-cli train {name}.yaml"),
                )
            }
            Target::Axolotl => {
                let file = data_dir.join(format!("{name}.jsonl"));
                let mut text = String::new();
                for c in &convs {
                    text.push_str(&messages_record(c).to_string());
                    text.push('\n');
                }
                write_text(&file, &text)?;
                let yaml = axolotl_yaml(&name, &s.label, seed, &settings);
                let cfg_path = out.join(format!("{name}.yaml"));
                write_text(&cfg_path, &yaml)?;
                (file, cfg_path, format!("axolotl train {name}.yaml"))
            }
        };
        variants.push(ExportedVariant {
            name,
            factors: s.factors.clone(),
            examples,
            data,
            config,
            command,
        });
    }
    if target == Target::LlamaFactory {
        let p = data_dir.join("dataset_info.json");
        write_text(
            &p,
            &(serde_json::to_string_pretty(&Json::Object(dataset_info)).unwrap_or_default() + "\n"),
        )?;
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

/// `{"messages": [{"role", "content"}, ...]}`.
fn messages_record(c: &Conversation) -> Json {
    json!({
        "messages": c.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>()
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), ExportError> {
    std::fs::write(path, text).map_err(|e| ExportError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

fn llama_factory_yaml(name: &str, label: &str, seed: u64, s: &ExportSection) -> String {
    format!(
        "# Written by safetune export for: {label}\n\
         # Run from this directory: llamafactory-cli train {name}.yaml\n\
         ### model\n\
         model_name_or_path: {model}\n\
         \n\
         ### method\n\
         stage: sft\n\
         do_train: true\n\
         finetuning_type: lora\n\
         lora_rank: {rank}\n\
         lora_alpha: {alpha}\n\
         lora_target: all\n\
         \n\
         ### dataset\n\
         dataset: {dataset}\n\
         dataset_dir: data\n\
         template: {template}\n\
         cutoff_len: {cutoff}\n\
         overwrite_cache: true\n\
         preprocessing_num_workers: 8\n\
         \n\
         ### output\n\
         output_dir: {output}\n\
         logging_steps: 10\n\
         save_strategy: epoch\n\
         plot_loss: true\n\
         overwrite_output_dir: true\n\
         \n\
         ### train\n\
         per_device_train_batch_size: {mbs}\n\
         gradient_accumulation_steps: {ga}\n\
         learning_rate: {lr}\n\
         num_train_epochs: {epochs:?}\n\
         lr_scheduler_type: cosine\n\
         warmup_ratio: 0.1\n\
         bf16: true\n\
         seed: {seed}\n",
        model = q(&s.base_model),
        rank = s.lora_rank,
        alpha = s.lora_alpha,
        dataset = q(name),
        template = q(&s.template),
        cutoff = s.sequence_len,
        output = q(&format!("saves/{name}")),
        mbs = s.micro_batch_size,
        ga = s.gradient_accumulation_steps,
        lr = s.learning_rate,
        epochs = s.epochs,
    )
}

fn axolotl_yaml(name: &str, label: &str, seed: u64, s: &ExportSection) -> String {
    format!(
        "# Written by safetune export for: {label}\n\
         # Run from this directory: axolotl train {name}.yaml\n\
         base_model: {model}\n\
         chat_template: tokenizer_default\n\
         datasets:\n\
         \x20 - path: {path}\n\
         \x20   type: chat_template\n\
         \x20   field_messages: messages\n\
         \x20   message_property_mappings:\n\
         \x20     role: role\n\
         \x20     content: content\n\
         \x20   roles_to_train:\n\
         \x20     - assistant\n\
         dataset_prepared_path: {prepared}\n\
         val_set_size: 0.0\n\
         output_dir: {output}\n\
         \n\
         adapter: lora\n\
         lora_r: {rank}\n\
         lora_alpha: {alpha}\n\
         lora_dropout: 0.05\n\
         lora_target_linear: true\n\
         \n\
         sequence_len: {seq}\n\
         sample_packing: false\n\
         micro_batch_size: {mbs}\n\
         gradient_accumulation_steps: {ga}\n\
         num_epochs: {epochs:?}\n\
         learning_rate: {lr}\n\
         optimizer: adamw_torch\n\
         lr_scheduler: cosine\n\
         warmup_ratio: 0.1\n\
         bf16: auto\n\
         seed: {seed}\n",
        model = q(&s.base_model),
        path = q(&format!("data/{name}.jsonl")),
        prepared = q(&format!("prepared/{name}")),
        output = q(&format!("outputs/{name}")),
        rank = s.lora_rank,
        alpha = s.lora_alpha,
        seq = s.sequence_len,
        mbs = s.micro_batch_size,
        ga = s.gradient_accumulation_steps,
        lr = s.learning_rate,
        epochs = s.epochs,
    )
}
