//! An OpenAI-compatible HTTP server over any [`Generator`].
//!
//! Threads: one accept loop on std's `TcpListener` (it survives accept errors such as running
//! out of file descriptors, backing off, and stops the server with an error only when accepting
//! keeps failing for `accept_failure_limit`), one thread per open connection (at most
//! [`ServeConfig::max_connections`], and [`ServeConfig::max_connections_per_ip`] from one
//! address; more are answered 503), each reading its requests under read and write deadlines
//! (see `http`), and one scheduler thread that waits up to `batch_wait_ms` for queued jobs to
//! gather, then lets the generator take their generation requests one at a time, round-robin
//! over the jobs, at most `max_batch` at once (`Generator::generate_fed`: the local engine
//! batches continuously, so a request queued while others decode joins them at the next step;
//! see `scheduler`). The job queue is
//! bounded: when it holds `max_queue` jobs or `max_queued_requests` generation requests, new ones
//! get `429` with OpenAI's error JSON and a `Retry-After` header. A request over the
//! per-request limits (prompts, prompts x `n`, prompt tokens, stop-string length) is refused with
//! 400 before it is queued; a job whose client disconnects is dropped before its next part.
//!
//! What a request must pass first ([`guard`]): a `Host` header on the allow-list, the API key
//! when one is set (`Authorization: Bearer KEY`, for every `/v1` route), and
//! `Content-Type: application/json` on posts.
//!
//! Shutdown ([`ServerHandle::shutdown`], or SIGINT/SIGTERM through [`ServerHandle::wait_for_signal`]):
//! stop accepting, answer requests that arrive on open connections with 503, let the scheduler
//! finish every queued job, wait for in-flight responses to be written, then return.
//!
//! Request defaults follow OpenAI's API: `temperature` 1.0, `top_p` 1.0, `n` 1, a random seed
//! when none is given, `max_tokens` from [`ServeConfig::default_max_tokens`] (chat) or 16
//! (completions). The request's `model` picks a served LoRA adapter ([`lora`]) when it names one;
//! a server without adapters serves one model, does not check `model`, and answers name it; once
//! it serves adapters, a name that is neither the base's nor an adapter's is 404. A request the model rejects (`BackendError::Invalid`) is retried alone, so it does not
//! fail the requests it was batched with.
//!
//! Layout: this file holds the public API and the lifecycle (bind, the accept loop, shutdown);
//! `http` reads requests and writes answers on a connection; `guard` holds the head checks, public
//! for other servers; `routes` admits requests (every check a request passes before it is routed), routes them and
//! writes OpenAI-shaped errors; `scheduler` owns the job queue and batching; `handlers` is the
//! generation flow both endpoints share, with what differs in `chat` and `completions`; `sse`
//! writes streamed answers.

// Errors here become HTTP answers once per request; their size does not matter.
#![allow(clippy::result_large_err)]

mod chat;
mod completions;
pub mod guard;
mod handlers;
pub mod http;
pub mod lora;
mod routes;
mod scheduler;
mod sse;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use safetune_model::backend::Generator;

use crate::random_u64;
use guard::{ApiKey, HostAllowList};
pub use lora::{LoraLoadError, LoraLoader, Loras};
use scheduler::Queue;

/// The default of [`ServeConfig::max_prompt_tokens`], lowered to the model's context.
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 2048;

/// Settings of [`start`] and [`serve`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind; `127.0.0.1` keeps the server local.
    pub host: String,
    /// Port to bind; `0` picks a free one (see [`ServerHandle::addr`]).
    pub port: u16,
    /// Most jobs (HTTP generation requests) waiting for the model; more are answered with 429.
    pub max_queue: usize,
    /// Most generation requests (prompts x `n`, over all queued jobs) waiting for the model; a
    /// job that would pass it is answered with 429 (a job alone in the queue always fits).
    pub max_queued_requests: usize,
    /// Most prompts in one `/v1/completions` request (400 above).
    pub max_prompts: usize,
    /// Most choices (prompts x `n`) in one request (400 above).
    pub max_choices: usize,
    /// Most tokens in one prompt (400 `context_length_exceeded` above); `None` uses
    /// [`DEFAULT_MAX_PROMPT_TOKENS`]. Lowered to the model's context less one token when the
    /// generator knows it; checked only where the generator can count tokens (a local model).
    pub max_prompt_tokens: Option<usize>,
    /// Longest stop sequence accepted, in characters.
    pub max_stop_chars: usize,
    /// Most generation requests decoded at once; `None` uses `generator.max_batch()`.
    pub max_batch: Option<usize>,
    /// How long the scheduler waits for more requests to gather before it starts the generator
    /// (once running, the local engine takes new requests at its next step).
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
    /// Most connections open at once (idle keep-alive ones included); more are answered with
    /// 503.
    pub max_connections: usize,
    /// Most connections open at once from one peer address; more are answered with 503.
    pub max_connections_per_ip: usize,
    /// Most requests on one keep-alive connection; the answer to the last closes it.
    pub max_requests_per_connection: usize,
    /// Time for a whole request (head and body) to arrive; 408 and close when it runs out.
    pub read_timeout: Duration,
    /// Time for each write of an answer; the connection is dropped when it runs out.
    pub write_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long accepting may keep failing (with no connection accepted) before the server
    /// stops with [`ServeError::Accept`].
    pub accept_failure_limit: Duration,
    /// The key clients must send as `Authorization: Bearer KEY` on `/v1` routes; `None` lets
    /// anyone in. [`start`] refuses a non-loopback `host` without one.
    pub api_key: Option<ApiKey>,
    /// Names the `Host` header may carry besides the defaults of
    /// [`HostAllowList::for_bind`]; `*` allows any.
    pub allowed_hosts: Vec<String>,
    /// How long a shutdown waits for in-flight requests before giving up on them.
    pub shutdown_timeout: Duration,
    /// The model name reported by `/v1/models` and in responses; `None` uses
    /// `generator.model_id()`.
    pub model_name: Option<String>,
    /// Serve `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (see [`lora`]); needs
    /// an API key and a [`LoraLoader`] ([`start_with_loras`]). Off by default: both routes are
    /// then unknown (404).
    pub allow_runtime_lora: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".to_string(),
            port: 8000,
            max_queue: 64,
            max_queued_requests: 1024,
            max_prompts: 64,
            max_choices: 128,
            max_prompt_tokens: None,
            max_stop_chars: 256,
            max_batch: None,
            batch_wait_ms: 5,
            default_max_tokens: 256,
            max_tokens_limit: 32_768,
            max_n: 16,
            max_body_bytes: 8 << 20,
            max_connections: 256,
            max_connections_per_ip: 64,
            max_requests_per_connection: 1000,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5),
            accept_failure_limit: Duration::from_secs(60),
            api_key: None,
            allowed_hosts: Vec::new(),
            shutdown_timeout: Duration::from_secs(60),
            model_name: None,
            allow_runtime_lora: false,
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
    #[error("the server stopped: accepting connections kept failing: {0}")]
    Accept(String),
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Jobs waiting in the queue now.
    pub queued: usize,
    /// Connections open now (each serving a request or waiting for its next one).
    pub in_flight: usize,
    /// Generator runs started so far (a run takes requests until none waits and none decodes).
    pub batches: u64,
    /// Requests answered 429 because the queue was full.
    pub rejected_queue_full: u64,
    /// Generation requests dropped before they ran, or stopped while they were decoding, because
    /// their client went away.
    pub cancelled: u64,
    /// Accept errors survived so far.
    pub accept_errors: u64,
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
        let queued = self.shared.queued();
        ServerStats {
            queued,
            in_flight: self.shared.in_flight.load(Ordering::SeqCst),
            batches: self.shared.batches.load(Ordering::SeqCst),
            rejected_queue_full: self.shared.rejected.load(Ordering::SeqCst),
            cancelled: self.shared.cancelled.load(Ordering::SeqCst),
            accept_errors: self.shared.accept_errors.load(Ordering::SeqCst),
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
            Some(h) => h.join().map_err(|_| ServeError::Panicked)?,
            None => return Ok(()),
        }
        let failed = self
            .shared
            .accept_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match failed {
            Some(reason) => Err(ServeError::Accept(reason)),
            None => Ok(()),
        }
    }
}

/// Starts a server on a background thread and returns at once. Refuses a `host` that is not
/// loopback when no API key is set.
pub fn start(
    generator: Arc<dyn Generator>,
    config: ServeConfig,
) -> Result<ServerHandle, ServeError> {
    start_listening(generator, None, config)
}

/// Checks the config, binds its address (non-blocking) and starts serving, with or without
/// adapters.
fn start_listening(
    generator: Arc<dyn Generator>,
    loras: Option<Loras>,
    config: ServeConfig,
) -> Result<ServerHandle, ServeError> {
    check_config(&config)?;
    let listener = bind(&config)?;
    let addr = listener.local_addr().map_err(|e| ServeError::Bind {
        addr: config.host.clone(),
        reason: e.to_string(),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ServeError::Bind {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    start_on(TcpAcceptor(listener), addr, generator, loras, config)
}

/// [`start`] with LoRA adapters: the ones of `loras.modules` are loaded first (a failure is
/// [`ServeError::Config`] naming the adapter and its file), and with
/// [`ServeConfig::allow_runtime_lora`] more can be loaded and unloaded while the server runs.
/// A request whose `model` names an adapter is answered by the base with that adapter; once
/// the server serves adapters, a `model` that names neither the base nor an adapter is 404
/// (`model_not_found`), so a misspelt adapter never gets the base's answers.
pub fn start_with_loras(
    generator: Arc<dyn Generator>,
    loras: Loras,
    config: ServeConfig,
) -> Result<ServerHandle, ServeError> {
    start_listening(generator, Some(loras), config)
}

fn check_config(config: &ServeConfig) -> Result<(), ServeError> {
    let at_least_one = [
        ("max_queue", config.max_queue),
        ("max_queued_requests", config.max_queued_requests),
        ("max_prompts", config.max_prompts),
        ("max_choices", config.max_choices),
        ("max_connections", config.max_connections),
        ("max_connections_per_ip", config.max_connections_per_ip),
        (
            "max_requests_per_connection",
            config.max_requests_per_connection,
        ),
        ("max_batch", config.max_batch.unwrap_or(1)),
        ("max_prompt_tokens", config.max_prompt_tokens.unwrap_or(1)),
    ];
    if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
        return Err(ServeError::Config(format!("{name} must be at least 1")));
    }
    for (name, d) in [
        ("read_timeout", config.read_timeout),
        ("write_timeout", config.write_timeout),
        ("idle_timeout", config.idle_timeout),
    ] {
        if d.is_zero() {
            return Err(ServeError::Config(format!("{name} must be more than zero")));
        }
    }
    if config.allow_runtime_lora && config.api_key.is_none() {
        return Err(ServeError::Config(
            "loading adapters at run time (--allow-runtime-lora) needs an API key: pass --api-key or set SAFETUNE_API_KEY".into(),
        ));
    }
    if config.api_key.is_none() && !guard::is_loopback_host(&config.host) {
        return Err(ServeError::Config(format!(
            "listening on {} (not a loopback address) needs an API key: pass --api-key or set SAFETUNE_API_KEY",
            config.host
        )));
    }
    Ok(())
}

/// Where the accept loop gets connections: a listener, or in tests one that fails on purpose.
trait Acceptor: Send + 'static {
    /// A connection, `Ok(None)` when none is waiting (the listener is non-blocking).
    fn accept(&self) -> std::io::Result<Option<(TcpStream, SocketAddr)>>;
}

struct TcpAcceptor(TcpListener);

impl Acceptor for TcpAcceptor {
    fn accept(&self) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
        match self.0.accept() {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn start_on(
    acceptor: impl Acceptor,
    addr: SocketAddr,
    generator: Arc<dyn Generator>,
    loras: Option<Loras>,
    config: ServeConfig,
) -> Result<ServerHandle, ServeError> {
    check_config(&config)?;
    if config.allow_runtime_lora && loras.is_none() {
        return Err(ServeError::Config(
            "loading adapters at run time needs a model that can take them (a local model)".into(),
        ));
    }
    let mut shared = Shared::new(config, generator.clone());
    shared.adapters =
        lora::Adapters::start(loras, &shared.model_name).map_err(ServeError::Config)?;
    let shared = Arc::new(shared);
    let stop = Arc::new(AtomicBool::new(false));

    let sched_shared = shared.clone();
    let scheduler = std::thread::Builder::new()
        .name("safetune-serve-scheduler".into())
        .spawn(move || scheduler::run(&sched_shared, generator))
        .map_err(|e| ServeError::Config(format!("cannot start the scheduler thread: {e}")))?;

    let accept_shared = shared.clone();
    let accept_stop = stop.clone();
    let accept = std::thread::Builder::new()
        .name("safetune-serve-accept".into())
        .spawn(move || accept_loop(acceptor, accept_shared, accept_stop, scheduler))
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

/// Listens on `config.host`:`config.port` (IPv6 hosts bracketed).
fn bind(config: &ServeConfig) -> Result<TcpListener, ServeError> {
    let bind = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    TcpListener::bind(bind.as_str()).map_err(|e| ServeError::Bind {
        addr: bind.clone(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// State shared by the accept loop, the request handlers and the scheduler

struct Shared {
    config: ServeConfig,
    generator: Arc<dyn Generator>,
    hosts: HostAllowList,
    /// The prompt-token limit in force (config and model context), if any.
    prompt_token_limit: Option<usize>,
    model_name: String,
    /// The adapters served beside the base (none unless started with [`start_with_loras`]).
    adapters: lora::Adapters,
    max_batch: usize,
    /// Set once the server is stopping: open connections answer their next request with 503.
    stopping: AtomicBool,
    /// Open connections per peer address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Threads answering 503 to connections over the caps.
    refusing: AtomicUsize,
    cancelled: AtomicU64,
    accept_errors: AtomicU64,
    /// Why the accept loop gave up, if it did.
    accept_failure: Mutex<Option<String>>,
    /// When a connection was last turned away for the caps (milliseconds since `started`);
    /// `u64::MAX` when never.
    last_refusal_ms: AtomicU64,
    started: Instant,
    created: u64,
    queue: Mutex<Queue>,
    wake: Condvar,
    in_flight: AtomicUsize,
    idle: (Mutex<()>, Condvar),
    batches: AtomicU64,
    rejected: AtomicU64,
    next_id: AtomicU64,
}

impl Shared {
    fn new(config: ServeConfig, generator: Arc<dyn Generator>) -> Shared {
        let max_batch = config
            .max_batch
            .unwrap_or_else(|| generator.max_batch())
            .max(1);
        let model_name = config
            .model_name
            .clone()
            .unwrap_or_else(|| generator.model_id().to_string());
        let mut limit = config
            .max_prompt_tokens
            .unwrap_or(DEFAULT_MAX_PROMPT_TOKENS);
        if let Some(ctx) = generator.context_length() {
            limit = limit.min(ctx.saturating_sub(1).max(1));
        }
        Shared {
            hosts: HostAllowList::for_bind(&config.host, &config.allowed_hosts),
            prompt_token_limit: Some(limit),
            generator,
            stopping: AtomicBool::new(false),
            per_ip: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
            cancelled: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            accept_failure: Mutex::new(None),
            last_refusal_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            config,
            model_name,
            adapters: lora::Adapters::default(),
            max_batch,
            created: unix_now(),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
            batches: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// Records that a connection was turned away for the caps.
    fn note_refusal(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_refusal_ms.store(now, Ordering::SeqCst);
    }

    /// True when a connection was turned away in the last second: answers then close their
    /// keep-alive connections, so waiting clients get a turn.
    fn refused_recently(&self) -> bool {
        let last = self.last_refusal_ms.load(Ordering::SeqCst);
        let now = self.started.elapsed().as_millis() as u64;
        last != u64::MAX && now.saturating_sub(last) < 1000
    }

    /// A fresh response id, `PREFIX-<random><counter>`.
    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{n:04x}", random_u64() & 0xffff_ffff)
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting and shutting down

fn accept_loop(
    acceptor: impl Acceptor,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    scheduler: JoinHandle<()>,
) {
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(10);
    while !stop.load(Ordering::SeqCst) {
        match acceptor.accept() {
            Ok(Some((stream, peer))) => {
                failing_since = None;
                backoff = Duration::from_millis(10);
                routes::dispatch(stream, peer, &shared);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) if transient_accept_error(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory, or worse: back off (open connections finish
                // and free what they hold), and give up only when it lasts.
                shared.accept_errors.fetch_add(1, Ordering::SeqCst);
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= shared.config.accept_failure_limit {
                    let reason =
                        format!("{e} (failing for {:.0} s)", since.elapsed().as_secs_f64());
                    eprintln!("safetune serve: {reason}; stopping");
                    *shared
                        .accept_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(reason);
                    break;
                }
                if backoff == Duration::from_millis(10) {
                    eprintln!("safetune serve: cannot accept a connection: {e}; retrying");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
    // Stop accepting: close the listener; open connections answer their next request with 503.
    drop(acceptor);
    shared.stopping.store(true, Ordering::SeqCst);
    // Let the scheduler drain the queue, then wait for every handler to write its response.
    shared.close_queue();
    if wait_idle(&shared) {
        let _ = scheduler.join();
    }
}

/// Errors that concern one connection only (it was reset before we took it, a signal came).
fn transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Waits until no request is in flight or `shutdown_timeout` has passed; true when none is left.
fn wait_idle(shared: &Shared) -> bool {
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
    shared.in_flight.load(Ordering::SeqCst) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetune_model::backend::{BackendError, GenOutput, GenRequest, TokenSink};
    use std::io::{Read, Write};

    struct Nothing;

    impl Generator for Nothing {
        fn model_id(&self) -> &str {
            "nothing"
        }
        fn generate_streaming(
            &self,
            _: &[GenRequest],
            _: TokenSink<'_>,
        ) -> Result<Vec<GenOutput>, BackendError> {
            Err(BackendError::Other("unused".into()))
        }
    }

    /// A listener that fails with "too many open files" for its first `fail` calls (all of
    /// them when `fail` is `usize::MAX`), then accepts from a real one.
    struct Flaky {
        inner: TcpListener,
        fail: usize,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Acceptor for Flaky {
        fn accept(&self) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
            }
            TcpAcceptor(self.inner.try_clone()?).accept()
        }
    }

    fn flaky(fail: usize) -> (Flaky, SocketAddr) {
        let inner = TcpListener::bind("127.0.0.1:0").unwrap();
        inner.set_nonblocking(true).unwrap();
        let addr = inner.local_addr().unwrap();
        let f = Flaky {
            inner,
            fail,
            calls: std::sync::atomic::AtomicUsize::new(0),
        };
        (f, addr)
    }

    fn health(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn the_accept_loop_rides_out_running_out_of_file_descriptors() {
        let (acceptor, addr) = flaky(5);
        let cfg = ServeConfig {
            port: 0,
            ..Default::default()
        };
        let h = start_on(acceptor, addr, Arc::new(Nothing), None, cfg).unwrap();
        let answer = health(addr);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(h.stats().accept_errors, 5);
        h.shutdown().unwrap();
    }

    #[test]
    fn an_accept_loop_that_keeps_failing_stops_the_server_with_an_error() {
        let (acceptor, addr) = flaky(usize::MAX);
        let cfg = ServeConfig {
            port: 0,
            accept_failure_limit: Duration::from_millis(300),
            ..Default::default()
        };
        let h = start_on(acceptor, addr, Arc::new(Nothing), None, cfg).unwrap();
        let t0 = Instant::now();
        let e = h.wait().unwrap_err();
        assert!(matches!(e, ServeError::Accept(_)), "{e}");
        assert!(
            e.to_string().contains("accepting connections kept failing"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
