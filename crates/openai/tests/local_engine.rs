//! The server over the real local engine (a tiny random-weight Llama the test writes), with the
//! client on the other side: what arrives over HTTP is what the engine generates directly.

use std::sync::Arc;
use std::time::Duration;

use safetune_data::Message;
use safetune_model::testing::TinyModel;
use safetune_model::{
    GenRequest, Generator, LoadOptions, LocalEngine, ModelSpec, Prompt, Sampling,
};
use safetune_openai::protocol::{parse_sse, ChatCompletionChunk};
use safetune_openai::{load_generator, start, ClientConfig, OpenAiClient, ServeConfig};

#[test]
fn tiny_local_model_served_and_read_back_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
    let load = LoadOptions {
        quantized: false,
        batch_size: 4,
        ..LoadOptions::default()
    };
    let engine = Arc::new(LocalEngine::load(&spec, &load).unwrap());
    let requests: Vec<GenRequest> = ["hello", "this is a test", "the thought"]
        .iter()
        .map(|p| GenRequest {
            prompt: Prompt::Chat(vec![Message::user(*p)]),
            sampling: Sampling {
                max_new_tokens: 6,
                ..Default::default()
            },
        })
        .collect();
    let direct = engine.generate(&requests).unwrap();

    let h = start(
        engine.clone(),
        ServeConfig {
            port: 0,
            batch_wait_ms: 20,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = ClientConfig {
        concurrency: 3,
        request_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let client = OpenAiClient::from_spec(
        &format!("openai:{}#{}", h.base_url(), engine.model_id()),
        cfg,
    )
    .unwrap();
    let remote = client.generate(&requests).unwrap();
    for (d, r) in direct.iter().zip(&remote) {
        assert_eq!(d.text, r.text);
        assert_eq!(d.finish_reason, r.finish_reason);
        assert_eq!(
            (d.prompt_tokens, d.completion_tokens),
            (r.prompt_tokens, r.completion_tokens)
        );
    }

    // Streaming pieces from the engine's sink reassemble to the same text.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
        "temperature": 0, "stream": true});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .proxy(None)
        .build()
        .into();
    let text = agent
        .post(&format!("{}/chat/completions", h.base_url()))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let (events, done) = parse_sse(&text);
    assert!(done);
    let streamed: String = events
        .iter()
        .map(|e| serde_json::from_str::<ChatCompletionChunk>(e).unwrap())
        .flat_map(|c| c.choices.into_iter().filter_map(|ch| ch.delta.content))
        .collect();
    assert_eq!(streamed, direct[0].text);

    // The same through load_generator, which both `serve` and `generate` use.
    let g = load_generator(&spec, &load, &ClientConfig::default()).unwrap();
    assert_eq!(g.max_batch(), 4);
    h.shutdown().unwrap();
}

#[test]
fn a_prompt_over_the_token_limit_is_refused_before_it_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
    let load = LoadOptions {
        quantized: false,
        batch_size: 2,
        ..LoadOptions::default()
    };
    let engine = Arc::new(LocalEngine::load(&spec, &load).unwrap());
    // The tiny model's context is 512 tokens, under the default limit of 2048: the limit in
    // force is 511 prompt tokens. Its tokens are mostly single bytes.
    let h = start(
        engine,
        ServeConfig {
            port: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let post = |prompt: &str| {
        let body = serde_json::json!({"prompt": prompt, "max_tokens": 1});
        let mut r = agent
            .post(&format!("{}/completions", h.base_url()))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (status, body) = post(&"z".repeat(2000));
    assert_eq!(status, 400, "{body}");
    let e: safetune_openai::protocol::ErrorResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(
        e.error.code.as_deref(),
        Some("context_length_exceeded"),
        "{body}"
    );
    assert_eq!(e.error.param.as_deref(), Some("prompt"));
    assert_eq!(h.stats().batches, 0, "the long prompt reached the model");
    let (status, body) = post("hello");
    assert_eq!(status, 200, "{body}");
    h.shutdown().unwrap();
}
