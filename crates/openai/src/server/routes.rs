//! From an accepted HTTP request to a handler: admission, routing, and every error answer in
//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Admission happens in two places, both here. [`dispatch`], on the accept thread, reserves a
//! handler slot (at most `max_connections` requests at once) before anything is read, since the
//! slot decides whether a thread is started at all. [`admit`], on the handler thread, is the one
//! gate for checks of the request itself (today the body-size limit, then reading the body); a
//! check that needs only the request head (a key, the Host header) belongs at its top, before the
//! body is read.

use std::io::Read;
use std::sync::atomic::Ordering;

use tiny_http::{Header, Method, Response, StatusCode};

use safetune_model::backend::BackendError;

use super::{chat, completions, handlers, Shared};
use crate::protocol::*;

/// A handler's outcome: an error is answered by [`handle`], with the request handed back.
pub(super) type Handled = Result<(), (tiny_http::Request, HttpError)>;

/// Starts a handler thread for `request`, or answers 503 without reading it when
/// `max_connections` requests are in flight already.
pub(super) fn dispatch(request: tiny_http::Request, shared: &std::sync::Arc<Shared>) {
    if shared.in_flight.load(Ordering::SeqCst) >= shared.config.max_connections {
        respond(request, HttpError::overloaded());
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

/// Answers a request that arrived while the server was stopping.
pub(super) fn refuse_shutting_down(request: tiny_http::Request) {
    respond(request, HttpError::shutting_down());
}

/// Holds a handler slot; gives it back (and wakes a waiting shutdown) when dropped.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.1.notify_all();
    }
}

fn handle(mut request: tiny_http::Request, shared: &Shared) {
    let body = match admit(&mut request, shared) {
        Ok(body) => body,
        Err(e) => return respond(request, e),
    };
    if let Err((request, e)) = route(request, &body, shared) {
        respond(request, e);
    }
}

/// Every check of a request before it is routed; returns its body. The body is read whole before
/// any answer (so keep-alive connections stay in sync), at most `max_body_bytes` of it.
fn admit(request: &mut tiny_http::Request, shared: &Shared) -> Result<Vec<u8>, HttpError> {
    let limit = shared.config.max_body_bytes;
    if let Some(len) = request.body_length() {
        if len > limit {
            return Err(HttpError::too_large(format!(
                "request body of {len} bytes is over the limit of {limit}"
            )));
        }
    }
    let mut body = Vec::new();
    if request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .is_err()
    {
        return Err(HttpError::new(
            400,
            ErrorResponse::new("cannot read the request body", "invalid_request_error"),
        ));
    }
    if body.len() > limit {
        return Err(HttpError::too_large(format!(
            "request body is over the limit of {limit} bytes"
        )));
    }
    Ok(body)
}

fn route(request: tiny_http::Request, body: &[u8], shared: &Shared) -> Handled {
    let method = request.method().clone();
    let url = request.url().to_string();
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();
    match (path.as_str(), &method) {
        ("/health", Method::Get) => ok(request, &serde_json::json!({"status": "ok"})),
        ("/v1/models", Method::Get) => {
            let list = ModelList {
                object: "list".into(),
                data: vec![model_object(shared)],
            };
            ok(request, &list)
        }
        (p, Method::Get) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if id != shared.model_name {
                return Err((request, HttpError::no_such_model(id)));
            }
            ok(request, &model_object(shared))
        }
        ("/v1/chat/completions", Method::Post) => {
            handlers::generate::<chat::Chat>(request, body, shared)
        }
        ("/v1/completions", Method::Post) => {
            handlers::generate::<completions::Completions>(request, body, shared)
        }
        ("/v1/models" | "/v1/chat/completions" | "/v1/completions" | "/health", _) => {
            let err = ErrorResponse::new(
                format!("method {method} is not allowed on {path}"),
                "invalid_request_error",
            )
            .with_code("method_not_allowed");
            Err((request, HttpError::new(405, err)))
        }
        _ => {
            let err = ErrorResponse::new(
                format!("Unknown request URL: {method} {url}. This server serves /v1/chat/completions, /v1/completions and /v1/models."),
                "invalid_request_error",
            )
            .with_code("unknown_url");
            Err((request, HttpError::new(404, err)))
        }
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

    fn overloaded() -> Self {
        let body = ErrorResponse::new("too many requests in flight; retry later", "server_error")
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

    fn no_such_model(id: &str) -> Self {
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
pub(super) fn ok<T: serde::Serialize>(request: tiny_http::Request, value: &T) -> Handled {
    let _ = respond_json(request, 200, value);
    Ok(())
}

/// Answers with `e`; a client that went away is not an error of ours.
fn respond(request: tiny_http::Request, e: HttpError) {
    let _ = respond_json_with(request, e.status, &e.body, &e.headers);
}

fn respond_json<T: serde::Serialize>(
    request: tiny_http::Request,
    status: u16,
    value: &T,
) -> std::io::Result<()> {
    respond_json_with(request, status, value, &[])
}

fn respond_json_with<T: serde::Serialize>(
    request: tiny_http::Request,
    status: u16,
    value: &T,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"));
    for (k, v) in headers {
        response.add_header(header(k, v));
    }
    request.respond(response)
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}
