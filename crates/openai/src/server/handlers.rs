//! The generation flow both endpoints share: validate the sampling settings, expand prompts into
//! one generation request per choice, queue them as one job, then answer with the whole response
//! or stream it. What differs between `/v1/chat/completions` and `/v1/completions` (the request
//! type, the default `max_tokens`, the response and chunk shapes) is an [`Endpoint`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use safetune_model::backend::{BackendError, GenOutput, GenRequest, Prompt, Sampling};

use super::http::Request;
use super::routes::{ok, Handled, HttpError};
use super::scheduler::{AdapterRef, EnqueueError, Event, Job};
use super::{sse, unix_now, Shared};
use crate::protocol::*;
use crate::random_u64;

/// One endpoint's request and response shapes.
pub(super) trait Endpoint {
    /// Prefix of response ids (`chatcmpl`, `cmpl`).
    const ID_PREFIX: &'static str;
    /// One choice of a streamed chunk.
    type Choice;
    /// A streamed event: some choices, or (last, when asked for) only the usage.
    type Chunk: serde::Serialize;
    /// The whole answer of a request that does not stream.
    type Response: serde::Serialize;

    /// Parses and validates a request body.
    fn parse(body: &[u8], shared: &Shared) -> Result<Generation, HttpError>;
    fn chunk(meta: &Meta, choices: Vec<Self::Choice>, usage: Option<Usage>) -> Self::Chunk;
    /// What choice `index` opens a stream with, before any text (chat announces the role).
    fn opening(_index: u32) -> Option<Self::Choice> {
        None
    }
    /// Choice `index` decoded `text`.
    fn piece(index: u32, text: String) -> Self::Choice;
    /// Choice `index` is done: the streamed choice carrying its finish reason.
    fn finished(index: u32, out: &GenOutput) -> Self::Choice;
    fn response(meta: Meta, outs: Vec<GenOutput>, usage: Usage) -> Self::Response;
}

/// A parsed request: the generation requests (prompts × `n`) and how to answer.
pub(super) struct Generation {
    pub(super) requests: Vec<GenRequest>,
    pub(super) n: u32,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// The request's `model`: the base's name, an adapter's, or empty (the base).
    pub(super) model: String,
}

/// What every chunk and response of one answer repeats.
pub(super) struct Meta {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
}

/// Handles a generation request at endpoint `E`.
pub(super) fn generate<E: Endpoint>(
    request: &mut Request<'_>,
    body: &[u8],
    shared: &Shared,
) -> Handled {
    let g = E::parse(body, shared)?;
    let adapter = resolve_model(shared, &g.model)?;
    let model = match &adapter {
        Some((name, _)) => name.clone(),
        None => shared.model_name.clone(),
    };
    let count = g.requests.len();
    let cancel = Arc::new(AtomicBool::new(false));
    let rx = submit(shared, g.requests, g.stream, cancel.clone(), adapter)?;
    let meta = Meta {
        id: shared.new_id(E::ID_PREFIX),
        created: unix_now(),
        model,
    };
    if g.stream {
        sse::stream::<E>(request, &rx, &cancel, &meta, count, g.n, g.include_usage);
        return Ok(());
    }
    let outs = wait_done(request, &rx, &cancel, count)?;
    let u = usage(&outs, g.n);
    ok(request, &E::response(meta, outs, u))
}

/// What a request's `model` asks for: the base (`None`: its own name, or empty) or a served
/// adapter with its generator. Once the server serves adapters a name that is neither is 404;
/// a server without adapters answers every name with its one model.
fn resolve_model(shared: &Shared, model: &str) -> Result<Option<AdapterRef>, HttpError> {
    if model.is_empty() || model == shared.model_name {
        return Ok(None);
    }
    if let Some(served) = shared.adapters.get(model) {
        return Ok(Some((model.to_string(), served.generator)));
    }
    if shared.adapters.enabled() {
        return Err(HttpError::no_such_model(model));
    }
    Ok(None)
}

/// Collects a job's parts into its outputs in order. `None` while parts are missing.
pub(super) struct Collector {
    outs: Vec<Option<GenOutput>>,
    missing: usize,
}

impl Collector {
    pub(super) fn new(count: usize) -> Collector {
        Collector {
            outs: vec![None; count],
            missing: count,
        }
    }

    /// Adds a part; returns every output once the last one arrived.
    pub(super) fn add(&mut self, start: usize, part: Vec<GenOutput>) -> Option<Vec<GenOutput>> {
        for (i, o) in part.into_iter().enumerate() {
            if let Some(slot) = self.outs.get_mut(start + i) {
                if slot.is_none() {
                    self.missing -= 1;
                }
                *slot = Some(o);
            }
        }
        if self.missing > 0 {
            return None;
        }
        Some(
            std::mem::take(&mut self.outs)
                .into_iter()
                .flatten()
                .collect(),
        )
    }
}

/// How often a handler waiting on the model checks that its client is still connected.
pub(super) const PEER_CHECK: Duration = Duration::from_millis(100);

/// Waits for a job's outputs, skipping streamed pieces. While waiting, checks every 100 ms that
/// the client is still there; once it is gone the job is cancelled (its parts not yet started
/// are dropped, the one decoding stops at its next token) and nothing is answered.
fn wait_done(
    request: &mut Request<'_>,
    rx: &mpsc::Receiver<Event>,
    cancel: &AtomicBool,
    count: usize,
) -> Result<Vec<GenOutput>, HttpError> {
    let mut got = Collector::new(count);
    let mut checked = Instant::now();
    loop {
        let event = rx.recv_timeout(PEER_CHECK);
        if checked.elapsed() >= PEER_CHECK {
            checked = Instant::now();
            if request.peer_gone() {
                cancel.store(true, Ordering::SeqCst);
                request.close_after();
                return Err(HttpError::from_backend(BackendError::Other(
                    "the client went away".into(),
                )));
            }
        }
        match event {
            Ok(Event::Piece(..)) | Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Ok(Event::Part(start, Ok(part))) => {
                if let Some(all) = got.add(start, part) {
                    return Ok(all);
                }
            }
            Ok(Event::Part(_, Err(e))) => {
                cancel.store(true, Ordering::SeqCst);
                return Err(HttpError::from_backend(e));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(HttpError::scheduler_gone()),
        }
    }
}

/// The settings both endpoints take, as sent.
pub(super) struct Common {
    pub(super) max_tokens: Option<u64>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) top_k: Option<i64>,
    pub(super) n: Option<u32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<StopSeq>,
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
}

impl Common {
    /// Validates the settings and the request's size (prompts, prompts x `n`, each prompt's
    /// tokens, stop strings) and expands `prompts` x `n` into generation requests; `default_max`
    /// is the endpoint's `max_tokens` when none is given, `prompt_param` the field the prompts
    /// came in (named by errors).
    pub(super) fn generation(
        self,
        prompts: Vec<Prompt>,
        prompt_param: &str,
        default_max: usize,
        shared: &Shared,
    ) -> Result<Generation, HttpError> {
        let stream = self.stream;
        let include_usage = self
            .stream_options
            .map(|o| o.include_usage)
            .unwrap_or(false);
        let (s, n) = sampling(self, default_max, shared)?;
        check_size(&prompts, prompt_param, n, shared)?;
        Ok(Generation {
            requests: expand(prompts, &s, n),
            n,
            stream,
            include_usage,
            model: String::new(),
        })
    }
}

/// The per-request limits: at most `max_prompts` prompts, `max_choices` prompts x `n`, and
/// `prompt_token_limit` tokens in each prompt (when the generator can count them). A request
/// over them is refused whole, before it is queued.
fn check_size(prompts: &[Prompt], param: &str, n: u32, shared: &Shared) -> Result<(), HttpError> {
    let cfg = &shared.config;
    if prompts.len() > cfg.max_prompts {
        return Err(HttpError::invalid(
            format!(
                "{} prompts in one request; this server takes at most {} (--max-prompts)",
                prompts.len(),
                cfg.max_prompts
            ),
            Some(param),
        )
        .with_code("too_many_prompts"));
    }
    let choices = prompts.len().saturating_mul(n as usize);
    if choices > cfg.max_choices {
        return Err(HttpError::invalid(
            format!(
                "{} prompts x n = {n} is {choices} choices; this server takes at most {} per request (--max-choices)",
                prompts.len(),
                cfg.max_choices
            ),
            Some("n"),
        )
        .with_code("too_many_choices"));
    }
    let Some(limit) = shared.prompt_token_limit else {
        return Ok(());
    };
    for (i, p) in prompts.iter().enumerate() {
        match shared.generator.prompt_tokens(p) {
            None => return Ok(()),
            Some(Ok(t)) if t > limit => {
                let which = if prompts.len() > 1 {
                    format!("{param}[{i}]")
                } else {
                    param.to_string()
                };
                return Err(HttpError::invalid(
                    format!(
                        "{which} has {t} tokens, over this server's limit of {limit} prompt tokens (--max-prompt-tokens)"
                    ),
                    Some(param),
                )
                .with_code("context_length_exceeded"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(HttpError::from_backend(e)),
        }
    }
    Ok(())
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
    let top_k = top_k(c.top_k)?;
    let n = c.n.unwrap_or(1);
    if n == 0 || n > cfg.max_n {
        return Err(HttpError::invalid(
            format!("n is {n}; it must be between 1 and {}", cfg.max_n),
            Some("n"),
        ));
    }
    let stop = stop_sequences(c.stop, cfg.max_stop_chars)?;
    let seed = c.seed.unwrap_or_else(random_u64);
    let sampling = Sampling {
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
    };
    Ok((sampling, n))
}

/// `top_k`: absent, -1 and 0 mean no limit.
fn top_k(k: Option<i64>) -> Result<usize, HttpError> {
    match k {
        None | Some(-1 | 0) => Ok(0),
        Some(k) if k > 0 => Ok(k as usize),
        Some(k) => Err(HttpError::invalid(
            format!("top_k is {k}; it must be -1, 0 or positive"),
            Some("top_k"),
        )),
    }
}

fn stop_sequences(stop: Option<StopSeq>, max_chars: usize) -> Result<Vec<String>, HttpError> {
    let stop = stop.map(StopSeq::into_vec).unwrap_or_default();
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
    if let Some(long) = stop.iter().find(|s| s.chars().count() > max_chars) {
        return Err(HttpError::invalid(
            format!(
                "a stop sequence has {} characters; at most {max_chars} are accepted",
                long.chars().count()
            ),
            Some("stop"),
        ));
    }
    Ok(stop)
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
    cancel: Arc<AtomicBool>,
    adapter: Option<AdapterRef>,
) -> Result<mpsc::Receiver<Event>, HttpError> {
    let (tx, rx) = mpsc::channel();
    let job = Job {
        requests: VecDeque::from(requests),
        next: 0,
        stream,
        events: tx,
        cancel,
        adapter,
    };
    match shared.enqueue(job) {
        Ok(()) => Ok(rx),
        Err(EnqueueError::Full) => Err(HttpError::queue_full(shared.config.max_queue)),
        Err(EnqueueError::Closing) => Err(HttpError::shutting_down()),
    }
}

/// Token counts of a job's outputs; the prompt of each group of `n` choices counts once, as in
/// OpenAI's API.
pub(super) fn usage(outs: &[GenOutput], n: u32) -> Usage {
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
