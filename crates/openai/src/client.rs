//! `OpenAiClient`: a [`Generator`] that sends requests to an OpenAI-compatible server
//! (`openai:BASE_URL#MODEL`).
//!
//! A batch handed to `generate` runs on up to `concurrency` threads at once. Each HTTP request is
//! retried with exponential backoff and jitter on 429, 408, 409, 5xx, connection failures and
//! timeouts, honouring a `Retry-After` that is a finite, non-negative number of seconds, up to a
//! cap (`crate::retry`). The API key is read from an environment variable (its name
//! is configurable, `OPENAI_API_KEY` by default), sent as `Authorization: Bearer` only where
//! [`crate::access`] allows (https, or a loopback host, or `allow_insecure`), and never
//! appears in `Debug` output or in error messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use safetune_model::backend::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, Prompt, RequestFeed, TokenSink,
};
use safetune_model::{ModelError, ModelSpec};

use crate::protocol::*;
use crate::retry::{self, Backoff};

/// The prefix of model specs this backend serves.
pub const SPEC_PREFIX: &str = "openai:";

/// Settings of an [`OpenAiClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Requests of one batch sent at once (also what `max_batch()` reports).
    pub concurrency: usize,
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles each retry, up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; longer values are cut to this, and values that are no
    /// finite, non-negative number of seconds are ignored ([`crate::retry`]).
    pub max_retry_after: Duration,
    /// Time limit of one HTTP request (connect, send, wait, read).
    pub request_timeout: Duration,
    /// Name of the environment variable holding the API key (never the key itself).
    pub api_key_env: String,
    /// Send the key over plain http to a host that is not loopback ([`crate::access`]).
    pub allow_insecure: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            concurrency: 8,
            max_retries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: retry::DEFAULT_MAX_RETRY_AFTER,
            request_timeout: Duration::from_secs(600),
            api_key_env: crate::access::DEFAULT_API_KEY_ENV.to_string(),
            allow_insecure: false,
        }
    }
}

/// The base URL and model of an `openai:BASE_URL#MODEL` spec. A base URL with no path gets
/// `/v1` appended (`http://host:8000` means `http://host:8000/v1`); otherwise it is used as given
/// (it usually ends in `/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiSpec {
    pub base_url: String,
    pub model: String,
}

impl OpenAiSpec {
    /// Whether `spec` names a remote OpenAI-compatible model.
    pub fn matches(spec: &str) -> bool {
        spec.starts_with(SPEC_PREFIX)
    }

    /// The remote part of a parsed spec; `None` for local models.
    pub fn from_model_spec(spec: &ModelSpec) -> Option<OpenAiSpec> {
        match spec {
            ModelSpec::OpenAi { base_url, model } => {
                let url = base_url.trim_end_matches('/');
                let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
                let base_url = if after_scheme.contains('/') {
                    url.to_string()
                } else {
                    format!("{url}/v1")
                };
                Some(OpenAiSpec {
                    base_url,
                    model: model.clone(),
                })
            }
            _ => None,
        }
    }

    /// Parses `openai:BASE_URL#MODEL` (with [`ModelSpec::parse`], so every crate agrees).
    pub fn parse(spec: &str) -> Result<OpenAiSpec, ModelError> {
        if !Self::matches(spec) {
            return Err(ModelError::Spec {
                spec: spec.to_string(),
                message: "not an openai: spec; write openai:BASE_URL#MODEL, e.g. openai:http://127.0.0.1:8000/v1#my-model".into(),
            });
        }
        let parsed = ModelSpec::parse(spec)?;
        Self::from_model_spec(&parsed).ok_or_else(|| ModelError::Spec {
            spec: spec.to_string(),
            message: "not an openai: spec".into(),
        })
    }
}

/// The API key; prints as `<redacted>`.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A [`Generator`] over an OpenAI-compatible HTTP server.
pub struct OpenAiClient {
    spec: OpenAiSpec,
    config: ClientConfig,
    api_key: Option<ApiKey>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base_url", &self.spec.base_url)
            .field("model", &self.spec.model)
            .field("config", &self.config)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OpenAiClient {
    /// A client for `openai:BASE_URL#MODEL`, reading the key from `config.api_key_env` now
    /// (no key is fine: local servers need none).
    pub fn from_spec(spec: &str, config: ClientConfig) -> Result<OpenAiClient, ModelError> {
        OpenAiClient::try_new(OpenAiSpec::parse(spec)?, config)
    }

    /// A client, or an error when a key named for this endpoint would go over plain http to a
    /// host that is not loopback ([`crate::access::api_key_for`]).
    pub fn try_new(spec: OpenAiSpec, config: ClientConfig) -> Result<OpenAiClient, ModelError> {
        let api_key =
            crate::access::api_key_for(&spec.base_url, &config.api_key_env, config.allow_insecure)
                .map_err(|message| ModelError::Spec {
                    spec: format!("openai:{}#{}", spec.base_url, spec.model),
                    message,
                })?;
        Ok(OpenAiClient::with_key(spec, config, api_key))
    }

    /// A client that withholds a key the access rules would refuse (see [`Self::try_new`]).
    pub fn new(spec: OpenAiSpec, config: ClientConfig) -> OpenAiClient {
        let api_key =
            crate::access::api_key_for(&spec.base_url, &config.api_key_env, config.allow_insecure)
                .unwrap_or(None);
        OpenAiClient::with_key(spec, config, api_key)
    }

    fn with_key(spec: OpenAiSpec, config: ClientConfig, api_key: Option<String>) -> OpenAiClient {
        let api_key = api_key.map(ApiKey);
        let loopback = is_loopback(&spec.base_url);
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.request_timeout))
            .user_agent(format!("safetune/{}", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(config.concurrency.max(1) + 2);
        if loopback {
            builder = builder.proxy(None);
        }
        let agent = ureq::Agent::new_with_config(builder.build());
        OpenAiClient {
            spec,
            config,
            api_key,
            agent,
        }
    }

    pub fn spec(&self) -> &OpenAiSpec {
        &self.spec
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether an API key is sent: found in the configured environment variable and allowed
    /// for this endpoint ([`crate::access`]).
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// Lists the server's models (`GET /v1/models`).
    pub fn list_models(&self) -> Result<ModelList, BackendError> {
        let body = self.with_retries("models", None)?;
        serde_json::from_str(&body).map_err(|e| {
            BackendError::Other(format!(
                "{}/models answered with JSON that is not a model list: {e}",
                self.spec.base_url
            ))
        })
    }

    /// Loads a LoRA adapter on the server (`POST /v1/load_lora_adapter`, as vLLM and
    /// `safetune serve --allow-runtime-lora` take it), `path` as the server sees it. An adapter
    /// of that name loaded already is [`LoraLoad::AlreadyLoaded`], not an error, so a rerun can
    /// load again. Transient failures are retried like every request.
    pub fn load_lora_adapter(&self, name: &str, path: &str) -> Result<LoraLoad, BackendError> {
        let body = serde_json::json!({"lora_name": name, "lora_path": path});
        match self.post_status("load_lora_adapter", &body)? {
            (200..=299, _) => Ok(LoraLoad::Loaded),
            (400, text) if text.contains("already been loaded") => Ok(LoraLoad::AlreadyLoaded),
            (status, text) => Err(self.lora_error("load_lora_adapter", status, &text)),
        }
    }

    /// Unloads a LoRA adapter (`POST /v1/unload_lora_adapter`); `false` when the server did not
    /// have it (404), which is not an error.
    pub fn unload_lora_adapter(&self, name: &str) -> Result<bool, BackendError> {
        let body = serde_json::json!({"lora_name": name});
        match self.post_status("unload_lora_adapter", &body)? {
            (200..=299, _) => Ok(true),
            (404, text) if text.contains("cannot be found") => Ok(false),
            (status, text) => Err(self.lora_error("unload_lora_adapter", status, &text)),
        }
    }

    fn lora_error(&self, endpoint: &str, status: u16, text: &str) -> BackendError {
        let url = format!("{}/{endpoint}", self.spec.base_url);
        let hint = match status {
            401 | 403 => format!(
                "\nhint: the server wants its API key; set it in the environment variable {}",
                self.config.api_key_env
            ),
            404 | 405 if !text.contains("NotFoundError") => "\nhint: the server does not load adapters at run time: start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or safetune serve with --allow-runtime-lora and --api-key".to_string(),
            _ => String::new(),
        };
        self.scrub_err(BackendError::Other(format!(
            "{url} answered HTTP {status}: {}{hint}",
            server_message(text)
        )))
    }

    /// POSTs `body`, retrying connection failures, 408, 429 and 5xx; returns the final status
    /// and body whatever the status.
    fn post_status(
        &self,
        endpoint: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), BackendError> {
        let url = format!("{}/{endpoint}", self.spec.base_url);
        let attempts = self.config.max_retries + 1;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.agent.post(&url).header("Accept", "application/json");
            if let Some(key) = &self.api_key {
                req = req.header("Authorization", &format!("Bearer {}", key.0));
            }
            let failure = match req.send_json(body) {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp
                        .body_mut()
                        .with_config()
                        .limit(1 << 20)
                        .read_to_string()
                        .unwrap_or_default();
                    if !matches!(status, 408 | 429 | 500..=599) {
                        return Ok((status, text));
                    }
                    format!("{url} answered HTTP {status}: {}", server_message(&text))
                }
                Err(e) => format!("cannot reach {url}: {e}"),
            };
            if attempt >= attempts {
                return Err(BackendError::Unavailable(
                    self.scrub(&format!("{failure} (gave up after {attempt} attempts)")),
                ));
            }
            std::thread::sleep(self.backoff(attempt, None));
        }
    }

    /// Generates one request (with retries).
    pub fn generate_one(&self, request: &GenRequest) -> Result<GenOutput, BackendError> {
        let s = &request.sampling;
        let stop = if s.stop.is_empty() {
            None
        } else {
            Some(StopSeq::Many(s.stop.clone()))
        };
        let top_k = if s.top_k > 0 {
            Some(s.top_k as i64)
        } else {
            None
        };
        let top_p = if s.top_p < 1.0 { Some(s.top_p) } else { None };
        match &request.prompt {
            Prompt::Chat(messages) => {
                let body = ChatCompletionRequest {
                    model: self.spec.model.clone(),
                    messages: messages
                        .iter()
                        .map(|m| ChatMessage {
                            role: m.role.as_str().to_string(),
                            content: Some(MessageContent::Text(m.content.clone())),
                        })
                        .collect(),
                    max_tokens: Some(s.max_new_tokens as u64),
                    max_completion_tokens: None,
                    temperature: Some(s.temperature),
                    top_p,
                    top_k,
                    n: None,
                    seed: Some(s.seed),
                    stop,
                    stream: false,
                    stream_options: None,
                };
                let text = self.with_retries(
                    "chat/completions",
                    Some(serde_json::to_value(&body).unwrap_or_default()),
                )?;
                let resp: ChatCompletionResponse = serde_json::from_str(&text).map_err(|e| {
                    BackendError::Other(format!(
                        "{}/chat/completions answered with unexpected JSON: {e}",
                        self.spec.base_url
                    ))
                })?;
                let usage = resp.usage.unwrap_or_default();
                let choice = resp.choices.into_iter().next().ok_or_else(|| {
                    BackendError::Other(format!(
                        "{}/chat/completions answered with no choices",
                        self.spec.base_url
                    ))
                })?;
                Ok(GenOutput {
                    text: choice.message.content.unwrap_or_default(),
                    prompt_tokens: usage.prompt_tokens as usize,
                    completion_tokens: usage.completion_tokens as usize,
                    finish_reason: finish(choice.finish_reason.as_deref()),
                })
            }
            Prompt::Text(prompt) => {
                let body = CompletionRequest {
                    model: self.spec.model.clone(),
                    prompt: PromptInput::One(prompt.clone()),
                    max_tokens: Some(s.max_new_tokens as u64),
                    temperature: Some(s.temperature),
                    top_p,
                    top_k,
                    n: None,
                    seed: Some(s.seed),
                    stop,
                    stream: false,
                    stream_options: None,
                    echo: false,
                };
                let text = self.with_retries(
                    "completions",
                    Some(serde_json::to_value(&body).unwrap_or_default()),
                )?;
                let resp: CompletionResponse = serde_json::from_str(&text).map_err(|e| {
                    BackendError::Other(format!(
                        "{}/completions answered with unexpected JSON: {e}",
                        self.spec.base_url
                    ))
                })?;
                let usage = resp.usage.unwrap_or_default();
                let choice = resp.choices.into_iter().next().ok_or_else(|| {
                    BackendError::Other(format!(
                        "{}/completions answered with no choices",
                        self.spec.base_url
                    ))
                })?;
                Ok(GenOutput {
                    text: choice.text,
                    prompt_tokens: usage.prompt_tokens as usize,
                    completion_tokens: usage.completion_tokens as usize,
                    finish_reason: finish(choice.finish_reason.as_deref()),
                })
            }
        }
    }

    /// Sends one request (GET when `body` is `None`), retrying transient failures; returns the
    /// body of the 2xx answer.
    fn with_retries(
        &self,
        endpoint: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String, BackendError> {
        let url = format!("{}/{endpoint}", self.spec.base_url);
        let attempts = self.config.max_retries + 1;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = self.attempt(&url, body.as_ref());
            let (failure, retry_after) = match outcome {
                Attempt::Ok(text) => return Ok(text),
                Attempt::Fatal(e) => return Err(self.scrub_err(e)),
                Attempt::Retry { error, retry_after } => (error, retry_after),
            };
            if attempt >= attempts {
                let msg = format!("{failure} (gave up after {attempt} attempts)");
                return Err(BackendError::Unavailable(self.scrub(&msg)));
            }
            std::thread::sleep(self.backoff(attempt, retry_after));
        }
    }

    /// Delay before retry number `attempt` (1-based): [`Backoff::delay`].
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        Backoff {
            initial: self.config.initial_backoff,
            max: self.config.max_backoff,
            max_retry_after: self.config.max_retry_after,
        }
        .delay(attempt, retry_after)
    }

    fn attempt(&self, url: &str, body: Option<&serde_json::Value>) -> Attempt {
        let result = match body {
            Some(b) => {
                let mut req = self.agent.post(url).header("Accept", "application/json");
                if let Some(key) = &self.api_key {
                    req = req.header("Authorization", &format!("Bearer {}", key.0));
                }
                req.send_json(b)
            }
            None => {
                let mut req = self.agent.get(url).header("Accept", "application/json");
                if let Some(key) = &self.api_key {
                    req = req.header("Authorization", &format!("Bearer {}", key.0));
                }
                req.call()
            }
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return self.transport_error(url, e),
        };
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let retry_after = retry::retry_after(
            header("retry-after-ms"),
            header("retry-after"),
            self.config.max_retry_after,
        );
        let text = match resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => return self.transport_error(url, e),
        };
        if (200..300).contains(&status) {
            return Attempt::Ok(text);
        }
        let detail = server_message(&text);
        let msg = format!("{url} answered HTTP {status}: {detail}");
        match status {
            408 | 409 | 429 | 500..=599 => Attempt::Retry {
                error: msg,
                retry_after,
            },
            401 | 403 => Attempt::Fatal(BackendError::Other(format!(
                "{msg}\nhint: check the API key in the environment variable {} ({})",
                self.config.api_key_env,
                if self.api_key.is_some() {
                    "it is set and was sent"
                } else if crate::access::api_key_for(
                    &self.spec.base_url,
                    &self.config.api_key_env,
                    true,
                )
                .is_ok_and(|k| k.is_some())
                {
                    "it is set but not sent over plain http to a host that is not loopback; \
                     use https, or allow_insecure = true (--allow-insecure)"
                } else {
                    "it is not set"
                }
            ))),
            404 => Attempt::Fatal(BackendError::Other(format!(
                "{msg}\nhint: check the base URL (it usually ends in /v1) and the model name `{}`",
                self.spec.model
            ))),
            _ => Attempt::Fatal(BackendError::Invalid(msg)),
        }
    }

    fn transport_error(&self, url: &str, e: ureq::Error) -> Attempt {
        let error = match &e {
            ureq::Error::Timeout(_) => {
                format!(
                    "request to {url} timed out after {:?}",
                    self.config.request_timeout
                )
            }
            ureq::Error::HostNotFound => format!("cannot reach {url}: host not found"),
            ureq::Error::ConnectionFailed => format!("cannot reach {url}: connection failed"),
            ureq::Error::Io(io) => format!("cannot reach {url}: {io}"),
            ureq::Error::BadUri(u) => {
                return Attempt::Fatal(BackendError::Invalid(format!("bad URL {u}")));
            }
            other => format!("request to {url} failed: {other}"),
        };
        Attempt::Retry {
            error,
            retry_after: None,
        }
    }

    /// Removes the API key from a message (a server may echo it back).
    fn scrub(&self, msg: &str) -> String {
        match &self.api_key {
            Some(k) if k.0.len() >= 4 => msg.replace(&k.0, "<redacted>"),
            _ => msg.to_string(),
        }
    }

    fn scrub_err(&self, e: BackendError) -> BackendError {
        match e {
            BackendError::Invalid(m) => BackendError::Invalid(self.scrub(&m)),
            BackendError::Unavailable(m) => BackendError::Unavailable(self.scrub(&m)),
            BackendError::Other(m) => BackendError::Other(self.scrub(&m)),
        }
    }
}

/// What [`OpenAiClient::load_lora_adapter`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLoad {
    Loaded,
    /// The server had an adapter of that name already.
    AlreadyLoaded,
}

enum Attempt {
    Ok(String),
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Fatal(BackendError),
}

fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// The `error.message` of an OpenAI error body, or the start of the body.
fn server_message(body: &str) -> String {
    if let Ok(e) = serde_json::from_str::<ErrorResponse>(body) {
        return e.error.message;
    }
    let t = body.trim();
    if t.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = t.chars().take(300).collect();
    if s.len() < t.len() {
        s.push_str("...");
    }
    s
}

fn is_loopback(url: &str) -> bool {
    crate::access::is_loopback(url)
}

impl Generator for OpenAiClient {
    fn model_id(&self) -> &str {
        &self.spec.model
    }

    fn max_batch(&self) -> usize {
        self.config.concurrency.max(1)
    }

    /// Sends the requests `concurrency` at a time; the sink gets each answer whole when it
    /// arrives. Fails with the first error (after retries) once running requests have ended.
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        let n = requests.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let results: Vec<Mutex<Option<Result<GenOutput, BackendError>>>> =
            (0..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let sink = Mutex::new(sink);
        let workers = self.config.concurrency.max(1).min(n);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let r = self.generate_one(&requests[i]);
                    match &r {
                        Ok(out) => {
                            if let Ok(mut s) = sink.lock() {
                                (*s)(i, &out.text);
                            }
                        }
                        Err(_) => failed.store(true, Ordering::SeqCst),
                    }
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                });
            }
        });
        let mut outs = Vec::with_capacity(n);
        for (i, slot) in results.into_iter().enumerate() {
            match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(Ok(o)) => outs.push(o),
                Some(Err(e)) => return Err(e),
                None if failed.load(Ordering::SeqCst) => continue,
                None => {
                    return Err(BackendError::Other(format!(
                        "request {i} of the batch was never sent"
                    )))
                }
            }
        }
        if outs.len() < n {
            // Unreachable in practice: a failure returns above. Kept for clarity.
            return Err(BackendError::Other("a request of the batch failed".into()));
        }
        Ok(outs)
    }

    /// Keeps `concurrency` requests in flight, taking the next one from the feed as soon as one
    /// ends (asking again whenever a request ends while the feed had none); each answer reaches
    /// the feed whole. A request that fails after its retries fails alone.
    fn generate_fed(&self, feed: &mut dyn RequestFeed) -> Result<(), BackendError> {
        // The feed and the number of requests in flight.
        let state = Mutex::new((feed, 0usize));
        let wake = std::sync::Condvar::new();
        let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::scope(|scope| {
            for _ in 0..self.config.concurrency.max(1) {
                scope.spawn(|| loop {
                    let (key, req) = {
                        let mut s = lock();
                        loop {
                            if let Some(r) = s.0.next() {
                                s.1 += 1;
                                break r;
                            }
                            if s.1 == 0 {
                                wake.notify_all();
                                return;
                            }
                            s = wake.wait(s).unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    let r = self.generate_one(&req);
                    let mut s = lock();
                    if let Ok(o) = &r {
                        s.0.piece(key, &o.text);
                    }
                    s.0.done(key, r);
                    s.1 -= 1;
                    wake.notify_all();
                });
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s = OpenAiSpec::parse("openai:http://127.0.0.1:8000#m").unwrap();
        assert_eq!(
            s,
            OpenAiSpec {
                base_url: "http://127.0.0.1:8000/v1".into(),
                model: "m".into()
            }
        );
        let s =
            OpenAiSpec::parse("openai:https://api.example.com/v1/#meta-llama/Llama-3-8B").unwrap();
        assert_eq!(s.base_url, "https://api.example.com/v1");
        assert_eq!(s.model, "meta-llama/Llama-3-8B");
        for bad in ["openai:http://h/v1", "openai:ftp://h#m", "model.gguf"] {
            let e = OpenAiSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:9/v1"));
        assert!(is_loopback("http://localhost/v1"));
        assert!(is_loopback("http://[::1]:80/v1"));
        assert!(!is_loopback("https://api.example.com/v1"));
    }
}
