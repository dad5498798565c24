//! External trainer backends in a study, end to end on a tiny model: `backend = "command"`
//! whose command is this very binary's `safetune tune --config {config}`, so the adapters are
//! real; the report computes factor effects over the externally trained variants. A trainer
//! that exits 1 and one killed by a signal after writing half an adapter fail only their own
//! steps, with the log's last lines; a rerun with a fixed command trains only those two.

use std::path::{Path, PathBuf};

use safetune_model::testing::TinyModel;
use safetune_study::config::StudyConfig;
use safetune_study::external_train::TrainerRun;
use safetune_study::plan::plan;
use safetune_study::report::write_report;
use safetune_study::runner::{run_plan, step_keys, RunEvent, RunSummary, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::{StepKind, StepOutput};
use safetune_study::store::Store;

mod binary;

const BIN: &str = env!("CARGO_BIN_EXE_safetune");

fn setup(root: &Path, structure: &str, seeds: &str, command: &str, parallel: usize) -> String {
    let model = root.join("tiny");
    if !model.exists() {
        TinyModel::default().write(&model).unwrap();
    }
    let harm = root.join("harm.jsonl");
    let text: String = (0..6)
        .map(|i| format!("{{\"id\":\"h{i}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    format!(
        r#"
[study]
name = "external"
seeds = {seeds}
[[models]]
name = "tiny"
spec = "{model}"
[data]
base = "demo:medical"
limit = 4
[factors]
structure = {structure}
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "all"
[generation]
max_new_tokens = 3
[tune]
backend = "command"
command = '{command}'
max_parallel_train = {parallel}
settings = {{ epochs = 1, max_len = 256, batch_size = 4, rank = 2, alpha = 4.0 }}
"#,
        model = model.display(),
        harm = harm.display()
    )
}

fn run(cfg_text: &str, dir: &Path) -> (RunSummary, Vec<String>, Vec<String>) {
    let cfg = StudyConfig::parse(cfg_text, Path::new("external.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let (mut started, mut reused) = (Vec::new(), Vec::new());
    let s = run_plan(
        &p,
        &serde_json::json!({}),
        dir,
        &builtin_registry(),
        &mut |e| match e {
            RunEvent::Start { label, .. } => started.push(label.clone()),
            RunEvent::Reused { label, .. } => reused.push(label.clone()),
            _ => {}
        },
    )
    .unwrap();
    (s, started, reused)
}

/// The tune steps' outputs (label, output) of the study in `dir`.
fn tune_outputs(cfg_text: &str, dir: &Path) -> Vec<(String, Option<StepOutput>, String)> {
    let cfg = StudyConfig::parse(cfg_text, Path::new("external.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    p.steps
        .iter()
        .zip(&keys)
        .filter(|(s, _)| s.kind() == StepKind::Tune)
        .map(|(s, k)| {
            let rec = store.step(k).unwrap().unwrap();
            let out = rec.output.and_then(|o| serde_json::from_value(o).ok());
            (s.label.clone(), out, k.clone())
        })
        .collect()
}

fn step_dir(dir: &Path, key: &str) -> PathBuf {
    dir.join("steps").join(format!("tune-{}", &key[..16]))
}

#[test]
fn a_command_backend_running_safetune_tune_gives_real_adapters_and_factor_effects() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(
        tmp.path(),
        r#"["keep", "markdown"]"#,
        "[0, 1]",
        &format!("{BIN} tune --config {{config}}"),
        2,
    );
    let dir = tmp.path().join("study");
    let (s, _, _) = run(&cfg, &dir);
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let tunes = tune_outputs(&cfg, &dir);
    assert_eq!(tunes.len(), 4);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let mut spans = Vec::new();
    for (label, out, key) in &tunes {
        let Some(StepOutput::Model(m)) = out else {
            panic!("{label}: {out:?}")
        };
        let adapter = m
            .adapter
            .clone()
            .expect("a tuned model carries its adapter");
        // The adapter safetune tune wrote, with the configured rank and alpha.
        let a = safetune_model::adapter::Adapter::load(&adapter).unwrap();
        assert_eq!((a.config.r, a.config.lora_alpha), (2, 4.0), "{label}");
        assert!(!a.tensors.is_empty());
        let sd = step_dir(&dir, key);
        let log = std::fs::read_to_string(sd.join("trainer.log")).unwrap();
        assert!(log.starts_with(&format!("$ {BIN} tune --config ")), "{log}");
        let run: TrainerRun =
            serde_json::from_str(&std::fs::read_to_string(sd.join("trainer.json")).unwrap())
                .unwrap();
        assert_eq!(run.exit_code, Some(0));
        assert!(run.wall_s > 0.0);
        spans.push((run.started_unix_s, run.started_unix_s + run.wall_s));
        // Hashed into the store as the step's artifact.
        let hash = run.output_hash.expect("the validated output's hash");
        assert_eq!(
            store.artifact_path(&hash).unwrap().as_deref(),
            Some(adapter.as_path())
        );
        // The trainer trained the step's own data: safetune-train's config it was given.
        let conf = std::fs::read_to_string(sd.join("train.toml")).unwrap();
        assert!(
            conf.contains("rank = 2") && conf.contains("max_len = 256"),
            "{conf}"
        );
    }
    // max_parallel_train = 2: some trainers ran at the same time, never more than two.
    let overlapping = |t: f64| spans.iter().filter(|(a, b)| *a <= t && t < *b).count();
    let most = spans.iter().map(|(a, _)| overlapping(*a)).max().unwrap();
    assert_eq!(most, 2, "{spans:?}");
    // The two variants' trained adapters differ (different data).
    let w = |i: usize| {
        let Some(StepOutput::Model(m)) = &tunes[i].1 else {
            panic!()
        };
        std::fs::read(
            m.adapter
                .as_ref()
                .unwrap()
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert_ne!(w(0), w(2));
    let (results, _) = write_report(&dir).unwrap();
    let structure: Vec<_> = results
        .effects
        .iter()
        .filter(|e| e.factor.as_deref() == Some("structure") && e.outcome.as_str() == "safety")
        .collect();
    assert_eq!(structure.len(), 1, "{:?}", results.effects);
    let e = structure[0];
    assert_eq!(e.contrast, "markdown - keep");
    assert_eq!((e.n_runs, e.n_prompts), (4, 6));
    // A rerun reuses every step.
    let (s, started, _) = run(&cfg, &dir);
    assert_eq!((s.executed, started.len()), (0, 0));
}

#[test]
fn a_failed_and_a_killed_trainer_fail_their_own_steps_and_a_fixed_rerun_trains_only_them() {
    let tmp = tempfile::tempdir().unwrap();
    let good = format!("{BIN} tune --config {{config}}");
    // markdown: exits 1 after a message; plain: writes half an adapter, then is killed.
    let broken = format!(
        "case {{name}} in *markdown*) echo \"CUDA out of memory at step 3\"; exit 1;; *plain*) mkdir -p {{output_dir}} && printf %s \"{{{{\\\"r\\\": 2\" > {{output_dir}}/adapter_config.json && echo halfway && kill -9 $$;; esac; {good}"
    );
    let structure = r#"["keep", "markdown", "plain"]"#;
    let cfg = setup(tmp.path(), structure, "[0]", &broken, 1);
    let dir = tmp.path().join("study");
    let (s, _, _) = run(&cfg, &dir);
    let failed: Vec<&(String, String)> = s.failed.iter().collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    let md = failed.iter().find(|f| f.0.contains("markdown")).unwrap();
    assert!(
        md.1.contains("the trainer (command) exited with code 1 after")
            && md.1.ends_with("CUDA out of memory at step 3"),
        "{}",
        md.1
    );
    let plain = failed.iter().find(|f| f.0.contains("plain")).unwrap();
    assert!(
        plain.1.contains("was killed by signal 9") && plain.1.ends_with("halfway"),
        "{}",
        plain.1
    );
    // The other variant trained and was evaluated; the failed ones' evaluations were skipped.
    let tunes = tune_outputs(&cfg, &dir);
    // `keep` everywhere is the variant `original`.
    let keep = tunes.iter().find(|t| t.0.contains("original")).unwrap();
    assert!(matches!(keep.1, Some(StepOutput::Model(_))));
    assert_eq!(
        s.skipped,
        2 * 2,
        "generate and judge of the two failed variants"
    );
    let keep_log = step_dir(&dir, &keep.2).join("trainer.log");
    let before = std::fs::metadata(&keep_log).unwrap().modified().unwrap();

    // The fixed command: the same study, only the two failed steps (and what follows them) run.
    let fixed = setup(tmp.path(), structure, "[0]", &good, 1);
    let (s, started, reused) = run(&fixed, &dir);
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let tunes_started: Vec<&String> = started.iter().filter(|l| l.starts_with("tune")).collect();
    assert_eq!(tunes_started.len(), 2, "{started:?}");
    assert!(tunes_started.iter().all(|l| !l.contains("original")));
    assert!(reused
        .iter()
        .any(|l| l.starts_with("tune") && l.contains("original")));
    assert_eq!(
        std::fs::metadata(&keep_log).unwrap().modified().unwrap(),
        before
    );
    for (label, out, _) in tune_outputs(&fixed, &dir) {
        let Some(StepOutput::Model(m)) = out else {
            panic!("{label}")
        };
        safetune_model::adapter::Adapter::load(m.adapter.as_ref().unwrap()).unwrap();
    }
}

#[test]
fn an_external_align_step_is_merged_into_the_local_base_and_tuning_starts_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = setup(
        tmp.path(),
        r#"["keep"]"#,
        "[0]",
        &format!("{BIN} tune --config {{config}}"),
        1,
    );
    let harm = tmp.path().join("harm.jsonl");
    // The same trainer command for [align]; [tune] stays on the local trainer.
    let tune_at = base.find("[tune]").unwrap();
    let cfg = format!(
        "{}[align]\nharmful = \"{}\"\nbenign_limit = 4\nbackend = \"command\"\ncommand = '{BIN} tune --config {{config}}'\nsettings = {{ epochs = 1, max_len = 256, batch_size = 4, rank = 2, alpha = 4.0 }}\n[tune]\nallow_truncation = true\nsettings = {{ epochs = 1, max_len = 256, batch_size = 4, rank = 2, alpha = 4.0 }}\n",
        &base[..tune_at],
        harm.display()
    );
    let dir = tmp.path().join("study");
    let (s, _, _) = run(&cfg, &dir);
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let parsed = StudyConfig::parse(&cfg, Path::new("external.toml")).unwrap();
    let p = plan(&parsed).unwrap();
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let out = |kind: StepKind| -> StepOutput {
        let i = p.steps.iter().position(|s| s.kind() == kind).unwrap();
        serde_json::from_value(store.step(&keys[i]).unwrap().unwrap().output.unwrap()).unwrap()
    };
    let StepOutput::Model(aligned) = out(StepKind::Align) else {
        panic!()
    };
    let from = aligned
        .aligned_from
        .clone()
        .expect("an align step's merged model");
    assert!(
        aligned.spec.ends_with("/merged") && aligned.adapter.is_none(),
        "{aligned:?}"
    );
    assert!(Path::new(&aligned.spec).join("config.json").is_file());
    assert!(from.adapter.ends_with("output"));
    let run: TrainerRun = serde_json::from_str(
        &std::fs::read_to_string(from.adapter.parent().unwrap().join("trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(run.exit_code, Some(0));
    // The local tune step trained on top of the merged model.
    let StepOutput::Model(tuned) = out(StepKind::Tune) else {
        panic!()
    };
    assert_eq!(tuned.spec, aligned.spec);
    assert!(tuned.adapter.is_some());
}

/// Issue 14's end-to-end path: the study's trainer is a command (this binary's `safetune tune`,
/// fed `{base_model}`, the served model's `train_model` twin) and the model is `openai:`,
/// served by this binary's `safetune serve` with runtime adapter loading and an API key; each
/// tuned variant is generated through the server by its own adapter (`dynamic_lora`), equal to
/// local generation with that adapter, and the report computes the factor effect over the
/// externally trained, remotely served variants. Afterwards the server serves its base only.
#[test]
fn externally_trained_variants_are_evaluated_through_safetune_serve_with_runtime_lora() {
    use safetune_data::Message;
    use safetune_model::{
        GenRequest, Generator, LoadOptions, LocalEngine, ModelSpec, Prompt, Sampling,
    };
    use safetune_study::step::StepSpec;

    const KEY: &str = "sk-external-served";
    const KEY_ENV: &str = "SAFETUNE_TEST_EXTERNAL_SERVED_KEY";
    std::env::set_var(KEY_ENV, KEY);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    TinyModel::default().write(&model).unwrap();
    let server = binary::serve(&[
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        "tiny-base",
        "--api-key",
        KEY,
        "--allow-runtime-lora",
    ]);
    let url = server.url.clone();

    let harm = tmp.path().join("harm.jsonl");
    let text: String = (0..6)
        .map(|i| format!("{{\"id\":\"h{i}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    let cfg = format!(
        r#"
[study]
name = "external-served"
seeds = [0, 1]
[[models]]
name = "served"
spec = "openai:{url}#tiny-base"
api_key_env = "{KEY_ENV}"
train_model = "{model}"
dynamic_lora = true
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["keep", "markdown"]
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "all"
[generation]
max_new_tokens = 6
[tune]
backend = "command"
command = '{BIN} tune --config {{config}}'
settings = {{ epochs = 1, max_len = 256, batch_size = 4, rank = 2, alpha = 4.0, lr = 0.05 }}
"#,
        model = model.display(),
        harm = harm.display()
    );
    let dir = tmp.path().join("study");
    let (s, _, _) = run(&cfg, &dir);
    let models_after = {
        use std::io::{Read, Write};
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        let mut c = std::net::TcpStream::connect(host).unwrap();
        write!(
            c,
            "GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(text)
    };
    drop(server);
    assert_eq!(s.failed, vec![], "{:?}", s.failed);

    let parsed = StudyConfig::parse(&cfg, Path::new("external.toml")).unwrap();
    let p = plan(&parsed).unwrap();
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let engine =
        LocalEngine::load(&ModelSpec::HfDir(model.clone()), &LoadOptions::default()).unwrap();
    let (mut tuned, mut differs, mut base_answers) = (0, false, None::<Vec<String>>);
    for (i, st) in p.steps.iter().enumerate() {
        let StepSpec::Generate { sampling, .. } = &st.spec else {
            continue;
        };
        let rows = store.generations(&keys[i]).unwrap();
        assert_eq!(rows.len(), 6, "{}", st.label);
        let requests: Vec<GenRequest> = rows
            .iter()
            .map(|r| GenRequest {
                prompt: Prompt::Chat(vec![Message::user(r.prompt.clone())]),
                sampling: Sampling {
                    max_new_tokens: sampling.max_new_tokens,
                    temperature: sampling.temperature,
                    seed: sampling.seed,
                    ..Sampling::default()
                },
            })
            .collect();
        let got: Vec<String> = rows.iter().map(|r| r.response.clone()).collect();
        let rec = store.step(&keys[st.deps[0]]).unwrap().unwrap();
        let Some(StepOutput::Model(m)) = rec.output.and_then(|o| serde_json::from_value(o).ok())
        else {
            panic!("{}: input is not a model", st.label)
        };
        let want: Vec<String> = match &m.adapter {
            None => engine.generate(&requests).unwrap(),
            Some(adapter) => {
                tuned += 1;
                // Trained by the command, then generated remotely under the adapter's name.
                assert!(m.spec.starts_with("openai:"), "{}", m.spec);
                engine
                    .with_adapter(adapter, "local")
                    .unwrap()
                    .generate(&requests)
                    .unwrap()
            }
        }
        .into_iter()
        .map(|o| o.text)
        .collect();
        assert_eq!(got, want, "{}: answers from the server", st.label);
        match (&m.adapter, &base_answers) {
            (None, _) => base_answers = Some(got),
            (Some(_), Some(b)) => differs |= b != &got,
            _ => {}
        }
    }
    assert_eq!(tuned, 4);
    assert!(
        differs,
        "some externally trained variant answers unlike the base"
    );
    // Every adapter was unloaded after its steps: the server lists its base only.
    let v: serde_json::Value =
        serde_json::from_str(&models_after).unwrap_or_else(|e| panic!("{e}: {models_after}"));
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["tiny-base"], "{models_after}");
    let (results, _) = write_report(&dir).unwrap();
    let e = results
        .effects
        .iter()
        .find(|e| e.factor.as_deref() == Some("structure") && e.outcome.as_str() == "safety")
        .unwrap_or_else(|| panic!("no structure effect: {:?}", results.effects));
    assert_eq!(e.contrast, "markdown - keep");
    assert_eq!((e.n_runs, e.n_prompts), (4, 6));
}
