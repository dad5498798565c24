//! The runner: walks a plan in order, keys each step by the hash of its settings, its inputs'
//! keys and the program version, reuses finished steps from the store, and runs the rest with
//! the stage the [`Registry`] holds for their kind. A failed step is recorded and its dependents
//! are skipped; independent steps go on, and the summary says what failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::hash::{hash_json, PROGRAM_VERSION};
use crate::lock::{LockError, StudyLock};
use crate::plan::Plan;
use crate::step::*;
use crate::store::{Store, StoreError};

/// File name of the store inside a study directory.
pub const STORE_FILE: &str = "study.db";

/// The key of every step of a plan, in plan order.
pub fn step_keys(plan: &Plan) -> Vec<String> {
    let mut keys: Vec<String> = Vec::with_capacity(plan.steps.len());
    for s in &plan.steps {
        let deps: Vec<&String> = s.deps.iter().map(|&d| &keys[d]).collect();
        let mut spec = serde_json::to_value(&s.spec).unwrap_or_default();
        // Who gets a remote model's API key changes no result, so no step's key.
        if let Some(o) = spec.as_object_mut() {
            o.remove("access");
            // Where and how an external trainer runs changes no result either.
            if let Some(Json::Object(e)) = o.get_mut("external") {
                for k in crate::external_train::UNKEYED {
                    e.remove(*k);
                }
            }
        }
        let material = json!({
            "program": PROGRAM_VERSION,
            "spec": spec,
            "inputs": deps,
        });
        keys.push(hash_json(&material));
    }
    keys
}

/// The plan as the runner records it in the store (the `plan` column of `studies`); the report
/// and the labelling commands read it back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredPlan {
    pub steps: Vec<StoredStep>,
}

/// One step of a [`StoredPlan`]; `deps` are plan indices, like [`PlannedStep::deps`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredStep {
    pub key: String,
    /// [`StepKind::as_str`].
    pub kind: String,
    pub label: String,
    pub factors: BTreeMap<String, String>,
    pub deps: Vec<usize>,
    pub size: usize,
}

impl StoredPlan {
    /// `plan` with its step `keys` (from [`step_keys`]).
    pub fn new(plan: &Plan, keys: &[String]) -> StoredPlan {
        let steps = plan
            .steps
            .iter()
            .zip(keys)
            .map(|(s, k)| StoredStep {
                key: k.clone(),
                kind: s.kind().as_str().to_string(),
                label: s.label.clone(),
                factors: s.factors.clone(),
                deps: s.deps.clone(),
                size: s.size,
            })
            .collect();
        StoredPlan { steps }
    }

    /// Reads the stored JSON; missing fields read as empty, and a plan that does not parse
    /// reads as one without steps.
    pub fn from_json(plan: &Json) -> StoredPlan {
        serde_json::from_value(plan.clone()).unwrap_or_default()
    }

    /// The key of `step`'s first input (the generate step a judge or score step reads); empty
    /// when it has none.
    pub fn first_input_key(&self, step: &StoredStep) -> String {
        step.deps
            .first()
            .and_then(|&d| self.steps.get(d))
            .map(|d| d.key.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// A step is starting (`index` of `total`).
    Start {
        index: usize,
        total: usize,
        label: String,
        kind: StepKind,
        size: usize,
    },
    /// A step was found in status `running`: a run that held the study lock stopped (killed,
    /// crashed) in the middle of it. Nobody runs it now (this run holds the lock), so it is done
    /// again; a stage resumes from what the step kept (stored rows, checkpoints).
    Interrupted {
        index: usize,
        label: String,
    },
    /// A step was found finished in the store.
    Reused {
        index: usize,
        label: String,
    },
    Progress {
        index: usize,
        done: usize,
        total: usize,
    },
    Finished {
        index: usize,
        label: String,
    },
    Failed {
        index: usize,
        label: String,
        error: String,
    },
    /// Not run because an input failed.
    Skipped {
        index: usize,
        label: String,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub executed: usize,
    pub reused: usize,
    pub failed: Vec<(String, String)>,
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs `plan` in `dir` (the store is `dir/study.db`, step files under `dir/steps/`), holding
/// the study's lock ([`StudyLock`]) from start to end: a second runner on `dir` fails at once.
/// Steps left `running` by a run that stopped are done again ([`RunEvent::Interrupted`]).
pub fn run_plan(
    plan: &Plan,
    config: &serde_json::Value,
    dir: &Path,
    registry: &Registry,
    events: &mut dyn FnMut(&RunEvent),
) -> Result<RunSummary, RunError> {
    std::fs::create_dir_all(dir).map_err(|e| RunError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let _lock = StudyLock::acquire(dir)?;
    let mut store = Store::open(&dir.join(STORE_FILE))?;
    let keys = step_keys(plan);
    let plan_json = serde_json::to_value(StoredPlan::new(plan, &keys)).unwrap_or_default();
    store.put_study(&plan.name, &plan.name, config, &plan_json)?;
    let total = plan.steps.len();
    let mut outputs: Vec<Option<StepOutput>> = vec![None; total];
    let mut summary = RunSummary {
        steps: total,
        ..Default::default()
    };
    let mut in_flight: Vec<InFlight> = Vec::new();
    for index in run_order(plan) {
        let step = &plan.steps[index];
        let key = &keys[index];
        if let Some(rec) = store.step(key)? {
            if rec.status == "done" {
                if let Some(mut out) = rec
                    .output
                    .and_then(|o| serde_json::from_value::<StepOutput>(o).ok())
                {
                    // Key access is not in the step's key: take today's from the plan.
                    if let (StepSpec::Model { access, .. }, StepOutput::Model(m)) =
                        (&step.spec, &mut out)
                    {
                        m.access = access.clone();
                    }
                    outputs[index] = Some(out);
                    summary.reused += 1;
                    events(&RunEvent::Reused {
                        index,
                        label: step.label.clone(),
                    });
                    continue;
                }
            }
            if rec.status == "running" {
                events(&RunEvent::Interrupted {
                    index,
                    label: step.label.clone(),
                });
            }
        }
        // An input still training in the background is waited for.
        let waiting: Vec<usize> = step
            .deps
            .iter()
            .copied()
            .filter(|d| in_flight.iter().any(|f| f.index == *d))
            .collect();
        for d in waiting {
            if let Some(pos) = in_flight.iter().position(|f| f.index == d) {
                let f = in_flight.remove(pos);
                let fi = f.index;
                let result = f.join();
                record(
                    &mut store,
                    plan,
                    &keys,
                    fi,
                    result,
                    &mut outputs,
                    &mut summary,
                    events,
                )?;
            }
        }
        let inputs: Option<Vec<StepOutput>> =
            step.deps.iter().map(|&d| outputs[d].clone()).collect();
        let Some(inputs) = inputs else {
            summary.skipped += 1;
            events(&RunEvent::Skipped {
                index,
                label: step.label.clone(),
            });
            continue;
        };
        let input_keys: Vec<String> = step.deps.iter().map(|&d| keys[d].clone()).collect();
        events(&RunEvent::Start {
            index,
            total,
            label: step.label.clone(),
            kind: step.kind(),
            size: step.size,
        });
        let spec = serde_json::to_value(&step.spec).unwrap_or_default();
        let factors = serde_json::to_value(&step.factors).unwrap_or_default();
        store.begin_step(key, step.kind().as_str(), &step.label, &spec, &factors)?;
        summary.executed += 1;
        let step_dir = dir
            .join("steps")
            .join(format!("{}-{}", step.kind().as_str(), &key[..16]));
        let parallel = parallel_train(step);
        if let (Some(n), Some(stage)) = (parallel, registry.get(step.kind())) {
            // An external train step: a child process, run beside the steps that follow.
            while in_flight.len() >= n {
                let f = in_flight.remove(0);
                let fi = f.index;
                let result = f.join();
                record(
                    &mut store,
                    plan,
                    &keys,
                    fi,
                    result,
                    &mut outputs,
                    &mut summary,
                    events,
                )?;
            }
            let (stage, step, key, db) = (
                stage.clone(),
                step.clone(),
                key.clone(),
                dir.join(STORE_FILE),
            );
            let handle = std::thread::spawn(move || -> Result<StepOutput, String> {
                let mut store = Store::open(&db).map_err(|e| e.to_string())?;
                let mut progress = |_: &StepProgress| {};
                let mut ctx = StepContext {
                    key: &key,
                    input_keys: &input_keys,
                    dir: step_dir,
                    store: &mut store,
                    progress: &mut progress,
                };
                stage
                    .run(&step, &inputs, &mut ctx)
                    .map_err(|e| e.to_string())
            });
            in_flight.push(InFlight { index, handle });
            continue;
        }
        let result = match registry.get(step.kind()) {
            None => Err(missing(step.kind())),
            Some(stage) => {
                let mut progress = |p: &StepProgress| {
                    events(&RunEvent::Progress {
                        index,
                        done: p.done,
                        total: p.total,
                    })
                };
                let mut ctx = StepContext {
                    key,
                    input_keys: &input_keys,
                    dir: step_dir,
                    store: &mut store,
                    progress: &mut progress,
                };
                stage.run(step, &inputs, &mut ctx)
            }
        };
        let result = result.map_err(|e| e.to_string());
        record(
            &mut store,
            plan,
            &keys,
            index,
            result,
            &mut outputs,
            &mut summary,
            events,
        )?;
    }
    for f in in_flight {
        let index = f.index;
        let result = f.join();
        record(
            &mut store,
            plan,
            &keys,
            index,
            result,
            &mut outputs,
            &mut summary,
            events,
        )?;
    }
    Ok(summary)
}

/// The order steps are started in: plan order, except that an external train step that may
/// run in parallel is moved up to just after its last input, so that several of them are
/// started before the steps that wait for them (in plan order each tune step is followed by
/// its own evaluations). Every step still comes after its inputs.
fn run_order(plan: &Plan) -> Vec<usize> {
    let n = plan.steps.len();
    let mut key = vec![0.0f64; n];
    for (i, s) in plan.steps.iter().enumerate() {
        key[i] = if parallel_train(s).is_some() {
            let after = s.deps.iter().map(|&d| key[d]).fold(-1.0, f64::max);
            after + 0.25 + i as f64 / (4.0 * (n + 1) as f64)
        } else {
            i as f64
        };
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key[a].total_cmp(&key[b]));
    order
}

/// An external train step running on its own thread.
struct InFlight {
    index: usize,
    handle: std::thread::JoinHandle<Result<StepOutput, String>>,
}

impl InFlight {
    fn join(self) -> Result<StepOutput, String> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err("the step's thread panicked".into()))
    }
}

/// `Some(max_parallel_train)` for an external align/tune step whose section allows more than
/// one at a time; those run on their own threads (each waits on a child process).
fn parallel_train(step: &PlannedStep) -> Option<usize> {
    match &step.spec {
        StepSpec::Align {
            external: Some(e), ..
        }
        | StepSpec::Tune {
            external: Some(e), ..
        } if e.max_parallel_train > 1 => Some(e.max_parallel_train),
        _ => None,
    }
}

/// Stores a step's result and reports it.
#[allow(clippy::too_many_arguments)]
fn record(
    store: &mut Store,
    plan: &Plan,
    keys: &[String],
    index: usize,
    result: Result<StepOutput, String>,
    outputs: &mut [Option<StepOutput>],
    summary: &mut RunSummary,
    events: &mut dyn FnMut(&RunEvent),
) -> Result<(), RunError> {
    let label = plan.steps[index].label.clone();
    match result {
        Ok(out) => {
            store.finish_step(
                &keys[index],
                &serde_json::to_value(&out).unwrap_or_default(),
            )?;
            outputs[index] = Some(out);
            events(&RunEvent::Finished { index, label });
        }
        Err(msg) => {
            store.fail_step(&keys[index], &msg)?;
            summary.failed.push((label.clone(), msg.clone()));
            events(&RunEvent::Failed {
                index,
                label,
                error: msg,
            });
        }
    }
    Ok(())
}

/// The error for a step whose kind has no stage in the registry. The binary always runs with
/// [`crate::stages::builtin_registry`], which has a stage for every kind, so only a registry
/// built by hand (a test, a program embedding the runner) meets this.
pub fn missing(kind: StepKind) -> StageError {
    StageError::Missing {
        kind,
        reason: String::new(),
        hint: format!(
            "register a stage for `{kind}` in the registry given to run_plan (safetune_study::stages::builtin_registry has one for every kind)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn parallel_external_train_steps_start_right_after_their_inputs() {
        let ext = crate::external_train::ExternalTrain {
            backend: crate::external_train::Backend::Command,
            command: "true".into(),
            launcher: None,
            env: Default::default(),
            backend_settings: json!({}),
            base_model: "m".into(),
            max_parallel_train: 2,
            shared_dir: None,
        };
        let tune =
            |deps: Vec<usize>, ext: Option<crate::external_train::ExternalTrain>| PlannedStep {
                label: "tune".into(),
                spec: StepSpec::Tune {
                    settings: json!({}),
                    seed: 0,
                    allow_truncation: false,
                    match_tokens: false,
                    anchor_refusals: false,
                    external: ext,
                },
                deps,
                factors: BTreeMap::new(),
                size: 0,
            };
        let other = |deps: Vec<usize>| PlannedStep {
            label: "audit".into(),
            spec: StepSpec::Audit,
            deps,
            factors: BTreeMap::new(),
            size: 0,
        };
        // 0 data, 1 tune, 2 a step needing 1 (a project arm), 3 data, 4 tune on 3, 5 tune on 0.
        let steps = vec![
            other(vec![]),
            tune(vec![0], Some(ext.clone())),
            other(vec![1]),
            other(vec![]),
            tune(vec![3], Some(ext.clone())),
            tune(vec![0], Some(ext.clone())),
        ];
        let plan = Plan {
            name: "p".into(),
            steps,
        };
        assert_eq!(run_order(&plan), vec![0, 1, 5, 2, 3, 4]);
        // One at a time (or the local trainer): plan order.
        let mut one = ext;
        one.max_parallel_train = 1;
        let mut serial = plan.clone();
        for i in [1, 4, 5] {
            serial.steps[i] = tune(serial.steps[i].deps.clone(), Some(one.clone()));
        }
        assert_eq!(run_order(&serial), (0..6).collect::<Vec<_>>());
        serial.steps[5] = tune(vec![0], None);
        assert_eq!(run_order(&serial), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn the_stored_plan_reads_back_as_written() {
        let step = |deps: Vec<usize>| PlannedStep {
            label: format!("audit {deps:?}"),
            spec: StepSpec::Audit,
            deps,
            factors: BTreeMap::from([("variant".to_string(), "original".to_string())]),
            size: 3,
        };
        let plan = Plan {
            name: "p".into(),
            steps: vec![step(vec![]), step(vec![0])],
        };
        let keys = step_keys(&plan);
        let stored = StoredPlan::new(&plan, &keys);
        let text = serde_json::to_value(&stored).unwrap().to_string();
        assert!(
            text.starts_with(r#"{"steps":[{"deps":[],"factors":{"variant":"original"},"key":""#),
            "keys sorted as the store has always held them: {text}"
        );
        let back = StoredPlan::from_json(&serde_json::from_str(&text).unwrap());
        assert_eq!(back, stored);
        assert_eq!(back.first_input_key(&back.steps[1]), keys[0]);
        assert_eq!(back.first_input_key(&back.steps[0]), "");
        assert_eq!(
            StoredPlan::from_json(&json!("not a plan")),
            StoredPlan::default()
        );
    }
}
