//! Tuned variants evaluated through a serving engine: the `[[models]]` entry is
//! `openai:URL#NAME` pointing at an in-process `safetune serve` of a tiny model with runtime
//! adapter loading, `dynamic_lora = true`. The tune steps train on a local twin of the served
//! base (the study cannot yet tune an `openai:` model itself: the `train_model` key of the
//! trainer backends does that, so here a wrapper around the train stage hands it the twin's
//! path). Each tuned variant's answers come from its own adapter on the server (equal to local
//! generation with that adapter), every adapter is loaded once and unloaded after, and the
//! report computes the factor effects as it does for local models.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetune_data::Message;
use safetune_model::backend::Generator;
use safetune_model::testing::TinyModel;
use safetune_model::{GenRequest, LoadOptions, LocalEngine, ModelSpec, Prompt, Sampling};
use safetune_openai::server::guard::ApiKey;
use safetune_openai::{start_with_loras, LoraLoadError, LoraLoader, Loras, ServeConfig};
use safetune_study::config::StudyConfig;
use safetune_study::plan::plan;
use safetune_study::report::write_report;
use safetune_study::runner::{run_plan, step_keys, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::*;
use safetune_study::store::Store;
use safetune_study::train_stage::TrainStage;

const KEY: &str = "sk-served-lora-study";
const KEY_ENV: &str = "SAFETUNE_TEST_SERVED_LORA_KEY";

/// The local engine as the server's adapter loader, recording every load.
struct Recording {
    engine: Arc<LocalEngine>,
    loads: Mutex<Vec<(String, PathBuf)>>,
}

impl LoraLoader for Recording {
    fn load_lora(&self, name: &str, path: &Path) -> Result<Arc<dyn Generator>, LoraLoadError> {
        self.loads
            .lock()
            .unwrap()
            .push((name.to_string(), path.to_path_buf()));
        self.engine.load_lora(name, path)
    }
}

/// The train stage on the served base's local twin: the input model's spec is the twin's path
/// while training, and the served spec again in the output (what `train_model` will do).
struct TwinTune {
    twin: String,
}

impl Stage for TwinTune {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        let served = input_model(step, inputs)?.clone();
        let inputs: Vec<StepOutput> = inputs
            .iter()
            .map(|o| match o {
                StepOutput::Model(m) => StepOutput::Model(ModelArtifact {
                    spec: self.twin.clone(),
                    ..m.clone()
                }),
                other => other.clone(),
            })
            .collect();
        match TrainStage.run(step, &inputs, ctx)? {
            StepOutput::Model(m) => Ok(StepOutput::Model(ModelArtifact {
                spec: served.spec.clone(),
                ..m
            })),
            other => Ok(other),
        }
    }
}

#[test]
fn tuned_variants_are_generated_through_the_server_by_their_adapters() {
    std::env::set_var(KEY_ENV, KEY);
    let tmp = tempfile::tempdir().unwrap();
    let twin = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let engine = Arc::new(
        LocalEngine::load(
            &ModelSpec::HfDir(twin.clone()),
            &LoadOptions {
                batch_size: 8,
                ..LoadOptions::default()
            },
        )
        .unwrap(),
    );
    let recording = Arc::new(Recording {
        engine: engine.clone(),
        loads: Mutex::new(Vec::new()),
    });
    let server = start_with_loras(
        engine.clone(),
        Loras {
            loader: recording.clone(),
            modules: vec![],
        },
        ServeConfig {
            port: 0,
            model_name: Some("tiny-base".into()),
            api_key: Some(ApiKey::new(KEY).unwrap()),
            allow_runtime_lora: true,
            ..ServeConfig::default()
        },
    )
    .unwrap();

    let harm = tmp.path().join("harm.jsonl");
    let text: String = (0..8)
        .map(|i| format!("{{\"id\":\"h{i}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    let cfg = format!(
        r#"
[study]
name = "served"
seeds = [0, 1]
[[models]]
name = "served"
spec = "openai:{url}#tiny-base"
api_key_env = "{KEY_ENV}"
dynamic_lora = true
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["keep", "itemized"]
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "test"
[generation]
max_new_tokens = 4
[tune]
allow_truncation = true
settings = {{ epochs = 2, max_len = 48, batch_size = 2, rank = 4, alpha = 16.0, lr = 0.05 }}
"#,
        url = server.base_url(),
        harm = harm.display()
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("served.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let dir = tmp.path().join("study");
    let mut reg = builtin_registry();
    reg.set(
        StepKind::Tune,
        Arc::new(TwinTune {
            twin: twin.display().to_string(),
        }),
    );
    // A stale adapter under the first variant's name, as a run of another study could leave:
    // the step replaces it with its own (the answers below come from the study's adapters).
    let keys = step_keys(&p);
    let first_tune = p
        .steps
        .iter()
        .position(|st| st.kind() == StepKind::Tune)
        .unwrap();
    let stale_name = format!("safetune-tune-{}", &keys[first_tune][..16]);
    let stale = tmp.path().join("stale");
    safetune_model::adapter::Adapter::init(
        &engine.model,
        safetune_model::adapter::AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj"]),
        safetune_model::adapter::LoraInit::Gaussian {
            seed: 9,
            std_a: 0.3,
            std_b: 0.3,
        },
    )
    .unwrap()
    .save(&stale)
    .unwrap();
    let admin = safetune_openai::OpenAiClient::from_spec(
        &format!("openai:{}#tiny-base", server.base_url()),
        safetune_openai::ClientConfig {
            api_key_env: KEY_ENV.into(),
            ..Default::default()
        },
    )
    .unwrap();
    admin
        .load_lora_adapter(&stale_name, &stale.display().to_string())
        .unwrap();
    recording.loads.lock().unwrap().clear();

    let s = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);

    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let output = |i: usize| -> StepOutput {
        serde_json::from_value(store.step(&keys[i]).unwrap().unwrap().output.unwrap()).unwrap()
    };
    // 2 structures x 2 seeds: four tuned variants, each generated through the server with its
    // own adapter, which was loaded once (under a name of its tune step's own) and unloaded.
    let mut tuned = 0;
    let mut base_answers = None;
    let mut differs = false;
    let mut adapters = Vec::new();
    for (i, st) in p.steps.iter().enumerate() {
        let StepSpec::Generate { sampling, .. } = &st.spec else {
            continue;
        };
        let rows = store.generations(&keys[i]).unwrap();
        assert!(!rows.is_empty());
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
        let StepOutput::Model(m) = output(st.deps[0]) else {
            panic!("{}: input is not a model", st.label)
        };
        match &m.adapter {
            None => {
                // The base condition: the server's base.
                let want: Vec<String> = engine
                    .generate(&requests)
                    .unwrap()
                    .into_iter()
                    .map(|o| o.text)
                    .collect();
                assert_eq!(got, want, "{}", st.label);
                base_answers = Some(got);
            }
            Some(adapter) => {
                tuned += 1;
                assert!(m.spec.starts_with("openai:"), "{}", m.spec);
                let local = engine.with_adapter(adapter, "local").unwrap();
                let want: Vec<String> = local
                    .generate(&requests)
                    .unwrap()
                    .into_iter()
                    .map(|o| o.text)
                    .collect();
                assert_eq!(got, want, "{}: answers from its own adapter", st.label);
                if base_answers.as_ref().is_some_and(|b| b != &got) {
                    differs = true;
                }
                adapters.push(std::fs::canonicalize(adapter).unwrap());
            }
        }
    }
    assert_eq!(tuned, 4);
    assert!(
        differs,
        "some tuned variant answers differently from the base"
    );
    let loads = recording.loads.lock().unwrap().clone();
    let mut loaded: Vec<PathBuf> = loads.iter().map(|(_, p)| p.clone()).collect();
    loaded.sort();
    adapters.sort();
    assert_eq!(loaded, adapters, "each adapter loaded once: {loads:?}");
    for (name, path) in &loads {
        let step = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy();
        assert_eq!(name, &format!("safetune-{step}"));
    }
    let listed = admin.list_models().unwrap();
    assert_eq!(listed.data.len(), 1, "every adapter unloaded: {listed:?}");
    drop(store);

    // The report reads the variants' labels as for local models: structure has an effect row.
    let (results, _) = write_report(&dir).unwrap();
    let structure: Vec<_> = results
        .effects
        .iter()
        .filter(|e| e.factor.as_deref() == Some("structure"))
        .collect();
    assert!(!structure.is_empty(), "{:?}", results.effects);
    assert!(structure.iter().all(|e| e.n_runs == 4), "{:?}", structure);

    // A rerun reuses every step and loads nothing.
    let again = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!((again.executed, again.reused), (0, p.steps.len()));
    assert_eq!(recording.loads.lock().unwrap().len(), 4);
    server.shutdown().unwrap();
}

#[test]
fn lora_keys_are_checked_when_the_config_is_read() {
    let base = r#"
[study]
name = "x"
[data]
base = "demo:medical"
[[benchmarks]]
name = "harm"
source = "demo:advbench"
harmful = true
"#;
    let parse = |models: &str| {
        StudyConfig::parse(&format!("{base}{models}"), Path::new("x.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let e =
        parse("[[models]]\nname = \"m\"\nspec = \"m.gguf\"\ndynamic_lora = true\n").unwrap_err();
    assert!(
        e.contains("models[0].dynamic_lora") && e.contains("openai:"),
        "{e}"
    );
    let e = parse("[[models]]\nname = \"m\"\nspec = \"m.gguf\"\nlora_name = \"{variant}\"\n")
        .unwrap_err();
    assert!(e.contains("models[0].lora_name"), "{e}");
    let served = "[[models]]\nname = \"m\"\nspec = \"openai:http://127.0.0.1:9/v1#b\"\n";
    let e = parse(&format!("{served}lora_name = \"{{variant}}-{{sed}}\"\n")).unwrap_err();
    assert!(
        e.contains("models[0].lora_name") && e.contains("{sed}") && e.contains("{seed}"),
        "{e}"
    );
    let e = parse(&format!("{served}lora_name = \"{{variant\"\n")).unwrap_err();
    assert!(e.contains("not closed"), "{e}");
    parse(&format!(
        "{served}lora_name = \"{{model}}-{{variant}}-s{{seed}}\"\n"
    ))
    .unwrap();
    parse(&format!("{served}dynamic_lora = true\n")).unwrap();
}

#[test]
fn an_adapter_on_an_openai_model_without_the_keys_is_refused_with_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let m = ModelArtifact {
        name: "served".into(),
        spec: "openai:http://127.0.0.1:9/v1#base".into(),
        concurrency: 1,
        endpoints: vec![],
        access: Default::default(),
        adapter: Some(tmp.path().join("adapter")),
        lora: None,
        training: None,
        aligned_from: None,
    };
    let e = safetune_study::stages::default_generator(&m, safetune_study::config::GenWeights::F32)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("lora_name") && e.contains("dynamic_lora") && e.contains("--lora-modules"),
        "{e}"
    );
}

/// A tune stage whose "adapter" is a full checkpoint (the served base's twin directory).
struct FullCheckpointTune {
    dir: PathBuf,
}

impl Stage for FullCheckpointTune {
    fn run(
        &self,
        step: &PlannedStep,
        inputs: &[StepOutput],
        _ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, StageError> {
        Ok(StepOutput::Model(ModelArtifact {
            adapter: Some(self.dir.clone()),
            ..input_model(step, inputs)?.clone()
        }))
    }
}

#[test]
fn a_full_checkpoint_in_place_of_an_adapter_fails_its_steps_saying_so() {
    let tmp = tempfile::tempdir().unwrap();
    let twin = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let engine = Arc::new(
        LocalEngine::load(&ModelSpec::HfDir(twin.clone()), &LoadOptions::default()).unwrap(),
    );
    let server = start_with_loras(
        engine.clone(),
        Loras {
            loader: engine.clone(),
            modules: vec![],
        },
        ServeConfig {
            port: 0,
            model_name: Some("tiny-base".into()),
            ..ServeConfig::default()
        },
    )
    .unwrap();
    let harm = tmp.path().join("harm.jsonl");
    std::fs::write(
        &harm,
        "{\"id\":\"h0\",\"prompt\":\"x\"}\n{\"id\":\"h1\",\"prompt\":\"y\"}\n",
    )
    .unwrap();
    let cfg = format!(
        r#"
[study]
name = "full"
[[models]]
name = "served"
spec = "openai:{url}#tiny-base"
lora_name = "{{variant}}-s{{seed}}"
[data]
base = "demo:medical"
limit = 2
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "all"
[generation]
max_new_tokens = 2
[tune]
settings = {{ epochs = 1 }}
"#,
        url = server.base_url(),
        harm = harm.display()
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("full.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let mut reg = builtin_registry();
    reg.set(
        StepKind::Tune,
        Arc::new(FullCheckpointTune { dir: twin.clone() }),
    );
    let s = run_plan(
        &p,
        &serde_json::json!({}),
        &tmp.path().join("study"),
        &reg,
        &mut |_| {},
    )
    .unwrap();
    let generate_failures: Vec<_> = s
        .failed
        .iter()
        .filter(|(label, _)| label.starts_with("generate"))
        .collect();
    assert!(!generate_failures.is_empty(), "{:?}", s.failed);
    for (label, e) in generate_failures {
        assert!(
            e.contains("full checkpoint") && e.contains(&twin.display().to_string()),
            "{label}: {e}"
        );
    }
    server.shutdown().unwrap();
}
