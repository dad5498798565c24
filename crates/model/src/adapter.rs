//! LoRA adapters in the PEFT layout, applied to a loaded [`Llama`] at inference time.
//!
//! An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`: `peft_type` "LORA",
//! `r`, `lora_alpha`, `target_modules`, ...) and `adapter_model.safetensors` with, for every
//! adapted linear layer `<path>` (e.g. `model.layers.0.self_attn.q_proj`), the keys
//! `base_model.model.<path>.lora_A.weight` (r, in) and `base_model.model.<path>.lora_B.weight`
//! (out, r). The layer then computes `y = W x + s B A x` with `s = alpha / r` (or
//! `alpha / sqrt(r)` with `use_rslora`), either unmerged (an extra low-rank path, which also works
//! on quantized `W`) or merged into `W` at load time.
//!
//! This lives in the model crate because loading a model with `--adapter` happens here; the
//! training crate writes adapters through [`Adapter::save`] and re-exports this module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{CandleContext, ModelError, Result};
use crate::generate::Rng;
use crate::llama::Llama;
use crate::weights::{Linear, LinearWeight, Lora};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT prefixes every key with the wrapper path of the causal-LM model.
pub const KEY_PREFIX: &str = "base_model.model.";
/// The linear layers of a Llama-family block, in checkpoint order; `lm_head` may be targeted too.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `target_modules` (and `exclude_modules`): a list of module names (a module matches when its
/// path is the name or ends with `.name`), or one regular expression matched against the whole
/// path. The string `all-linear` means every linear layer except the output head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// `layers_to_transform`: one layer index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    One(usize),
    Many(Vec<usize>),
}

impl Layers {
    fn contains(&self, i: usize) -> bool {
        match self {
            Layers::One(x) => *x == i,
            Layers::Many(v) => v.contains(&i),
        }
    }
}

fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}
fn default_init() -> Json {
    Json::Bool(true)
}

/// Writes whole numbers as JSON integers (`32`, as PEFT does), others as floats.
fn ser_alpha<S: serde::Serializer>(a: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if a.fract() == 0.0 && a.abs() < 1e15 {
        s.serialize_i64(*a as i64)
    } else {
        s.serialize_f64(*a)
    }
}

fn ser_alpha_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

/// A mirror of PEFT's `LoraConfig` as `adapter_config.json` stores it. Keys this crate does not
/// interpret are kept in `other` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    pub r: usize,
    #[serde(default = "default_alpha", serialize_with = "ser_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<Layers>,
    #[serde(default)]
    pub layers_pattern: Option<Json>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default, serialize_with = "ser_alpha_map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    #[serde(default = "default_init")]
    pub init_lora_weights: Json,
    /// Every other key of the file (PEFT has many that do not matter for inference).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Json>,
}

/// Keys PEFT's `LoraConfig` writes that this crate does not interpret, with the values PEFT
/// writes for a plain LoRA: written so the file looks like one PEFT saved.
fn peft_default_keys() -> serde_json::Map<String, Json> {
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("auto_mapping", Json::Null),
        ("corda_config", Json::Null),
        ("eva_config", Json::Null),
        ("layer_replication", Json::Null),
        ("loftq_config", Json::Object(Default::default())),
        ("lora_bias", Json::Bool(false)),
        ("megatron_config", Json::Null),
        ("megatron_core", Json::String("megatron.core".into())),
        ("trainable_token_indices", Json::Null),
    ] {
        m.insert(k.to_string(), v);
    }
    m
}

impl AdapterConfig {
    /// A plain LoRA config as PEFT would write it (`task_type` CAUSAL_LM, `bias` none, no
    /// dropout at inference, `fan_in_fan_out` and `use_rslora` false).
    pub fn lora(r: usize, lora_alpha: f64, target_modules: &[&str]) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            revision: None,
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                target_modules.iter().map(|s| s.to_string()).collect(),
            )),
            exclude_modules: None,
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            inference_mode: true,
            init_lora_weights: Json::Bool(true),
            other: peft_default_keys(),
        }
    }

    /// Reads and checks `adapter_config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<AdapterConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Rejects what this crate cannot apply faithfully.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| ModelError::format(path, format!("`{field}`: {msg}"));
        if self.peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                format!(
                    "{:?} is not supported (only LORA adapters are)",
                    self.peft_type
                ),
            ));
        }
        if self.r == 0 {
            return Err(bad("r", "the rank must be at least 1".into()));
        }
        if !self.lora_alpha.is_finite() {
            return Err(bad("lora_alpha", "must be a finite number".into()));
        }
        if self.use_dora {
            return Err(bad(
                "use_dora",
                "DoRA adapters are not supported (hint: merge it with PEFT and load the merged model)".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out",
                "true is for GPT-2 style Conv1D layers; Llama-family linear layers store (out, in)"
                    .into(),
            ));
        }
        if self.bias != "none" {
            return Err(bad(
                "bias",
                format!(
                    "{:?} is not supported (only \"none\": adapters that train biases need a merge in PEFT first)",
                    self.bias
                ),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad(
                "modules_to_save",
                "full copies of modules are not supported, only LoRA matrices".into(),
            ));
        }
        if self.target_modules.is_none() {
            return Err(bad(
                "target_modules",
                "missing: which modules the adapter applies to".into(),
            ));
        }
        if let Some(TargetModules::Pattern(p)) = &self.target_modules {
            if p != "all-linear" {
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| bad("target_modules", format!("invalid regex: {e}")))?;
            }
        }
        Ok(())
    }

    /// Whether the config targets the linear layer at `path`
    /// (e.g. `model.layers.3.mlp.up_proj`), following PEFT's matching rules.
    pub fn targets(&self, path: &str) -> bool {
        let Some(t) = &self.target_modules else {
            return false;
        };
        if !matches_modules(t, path) {
            return false;
        }
        if let Some(ex) = &self.exclude_modules {
            if matches_modules(ex, path) {
                return false;
            }
        }
        if let Some(layers) = &self.layers_to_transform {
            match layer_index(path) {
                Some(i) if layers.contains(i) => {}
                _ => return false,
            }
        }
        true
    }

    /// The rank and alpha of one module, with `rank_pattern` and `alpha_pattern` applied.
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let a = pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        (r, a)
    }

    /// The LoRA scale of a module of rank `r`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self, path: &str, r: usize) -> f64 {
        let (_, alpha) = self.rank_and_alpha(path);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

fn matches_modules(t: &TargetModules, path: &str) -> bool {
    match t {
        TargetModules::Pattern(p) if p == "all-linear" => path != "lm_head",
        TargetModules::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
            .map(|re| re.is_match(path))
            .unwrap_or(false),
        TargetModules::List(names) => names
            .iter()
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
    }
}

/// The block index in `model.layers.N....`.
fn layer_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// PEFT matches pattern keys against the end of a module path at a dot boundary.
fn pattern_value<T: Copy>(m: &BTreeMap<String, T>, path: &str) -> Option<T> {
    if let Some(v) = m.get(path) {
        return Some(*v);
    }
    m.iter().find_map(|(k, v)| {
        regex::Regex::new(&format!("^(?:.*\\.)?(?:{k})$"))
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| *v)
    })
}

/// The two matrices of one adapted layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }
}

/// A LoRA adapter: its config and, per adapted module path, its A and B matrices (f32, CPU).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) -> matrices.
    pub tensors: BTreeMap<String, LoraPair>,
    /// The directory it was read from, for error messages.
    pub source: Option<PathBuf>,
}

/// The safetensors key of a module's A or B matrix.
pub fn lora_key(module: &str, which: char) -> String {
    format!("{KEY_PREFIX}{module}.lora_{which}.weight")
}

/// How [`Adapter::init`] fills the matrices.
#[derive(Debug, Clone, Copy)]
pub enum LoraInit {
    /// PEFT's default: A uniform in ±1/sqrt(in) (Kaiming-uniform with a = sqrt(5)), B zero, so
    /// the adapted model starts equal to the base.
    Peft { seed: u64 },
    /// Both matrices Gaussian with the given standard deviations (tests, benchmarks).
    Gaussian { seed: u64, std_a: f32, std_b: f32 },
}

/// Every linear layer of the model, blocks first, then the LM head.
pub fn linears(model: &Llama) -> Vec<&Linear> {
    let mut v = Vec::with_capacity(model.layers.len() * 7 + 1);
    for b in &model.layers {
        let (a, m) = (&b.self_attn, &b.mlp);
        v.extend([
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]);
    }
    v.push(&model.lm_head);
    v
}

/// Mutable [`linears`].
pub fn linears_mut(model: &mut Llama) -> Vec<&mut Linear> {
    let mut v = Vec::with_capacity(model.layers.len() * 7 + 1);
    for b in model.layers.iter_mut() {
        let a = &mut b.self_attn;
        let m = &mut b.mlp;
        v.push(&mut a.q_proj);
        v.push(&mut a.k_proj);
        v.push(&mut a.v_proj);
        v.push(&mut a.o_proj);
        v.push(&mut m.gate_proj);
        v.push(&mut m.up_proj);
        v.push(&mut m.down_proj);
    }
    v.push(&mut model.lm_head);
    v
}

/// What [`Adapter::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// Layers whose weight now includes the adapter.
    pub merged: usize,
    /// Layers computing the adapter as a separate low-rank path.
    pub unmerged: usize,
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = rng.next_f64().max(1e-12);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

impl Adapter {
    /// Reads an adapter directory (or the path of its `adapter_config.json` or
    /// `adapter_model.safetensors`). Checks the config, the key names and that every A has its
    /// B with a matching rank; [`Adapter::check_against`] checks it against a model.
    pub fn load(path: &Path) -> Result<Adapter> {
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        if !dir.is_dir() {
            return Err(ModelError::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let cpath = dir.join(CONFIG_FILE);
        if !cpath.is_file() && dir.join("config.json").is_file() {
            return Err(ModelError::format(
                &cpath,
                "file not found, but the directory has config.json: it is a full checkpoint, not a LoRA adapter (serve it as a model of its own, not as an adapter)",
            ));
        }
        let config = AdapterConfig::from_file(&cpath)?;
        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (hint: adapter_model.bin is a pickle, which is not read; save the adapter with safe_serialization=True)"
            } else {
                ""
            };
            return Err(ModelError::format(&wpath, format!("file not found{hint}")));
        }
        let raw = candle_core::safetensors::load(&wpath, &Device::Cpu).map_err(|e| {
            ModelError::format(&wpath, format!("not a readable safetensors file: {e}"))
        })?;
        let mut a_map: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_map: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut names: Vec<&String> = raw.keys().collect();
        names.sort();
        for key in names {
            let t = &raw[key];
            let unknown = |why: &str| {
                ModelError::format(
                    &wpath,
                    format!("unexpected tensor `{key}`: {why} (expected `{KEY_PREFIX}<module>.lora_A.weight` and `.lora_B.weight`)"),
                )
            };
            let rest = key
                .strip_prefix(KEY_PREFIX)
                .ok_or_else(|| unknown("the key does not start with the PEFT prefix"))?;
            let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 'A')
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 'B')
            } else if rest.contains("lora_magnitude_vector") {
                return Err(unknown("DoRA magnitudes are not supported"));
            } else if rest.contains("lora_embedding_") {
                return Err(unknown("LoRA on embeddings is not supported"));
            } else {
                return Err(unknown("not a LoRA matrix"));
            };
            if t.rank() != 2 {
                return Err(ModelError::format(
                    &wpath,
                    format!("tensor `{key}` has shape {:?}, expected a matrix", t.dims()),
                ));
            }
            let t = t
                .to_dtype(DType::F32)
                .ctx(|| format!("{}: tensor `{key}`", wpath.display()))?;
            match which {
                'A' => a_map.insert(module.to_string(), t),
                _ => b_map.insert(module.to_string(), t),
            };
        }
        let mut tensors = BTreeMap::new();
        for (module, a) in a_map {
            let b = b_map
                .remove(&module)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: wpath.clone(),
                    tensor: lora_key(&module, 'B'),
                    hint: format!(" (it has `{}`)", lora_key(&module, 'A')),
                })?;
            let (r, _) = a.dims2()?;
            let (out, rb) = b.dims2()?;
            let (expected_r, _) = config.rank_and_alpha(&module);
            if r != expected_r {
                return Err(ModelError::format(
                    &wpath,
                    format!(
                        "tensor `{}` has rank {r} (shape {:?}), but adapter_config.json says r = {expected_r}",
                        lora_key(&module, 'A'),
                        a.dims()
                    ),
                ));
            }
            if rb != r {
                return Err(ModelError::ShapeMismatch {
                    path: wpath.clone(),
                    tensor: lora_key(&module, 'B'),
                    expected: vec![out, r],
                    actual: b.dims().to_vec(),
                });
            }
            tensors.insert(module, LoraPair { a, b });
        }
        if let Some(module) = b_map.keys().next() {
            return Err(ModelError::MissingTensor {
                path: wpath,
                tensor: lora_key(module, 'A'),
                hint: format!(" (it has `{}`)", lora_key(module, 'B')),
            });
        }
        if tensors.is_empty() {
            return Err(ModelError::format(
                &wpath,
                "the adapter has no LoRA tensors",
            ));
        }
        Ok(Adapter {
            config,
            tensors,
            source: Some(dir),
        })
    }

    fn weights_path(&self) -> PathBuf {
        self.source
            .as_ref()
            .map(|d| d.join(WEIGHTS_FILE))
            .unwrap_or_else(|| PathBuf::from(WEIGHTS_FILE))
    }

    fn config_path(&self) -> PathBuf {
        self.source
            .as_ref()
            .map(|d| d.join(CONFIG_FILE))
            .unwrap_or_else(|| PathBuf::from(CONFIG_FILE))
    }

    /// Checks the adapter against a model: every tensor belongs to a linear layer of the model
    /// with the right shapes, every module the config targets has its tensors, and every
    /// listed target module names something in the model.
    pub fn check_against(&self, model: &Llama) -> Result<()> {
        let wpath = self.weights_path();
        let layers: HashMap<&str, &Linear> = linears(model)
            .into_iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        for (module, pair) in &self.tensors {
            let l = layers.get(module.as_str()).ok_or_else(|| {
                let hint = if module.starts_with("model.model.") || module.starts_with("base_model.") {
                    " (hint: the key has the model prefix twice; was it saved from a wrapped model?)"
                } else {
                    ""
                };
                ModelError::format(
                    &wpath,
                    format!(
                        "tensor `{}`: the model has no linear layer `{module}`{hint}",
                        lora_key(module, 'A')
                    ),
                )
            })?;
            let r = pair.rank();
            if pair.a.dims() != [r, l.in_dim] {
                return Err(ModelError::ShapeMismatch {
                    path: wpath.clone(),
                    tensor: lora_key(module, 'A'),
                    expected: vec![r, l.in_dim],
                    actual: pair.a.dims().to_vec(),
                });
            }
            if pair.b.dims() != [l.out_dim, r] {
                return Err(ModelError::ShapeMismatch {
                    path: wpath.clone(),
                    tensor: lora_key(module, 'B'),
                    expected: vec![l.out_dim, r],
                    actual: pair.b.dims().to_vec(),
                });
            }
        }
        if let Some(TargetModules::List(names)) = &self.config.target_modules {
            for n in names {
                let found = layers
                    .keys()
                    .any(|p| *p == n || p.ends_with(&format!(".{n}")));
                if !found {
                    return Err(ModelError::format(
                        &self.config_path(),
                        format!(
                            "`target_modules`: unknown target module {n:?}: the model's linear layers are {}, lm_head",
                            LINEAR_MODULES.join(", ")
                        ),
                    ));
                }
            }
        }
        for l in linears(model) {
            if self.config.targets(&l.name) && !self.tensors.contains_key(&l.name) {
                return Err(ModelError::MissingTensor {
                    path: wpath,
                    tensor: lora_key(&l.name, 'A'),
                    hint: " (adapter_config.json's target_modules selects this layer)".into(),
                });
            }
        }
        Ok(())
    }

    /// Attaches the adapter to `model` after [`Adapter::check_against`]. With `merge`, dense
    /// weights become `W + s B A` (no cost per token); quantized weights always keep the
    /// low-rank path in f32 so the quantized matrix stays as it is.
    pub fn apply(&self, model: &mut Llama, merge: bool) -> Result<ApplySummary> {
        self.check_against(model)?;
        let mut summary = ApplySummary {
            merged: 0,
            unmerged: 0,
        };
        for l in linears_mut(model) {
            let Some(pair) = self.tensors.get(&l.name) else {
                continue;
            };
            if l.lora.is_some() {
                return Err(ModelError::Other(format!(
                    "layer `{}` already has an adapter attached",
                    l.name
                )));
            }
            let scale = self.config.scale(&l.name, pair.rank());
            let name = l.name.clone();
            match (&l.weight, merge) {
                (LinearWeight::Dense(w), true) => {
                    let delta = (pair.b.matmul(&pair.a)? * scale)?; // (out, in)
                    let merged =
                        (w + delta).ctx(|| format!("merging the adapter into `{name}`"))?;
                    l.weight = LinearWeight::Dense(merged);
                    summary.merged += 1;
                }
                _ => {
                    l.lora = Some(Lora {
                        a: pair.a.contiguous()?,
                        b: pair.b.contiguous()?,
                        scale,
                    });
                    summary.unmerged += 1;
                }
            }
        }
        Ok(summary)
    }

    /// The adapter attached (unmerged) to a model's layers, e.g. after training. The config
    /// says r and alpha; each layer's matrices come from its LoRA slot.
    pub fn from_model(model: &Llama, config: AdapterConfig) -> Adapter {
        let tensors = linears(model)
            .into_iter()
            .filter_map(|l| {
                l.lora.as_ref().map(|lo| {
                    (
                        l.name.clone(),
                        LoraPair {
                            a: lo.a.clone(),
                            b: lo.b.clone(),
                        },
                    )
                })
            })
            .collect();
        Adapter {
            config,
            tensors,
            source: None,
        }
    }

    /// A new adapter for every layer of `model` that `config` targets.
    pub fn init(model: &Llama, config: AdapterConfig, init: LoraInit) -> Result<Adapter> {
        config.check(Path::new(CONFIG_FILE))?;
        let seed = match init {
            LoraInit::Peft { seed } | LoraInit::Gaussian { seed, .. } => seed,
        };
        let mut rng = Rng::new(seed);
        let mut tensors = BTreeMap::new();
        for l in linears(model) {
            if !config.targets(&l.name) {
                continue;
            }
            let (r, _) = config.rank_and_alpha(&l.name);
            let (a, b) = match init {
                LoraInit::Peft { .. } => {
                    let bound = 1.0 / (l.in_dim as f64).sqrt();
                    let a: Vec<f32> = (0..r * l.in_dim)
                        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                        .collect();
                    (a, vec![0f32; l.out_dim * r])
                }
                LoraInit::Gaussian { std_a, std_b, .. } => (
                    randn(&mut rng, r * l.in_dim, std_a),
                    randn(&mut rng, l.out_dim * r, std_b),
                ),
            };
            tensors.insert(
                l.name.clone(),
                LoraPair {
                    a: Tensor::from_vec(a, (r, l.in_dim), &Device::Cpu)?,
                    b: Tensor::from_vec(b, (l.out_dim, r), &Device::Cpu)?,
                },
            );
        }
        if tensors.is_empty() {
            return Err(ModelError::format(
                Path::new(CONFIG_FILE),
                "`target_modules` selects no linear layer of the model",
            ));
        }
        Ok(Adapter {
            config,
            tensors,
            source: None,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32, PEFT key names).
    /// A new directory appears whole (written beside it, then renamed); in an existing one each
    /// file is replaced by a rename, so a reader never sees a half-written file and other files
    /// there (training logs, checkpoints) are kept.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let config_json = serde_json::to_string_pretty(&self.config)
            .map_err(|e| ModelError::Other(format!("serialising the adapter config: {e}")))?;
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(self.tensors.len() * 2);
        for (module, p) in &self.tensors {
            named.push((
                lora_key(module, 'A'),
                p.a.to_dtype(DType::F32)?.contiguous()?,
            ));
            named.push((
                lora_key(module, 'B'),
                p.b.to_dtype(DType::F32)?.contiguous()?,
            ));
        }
        write_files_atomically(dir, |tmp| {
            let wpath = tmp.join(WEIGHTS_FILE);
            write_safetensors(&wpath, named.iter().map(|(k, t)| (k.as_str(), t)))?;
            let cpath = tmp.join(CONFIG_FILE);
            std::fs::write(&cpath, config_json.as_bytes())
                .map_err(|e| ModelError::io(&cpath, e))?;
            sync(&cpath)?;
            Ok(vec![WEIGHTS_FILE.to_string(), CONFIG_FILE.to_string()])
        })
    }
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// Writes a safetensors file with `{"format": "pt"}` metadata (what PyTorch writers add), and
/// syncs it to disk.
pub fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .map_err(|e| ModelError::format(path, format!("writing safetensors: {e}")))?;
    sync(path)
}

/// Runs `write` on a fresh temporary directory next to `dir`, then moves what it wrote (the
/// returned file names) into `dir`: the whole directory by one rename when `dir` does not exist
/// yet, else file by file (each rename atomic). On error the temporary directory is removed and
/// `dir` is untouched.
pub fn write_files_atomically(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<Vec<String>>,
) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let files = match write(&tmp) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if !dir.exists() {
        // A directory rename, so it stays here rather than in `safetune_data::util`'s file
        // writes: one rename publishes every file at once, and no file helper moves a directory.
        std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    } else {
        if !dir.is_dir() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ModelError::format(dir, "exists and is not a directory"));
        }
        for f in &files {
            let (from, to) = (tmp.join(f), dir.join(f));
            safetune_data::util::commit_atomic(&from, &to)
                .map_err(|(p, e)| ModelError::io(p, e))?;
        }
        std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_matching_rules() {
        let mut c = AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj"]);
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("lm_head"));
        c.layers_to_transform = Some(Layers::Many(vec![1]));
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("model.layers.1.self_attn.q_proj"));
        c.layers_to_transform = None;
        c.target_modules = Some(TargetModules::Pattern(r".*\.mlp\..*_proj".into()));
        assert!(c.targets("model.layers.3.mlp.up_proj"));
        assert!(!c.targets("model.layers.3.self_attn.q_proj"));
        c.target_modules = Some(TargetModules::Pattern("all-linear".into()));
        assert!(c.targets("model.layers.3.self_attn.o_proj"));
        assert!(!c.targets("lm_head"));
        c.exclude_modules = Some(TargetModules::List(vec!["o_proj".into()]));
        assert!(!c.targets("model.layers.3.self_attn.o_proj"));
    }

    #[test]
    fn scale_with_patterns_and_rslora() {
        let mut c = AdapterConfig::lora(16, 32.0, &["q_proj"]);
        assert_eq!(c.scale("model.layers.0.self_attn.q_proj", 16), 2.0);
        c.alpha_pattern.insert("q_proj".into(), 8.0);
        c.rank_pattern
            .insert(r"layers\.1\.self_attn\.q_proj".into(), 4);
        assert_eq!(c.scale("model.layers.0.self_attn.q_proj", 16), 0.5);
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.q_proj"),
            (4, 8.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.11.self_attn.q_proj"),
            (16, 8.0)
        );
        c.use_rslora = true;
        assert_eq!(c.scale("model.layers.1.self_attn.q_proj", 4), 4.0);
    }

    #[test]
    fn config_writes_peft_style_and_reads_back() {
        let c = AdapterConfig::lora(8, 16.0, &["q_proj", "v_proj"]);
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains(r#""lora_alpha":16"#), "{s}");
        assert!(s.contains(r#""peft_type":"LORA""#), "{s}");
        assert!(s.contains(r#""megatron_core":"megatron.core""#), "{s}");
        let back: AdapterConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }
}
