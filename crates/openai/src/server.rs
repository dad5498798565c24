//! An OpenAI-compatible HTTP server over any [`Generator`].
//!
//! Threads: one accept loop (tiny_http parses connections on its own threads and hands us whole
//! requests), one handler thread per request in flight (bounded by
//! [`ServeConfig::max_connections`]), and one scheduler thread that takes queued jobs, packs them
//! into batches of at most `max_batch` generation requests (waiting up to `batch_wait_ms` for a
//! batch to fill) and runs them through the generator. The job queue is bounded: when it holds
//! `max_queue` jobs, new ones get `429` with OpenAI's error JSON and a `Retry-After` header.
//!
//! Shutdown ([`ServerHandle::shutdown`], or SIGINT/SIGTERM through [`ServerHandle::wait_for_signal`]):
//! stop accepting, answer requests that were accepted but not yet queued with 503, let the
//! scheduler finish every queued job, wait for in-flight responses to be written, then return.
//!
//! Request defaults follow OpenAI's API: `temperature` 1.0, `top_p` 1.0, `n` 1, a random seed
//! when none is given, `max_tokens` from [`ServeConfig::default_max_tokens`] (chat) or 16
//! (completions). The request's `model` is not checked: a server serves one model, and answers
//! name it. A request the model rejects (`BackendError::Invalid`) is retried alone, so it does not
//! fail the requests it was batched with.

// Errors here become HTTP answers once per request; their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use safetune_data::{Message, Role};
use safetune_model::backend::{BackendError, GenOutput, GenRequest, Generator, Prompt, Sampling};
use tiny_http::{Header, Method, Response, StatusCode};

use crate::protocol::*;
use crate::random_u64;

/// Settings of [`start`] and [`serve`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind; `127.0.0.1` keeps the server local.
    pub host: String,
    /// Port to bind; `0` picks a free one (see [`ServerHandle::addr`]).
    pub port: u16,
    /// Most jobs (HTTP generation requests) waiting for the model; more are answered with 429.
    pub max_queue: usize,
    /// Most generation requests per generator call; `None` uses `generator.max_batch()`.
    pub max_batch: Option<usize>,
    /// How long the scheduler waits for more requests to fill a batch.
    pub batch_wait_ms: u64,
    /// `max_tokens` when a request gives none: 256 for chat (OpenAI's own default is "up to the
    /// context"), 16 for `/v1/completions` as in OpenAI's API.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: usize,
    /// Largest `n` (choices per request) accepted.
    pub max_n: u32,
    /// Largest request body accepted, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most requests handled at once (queued, generating or writing); more are answered with 503
    /// without reading them.
    pub max_connections: usize,
    /// How long a shutdown waits for in-flight requests before giving up on them.
    pub shutdown_timeout: Duration,
    /// The model name reported by `/v1/models` and in responses; `None` uses
    /// `generator.model_id()`.
    pub model_name: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".to_string(),
            port: 8000,
            max_queue: 64,
            max_batch: None,
            batch_wait_ms: 5,
            default_max_tokens: 256,
            max_tokens_limit: 32_768,
            max_n: 16,
            max_body_bytes: 8 << 20,
            max_connections: 256,
            shutdown_timeout: Duration::from_secs(60),
            model_name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("cannot install the SIGINT/SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("invalid server setting: {0}")]
    Config(String),
    #[error("server thread panicked")]
    Panicked,
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Jobs waiting in the queue now.
    pub queued: usize,
    /// Requests being handled now (any route).
    pub in_flight: usize,
    /// Generator calls made so far.
    pub batches: u64,
    /// Requests answered 429 because the queue was full.
    pub rejected_queue_full: u64,
}

/// A running server. Dropping it without [`ServerHandle::shutdown`] leaves it running until the
/// process exits.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ServerHandle {
    /// The bound address (with the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT/v1`, the base URL an OpenAI client is given.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The flag that stops the server when set (what the signal handlers set).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    pub fn stats(&self) -> ServerStats {
        let queued = self.shared.queue.lock().map(|q| q.jobs.len()).unwrap_or(0);
        ServerStats {
            queued,
            in_flight: self.shared.in_flight.load(Ordering::SeqCst),
            batches: self.shared.batches.load(Ordering::SeqCst),
            rejected_queue_full: self.shared.rejected.load(Ordering::SeqCst),
        }
    }

    /// Stops accepting, finishes queued and in-flight requests, and returns once all are answered
    /// (or `shutdown_timeout` has passed).
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Makes SIGINT and SIGTERM set the stop flag. A second signal (once the flag is set) exits
    /// the process at once with status 1.
    pub fn install_signal_handlers(&self) -> Result<(), ServeError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, self.stop.clone())
                .map_err(ServeError::Signal)?;
            signal_hook::flag::register(sig, self.stop.clone()).map_err(ServeError::Signal)?;
        }
        Ok(())
    }

    /// Blocks until the stop flag is set (by a signal handler or another thread), then shuts
    /// down gracefully as [`ServerHandle::shutdown`] does.
    pub fn wait(mut self) -> Result<(), ServeError> {
        self.join()
    }

    /// [`ServerHandle::install_signal_handlers`], then [`ServerHandle::wait`]: serves until
    /// SIGINT or SIGTERM, then shuts down gracefully.
    pub fn wait_for_signal(self) -> Result<(), ServeError> {
        self.install_signal_handlers()?;
        self.wait()
    }

    fn join(&mut self) -> Result<(), ServeError> {
        match self.accept.take() {
            Some(h) => h.join().map_err(|_| ServeError::Panicked),
            None => Ok(()),
        }
    }
}

/// Starts a server on a background thread and returns at once.
pub fn start(
    generator: Arc<dyn Generator>,
    config: ServeConfig,
) -> Result<ServerHandle, ServeError> {
    if config.max_queue == 0 {
        return Err(ServeError::Config("max_queue must be at least 1".into()));
    }
    if config.max_batch == Some(0) {
        return Err(ServeError::Config("max_batch must be at least 1".into()));
    }
    let bind = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    let server = tiny_http::Server::http(bind.as_str()).map_err(|e| ServeError::Bind {
        addr: bind.clone(),
        reason: e.to_string(),
    })?;
    let addr = match server.server_addr().to_ip() {
        Some(a) => a,
        None => {
            return Err(ServeError::Bind {
                addr: bind,
                reason: "not an IP address".into(),
            })
        }
    };
    let max_batch = config
        .max_batch
        .unwrap_or_else(|| generator.max_batch())
        .max(1);
    let model_name = config
        .model_name
        .clone()
        .unwrap_or_else(|| generator.model_id().to_string());
    let shared = Arc::new(Shared {
        config,
        model_name,
        max_batch,
        created: unix_now(),
        queue: Mutex::new(Queue {
            jobs: VecDeque::new(),
            closing: false,
        }),
        wake: Condvar::new(),
        in_flight: AtomicUsize::new(0),
        idle: (Mutex::new(()), Condvar::new()),
        batches: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
    });
    let stop = Arc::new(AtomicBool::new(false));

    let sched_shared = shared.clone();
    let scheduler = std::thread::Builder::new()
        .name("safetune-serve-scheduler".into())
        .spawn(move || scheduler_loop(&sched_shared, generator.as_ref()))
        .map_err(|e| ServeError::Config(format!("cannot start the scheduler thread: {e}")))?;

    let accept_shared = shared.clone();
    let accept_stop = stop.clone();
    let accept = std::thread::Builder::new()
        .name("safetune-serve-accept".into())
        .spawn(move || accept_loop(server, accept_shared, accept_stop, scheduler))
        .map_err(|e| ServeError::Config(format!("cannot start the accept thread: {e}")))?;

    Ok(ServerHandle {
        addr,
        stop,
        shared,
        accept: Some(accept),
    })
}

/// Starts a server, prints where it listens to stderr, and serves until SIGINT/SIGTERM.
pub fn serve(generator: Arc<dyn Generator>, config: ServeConfig) -> Result<(), ServeError> {
    let handle = start(generator, config)?;
    eprintln!(
        "safetune serve: listening on {} (Ctrl-C to stop)",
        handle.base_url()
    );
    handle.wait_for_signal()?;
    eprintln!("safetune serve: stopped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Shared state, jobs and the scheduler

struct Shared {
    config: ServeConfig,
    model_name: String,
    max_batch: usize,
    created: u64,
    queue: Mutex<Queue>,
    wake: Condvar,
    in_flight: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    batches: AtomicU64,
    rejected: AtomicU64,
    next_id: AtomicU64,
}

struct Queue {
    jobs: VecDeque<Job>,
    closing: bool,
}

enum Event {
    Piece(usize, String),
    Done(Result<Vec<GenOutput>, BackendError>),
}

struct Job {
    requests: Vec<GenRequest>,
    stream: bool,
    events: mpsc::Sender<Event>,
}

enum EnqueueError {
    Full,
    Closing,
}

impl Shared {
    fn enqueue(&self, job: Job) -> Result<(), EnqueueError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closing {
            return Err(EnqueueError::Closing);
        }
        if q.jobs.len() >= self.config.max_queue {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(EnqueueError::Full);
        }
        q.jobs.push_back(job);
        drop(q);
        self.wake.notify_all();
        Ok(())
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{n:04x}", random_u64() & 0xffff_ffff)
    }
}

fn scheduler_loop(shared: &Shared, generator: &dyn Generator) {
    let wait = Duration::from_millis(shared.config.batch_wait_ms);
    loop {
        // Take a batch: the first job, then more while they fit, waiting up to `wait` to fill.
        let mut batch: Vec<Job> = Vec::new();
        {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.jobs.is_empty() {
                if q.closing {
                    return;
                }
                q = shared
                    .wake
                    .wait_timeout(q, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let deadline = Instant::now() + wait;
            let mut size = 0usize;
            loop {
                while let Some(front) = q.jobs.front() {
                    let n = front.requests.len();
                    if !batch.is_empty() && size + n > shared.max_batch {
                        break;
                    }
                    size += n;
                    batch.push(q.jobs.pop_front().expect("front exists"));
                }
                let now = Instant::now();
                if size >= shared.max_batch || !q.jobs.is_empty() || now >= deadline || q.closing {
                    break;
                }
                q = shared
                    .wake
                    .wait_timeout(q, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        run_batch(shared, generator, batch);
    }
}

fn run_batch(shared: &Shared, generator: &dyn Generator, batch: Vec<Job>) {
    // Flatten, remembering which job and choice each request belongs to.
    let mut requests = Vec::new();
    let mut owner: Vec<(usize, usize)> = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        for (i, r) in job.requests.iter().enumerate() {
            requests.push(r.clone());
            owner.push((j, i));
        }
    }
    shared.batches.fetch_add(1, Ordering::SeqCst);
    let mut sink = |idx: usize, piece: &str| {
        if let Some(&(j, i)) = owner.get(idx) {
            let job = &batch[j];
            if job.stream && !piece.is_empty() {
                let _ = job.events.send(Event::Piece(i, piece.to_string()));
            }
        }
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        generator.generate_streaming(&requests, &mut sink)
    }));
    let result = match result {
        Ok(Ok(outs)) if outs.len() == requests.len() => Ok(outs),
        Ok(Ok(outs)) => Err(BackendError::Other(format!(
            "the generator returned {} outputs for {} requests",
            outs.len(),
            requests.len()
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BackendError::Other("the generator panicked".into())),
    };
    match result {
        Ok(outs) => {
            let mut outs = outs.into_iter();
            for job in &batch {
                let mine: Vec<GenOutput> = outs.by_ref().take(job.requests.len()).collect();
                let _ = job.events.send(Event::Done(Ok(mine)));
            }
        }
        // One request's own fault (too long, bad settings) must not fail the others it was
        // batched with: run each job alone so only the faulty one gets the 400.
        Err(BackendError::Invalid(_)) if batch.len() > 1 => {
            for job in batch {
                run_batch(shared, generator, vec![job]);
            }
        }
        Err(e) => {
            for job in &batch {
                let copy = match &e {
                    BackendError::Invalid(m) => BackendError::Invalid(m.clone()),
                    BackendError::Unavailable(m) => BackendError::Unavailable(m.clone()),
                    BackendError::Other(m) => BackendError::Other(m.clone()),
                };
                let _ = job.events.send(Event::Done(Err(copy)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting and handling requests

fn accept_loop(
    server: tiny_http::Server,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    scheduler: JoinHandle<()>,
) {
    while !stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(50)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => continue,
        };
        dispatch(request, &shared);
    }
    // Stop accepting: answer what tiny_http already parsed, then close the listener.
    while let Ok(Some(request)) = server.try_recv() {
        let _ = respond_error(request, 503, &shutting_down(), &[]);
    }
    drop(server);
    // Let the scheduler drain the queue, then wait for every handler to write its response.
    {
        let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.closing = true;
    }
    shared.wake.notify_all();
    let deadline = Instant::now() + shared.config.shutdown_timeout;
    let (lock, cvar) = &shared.idle;
    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    while shared.in_flight.load(Ordering::SeqCst) > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        guard = cvar
            .wait_timeout(guard, (deadline - now).min(Duration::from_millis(50)))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(guard);
    if shared.in_flight.load(Ordering::SeqCst) == 0 {
        let _ = scheduler.join();
    }
}

fn shutting_down() -> ErrorResponse {
    ErrorResponse::new("the server is shutting down", "server_error").with_code("shutting_down")
}

fn dispatch(request: tiny_http::Request, shared: &Arc<Shared>) {
    if shared.in_flight.load(Ordering::SeqCst) >= shared.config.max_connections {
        let err = ErrorResponse::new("too many requests in flight; retry later", "server_error")
            .with_code("server_overloaded");
        let _ = respond_error(request, 503, &err, &[("Retry-After", "1")]);
        return;
    }
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("safetune-serve-request".into())
        .spawn(move || {
            let _guard = InFlight(&s);
            handle(request, &s);
        });
    if spawned.is_err() {
        // The request was moved into the closure that failed to start; nothing more to do.
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.1.notify_all();
    }
}

/// An HTTP error with OpenAI's error body.
struct HttpError {
    status: u16,
    body: ErrorResponse,
    headers: Vec<(&'static str, &'static str)>,
}

impl HttpError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut body = ErrorResponse::new(message, "invalid_request_error");
        if let Some(p) = param {
            body = body.with_param(p);
        }
        HttpError {
            status: 400,
            body,
            headers: Vec::new(),
        }
    }
    fn from_backend(e: BackendError) -> Self {
        match e {
            BackendError::Invalid(m) => HttpError::invalid(m, None),
            BackendError::Unavailable(m) => HttpError {
                status: 503,
                body: ErrorResponse::new(m, "server_error").with_code("backend_unavailable"),
                headers: vec![("Retry-After", "1")],
            },
            BackendError::Other(m) => HttpError {
                status: 500,
                body: ErrorResponse::new(m, "server_error"),
                headers: Vec::new(),
            },
        }
    }
}

fn handle(mut request: tiny_http::Request, shared: &Shared) {
    let method = request.method().clone();
    let url = request.url().to_string();
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();

    // Read the body before answering (so keep-alive connections stay in sync).
    let mut body = Vec::new();
    let limit = shared.config.max_body_bytes;
    if let Some(len) = request.body_length() {
        if len > limit {
            let err = ErrorResponse::new(
                format!("request body of {len} bytes is over the limit of {limit}"),
                "invalid_request_error",
            );
            let _ = respond_error(request, 413, &err, &[("Connection", "close")]);
            return;
        }
    }
    if request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .is_err()
    {
        let err = ErrorResponse::new("cannot read the request body", "invalid_request_error");
        let _ = respond_error(request, 400, &err, &[]);
        return;
    }
    if body.len() > limit {
        let err = ErrorResponse::new(
            format!("request body is over the limit of {limit} bytes"),
            "invalid_request_error",
        );
        let _ = respond_error(request, 413, &err, &[("Connection", "close")]);
        return;
    }

    let result = match (path.as_str(), &method) {
        ("/health", Method::Get) => {
            let _ = respond_json(request, 200, &serde_json::json!({"status": "ok"}));
            return;
        }
        ("/v1/models", Method::Get) => {
            let list = ModelList {
                object: "list".into(),
                data: vec![model_object(shared)],
            };
            let _ = respond_json(request, 200, &list);
            return;
        }
        (p, Method::Get) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if id == shared.model_name {
                let _ = respond_json(request, 200, &model_object(shared));
            } else {
                let err = ErrorResponse::new(
                    format!("The model `{id}` does not exist"),
                    "invalid_request_error",
                )
                .with_param("model")
                .with_code("model_not_found");
                let _ = respond_error(request, 404, &err, &[]);
            }
            return;
        }
        ("/v1/chat/completions", Method::Post) => chat_completions(request, &body, shared),
        ("/v1/completions", Method::Post) => completions(request, &body, shared),
        ("/v1/models" | "/v1/chat/completions" | "/v1/completions" | "/health", _) => {
            let err = ErrorResponse::new(
                format!("method {method} is not allowed on {path}"),
                "invalid_request_error",
            )
            .with_code("method_not_allowed");
            let _ = respond_error(request, 405, &err, &[]);
            return;
        }
        _ => {
            let err = ErrorResponse::new(
                format!("Unknown request URL: {method} {url}. This server serves /v1/chat/completions, /v1/completions and /v1/models."),
                "invalid_request_error",
            )
            .with_code("unknown_url");
            let _ = respond_error(request, 404, &err, &[]);
            return;
        }
    };
    if let Err((request, e)) = result {
        let _ = respond_error(request, e.status, &e.body, &e.headers);
    }
}

fn model_object(shared: &Shared) -> ModelObject {
    ModelObject {
        id: shared.model_name.clone(),
        object: "model".into(),
        created: shared.created,
        owned_by: "safetune".into(),
    }
}

type Handled = Result<(), (tiny_http::Request, HttpError)>;

/// Settings common to both endpoints, validated.
struct Common {
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<u32>,
    seed: Option<u64>,
    stop: Option<StopSeq>,
}

fn sampling(c: Common, default_max: usize, shared: &Shared) -> Result<(Sampling, u32), HttpError> {
    let cfg = &shared.config;
    let max_new_tokens = match c.max_tokens {
        None => default_max,
        Some(0) => {
            return Err(HttpError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(m) if m > cfg.max_tokens_limit as u64 => {
            return Err(HttpError::invalid(
                format!(
                    "max_tokens is {m}, over this server's limit of {}",
                    cfg.max_tokens_limit
                ),
                Some("max_tokens"),
            ))
        }
        Some(m) => m as usize,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(HttpError::invalid(
            format!("temperature is {temperature}; it must be between 0 and 2"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(HttpError::invalid(
            format!("top_p is {top_p}; it must be in (0, 1]"),
            Some("top_p"),
        ));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(HttpError::invalid(
                format!("top_k is {k}; it must be -1, 0 or positive"),
                Some("top_k"),
            ))
        }
    };
    let n = c.n.unwrap_or(1);
    if n == 0 || n > cfg.max_n {
        return Err(HttpError::invalid(
            format!("n is {n}; it must be between 1 and {}", cfg.max_n),
            Some("n"),
        ));
    }
    let stop = c.stop.map(StopSeq::into_vec).unwrap_or_default();
    if stop.len() > 16 {
        return Err(HttpError::invalid(
            "at most 16 stop sequences are accepted",
            Some("stop"),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(HttpError::invalid(
            "stop sequences must not be empty",
            Some("stop"),
        ));
    }
    let seed = c.seed.unwrap_or_else(random_u64);
    Ok((
        Sampling {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
        },
        n,
    ))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    if body.is_empty() {
        return Err(HttpError::invalid(
            "the request body is empty; send a JSON object",
            None,
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::invalid(format!("invalid JSON body: {e}"), None))
}

fn to_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, HttpError> {
    if messages.is_empty() {
        return Err(HttpError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => Role::System,
            other => Role::parse(other).ok_or_else(|| {
                HttpError::invalid(
                    format!("messages[{i}].role is `{other}`; this server accepts system, developer, user and assistant"),
                    Some("messages"),
                )
            })?,
        };
        let content = match m.content {
            None => String::new(),
            Some(c) => c.to_text().map_err(|kind| {
                HttpError::invalid(
                    format!(
                        "messages[{i}].content has a `{kind}` part; only text parts are supported"
                    ),
                    Some("messages"),
                )
            })?,
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// Expands prompts × n into generation requests, seeds `seed`, `seed+1`, ... per choice.
fn expand(prompts: Vec<Prompt>, sampling: &Sampling, n: u32) -> Vec<GenRequest> {
    let mut out = Vec::with_capacity(prompts.len() * n as usize);
    for p in prompts {
        for i in 0..n {
            let mut s = sampling.clone();
            s.seed = s.seed.wrapping_add(i as u64);
            out.push(GenRequest {
                prompt: p.clone(),
                sampling: s,
            });
        }
    }
    out
}

/// Queues the job; on success returns the receiver of its events.
fn submit(
    shared: &Shared,
    requests: Vec<GenRequest>,
    stream: bool,
) -> Result<mpsc::Receiver<Event>, HttpError> {
    let (tx, rx) = mpsc::channel();
    match shared.enqueue(Job {
        requests,
        stream,
        events: tx,
    }) {
        Ok(()) => Ok(rx),
        Err(EnqueueError::Full) => Err(HttpError {
            status: 429,
            body: ErrorResponse::new(
                format!(
                    "the server's queue is full ({} requests waiting); retry later",
                    shared.config.max_queue
                ),
                "rate_limit_error",
            )
            .with_code("queue_full"),
            headers: vec![("Retry-After", "1")],
        }),
        Err(EnqueueError::Closing) => Err(HttpError {
            status: 503,
            body: shutting_down(),
            headers: Vec::new(),
        }),
    }
}

fn wait_done(rx: &mpsc::Receiver<Event>) -> Result<Vec<GenOutput>, HttpError> {
    loop {
        match rx.recv() {
            Ok(Event::Piece(..)) => continue,
            Ok(Event::Done(r)) => return r.map_err(HttpError::from_backend),
            Err(_) => {
                return Err(HttpError {
                    status: 500,
                    body: ErrorResponse::new(
                        "the scheduler stopped before answering",
                        "server_error",
                    ),
                    headers: Vec::new(),
                })
            }
        }
    }
}

/// Relays generator events to an SSE stream, for chat and plain completions alike: one event per
/// decoded piece, one finishing event per choice, an optional usage event, and an error event if
/// generation fails or the scheduler goes away.
fn relay_stream<T: serde::Serialize>(
    out: &mut SseWriter,
    rx: &mpsc::Receiver<Event>,
    n: u32,
    include_usage: bool,
    piece: impl Fn(usize, String) -> T,
    finished: impl Fn(usize, &GenOutput) -> T,
    usage_event: impl Fn(Usage) -> T,
) {
    loop {
        match rx.recv() {
            Ok(Event::Piece(i, text)) => out.event(&piece(i, text)),
            Ok(Event::Done(Ok(outs))) => {
                for (i, o) in outs.iter().enumerate() {
                    out.event(&finished(i, o));
                }
                if include_usage {
                    out.event(&usage_event(usage(&outs, n)));
                }
                return;
            }
            Ok(Event::Done(Err(e))) => {
                out.event(&HttpError::from_backend(e).body);
                return;
            }
            Err(_) => {
                out.event(&ErrorResponse::new(
                    "the scheduler stopped before answering",
                    "server_error",
                ));
                return;
            }
        }
    }
}

fn usage(outs: &[GenOutput], n: u32) -> Usage {
    // The prompt of each group of `n` choices counts once, as in OpenAI's API.
    let prompt: usize = outs
        .iter()
        .step_by(n.max(1) as usize)
        .map(|o| o.prompt_tokens)
        .sum();
    let completion: usize = outs.iter().map(|o| o.completion_tokens).sum();
    Usage {
        prompt_tokens: prompt as u64,
        completion_tokens: completion as u64,
        total_tokens: (prompt + completion) as u64,
    }
}

fn chat_completions(request: tiny_http::Request, body: &[u8], shared: &Shared) -> Handled {
    let parsed = (|| {
        let req: ChatCompletionRequest = parse_body(body)?;
        let messages = to_messages(req.messages)?;
        let common = Common {
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            seed: req.seed,
            stop: req.stop,
        };
        let (s, n) = sampling(common, shared.config.default_max_tokens, shared)?;
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        Ok((
            expand(vec![Prompt::Chat(messages)], &s, n),
            n,
            req.stream,
            include_usage,
        ))
    })();
    let (requests, n, stream, include_usage) = match parsed {
        Ok(v) => v,
        Err(e) => return Err((request, e)),
    };
    let count = requests.len();
    let rx = match submit(shared, requests, stream) {
        Ok(rx) => rx,
        Err(e) => return Err((request, e)),
    };
    let id = shared.new_id("chatcmpl");
    let created = unix_now();
    let model = shared.model_name.clone();
    if stream {
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let mut out = match SseWriter::start(request) {
            Some(w) => w,
            None => return Ok(()),
        };
        for i in 0..count {
            let first = ChunkChoice {
                index: i as u32,
                delta: Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                finish_reason: None,
            };
            out.event(&chunk(vec![first], None));
        }
        relay_stream(
            &mut out,
            &rx,
            n,
            include_usage,
            |i, piece| {
                let delta = Delta {
                    role: None,
                    content: Some(piece),
                };
                chunk(
                    vec![ChunkChoice {
                        index: i as u32,
                        delta,
                        finish_reason: None,
                    }],
                    None,
                )
            },
            |i, o| {
                let finish_reason = Some(o.finish_reason.as_str().into());
                chunk(
                    vec![ChunkChoice {
                        index: i as u32,
                        delta: Delta::default(),
                        finish_reason,
                    }],
                    None,
                )
            },
            |u| chunk(Vec::new(), Some(u)),
        );
        out.finish();
        return Ok(());
    }
    let outs = match wait_done(&rx) {
        Ok(o) => o,
        Err(e) => return Err((request, e)),
    };
    let resp = ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        usage: Some(usage(&outs, n)),
        choices: outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| ChatChoice {
                index: i as u32,
                message: ResponseMessage {
                    role: "assistant".into(),
                    content: Some(o.text),
                },
                finish_reason: Some(o.finish_reason.as_str().into()),
                logprobs: None,
            })
            .collect(),
    };
    let _ = respond_json(request, 200, &resp);
    Ok(())
}

fn completions(request: tiny_http::Request, body: &[u8], shared: &Shared) -> Handled {
    let parsed = (|| {
        let req: CompletionRequest = parse_body(body)?;
        if req.echo {
            return Err(HttpError::invalid("echo is not supported", Some("echo")));
        }
        let prompts = match req.prompt {
            PromptInput::One(p) => vec![p],
            PromptInput::Many(v) if v.is_empty() => {
                return Err(HttpError::invalid(
                    "prompt must not be an empty list",
                    Some("prompt"),
                ))
            }
            PromptInput::Many(v) => v,
        };
        let common = Common {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            seed: req.seed,
            stop: req.stop,
        };
        let (s, n) = sampling(common, 16, shared)?;
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        let prompts = prompts.into_iter().map(Prompt::Text).collect();
        Ok((expand(prompts, &s, n), n, req.stream, include_usage))
    })();
    let (requests, n, stream, include_usage) = match parsed {
        Ok(v) => v,
        Err(e) => return Err((request, e)),
    };
    let rx = match submit(shared, requests, stream) {
        Ok(rx) => rx,
        Err(e) => return Err((request, e)),
    };
    let id = shared.new_id("cmpl");
    let created = unix_now();
    let model = shared.model_name.clone();
    let response = |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: model.clone(),
        choices,
        usage,
    };
    if stream {
        let mut out = match SseWriter::start(request) {
            Some(w) => w,
            None => return Ok(()),
        };
        relay_stream(
            &mut out,
            &rx,
            n,
            include_usage,
            |i, text| {
                response(
                    vec![CompletionChoice {
                        index: i as u32,
                        text,
                        finish_reason: None,
                        logprobs: None,
                    }],
                    None,
                )
            },
            |i, o| {
                let finish_reason = Some(o.finish_reason.as_str().into());
                response(
                    vec![CompletionChoice {
                        index: i as u32,
                        text: String::new(),
                        finish_reason,
                        logprobs: None,
                    }],
                    None,
                )
            },
            |u| response(Vec::new(), Some(u)),
        );
        out.finish();
        return Ok(());
    }
    let outs = match wait_done(&rx) {
        Ok(o) => o,
        Err(e) => return Err((request, e)),
    };
    let u = usage(&outs, n);
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| CompletionChoice {
            index: i as u32,
            text: o.text,
            finish_reason: Some(o.finish_reason.as_str().into()),
            logprobs: None,
        })
        .collect();
    let _ = respond_json(request, 200, &response(choices, Some(u)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing responses

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn respond_json<T: serde::Serialize>(
    request: tiny_http::Request,
    status: u16,
    value: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let response = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"));
    request.respond(response)
}

fn respond_error(
    request: tiny_http::Request,
    status: u16,
    err: &ErrorResponse,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = serde_json::to_vec(err).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"));
    for (k, v) in headers {
        response.add_header(header(k, v));
    }
    request.respond(response)
}

/// Writes a `text/event-stream` response event by event, flushing each one, in HTTP/1.1 chunked
/// encoding (tiny_http's own chunked writer buffers, which would hold events back).
struct SseWriter {
    out: Box<dyn Write + Send>,
    chunked: bool,
    broken: bool,
}

impl SseWriter {
    fn start(request: tiny_http::Request) -> Option<SseWriter> {
        let http11 = *request.http_version() >= tiny_http::HTTPVersion(1, 1);
        let mut out = request.into_writer();
        let head = if http11 {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        };
        if out
            .write_all(head.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return None;
        }
        Some(SseWriter {
            out,
            chunked: http11,
            broken: false,
        })
    }

    fn raw(&mut self, data: &str) {
        if self.broken {
            return;
        }
        let r = if self.chunked {
            write!(self.out, "{:x}\r\n{data}\r\n", data.len())
        } else {
            self.out.write_all(data.as_bytes())
        };
        // A client that went away is not an error of ours: stop writing, let generation finish.
        if r.and_then(|_| self.out.flush()).is_err() {
            self.broken = true;
        }
    }

    fn event<T: serde::Serialize>(&mut self, value: &T) {
        self.raw(&sse_event(value));
    }

    fn finish(mut self) {
        self.raw(SSE_DONE);
        if self.chunked && !self.broken {
            let _ = self
                .out
                .write_all(b"0\r\n\r\n")
                .and_then(|_| self.out.flush());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
