//! From an accepted HTTP request to a handler: admission, routing, and every error answer in
//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Admission happens in two places, both here. [`dispatch`], on the accept thread, reserves a
//! connection slot (at most `max_connections` connections at once, `max_connections_per_ip` from
//! one address) before anything is read, since the slot decides whether a thread is started at
//! all. [`admit`], on the connection thread, is the one gate for checks of each request itself:
//! first those the head decides (the Host allow-list, the API key, the JSON `Content-Type`, all
//! from [`guard`]), then the body-size limit and reading the body. Checks of the request's
//! content (prompt counts, lengths) are the endpoints' parsing, in `handlers`.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use safetune_model::backend::BackendError;

use super::http::{BodyError, Conn, HeadError, Request};
use super::{chat, completions, guard, handlers, Shared};
use crate::protocol::*;

/// A handler's outcome: an error is answered by [`handle`].
pub(super) type Handled = Result<(), HttpError>;

/// Starts a connection thread for an accepted stream, or answers 503 when `max_connections`
/// connections (or `max_connections_per_ip` from this peer) are open already.
pub(super) fn dispatch(stream: TcpStream, peer: std::net::SocketAddr, shared: &Arc<Shared>) {
    let cfg = &shared.config;
    let Ok(conn) = Conn::new(stream, cfg.read_timeout, cfg.write_timeout) else {
        return;
    };
    let Some(slot) = Slot::take(shared, peer.ip()) else {
        refuse_busy(conn, shared);
        return;
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("safetune-serve-conn".into())
        .spawn(move || {
            let _slot = slot;
            serve_connection(conn, &s);
        });
    // A thread that failed to start dropped its closure, and with it the slot and the socket.
    let _ = spawned;
}

/// Answers 503 on a connection over the caps, from a short-lived thread (it reads the request
/// briefly first, so the client sees the answer rather than a reset); at most 32 such threads
/// at once, past that the connection is just closed.
fn refuse_busy(conn: Conn, shared: &Arc<Shared>) {
    shared.note_refusal();
    if shared.refusing.fetch_add(1, Ordering::SeqCst) >= 32 {
        shared.refusing.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let s = shared.clone();
    let e = HttpError::overloaded();
    let spawned = std::thread::Builder::new()
        .name("safetune-serve-refuse".into())
        .spawn(move || {
            let body = serde_json::to_vec(&e.body).unwrap_or_default();
            let mut headers = e.headers.clone();
            headers.push(("Content-Type", "application/json"));
            conn.refuse(e.status, &body, &headers);
            s.refusing.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        shared.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection slot: counted in `in_flight` and per peer address; given back (waking a waiting
/// shutdown) when dropped.
pub(super) struct Slot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<Slot> {
        let mut per_ip = shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if shared.in_flight.load(Ordering::SeqCst) >= shared.config.max_connections {
            return None;
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= shared.config.max_connections_per_ip {
            return None;
        }
        *n += 1;
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(Slot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.shared.idle.1.notify_all();
    }
}

/// Serves requests on one connection until it closes, idles out, fails a deadline or the
/// server stops; at most `max_requests_per_connection` of them.
fn serve_connection(mut conn: Conn, shared: &Shared) {
    let cfg = &shared.config;
    for i in 0..cfg.max_requests_per_connection.max(1) {
        let mut request = match conn.next_request(cfg.idle_timeout, i == 0, &shared.stopping) {
            Ok(r) => r,
            Err(HeadError::Closed) => return,
            Err(e) => {
                let err = match e {
                    HeadError::Timeout => HttpError::new(
                        408,
                        ErrorResponse::new(
                            "the request did not arrive in time",
                            "invalid_request_error",
                        )
                        .with_code("request_timeout"),
                    ),
                    HeadError::TooLarge => HttpError::new(
                        431,
                        ErrorResponse::new(
                            "the request head is too large",
                            "invalid_request_error",
                        ),
                    ),
                    HeadError::Malformed(m) => {
                        HttpError::new(400, ErrorResponse::new(m, "invalid_request_error"))
                    }
                    HeadError::Closed => unreachable!("handled above"),
                };
                let body = serde_json::to_vec(&err.body).unwrap_or_default();
                conn.refuse(err.status, &body, &[("Content-Type", "application/json")]);
                return;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            request.close_after();
            respond(&mut request, HttpError::shutting_down());
            return;
        }
        // The last request allowed, or connections being turned away: close after this answer,
        // so a client that keeps its connection busy does not hold the slot for good.
        if i + 1 == cfg.max_requests_per_connection.max(1) || shared.refused_recently() {
            request.close_after();
        }
        handle(&mut request, shared);
        if !request.keeps_alive() {
            request.finish_close();
            return;
        }
    }
}

fn handle(request: &mut Request<'_>, shared: &Shared) {
    let body = match admit(request, shared) {
        Ok(body) => body,
        Err(e) => return respond(request, e),
    };
    if let Err(e) = route(request, &body, shared) {
        respond(request, e);
    }
}

/// Every check of a request before it is routed; returns its body. First what the head alone
/// decides (the Host header, the API key, the Content-Type), then the body, read whole before
/// any answer (so keep-alive connections stay in sync), at most `max_body_bytes` of it.
fn admit(request: &mut Request<'_>, shared: &Shared) -> Result<Vec<u8>, HttpError> {
    if let Err(e) = shared.hosts.check(request.header("host")) {
        let body = ErrorResponse::new(e.to_string(), "invalid_request_error")
            .with_code("host_not_allowed");
        return Err(HttpError::new(403, body));
    }
    let path = path_of(request.url());
    if path.starts_with("/v1") {
        if let Some(key) = &shared.config.api_key {
            if !key.accepts(request.header("authorization")) {
                return Err(HttpError::unauthorized());
            }
        }
    }
    let has_body =
        request.body_length().unwrap_or(0) > 0 || request.header("transfer-encoding").is_some();
    if (request.method() == "POST" || has_body)
        && !guard::is_json_content_type(request.header("content-type"))
    {
        let sent = request.header("content-type").unwrap_or("none").to_string();
        let body = ErrorResponse::new(
            format!("Content-Type is `{sent}`; this server takes application/json"),
            "invalid_request_error",
        )
        .with_code("unsupported_media_type");
        return Err(HttpError::new(415, body));
    }
    let limit = shared.config.max_body_bytes;
    match request.read_body(limit) {
        Ok(body) => Ok(body),
        Err(BodyError::TooLarge(len)) => Err(HttpError::too_large(format!(
            "request body of {len} bytes is over the limit of {limit}"
        ))),
        Err(BodyError::Chunked) => Err(HttpError::new(
            411,
            ErrorResponse::new(
                "chunked request bodies are not supported; send Content-Length",
                "invalid_request_error",
            ),
        )),
        Err(BodyError::Timeout) => Err(HttpError::new(
            408,
            ErrorResponse::new(
                "the request body did not arrive in time",
                "invalid_request_error",
            )
            .with_code("request_timeout"),
        )),
        Err(BodyError::Io) => Err(HttpError::new(
            400,
            ErrorResponse::new("cannot read the request body", "invalid_request_error"),
        )),
    }
}

/// The path of a request target, without query, fragment or trailing slash.
fn path_of(url: &str) -> &str {
    url.split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
}

fn route(request: &mut Request<'_>, body: &[u8], shared: &Shared) -> Handled {
    let method = request.method().to_string();
    let url = request.url().to_string();
    let path = path_of(&url).to_string();
    match (path.as_str(), method.as_str()) {
        ("/health", "GET") => ok(request, &serde_json::json!({"status": "ok"})),
        ("/v1/models", "GET") => {
            let mut data = vec![model_object(shared)];
            data.extend(adapter_objects(shared));
            let list = ModelList {
                object: "list".into(),
                data,
            };
            ok(request, &list)
        }
        (p, "GET") if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if id == shared.model_name {
                return ok(request, &model_object(shared));
            }
            match adapter_objects(shared).into_iter().find(|m| m.id == id) {
                Some(m) => ok(request, &m),
                None => Err(HttpError::no_such_model(id)),
            }
        }
        ("/v1/load_lora_adapter", "POST") if shared.config.allow_runtime_lora => {
            super::lora::load(request, body, shared)
        }
        ("/v1/unload_lora_adapter", "POST") if shared.config.allow_runtime_lora => {
            super::lora::unload(request, body, shared)
        }
        ("/v1/chat/completions", "POST") => handlers::generate::<chat::Chat>(request, body, shared),
        ("/v1/completions", "POST") => {
            handlers::generate::<completions::Completions>(request, body, shared)
        }
        ("/v1/models" | "/v1/chat/completions" | "/v1/completions" | "/health", _) => {
            let err = ErrorResponse::new(
                format!("method {method} is not allowed on {path}"),
                "invalid_request_error",
            )
            .with_code("method_not_allowed");
            Err(HttpError::new(405, err))
        }
        _ => {
            let err = ErrorResponse::new(
                format!("Unknown request URL: {method} {url}. This server serves /v1/chat/completions, /v1/completions and /v1/models."),
                "invalid_request_error",
            )
            .with_code("unknown_url");
            Err(HttpError::new(404, err))
        }
    }
}

fn model_object(shared: &Shared) -> ModelObject {
    ModelObject {
        id: shared.model_name.clone(),
        object: "model".into(),
        created: shared.created,
        owned_by: "safetune".into(),
        root: None,
        parent: None,
    }
}

/// The served adapters as vLLM lists them: `root` their directory, `parent` the base.
fn adapter_objects(shared: &Shared) -> Vec<ModelObject> {
    shared
        .adapters
        .list()
        .into_iter()
        .map(|(name, path)| ModelObject {
            id: name,
            object: "model".into(),
            created: shared.created,
            owned_by: "safetune".into(),
            root: Some(path.display().to_string()),
            parent: Some(shared.model_name.clone()),
        })
        .collect()
}

/// The JSON body of a request, as `T`.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    if body.is_empty() {
        return Err(HttpError::invalid(
            "the request body is empty; send a JSON object",
            None,
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::invalid(format!("invalid JSON body: {e}"), None))
}

// ---------------------------------------------------------------------------------------------
// Errors in OpenAI's shape

/// An HTTP error with OpenAI's error body.
pub(super) struct HttpError {
    pub(super) status: u16,
    pub(super) body: ErrorResponse,
    pub(super) headers: Vec<(&'static str, &'static str)>,
}

impl HttpError {
    pub(super) fn new(status: u16, body: ErrorResponse) -> Self {
        HttpError {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub(super) fn with_code(mut self, code: &str) -> Self {
        self.body = self.body.with_code(code);
        self
    }

    fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 400 `invalid_request_error`, naming the offending parameter if there is one.
    pub(super) fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut body = ErrorResponse::new(message, "invalid_request_error");
        if let Some(p) = param {
            body = body.with_param(p);
        }
        HttpError::new(400, body)
    }

    pub(super) fn from_backend(e: BackendError) -> Self {
        match e {
            BackendError::Invalid(m) => HttpError::invalid(m, None),
            BackendError::Unavailable(m) => HttpError::new(
                503,
                ErrorResponse::new(m, "server_error").with_code("backend_unavailable"),
            )
            .with_header("Retry-After", "1"),
            BackendError::Other(m) => HttpError::new(500, ErrorResponse::new(m, "server_error")),
        }
    }

    /// 413; the connection is closed, since the rest of the body is not read.
    fn too_large(message: String) -> Self {
        HttpError::new(413, ErrorResponse::new(message, "invalid_request_error"))
            .with_header("Connection", "close")
    }

    /// 401, as OpenAI answers a missing or wrong key.
    fn unauthorized() -> Self {
        let body = ErrorResponse::new(
            "Incorrect or missing API key: send `Authorization: Bearer KEY` with the key this server was started with (--api-key)",
            "invalid_request_error",
        )
        .with_code("invalid_api_key");
        HttpError::new(401, body).with_header("WWW-Authenticate", "Bearer")
    }

    fn overloaded() -> Self {
        let body = ErrorResponse::new("too many connections open; retry later", "server_error")
            .with_code("server_overloaded");
        HttpError::new(503, body).with_header("Retry-After", "1")
    }

    pub(super) fn shutting_down() -> Self {
        let body = ErrorResponse::new("the server is shutting down", "server_error")
            .with_code("shutting_down");
        HttpError::new(503, body)
    }

    pub(super) fn queue_full(max_queue: usize) -> Self {
        let body = ErrorResponse::new(
            format!("the server's queue is full ({max_queue} requests waiting); retry later"),
            "rate_limit_error",
        )
        .with_code("queue_full");
        HttpError::new(429, body).with_header("Retry-After", "1")
    }

    /// The scheduler went away before a job's answer (a panic on its thread).
    pub(super) fn scheduler_gone() -> Self {
        HttpError::new(
            500,
            ErrorResponse::new("the scheduler stopped before answering", "server_error"),
        )
    }

    pub(super) fn no_such_model(id: &str) -> Self {
        let body = ErrorResponse::new(
            format!("The model `{id}` does not exist"),
            "invalid_request_error",
        )
        .with_param("model")
        .with_code("model_not_found");
        HttpError::new(404, body)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing whole responses

/// Answers 200 with `value` as JSON.
pub(super) fn ok<T: serde::Serialize>(request: &mut Request<'_>, value: &T) -> Handled {
    respond_json(request, 200, value, &[]);
    Ok(())
}

/// Answers with `e`; a client that went away is not an error of ours.
pub(super) fn respond(request: &mut Request<'_>, e: HttpError) {
    respond_json(request, e.status, &e.body, &e.headers);
}

fn respond_json<T: serde::Serialize>(
    request: &mut Request<'_>,
    status: u16,
    value: &T,
    headers: &[(&str, &str)],
) {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut all: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request.respond(status, &all, &body);
}
