//! The planner: a study config becomes a list of steps in dependency order (a factorial over
//! models x dataset variants x seeds x mixing levels x selections, each evaluated on every
//! benchmark by every judge and reward model).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use safetune_data::demo::resolve_dataset;
use safetune_data::prompts::{PromptSet, Split};

use crate::config::*;
use crate::hash::{hash_bytes, hash_file};
use crate::step::*;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("`{field}`: {source}")]
    Data {
        field: String,
        source: safetune_data::DataError,
    },
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub steps: Vec<PlannedStep>,
}

/// One dataset variant the plan tunes on.
#[derive(Debug, Clone)]
struct DatasetNode {
    step: usize,
    factors: BTreeMap<String, String>,
    seed: u64,
    examples: usize,
}

fn toggle_str(t: Toggle) -> &'static str {
    t.as_str()
}

fn structure_str(s: StructureLevel) -> &'static str {
    match s {
        StructureLevel::Keep => "keep",
        StructureLevel::Plain => "plain",
        StructureLevel::Itemized => "itemized",
        StructureLevel::Markdown => "markdown",
    }
}

/// A selection strategy's name as the config spells it (`top`, `bottom`, `random`).
fn strategy_str(s: SelectStrategy) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The (structure, identity, roleplay) levels of the variants, per the design.
pub fn variant_levels(f: &FactorsSection) -> Vec<(StructureLevel, Toggle, Toggle)> {
    let mut out = Vec::new();
    match f.design {
        Design::Full => {
            for &s in &f.structure {
                for &i in &f.identity {
                    for &r in &f.roleplay {
                        out.push((s, i, r));
                    }
                }
            }
        }
        Design::OneAtATime => {
            let base = (f.structure[0], f.identity[0], f.roleplay[0]);
            out.push(base);
            for &s in &f.structure[1..] {
                out.push((s, base.1, base.2));
            }
            for &i in &f.identity[1..] {
                out.push((base.0, i, base.2));
            }
            for &r in &f.roleplay[1..] {
                out.push((base.0, base.1, r));
            }
        }
    }
    out
}

/// A variant's name: the changed levels joined by `+`, or `original`.
pub fn variant_name(s: StructureLevel, i: Toggle, r: Toggle) -> String {
    let mut parts = Vec::new();
    if s != StructureLevel::Keep {
        parts.push(structure_str(s).to_string());
    }
    match i {
        Toggle::Add => parts.push("identity".into()),
        Toggle::Remove => parts.push("no-identity".into()),
        Toggle::Placebo => parts.push("identity-placebo".into()),
        Toggle::Keep | Toggle::Neutral => {}
    }
    match r {
        Toggle::Add => parts.push("roleplay".into()),
        Toggle::Remove => parts.push("no-roleplay".into()),
        Toggle::Neutral => parts.push("roleplay-neutral".into()),
        Toggle::Keep | Toggle::Placebo => {}
    }
    if parts.is_empty() {
        "original".into()
    } else {
        parts.join("+")
    }
}

fn data_err(field: &str) -> impl Fn(safetune_data::DataError) -> PlanError + '_ {
    move |e| PlanError::Data {
        field: field.to_string(),
        source: e,
    }
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

/// Loads a benchmark and returns its reference (with a content hash) and its split size.
pub fn benchmark_ref(
    b: &BenchmarkConfig,
    study: &StudySection,
) -> Result<(BenchmarkRef, PromptSet), PlanError> {
    let set = PromptSet::load(&b.source, None).map_err(|e| PlanError::Data {
        field: format!("benchmarks `{}` source", b.name),
        source: e,
    })?;
    let mut text = String::new();
    for i in &set.items {
        let _ = writeln!(text, "{}\t{}", i.id, i.prompt);
    }
    let r = BenchmarkRef {
        name: b.name.clone(),
        source: b.source.clone(),
        content_hash: hash_bytes(text.as_bytes()),
        harmful: b.harmful,
        split: b.split,
        split_seed: study.split_seed,
        test_fraction: study.test_fraction,
        limit: b.limit,
        sample_seed: study.sample_seed,
    };
    let items = select_prompts(&set, &r);
    Ok((r, items))
}

/// The prompts a generate step runs: the chosen split, or with `limit = N` a seeded random
/// sample of N of its prompts ([`PromptSet::sample`] under `sample_seed`: a larger N draws a
/// superset and every model of a study gets the same prompts). The prompts keep the split's
/// order.
pub fn select_prompts(set: &PromptSet, b: &BenchmarkRef) -> PromptSet {
    let s = match b.split {
        SplitChoice::All => set.clone(),
        SplitChoice::Test => set.split(Split::Test, b.split_seed, b.test_fraction),
        SplitChoice::Train => set.split(Split::Train, b.split_seed, b.test_fraction),
    };
    match b.limit {
        Some(l) => s.sample(l, b.sample_seed),
        None => s,
    }
}

/// Plans a study: the steps of `cfg` in dependency order. The stages, in plan order: one step
/// per model; the dataset variants (transform, audit, mix, select); the alignment set; then per
/// model its conditions (base, aligned, one tuned model per dataset) and their evaluations.
pub fn plan(cfg: &StudyConfig) -> Result<Plan, PlanError> {
    let mut p = Planner {
        cfg,
        steps: Vec::new(),
        default_system: None,
    };
    let model_steps = p.models()?;
    let datasets = p.datasets()?;
    // Benchmarks are loaded now, for their content hash and size.
    let benches = cfg
        .benchmarks
        .iter()
        .map(|b| benchmark_ref(b, &cfg.study))
        .collect::<Result<Vec<_>, _>>()?;
    let judges = judges(cfg);
    let align_data = p.align_data(&benches)?;
    for (m, &model_step) in cfg.models.iter().zip(&model_steps) {
        for target in p.conditions(m, model_step, align_data, &datasets) {
            p.evaluations(&target, &benches, &judges);
            p.utility(&target)?;
        }
    }
    Ok(Plan {
        name: cfg.study.name.clone(),
        steps: p.steps,
    })
}

/// The external trainer of an align/tune step of model `m` (`None` for the local trainer).
pub fn external(
    cfg: &StudyConfig,
    m: &ModelConfig,
    t: crate::config::TrainerOptions<'_>,
) -> Option<crate::external_train::ExternalTrain> {
    use crate::external_train::{Backend, ExternalTrain};
    if t.backend == Backend::Local {
        return None;
    }
    let command = t
        .command
        .map(String::from)
        .or_else(|| t.backend.default_command().map(String::from))
        .unwrap_or_default();
    let base_model = m.train_model.clone().unwrap_or_else(|| {
        let spec = resolve_model_spec(&m.spec).unwrap_or_else(|_| m.spec.clone());
        spec.strip_prefix("hf:").map(String::from).unwrap_or(spec)
    });
    Some(ExternalTrain {
        backend: t.backend,
        command,
        launcher: t.launcher.map(String::from),
        env: t.env.clone(),
        backend_settings: serde_json::to_value(t.backend_settings).unwrap_or_default(),
        base_model,
        max_parallel_train: t.max_parallel_train,
        shared_dir: cfg
            .study
            .shared_dir
            .as_ref()
            .map(|d| d.join(crate::external_train::run_name(&cfg.study.name))),
    })
}

/// The judges of the study: its `[[judges]]`, or the keyword judge when it lists none.
fn judges(cfg: &StudyConfig) -> Vec<JudgeConfig> {
    if !cfg.judges.is_empty() {
        return cfg.judges.clone();
    }
    vec![JudgeConfig {
        name: "keyword".into(),
        kind: JudgeKind::Keyword,
        spec: None,
        settings: Default::default(),
    }]
}

/// The threshold of the `project` arm when the config gives neither `threshold` nor `share`.
pub const DEFAULT_PROJECT_THRESHOLD: f64 = 0.5;

/// An `anchor` arm's settings and, for `on = "refusals"`, the alignment set's step.
struct Anchor {
    arm: AnchorArm,
    align_data: Option<usize>,
}

/// The base dataset every variant is made from.
struct BaseData {
    hash: String,
    /// Examples, after `data.limit`.
    examples: usize,
}

/// A model condition to evaluate: the step that yields the model, its factors, and the seed
/// its generations use.
#[derive(Clone)]
struct Condition {
    step: usize,
    factors: BTreeMap<String, String>,
    seed: u64,
}

/// Builds a plan's step list, one stage family per method.
struct Planner<'a> {
    cfg: &'a StudyConfig,
    steps: Vec<PlannedStep>,
    /// The first model's default system prompt, once read.
    default_system: Option<Option<String>>,
}

impl Planner<'_> {
    /// Appends `step`; returns its index.
    fn push(&mut self, step: PlannedStep) -> usize {
        self.steps.push(step);
        self.steps.len() - 1
    }

    /// One `model` step per `[[models]]` entry; returns their indices.
    fn models(&mut self) -> Result<Vec<usize>, PlanError> {
        let mut out = Vec::new();
        for (i, m) in self.cfg.models.iter().enumerate() {
            let field = format!("models[{i}].spec");
            let spec = resolve_model_spec(&m.spec).map_err(data_err(&field))?;
            let mut factors = BTreeMap::new();
            factors.insert("model".to_string(), m.name.clone());
            out.push(self.push(PlannedStep {
                label: format!("model {}", m.name),
                spec: StepSpec::Model {
                    name: m.name.clone(),
                    spec,
                    concurrency: m.concurrency,
                    endpoints: m.endpoints.clone(),
                    access: m.access(),
                    lora: m.lora_serving(),
                },
                deps: vec![],
                factors,
                size: 0,
            }));
        }
        Ok(out)
    }

    /// The default system prompt of the first model's chat template (see
    /// [`safetune_model::template::default_system_prompt`]), which a system-turn persona keeps in
    /// front of it; read once. `None` for a template without one and for models behind an
    /// OpenAI-compatible server (whose template the server applies).
    fn default_system(&mut self) -> Result<Option<String>, PlanError> {
        if let Some(d) = &self.default_system {
            return Ok(d.clone());
        }
        let found = match self.cfg.models.first() {
            None => None,
            Some(m) => {
                let field = "models[0].spec";
                let invalid = |message: String| PlanError::Invalid {
                    field: field.into(),
                    message,
                };
                let spec = resolve_model_spec(&m.spec).map_err(data_err(field))?;
                let spec =
                    safetune_model::ModelSpec::parse(&spec).map_err(|e| invalid(e.to_string()))?;
                let source = safetune_model::template::model_chat_template(&spec).map_err(|e| {
                    invalid(format!(
                        "cannot read the chat template for its default system prompt: {e}"
                    ))
                })?;
                match source {
                    None if matches!(spec, safetune_model::ModelSpec::OpenAi { .. }) => None,
                    source => {
                        let t = safetune_model::ChatTemplate::new(
                            source
                                .as_deref()
                                .unwrap_or(safetune_model::template::CHATML_TEMPLATE),
                        )
                        .map_err(|e| invalid(e.to_string()))?;
                        safetune_model::template::default_system_prompt(&t)
                    }
                }
            }
        };
        self.default_system = Some(found.clone());
        Ok(found)
    }

    /// The dataset variants, per seed and variant (see [`Planner::variant`]); returns the
    /// datasets the tune steps train on.
    fn datasets(&mut self) -> Result<Vec<DatasetNode>, PlanError> {
        let data = &self.cfg.data;
        let base_path = resolve_dataset(&data.base).map_err(data_err("data.base"))?;
        let hash = hash_file(&base_path).map_err(|e| PlanError::Invalid {
            field: "data.base".into(),
            message: format!("{}: {e}", base_path.display()),
        })?;
        let mut examples = count_lines(&base_path);
        if let Some(l) = data.limit {
            examples = examples.min(l);
        }
        let base = BaseData { hash, examples };
        let mut datasets = Vec::new();
        for &seed in &self.cfg.study.seeds {
            for (s, i, r) in variant_levels(&self.cfg.factors) {
                datasets.extend(self.variant(&base, seed, s, i, r)?);
            }
        }
        Ok(datasets)
    }

    /// One variant and seed: a transform and its audit, then per mixing level the mixed set
    /// (the transform's own output at level 0) and its RM-guided selections.
    fn variant(
        &mut self,
        base: &BaseData,
        seed: u64,
        s: StructureLevel,
        i: Toggle,
        r: Toggle,
    ) -> Result<Vec<DatasetNode>, PlanError> {
        let cfg = self.cfg;
        let name = variant_name(s, i, r);
        // Only cells that add an instruction (or its neutral control) depend on these.
        let adds = matches!(r, Toggle::Add | Toggle::Neutral);
        let persona_domain = (adds && cfg.factors.persona_type == "professional")
            .then(|| cfg.factors.persona_domain(&cfg.data.base))
            .transpose()
            .map_err(|m| PlanError::Invalid {
                field: "factors.persona_domain".into(),
                message: m,
            })?
            .map(|d| {
                serde_json::to_value(d)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            });
        let default_system = if adds && cfg.factors.placement == "system" {
            self.default_system()?
        } else {
            None
        };
        let mut factors = BTreeMap::new();
        factors.insert("variant".to_string(), name.clone());
        factors.insert("structure".to_string(), structure_str(s).to_string());
        factors.insert("identity".to_string(), toggle_str(i).to_string());
        factors.insert("roleplay".to_string(), toggle_str(r).to_string());
        factors.insert("seed".to_string(), seed.to_string());
        if cfg.mitigations.is_some() {
            factors.insert("mitigation".to_string(), "none".to_string());
        }
        let t = self.push(PlannedStep {
            label: format!("transform {name} seed {seed}"),
            spec: StepSpec::Transform {
                base: cfg.data.base.clone(),
                base_hash: base.hash.clone(),
                limit: cfg.data.limit,
                structure: structure_str(s).into(),
                identity: toggle_str(i).into(),
                roleplay: toggle_str(r).into(),
                persona_type: cfg.factors.persona_type.clone(),
                placement: cfg.factors.placement.clone(),
                persona_domain: persona_domain.clone(),
                default_system: default_system.clone(),
                seed,
            },
            deps: vec![],
            factors: factors.clone(),
            size: base.examples,
        });
        self.push(PlannedStep {
            label: format!("audit {name} seed {seed}"),
            spec: StepSpec::Audit,
            deps: vec![t],
            factors: factors.clone(),
            size: base.examples,
        });
        let levels: Vec<f64> = match &cfg.mixing {
            Some(m) => m.levels.clone(),
            None => vec![0.0],
        };
        let mut out = Vec::new();
        for level in levels {
            let mut f = factors.clone();
            if cfg.mixing.is_some() {
                f.insert("mix".to_string(), format!("{level}"));
            }
            let (node, n) = self.mix(t, base.examples, level, &f, &name, seed);
            if cfg.selection.is_some() {
                f.insert("selection".to_string(), "all".to_string());
            }
            out.push(DatasetNode {
                step: node,
                factors: f.clone(),
                seed,
                examples: n,
            });
            out.extend(self.selections(node, n, &f, &name, seed)?);
        }
        if let Some(m) = cfg.mitigations.as_ref().filter(|m| m.applies_to(&name)) {
            out.extend(self.data_arms(
                m,
                base,
                t,
                &factors,
                &name,
                seed,
                persona_domain,
                default_system,
            ));
        }
        Ok(out)
    }

    /// The dataset arms of `[mitigations]` for one variant (transform step `t`): `data` (the
    /// variant's data made again with the preset's levels) and `replay` (refusal examples mixed
    /// into the variant's data). Each keeps the variant's labels, with `mitigation` set.
    #[allow(clippy::too_many_arguments)]
    fn data_arms(
        &mut self,
        m: &MitigationsSection,
        base: &BaseData,
        t: usize,
        factors: &BTreeMap<String, String>,
        name: &str,
        seed: u64,
        persona_domain: Option<String>,
        default_system: Option<String>,
    ) -> Vec<DatasetNode> {
        let cfg = self.cfg;
        let mut out = Vec::new();
        if let Some(levels) = m.data.as_ref().and_then(DataArm::levels) {
            let mut f = factors.clone();
            f.insert("mitigation".to_string(), "data".to_string());
            // A persona the fix keeps needs its domain; one it removes needs none.
            let keeps_persona = matches!(levels.roleplay, Toggle::Add | Toggle::Neutral);
            let idx = self.push(PlannedStep {
                label: format!("transform {name} seed {seed} (mitigation data)"),
                spec: StepSpec::Transform {
                    base: cfg.data.base.clone(),
                    base_hash: base.hash.clone(),
                    limit: cfg.data.limit,
                    structure: structure_str(levels.structure).into(),
                    identity: toggle_str(levels.identity).into(),
                    roleplay: toggle_str(levels.roleplay).into(),
                    persona_type: cfg.factors.persona_type.clone(),
                    placement: cfg.factors.placement.clone(),
                    persona_domain: persona_domain.filter(|_| keeps_persona),
                    default_system: default_system.filter(|_| keeps_persona),
                    seed,
                },
                deps: vec![],
                factors: f.clone(),
                size: base.examples,
            });
            out.push(DatasetNode {
                step: idx,
                factors: f,
                seed,
                examples: base.examples,
            });
        }
        if let Some(share) = m.replay {
            let (refusals, harmful) = match (&cfg.mixing, &cfg.align) {
                (Some(mx), _) => (mx.refusals.clone(), mx.harmful.clone()),
                (None, Some(a)) => (a.refusals.clone(), a.harmful.clone()),
                (None, None) => ("demo:refusals".to_string(), "advbench".to_string()),
            };
            let mut f = factors.clone();
            f.insert("mitigation".to_string(), "replay".to_string());
            let added = ((share * base.examples as f64) / (1.0 - share)).round() as usize;
            let idx = self.push(PlannedStep {
                label: format!("mix {share} into {name} seed {seed} (mitigation replay)"),
                spec: StepSpec::Mix {
                    share,
                    refusals,
                    harmful,
                    split_seed: cfg.study.split_seed,
                    test_fraction: cfg.study.test_fraction,
                    seed,
                },
                deps: vec![t],
                factors: f.clone(),
                size: base.examples + added,
            });
            out.push(DatasetNode {
                step: idx,
                factors: f,
                seed,
                examples: base.examples + added,
            });
        }
        out
    }

    /// The mix step of a mixing `level` into the transform `t` (`base_n` examples): (its
    /// index, its examples); the transform itself when there is no mixing or the level is 0.
    fn mix(
        &mut self,
        t: usize,
        base_n: usize,
        level: f64,
        f: &BTreeMap<String, String>,
        name: &str,
        seed: u64,
    ) -> (usize, usize) {
        let study = &self.cfg.study;
        let Some(m) = self.cfg.mixing.as_ref().filter(|_| level > 0.0) else {
            return (t, base_n);
        };
        let added = ((level * base_n as f64) / (1.0 - level)).round() as usize;
        let idx = self.push(PlannedStep {
            label: format!("mix {level} into {name} seed {seed}"),
            spec: StepSpec::Mix {
                share: level,
                refusals: m.refusals.clone(),
                harmful: m.harmful.clone(),
                split_seed: study.split_seed,
                test_fraction: study.test_fraction,
                seed,
            },
            deps: vec![t],
            factors: f.clone(),
            size: base_n + added,
        });
        (idx, base_n + added)
    }

    /// The select steps of `[selection]` over the dataset step `node` (`n` examples): one per
    /// kept share and strategy. None without `[selection]`.
    fn selections(
        &mut self,
        node: usize,
        n: usize,
        f: &BTreeMap<String, String>,
        name: &str,
        seed: u64,
    ) -> Result<Vec<DatasetNode>, PlanError> {
        let cfg = self.cfg;
        let Some(sel) = &cfg.selection else {
            return Ok(Vec::new());
        };
        let rm = cfg
            .reward_models
            .iter()
            .find(|r| r.name == sel.reward_model)
            .ok_or_else(|| PlanError::Invalid {
                field: "selection.reward_model".into(),
                message: format!("no reward model `{}`", sel.reward_model),
            })?;
        let strategies = if sel.strategies.is_empty() {
            vec![SelectStrategy::Top]
        } else {
            sel.strategies.clone()
        };
        let mut out = Vec::new();
        for &keep in &sel.keep {
            for &strategy in &strategies {
                let sname = format!("{}-{keep}", strategy_str(strategy));
                let mut f2 = f.clone();
                f2.insert("selection".to_string(), sname.clone());
                let kept = ((n as f64) * keep).round() as usize;
                let idx = self.push(PlannedStep {
                    label: format!("select {sname} of {name} seed {seed}"),
                    spec: StepSpec::Select {
                        reward_model: rm.name.clone(),
                        rm_spec: rm.spec.clone(),
                        keep,
                        strategy,
                        seed,
                    },
                    deps: vec![node],
                    factors: f2.clone(),
                    size: kept,
                });
                out.push(DatasetNode {
                    step: idx,
                    factors: f2,
                    seed,
                    examples: kept,
                });
            }
        }
        Ok(out)
    }

    /// The alignment set, when the config has `[align]`: train-split harmful prompts with
    /// refusals and benign answers, every evaluated prompt held out. Returns its index.
    fn align_data(
        &mut self,
        benches: &[(BenchmarkRef, PromptSet)],
    ) -> Result<Option<usize>, PlanError> {
        let study = &self.cfg.study;
        let Some(a) = &self.cfg.align else {
            return Ok(None);
        };
        let harmful = PromptSet::load(&a.harmful, None).map_err(data_err("align.harmful"))?;
        let mut nh = harmful
            .split(Split::Train, study.split_seed, study.test_fraction)
            .len();
        if let Some(l) = a.harmful_limit {
            nh = nh.min(l);
        }
        let mut nb = 0;
        for (i, spec) in a.benign.iter().enumerate() {
            let field = format!("align.benign[{i}]");
            let path = resolve_dataset(spec).map_err(data_err(&field))?;
            let n = count_lines(&path);
            nb += a
                .benign_limit
                .as_ref()
                .and_then(|l| l.for_source(i))
                .map_or(n, |l| n.min(l));
        }
        // Every prompt the study evaluates is kept out of the alignment set, whatever the
        // benchmark's `limit` (so a larger limit later does not meet a trained prompt).
        let held_out: Vec<BenchmarkRef> = benches
            .iter()
            .map(|(b, _)| BenchmarkRef {
                limit: None,
                sample_seed: 0,
                ..b.clone()
            })
            .collect();
        Ok(Some(self.push(PlannedStep {
            label: "alignment set".into(),
            spec: StepSpec::AlignData {
                refusals: a.refusals.clone(),
                plain_refusals: a.plain_refusals,
                harmful: a.harmful.clone(),
                benign: a.benign.clone(),
                harmful_limit: a.harmful_limit,
                benign_limit: a.benign_limit.clone(),
                split_seed: study.split_seed,
                test_fraction: study.test_fraction,
                held_out,
            },
            deps: vec![],
            factors: BTreeMap::new(),
            size: nh + nb,
        })))
    }

    /// Model `m`'s conditions: the base model; the aligned model (with `[align]`, an align
    /// step); one tuned model per dataset (with `[tune]`, a tune step each, from the aligned
    /// model when there is one).
    fn conditions(
        &mut self,
        m: &ModelConfig,
        model_step: usize,
        align_data: Option<usize>,
        datasets: &[DatasetNode],
    ) -> Vec<Condition> {
        let cfg = self.cfg;
        let mut out = Vec::new();
        let mut base_f = BTreeMap::new();
        base_f.insert("model".to_string(), m.name.clone());
        base_f.insert("stage".to_string(), "base".to_string());
        out.push(Condition {
            step: model_step,
            factors: base_f,
            seed: 0,
        });
        let mut start = model_step;
        if let (Some(a), Some(ad)) = (&cfg.align, align_data) {
            let mut f = BTreeMap::new();
            f.insert("model".to_string(), m.name.clone());
            f.insert("stage".to_string(), "aligned".to_string());
            let size = self.steps[ad].size;
            let idx = self.push(PlannedStep {
                label: format!("align {}", m.name),
                spec: StepSpec::Align {
                    settings: serde_json::to_value(&a.settings).unwrap_or_default(),
                    allow_truncation: a.allow_truncation,
                    external: external(cfg, m, a.trainer()),
                },
                deps: vec![model_step, ad],
                factors: f.clone(),
                size,
            });
            out.push(Condition {
                step: idx,
                factors: f,
                seed: 0,
            });
            start = idx;
        }
        let aligned = (start != model_step).then_some(start);
        if let Some(t) = &cfg.tune {
            for d in datasets {
                // The baseline itself trains as configured (and is the same step either way).
                let baseline = (t.match_ == TrainMatch::Tokens)
                    .then(|| baseline_of(datasets, d))
                    .filter(|&b| b != d.step);
                let c = self.tune(m, t, start, d, baseline, None);
                out.push(c.clone());
                let arms = cfg.mitigations.as_ref().filter(|mi| {
                    d.factors.get("mitigation").map(String::as_str) == Some("none")
                        && d.factors.get("variant").is_some_and(|v| mi.applies_to(v))
                });
                if let Some(mi) = arms {
                    if let Some(a) = &mi.anchor {
                        let anchor = Anchor {
                            arm: a.clone(),
                            align_data: align_data.filter(|_| a.on == "refusals"),
                        };
                        let ac = self.tune(m, t, start, d, baseline, Some(anchor));
                        out.push(ac);
                    }
                    if let (Some(p), Some(al)) = (&mi.project, aligned) {
                        out.push(self.project(p, &c, al));
                    }
                }
            }
        }
        out
    }

    /// The `project` arm of a tuned condition `c`: its adapter projected onto the alignment
    /// subspace of the align step `aligned`.
    fn project(&mut self, p: &ProjectArm, c: &Condition, aligned: usize) -> Condition {
        let mut f = c.factors.clone();
        f.insert("mitigation".to_string(), "project".to_string());
        let threshold = match (p.threshold, p.share) {
            (None, None) => Some(DEFAULT_PROJECT_THRESHOLD),
            (t, _) => t,
        };
        let idx = self.push(PlannedStep {
            label: format!("project {}", describe(&c.factors)),
            spec: StepSpec::Project {
                projector: p.projector.clone(),
                threshold,
                share: p.share,
            },
            deps: vec![c.step, aligned],
            factors: f.clone(),
            size: 0,
        });
        Condition {
            step: idx,
            factors: f,
            seed: c.seed,
        }
    }

    /// A condition's utility step (`[utility]`): held-out loss and multiple-choice accuracy.
    fn utility(&mut self, c: &Condition) -> Result<(), PlanError> {
        let Some(u) = &self.cfg.utility else {
            return Ok(());
        };
        let (heldout, skip) = if u.heldout == "auto" {
            (self.cfg.data.base.clone(), self.cfg.data.limit.unwrap_or(0))
        } else {
            (u.heldout.clone(), 0)
        };
        let hash_of = |field: &str, spec: &str| -> Result<String, PlanError> {
            let path = resolve_dataset(spec).map_err(data_err(field))?;
            hash_file(&path).map_err(|e| PlanError::Invalid {
                field: field.into(),
                message: format!("{}: {e}", path.display()),
            })
        };
        let heldout_hash = hash_of("utility.heldout", &heldout)?;
        let mcq_hash = hash_of("utility.mcq", &u.mcq)?;
        let mut f = c.factors.clone();
        f.insert("utility".to_string(), "utility".to_string());
        self.push(PlannedStep {
            label: format!("utility {}", describe(&c.factors)),
            spec: StepSpec::Utility {
                heldout,
                heldout_hash,
                heldout_skip: skip,
                heldout_limit: u.heldout_limit,
                mcq: u.mcq.clone(),
                mcq_hash,
                mcq_limit: u.mcq_limit,
            },
            deps: vec![c.step],
            factors: f,
            size: u.heldout_limit + if u.mcq_limit > 0 { u.mcq_limit } else { 66 },
        });
        Ok(())
    }

    /// The tune step of model `m` (from step `start`) on dataset `d`; with `baseline` (`match
    /// = "tokens"`), its trained tokens are matched to those of the baseline dataset step.
    fn tune(
        &mut self,
        m: &ModelConfig,
        t: &TuneSection,
        start: usize,
        d: &DatasetNode,
        baseline: Option<usize>,
        anchor: Option<Anchor>,
    ) -> Condition {
        let mut f = d.factors.clone();
        f.insert("model".to_string(), m.name.clone());
        f.insert("stage".to_string(), "tuned".to_string());
        if anchor.is_some() {
            f.insert("mitigation".to_string(), "anchor".to_string());
        }
        let mut settings = t.settings.clone();
        if let Some(a) = &anchor {
            // The tuning base with the adapter switched off is the reference: the aligned model.
            settings.insert("anchor".into(), toml::Value::String("base".into()));
            settings.insert("anchor_beta".into(), toml::Value::Float(a.arm.beta));
            if a.align_data.is_some() {
                settings.insert(
                    "anchor_batch_size".into(),
                    toml::Value::Integer(a.arm.batch_size as i64),
                );
            }
        }
        let label = format!(
            "tune {} on {}{}{}{} seed {}",
            m.name,
            f["variant"],
            f.get("mitigation")
                .filter(|x| *x != "none")
                .map(|x| format!(" mitigation {x}"))
                .unwrap_or_default(),
            f.get("mix")
                .map(|x| format!(" mix {x}"))
                .unwrap_or_default(),
            f.get("selection")
                .map(|x| format!(" select {x}"))
                .unwrap_or_default(),
            d.seed
        );
        let idx = self.push(PlannedStep {
            label,
            spec: StepSpec::Tune {
                settings: serde_json::to_value(&settings).unwrap_or_default(),
                seed: d.seed,
                allow_truncation: t.allow_truncation,
                match_tokens: baseline.is_some(),
                anchor_refusals: anchor.as_ref().is_some_and(|a| a.align_data.is_some()),
                external: external(self.cfg, m, t.trainer()),
            },
            // The anchor set (the alignment set's refusals) comes after the tuning data and
            // the baseline, so the train stage finds them by position.
            deps: [start, d.step]
                .into_iter()
                .chain(baseline)
                .chain(anchor.and_then(|a| a.align_data))
                .collect(),
            factors: f.clone(),
            size: d.examples,
        });
        Condition {
            step: idx,
            factors: f,
            seed: d.seed,
        }
    }

    /// A condition's evaluation: per benchmark a generate step, judged by every judge and
    /// scored by every reward model.
    fn evaluations(
        &mut self,
        c: &Condition,
        benches: &[(BenchmarkRef, PromptSet)],
        judges: &[JudgeConfig],
    ) {
        let cfg = self.cfg;
        let who = describe(&c.factors);
        for (b, prompts) in benches {
            let mut gf = c.factors.clone();
            gf.insert("benchmark".to_string(), b.name.clone());
            let n = prompts.len();
            let g = self.push(PlannedStep {
                label: format!("generate {who} / {}", b.name),
                spec: StepSpec::Generate {
                    benchmark: b.clone(),
                    sampling: SamplingSpec {
                        max_new_tokens: cfg.generation.max_new_tokens,
                        temperature: cfg.generation.temperature,
                        seed: c.seed,
                        chunk_size: cfg.generation.chunk_size,
                        weights: cfg.generation.weights,
                    },
                },
                deps: vec![c.step],
                factors: gf.clone(),
                size: n,
            });
            for j in judges {
                let mut jf = gf.clone();
                jf.insert("judge".to_string(), j.name.clone());
                self.push(PlannedStep {
                    label: format!("judge {who} / {} by {}", b.name, j.name),
                    spec: StepSpec::Judge {
                        name: j.name.clone(),
                        judge_kind: j.kind,
                        spec: j.spec.clone(),
                        settings: serde_json::to_value(&j.settings).unwrap_or_default(),
                    },
                    deps: vec![g],
                    factors: jf,
                    size: n,
                });
            }
            for r in &cfg.reward_models {
                let mut rf = gf.clone();
                rf.insert("rm".to_string(), r.name.clone());
                self.push(PlannedStep {
                    label: format!("score {who} / {} by {}", b.name, r.name),
                    spec: StepSpec::Score {
                        name: r.name.clone(),
                        spec: r.spec.clone(),
                        settings: serde_json::to_value(&r.settings).unwrap_or_default(),
                    },
                    deps: vec![g],
                    factors: rf,
                    size: n,
                });
            }
        }
    }
}

/// The baseline dataset step of `d` under `match = "tokens"`: the first variant's dataset at
/// the same seed, mixing level and selection.
fn baseline_of(datasets: &[DatasetNode], d: &DatasetNode) -> usize {
    let same = |a: &DatasetNode| {
        a.seed == d.seed
            && a.factors.get("mix") == d.factors.get("mix")
            && a.factors.get("selection") == d.factors.get("selection")
    };
    datasets.iter().find(|a| same(a)).unwrap_or(d).step
}

/// A short description of a model condition from its factors.
pub fn describe(f: &BTreeMap<String, String>) -> String {
    let mut s = format!(
        "{} {}",
        f.get("model").map(String::as_str).unwrap_or("?"),
        f.get("stage").map(String::as_str).unwrap_or("")
    );
    if let Some(v) = f.get("variant") {
        s.push(' ');
        s.push_str(v);
    }
    if let Some(v) = f.get("mitigation").filter(|v| *v != "none") {
        let _ = write!(s, " mitigation {v}");
    }
    if let Some(v) = f.get("mix") {
        let _ = write!(s, " mix {v}");
    }
    if let Some(v) = f.get("selection") {
        if v != "all" {
            let _ = write!(s, " select {v}");
        }
    }
    if let (Some(v), Some(_)) = (f.get("seed"), f.get("variant")) {
        let _ = write!(s, " seed {v}");
    }
    s.trim().to_string()
}

impl Plan {
    /// Steps and rows by kind: (kind, steps, rows or examples).
    pub fn by_kind(&self) -> Vec<(StepKind, usize, usize)> {
        StepKind::ALL
            .iter()
            .filter_map(|&k| {
                let steps: Vec<&PlannedStep> =
                    self.steps.iter().filter(|s| s.kind() == k).collect();
                if steps.is_empty() {
                    None
                } else {
                    Some((k, steps.len(), steps.iter().map(|s| s.size).sum()))
                }
            })
            .collect()
    }

    /// The `--dry-run` text: steps by kind, what each produces, and the total size.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "Study `{}`: {} steps", self.name, self.steps.len());
        let _ = writeln!(
            o,
            "  {:<11} {:>6}  {:>10}  produces",
            "kind", "steps", "size"
        );
        for (k, n, size) in self.by_kind() {
            let what = match k {
                StepKind::Model => "model handles",
                StepKind::Transform | StepKind::Mix | StepKind::Select | StepKind::AlignData => {
                    "dataset examples"
                }
                StepKind::Audit => "audited examples",
                StepKind::Align | StepKind::Tune => "training examples (one epoch)",
                StepKind::Generate => "generations",
                StepKind::Judge => "judgments",
                StepKind::Score => "reward-model scores",
                StepKind::Project => "projected adapters",
                StepKind::Utility => "utility measurements (held-out answers + questions)",
            };
            let _ = writeln!(o, "  {:<11} {:>6}  {:>10}  {what}", k.as_str(), n, size);
        }
        let rows: usize = self
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    s.kind(),
                    StepKind::Generate | StepKind::Judge | StepKind::Score
                )
            })
            .map(|s| s.size)
            .sum();
        let train: usize = self
            .steps
            .iter()
            .filter(|s| matches!(s.kind(), StepKind::Align | StepKind::Tune))
            .map(|s| s.size)
            .sum();
        let _ = writeln!(
            o,
            "Total: {} steps, {} model calls (generate + judge + score rows), {} training examples per epoch",
            self.steps.len(),
            rows,
            train
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(limit: Option<usize>, sample_seed: u64) -> BenchmarkRef {
        BenchmarkRef {
            name: "adv".into(),
            source: "advbench".into(),
            content_hash: String::new(),
            harmful: true,
            split: SplitChoice::Test,
            split_seed: 0,
            test_fraction: 0.5,
            limit,
            sample_seed,
        }
    }

    fn ids(set: &PromptSet) -> Vec<String> {
        set.items.iter().map(|i| i.id.clone()).collect()
    }

    #[test]
    fn limit_draws_a_seeded_sample_that_grows_as_a_superset() {
        let set = PromptSet::load("advbench", None).unwrap();
        let all = ids(&select_prompts(&set, &bench(None, 0)));
        let small = ids(&select_prompts(&set, &bench(Some(16), 0)));
        let large = ids(&select_prompts(&set, &bench(Some(48), 0)));
        assert_eq!((small.len(), large.len()), (16, 48));
        assert!(small.iter().all(|id| large.contains(id)));
        // Not the first N of the split, and in the split's order.
        assert_ne!(small, all[..16].to_vec());
        let mut at = all.iter();
        assert!(small.iter().all(|id| at.any(|x| x == id)));
        // The same seed draws the same sample; another seed another one.
        assert_eq!(small, ids(&select_prompts(&set, &bench(Some(16), 0))));
        assert_ne!(small, ids(&select_prompts(&set, &bench(Some(16), 7))));
        // A limit past the split's size takes it all.
        assert_eq!(
            ids(&select_prompts(&set, &bench(Some(all.len() + 5), 3))),
            all
        );
    }
}
