//! LoRA adapters served beside the base (`safetune serve --lora NAME=DIR`, and vLLM's runtime
//! endpoints behind `--allow-runtime-lora`), over the real local engine of a tiny random-weight
//! Llama: a request naming an adapter gets exactly what the engine generates locally with that
//! adapter, the base's name gets the base, and a mixed batch gives each request its own answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use safetune_data::Message;
use safetune_model::adapter::{Adapter, AdapterConfig, LoraInit};
use safetune_model::testing::TinyModel;
use safetune_model::{
    GenOutput, GenRequest, Generator, LoadOptions, LocalEngine, ModelSpec, Prompt, Sampling,
};
use safetune_openai::protocol::ModelList;
use safetune_openai::server::guard::ApiKey;
use safetune_openai::{
    start_with_loras, ClientConfig, LoraLoad, LoraLoader, Loras, OpenAiClient, ServeConfig,
    ServeError,
};

const PROMPTS: [&str; 4] = ["hello", "this is a test", "the thought", "ou ll is"];

fn base(root: &Path) -> Arc<LocalEngine> {
    let dir = TinyModel::default().write(&root.join("base")).unwrap();
    let load = LoadOptions {
        batch_size: 8,
        ..LoadOptions::default()
    };
    Arc::new(LocalEngine::load(&ModelSpec::HfDir(dir), &load).unwrap())
}

/// A random adapter (nonzero B, so it changes the answers) saved under `root/name`.
fn adapter(root: &Path, engine: &LocalEngine, name: &str, seed: u64) -> PathBuf {
    let a = Adapter::init(
        &engine.model,
        AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "up_proj", "down_proj"]),
        LoraInit::Gaussian {
            seed,
            std_a: 0.3,
            std_b: 0.3,
        },
    )
    .unwrap();
    let dir = root.join(name);
    a.save(&dir).unwrap();
    dir
}

fn requests() -> Vec<GenRequest> {
    PROMPTS
        .iter()
        .map(|p| GenRequest {
            prompt: Prompt::Chat(vec![Message::user(*p)]),
            sampling: Sampling {
                max_new_tokens: 8,
                ..Sampling::default()
            },
        })
        .collect()
}

fn texts(outs: &[GenOutput]) -> Vec<String> {
    outs.iter().map(|o| o.text.clone()).collect()
}

fn client(base_url: &str, model: &str, key_env: &str) -> OpenAiClient {
    let cfg = ClientConfig {
        concurrency: 4,
        max_retries: 0,
        request_timeout: Duration::from_secs(120),
        api_key_env: key_env.into(),
        ..ClientConfig::default()
    };
    OpenAiClient::from_spec(&format!("openai:{base_url}#{model}"), cfg).unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into()
}

/// POSTs JSON with an optional bearer key; returns the status and the body.
fn post(url: &str, key: Option<&str>, body: serde_json::Value) -> (u16, String) {
    let mut req = agent().post(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.send_json(&body).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

#[test]
fn each_request_gets_the_adapter_it_names_even_in_a_mixed_batch() {
    let root = tempfile::tempdir().unwrap();
    let engine = base(root.path());
    let dir_a = adapter(root.path(), &engine, "a", 11);
    let dir_b = adapter(root.path(), &engine, "b", 12);
    // What the engine generates locally: the base, and the base with each adapter.
    let want_base = texts(&engine.generate(&requests()).unwrap());
    let want_a = texts(
        &engine
            .with_adapter(&dir_a, "A")
            .unwrap()
            .generate(&requests())
            .unwrap(),
    );
    let want_b = texts(
        &engine
            .with_adapter(&dir_b, "B")
            .unwrap()
            .generate(&requests())
            .unwrap(),
    );
    assert_ne!(want_a, want_base, "adapter A changes the answers");
    assert_ne!(want_b, want_base, "adapter B changes the answers");
    assert_ne!(want_a, want_b);

    let loras = Loras {
        loader: engine.clone() as Arc<dyn LoraLoader>,
        modules: vec![("A".into(), dir_a.clone()), ("B".into(), dir_b.clone())],
    };
    let h = start_with_loras(
        engine.clone(),
        loras,
        ServeConfig {
            port: 0,
            max_batch: Some(8),
            // Long enough that the three clients' requests meet in the queue together.
            batch_wait_ms: 200,
            model_name: Some("base".into()),
            ..ServeConfig::default()
        },
    )
    .unwrap();
    let url = h.base_url();

    // /v1/models lists the base and both adapters, as vLLM does (root: the directory,
    // parent: the base).
    let models: ModelList = client(&url, "base", "SAFETUNE_TEST_NO_KEY")
        .list_models()
        .unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["base", "A", "B"]);
    assert_eq!(models.data[1].parent.as_deref(), Some("base"));
    assert_eq!(
        models.data[1].root.as_deref(),
        Some(dir_a.display().to_string().as_str())
    );
    assert_eq!(models.data[0].root, None);

    // Three clients at once, one per model: their requests are queued together, so batches are
    // taken from a queue that mixes A, the base and B.
    let got: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ["A", "base", "B"]
            .iter()
            .map(|m| {
                let c = client(&url, m, "SAFETUNE_TEST_NO_KEY");
                s.spawn(move || (m.to_string(), texts(&c.generate(&requests()).unwrap())))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, t) in &got {
        let want = match m.as_str() {
            "A" => &want_a,
            "B" => &want_b,
            _ => &want_base,
        };
        assert_eq!(t, want, "answers for model {m}");
    }
    // Twelve requests of three models at a batch size of 8: no batch mixes models, so there
    // are at least three generator calls.
    assert!(h.stats().batches >= 3, "{:?}", h.stats());

    // The answer names the model that answered; an unknown name is 404 once adapters are
    // served (a misspelt adapter must not get the base's answers).
    let (status, body) = post(
        &format!("{url}/chat/completions"),
        None,
        serde_json::json!({"model": "A", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], "A");
    let (status, body) = post(
        &format!("{url}/chat/completions"),
        None,
        serde_json::json!({"model": "C", "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    // Without --allow-runtime-lora the runtime endpoints do not exist.
    let (status, body) = post(
        &format!("{url}/load_lora_adapter"),
        None,
        serde_json::json!({"lora_name": "C", "lora_path": dir_a}),
    );
    assert_eq!(status, 404, "{body}");
    // The client says what the server lacks.
    let e = client(&url, "C", "SAFETUNE_TEST_NO_KEY")
        .load_lora_adapter("C", &dir_a.display().to_string())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 404") && e.contains("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
        "{e}"
    );
    h.shutdown().unwrap();
}

#[test]
fn a_bad_adapter_at_start_is_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let engine = base(root.path());
    let loras = |modules: Vec<(String, PathBuf)>| Loras {
        loader: engine.clone() as Arc<dyn LoraLoader>,
        modules,
    };
    let cfg = ServeConfig {
        port: 0,
        model_name: Some("base".into()),
        ..ServeConfig::default()
    };
    let missing = root.path().join("missing");
    let e = start_with_loras(
        engine.clone(),
        loras(vec![("A".into(), missing.clone())]),
        cfg.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`A`") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    let dir = adapter(root.path(), &engine, "a", 3);
    let e = start_with_loras(
        engine.clone(),
        loras(vec![("base".into(), dir.clone())]),
        cfg.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("base model's own name"), "{e}");
    // The runtime endpoints need a key.
    let e = start_with_loras(
        engine.clone(),
        loras(vec![]),
        ServeConfig {
            allow_runtime_lora: true,
            ..cfg
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, ServeError::Config(m) if m.contains("API key")),
        "{e}"
    );
}

#[test]
fn runtime_loading_needs_the_key_and_answers_as_vllm_does() {
    const KEY: &str = "sk-lora-test-key";
    const ENV: &str = "SAFETUNE_TEST_LORA_SERVER_KEY";
    std::env::set_var(ENV, KEY);
    let root = tempfile::tempdir().unwrap();
    let engine = base(root.path());
    let dir = adapter(root.path(), &engine, "a", 21);
    let want = texts(
        &engine
            .with_adapter(&dir, "x")
            .unwrap()
            .generate(&requests())
            .unwrap(),
    );
    let h = start_with_loras(
        engine.clone(),
        Loras {
            loader: engine.clone() as Arc<dyn LoraLoader>,
            modules: vec![],
        },
        ServeConfig {
            port: 0,
            model_name: Some("base".into()),
            api_key: Some(ApiKey::new(KEY).unwrap()),
            allow_runtime_lora: true,
            ..ServeConfig::default()
        },
    )
    .unwrap();
    let url = h.base_url();
    let load = format!("{url}/load_lora_adapter");
    let unload = format!("{url}/unload_lora_adapter");
    let body = serde_json::json!({"lora_name": "v1", "lora_path": dir});

    // Without the key: 401, and nothing is loaded.
    let (status, text) = post(&load, None, body.clone());
    assert_eq!(status, 401, "{text}");
    let (status, text) = post(&load, Some("wrong"), body.clone());
    assert_eq!(status, 401, "{text}");
    // With it: 200 and vLLM's success text.
    let (status, text) = post(&load, Some(KEY), body.clone());
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, "Success: LoRA adapter 'v1' added successfully.");
    // Loaded twice: 400, as vLLM; the client reads it as already loaded (idempotent reruns).
    let (status, text) = post(&load, Some(KEY), body.clone());
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("has already been loaded") && text.contains("InvalidUserInput"),
        "{text}"
    );
    let c = client(&url, "v1", ENV);
    assert_eq!(
        c.load_lora_adapter("v1", &dir.display().to_string())
            .unwrap(),
        LoraLoad::AlreadyLoaded
    );
    // The loaded adapter answers as the engine does locally with it.
    assert_eq!(texts(&c.generate(&requests()).unwrap()), want);
    let ids: Vec<String> = c
        .list_models()
        .unwrap()
        .data
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["base", "v1"]);

    // Bad paths: a missing directory is 404 naming it; a broken config, a full checkpoint and
    // an adapter of another model's shape are 400 naming the file.
    let missing = root.path().join("nowhere");
    let (status, text) = post(
        &load,
        Some(KEY),
        serde_json::json!({"lora_name": "m", "lora_path": missing}),
    );
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains("NotFoundError") && text.contains(&missing.display().to_string()),
        "{text}"
    );
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let weights = "adapter_model.safetensors";
    std::fs::copy(dir.join(weights), broken.join(weights)).unwrap();
    std::fs::write(
        broken.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\"",
    )
    .unwrap();
    let (status, text) = post(
        &load,
        Some(KEY),
        serde_json::json!({"lora_name": "m", "lora_path": broken}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("BadRequestError")
            && text.contains(&broken.join("adapter_config.json").display().to_string()),
        "{text}"
    );
    let (status, text) = post(
        &load,
        Some(KEY),
        serde_json::json!({"lora_name": "m", "lora_path": root.path().join("base")}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("full checkpoint"), "{text}");
    let other = TinyModel {
        hidden_size: 32,
        intermediate_size: 64,
        ..TinyModel::default()
    }
    .write(&root.path().join("other"))
    .unwrap();
    let small = LocalEngine::load(&ModelSpec::HfDir(other), &LoadOptions::default()).unwrap();
    let wrong = adapter(root.path(), &small, "wrong", 5);
    let (status, text) = post(
        &load,
        Some(KEY),
        serde_json::json!({"lora_name": "m", "lora_path": wrong}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("adapter_model.safetensors") && text.contains("lora_A"),
        "{text}"
    );
    let (status, text) = post(&load, Some(KEY), serde_json::json!({"lora_name": "m"}));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("lora_path"), "{text}");

    // Unload: without the key 401; with it 200; again 404 as vLLM (the client: not loaded).
    let (status, _) = post(&unload, None, serde_json::json!({"lora_name": "v1"}));
    assert_eq!(status, 401);
    let (status, text) = post(&unload, Some(KEY), serde_json::json!({"lora_name": "v1"}));
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, "Success: LoRA adapter 'v1' removed successfully.");
    let (status, text) = post(&unload, Some(KEY), serde_json::json!({"lora_name": "v1"}));
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains("NotFoundError") && text.contains("cannot be found"),
        "{text}"
    );
    assert!(!c.unload_lora_adapter("v1").unwrap());
    // Gone: its name is now unknown.
    let e = c.generate(&requests()[..1]).unwrap_err().to_string();
    assert!(e.contains("404"), "{e}");
    // The client loads it again (fresh) and unloads it.
    assert_eq!(
        c.load_lora_adapter("v1", &dir.display().to_string())
            .unwrap(),
        LoraLoad::Loaded
    );
    assert_eq!(texts(&c.generate(&requests()).unwrap()), want);
    assert!(c.unload_lora_adapter("v1").unwrap());
    h.shutdown().unwrap();
}
