//! The server over the real local engine (a tiny random-weight Llama the test writes), with the
//! client on the other side: what arrives over HTTP is what the engine generates directly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetune_data::Message;
use safetune_model::testing::TinyModel;
use safetune_model::{
    BackendError, CancelCheck, FinishReason, GenOutput, GenRequest, Generator, LoadOptions,
    LocalEngine, ModelSpec, Prompt, Sampling, TokenSink,
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

/// The tiny engine with every decode step slowed to at least `step` per row (the tiny model
/// is too fast for a client to leave in the middle otherwise), recording every output it
/// returns and how many requests each call had. It honours the scheduler's cancel check
/// by handing it to the engine.
struct Slowed {
    engine: LocalEngine,
    step: Duration,
    steps: AtomicUsize,
    outputs: Mutex<Vec<(String, GenOutput)>>,
    calls: Mutex<Vec<usize>>,
}

impl Slowed {
    /// The tiny model without stop tokens, so a request left alone runs to `max_tokens`.
    fn new(dir: &std::path::Path, batch_size: usize, step_ms: u64) -> Arc<Slowed> {
        TinyModel::default().write(dir).unwrap();
        let spec = ModelSpec::parse(dir.to_str().unwrap()).unwrap();
        let load = LoadOptions {
            batch_size,
            ..LoadOptions::default()
        };
        let mut engine = LocalEngine::load(&spec, &load).unwrap();
        engine.tok.stop_ids.clear();
        Arc::new(Slowed {
            engine,
            step: Duration::from_millis(step_ms),
            steps: AtomicUsize::new(0),
            outputs: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// The output recorded for the prompt `text`, once its generator call returned.
    fn output(&self, text: &str) -> Option<GenOutput> {
        let outs = self.outputs.lock().unwrap();
        outs.iter().find(|(p, _)| p == text).map(|(_, o)| o.clone())
    }
}

impl Generator for Slowed {
    fn model_id(&self) -> &str {
        self.engine.model_id()
    }
    fn max_batch(&self) -> usize {
        self.engine.max_batch()
    }
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.generate_cancellable(requests, sink, &|_| false)
    }
    fn generate_cancellable(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
        cancelled: CancelCheck<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.calls.lock().unwrap().push(requests.len());
        // The engine asks before every token of every row: the place to slow each step down.
        let slow = |i: usize| {
            self.steps.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.step);
            cancelled(i)
        };
        let outs = self.engine.generate_cancellable(requests, sink, &slow)?;
        let mut rec = self.outputs.lock().unwrap();
        for (r, o) in requests.iter().zip(&outs) {
            let text = match &r.prompt {
                Prompt::Text(t) => t.clone(),
                Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
            };
            rec.push((text, o.clone()));
        }
        Ok(outs)
    }
}

/// Sends a completion request on a raw connection and returns it open, without reading.
fn send_completion(addr: std::net::SocketAddr, body: &serde_json::Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn wait_for<T>(what: &str, secs: u64, mut get: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = get() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn decoding_stops_within_a_few_tokens_when_the_client_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    // 5 ms a step: left alone, the 400 tokens asked for take at least 2 s.
    let g = Slowed::new(dir.path(), 4, 5);
    let h = start(
        g.clone(),
        ServeConfig {
            port: 0,
            batch_wait_ms: 1,
            ..Default::default()
        },
    )
    .unwrap();
    for stream in [false, true] {
        let prompt = format!("leaving, stream={stream}");
        let body = serde_json::json!({"prompt": prompt, "max_tokens": 400, "temperature": 0,
            "stream": stream});
        let before = g.steps.load(Ordering::SeqCst);
        let s = send_completion(h.addr(), &body);
        wait_for("decoding to start", 10, || {
            (g.steps.load(Ordering::SeqCst) > before + 3).then_some(())
        });
        drop(s);
        let out = wait_for("the generator call to return", 10, || g.output(&prompt));
        println!(
            "stream={stream}: {} of 400 tokens, {:?}",
            out.completion_tokens, out.finish_reason
        );
        assert_eq!(
            out.finish_reason,
            FinishReason::Cancelled,
            "stream={stream}"
        );
        // The server checks its client every 100 ms: about 20 steps of 5 ms, then a token.
        assert!(
            out.completion_tokens < 100,
            "stream={stream}: {} of 400 tokens were generated for a client that left",
            out.completion_tokens
        );
    }
    wait_for("the stopped requests to be counted", 5, || {
        (h.stats().cancelled >= 2).then_some(())
    });
    h.shutdown().unwrap();
}

#[test]
fn a_request_batched_with_a_cancelled_one_is_answered_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let g = Slowed::new(dir.path(), 2, 5);
    let stays_req = GenRequest {
        prompt: Prompt::Text("the one who stays".into()),
        sampling: Sampling {
            max_new_tokens: 150,
            temperature: 0.0,
            ..Sampling::default()
        },
    };
    let direct = g.engine.generate(std::slice::from_ref(&stays_req)).unwrap();
    assert_eq!(direct[0].completion_tokens, 150);
    // A long wait for the batch to fill, so that both requests share one generator call.
    let h = start(
        g.clone(),
        ServeConfig {
            port: 0,
            batch_wait_ms: 2000,
            ..Default::default()
        },
    )
    .unwrap();
    let leaves = send_completion(
        h.addr(),
        &serde_json::json!({"prompt": "the one who leaves", "max_tokens": 400, "temperature": 0}),
    );
    let addr = h.addr();
    let stays = std::thread::spawn(move || {
        let mut s = send_completion(
            addr,
            &serde_json::json!({"prompt": "the one who stays", "max_tokens": 150,
                "temperature": 0}),
        );
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    });
    // Leave once a few steps of the shared batch have run.
    wait_for("decoding to start", 10, || {
        (g.steps.load(Ordering::SeqCst) > 6).then_some(())
    });
    drop(leaves);
    let answer = stays.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(v["usage"]["completion_tokens"], 150, "{body}");
    assert_eq!(v["choices"][0]["text"], direct[0].text.as_str(), "{body}");
    assert_eq!(
        *g.calls.lock().unwrap(),
        vec![2],
        "both requests were decoded in one batch"
    );
    let left = g.output("the one who leaves").unwrap();
    println!(
        "left: {} of 400 tokens, {:?}; stayed: {} of 150 tokens",
        left.completion_tokens, left.finish_reason, v["usage"]["completion_tokens"]
    );
    assert_eq!(left.finish_reason, FinishReason::Cancelled);
    assert!(
        left.completion_tokens < 100,
        "{} of 400 tokens were generated for the client that left",
        left.completion_tokens
    );
    h.shutdown().unwrap();
}

/// The real engine behind `generate_fed`, every token of every row slowed by `step` (through the
/// feed's cancel check, which the engine asks before each token), counting the steps.
struct SlowedFed {
    engine: LocalEngine,
    step: Duration,
    steps: AtomicUsize,
}

struct SlowFeed<'a> {
    inner: &'a mut dyn safetune_model::RequestFeed,
    step: Duration,
    steps: &'a AtomicUsize,
}

impl safetune_model::RequestFeed for SlowFeed<'_> {
    fn next(&mut self) -> Option<(usize, GenRequest)> {
        self.inner.next()
    }
    fn piece(&mut self, key: usize, piece: &str) {
        self.inner.piece(key, piece)
    }
    fn done(&mut self, key: usize, out: Result<GenOutput, BackendError>) {
        self.inner.done(key, out)
    }
    fn cancelled(&self, key: usize) -> bool {
        self.steps.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.step);
        self.inner.cancelled(key)
    }
}

impl Generator for SlowedFed {
    fn model_id(&self) -> &str {
        self.engine.model_id()
    }
    fn max_batch(&self) -> usize {
        self.engine.max_batch()
    }
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.engine.generate_streaming(requests, sink)
    }
    fn generate_fed(&self, feed: &mut dyn safetune_model::RequestFeed) -> Result<(), BackendError> {
        let mut slow = SlowFeed {
            inner: feed,
            step: self.step,
            steps: &self.steps,
        };
        self.engine.generate_fed(&mut slow)
    }
}

/// A request that arrives while another decodes joins the running batch at once (one generator
/// run serves both) and is answered before the long one ends, with the text each prompt gets
/// from the engine alone.
#[test]
fn a_request_joins_the_running_batch_and_is_answered_first() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
    let load = LoadOptions {
        batch_size: 2,
        ..LoadOptions::default()
    };
    let mut engine = LocalEngine::load(&spec, &load).unwrap();
    engine.tok.stop_ids.clear();
    let alone = |prompt: &str, n: usize| {
        engine
            .generate(&[GenRequest {
                prompt: Prompt::Text(prompt.into()),
                sampling: Sampling {
                    max_new_tokens: n,
                    ..Default::default()
                },
            }])
            .unwrap()
            .remove(0)
            .text
    };
    let (long_alone, short_alone) = (alone("a long answer", 300), alone("short", 5));
    // 3 ms a token: the long request takes at least 0.9 s.
    let g = Arc::new(SlowedFed {
        engine,
        step: Duration::from_millis(3),
        steps: AtomicUsize::new(0),
    });
    let h = start(
        g.clone(),
        ServeConfig {
            port: 0,
            batch_wait_ms: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let url = format!("{}/completions", h.base_url());
    let post = move |url: String, prompt: &str, n: usize| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .proxy(None)
            .build()
            .into();
        let body = serde_json::json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
        let v: serde_json::Value = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let long = {
        let url = url.clone();
        std::thread::spawn(move || post(url, "a long answer", 300))
    };
    wait_for("the long request to decode", 10, || {
        (g.steps.load(Ordering::SeqCst) > 5).then_some(())
    });
    let short = post(url, "short", 5);
    assert!(
        !long.is_finished(),
        "the short request waited for the long one to finish"
    );
    assert_eq!(short, short_alone);
    assert_eq!(long.join().unwrap(), long_alone);
    assert_eq!(h.stats().batches, 1, "one generator run served both");
    h.shutdown().unwrap();
}
