//! `safetune view DIR`: a local web view of a study directory's store.
//!
//! Pages (server-rendered HTML, a little inline JavaScript, no external resource):
//! - `/` Overview: steps by status, every step's progress (rows done of total, elapsed, time
//!   left), failed steps with their error; reloads itself every 5 seconds;
//! - `/results`: the report (`report::render_html`, the numbers of `results.json`);
//! - `/answers`: every answer, filtered (condition, benchmark, category, a judge's verdict,
//!   judges disagree, human label, RM score range, text) and paginated; `/paired` shows one prompt's answers
//!   from every condition side by side with each judge's verdict;
//! - `/label`: a queue of answers to label one at a time with the keyboard (r, c, u, s, z for
//!   undo); the judges' verdicts show only after the label; labels go to `human_labels`.
//!
//! JSON for the pages' scripts: `GET /api/overview`, `/api/answers`, `/api/queue`,
//! `/api/accuracy`; `POST /api/label` and `/api/unlabel` (JSON bodies).
//!
//! The HTTP layer is `safetune serve`'s ([`safetune_openai::server::http`]) with its deadlines
//! and limits, and its guards ([`safetune_openai::server::guard`]): the `Host` header must name
//! this server (a DNS-rebinding page is turned away), posts must be `application/json` (a
//! cross-site form cannot post), and with an API key every request must carry it
//! (`Authorization: Bearer KEY`, or the cookie a first `?key=KEY` visit sets). A non-loopback
//! address needs a key. The store is opened read-only for every read (SQLite's WAL lets a study
//! write meanwhile); a label opens a separate read-write connection for its one transaction.

mod pages;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use safetune_openai::server::guard::{self, ApiKey, HostAllowList};
use safetune_openai::server::http::{BodyError, Conn, HeadError, Request};

use crate::labels::{open_study, LabelError};

pub use pages::{parse_query, AnswerFilter};

/// Settings of [`start`].
#[derive(Debug, Clone)]
pub struct ViewConfig {
    /// The study directory (holding `study.db`).
    pub dir: PathBuf,
    /// Address to bind; `127.0.0.1` keeps the view local.
    pub host: String,
    /// Port; `0` picks a free one.
    pub port: u16,
    /// The key every request must carry; required for a non-loopback `host`.
    pub api_key: Option<ApiKey>,
    /// Extra names the `Host` header may carry (`*`: any).
    pub allowed_hosts: Vec<String>,
    /// The labeller name the label page starts with.
    pub labeller: String,
    /// Most connections open at once; more are answered 503.
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ViewConfig {
    pub fn new(dir: impl Into<PathBuf>) -> ViewConfig {
        ViewConfig {
            dir: dir.into(),
            host: "127.0.0.1".into(),
            port: 8765,
            api_key: None,
            allowed_hosts: Vec::new(),
            labeller: crate::labels::UNNAMED_LABELLER.into(),
            max_connections: 64,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("invalid setting: {0}")]
    Config(String),
}

/// Largest request body (a label is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// The cookie a `?key=` visit sets.
const KEY_COOKIE: &str = "safetune_view_key";

/// What the connection threads share.
struct Shared {
    config: ViewConfig,
    hosts: HostAllowList,
    stop: AtomicBool,
    open: AtomicUsize,
}

/// A running view server.
pub struct ViewHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ViewHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and returns once the accept thread has ended (open connections end at
    /// their next request).
    pub fn shutdown(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    /// Blocks until the server stops (it does not stop on its own: the process is ended).
    pub fn wait(mut self) {
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Checks the study directory and the settings, binds, and serves on a background thread.
pub fn start(config: ViewConfig) -> Result<ViewHandle, ViewError> {
    // A missing store is an error now, not a page later.
    drop(open_study(&config.dir)?);
    if config.api_key.is_none() && !guard::is_loopback_host(&config.host) {
        return Err(ViewError::Config(format!(
            "listening on {} (not a loopback address) needs an API key: pass --api-key or set SAFETUNE_API_KEY",
            config.host
        )));
    }
    if config.max_connections == 0 {
        return Err(ViewError::Config(
            "max_connections must be at least 1".into(),
        ));
    }
    let bind = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    let err = |e: std::io::Error| ViewError::Bind {
        addr: bind.clone(),
        reason: e.to_string(),
    };
    let listener = TcpListener::bind(bind.as_str()).map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let shared = Arc::new(Shared {
        hosts: HostAllowList::for_bind(&config.host, &config.allowed_hosts),
        config,
        stop: AtomicBool::new(false),
        open: AtomicUsize::new(0),
    });
    let s = shared.clone();
    let accept = std::thread::Builder::new()
        .name("safetune-view-accept".into())
        .spawn(move || accept_loop(listener, s))
        .map_err(|e| ViewError::Config(format!("cannot start the accept thread: {e}")))?;
    Ok(ViewHandle {
        addr,
        shared,
        accept: Some(accept),
    })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => connection(stream, &shared),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            // Out of descriptors and the like: back off, open connections free theirs.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Counts a connection while it is open.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn connection(stream: TcpStream, shared: &Arc<Shared>) {
    let cfg = &shared.config;
    let Ok(conn) = Conn::new(stream, cfg.read_timeout, cfg.write_timeout) else {
        return;
    };
    if shared.open.fetch_add(1, Ordering::SeqCst) >= cfg.max_connections {
        shared.open.fetch_sub(1, Ordering::SeqCst);
        conn.refuse(
            503,
            b"too many connections\n",
            &[("Content-Type", "text/plain")],
        );
        return;
    }
    let slot = Slot(shared.clone());
    let _ = std::thread::Builder::new()
        .name("safetune-view-conn".into())
        .spawn(move || {
            let shared = slot.0.clone();
            serve_connection(conn, &shared);
            drop(slot);
        });
}

fn serve_connection(mut conn: Conn, shared: &Shared) {
    let cfg = &shared.config;
    for i in 0..1000 {
        let mut request = match conn.next_request(cfg.idle_timeout, i == 0, &shared.stop) {
            Ok(r) => r,
            Err(HeadError::Closed) => return,
            Err(e) => {
                let (status, text) = match e {
                    HeadError::Timeout => (408, "the request did not arrive in time".to_string()),
                    HeadError::TooLarge => (431, "the request head is too large".to_string()),
                    HeadError::Malformed(m) => (400, m),
                    HeadError::Closed => (400, String::new()),
                };
                conn.refuse(status, text.as_bytes(), &[("Content-Type", "text/plain")]);
                return;
            }
        };
        // A bug in a page answers 500 instead of dropping the connection.
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle(&mut request, shared)
        }))
        .unwrap_or_else(|_| Reply::text(500, "internal error in safetune view (please report it)"));
        reply.send(&mut request);
        if !request.keeps_alive() {
            request.finish_close();
            return;
        }
    }
}

/// An answer to send.
pub(crate) struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn html(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }
    pub(crate) fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
    pub(crate) fn text(status: u16, text: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: (text.into() + "\n").into_bytes(),
            headers: Vec::new(),
        }
    }
    /// An error: JSON for `/api/` paths, text otherwise.
    pub(crate) fn error(path: &str, status: u16, message: impl Into<String>) -> Reply {
        let message = message.into();
        if path.starts_with("/api/") {
            Reply::json(status, &serde_json::json!({ "error": message }))
        } else {
            Reply::text(status, message)
        }
    }

    fn send(self, request: &mut Request<'_>) {
        let mut headers: Vec<(&str, &str)> = vec![
            ("Content-Type", self.content_type),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            // Only the label page's own script (by its hash), inline style, requests to this
            // server: a model's text cannot load or run anything even if an escape were missed.
            ("Content-Security-Policy", csp()),
        ];
        for (k, v) in &self.headers {
            headers.push((k, v.as_str()));
        }
        request.respond(self.status, &headers, &self.body);
    }
}

/// The Content-Security-Policy of every answer: no source but the label page's script, whose
/// SHA-256 it names.
fn csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src 'unsafe-inline'; img-src data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            pages::label_script_hash()
        )
    })
}

/// The path and query of a request target.
fn split_url(url: &str) -> (&str, &str) {
    let url = url.split('#').next().unwrap_or("");
    match url.split_once('?') {
        Some((p, q)) => (p, q),
        None => (url, ""),
    }
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn handle(request: &mut Request<'_>, shared: &Shared) -> Reply {
    let url = request.url().to_string();
    let (path, query) = split_url(&url);
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    if let Err(e) = shared.hosts.check(request.header("host")) {
        return Reply::error(path, 403, e.to_string());
    }
    let params = parse_query(query);
    if let Some(key) = &shared.config.api_key {
        let by_header = key.accepts(request.header("authorization"));
        let by_cookie = cookie(request.header("cookie"), KEY_COOKIE)
            .is_some_and(|c| key.accepts(Some(&format!("Bearer {}", pages::url_decode(c)))));
        let by_query = params
            .iter()
            .find(|(k, _)| k == "key")
            .is_some_and(|(_, v)| key.accepts(Some(&format!("Bearer {v}"))));
        if by_query && request.method() == "GET" {
            // Set the cookie and drop the key from the address bar.
            let rest: Vec<String> = params
                .iter()
                .filter(|(k, _)| k != "key")
                .map(|(k, v)| format!("{}={}", pages::url_encode(k), pages::url_encode(v)))
                .collect();
            let location = if rest.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", rest.join("&"))
            };
            let value = params
                .iter()
                .find(|(k, _)| k == "key")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let mut r = Reply::text(303, "see other");
            r.headers.push(("Location", location));
            r.headers.push((
                "Set-Cookie",
                format!(
                    "{KEY_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                    pages::url_encode(&value)
                ),
            ));
            return r;
        }
        if !by_header && !by_cookie {
            return Reply::error(
                path,
                401,
                "this view needs its key: open it once as /?key=KEY, or send Authorization: Bearer KEY",
            );
        }
    }
    let method = request.method().to_string();
    let has_body = request.body_length().unwrap_or(0) > 0 || request.body_unread();
    if (method == "POST" || has_body)
        && !guard::is_json_content_type(request.header("content-type"))
    {
        let sent = request.header("content-type").unwrap_or("none").to_string();
        return Reply::error(
            path,
            415,
            format!("Content-Type is `{sent}`; this server takes application/json"),
        );
    }
    let body = match request.read_body(MAX_BODY) {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            return Reply::error(path, 413, format!("a body of {n} bytes is over {MAX_BODY}"))
        }
        Err(BodyError::Chunked) => {
            return Reply::error(path, 411, "send Content-Length (no chunked bodies)")
        }
        Err(_) => return Reply::error(path, 400, "cannot read the request body"),
    };
    let dir: &Path = &shared.config.dir;
    let ctx = pages::Ctx {
        dir,
        labeller: &shared.config.labeller,
    };
    match (method.as_str(), path) {
        ("GET", "/") => pages::overview(&ctx),
        ("GET", "/results") => pages::results(&ctx),
        ("GET", "/answers") => pages::answers(&ctx, &params),
        ("GET", "/paired") => pages::paired(&ctx, &params),
        ("GET", "/label") => pages::label(&ctx, &params),
        ("GET", "/api/overview") => pages::api_overview(&ctx),
        ("GET", "/api/answers") => pages::api_answers(&ctx, &params),
        ("GET", "/api/queue") => pages::api_queue(&ctx, &params),
        ("GET", "/api/accuracy") => pages::api_accuracy(&ctx),
        ("POST", "/api/label") => pages::api_label(&ctx, &body),
        ("POST", "/api/unlabel") => pages::api_unlabel(&ctx, &body),
        (
            _,
            "/" | "/results" | "/answers" | "/paired" | "/label" | "/api/overview" | "/api/answers"
            | "/api/queue" | "/api/accuracy" | "/api/label" | "/api/unlabel",
        ) => Reply::error(path, 405, format!("{method} is not allowed on {path}")),
        _ => Reply::error(path, 404, format!("no page {path}")),
    }
}
