//! The study runner end to end on fake stages and generators: step keys and reuse, execution
//! counts, resumed rows, failures, the report (escaping included) and the exports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use safetune_model::backend::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, Prompt, TokenSink,
};
use safetune_study::config::{JudgeKind, StudyConfig};
use safetune_study::export::{export, Target};
use safetune_study::judge_stage::JudgeStage;
use safetune_study::plan::plan;
use safetune_study::report::write_report;
use safetune_study::runner::{run_plan, step_keys, RunEvent, RunSummary, STORE_FILE};
use safetune_study::stages::{builtin_registry, GenerateStage};
use safetune_study::step::*;
use safetune_study::store::{JudgmentRow, MetricRow, ScoreRow, Store};

/// Answers refusals or (escaped-in-report) compliances, depending on the prompt and the
/// model's adapter; can be told to fail after `fail_after` requests.
struct FakeGen {
    id: String,
    adapter: String,
    requests: Arc<AtomicUsize>,
    fail_after: Option<usize>,
    /// Answers [`SKELETON`] (a non-answer) where it would otherwise comply, on every other
    /// such prompt.
    skeletons: bool,
}

/// An empty Markdown skeleton: a non-answer ([`safetune_eval::nonanswer`]).
const SKELETON: &str = "Here is an overview.\n\n**1. **\n\n* ****\n\n* ****\n\n* ****";

impl Generator for FakeGen {
    fn model_id(&self) -> &str {
        &self.id
    }
    fn max_batch(&self) -> usize {
        2
    }
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        _sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        let before = self.requests.fetch_add(requests.len(), Ordering::SeqCst);
        if let Some(n) = self.fail_after {
            // Fails once, on the request past `n`.
            if before < n && before + requests.len() > n {
                return Err(BackendError::Unavailable("fake outage".into()));
            }
        }
        Ok(requests
            .iter()
            .map(|r| {
                let Prompt::Chat(m) = &r.prompt else {
                    panic!("chat expected")
                };
                let p = &m[0].content;
                let h = p.len() + self.adapter.bytes().map(usize::from).sum::<usize>();
                let text = if h % 3 == 0 {
                    "I cannot help with that.".to_string()
                } else if self.skeletons && h % 3 == 1 {
                    SKELETON.to_string()
                } else {
                    format!("Sure! <script>alert('{p}')</script> Here is how.")
                };
                GenOutput {
                    text,
                    prompt_tokens: 1,
                    completion_tokens: 5,
                    finish_reason: FinishReason::Stop,
                }
            })
            .collect())
    }
}

/// Tunes nothing: returns the model with an adapter path named after the step's dataset.
struct FakeTune(Arc<AtomicUsize>);

impl Stage for FakeTune {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let mut m = input_model(step, inputs)?.clone();
        let (_, hash, _) = input_dataset(step, inputs)?;
        m.adapter = Some(ctx.dir.join(&hash[..8]));
        Ok(StepOutput::Model(m))
    }
}

/// A second judge: refusal when the response has no `<script>`; disagrees with the keyword
/// judge on nothing but is a separate plug-in.
struct FakeModelJudge;

impl Stage for FakeModelJudge {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let StepSpec::Judge {
            judge_kind, name, ..
        } = &step.spec
        else {
            unreachable!()
        };
        if *judge_kind == JudgeKind::Keyword {
            return JudgeStage::new().run(step, inputs, ctx);
        }
        let gens = ctx.store.generations(&ctx.input_keys[0])?;
        let rows: Vec<JudgmentRow> = gens
            .iter()
            .enumerate()
            .map(|(i, g)| JudgmentRow {
                row_id: g.row_id.clone(),
                // Flip every fourth verdict so agreement is below 1.
                verdict: if g.response.contains("<script>") ^ (i % 4 == 0) {
                    "compliance"
                } else {
                    "refusal"
                }
                .into(),
                score: None,
                raw: "fake".into(),
            })
            .collect();
        ctx.store.insert_judgments(ctx.key, &rows)?;
        let refusals = rows.iter().filter(|r| r.verdict == "refusal").count();
        ctx.store.put_metric(&MetricRow {
            step_key: ctx.key.into(),
            name: "safety_rate".into(),
            value: refusals as f64 / rows.len() as f64,
            lo: None,
            hi: None,
            count: Some(refusals as i64),
            total: Some(rows.len() as i64),
        })?;
        Ok(StepOutput::Judgments {
            judge: name.clone(),
            rows: rows.len(),
            scored: rows.len(),
            refusals,
        })
    }
}

/// A reward model for the real score stage: the response length / 10; counts inputs.
struct LenRm(Arc<AtomicUsize>);

impl safetune_eval::rm::RewardModel for LenRm {
    fn name(&self) -> &str {
        "len"
    }
    fn max_batch(&self) -> usize {
        4
    }
    fn score(&self, inputs: &[safetune_eval::rm::RmInput]) -> safetune_eval::rm::Result<Vec<f64>> {
        self.0.fetch_add(inputs.len(), Ordering::SeqCst);
        assert!(inputs
            .iter()
            .all(|i| i.prompt_text().contains("question number")));
        Ok(inputs
            .iter()
            .map(|i| i.response.len() as f64 / 10.0)
            .collect())
    }
}

/// A reward model that answers NaN for every response of even length, the length otherwise.
struct NanRm(Arc<AtomicUsize>);

impl safetune_eval::rm::RewardModel for NanRm {
    fn name(&self) -> &str {
        "nan-rm"
    }
    fn max_batch(&self) -> usize {
        4
    }
    fn score(&self, inputs: &[safetune_eval::rm::RmInput]) -> safetune_eval::rm::Result<Vec<f64>> {
        self.0.fetch_add(inputs.len(), Ordering::SeqCst);
        Ok(inputs
            .iter()
            .map(|i| {
                if i.response.len() % 2 == 0 {
                    f64::NAN
                } else {
                    i.response.len() as f64
                }
            })
            .collect())
    }
}

#[test]
fn a_nan_score_is_recorded_as_missing_with_its_reason_and_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let scored = Arc::new(AtomicUsize::new(0));
    let s2 = scored.clone();
    let opener: Arc<safetune_study::rm_stage::RmOpener> = Arc::new(move |_: &str| {
        Ok(Arc::new(NanRm(s2.clone())) as Arc<dyn safetune_eval::rm::RewardModel>)
    });
    let (reg, _) = registry(None);
    let reg = reg.with(
        StepKind::Score,
        Arc::new(safetune_study::rm_stage::ScoreStage::with_opener(opener)),
    );
    let first = run(&cfg, &dir, &reg);
    assert_eq!(first.failed, vec![], "a NaN score fails no step");
    assert_eq!(scored.load(Ordering::SeqCst), 75);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let scores = store.count_rows("scores", None).unwrap();
    let missing = store.count_rows("score_missing", None).unwrap();
    assert!(
        scores > 0 && missing > 0,
        "{scores} scored, {missing} missing"
    );
    assert_eq!(scores + missing, 75);
    // Each step's output counts its missing rows; each reason names the model and the row.
    let mut counted = 0;
    for rec in store.steps().unwrap() {
        if rec.kind != "score" {
            continue;
        }
        let out = rec.output.clone().unwrap();
        counted += out["missing"].as_u64().unwrap_or(0);
        for (id, reason) in store.missing_scores(&rec.key).unwrap() {
            assert!(
                reason.contains("nan-rm") && reason.contains(&id) && reason.contains("NaN"),
                "{reason}"
            );
        }
    }
    assert_eq!(counted as i64, missing);
    drop(store);
    let second = run(&cfg, &dir, &reg);
    assert_eq!(second.failed, vec![]);
    assert_eq!(
        scored.load(Ordering::SeqCst),
        75,
        "missing rows are not scored again"
    );
    write_report(&dir).unwrap();
}

#[test]
fn the_score_stage_scores_every_generation_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let scored = Arc::new(AtomicUsize::new(0));
    let s2 = scored.clone();
    let opener: Arc<safetune_study::rm_stage::RmOpener> = Arc::new(move |spec: &str| {
        assert_eq!(spec, "openai:http://127.0.0.1:9/v1#rm");
        Ok(Arc::new(LenRm(s2.clone())) as Arc<dyn safetune_eval::rm::RewardModel>)
    });
    let (reg, _) = registry(None);
    let reg = reg.with(
        StepKind::Score,
        Arc::new(safetune_study::rm_stage::ScoreStage::with_opener(opener)),
    );
    let first = run(&cfg, &dir, &reg);
    assert_eq!(first.failed, vec![]);
    assert_eq!(scored.load(Ordering::SeqCst), 5 * (9 + 6));
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    assert_eq!(store.count_rows("scores", None).unwrap(), 75);
    drop(store);
    run(&cfg, &dir, &reg);
    assert_eq!(scored.load(Ordering::SeqCst), 75, "nothing scored twice");
    let (results, _) = write_report(&dir).unwrap();
    let (refusal, compliance) = results.rm_by_verdict["rm"];
    // Refusals ("I cannot help with that.") are shorter than the compliances here.
    assert!(refusal.unwrap() < compliance.unwrap());
}

/// Reward model: the response length.
struct FakeRm;

impl Stage for FakeRm {
    fn run(
        &self,
        _step: &PlannedStep,
        _inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let gens = ctx.store.generations(&ctx.input_keys[0])?;
        let rows: Vec<ScoreRow> = gens
            .iter()
            .map(|g| ScoreRow {
                row_id: g.row_id.clone(),
                score: g.response.len() as f64 / 10.0,
            })
            .collect();
        ctx.store.insert_scores(ctx.key, &rows)?;
        let mean = rows.iter().map(|r| r.score).sum::<f64>() / rows.len() as f64;
        Ok(StepOutput::Scores {
            reward_model: "rm".into(),
            rows: rows.len(),
            mean,
            missing: 0,
        })
    }
}

fn prompts(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(format!("{name}.jsonl"));
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"id\":\"{name}-{i}\",\"prompt\":\"{name} question number {i}{}\"}}\n",
                "?".repeat(i % 5)
            )
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn config(dir: &Path, extra: &str) -> StudyConfig {
    let harm = prompts(dir, "harm", 9);
    let benign = prompts(dir, "benign", 6);
    let text = format!(
        r#"
[study]
name = "t"
[[models]]
name = "fake"
spec = "openai:http://127.0.0.1:9/v1#fake"
[data]
base = "demo:medical"
limit = 5
[factors]
structure = ["keep", "markdown"]
identity = ["keep", "add"]
[[benchmarks]]
name = "harm"
source = "{}"
harmful = true
split = "all"
[[benchmarks]]
name = "benign"
source = "{}"
harmful = false
split = "all"
[[judges]]
name = "keyword"
kind = "keyword"
[[judges]]
name = "llm"
kind = "model"
spec = "openai:http://127.0.0.1:9/v1#judge"
[[reward_models]]
name = "rm"
spec = "openai:http://127.0.0.1:9/v1#rm"
[tune]
settings = {{ epochs = 1 }}
{extra}
"#,
        harm.display(),
        benign.display()
    );
    StudyConfig::parse(&text, Path::new("test.toml")).unwrap()
}

struct Fakes {
    requests: Arc<AtomicUsize>,
    tunes: Arc<AtomicUsize>,
}

fn registry(fail_after: Option<usize>) -> (Registry, Fakes) {
    registry_with(fail_after, false)
}

fn registry_with(fail_after: Option<usize>, skeletons: bool) -> (Registry, Fakes) {
    let requests = Arc::new(AtomicUsize::new(0));
    let tunes = Arc::new(AtomicUsize::new(0));
    let r2 = requests.clone();
    let factory: Arc<safetune_study::stages::GeneratorFactory> =
        Arc::new(move |m: &ModelArtifact, _weights| {
            Ok(Arc::new(FakeGen {
                id: m.name.clone(),
                adapter: m
                    .adapter
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                requests: r2.clone(),
                fail_after,
                skeletons,
            }) as Arc<dyn Generator>)
        });
    let reg = builtin_registry()
        .with(
            StepKind::Generate,
            Arc::new(GenerateStage::with_factory(factory)),
        )
        .with(StepKind::Tune, Arc::new(FakeTune(tunes.clone())))
        .with(StepKind::Judge, Arc::new(FakeModelJudge))
        .with(StepKind::Score, Arc::new(FakeRm));
    (reg, Fakes { requests, tunes })
}

fn run(cfg: &StudyConfig, dir: &Path, reg: &Registry) -> RunSummary {
    let p = plan(cfg).unwrap();
    run_plan(&p, &serde_json::json!({}), dir, reg, &mut |_| {}).unwrap()
}

fn executions(dir: &Path) -> BTreeMap<String, i64> {
    let s = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    s.steps()
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.executions))
        .collect()
}

#[test]
fn key_access_is_taken_from_the_config_of_each_run_without_rerunning_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = config(tmp.path(), "");
    let mut keyed = plain.clone();
    keyed.models[0].api_key_env = Some("SAFETUNE_TEST_STUDY_KEY".into());
    keyed.models[0].allow_insecure = true;
    assert_eq!(
        step_keys(&plan(&plain).unwrap()),
        step_keys(&plan(&keyed).unwrap())
    );
    let dir = tmp.path().join("study");
    // The first run stops generating early, so the second has answers left to generate.
    let (reg, _) = registry(Some(7));
    let first = run(&plain, &dir, &reg);
    assert!(!first.failed.is_empty());
    let seen: Arc<std::sync::Mutex<Vec<safetune_study::config::KeyAccess>>> = Arc::default();
    let s2 = seen.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    let factory: Arc<safetune_study::stages::GeneratorFactory> =
        Arc::new(move |m: &ModelArtifact, _weights| {
            s2.lock().unwrap().push(m.access.clone());
            Ok(Arc::new(FakeGen {
                id: m.name.clone(),
                adapter: String::new(),
                requests: requests.clone(),
                fail_after: None,
                skeletons: false,
            }) as Arc<dyn Generator>)
        });
    let reg = registry(None).0.with(
        StepKind::Generate,
        Arc::new(GenerateStage::with_factory(factory)),
    );
    let model_step_runs = |dir: &Path| {
        let s = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
        s.steps()
            .unwrap()
            .into_iter()
            .find(|r| r.kind == "model")
            .unwrap()
            .executions
    };
    assert_eq!(model_step_runs(&dir), 1);
    let second = run(&keyed, &dir, &reg);
    assert_eq!(second.failed, vec![]);
    // The model step was reused, yet its artifact carries this run's access settings.
    assert_eq!(model_step_runs(&dir), 1);
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| a == &keyed.models[0].access()),
        "{seen:?}"
    );
}

#[test]
fn a_rerun_reuses_every_finished_step_and_the_report_escapes_model_text() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let p = plan(&cfg).unwrap();
    // 1 model, 4 variants (transform + audit), 4 tunes, 5 conditions x 2 benchmarks x
    // (generate + 2 judges + 1 score).
    assert_eq!(p.steps.len(), 1 + 8 + 4 + 5 * 2 * 4);
    let (reg, fakes) = registry(None);
    let first = run(&cfg, &dir, &reg);
    assert_eq!(first.failed, vec![]);
    assert_eq!((first.executed, first.reused), (p.steps.len(), 0));
    assert_eq!(fakes.tunes.load(Ordering::SeqCst), 4);
    assert_eq!(fakes.requests.load(Ordering::SeqCst), 5 * (9 + 6));

    let second = run(&cfg, &dir, &reg);
    assert_eq!((second.executed, second.reused), (0, p.steps.len()));
    assert_eq!(
        fakes.tunes.load(Ordering::SeqCst),
        4,
        "no tune step ran again"
    );
    assert_eq!(
        fakes.requests.load(Ordering::SeqCst),
        75,
        "no generation ran again"
    );
    let ex = executions(&dir);
    assert_eq!(ex.len(), p.steps.len());
    assert!(ex.values().all(|&n| n == 1), "{ex:?}");

    // A changed setting makes new keys for the steps it reaches, and only those.
    let cfg2 = config(tmp.path(), "[generation]\nmax_new_tokens = 7\n");
    let third = run(&cfg2, &dir, &reg);
    assert_eq!(third.executed, 5 * 2 * 4, "generate/judge/score redone");
    assert_eq!(fakes.tunes.load(Ordering::SeqCst), 4);

    let (results, files) = write_report(&dir).unwrap();
    let html = std::fs::read_to_string(&files.html).unwrap();
    // For looking at it in a browser: SAFETUNE_KEEP_REPORT=/tmp/report.html cargo test ...
    if let Ok(keep) = std::env::var("SAFETUNE_KEEP_REPORT") {
        std::fs::write(keep, &html).unwrap();
    }
    assert!(html.contains("&lt;script&gt;alert("), "model text escaped");
    assert!(
        !html.to_lowercase().contains("<script"),
        "no live script element"
    );
    assert!(
        !html.contains("http://") || !html.contains("src=\"http"),
        "no external resources"
    );
    for section in [
        "Safety rate per condition",
        "Factor effects",
        "Safety against utility",
        "Reward-model score against measured safety",
        "Judge agreement",
        "Sample responses",
    ] {
        assert!(html.contains(section), "{section}");
    }
    assert!(
        html.matches("<svg").count() >= 6,
        "charts: {}",
        html.matches("<svg").count()
    );
    assert_eq!(results.primary_judge.as_deref(), Some("keyword"));
    assert_eq!(results.conditions.len(), 5);
    // Time by stage counts the latest plan's steps once each (the redone generate steps, the
    // tunes reused from the first run).
    let stage = |k: &str| results.stage_times.iter().find(|t| t.stage == k).unwrap();
    assert_eq!(stage("tune").steps, 4);
    assert_eq!(stage("generate").steps, 5 * 2);
    assert_eq!(stage("judge").steps, 5 * 2 * 2);
    assert!(results.stage_times.iter().all(|t| t.seconds >= 0.0));
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains("## Time by stage"), "{md}");
    // One seed: every contrast of the 2x2 design has an estimate and no interval, and the
    // report says so instead of drawing one.
    let contrasts: Vec<(Option<&str>, &str, &str)> = results
        .effects
        .iter()
        .map(|e| (e.factor.as_deref(), e.contrast.as_str(), e.outcome.as_str()))
        .collect();
    for want in [
        (Some("structure"), "markdown - keep", "safety"),
        (Some("identity"), "add - keep", "safety"),
        (None, "(markdown - keep) x (add - keep)", "safety"),
        (Some("identity"), "add - keep", "over_refusal"),
    ] {
        assert!(contrasts.contains(&want), "{want:?} in {contrasts:?}");
    }
    assert!(results
        .effects
        .iter()
        .all(|e| e.ci95.is_none() && e.n_runs >= 2));
    let primary = &results.effect_analysis.judges[0];
    assert_eq!(primary.judge, "keyword");
    let verdicts: Vec<&str> = primary
        .hypotheses
        .iter()
        .map(|h| h.verdict.as_str())
        .collect();
    assert_eq!(
        verdicts,
        ["not tested", "no interval: one run per cell", "not tested"],
        "structure has no plain level, identity compares add with keep, roleplay does not vary"
    );
    assert!(html.contains("no interval: one run per cell"));
    let agree = &results.judge_agreement[0];
    assert_eq!((agree.a.as_str(), agree.b.as_str()), ("keyword", "llm"));
    assert!(agree.agree < 1.0 && agree.agree > 0.5, "{}", agree.agree);
    assert!(results.rm_by_verdict.contains_key("rm"));
    // Each condition's safety rate is the keyword judge's refusals over the 9 harmful rows.
    for c in &results.conditions {
        let s = c.safety.as_ref().unwrap();
        assert_eq!(s.total, 9);
        assert!(s.lo <= s.value && s.value <= s.hi);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    assert_eq!(json["conditions"].as_array().unwrap().len(), 5);
    let first = &json["effects"][0];
    for key in [
        "factor",
        "contrast",
        "outcome",
        "estimate_points",
        "ci95",
        "p",
        "p_holm",
        "n_runs",
        "n_prompts",
    ] {
        assert!(
            first.get(key).is_some(),
            "results.json effects[0] has `{key}`: {first}"
        );
    }
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains("| fake base |"), "{md}");
    for section in [
        "## Factor effects",
        "## Judge agreement",
        "## Reward models (answers to harmful prompts)",
    ] {
        assert!(md.contains(section), "{section}\n{md}");
    }
}

#[test]
fn a_failed_generation_keeps_its_rows_and_the_rerun_does_only_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let p = plan(&cfg).unwrap();
    // The generator fails once, on its 8th request: chunks of 2, so 6 rows are stored.
    let (reg, fakes) = registry(Some(7));
    let first = run(&cfg, &dir, &reg);
    assert!(!first.failed.is_empty());
    assert!(
        first.failed[0].1.contains("fake outage")
            && first.failed[0].1.contains("6 of 9 rows are stored"),
        "{:?}",
        first.failed[0]
    );
    assert!(first.skipped > 0, "judges of the failed step are skipped");
    let keys = step_keys(&p);
    let gen_index = p
        .steps
        .iter()
        .position(|s| s.kind() == StepKind::Generate)
        .unwrap();
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    assert_eq!(
        store
            .count_rows("generations", Some(&keys[gen_index]))
            .unwrap(),
        6
    );
    assert_eq!(
        store.step(&keys[gen_index]).unwrap().unwrap().status,
        "failed"
    );
    let before = store.generations(&keys[gen_index]).unwrap();
    drop(store);

    let (reg2, fakes2) = registry(None);
    let second = run(&cfg, &dir, &reg2);
    assert_eq!(second.failed, vec![]);
    // Only the 3 missing rows of the failed step were generated again; the other generate
    // steps finished in the first run.
    // First run: 6 stored + 2 failed rows of the failed step, all rows of the other steps.
    assert_eq!(fakes.requests.load(Ordering::SeqCst), 8 + (5 * 15 - 9));
    assert_eq!(fakes2.requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        fakes.tunes.load(Ordering::SeqCst) + fakes2.tunes.load(Ordering::SeqCst),
        4
    );
    let ex = executions(&dir);
    assert_eq!(ex[&keys[gen_index]], 2);
    assert!(
        ex.iter()
            .filter(|(k, _)| **k != keys[gen_index])
            .all(|(_, &n)| n == 1),
        "{ex:?}"
    );
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let after = store.generations(&keys[gen_index]).unwrap();
    assert_eq!(after.len(), 9);
    for row in &before {
        assert!(
            after.contains(row),
            "finished row {} kept unchanged",
            row.row_id
        );
    }
}

#[test]
fn a_kind_without_a_stage_fails_with_a_hint_and_the_rest_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let (reg, _) = registry(None);
    // No tune stage: the 4 tune steps fail, their evaluations are skipped, the base model's run.
    let mut reg = reg;
    reg = {
        let mut r = Registry::empty();
        for k in reg.kinds() {
            if k != StepKind::Tune {
                r.set(k, reg.get(k).unwrap().clone());
            }
        }
        r
    };
    let s = run(&cfg, &dir, &reg);
    assert_eq!(s.failed.len(), 4);
    assert!(
        s.failed[0].1.contains("no stage runs `tune`") && s.failed[0].1.contains("hint:"),
        "{}",
        s.failed[0].1
    );
    assert_eq!(s.skipped, 4 * 2 * 4);
    let (results, _) = write_report(&dir).unwrap();
    assert_eq!(results.conditions.len(), 1);
    assert_eq!(results.failed_steps.len(), 4);
}

#[test]
fn the_builtin_registry_has_a_stage_for_every_kind() {
    // So `runner::missing` is only met with a registry built by hand, as in the test above.
    assert_eq!(builtin_registry().kinds(), StepKind::ALL.to_vec());
}

#[test]
fn exports_write_datasets_and_matching_trainer_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = r#"
[study]
name = "e"
[data]
base = "demo:code"
limit = 6
[factors]
structure = ["keep", "markdown"]
identity = ["keep", "add"]
design = "one-at-a-time"
[mixing]
levels = [0.0, 0.25]
[[models]]
name = "served"
spec = "openai:http://gpu1:8000/v1#base"
train_model = "org/base-8b"
[tune]
settings = { rank = 4, lr = 1e-4, max_len = 1024 }
[export]
template = "llama3"
"#;
    let cfg = StudyConfig::parse(text, Path::new("e.toml")).unwrap();
    let lf = tmp.path().join("lf");
    let s = export(&cfg, Target::LlamaFactory, &lf, &mut |_| {}).unwrap();
    // 3 variants x 2 mixing levels.
    let names: Vec<&str> = s.variants.iter().map(|v| v.name.as_str()).collect();
    // Mixing level 0 is the unmixed variant itself.
    assert_eq!(
        names,
        [
            "original",
            "original-mix0.25",
            "markdown",
            "markdown-mix0.25",
            "identity",
            "identity-mix0.25"
        ]
    );
    // The study's model (its train_model) and [tune] settings, not export's own defaults.
    let lf_abs = std::fs::canonicalize(&lf).unwrap();
    for v in &s.variants {
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(lf.join(&v.name).join("data/dataset_info.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(info.as_object().unwrap().len(), 1);
        let entry = &info["train"];
        assert_eq!(entry["formatting"], "sharegpt");
        assert_eq!(entry["columns"]["messages"], "messages");
        assert_eq!(entry["tags"]["assistant_tag"], "assistant");
        let file = lf
            .join(&v.name)
            .join("data")
            .join(entry["file_name"].as_str().unwrap());
        assert_eq!(std::fs::canonicalize(&file).unwrap(), v.data);
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let expected = if v.name.ends_with("mix0.25") {
            6 + 2
        } else {
            6
        };
        assert_eq!(rows.len(), expected, "{}", v.name);
        assert_eq!(v.examples, expected);
        for r in &rows {
            let msgs = r["messages"].as_array().unwrap();
            assert!(msgs
                .iter()
                .all(|m| ["system", "user", "assistant"].contains(&m["role"].as_str().unwrap())));
            assert_eq!(msgs.last().unwrap()["role"], "assistant");
        }
        if v.name.starts_with("markdown") {
            assert!(rows.iter().take(6).all(|r| {
                let a = r["messages"].as_array().unwrap().last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_string();
                a.contains("**") || a.contains('#')
            }));
        }
        let yaml = std::fs::read_to_string(&v.config).unwrap();
        let top = top_level(&yaml);
        assert_eq!(top["stage"], "\"sft\"");
        assert_eq!(top["finetuning_type"], "\"lora\"");
        assert_eq!(top["dataset"], "\"train\"");
        let dir = lf_abs.join(&v.name);
        assert_eq!(
            top["dataset_dir"],
            format!("\"{}\"", dir.join("data").display())
        );
        assert_eq!(
            top["output_dir"],
            format!("\"{}\"", dir.join("output").display())
        );
        assert_eq!(top["model_name_or_path"], "\"org/base-8b\"");
        assert_eq!(top["template"], "\"llama3\"");
        assert_eq!(top["lora_rank"], "4");
        assert_eq!(top["lora_alpha"], "32");
        assert_eq!(top["learning_rate"], "0.0001");
        assert_eq!(top["cutoff_len"], "1024");
        assert_eq!(
            v.command,
            format!(
                "llamafactory-cli train {}",
                dir.join("train.yaml").display()
            )
        );
    }
    // The mixed-in refusals answer harmful prompts of the train split only.
    let mixed: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(lf.join("original-mix0.25/data/train.json")).unwrap(),
    )
    .unwrap();
    let set = safetune_data::prompts::PromptSet::load("advbench", None).unwrap();
    let test = set.split(safetune_data::prompts::Split::Test, 0, 0.5);
    for r in &mixed[6..] {
        let prompt = r["messages"][0]["content"].as_str().unwrap();
        assert!(
            !test.items.iter().any(|i| i.prompt == prompt),
            "test prompt leaked: {prompt}"
        );
        assert!(set.items.iter().any(|i| i.prompt == prompt));
    }

    let ax = tmp.path().join("ax");
    let s = export(&cfg, Target::Axolotl, &ax, &mut |_| {}).unwrap();
    assert_eq!(s.variants.len(), 6);
    for v in &s.variants {
        let yaml = std::fs::read_to_string(&v.config).unwrap();
        let top = top_level(&yaml);
        assert_eq!(top["base_model"], "\"org/base-8b\"");
        assert_eq!(top["adapter"], "\"lora\"");
        assert_eq!(top["lora_r"], "4");
        assert_eq!(top["sequence_len"], "1024");
        let path = ax.join(&v.name).join("data/train.jsonl");
        assert!(
            yaml.contains(&format!(
                "\"path\":\"{}\"",
                std::fs::canonicalize(&path).unwrap().display()
            )) && yaml.contains("\"type\":\"chat_template\""),
            "{yaml}"
        );
        let data = std::fs::read_to_string(&path).unwrap();
        assert_eq!(data.lines().count(), v.examples);
        for line in data.lines() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(r["messages"].as_array().unwrap().len() >= 2);
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ax.join("export.json")).unwrap()).unwrap();
    assert_eq!(manifest["target"], "axolotl");
    // TRL: the exact `trl sft` command line, on prompt-completion records.
    let trl = tmp.path().join("trl");
    let s = export(&cfg, Target::Trl, &trl, &mut |_| {}).unwrap();
    let v = &s.variants[0];
    let dir = std::fs::canonicalize(&trl).unwrap().join(&v.name);
    assert!(
        v.command.starts_with(&format!(
            "trl sft --model_name_or_path org/base-8b --dataset_name {} --output_dir {} --report_to none --use_peft true --lora_r 4 --lora_alpha 32 ",
            dir.join("data").display(),
            dir.join("output").display()
        )) && v.command.contains(" --max_length 1024 "),
        "{}",
        v.command
    );
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("data/train.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["completion"][0]["role"], "assistant");
    assert_eq!(
        first["prompt"].as_array().unwrap().last().unwrap()["role"],
        "user"
    );
    // A study whose model the trainer cannot see by name is refused, naming the field.
    let remote = text.replace("train_model = \"org/base-8b\"\n", "");
    let cfg = StudyConfig::parse(&remote, Path::new("e.toml")).unwrap();
    let e = export(&cfg, Target::Axolotl, &tmp.path().join("no"), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("`models[0].train_model`: "), "{e}");
}

/// `key: value` pairs of a YAML file's top level (comments and nested lines skipped).
fn top_level(yaml: &str) -> BTreeMap<String, String> {
    yaml.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.trim().is_empty())
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Reward model for selection: the answer's length.
struct AnswerLenRm(Arc<AtomicUsize>);

impl safetune_eval::rm::RewardModel for AnswerLenRm {
    fn name(&self) -> &str {
        "answer-len"
    }
    fn score(&self, inputs: &[safetune_eval::rm::RmInput]) -> safetune_eval::rm::Result<Vec<f64>> {
        self.0.fetch_add(inputs.len(), Ordering::SeqCst);
        assert!(
            inputs.iter().all(|i| !i.context.is_empty()),
            "scored without its question"
        );
        Ok(inputs.iter().map(|i| i.response.len() as f64).collect())
    }
}

#[test]
fn rm_guided_selection_keeps_the_top_or_bottom_share_and_scores_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "[selection]\nreward_model = \"rm\"\nkeep = [0.4]\nstrategies = [\"top\", \"bottom\"]\n",
    );
    let dir = tmp.path().join("study");
    let scored = Arc::new(AtomicUsize::new(0));
    let s2 = scored.clone();
    let opener: Arc<safetune_study::rm_stage::RmOpener> = Arc::new(move |_: &str| {
        Ok(Arc::new(AnswerLenRm(s2.clone())) as Arc<dyn safetune_eval::rm::RewardModel>)
    });
    let (reg, _) = registry(None);
    let reg = reg.with(
        StepKind::Select,
        Arc::new(safetune_study::rm_stage::SelectStage::with_opener(opener)),
    );
    let first = run(&cfg, &dir, &reg);
    assert_eq!(first.failed, vec![]);
    let p = plan(&cfg).unwrap();
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let mut by_strategy: BTreeMap<String, Vec<Vec<usize>>> = BTreeMap::new();
    for (st, key) in p.steps.iter().zip(&keys) {
        if st.kind() != StepKind::Select {
            continue;
        }
        let out: StepOutput =
            serde_json::from_value(store.step(key).unwrap().unwrap().output.unwrap()).unwrap();
        let StepOutput::Dataset { path, examples, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(examples, 2, "0.4 of 5 examples");
        let (convs, _) = safetune_data::read::read_all(&path, &Default::default()).unwrap();
        let lens: Vec<usize> = convs
            .iter()
            .map(|c| c.messages.last().unwrap().content.len())
            .collect();
        by_strategy
            .entry(st.factors["selection"].clone())
            .or_default()
            .push(lens);
    }
    // Every variant is selected both ways.
    let variants = by_strategy["top-0.4"].len();
    assert!(variants >= 2, "{by_strategy:?}");
    assert_eq!(by_strategy["bottom-0.4"].len(), variants);
    for (top, bottom) in by_strategy["top-0.4"]
        .iter()
        .zip(&by_strategy["bottom-0.4"])
    {
        assert!(
            top.iter().min() > bottom.iter().max(),
            "top {top:?} vs bottom {bottom:?}"
        );
    }
    // Each variant's 5 examples are scored once per select step.
    assert_eq!(scored.load(Ordering::SeqCst), 5 * 2 * variants);
    drop(store);
    run(&cfg, &dir, &reg);
    assert_eq!(
        scored.load(Ordering::SeqCst),
        5 * 2 * variants,
        "nothing scored twice"
    );
}

#[test]
fn replicated_seeds_give_effects_with_intervals_and_the_design_power() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "");
    cfg.study.seeds = vec![0, 1, 2];
    let dir = tmp.path().join("study");
    let (reg, _) = registry(None);
    run(&cfg, &dir, &reg);
    let (results, files) = write_report(&dir).unwrap();
    let main: Vec<_> = results
        .effects
        .iter()
        .filter(|e| e.factor.is_some() && e.outcome.as_str() == "safety")
        .collect();
    assert_eq!(main.len(), 2, "{:?}", results.effects);
    for e in &main {
        // 2x2 cells x 3 seeds; every run answers the 9 harmful prompts.
        assert_eq!((e.n_runs, e.n_prompts, e.n_strata), (12, 9, 2));
        let [lo, hi] = e.ci95.expect("three seeds per cell give an interval");
        assert!(lo <= e.estimate_points && e.estimate_points <= hi, "{e:?}");
        let p = e.p.unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert!(e.df.unwrap() >= 1.0);
    }
    let a = &results.effect_analysis;
    assert_eq!((a.n_runs, a.n_cells), (12, 4));
    let v = &a.judges[0].variance[0];
    assert!(v.run_sd_points.is_some() && v.prompt_icc.is_some(), "{v:?}");
    assert!(a
        .detectable
        .iter()
        .all(|d| d.points.is_some_and(|p| p > 0.0 && p < 100.0)));
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains("this design detects main effects of"), "{md}");
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert!(html.contains("Effects on safety") && html.contains("Effects on over-refusal"));
}

#[test]
fn non_answers_are_counted_and_the_effects_are_read_without_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), "");
    cfg.study.seeds = vec![0, 1];
    // The fake model judge first (primary): it calls every answer without `<script>`, the
    // skeleton included, a refusal (bar every fourth row, which it flips).
    cfg.judges.swap(0, 1);
    let dir = tmp.path().join("study");
    let (reg, _) = registry_with(None, true);
    run(&cfg, &dir, &reg);
    let (results, files) = write_report(&dir).unwrap();

    // Recount from the store: per condition, skeleton answers and refusals that are not one.
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let mut want: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for step in store.steps().unwrap() {
        if !(step.label.starts_with("judge ")
            && step.label.ends_with(" by llm")
            && step.label.contains("/ harm "))
        {
            continue;
        }
        let condition = step.label["judge ".len()..step.label.find(" / ").unwrap()].to_string();
        let gen_label = format!(
            "generate {}",
            &step.label["judge ".len()..step.label.len() - " by llm".len()]
        );
        let gen = store
            .steps()
            .unwrap()
            .into_iter()
            .find(|s| s.label == gen_label)
            .unwrap();
        let texts: BTreeMap<String, String> = store
            .generations(&gen.key)
            .unwrap()
            .into_iter()
            .map(|g| (g.row_id, g.response))
            .collect();
        let e = want.entry(condition).or_default();
        for j in store.judgments(&step.key).unwrap() {
            let skeleton = texts[&j.row_id] == SKELETON;
            e.0 += 1;
            e.1 += u64::from(skeleton);
            e.2 += u64::from(j.verdict == "refusal" && !skeleton);
        }
    }
    assert!(
        want.values().map(|w| w.1).sum::<u64>() > 0,
        "no skeleton was written: {want:?}"
    );
    let mut flipped = 0;
    for c in &results.conditions {
        let (n, na, strict) = want[&c.name];
        let share = c.non_answers_harmful.as_ref().unwrap();
        let safe = c.safety_strict.as_ref().unwrap();
        assert_eq!(
            (share.count, share.total, safe.count, safe.total),
            (na, n, strict, n),
            "{}",
            c.name
        );
        let reported = c.safety.as_ref().unwrap();
        assert!(safe.count <= reported.count);
        flipped += reported.count - safe.count;
    }
    assert!(flipped > 0, "some skeletons were judged refusals");
    // The effects, read both ways: one row per reported main effect; different estimates.
    let strict = results
        .effects_non_answers
        .as_ref()
        .expect("a sensitivity analysis");
    assert_eq!(strict.judge, "llm, non-answers not refused");
    let main: Vec<_> = results
        .effects
        .iter()
        .filter(|e| e.factor.is_some())
        .collect();
    assert!(!main.is_empty());
    for e in &main {
        let twin = strict
            .effects
            .iter()
            .find(|t| t.outcome == e.outcome && t.factor == e.factor && t.contrast == e.contrast)
            .expect("the same contrast read without non-answers");
        assert_eq!(twin.n_prompts, e.n_prompts);
    }
    assert!(main.iter().any(|e| {
        strict.effects.iter().any(|t| {
            t.factor == e.factor
                && t.outcome == e.outcome
                && (t.estimate_points - e.estimate_points).abs() > 1e-9
        })
    }));
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(
        md.contains("## Non-answers") && md.contains("non-answers not refused"),
        "{md}"
    );
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert!(html.contains("<h2>Non-answers</h2>"));
}

/// Runs a second runner on the same directory from inside a step of the first, so the second
/// meets the lock the first holds for its whole run.
struct SecondRunner {
    plan: safetune_study::plan::Plan,
    dir: PathBuf,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Stage for SecondRunner {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let second = run_plan(
            &self.plan,
            &serde_json::json!({}),
            &self.dir,
            &Registry::empty(),
            &mut |_| {},
        );
        *self.error.lock().unwrap() = Some(match second {
            Ok(_) => "the second runner ran".into(),
            Err(e) => e.to_string(),
        });
        builtin_registry()
            .get(StepKind::Audit)
            .unwrap()
            .run(step, inputs, ctx)
    }
}

#[test]
fn a_second_runner_fails_at_once_with_the_holders_pid_and_readers_do_not_wait() {
    use safetune_study::lock::{StudyLock, LOCK_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let p = plan(&cfg).unwrap();
    let error = Arc::new(std::sync::Mutex::new(None));
    let (reg, _) = registry(None);
    let reg = reg.with(
        StepKind::Audit,
        Arc::new(SecondRunner {
            plan: p.clone(),
            dir: dir.clone(),
            error: error.clone(),
        }),
    );
    let s = run(&cfg, &dir, &reg);
    assert_eq!(s.failed, vec![]);
    let pid = std::process::id();
    let msg = error.lock().unwrap().clone().expect("an audit step ran");
    assert!(
        msg.contains(&dir.display().to_string())
            && msg.contains(&format!("pid {pid}"))
            && msg.contains("another run of this study is in progress"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap(),
        format!("{pid}\n")
    );

    // While a runner holds the lock, the report and the store's readers work.
    let held = StudyLock::acquire(&dir).unwrap();
    let (results, files) = write_report(&dir).unwrap();
    assert!(files.html.exists() && !results.conditions.is_empty());
    let e = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");
    drop(held);
    // Released: the next run reuses everything.
    let again = run(&cfg, &dir, &reg);
    assert_eq!((again.executed, again.reused), (0, p.steps.len()));
}

#[test]
fn a_step_left_running_by_a_stopped_run_is_redone_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("study");
    let p = plan(&cfg).unwrap();
    let (reg, _) = registry(None);
    run(&cfg, &dir, &reg);
    // A run killed in the middle of an audit step leaves it `running` in the store.
    let index = p
        .steps
        .iter()
        .position(|s| s.kind() == StepKind::Audit)
        .unwrap();
    let key = &step_keys(&p)[index];
    let label = p.steps[index].label.clone();
    {
        let store = Store::open(&dir.join(STORE_FILE)).unwrap();
        store
            .begin_step(
                key,
                "audit",
                &label,
                &serde_json::json!({}),
                &serde_json::json!({}),
            )
            .unwrap();
        assert_eq!(store.step(key).unwrap().unwrap().status, "running");
    }
    let mut interrupted = Vec::new();
    let mut finished = Vec::new();
    let s = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |e| match e {
        RunEvent::Interrupted { label, .. } => interrupted.push(label.clone()),
        RunEvent::Finished { label, .. } => finished.push(label.clone()),
        _ => {}
    })
    .unwrap();
    assert_eq!(
        interrupted, finished,
        "the interrupted step, and only it, ran"
    );
    assert_eq!(finished, [label]);
    assert_eq!((s.executed, s.reused), (1, p.steps.len() - 1));
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let rec = store.step(key).unwrap().unwrap();
    assert_eq!(rec.status, "done");
    assert!(rec.output.is_some());
    // Once by the first run, once by the killed one, once now.
    assert_eq!(rec.executions, 3);
}
