//! Reward models behind HTTP: vLLM-style pooling, score and classify endpoints.
//!
//! Specs are `KIND:URL#MODEL` where URL is the server root (`http://127.0.0.1:8000`):
//! - `pooling:` posts `{"model", "messages"}` (the server applies the RM's chat template) to
//!   `URL/pooling` and reads `data[0].data`: a number, a list of label values (the chosen label is
//!   the score), or a list of per-token lists (the last token's value is the score);
//! - `score:` posts `{"model", "text_1": prompt, "text_2": answer}` to `URL/score` and reads
//!   `data[0].score`;
//! - `classify:` posts `{"model", "input": ["prompt\n\nanswer", ...]}` (a whole batch) to
//!   `URL/classify` and reads `data[i].probs[label]`.
//!
//! Requests are retried with exponential backoff and jitter on connection failures, timeouts, a
//! body cut short, 408, 429 and 5xx, honouring a `Retry-After` that is a finite, non-negative
//! number of seconds, up to a cap (`safetune_openai::retry`, shared with the OpenAI client); an API key, if the configured environment variable holds one,
//! is sent as a bearer token where `safetune_openai::access` allows it (https, a loopback host,
//! or `allow_insecure`), and never printed. Resuming is the scoring runner's job: rows already
//! written are not sent again.

use std::time::Duration;

use safetune_openai::retry::{self, Backoff};
use serde_json::{json, Value};

use super::backend::{RewardModel, RmInput};
use super::error::{Result, RmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    Pooling,
    Score,
    Classify,
}

impl EndpointKind {
    pub const ALL: [EndpointKind; 3] = [
        EndpointKind::Pooling,
        EndpointKind::Score,
        EndpointKind::Classify,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            EndpointKind::Pooling => "pooling:",
            EndpointKind::Score => "score:",
            EndpointKind::Classify => "classify:",
        }
    }

    fn path(self) -> &'static str {
        match self {
            EndpointKind::Pooling => "pooling",
            EndpointKind::Score => "score",
            EndpointKind::Classify => "classify",
        }
    }

    pub fn from_spec(spec: &str) -> Option<EndpointKind> {
        Self::ALL.into_iter().find(|k| spec.starts_with(k.prefix()))
    }
}

/// Retry, timeout and concurrency settings of HTTP reward models.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; values that are no finite, non-negative number of
    /// seconds are ignored (`safetune_openai::retry`).
    pub max_retry_after: Duration,
    pub timeout: Duration,
    /// Requests in flight at once (pooling and score send one input per request).
    pub concurrency: usize,
    /// Name of the environment variable holding an API key (never the key itself).
    pub api_key_env: String,
    /// Send the key over plain http to a host that is not loopback.
    pub allow_insecure: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            max_retries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: retry::DEFAULT_MAX_RETRY_AFTER,
            timeout: Duration::from_secs(300),
            concurrency: 8,
            api_key_env: safetune_openai::access::DEFAULT_API_KEY_ENV.into(),
            allow_insecure: false,
        }
    }
}

/// An HTTP reward model.
pub struct RemoteRm {
    kind: EndpointKind,
    url: String,
    model: String,
    label: Option<usize>,
    opts: RemoteOptions,
    api_key: Option<String>,
    agent: ureq::Agent,
    name: String,
}

impl RemoteRm {
    /// `rest` is `URL#MODEL` (the part after the kind prefix).
    pub fn new(
        kind: EndpointKind,
        rest: &str,
        label: Option<usize>,
        opts: RemoteOptions,
    ) -> std::result::Result<RemoteRm, String> {
        let (url, model) = rest.rsplit_once('#').ok_or_else(|| {
            format!(
                "write {}URL#MODEL, e.g. {}http://127.0.0.1:8000#my-rm",
                kind.prefix(),
                kind.prefix()
            )
        })?;
        let url = url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) || model.is_empty() {
            return Err(format!(
                "write {}URL#MODEL with an http(s) URL and a model name",
                kind.prefix()
            ));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(opts.timeout))
            .proxy(None)
            .build()
            .into();
        let api_key =
            safetune_openai::access::api_key_for(url, &opts.api_key_env, opts.allow_insecure)
                .map_err(|e| format!("{}{url}#{model}: {e}", kind.prefix()))?;
        Ok(RemoteRm {
            kind,
            url: url.to_string(),
            model: model.to_string(),
            label,
            name: format!("{}{}", kind.prefix(), model),
            opts,
            api_key,
            agent,
        })
    }

    /// Whether an API key is sent to this endpoint.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    fn endpoint(&self) -> String {
        format!("{}/{}", self.url, self.kind.path())
    }

    /// One POST with retries; returns the parsed JSON body of the 2xx answer.
    fn post(&self, body: &Value) -> Result<Value> {
        let url = self.endpoint();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.agent.post(&url).header("Accept", "application/json");
            if let Some(k) = &self.api_key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            let (error, retry_after, retryable) = match req.send_json(body) {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let header =
                        |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
                    let retry_after = retry::retry_after(
                        header("retry-after-ms"),
                        header("retry-after"),
                        self.opts.max_retry_after,
                    );
                    match resp
                        .body_mut()
                        .with_config()
                        .limit(64 << 20)
                        .read_to_string()
                    {
                        // A body cut short (a dropped connection) is retried like no answer.
                        Err(e) => (
                            format!("{url} answered HTTP {status} but its body was cut short: {e}"),
                            retry_after,
                            true,
                        ),
                        Ok(text) if (200..300).contains(&status) => {
                            return serde_json::from_str(&text).map_err(|e| {
                                RmError::Backend(format!("{url} answered with invalid JSON: {e}"))
                            });
                        }
                        Ok(text) => {
                            let snippet: String = text.chars().take(300).collect();
                            (
                                format!("{url} answered HTTP {status}: {snippet}"),
                                retry_after,
                                matches!(status, 408 | 429 | 500..=599),
                            )
                        }
                    }
                }
                Err(e) => (format!("cannot reach {url}: {e}"), None, true),
            };
            if !retryable {
                let hint = if error.contains("HTTP 404") {
                    format!(
                        "\nhint: check the server root URL and that it serves /{} for model `{}`",
                        self.kind.path(),
                        self.model
                    )
                } else {
                    String::new()
                };
                return Err(RmError::Backend(format!("{error}{hint}")));
            }
            if attempt > self.opts.max_retries {
                return Err(RmError::Backend(format!(
                    "{error} (gave up after {attempt} attempts)"
                )));
            }
            let backoff = Backoff {
                initial: self.opts.initial_backoff,
                max: self.opts.max_backoff,
                max_retry_after: self.opts.max_retry_after,
            };
            std::thread::sleep(backoff.delay(attempt, retry_after));
        }
    }

    fn pick_label(&self, values: &[f64]) -> Result<f64> {
        let i = self.label.unwrap_or(values.len().saturating_sub(1));
        values.get(i).copied().ok_or_else(|| {
            RmError::Backend(format!(
                "{}: label {i} asked for, the answer has {} value(s)",
                self.endpoint(),
                values.len()
            ))
        })
    }

    fn score_one(&self, input: &RmInput) -> Result<f64> {
        let url = self.endpoint();
        let bad = |what: &str, v: &Value| {
            let s: String = v.to_string().chars().take(200).collect();
            RmError::Backend(format!("{url}: unexpected answer ({what}): {s}"))
        };
        match self.kind {
            EndpointKind::Pooling => {
                let messages: Vec<Value> = input
                    .conversation()
                    .iter()
                    .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                    .collect();
                let v = self.post(&json!({"model": self.model, "messages": messages}))?;
                let data = v
                    .pointer("/data/0/data")
                    .ok_or_else(|| bad("no data[0].data", &v))?;
                match data {
                    Value::Number(n) => n.as_f64().ok_or_else(|| bad("not a number", &v)),
                    Value::Array(items) => {
                        // Per-token rows: take the last token's row.
                        let row = match items.last() {
                            Some(Value::Array(last)) => last.clone(),
                            _ => items.clone(),
                        };
                        let nums: Option<Vec<f64>> = row.iter().map(Value::as_f64).collect();
                        let nums = nums.ok_or_else(|| bad("non-numeric values", &v))?;
                        self.pick_label(&nums)
                    }
                    _ => Err(bad("data[0].data is not a number or a list", &v)),
                }
            }
            EndpointKind::Score => {
                let v = self.post(&json!({
                    "model": self.model,
                    "text_1": input.prompt_text(),
                    "text_2": input.response,
                }))?;
                v.pointer("/data/0/score")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| bad("no numeric data[0].score", &v))
            }
            EndpointKind::Classify => Ok(self.classify(std::slice::from_ref(input))?[0]),
        }
    }

    fn classify(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        let url = self.endpoint();
        let texts: Vec<String> = inputs
            .iter()
            .map(|i| format!("{}\n\n{}", i.prompt_text(), i.response))
            .collect();
        let v = self.post(&json!({"model": self.model, "input": texts}))?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| RmError::Backend(format!("{url}: the answer has no `data` list")))?;
        if data.len() != inputs.len() {
            return Err(RmError::Backend(format!(
                "{url}: {} results for {} inputs",
                data.len(),
                inputs.len()
            )));
        }
        let mut out: Vec<Option<f64>> = vec![None; inputs.len()];
        for (k, d) in data.iter().enumerate() {
            let i = d
                .get("index")
                .and_then(Value::as_u64)
                .map(|i| i as usize)
                .unwrap_or(k);
            let probs: Option<Vec<f64>> = d
                .get("probs")
                .and_then(Value::as_array)
                .and_then(|p| p.iter().map(Value::as_f64).collect());
            let probs = probs.ok_or_else(|| {
                RmError::Backend(format!("{url}: data[{k}] has no numeric `probs`"))
            })?;
            let slot = out.get_mut(i).ok_or_else(|| {
                RmError::Backend(format!("{url}: data[{k}].index {i} out of range"))
            })?;
            *slot = Some(self.pick_label(&probs)?);
        }
        // Indices repeated in the answer leave an input without its result.
        out.iter()
            .enumerate()
            .map(|(i, v)| {
                v.ok_or_else(|| {
                    RmError::Backend(format!("{url}: the answer has no result for input {i}"))
                })
            })
            .collect()
    }
}

impl RewardModel for RemoteRm {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        self.opts.concurrency.max(1)
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        if self.kind == EndpointKind::Classify {
            return self.classify(inputs);
        }
        // One request per input, `concurrency` at a time.
        let mut out: Vec<Option<Result<f64>>> = (0..inputs.len()).map(|_| None).collect();
        for (chunk_in, chunk_out) in inputs
            .chunks(self.opts.concurrency.max(1))
            .zip(out.chunks_mut(self.opts.concurrency.max(1)))
        {
            std::thread::scope(|s| {
                for (input, slot) in chunk_in.iter().zip(chunk_out.iter_mut()) {
                    s.spawn(move || *slot = Some(self.score_one(input)));
                }
            });
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(RmError::Backend("request not sent".into()))))
            .collect()
    }
}
