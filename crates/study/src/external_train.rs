//! External trainer backends of `[align]`/`[tune]` (`backend = "llama-factory" | "axolotl" |
//! "trl" | "command"`): the step writes its dataset in the trainer's format and a trainer
//! config, runs the command (`sh -c`, with `launcher` in front and `env` applied), keeps the
//! trainer's output in `trainer.log`, records exit code and wall time in `trainer.json`, and
//! takes the PEFT adapter (or full checkpoint) the trainer wrote in `{output_dir}` as the step's
//! output once it is validated and hashed into the store.
//!
//! One table ([`MAPPING`]) says how each trainer-neutral setting (safetune-train's
//! [`TuneConfig`] keys) is written for each trainer; a key without an equivalent is refused
//! when the config is loaded, naming key and backend.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use safetune_data::read::{read_all, ReadOptions};
use safetune_data::Conversation;
use safetune_train::config::Schedule;
use safetune_train::TuneConfig;

use crate::step::*;

/// Who trains an align or tune step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// safetune-train, in process (the default).
    #[default]
    Local,
    LlamaFactory,
    Axolotl,
    Trl,
    /// Any command; `{config}` is a safetune-train config file (`safetune tune --config`).
    Command,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::LlamaFactory => "llama-factory",
            Backend::Axolotl => "axolotl",
            Backend::Trl => "trl",
            Backend::Command => "command",
        }
    }

    /// The command template used when `command` is not given (`None`: `command` is required).
    pub fn default_command(self) -> Option<&'static str> {
        match self {
            Backend::LlamaFactory => Some("llamafactory-cli train {config}"),
            Backend::Axolotl => Some("axolotl train {config}"),
            Backend::Trl => Some("trl sft {args}"),
            Backend::Local | Backend::Command => None,
        }
    }
}

/// The placeholders of `command` and `launcher`. `{{` and `}}` are literal braces.
pub const PLACEHOLDERS: &[&str] = &[
    "config",
    "data",
    "data_dir",
    "output_dir",
    "base_model",
    "seed",
    "name",
    "step_dir",
    "args",
];

/// Checks a command template: every `{...}` names a known placeholder. The error names the
/// unknown one.
pub fn check_template(text: &str) -> Result<(), String> {
    render(text, &|_| Some(String::new())).map(|_| ())
}

/// Fills a template; `value` gives a placeholder's text (`None`: unknown).
fn render(text: &str, value: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if c == b'}' {
            if let Some(r) = after.strip_prefix('}') {
                out.push('}');
                rest = r;
                continue;
            }
            return Err("a lone `}` (write `}}` for a literal brace)".into());
        }
        if let Some(r) = after.strip_prefix('{') {
            out.push('{');
            rest = r;
            continue;
        }
        let end = after
            .find('}')
            .ok_or_else(|| "an unclosed `{` (write `{{` for a literal brace)".to_string())?;
        let name = &after[..end];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder `{{{name}}}` (known: {})",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.push_str(&value(name).unwrap_or_default());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A word quoted for `sh` when it needs it.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// How one trainer-neutral setting is written for a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map1 {
    /// Under this key (YAML) or flag (`--KEY`, TRL).
    Key(&'static str),
    /// No equivalent: a config that sets it is refused for this backend, with this reason.
    Refused(&'static str),
}

/// One row of [`MAPPING`].
#[derive(Debug, Clone, Copy)]
pub struct MapRow {
    pub setting: &'static str,
    /// Written from safetune-train's default when the settings leave it out (so every backend
    /// trains what the local trainer would); other keys only when set.
    pub always: bool,
    pub llama_factory: Map1,
    pub axolotl: Map1,
    pub trl: Map1,
}

const NO_ANCHOR: Map1 =
    Map1::Refused("anchored tuning (a KL term to a reference model) is safetune-train's own");
const NO_CHUNK: Map1 = Map1::Refused("a setting of safetune-train's fused loss kernel");

const NO_QUANTIZED: Map1 = Map1::Refused(
    "safetune-train's GGUF-block base; set the trainer's own quantization in backend_settings (LLaMA-Factory `quantization_bit`, Axolotl `load_in_4bit`/`load_in_8bit`, TRL `load_in_4bit`)",
);

const fn row(setting: &'static str, always: bool, lf: Map1, ax: Map1, trl: Map1) -> MapRow {
    MapRow {
        setting,
        always,
        llama_factory: lf,
        axolotl: ax,
        trl,
    }
}

use Map1::Key as K;

/// Every trainer setting (safetune-train's keys but model, data and output, which the step
/// sets) and what it becomes in LLaMA-Factory's YAML, Axolotl's YAML and `trl sft`'s flags.
pub const MAPPING: &[MapRow] = &[
    row(
        "full",
        true,
        K("finetuning_type"),
        K("adapter"),
        K("use_peft"),
    ),
    row("rank", true, K("lora_rank"), K("lora_r"), K("lora_r")),
    row(
        "alpha",
        true,
        K("lora_alpha"),
        K("lora_alpha"),
        K("lora_alpha"),
    ),
    row(
        "dropout",
        true,
        K("lora_dropout"),
        K("lora_dropout"),
        K("lora_dropout"),
    ),
    row(
        "targets",
        true,
        K("lora_target"),
        K("lora_target_modules"),
        K("lora_target_modules"),
    ),
    row(
        "epochs",
        true,
        K("num_train_epochs"),
        K("num_epochs"),
        K("num_train_epochs"),
    ),
    row(
        "max_steps",
        false,
        K("max_steps"),
        K("max_steps"),
        K("max_steps"),
    ),
    row(
        "lr",
        true,
        K("learning_rate"),
        K("learning_rate"),
        K("learning_rate"),
    ),
    row(
        "warmup_steps",
        true,
        K("warmup_steps"),
        K("warmup_steps"),
        K("warmup_steps"),
    ),
    row(
        "schedule",
        true,
        K("lr_scheduler_type"),
        K("lr_scheduler"),
        K("lr_scheduler_type"),
    ),
    row(
        "weight_decay",
        true,
        K("weight_decay"),
        K("weight_decay"),
        K("weight_decay"),
    ),
    row(
        "max_grad_norm",
        true,
        K("max_grad_norm"),
        K("max_grad_norm"),
        K("max_grad_norm"),
    ),
    row(
        "batch_size",
        true,
        K("per_device_train_batch_size"),
        K("micro_batch_size"),
        K("per_device_train_batch_size"),
    ),
    row(
        "grad_accum",
        true,
        K("gradient_accumulation_steps"),
        K("gradient_accumulation_steps"),
        K("gradient_accumulation_steps"),
    ),
    row(
        "max_len",
        true,
        K("cutoff_len"),
        K("sequence_len"),
        K("max_length"),
    ),
    row(
        "packing",
        true,
        K("packing"),
        K("sample_packing"),
        K("packing"),
    ),
    row("seed", true, K("seed"), K("seed"), K("seed")),
    row(
        "eval_fraction",
        false,
        K("val_size"),
        K("val_set_size"),
        Map1::Refused(
            "`trl sft` evaluates a dataset's test split; the step writes one train split",
        ),
    ),
    row(
        "eval_every",
        false,
        K("eval_steps"),
        K("eval_steps"),
        Map1::Refused(
            "`trl sft` evaluates a dataset's test split; the step writes one train split",
        ),
    ),
    row(
        "save_every",
        false,
        K("save_steps"),
        K("save_steps"),
        K("save_steps"),
    ),
    row(
        "keep_checkpoints",
        false,
        K("save_total_limit"),
        K("save_total_limit"),
        K("save_total_limit"),
    ),
    row("loss_chunk", false, NO_CHUNK, NO_CHUNK, NO_CHUNK),
    row(
        "recompute",
        false,
        K("disable_gradient_checkpointing"),
        K("gradient_checkpointing"),
        K("gradient_checkpointing"),
    ),
    row("bf16", false, K("bf16"), K("bf16"), K("bf16")),
    row("quantized", false, NO_QUANTIZED, NO_QUANTIZED, NO_QUANTIZED),
    row("anchor", false, NO_ANCHOR, NO_ANCHOR, NO_ANCHOR),
    row("anchor_beta", false, NO_ANCHOR, NO_ANCHOR, NO_ANCHOR),
    row("anchor_data", false, NO_ANCHOR, NO_ANCHOR, NO_ANCHOR),
    row("anchor_batch_size", false, NO_ANCHOR, NO_ANCHOR, NO_ANCHOR),
];

impl MapRow {
    pub fn for_backend(&self, b: Backend) -> Option<Map1> {
        match b {
            Backend::LlamaFactory => Some(self.llama_factory),
            Backend::Axolotl => Some(self.axolotl),
            Backend::Trl => Some(self.trl),
            Backend::Local | Backend::Command => None,
        }
    }
}

/// A setting that a backend cannot take.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub key: String,
    pub message: String,
}

/// The module names of safetune-train's targets.
fn module_name(t: &str) -> String {
    match t {
        "q" | "k" | "v" | "o" => format!("{t}_proj"),
        other => format!("{other}_proj"),
    }
}

/// The trainer's keys and values for `settings` (safetune-train keys) on `backend`: every
/// setting either maps or is an error naming it. Keys with `always` are written with
/// safetune-train's defaults when the settings leave them out.
pub fn map_settings(
    backend: Backend,
    settings: &toml::Table,
) -> Result<Vec<(&'static str, Json)>, MapError> {
    let cfg = TuneConfig::from_settings(settings).map_err(|e| MapError {
        key: e.key().to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for key in settings.keys() {
        if !MAPPING.iter().any(|r| r.setting == key) {
            return Err(MapError {
                key: key.clone(),
                message: format!(
                    "has no entry in the trainer mapping for `{}`",
                    backend.as_str()
                ),
            });
        }
    }
    let targets: Vec<String> = cfg
        .targets
        .iter()
        .map(|t| {
            module_name(
                &serde_json::to_value(t)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            )
        })
        .collect();
    for r in MAPPING {
        let set = settings.contains_key(r.setting);
        if !(set || r.always) {
            continue;
        }
        let Some(m) = r.for_backend(backend) else {
            continue;
        };
        let name = match m {
            Map1::Key(k) => k,
            Map1::Refused(why) => {
                return Err(MapError {
                    key: r.setting.to_string(),
                    message: format!("has no equivalent in `{}`: {why}", backend.as_str()),
                })
            }
        };
        let lora = !cfg.full;
        let v: Option<Json> = match r.setting {
            "full" => match backend {
                Backend::LlamaFactory => Some(json!(if cfg.full { "full" } else { "lora" })),
                Backend::Axolotl => lora.then_some(json!("lora")),
                _ => lora.then_some(json!(true)),
            },
            "rank" => lora.then(|| json!(cfg.rank)),
            "alpha" if lora => {
                if cfg.alpha.fract() != 0.0 || cfg.alpha < 0.0 {
                    return Err(MapError {
                        key: "alpha".into(),
                        message: format!(
                            "{} is not a whole number, and `{}` takes lora_alpha as an integer",
                            cfg.alpha,
                            backend.as_str()
                        ),
                    });
                }
                Some(json!(cfg.alpha as i64))
            }
            "alpha" => None,
            "dropout" => lora.then(|| json!(cfg.dropout as f64)),
            "targets" if lora => Some(match backend {
                Backend::LlamaFactory => json!(targets.join(",")),
                _ => json!(targets),
            }),
            "targets" => None,
            "epochs" => Some(json!(cfg.epochs)),
            "max_steps" => (cfg.max_steps > 0).then(|| json!(cfg.max_steps)),
            "lr" => Some(json!(cfg.lr)),
            "warmup_steps" => Some(json!(cfg.warmup_steps)),
            "schedule" => Some(json!(match cfg.schedule {
                Schedule::Cosine => "cosine",
                Schedule::Linear => "linear",
                Schedule::Constant if cfg.warmup_steps > 0 => "constant_with_warmup",
                Schedule::Constant => "constant",
            })),
            "weight_decay" => Some(json!(cfg.weight_decay)),
            "max_grad_norm" => Some(json!(cfg.max_grad_norm)),
            "batch_size" => Some(json!(cfg.batch_size)),
            "grad_accum" => Some(json!(cfg.grad_accum)),
            "max_len" => Some(json!(cfg.max_len)),
            "packing" => Some(json!(cfg.packing)),
            "seed" => Some(json!(cfg.seed)),
            "eval_fraction" => Some(json!(cfg.eval_fraction)),
            "eval_every" => (cfg.eval_every > 0).then(|| json!(cfg.eval_every)),
            "save_every" => (cfg.save_every > 0).then(|| json!(cfg.save_every)),
            "keep_checkpoints" => Some(json!(cfg.keep_checkpoints)),
            "bf16" => Some(json!(cfg.bf16)),
            "recompute" => Some(json!(match backend {
                Backend::LlamaFactory => !cfg.recompute,
                _ => cfg.recompute,
            })),
            _ => None,
        };
        if let Some(v) = v {
            out.push((name, v));
        }
    }
    Ok(out)
}

/// What an external align/tune step runs (part of its [`StepSpec`]). `command`, `launcher`,
/// `env`, `max_parallel_train` and `shared_dir` say where and how, not what (that is the
/// backend, the settings, `backend_settings`, the model and the data): they are left out of
/// the step's key, so fixing a command reruns only the steps without a finished output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExternalTrain {
    pub backend: Backend,
    /// The command template (the backend's default when the config gives none).
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Written into the trainer's config as they are (TRL: as `--KEY VALUE` flags).
    #[serde(default)]
    pub backend_settings: Json,
    /// `{base_model}`: the trainer's view of the model (`[[models]] train_model`, else its
    /// spec). An aligned model is its align step's merged directory instead.
    pub base_model: String,
    #[serde(default = "one")]
    pub max_parallel_train: usize,
    /// Where the trainer's inputs and outputs go (`[study] shared_dir`), else the step folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_dir: Option<PathBuf>,
}

fn one() -> usize {
    1
}

/// The fields of [`ExternalTrain`] that are not part of a step's key.
pub const UNKEYED: &[&str] = &[
    "command",
    "launcher",
    "env",
    "max_parallel_train",
    "shared_dir",
];

/// The files of one external training run.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPaths {
    /// Folder of the trainer's inputs and outputs (the step folder, or under `shared_dir`).
    pub work: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    pub data_dir: PathBuf,
    pub output_dir: PathBuf,
}

impl JobPaths {
    pub fn new(backend: Backend, work: &Path) -> JobPaths {
        let data_dir = work.join("data");
        let (config, data) = match backend {
            Backend::LlamaFactory => (work.join("train.yaml"), data_dir.join("train.json")),
            Backend::Axolotl => (work.join("train.yaml"), data_dir.join("train.jsonl")),
            Backend::Trl => (work.join("trl_args.txt"), data_dir.join("train.jsonl")),
            Backend::Local | Backend::Command => {
                (work.join("train.toml"), data_dir.join("train.jsonl"))
            }
        };
        JobPaths {
            work: work.to_path_buf(),
            config,
            data,
            data_dir,
            output_dir: work.join("output"),
        }
    }
}

/// A YAML line per key: values in JSON's flow syntax, which YAML reads as the same values.
fn yaml(map: &Map<String, Json>, header: &str) -> String {
    let mut o = String::new();
    for l in header.lines() {
        let _ = writeln!(o, "# {l}");
    }
    for (k, v) in map {
        let _ = writeln!(o, "{k}: {v}");
    }
    o
}

fn settings_table(settings: &Json) -> toml::Table {
    match toml::Value::try_from(settings) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

fn with_seed(settings: &Json, seed: u64) -> toml::Table {
    let mut t = settings_table(settings);
    t.entry("seed").or_insert(toml::Value::Integer(seed as i64));
    t
}

/// The trainer config (file text) and, for TRL, the flags of `{args}`.
pub fn trainer_config(
    ext: &ExternalTrain,
    settings: &Json,
    seed: u64,
    base_model: &str,
    paths: &JobPaths,
    name: &str,
) -> Result<(String, String), MapError> {
    let table = with_seed(settings, seed);
    let header = format!("Written by safetune for: {name}");
    let extra = ext
        .backend_settings
        .as_object()
        .cloned()
        .unwrap_or_default();
    let p = |x: &Path| x.display().to_string();
    match ext.backend {
        Backend::LlamaFactory => {
            let mut m = Map::new();
            m.insert("model_name_or_path".into(), json!(base_model));
            m.insert("stage".into(), json!("sft"));
            m.insert("do_train".into(), json!(true));
            for (k, v) in map_settings(ext.backend, &table)? {
                m.insert(k.into(), v);
            }
            if m.get("finetuning_type") == Some(&json!("lora")) {
                m.entry("lora_target").or_insert(json!("all"));
            }
            if m.contains_key("eval_steps") {
                m.insert("eval_strategy".into(), json!("steps"));
            }
            if m.contains_key("save_steps") {
                m.insert("save_strategy".into(), json!("steps"));
            }
            m.insert("dataset".into(), json!("train"));
            m.insert("dataset_dir".into(), json!(p(&paths.data_dir)));
            m.insert("output_dir".into(), json!(p(&paths.output_dir)));
            m.insert("overwrite_output_dir".into(), json!(true));
            m.insert("report_to".into(), json!("none"));
            m.extend(extra);
            Ok((yaml(&m, &header), String::new()))
        }
        Backend::Axolotl => {
            let mut m = Map::new();
            m.insert("base_model".into(), json!(base_model));
            m.insert("chat_template".into(), json!("tokenizer_default"));
            m.insert(
                "datasets".into(),
                json!([{
                    "path": p(&paths.data),
                    "ds_type": "json",
                    "type": "chat_template",
                    "field_messages": "messages",
                    "message_property_mappings": {"role": "role", "content": "content"},
                    "roles_to_train": ["assistant"]
                }]),
            );
            m.insert(
                "dataset_prepared_path".into(),
                json!(p(&paths.work.join("prepared"))),
            );
            m.insert("val_set_size".into(), json!(0.0));
            m.insert("output_dir".into(), json!(p(&paths.output_dir)));
            m.insert("optimizer".into(), json!("adamw_torch"));
            for (k, v) in map_settings(ext.backend, &table)? {
                m.insert(k.into(), v);
            }
            m.extend(extra);
            Ok((yaml(&m, &header), String::new()))
        }
        Backend::Trl => {
            let mut flags: Vec<(String, Json)> = vec![
                ("model_name_or_path".into(), json!(base_model)),
                ("dataset_name".into(), json!(p(&paths.data_dir))),
                ("output_dir".into(), json!(p(&paths.output_dir))),
                ("report_to".into(), json!("none")),
            ];
            let mapped = map_settings(ext.backend, &table)?;
            if mapped.iter().any(|(k, _)| *k == "save_steps") {
                flags.push(("save_strategy".into(), json!("steps")));
            }
            flags.extend(mapped.into_iter().map(|(k, v)| (k.to_string(), v)));
            flags.extend(extra);
            let args = trl_flags(&flags);
            Ok((args.clone() + "\n", args))
        }
        Backend::Command | Backend::Local => {
            let mut t = table;
            t.insert("model".into(), toml::Value::String(base_model.into()));
            t.insert("data".into(), toml::Value::String(p(&paths.data)));
            t.insert("output".into(), toml::Value::String(p(&paths.output_dir)));
            if let Ok(toml::Value::Table(x)) = toml::Value::try_from(&ext.backend_settings) {
                t.extend(x);
            }
            let text = format!(
                "# {header}\n{}",
                toml::to_string(&t).map_err(|e| MapError {
                    key: String::new(),
                    message: e.to_string()
                })?
            );
            Ok((text, String::new()))
        }
    }
}

/// `--KEY VALUE` per flag: booleans as `true`/`false`, lists as several words.
fn trl_flags(flags: &[(String, Json)]) -> String {
    let mut words = Vec::new();
    for (k, v) in flags {
        words.push(format!("--{k}"));
        match v {
            Json::String(s) => words.push(sh_quote(s)),
            Json::Array(a) => words.extend(a.iter().map(|x| match x {
                Json::String(s) => sh_quote(s),
                o => sh_quote(&o.to_string()),
            })),
            o => words.push(sh_quote(&o.to_string())),
        }
    }
    words.join(" ")
}

/// The full shell command of a step (launcher in front, placeholders filled).
pub fn command_line(
    ext: &ExternalTrain,
    paths: &JobPaths,
    base_model: &str,
    seed: u64,
    name: &str,
    args: &str,
) -> Result<String, String> {
    let value = |p: &str| -> Option<String> {
        Some(match p {
            "config" => sh_quote(&paths.config.display().to_string()),
            "data" => sh_quote(&paths.data.display().to_string()),
            "data_dir" => sh_quote(&paths.data_dir.display().to_string()),
            "output_dir" => sh_quote(&paths.output_dir.display().to_string()),
            "base_model" => sh_quote(base_model),
            "seed" => seed.to_string(),
            "name" => sh_quote(name),
            "step_dir" => sh_quote(&paths.work.display().to_string()),
            "args" => args.to_string(),
            _ => return None,
        })
    };
    let cmd = render(&ext.command, &value)?;
    Ok(match &ext.launcher {
        Some(l) if !l.trim().is_empty() => format!("{} {cmd}", render(l, &value)?),
        _ => cmd,
    })
}

/// A name for the run: the step's label, file-name safe.
pub fn run_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `{"messages": [...]}` per conversation.
fn messages_record(c: &Conversation) -> Json {
    json!({"messages": c.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>()})
}

/// The conversational prompt-completion record TRL trains on the completion of: the turns
/// before the last answer as the prompt, the last answer as the completion (safetune-train
/// and the other trainers also put the loss on the answers only).
fn prompt_completion_record(c: &Conversation) -> Json {
    let msgs: Vec<Json> = c
        .messages
        .iter()
        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    let split = msgs.len().saturating_sub(1);
    json!({"prompt": msgs[..split], "completion": msgs[split..]})
}

/// Writes the step's data for the trainer: LLaMA-Factory a JSON array and its
/// `dataset_info.json`; Axolotl and `command` messages JSONL; TRL prompt-completion JSONL.
pub fn write_data(backend: Backend, src: &Path, paths: &JobPaths) -> Result<usize, StageError> {
    let (convs, _) = read_all(src, &ReadOptions::default())?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| StageError::Io { path: p, source: e }
    };
    std::fs::create_dir_all(&paths.data_dir).map_err(io(&paths.data_dir))?;
    let text = match backend {
        Backend::LlamaFactory => {
            let info = json!({"train": {
                "file_name": "train.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}
            }});
            let p = paths.data_dir.join("dataset_info.json");
            std::fs::write(
                &p,
                serde_json::to_string_pretty(&info).unwrap_or_default() + "\n",
            )
            .map_err(io(&p))?;
            let recs: Vec<Json> = convs.iter().map(messages_record).collect();
            serde_json::to_string(&recs).unwrap_or_default() + "\n"
        }
        Backend::Trl => convs
            .iter()
            .map(|c| prompt_completion_record(c).to_string() + "\n")
            .collect(),
        _ => convs
            .iter()
            .map(|c| messages_record(c).to_string() + "\n")
            .collect(),
    };
    std::fs::write(&paths.data, text).map_err(io(&paths.data))?;
    Ok(convs.len())
}

/// What `trainer.json` records of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerRun {
    pub backend: Backend,
    pub command: String,
    /// `None` when the trainer was killed by a signal.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub wall_s: f64,
    /// When the command started (seconds since the Unix epoch).
    #[serde(default)]
    pub started_unix_s: f64,
    pub log: PathBuf,
    pub output_dir: PathBuf,
    /// Content hash of the adapter (or checkpoint) files, once validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_hash: Option<String>,
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The expected (out, in) of a module's weight in a model with config `c`.
fn module_dims(c: &safetune_model::config::Config, module: &str) -> Option<(usize, usize)> {
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let last = module.rsplit('.').next()?;
    Some(match last {
        "q_proj" => (q, c.hidden_size),
        "k_proj" | "v_proj" => (kv, c.hidden_size),
        "o_proj" => (c.hidden_size, q),
        "gate_proj" | "up_proj" => (c.intermediate_size, c.hidden_size),
        "down_proj" => (c.hidden_size, c.intermediate_size),
        _ => return None,
    })
}

/// The config of a local model (a Hugging Face directory or a .gguf file); `None` otherwise.
fn local_config(spec: &str) -> Option<safetune_model::config::Config> {
    let p = Path::new(spec);
    if p.is_dir() && p.join("config.json").is_file() {
        return safetune_model::config::Config::from_hf_file(&p.join("config.json")).ok();
    }
    if p.is_file() && spec.ends_with(".gguf") {
        return safetune_model::gguf::GgufFile::open(p).ok()?.config().ok();
    }
    None
}

/// Checks what the trainer wrote in `out` and returns its content hash: a LoRA adapter whose
/// rank and alpha are the configured ones, whose base is `base_model` (when it names one) and
/// whose tensor shapes fit `shapes_of` (a local model's config); or, for full tuning, a model
/// directory with `config.json` and safetensors weights.
pub fn validate_output(
    out: &Path,
    cfg: &TuneConfig,
    base_model: &str,
    shapes_of: Option<&safetune_model::config::Config>,
) -> Result<String, String> {
    let mut files: Vec<PathBuf> = Vec::new();
    if cfg.full {
        if !out.join("config.json").is_file() {
            return Err(format!(
                "{}: no config.json (a full checkpoint was expected)",
                out.display()
            ));
        }
        files.push(out.join("config.json"));
        let mut w: Vec<PathBuf> = std::fs::read_dir(out)
            .map_err(|e| format!("{}: {e}", out.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if w.is_empty() {
            return Err(format!("{}: no .safetensors weights", out.display()));
        }
        w.sort();
        files.extend(w);
    } else {
        let cfg_file = out.join(safetune_model::adapter::CONFIG_FILE);
        if !cfg_file.is_file() {
            return Err(format!(
                "{}: no adapter_config.json (the trainer wrote no PEFT adapter there)",
                out.display()
            ));
        }
        let a = safetune_model::adapter::Adapter::load(out).map_err(|e| e.to_string())?;
        if a.config.r != cfg.rank {
            return Err(format!(
                "{}: r = {}, but the settings give rank = {}",
                cfg_file.display(),
                a.config.r,
                cfg.rank
            ));
        }
        if (a.config.lora_alpha - cfg.alpha).abs() > 1e-6 {
            return Err(format!(
                "{}: lora_alpha = {}, but the settings give alpha = {}",
                cfg_file.display(),
                a.config.lora_alpha,
                cfg.alpha
            ));
        }
        if let Some(b) = a.config.base_model_name_or_path.as_deref() {
            let same = b == base_model
                || (Path::new(b).exists()
                    && Path::new(base_model).exists()
                    && std::fs::canonicalize(b).ok() == std::fs::canonicalize(base_model).ok());
            if !same && !b.is_empty() {
                return Err(format!(
                    "{}: base_model_name_or_path is `{b}`, but the step trained `{base_model}`",
                    cfg_file.display()
                ));
            }
        }
        if let Some(c) = shapes_of {
            for (module, pair) in &a.tensors {
                let Some((o, i)) = module_dims(c, module) else {
                    continue;
                };
                let r = pair.rank();
                let (ad, bd) = (pair.a.dims().to_vec(), pair.b.dims().to_vec());
                if ad != [r, i] || bd != [o, r] {
                    return Err(format!(
                        "{}: `{module}` has A {ad:?} and B {bd:?}, but the model's layer is {o} x {i} (expected A [{r}, {i}], B [{o}, {r}])",
                        out.display()
                    ));
                }
            }
            if a.tensors.is_empty() {
                return Err(format!("{}: the adapter holds no tensors", out.display()));
            }
        }
        files.push(cfg_file);
        files.push(out.join("adapter_model.safetensors"));
    }
    let mut all = String::new();
    for f in &files {
        let h = crate::hash::hash_file(f).map_err(|e| format!("{}: {e}", f.display()))?;
        all.push_str(&h);
    }
    Ok(crate::hash::hash_bytes(all.as_bytes()))
}

/// Runs an external align/tune step; returns the trained model (`align`: the adapter merged into
/// a local base) like the local trainer does.
pub fn run_external(
    step: &PlannedStep,
    inputs: &[StepOutput],
    ctx: &mut StepContext<'_>,
    ext: &ExternalTrain,
    settings: &Json,
    seed: u64,
    align: bool,
) -> Result<StepOutput, StageError> {
    let model = input_model(step, inputs)?;
    let (data, _, _) = input_dataset(step, inputs)?;
    let label = &step.label;
    let other = |m: String| StageError::Other(format!("{label}: {m}"));
    if model.adapter.is_some() {
        return Err(other(
            "the input model carries an adapter; tuning starts from a model without one".into(),
        ));
    }
    let base_model = if model.aligned_from.is_some() {
        model.spec.clone()
    } else {
        ext.base_model.clone()
    };
    let work = match &ext.shared_dir {
        Some(s) => s.join(ctx.dir.file_name().unwrap_or_default()),
        None => ctx.dir.clone(),
    };
    let paths = JobPaths::new(ext.backend, &work);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| StageError::Io { path: p, source: e }
    };
    std::fs::create_dir_all(&ctx.dir).map_err(io(&ctx.dir))?;
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let table = with_seed(settings, seed);
    let tcfg = TuneConfig::from_settings(&table).map_err(|e| other(e.to_string()))?;
    let shapes = local_config(&model.spec);
    let record_path = ctx.dir.join("trainer.json");
    let log = ctx.dir.join("trainer.log");
    let name = run_name(label);
    let (config_text, args) = trainer_config(ext, settings, seed, &base_model, &paths, &name)
        .map_err(|e| other(format!("settings.{}: {}", e.key, e.message)))?;
    let command = command_line(ext, &paths, &base_model, seed, &name, &args).map_err(other)?;
    // A trainer that finished before the study stopped: its output is taken as it is.
    let previous: Option<TrainerRun> = std::fs::read_to_string(&record_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let reuse = previous.as_ref().filter(|r| {
        r.exit_code == Some(0) && r.command == command && r.output_dir == paths.output_dir
    });
    let (mut run, hash) = match reuse.and_then(|r| {
        validate_output(&paths.output_dir, &tcfg, &base_model, shapes.as_ref())
            .ok()
            .map(|h| (r.clone(), h))
    }) {
        Some(x) => x,
        None => {
            write_data(ext.backend, data, &paths)?;
            std::fs::write(&paths.config, &config_text).map_err(io(&paths.config))?;
            if paths.output_dir.exists() {
                // What a failed or killed run left behind is not resumed from.
                std::fs::remove_dir_all(&paths.output_dir).map_err(io(&paths.output_dir))?;
            }
            let run = execute(ext, &command, &paths, &log)?;
            std::fs::write(
                &record_path,
                serde_json::to_string_pretty(&run).unwrap_or_default(),
            )
            .map_err(io(&record_path))?;
            if run.exit_code != Some(0) {
                let how = match (run.exit_code, run.signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(s)) => format!("was killed by signal {s}"),
                    (None, None) => "stopped without an exit code".into(),
                };
                return Err(other(format!(
                    "the trainer ({}) {how} after {:.1} s; last lines of {}:\n{}",
                    ext.backend.as_str(),
                    run.wall_s,
                    log.display(),
                    tail(&log, 20)
                )));
            }
            let hash = validate_output(&paths.output_dir, &tcfg, &base_model, shapes.as_ref())
                .map_err(|m| {
                    other(format!(
                        "the trainer exited 0 but its output is not usable: {m}; last lines of {}:\n{}",
                        log.display(),
                        tail(&log, 20)
                    ))
                })?;
            (run, hash)
        }
    };
    run.output_hash = Some(hash.clone());
    std::fs::write(
        &record_path,
        serde_json::to_string_pretty(&run).unwrap_or_default(),
    )
    .map_err(io(&record_path))?;
    let bytes: u64 = std::fs::read_dir(&paths.output_dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let kind = if tcfg.full { "checkpoint" } else { "adapter" };
    ctx.store
        .put_artifact(&hash, &paths.output_dir, kind, bytes, ctx.key)?;
    if tcfg.full {
        return Ok(StepOutput::Model(ModelArtifact {
            spec: paths.output_dir.display().to_string(),
            adapter: None,
            training: None,
            aligned_from: None,
            ..model.clone()
        }));
    }
    if align {
        let merged = ctx.dir.join("merged");
        if merged.exists() {
            let _ = std::fs::remove_dir_all(&merged);
        }
        let base = safetune_model::ModelSpec::parse(&model.spec)?;
        safetune_train::peft::merge(
            &base,
            Some(&paths.output_dir),
            &merged,
            safetune_train::peft::SaveDType::F32,
        )
        .map_err(|e| other(e.to_string()))?;
        return Ok(StepOutput::Model(ModelArtifact {
            name: model.name.clone(),
            spec: merged.display().to_string(),
            concurrency: model.concurrency,
            endpoints: vec![],
            access: Default::default(),
            adapter: None,
            training: None,
            lora: model.lora.clone(),
            aligned_from: Some(AlignedFrom {
                base: model.spec.clone(),
                adapter: paths.output_dir.clone(),
            }),
        }));
    }
    Ok(StepOutput::Model(ModelArtifact {
        adapter: Some(paths.output_dir.clone()),
        training: None,
        ..model.clone()
    }))
}

/// Runs `command` with `sh -c` in the job folder, its output into `log`.
fn execute(
    ext: &ExternalTrain,
    command: &str,
    paths: &JobPaths,
    log: &Path,
) -> Result<TrainerRun, StageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| StageError::Io { path: p, source: e }
    };
    let mut f = std::fs::File::create(log).map_err(io(log))?;
    {
        use std::io::Write;
        let _ = writeln!(f, "$ {command}");
    }
    let err = f.try_clone().map_err(io(log))?;
    let started = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(&paths.work)
        .envs(&ext.env)
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .stderr(err)
        .status()
        .map_err(io(Path::new("sh")))?;
    #[cfg(unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    };
    #[cfg(not(unix))]
    let signal = None;
    Ok(TrainerRun {
        backend: ext.backend,
        command: command.to_string(),
        exit_code: status.code(),
        signal,
        wall_s: started.elapsed().as_secs_f64(),
        started_unix_s,
        log: log.to_path_buf(),
        output_dir: paths.output_dir.clone(),
        output_hash: None,
    })
}

/// The `--dry-run` lines of an external step: backend and exact command line, with the paths
/// it will have under `DIR` (the study directory, shown as given).
/// `aligned`: the folder of the align step whose merged model a tune step starts from.
pub fn dry_run_line(
    step: &PlannedStep,
    aligned: Option<&str>,
    key: &str,
    dir: &Path,
) -> Option<String> {
    let (ext, settings, seed) = match &step.spec {
        StepSpec::Align {
            external: Some(e),
            settings,
            ..
        } => (e, settings, 0),
        StepSpec::Tune {
            external: Some(e),
            settings,
            seed,
            ..
        } => (e, settings, *seed),
        _ => return None,
    };
    let folder = format!("{}-{}", step.kind().as_str(), &key[..16.min(key.len())]);
    let work = match &ext.shared_dir {
        Some(s) => s.join(&folder),
        None => dir.join("steps").join(&folder),
    };
    let paths = JobPaths::new(ext.backend, &work);
    let name = run_name(&step.label);
    let base = if let Some(a) = aligned {
        dir.join("steps")
            .join(a)
            .join("merged")
            .display()
            .to_string()
    } else {
        ext.base_model.clone()
    };
    let line = trainer_config(ext, settings, seed, &base, &paths, &name)
        .map_err(|e| format!("settings.{}: {}", e.key, e.message))
        .and_then(|(_, args)| command_line(ext, &paths, &base, seed, &name, &args));
    Some(match line {
        Ok(l) => {
            let env: String = ext
                .env
                .iter()
                .map(|(k, v)| format!("{k}={} ", sh_quote(v)))
                .collect();
            format!(
                "  {} [{}]\n    $ {env}{l}\n",
                step.label,
                ext.backend.as_str()
            )
        }
        Err(e) => format!(
            "  {} [{}]\n    error: {e}\n",
            step.label,
            ext.backend.as_str()
        ),
    })
}

/// The `--dry-run` section of a plan's external train steps: each step's backend and exact
/// command line, as it will run in the study directory `dir`.
pub fn render_commands(plan: &crate::plan::Plan, dir: &Path) -> String {
    let keys = crate::runner::step_keys(plan);
    let mut o = String::new();
    for (i, s) in plan.steps.iter().enumerate() {
        let aligned = s
            .deps
            .first()
            .filter(|&&d| s.kind() == StepKind::Tune && plan.steps[d].kind() == StepKind::Align)
            .map(|&d| format!("align-{}", &keys[d][..16]));
        if let Some(line) = dry_run_line(s, aligned.as_deref(), &keys[i], dir) {
            o.push_str(&line);
        }
    }
    if o.is_empty() {
        return o;
    }
    format!(
        "External train steps (backend, command line; study directory {}):\n{o}",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_unknown_placeholders_and_keep_escaped_braces() {
        assert!(check_template("llamafactory-cli train {config}").is_ok());
        let e = check_template("run {config} {gpus}").unwrap_err();
        assert!(
            e.starts_with("unknown placeholder `{gpus}` (known: {config}, "),
            "{e}"
        );
        assert!(check_template("echo {").unwrap_err().contains("unclosed"));
        let s = render("a {{x}} {seed}", &|p| (p == "seed").then(|| "3".into())).unwrap();
        assert_eq!(s, "a {x} 3");
    }

    #[test]
    fn every_trainer_setting_has_a_row_in_the_mapping() {
        let keys = TuneConfig::settings_keys();
        let rows: Vec<&str> = MAPPING.iter().map(|r| r.setting).collect();
        for k in &keys {
            assert!(rows.contains(&k.as_str()), "`{k}` has no mapping row");
        }
        assert_eq!(rows.len(), keys.len(), "{rows:?} vs {keys:?}");
    }
}
