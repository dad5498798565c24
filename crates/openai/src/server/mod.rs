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
//!
//! Layout: this file holds the public API and the lifecycle (bind, the accept loop, shutdown);
//! `routes` admits requests (every check a request passes before it is routed), routes them and
//! writes OpenAI-shaped errors; `scheduler` owns the job queue and batching; `handlers` is the
//! generation flow both endpoints share, with what differs in `chat` and `completions`; `sse`
//! writes streamed answers.

// Errors here become HTTP answers once per request; their size does not matter.
#![allow(clippy::result_large_err)]

mod chat;
mod completions;
mod handlers;
mod routes;
mod scheduler;
mod sse;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use safetune_model::backend::Generator;

use crate::random_u64;
use scheduler::Queue;

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
        let queued = self.shared.queued();
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
    let (server, addr) = bind(&config)?;
    let shared = Arc::new(Shared::new(config, generator.as_ref()));
    let stop = Arc::new(AtomicBool::new(false));

    let sched_shared = shared.clone();
    let scheduler = std::thread::Builder::new()
        .name("safetune-serve-scheduler".into())
        .spawn(move || scheduler::run(&sched_shared, generator.as_ref()))
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

/// Listens on `config.host`:`config.port` (IPv6 hosts bracketed) and returns the bound address.
fn bind(config: &ServeConfig) -> Result<(tiny_http::Server, SocketAddr), ServeError> {
    let bind = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    let server = tiny_http::Server::http(bind.as_str()).map_err(|e| ServeError::Bind {
        addr: bind.clone(),
        reason: e.to_string(),
    })?;
    match server.server_addr().to_ip() {
        Some(addr) => Ok((server, addr)),
        None => Err(ServeError::Bind {
            addr: bind,
            reason: "not an IP address".into(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// State shared by the accept loop, the request handlers and the scheduler

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

impl Shared {
    fn new(config: ServeConfig, generator: &dyn Generator) -> Shared {
        let max_batch = config
            .max_batch
            .unwrap_or_else(|| generator.max_batch())
            .max(1);
        let model_name = config
            .model_name
            .clone()
            .unwrap_or_else(|| generator.model_id().to_string());
        Shared {
            config,
            model_name,
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

    /// A fresh response id, `PREFIX-<random><counter>`.
    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{n:04x}", random_u64() & 0xffff_ffff)
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting and shutting down

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
        routes::dispatch(request, &shared);
    }
    // Stop accepting: answer what tiny_http already parsed, then close the listener.
    while let Ok(Some(request)) = server.try_recv() {
        routes::refuse_shutting_down(request);
    }
    drop(server);
    // Let the scheduler drain the queue, then wait for every handler to write its response.
    shared.close_queue();
    if wait_idle(&shared) {
        let _ = scheduler.join();
    }
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
