//! End-to-end tests: the server on 127.0.0.1 port 0 over fake generators, the client against
//! it (and against small hand-written flaky servers), and the resumable row runner.
//! Every request has a timeout and every loop a bound; only loopback is used.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetune_data::Message;
use safetune_model::backend::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, Prompt, RequestFeed, Sampling,
    TokenSink,
};
use safetune_openai::protocol::{
    parse_sse, ChatCompletionChunk, CompletionResponse, ErrorResponse,
};
use safetune_openai::testing::{Fault, FaultServer};
use safetune_openai::{
    run_rows, start, ClientConfig, OpenAiClient, OpenAiSpec, RowInput, RunError, RunOptions,
    ServeConfig, ServerHandle,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Fake generator

/// Echoes the prompt word by word ("echo: <last user turn>"), streaming one word per piece.
/// Records every batch it is given; can sleep, fail its first calls, or fail batches that contain
/// a prompt with "boom" while `fail_boom` is set.
struct Fake {
    delay: Duration,
    max_batch: usize,
    batches: Mutex<Vec<usize>>,
    seen: Mutex<Vec<String>>,
    fail_first: AtomicUsize,
    fail_boom: AtomicBool,
    /// While closed, generation waits (at most 5 s) for it to open.
    gate: (Mutex<bool>, std::sync::Condvar),
}

impl Fake {
    fn new() -> Fake {
        Fake {
            delay: Duration::ZERO,
            max_batch: 8,
            batches: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            fail_first: AtomicUsize::new(0),
            fail_boom: AtomicBool::new(false),
            gate: (Mutex::new(true), std::sync::Condvar::new()),
        }
    }
    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
    fn with_delay(mut self, ms: u64) -> Fake {
        self.delay = Duration::from_millis(ms);
        self
    }
    fn with_max_batch(mut self, b: usize) -> Fake {
        self.max_batch = b;
        self
    }
    fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        Prompt::Text(t) => t.clone(),
    }
}

/// What the fake answers for a prompt, and its finish reason.
fn echo(p: &Prompt, max_new_tokens: usize) -> (String, FinishReason) {
    let words: Vec<String> = format!("echo: {}", prompt_text(p))
        .split(' ')
        .map(str::to_string)
        .collect();
    let n = words.len().min(max_new_tokens);
    let reason = if words.len() > max_new_tokens {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    (words[..n].join(" "), reason)
}

impl Generator for Fake {
    fn model_id(&self) -> &str {
        "fake-echo"
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.batches.lock().unwrap().push(requests.len());
        self.seen
            .lock()
            .unwrap()
            .extend(requests.iter().map(|r| prompt_text(&r.prompt)));
        std::thread::sleep(self.delay);
        let open = self.gate.0.lock().unwrap();
        drop(
            self.gate
                .1
                .wait_timeout_while(open, Duration::from_secs(5), |open| !*open)
                .unwrap(),
        );
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Unavailable("failing on purpose".into()));
        }
        if self.fail_boom.load(Ordering::SeqCst)
            && requests
                .iter()
                .any(|r| prompt_text(&r.prompt).contains("boom"))
        {
            return Err(BackendError::Unavailable("boom".into()));
        }
        if let Some(i) = requests
            .iter()
            .position(|r| prompt_text(&r.prompt).contains("invalid"))
        {
            return Err(BackendError::Invalid(format!(
                "request {i}: asked to be invalid"
            )));
        }
        let mut outs = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let (text, finish_reason) = echo(&r.prompt, r.sampling.max_new_tokens);
            for (k, w) in text.split(' ').enumerate() {
                sink(
                    i,
                    &if k == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    },
                );
            }
            outs.push(GenOutput {
                prompt_tokens: prompt_text(&r.prompt).split(' ').count(),
                completion_tokens: text.split(' ').count(),
                text,
                finish_reason,
            });
        }
        Ok(outs)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn server(fake: Arc<Fake>, tweak: impl FnOnce(&mut ServeConfig)) -> ServerHandle {
    let mut cfg = ServeConfig {
        port: 0,
        batch_wait_ms: 2,
        ..Default::default()
    };
    tweak(&mut cfg);
    start(fake, cfg).expect("server starts on port 0")
}

fn client_config() -> ClientConfig {
    ClientConfig {
        concurrency: 4,
        max_retries: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        // The server's Retry-After of 1 s is cut to this, to keep the suite fast.
        max_retry_after: Duration::from_millis(50),
        request_timeout: Duration::from_secs(10),
        api_key_env: "SAFETUNE_TEST_UNSET_KEY".into(),
        allow_insecure: false,
    }
}

fn client(h: &ServerHandle, cfg: ClientConfig) -> OpenAiClient {
    OpenAiClient::from_spec(&format!("openai:{}#fake-echo", h.base_url()), cfg).unwrap()
}

fn chat(text: &str, max: usize) -> GenRequest {
    GenRequest {
        prompt: Prompt::Chat(vec![Message::system("be brief"), Message::user(text)]),
        sampling: Sampling {
            max_new_tokens: max,
            ..Default::default()
        },
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into()
}

/// Raw HTTP: `(status, retry-after header, body)`.
fn http(method: &str, url: &str, body: Option<&str>) -> (u16, Option<String>, String) {
    let a = agent();
    let r = match (method, body) {
        ("GET", _) => a.get(url).call(),
        (_, Some(b)) => a
            .post(url)
            .header("Content-Type", "application/json")
            .send(b),
        (_, None) => a.post(url).send_empty(),
    };
    let mut r = r.expect("loopback request");
    let status = r.status().as_u16();
    let ra = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, ra, r.body_mut().read_to_string().unwrap())
}

fn error_of(body: &str) -> ErrorResponse {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not OpenAI's error shape ({e}): {body}"))
}

// ---------------------------------------------------------------------------------------------
// Server round trips

#[test]
fn chat_completion_round_trip_through_client_and_raw_http() {
    let fake = Arc::new(Fake::new());
    let h = server(fake.clone(), |_| {});
    let c = client(&h, client_config());
    let outs = c
        .generate(&[chat("hello there", 64), chat("one two three four", 2)])
        .unwrap();
    assert_eq!(outs[0].text, "echo: hello there");
    assert_eq!(outs[0].finish_reason, FinishReason::Stop);
    assert_eq!((outs[0].prompt_tokens, outs[0].completion_tokens), (2, 3));
    assert_eq!(outs[1].text, "echo: one");
    assert_eq!(outs[1].finish_reason, FinishReason::Length);

    let body = json!({"model": "whatever", "messages": [{"role": "developer", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "n": 2, "max_tokens": 10});
    let (status, _, text) = http(
        "POST",
        &format!("{}/chat/completions", h.base_url()),
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake-echo");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "echo: hi"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The prompt counts once for n choices.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5})
    );
    h.shutdown().unwrap();
}

#[test]
fn completions_and_models_round_trip() {
    let fake = Arc::new(Fake::new());
    let h = server(fake, |_| {});
    let c = client(&h, client_config());
    let req = GenRequest {
        prompt: Prompt::Text("raw prompt".into()),
        sampling: Sampling::default(),
    };
    let out = c.generate(&[req]).unwrap();
    assert_eq!(out[0].text, "echo: raw prompt");

    // A list of prompts, default max_tokens of 16, choice indexes in prompt order.
    let body = json!({"prompt": ["a b", "c"], "temperature": 0});
    let (status, _, text) = http(
        "POST",
        &format!("{}/completions", h.base_url()),
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v: CompletionResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(v.object, "text_completion");
    let texts: Vec<&str> = v.choices.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["echo: a b", "echo: c"]);

    let models = c.list_models().unwrap();
    assert_eq!(models.object, "list");
    assert_eq!(models.data[0].id, "fake-echo");
    let (status, _, text) = http("GET", &format!("{}/models/fake-echo", h.base_url()), None);
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = http("GET", &format!("{}/models/other", h.base_url()), None);
    assert_eq!(status, 404);
    assert_eq!(
        error_of(&text).error.code.as_deref(),
        Some("model_not_found")
    );
    h.shutdown().unwrap();
}

#[test]
fn streaming_chunks_reassemble_to_the_full_text() {
    let fake = Arc::new(Fake::new());
    let h = server(fake, |_| {});
    let prompt = "the quick brown fox jumps";
    let body = json!({"messages": [{"role": "user", "content": prompt}], "stream": true,
        "n": 2, "stream_options": {"include_usage": true}});
    let (status, _, text) = http(
        "POST",
        &format!("{}/chat/completions", h.base_url()),
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let (events, done) = parse_sse(&text);
    assert!(done, "stream must end with [DONE]: {text}");
    let chunks: Vec<ChatCompletionChunk> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c.object == "chat.completion.chunk" && c.id == chunks[0].id));
    assert_eq!(
        chunks[0].choices[0].delta.role.as_deref(),
        Some("assistant")
    );
    let mut texts = [String::new(), String::new()];
    let mut finish = [None, None];
    for c in &chunks {
        for ch in &c.choices {
            texts[ch.index as usize].push_str(ch.delta.content.as_deref().unwrap_or(""));
            if ch.finish_reason.is_some() {
                finish[ch.index as usize] = ch.finish_reason.clone();
            }
        }
    }
    let expected = format!("echo: {prompt}");
    assert_eq!(texts, [expected.clone(), expected]);
    assert_eq!(finish, [Some("stop".to_string()), Some("stop".to_string())]);
    // More than one content piece per choice: it really streamed piece by piece.
    assert!(chunks.len() > 6);
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(last.usage.unwrap().completion_tokens, 12);

    // Streamed /v1/completions too.
    let body = json!({"prompt": "x y", "stream": true});
    let (status, _, text) = http(
        "POST",
        &format!("{}/completions", h.base_url()),
        Some(&body.to_string()),
    );
    assert_eq!(status, 200);
    let (events, done) = parse_sse(&text);
    assert!(done);
    let joined: String = events
        .iter()
        .map(|e| serde_json::from_str::<CompletionResponse>(e).unwrap())
        .flat_map(|c| c.choices.into_iter().map(|ch| ch.text))
        .collect();
    assert_eq!(joined, "echo: x y");
    h.shutdown().unwrap();
}

#[test]
fn concurrent_requests_are_batched() {
    let fake = Arc::new(Fake::new().with_delay(30).with_max_batch(4));
    let h = server(fake.clone(), |c| c.batch_wait_ms = 150);
    let c = client(
        &h,
        ClientConfig {
            concurrency: 4,
            ..client_config()
        },
    );
    let reqs: Vec<GenRequest> = (0..4).map(|i| chat(&format!("req {i}"), 8)).collect();
    let outs = c.generate(&reqs).unwrap();
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(
            o.text,
            format!("echo: req {i}"),
            "outputs keep request order"
        );
    }
    let sizes = fake.batch_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 4, "{sizes:?}");
    assert!(
        sizes.iter().any(|&s| s >= 2),
        "concurrent requests were not batched: {sizes:?}"
    );
    assert!(sizes.iter().all(|&s| s <= 4), "{sizes:?}");
    h.shutdown().unwrap();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn full_queue_answers_429_with_openai_error() {
    let fake = Arc::new(Fake::new().with_max_batch(1));
    fake.set_gate(false);
    let h = server(fake.clone(), |c| {
        c.max_queue = 1;
        c.batch_wait_ms = 0;
    });
    let url = format!("{}/chat/completions", h.base_url());
    let body = json!({"messages": [{"role": "user", "content": "slow"}]}).to_string();
    let (u1, b1) = (url.clone(), body.clone());
    let first = std::thread::spawn(move || http("POST", &u1, Some(&b1)).0);
    wait_until("the first request to start generating", || {
        h.stats().batches >= 1
    });
    let (u2, b2) = (url.clone(), body.clone());
    let second = std::thread::spawn(move || http("POST", &u2, Some(&b2)).0);
    wait_until("the second request to be queued", || h.stats().queued == 1);
    let (status, retry_after, text) = http("POST", &url, Some(&body));
    assert_eq!(status, 429, "{text}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let e = error_of(&text);
    assert_eq!(e.error.code.as_deref(), Some("queue_full"));
    assert!(e.error.message.contains("queue is full"));
    fake.set_gate(true);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(second.join().unwrap(), 200);
    assert_eq!(h.stats().rejected_queue_full, 1);
    h.shutdown().unwrap();
}

#[test]
fn a_request_the_model_rejects_does_not_fail_its_batch_mates() {
    let fake = Arc::new(Fake::new().with_delay(20).with_max_batch(4));
    let h = server(fake.clone(), |c| c.batch_wait_ms = 150);
    let url = format!("{}/chat/completions", h.base_url());
    let threads: Vec<_> = ["fine", "invalid please", "also fine"]
        .iter()
        .map(|p| {
            let (url, body) = (
                url.clone(),
                json!({"messages": [{"role": "user", "content": p}]}).to_string(),
            );
            std::thread::spawn(move || http("POST", &url, Some(&body)))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results[0].0, 200, "{}", results[0].2);
    assert_eq!(results[2].0, 200, "{}", results[2].2);
    assert_eq!(results[1].0, 400, "{}", results[1].2);
    assert!(error_of(&results[1].2)
        .error
        .message
        .contains("asked to be invalid"));
    h.shutdown().unwrap();
}

#[test]
fn bad_requests_get_400_and_unknown_routes_404_in_openai_shape() {
    let h = server(Arc::new(Fake::new()), |_| {});
    let chat_url = format!("{}/chat/completions", h.base_url());
    let cases = [
        ("{not json", None),
        (r#"{"messages": []}"#, Some("messages")),
        (
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            Some("messages"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 5}"#,
            Some("temperature"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 0}"#,
            Some("n"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            Some("messages"),
        ),
    ];
    for (body, param) in cases {
        let (status, _, text) = http("POST", &chat_url, Some(body));
        assert_eq!(status, 400, "{body} -> {text}");
        let e = error_of(&text);
        assert_eq!(e.error.kind, "invalid_request_error");
        assert_eq!(e.error.param.as_deref(), param, "{body} -> {text}");
    }
    let (status, _, text) = http(
        "POST",
        &format!("{}/completions", h.base_url()),
        Some(r#"{"prompt": []}"#),
    );
    assert_eq!(status, 400, "{text}");
    let (status, _, text) = http("POST", &format!("{}/embeddings", h.base_url()), Some("{}"));
    assert_eq!(status, 404);
    assert_eq!(error_of(&text).error.code.as_deref(), Some("unknown_url"));
    let (status, _, text) = http("GET", &chat_url, None);
    assert_eq!(status, 405);
    error_of(&text);
    h.shutdown().unwrap();
}

#[test]
fn shutdown_finishes_in_flight_requests_then_stops_listening() {
    let fake = Arc::new(Fake::new().with_delay(300));
    let h = server(fake, |_| {});
    let url = format!("{}/chat/completions", h.base_url());
    let body = json!({"messages": [{"role": "user", "content": "last words"}]}).to_string();
    let inflight = std::thread::spawn(move || http("POST", &url, Some(&body)));
    wait_until("the request to start generating", || h.stats().batches >= 1);
    let addr = h.addr();
    h.shutdown().unwrap();
    let (status, _, text) = inflight.join().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("echo: last words"));
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "still listening"
    );
}

#[test]
fn sigterm_stops_the_server_after_in_flight_requests() {
    let fake = Arc::new(Fake::new().with_delay(300));
    let h = server(fake, |_| {});
    // Installed before raising: without a handler SIGTERM would end the test process.
    h.install_signal_handlers().unwrap();
    let url = format!("{}/chat/completions", h.base_url());
    let body = json!({"messages": [{"role": "user", "content": "bye"}]}).to_string();
    let inflight = std::thread::spawn(move || http("POST", &url, Some(&body)));
    wait_until("the request to start generating", || h.stats().batches >= 1);
    let addr = h.addr();
    let stop = h.stop_flag();
    let waiter = std::thread::spawn(move || h.wait());
    signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
    wait_until("the stop flag", || stop.load(Ordering::SeqCst));
    waiter.join().unwrap().unwrap();
    let (status, _, text) = inflight.join().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "still listening"
    );
}

// ---------------------------------------------------------------------------------------------
// Client

#[test]
fn client_retries_through_503_from_a_failing_generator() {
    let fake = Arc::new(Fake::new());
    fake.fail_first.store(2, Ordering::SeqCst);
    let h = server(fake.clone(), |_| {});
    let c = client(
        &h,
        ClientConfig {
            concurrency: 1,
            ..client_config()
        },
    );
    let out = c.generate(&[chat("again", 8)]).unwrap();
    assert_eq!(out[0].text, "echo: again");
    assert_eq!(fake.batch_sizes().len(), 3, "two failures then a success");

    // Retries run out: the error says so and names the URL.
    fake.fail_first.store(10, Ordering::SeqCst);
    let c = client(
        &h,
        ClientConfig {
            concurrency: 1,
            max_retries: 2,
            ..client_config()
        },
    );
    let e = c.generate(&[chat("again", 8)]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BackendError::Unavailable(_)), "{msg}");
    assert!(
        msg.contains("HTTP 503") && msg.contains("gave up after 3 attempts"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{}/chat/completions", h.base_url())),
        "{msg}"
    );
    fake.fail_first.store(0, Ordering::SeqCst);
    h.shutdown().unwrap();
}

/// A hand-written server: answers the first `fail` requests with `status` (and a Retry-After of
/// `retry_after`), then a fixed chat completion. Records the Authorization headers it saw.
struct Flaky {
    url: String,
    auth: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flaky {
    fn start(
        fail: usize,
        status: u16,
        retry_after: Option<&'static str>,
        error_message: &'static str,
    ) -> Flaky {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
        let auth = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (auth2, stop2) = (auth.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            while !stop2.load(Ordering::SeqCst) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
                let a = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.to_string());
                auth2.lock().unwrap().push(a.clone().unwrap_or_default());
                served += 1;
                let resp = if served <= fail {
                    let msg = error_message.replace("{auth}", &a.unwrap_or_default());
                    let mut r = tiny_http::Response::from_string(json!({"error": {"message": msg, "type": "x", "param": null, "code": null}}).to_string())
                        .with_status_code(status);
                    if let Some(ra) = retry_after {
                        r.add_header(tiny_http::Header::from_bytes("Retry-After", ra).unwrap());
                    }
                    r
                } else {
                    tiny_http::Response::from_string(
                        json!({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
                        .to_string(),
                    )
                };
                let _ = req.respond(resp);
            }
        });
        Flaky {
            url,
            auth,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn client_honours_retry_after_on_429() {
    let flaky = Flaky::start(2, 429, Some("0.3"), "slow down");
    let cfg = ClientConfig {
        max_retry_after: Duration::from_secs(5),
        ..client_config()
    };
    let c = OpenAiClient::from_spec(&format!("openai:{}#m", flaky.url), cfg).unwrap();
    let t = Instant::now();
    let out = c.generate(&[chat("x", 4)]).unwrap();
    assert_eq!(out[0].text, "fine");
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    assert_eq!((out[0].prompt_tokens, out[0].completion_tokens), (3, 1));
    assert_eq!(flaky.auth.lock().unwrap().len(), 3);
    // Backoff alone is at most 50 ms here; two Retry-After waits of 0.3 s were honoured.
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn client_does_not_retry_a_bad_request() {
    let flaky = Flaky::start(100, 400, None, "bad field");
    let c = OpenAiClient::from_spec(&format!("openai:{}#m", flaky.url), client_config()).unwrap();
    let e = c.generate(&[chat("x", 4)]).unwrap_err();
    assert!(matches!(e, BackendError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("HTTP 400: bad field"), "{e}");
    assert_eq!(flaky.auth.lock().unwrap().len(), 1);
}

#[test]
fn api_key_is_sent_but_never_shown() {
    let secret = "sk-test-0123456789abcdef";
    std::env::set_var("SAFETUNE_TEST_OPENAI_KEY_SHOWN", secret);
    let cfg = ClientConfig {
        api_key_env: "SAFETUNE_TEST_OPENAI_KEY_SHOWN".into(),
        ..client_config()
    };
    // The server echoes the key back in its error message, as some do.
    let flaky = Flaky::start(100, 401, None, "Incorrect API key provided: {auth}");
    let c = OpenAiClient::from_spec(&format!("openai:{}#m", flaky.url), cfg.clone()).unwrap();
    assert!(c.has_api_key());
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(secret) && debug.contains("redacted"),
        "{debug}"
    );
    let e = c.generate(&[chat("x", 4)]).unwrap_err();
    let msg = format!("{e} {e:?}");
    assert!(!msg.contains(secret), "{msg}");
    assert!(
        msg.contains("HTTP 401") && msg.contains("SAFETUNE_TEST_OPENAI_KEY_SHOWN"),
        "{msg}"
    );
    assert_eq!(flaky.auth.lock().unwrap()[0], format!("Bearer {secret}"));

    // Nor in a connection error.
    let c = OpenAiClient::from_spec(
        &format!("openai:{}#m", dead_url()),
        ClientConfig {
            max_retries: 0,
            ..cfg
        },
    )
    .unwrap();
    let e = c.generate(&[chat("x", 4)]).unwrap_err();
    assert!(!format!("{e} {e:?} {c:?}").contains(secret));
}

/// A loopback URL where nothing listens.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/v1")
}

#[test]
fn unreachable_endpoint_error_names_the_url() {
    let url = dead_url();
    let c = OpenAiClient::from_spec(
        &format!("openai:{url}#m"),
        ClientConfig {
            max_retries: 1,
            ..client_config()
        },
    )
    .unwrap();
    let e = c.generate(&[chat("x", 4)]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BackendError::Unavailable(_)), "{msg}");
    assert!(
        msg.contains(&format!("cannot reach {url}/chat/completions")),
        "{msg}"
    );
    assert!(msg.contains("gave up after 2 attempts"), "{msg}");
}

#[test]
fn request_timeout_is_enforced() {
    let fake = Arc::new(Fake::new().with_delay(700));
    let h = server(fake, |_| {});
    let cfg = ClientConfig {
        max_retries: 0,
        request_timeout: Duration::from_millis(200),
        ..client_config()
    };
    let t = Instant::now();
    let e = client(&h, cfg).generate(&[chat("x", 4)]).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(650),
        "{:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("timed out"), "{e}");
    h.shutdown().unwrap();
}

#[test]
fn spec_without_path_gets_v1() {
    let s = OpenAiSpec::parse("openai:http://127.0.0.1:1#m").unwrap();
    assert_eq!(s.base_url, "http://127.0.0.1:1/v1");
}

// ---------------------------------------------------------------------------------------------
// Resumable runs

#[test]
fn a_failed_run_keeps_finished_rows_and_a_rerun_does_only_the_rest() {
    let fake = Arc::new(Fake::new());
    fake.fail_boom.store(true, Ordering::SeqCst);
    let h = server(fake.clone(), |_| {});
    let c = client(
        &h,
        ClientConfig {
            concurrency: 3,
            max_retries: 1,
            ..client_config()
        },
    );
    let rows: Vec<RowInput> = (0..10)
        .map(|i| RowInput {
            id: format!("r{i}"),
            request: chat(if i == 7 { "boom" } else { "fine" }, 8),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub").join("out.jsonl");
    let mut make = |input: &RowInput, o: &GenOutput| json!({"response": o.text, "prompt": prompt_text(&input.request.prompt)});
    let opts = RunOptions { chunk_size: 3 };

    let e = run_rows(&c, &rows, &out, &opts, &mut make, &mut |_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            RunError::Generation {
                finished: 6,
                total: 10,
                remaining: 4,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("6 of 10 rows finished")
            && msg.contains("rerun")
            && msg.contains("4 remaining"),
        "{msg}"
    );
    let kept = std::fs::read_to_string(&out).unwrap();
    assert_eq!(kept.lines().count(), 6);

    // A kill mid-write leaves a partial line; on resume it goes to OUT.corrupt.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"id\": \"r6\", \"resp"))
        .unwrap();

    fake.fail_boom.store(false, Ordering::SeqCst);
    fake.seen.lock().unwrap().clear();
    let mut reports = Vec::new();
    let prog = run_rows(&c, &rows, &out, &opts, &mut make, &mut |p| {
        reports.push(p.clone())
    })
    .unwrap();
    assert_eq!((prog.skipped, prog.done, prog.total), (6, 4, 10));
    assert_eq!(reports.last().unwrap().finished(), 10);
    assert_eq!(
        fake.seen.lock().unwrap().len(),
        4,
        "only the unfinished rows were generated again"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids: Vec<&str> = lines.iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]
    );
    let r7 = lines.iter().find(|v| v["id"] == "r7").unwrap();
    assert_eq!(r7["response"], "echo: boom");

    // A third run has nothing to do.
    let prog = run_rows(&c, &rows, &out, &opts, &mut make, &mut |_| {}).unwrap();
    assert_eq!((prog.skipped, prog.done), (10, 0));
    h.shutdown().unwrap();
}

#[test]
fn run_rows_moves_bad_lines_aside_and_keeps_finished_rows() {
    let rows: Vec<RowInput> = (0..5)
        .map(|i| RowInput {
            id: format!("r{i}"),
            request: chat(&format!("row {i}"), 8),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut make = |_: &RowInput, o: &GenOutput| json!({"response": o.text});
    let opts = RunOptions { chunk_size: 2 };
    run_rows(&Fake::new(), &rows, &out, &opts, &mut make, &mut |_| {}).unwrap();
    let clean = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = clean.lines().collect();
    // r1 replaced by garbage, r4 cut mid-line by a kill.
    let cut = &lines[4][..lines[4].len() / 2];
    std::fs::write(
        &out,
        format!("{}\n#junk\n{}\n{}\n{cut}", lines[0], lines[2], lines[3]),
    )
    .unwrap();
    let fake = Fake::new();
    let prog = run_rows(&fake, &rows, &out, &opts, &mut make, &mut |_| {}).unwrap();
    assert_eq!((prog.skipped, prog.done), (3, 2));
    assert_eq!(*fake.seen.lock().unwrap(), ["row 1", "row 4"]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!(
            "{}\n{}\n{}\n{}\n{}\n",
            lines[0], lines[2], lines[3], lines[1], lines[4]
        )
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.jsonl.corrupt")).unwrap(),
        format!("#junk\n{cut}\n")
    );
}

#[test]
fn duplicate_ids_are_rejected() {
    let rows = vec![
        RowInput {
            id: "a".into(),
            request: chat("x", 1),
        },
        RowInput {
            id: "a".into(),
            request: chat("y", 1),
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let e = run_rows(
        &Fake::new(),
        &rows,
        &dir.path().join("o.jsonl"),
        &RunOptions::default(),
        &mut |_, _| json!({}),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, RunError::DuplicateId(ref id) if id == "a"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fault injection: odd Retry-After values, a body cut short, a dropped connection

const COMPLETION: &str = r#"{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

/// One of each misbehaviour the clients must ride out.
fn every_fault() -> Vec<Fault> {
    vec![
        Fault::status(429, "inf"),
        Fault::status(503, "1e20"),
        Fault::status(500, "nan"),
        Fault::status(429, "-5"),
        Fault::status(503, "abc"),
        Fault::status(429, "Wed, 21 Oct 2015 07:28:00 GMT"),
        Fault::status(500, ""),
        Fault::TruncatedBody,
        Fault::Drop,
    ]
}

fn fault_config(max_retries: u32) -> ClientConfig {
    ClientConfig {
        concurrency: 3,
        max_retries,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_retry_after: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        api_key_env: "SAFETUNE_TEST_UNSET_KEY".into(),
        allow_insecure: false,
    }
}

#[test]
fn the_client_rides_out_odd_retry_after_values_cut_bodies_and_dropped_connections() {
    let server = FaultServer::start(every_fault(), COMPLETION, false);
    let c = OpenAiClient::from_spec(&format!("openai:{}/v1#m", server.url()), fault_config(12))
        .unwrap();
    let rows: Vec<RowInput> = (0..5)
        .map(|i| RowInput {
            id: format!("r{i}"),
            request: chat(&format!("q{i}"), 4),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let t = Instant::now();
    let prog = run_rows(
        &c,
        &rows,
        &out,
        &RunOptions::default(),
        &mut |_, o| json!({"response": o.text}),
        &mut |_| {},
    )
    .unwrap();
    // Only 1e20 is honoured, cut to 100 ms; every other wait is a few ms of backoff.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(prog.done, 5);
    assert_eq!(server.requests(), 5 + every_fault().len());
    let text = std::fs::read_to_string(&out).unwrap();
    let mut ids: Vec<String> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["response"], "fine");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4"]);
}

#[test]
fn the_client_gives_up_with_a_clear_error_and_keeps_finished_rows() {
    // Retry-After: 1e20 on every answer: each wait is cut to the 100 ms cap.
    let server = FaultServer::start(vec![Fault::status(503, "1e20")], COMPLETION, true);
    let c =
        OpenAiClient::from_spec(&format!("openai:{}/v1#m", server.url()), fault_config(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "{\"id\":\"done\",\"response\":\"kept\"}\n").unwrap();
    let rows = vec![
        RowInput {
            id: "done".into(),
            request: chat("a", 4),
        },
        RowInput {
            id: "new".into(),
            request: chat("b", 4),
        },
    ];
    let t = Instant::now();
    let e = run_rows(
        &c,
        &rows,
        &out,
        &RunOptions::default(),
        &mut |_, o| json!({"response": o.text}),
        &mut |_| {},
    )
    .unwrap_err();
    let elapsed = t.elapsed();
    let msg = e.to_string();
    assert!(
        msg.contains("HTTP 503")
            && msg.contains("gave up after 3 attempts")
            && msg.contains("1 of 2 rows finished"),
        "{msg}"
    );
    assert_eq!(server.requests(), 3);
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5),
        "two capped waits: {elapsed:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "{\"id\":\"done\",\"response\":\"kept\"}\n"
    );
}

/// A server that answers each request on its own thread with the request's last user turn,
/// after 600 ms when that turn contains "slow".
fn slow_echo_server() -> (String, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(20)) else {
                continue;
            };
            std::thread::spawn(move || {
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
                let v: Value = serde_json::from_str(&body).unwrap();
                let text = v["messages"].as_array().unwrap().last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_string();
                if text.contains("slow") {
                    std::thread::sleep(Duration::from_millis(600));
                }
                let _ = req.respond(tiny_http::Response::from_string(
                    json!({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
                    .to_string(),
                ));
            });
        }
    });
    (url, stop, thread)
}

/// Hands out `prompts` in order and records what happened, in order.
struct Recorder {
    prompts: Vec<&'static str>,
    next: usize,
    in_flight: usize,
    most_in_flight: usize,
    events: Vec<String>,
}

impl RequestFeed for Recorder {
    fn next(&mut self) -> Option<(usize, GenRequest)> {
        let p = self.prompts.get(self.next)?;
        self.next += 1;
        self.in_flight += 1;
        self.most_in_flight = self.most_in_flight.max(self.in_flight);
        self.events.push(format!("start {}", self.next - 1));
        Some((self.next - 1, chat(p, 8)))
    }
    fn piece(&mut self, _: usize, _: &str) {}
    fn done(&mut self, key: usize, out: Result<GenOutput, BackendError>) {
        self.in_flight -= 1;
        let text = out.map(|o| o.text).unwrap_or_else(|e| e.to_string());
        self.events.push(format!("done {key} {text}"));
    }
    fn cancelled(&self, _: usize) -> bool {
        false
    }
}

#[test]
fn a_fed_client_refills_a_slot_as_soon_as_its_request_ends() {
    let (url, stop, thread) = slow_echo_server();
    // Two slots: in batches of two, "b" could not start before "slow one" ended.
    let c = OpenAiClient::from_spec(
        &format!("openai:{url}#m"),
        ClientConfig {
            concurrency: 2,
            ..client_config()
        },
    )
    .unwrap();
    let mut feed = Recorder {
        prompts: vec!["slow one", "a", "b", "c", "d"],
        next: 0,
        in_flight: 0,
        most_in_flight: 0,
        events: Vec::new(),
    };
    c.generate_fed(&mut feed).unwrap();
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    assert_eq!(feed.most_in_flight, 2, "{:?}", feed.events);
    assert_eq!(feed.in_flight, 0);
    let done: Vec<&String> = feed
        .events
        .iter()
        .filter(|e| e.starts_with("done"))
        .collect();
    assert_eq!(done.len(), 5, "{:?}", feed.events);
    assert_eq!(done[4], "done 0 slow one", "{:?}", feed.events);
    for (k, p) in ["a", "b", "c", "d"].iter().enumerate() {
        assert!(
            feed.events.contains(&format!("done {} {p}", k + 1)),
            "{:?}",
            feed.events
        );
    }
}
