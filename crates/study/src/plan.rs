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
    match t {
        Toggle::Keep => "keep",
        Toggle::Add => "add",
        Toggle::Remove => "remove",
    }
}

fn structure_str(s: StructureLevel) -> &'static str {
    match s {
        StructureLevel::Keep => "keep",
        StructureLevel::Plain => "plain",
        StructureLevel::Itemized => "itemized",
        StructureLevel::Markdown => "markdown",
    }
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
        Toggle::Keep => {}
    }
    match r {
        Toggle::Add => parts.push("roleplay".into()),
        Toggle::Remove => parts.push("no-roleplay".into()),
        Toggle::Keep => {}
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
    };
    let items = select_prompts(&set, &r);
    Ok((r, items))
}

/// The prompts a generate step runs: the chosen split, cut to `limit`.
pub fn select_prompts(set: &PromptSet, b: &BenchmarkRef) -> PromptSet {
    let mut s = match b.split {
        SplitChoice::All => set.clone(),
        SplitChoice::Test => set.split(Split::Test, b.split_seed, b.test_fraction),
        SplitChoice::Train => set.split(Split::Train, b.split_seed, b.test_fraction),
    };
    if let Some(l) = b.limit {
        s.items.truncate(l);
    }
    s
}

pub fn plan(cfg: &StudyConfig) -> Result<Plan, PlanError> {
    let mut steps: Vec<PlannedStep> = Vec::new();
    let push = |steps: &mut Vec<PlannedStep>, s: PlannedStep| {
        steps.push(s);
        steps.len() - 1
    };
    let study = &cfg.study;

    // Models.
    let mut model_steps = Vec::new();
    for (i, m) in cfg.models.iter().enumerate() {
        let field = format!("models[{i}].spec");
        let spec = resolve_model_spec(&m.spec).map_err(data_err(&field))?;
        let mut factors = BTreeMap::new();
        factors.insert("model".to_string(), m.name.clone());
        let idx = push(
            &mut steps,
            PlannedStep {
                label: format!("model {}", m.name),
                spec: StepSpec::Model {
                    name: m.name.clone(),
                    spec,
                    concurrency: m.concurrency,
                    endpoints: m.endpoints.clone(),
                },
                deps: vec![],
                factors,
                size: 0,
            },
        );
        model_steps.push(idx);
    }

    // Dataset variants.
    let base_path = resolve_dataset(&cfg.data.base).map_err(data_err("data.base"))?;
    let base_hash = hash_file(&base_path).map_err(|e| PlanError::Invalid {
        field: "data.base".into(),
        message: format!("{}: {e}", base_path.display()),
    })?;
    let mut base_n = count_lines(&base_path);
    if let Some(l) = cfg.data.limit {
        base_n = base_n.min(l);
    }
    let mut datasets: Vec<DatasetNode> = Vec::new();
    for &seed in &study.seeds {
        for (s, i, r) in variant_levels(&cfg.factors) {
            let name = variant_name(s, i, r);
            let mut factors = BTreeMap::new();
            factors.insert("variant".to_string(), name.clone());
            factors.insert("structure".to_string(), structure_str(s).to_string());
            factors.insert("identity".to_string(), toggle_str(i).to_string());
            factors.insert("roleplay".to_string(), toggle_str(r).to_string());
            factors.insert("seed".to_string(), seed.to_string());
            let t = push(
                &mut steps,
                PlannedStep {
                    label: format!("transform {name} seed {seed}"),
                    spec: StepSpec::Transform {
                        base: cfg.data.base.clone(),
                        base_hash: base_hash.clone(),
                        limit: cfg.data.limit,
                        structure: structure_str(s).into(),
                        identity: toggle_str(i).into(),
                        roleplay: toggle_str(r).into(),
                        persona_type: cfg.factors.persona_type.clone(),
                        placement: cfg.factors.placement.clone(),
                        seed,
                    },
                    deps: vec![],
                    factors: factors.clone(),
                    size: base_n,
                },
            );
            push(
                &mut steps,
                PlannedStep {
                    label: format!("audit {name} seed {seed}"),
                    spec: StepSpec::Audit,
                    deps: vec![t],
                    factors: factors.clone(),
                    size: base_n,
                },
            );
            let levels: Vec<f64> = match &cfg.mixing {
                Some(m) => m.levels.clone(),
                None => vec![0.0],
            };
            for level in levels {
                let mut f = factors.clone();
                if cfg.mixing.is_some() {
                    f.insert("mix".to_string(), format!("{level}"));
                }
                let (node, n) = match (&cfg.mixing, level > 0.0) {
                    (Some(m), true) => {
                        let added = ((level * base_n as f64) / (1.0 - level)).round() as usize;
                        let idx = push(
                            &mut steps,
                            PlannedStep {
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
                            },
                        );
                        (idx, base_n + added)
                    }
                    _ => (t, base_n),
                };
                if cfg.selection.is_some() {
                    f.insert("selection".to_string(), "all".to_string());
                }
                datasets.push(DatasetNode {
                    step: node,
                    factors: f.clone(),
                    seed,
                    examples: n,
                });
                if let Some(sel) = &cfg.selection {
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
                    for &keep in &sel.keep {
                        for &strategy in &strategies {
                            let sname = format!(
                                "{}-{keep}",
                                serde_json::to_value(strategy)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default()
                            );
                            let mut f2 = f.clone();
                            f2.insert("selection".to_string(), sname.clone());
                            let kept = ((n as f64) * keep).round() as usize;
                            let idx = push(
                                &mut steps,
                                PlannedStep {
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
                                },
                            );
                            datasets.push(DatasetNode {
                                step: idx,
                                factors: f2,
                                seed,
                                examples: kept,
                            });
                        }
                    }
                }
            }
        }
    }

    // Benchmarks (loaded now, for their content hash and size).
    let mut benches = Vec::new();
    for b in &cfg.benchmarks {
        benches.push(benchmark_ref(b, study)?);
    }
    let default_judge = JudgeConfig {
        name: "keyword".into(),
        kind: JudgeKind::Keyword,
        spec: None,
        settings: Default::default(),
    };
    let judges: Vec<&JudgeConfig> = if cfg.judges.is_empty() {
        vec![&default_judge]
    } else {
        cfg.judges.iter().collect()
    };

    // Alignment set.
    let align_data = match &cfg.align {
        Some(a) => {
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
                nb += a.benign_limit.map_or(n, |l| n.min(l));
            }
            // Every prompt the study evaluates is kept out of the alignment set, whatever the
            // benchmark's `limit` (so a larger limit later does not meet a trained prompt).
            let held_out: Vec<BenchmarkRef> = benches
                .iter()
                .map(|(b, _)| BenchmarkRef {
                    limit: None,
                    ..b.clone()
                })
                .collect();
            Some(push(
                &mut steps,
                PlannedStep {
                    label: "alignment set".into(),
                    spec: StepSpec::AlignData {
                        refusals: a.refusals.clone(),
                        harmful: a.harmful.clone(),
                        benign: a.benign.clone(),
                        harmful_limit: a.harmful_limit,
                        benign_limit: a.benign_limit,
                        split_seed: study.split_seed,
                        test_fraction: study.test_fraction,
                        held_out,
                    },
                    deps: vec![],
                    factors: BTreeMap::new(),
                    size: nh + nb,
                },
            ))
        }
        None => None,
    };

    // Per model: base, aligned, tuned variants; each evaluated on every benchmark.
    for (mi, m) in cfg.models.iter().enumerate() {
        let model_step = model_steps[mi];
        let mut targets: Vec<(usize, BTreeMap<String, String>, u64)> = Vec::new();
        let mut base_f = BTreeMap::new();
        base_f.insert("model".to_string(), m.name.clone());
        base_f.insert("stage".to_string(), "base".to_string());
        targets.push((model_step, base_f, 0));
        let mut start = model_step;
        if let (Some(a), Some(ad)) = (&cfg.align, align_data) {
            let mut f = BTreeMap::new();
            f.insert("model".to_string(), m.name.clone());
            f.insert("stage".to_string(), "aligned".to_string());
            let size = steps[ad].size;
            let idx = push(
                &mut steps,
                PlannedStep {
                    label: format!("align {}", m.name),
                    spec: StepSpec::Align {
                        settings: serde_json::to_value(&a.settings).unwrap_or_default(),
                        allow_truncation: a.allow_truncation,
                    },
                    deps: vec![model_step, ad],
                    factors: f.clone(),
                    size,
                },
            );
            targets.push((idx, f, 0));
            start = idx;
        }
        if let Some(t) = &cfg.tune {
            for d in &datasets {
                let mut f = d.factors.clone();
                f.insert("model".to_string(), m.name.clone());
                f.insert("stage".to_string(), "tuned".to_string());
                let label = format!(
                    "tune {} on {}{}{} seed {}",
                    m.name,
                    f["variant"],
                    f.get("mix")
                        .map(|x| format!(" mix {x}"))
                        .unwrap_or_default(),
                    f.get("selection")
                        .map(|x| format!(" select {x}"))
                        .unwrap_or_default(),
                    d.seed
                );
                let idx = push(
                    &mut steps,
                    PlannedStep {
                        label,
                        spec: StepSpec::Tune {
                            settings: serde_json::to_value(&t.settings).unwrap_or_default(),
                            seed: d.seed,
                            allow_truncation: t.allow_truncation,
                        },
                        deps: vec![start, d.step],
                        factors: f.clone(),
                        size: d.examples,
                    },
                );
                targets.push((idx, f, d.seed));
            }
        }
        for (target, f, seed) in &targets {
            for (b, prompts) in &benches {
                let mut gf = f.clone();
                gf.insert("benchmark".to_string(), b.name.clone());
                let n = prompts.len();
                let g = push(
                    &mut steps,
                    PlannedStep {
                        label: format!("generate {} / {}", describe(f), b.name),
                        spec: StepSpec::Generate {
                            benchmark: b.clone(),
                            sampling: SamplingSpec {
                                max_new_tokens: cfg.generation.max_new_tokens,
                                temperature: cfg.generation.temperature,
                                seed: *seed,
                                chunk_size: cfg.generation.chunk_size,
                            },
                        },
                        deps: vec![*target],
                        factors: gf.clone(),
                        size: n,
                    },
                );
                for j in &judges {
                    let mut jf = gf.clone();
                    jf.insert("judge".to_string(), j.name.clone());
                    push(
                        &mut steps,
                        PlannedStep {
                            label: format!("judge {} / {} by {}", describe(f), b.name, j.name),
                            spec: StepSpec::Judge {
                                name: j.name.clone(),
                                judge_kind: j.kind,
                                spec: j.spec.clone(),
                                settings: serde_json::to_value(&j.settings).unwrap_or_default(),
                            },
                            deps: vec![g],
                            factors: jf,
                            size: n,
                        },
                    );
                }
                for r in &cfg.reward_models {
                    let mut rf = gf.clone();
                    rf.insert("rm".to_string(), r.name.clone());
                    push(
                        &mut steps,
                        PlannedStep {
                            label: format!("score {} / {} by {}", describe(f), b.name, r.name),
                            spec: StepSpec::Score {
                                name: r.name.clone(),
                                spec: r.spec.clone(),
                                settings: serde_json::to_value(&r.settings).unwrap_or_default(),
                            },
                            deps: vec![g],
                            factors: rf,
                            size: n,
                        },
                    );
                }
            }
        }
    }
    Ok(Plan {
        name: study.name.clone(),
        steps,
    })
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
