//! `safetune serve` against hostile or careless clients: oversized jobs, stop strings, jobs
//! whose clients leave, foreign Host headers, form posts, missing keys, slow clients and
//! connection hogs. The server runs on 127.0.0.1 port 0 over a fake generator; every wait has a
//! bound and only loopback is used.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetune_model::backend::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, Prompt, TokenSink,
};
use safetune_openai::protocol::ErrorResponse;
use safetune_openai::{start, ServeConfig, ServerHandle};
use serde_json::json;

/// Answers "ok" to every request after `delay` per generator call; records what it was given.
struct Fake {
    delay: Duration,
    max_batch: usize,
    batches: Mutex<Vec<Vec<String>>>,
    seen: AtomicUsize,
}

impl Fake {
    fn new(delay_ms: u64, max_batch: usize) -> Arc<Fake> {
        Arc::new(Fake {
            delay: Duration::from_millis(delay_ms),
            max_batch,
            batches: Mutex::new(Vec::new()),
            seen: AtomicUsize::new(0),
        })
    }
    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
    fn batches(&self) -> Vec<Vec<String>> {
        self.batches.lock().unwrap().clone()
    }
}

fn text_of(p: &Prompt) -> String {
    match p {
        Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        Prompt::Text(t) => t.clone(),
    }
}

impl Generator for Fake {
    fn model_id(&self) -> &str {
        "fake"
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        self.seen.fetch_add(requests.len(), Ordering::SeqCst);
        self.batches
            .lock()
            .unwrap()
            .push(requests.iter().map(|r| text_of(&r.prompt)).collect());
        std::thread::sleep(self.delay);
        Ok((0..requests.len())
            .map(|i| {
                sink(i, "ok");
                GenOutput {
                    text: "ok".into(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    finish_reason: FinishReason::Stop,
                }
            })
            .collect())
    }
}

fn server(fake: Arc<Fake>, tweak: impl FnOnce(&mut ServeConfig)) -> ServerHandle {
    let mut cfg = ServeConfig {
        port: 0,
        batch_wait_ms: 1,
        ..Default::default()
    };
    tweak(&mut cfg);
    start(fake, cfg).expect("server starts on port 0")
}

/// One raw HTTP/1.1 request (`Connection: close`); returns the status and the body.
fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    parse_response(&out)
}

fn parse_response(out: &str) -> (u16, String) {
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

const LOCAL: (&str, &str) = ("Host", "127.0.0.1");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> (u16, String) {
    raw(addr, "POST", path, &[LOCAL, JSON], &body.to_string())
}

fn error_of(body: &str) -> ErrorResponse {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not OpenAI's error shape ({e}): {body}"))
}

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Request size

#[test]
fn oversized_requests_are_refused_whole_before_the_model_sees_them() {
    let fake = Fake::new(0, 8);
    let h = server(fake.clone(), |_| {});
    let addr = h.addr();
    // Defaults: 64 prompts, 128 choices, 256-character stop strings.
    let many: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let (status, body) = post(
        addr,
        "/v1/completions",
        &json!({"prompt": many, "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{body}");
    let e = error_of(&body);
    assert_eq!(e.error.code.as_deref(), Some("too_many_prompts"));
    assert_eq!(e.error.param.as_deref(), Some("prompt"));

    let nine: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
    let (status, body) = post(addr, "/v1/completions", &json!({"prompt": nine, "n": 16}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        error_of(&body).error.code.as_deref(),
        Some("too_many_choices")
    );

    let long_stop = "x".repeat(300);
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "stop": [long_stop]}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body).error.param.as_deref(), Some("stop"));
    assert_eq!(fake.seen(), 0, "the model saw a refused request");

    // At the limits, the same requests pass.
    let (status, body) = post(
        addr,
        "/v1/completions",
        &json!({"prompt": nine[..8], "n": 16, "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.seen(), 128);
    h.shutdown().unwrap();
}

#[test]
fn a_large_job_is_split_and_a_small_one_is_served_between_its_parts() {
    let fake = Fake::new(40, 2);
    let h = server(fake.clone(), |_| {});
    let addr = h.addr();
    let prompts: Vec<String> = (0..20).map(|i| format!("big{i}")).collect();
    let big = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": prompts, "max_tokens": 1}),
        )
    });
    wait_until("the big job to start", 5, || fake.seen() > 0);
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "small"}]}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = big.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 20);
    let batches = fake.batches();
    assert!(batches.iter().all(|b| b.len() <= 2), "{batches:?}");
    let small_at = batches
        .iter()
        .position(|b| b.iter().any(|p| p == "small"))
        .unwrap();
    let last_big = batches
        .iter()
        .rposition(|b| b.iter().any(|p| p.starts_with("big")))
        .unwrap();
    assert!(
        small_at < last_big,
        "the small request waited for the whole big one: {batches:?}"
    );
    h.shutdown().unwrap();
}

#[test]
fn generation_stops_when_the_client_disconnects() {
    for stream in [false, true] {
        let fake = Fake::new(50, 1);
        let h = server(fake.clone(), |_| {});
        let prompts: Vec<String> = (0..30).map(|i| format!("p{i}")).collect();
        let body = json!({"prompt": prompts, "max_tokens": 1, "stream": stream}).to_string();
        let mut s = TcpStream::connect(h.addr()).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        wait_until("generation to start", 5, || fake.seen() > 0);
        drop(s);
        // Give the server time it would need to run a few more parts, then some.
        std::thread::sleep(Duration::from_millis(600));
        let seen = fake.seen();
        assert!(
            seen < 20,
            "stream={stream}: {seen} of 30 requests ran after the client left"
        );
        wait_until("the job to be dropped", 5, || h.stats().cancelled > 0);
        h.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Where requests may come from

#[test]
fn foreign_host_headers_and_form_posts_are_refused() {
    let fake = Fake::new(0, 8);
    let h = server(fake.clone(), |_| {});
    let addr = h.addr();
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    // A page on another site, or a rebound DNS name, sends its own host name.
    let (status, body) = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Host", "evil.example:8000"), JSON],
        &chat,
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        error_of(&body).error.code.as_deref(),
        Some("host_not_allowed")
    );
    let (status, _) = raw(addr, "GET", "/v1/models", &[("Host", "evil.example")], "");
    assert_eq!(status, 403);
    // A form post (no CORS preflight) cannot carry application/json.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (status, body) = raw(
            addr,
            "POST",
            "/v1/chat/completions",
            &[LOCAL, ("Content-Type", ct)],
            &chat,
        );
        assert_eq!(status, 415, "{ct}: {body}");
        error_of(&body);
    }
    let (status, _) = raw(addr, "POST", "/v1/chat/completions", &[LOCAL], &chat);
    assert_eq!(status, 415);
    assert_eq!(fake.seen(), 0);
    for host in ["127.0.0.1", "localhost:1234", "[::1]:80"] {
        let (status, body) = raw(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("Host", host), JSON],
            &chat,
        );
        assert_eq!(status, 200, "{host}: {body}");
    }
    h.shutdown().unwrap();
}

#[test]
fn the_api_key_is_required_on_v1_routes_and_a_public_bind_needs_one() {
    let fake = Fake::new(0, 8);
    let key = safetune_openai::server::guard::ApiKey::new("k-123").unwrap();
    let h = server(fake.clone(), |c| c.api_key = Some(key));
    let addr = h.addr();
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("k-123"),
        Some("Bearer k-1234"),
    ] {
        let mut headers = vec![LOCAL, JSON];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let (status, body) = raw(addr, "POST", "/v1/chat/completions", &headers, &chat);
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(
            error_of(&body).error.code.as_deref(),
            Some("invalid_api_key")
        );
        let (status, _) = raw(addr, "GET", "/v1/models", &headers[..1], "");
        assert_eq!(status, 401);
    }
    assert_eq!(fake.seen(), 0);
    let (status, body) = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        &[LOCAL, JSON, ("Authorization", "Bearer k-123")],
        &chat,
    );
    assert_eq!(status, 200, "{body}");
    // Health checks need no key.
    assert_eq!(raw(addr, "GET", "/health", &[LOCAL], "").0, 200);
    // The client sends the key from its environment variable.
    std::env::set_var("SAFETUNE_TEST_SERVE_KEY", "k-123");
    let cfg = safetune_openai::ClientConfig {
        api_key_env: "SAFETUNE_TEST_SERVE_KEY".into(),
        max_retries: 0,
        ..Default::default()
    };
    let client =
        safetune_openai::OpenAiClient::from_spec(&format!("openai:{}#fake", h.base_url()), cfg)
            .unwrap();
    let out = client
        .generate(&[GenRequest {
            prompt: Prompt::Text("hi".into()),
            sampling: Default::default(),
        }])
        .unwrap();
    assert_eq!(out[0].text, "ok");
    h.shutdown().unwrap();

    let e = start(
        Fake::new(0, 1),
        ServeConfig {
            host: "0.0.0.0".into(),
            port: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("API key"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Slow clients and connection hogs

#[test]
fn slow_clients_time_out_and_free_their_slots() {
    let fake = Fake::new(0, 8);
    let h = server(fake, |c| {
        c.max_connections = 4;
        c.read_timeout = Duration::from_millis(400);
    });
    let addr = h.addr();
    // Four clients send a head and part of the body, then stall.
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro").unwrap();
            s
        })
        .collect();
    wait_until("the slow clients to hold every slot", 5, || {
        h.stats().in_flight == 4
    });
    assert_eq!(raw(addr, "GET", "/health", &[LOCAL], "").0, 503);
    // Once their time is up they are answered 408 and dropped; health answers again.
    wait_until("health to answer", 5, || {
        raw(addr, "GET", "/health", &[LOCAL], "").0 == 200
    });
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert_eq!(parse_response(&out).0, 408, "{out}");
    }
    h.shutdown().unwrap();
}

#[test]
fn one_address_cannot_hold_every_connection() {
    let fake = Fake::new(0, 8);
    let h = server(fake, |c| {
        c.max_connections = 16;
        c.max_connections_per_ip = 2;
    });
    let addr = h.addr();
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until("two connections", 5, || h.stats().in_flight == 2);
    let (status, body) = raw(addr, "GET", "/health", &[LOCAL], "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        error_of(&body).error.code.as_deref(),
        Some("server_overloaded")
    );
    drop(idle);
    wait_until("health to answer", 5, || {
        raw(addr, "GET", "/health", &[LOCAL], "").0 == 200
    });
    h.shutdown().unwrap();
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let h = server(Fake::new(0, 8), |_| {});
    let mut s = TcpStream::connect(h.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let one = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    // Two pipelined requests, then a third after the answers.
    s.write_all(format!("{one}{one}").as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answers = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .matches("HTTP/1.1 200 OK")
            .count()
    };
    while answers(&buf) < 2 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    s.write_all(one.as_bytes()).unwrap();
    while answers(&buf) < 3 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    h.shutdown().unwrap();
}

#[test]
fn a_client_that_expects_100_continue_gets_the_go_ahead() {
    let h = server(Fake::new(0, 8), |_| {});
    let mut s = TcpStream::connect(h.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(parse_response(&out).0, 200, "{out}");
    h.shutdown().unwrap();
}

#[test]
fn malformed_requests_get_a_clear_error_and_the_connection_closes() {
    let h = server(Fake::new(0, 8), |_| {});
    let addr = h.addr();
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        parse_response(&out)
    };
    let (status, body) = send(b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(status, 400, "{body}");
    error_of(&body);
    let (status, body) = send(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).error.message.contains("Content-Length"),
        "{body}"
    );
    let (status, body) = send(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(status, 411, "{body}");
    let mut huge = b"GET /health HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(20)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let (status, body) = send(&huge);
    assert_eq!(status, 431, "{body}");
    h.shutdown().unwrap();
}
