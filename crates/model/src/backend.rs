//! The one interface every text generator implements: the local engine, an OpenAI-compatible
//! HTTP server, or a test double. `safetune serve`, `generate`, judges and reward models talk to
//! this trait only.

use safetune_data::Message;

/// Sampling settings for one request. `temperature == 0.0` means greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    /// Extra stop strings; the model's own end-of-turn tokens always stop.
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// What to generate from: a chat (rendered with the model's chat template) or a raw prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// Stopped early because its caller no longer wanted it (a served client went away): the
    /// output holds what was generated until then.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenOutput {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The request itself is wrong (too long, bad settings): do not retry.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A transient failure (overload, timeout, 5xx): worth retrying.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// Receives text pieces as they are decoded: `(index of the request in the batch, piece)`.
pub type TokenSink<'a> = &'a mut (dyn FnMut(usize, &str) + Send);

/// Asked between decode steps: `true` for request `i` of the batch means stop generating it.
pub type CancelCheck<'a> = &'a (dyn Fn(usize) -> bool + Sync);

/// A queue that keeps a generator busy ([`Generator::generate_fed`]): requests are taken one at
/// a time as the generator has room for them, each under a key of the feed's choosing, and each
/// request's result goes back under its key.
pub trait RequestFeed: Send {
    /// The next request to start, if one is waiting now. `None` means none is waiting: the
    /// generator finishes what it runs (asking again as rows finish) and returns once it runs
    /// nothing.
    fn next(&mut self) -> Option<(usize, GenRequest)>;
    /// Text decoded for request `key`, as soon as it is certain.
    fn piece(&mut self, key: usize, piece: &str);
    /// Request `key` finished, or failed on its own (e.g. a prompt too long for the model).
    fn done(&mut self, key: usize, out: Result<GenOutput, BackendError>);
    /// Polled between decode steps: `true` stops request `key` ([`FinishReason::Cancelled`]).
    fn cancelled(&self, key: usize) -> bool;
}

/// [`Generator::generate_fed`] for backends without continuous batching: batches of up to
/// `max_batch` waiting requests, each run to its end through `generate_cancellable`. A request
/// the backend rejects as invalid fails alone (its batch is rerun one request at a time); any
/// other error fails every request of that batch; the next batch runs either way.
pub fn generate_fed_in_batches<G: Generator + ?Sized>(
    g: &G,
    feed: &mut dyn RequestFeed,
) -> Result<(), BackendError> {
    loop {
        let (mut keys, mut reqs) = (Vec::new(), Vec::new());
        while reqs.len() < g.max_batch().max(1) {
            match feed.next() {
                Some((k, r)) => {
                    keys.push(k);
                    reqs.push(r);
                }
                None => break,
            }
        }
        if reqs.is_empty() {
            return Ok(());
        }
        run_fed_batch(g, feed, &keys, &reqs);
    }
}

fn run_fed_batch<G: Generator + ?Sized>(
    g: &G,
    feed: &mut dyn RequestFeed,
    keys: &[usize],
    reqs: &[GenRequest],
) {
    let result = {
        let shared = std::sync::Mutex::new(&mut *feed);
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        g.generate_cancellable(reqs, &mut |i, piece| lock().piece(keys[i], piece), &|i| {
            keys.get(i).is_some_and(|&k| lock().cancelled(k))
        })
    };
    match result {
        Ok(outs) if outs.len() == reqs.len() => {
            for (&k, o) in keys.iter().zip(outs) {
                feed.done(k, Ok(o));
            }
        }
        Ok(outs) => {
            let e = BackendError::Other(format!(
                "the generator returned {} outputs for {} requests",
                outs.len(),
                reqs.len()
            ));
            for &k in keys {
                feed.done(k, Err(e.clone()));
            }
        }
        Err(BackendError::Invalid(_)) if reqs.len() > 1 => {
            for (k, r) in keys.iter().zip(reqs) {
                run_fed_batch(g, feed, std::slice::from_ref(k), std::slice::from_ref(r));
            }
        }
        Err(e) => {
            for &k in keys {
                feed.done(k, Err(e.clone()));
            }
        }
    }
}

/// A text generator. Implementations batch the requests they are given as they see fit.
pub trait Generator: Send + Sync {
    /// A name for logs and for `/v1/models`.
    fn model_id(&self) -> &str;

    /// Generates one output per request, in order.
    fn generate(&self, requests: &[GenRequest]) -> Result<Vec<GenOutput>, BackendError> {
        self.generate_streaming(requests, &mut |_, _| {})
    }

    /// Like `generate`, calling `sink` with every decoded piece as soon as it is known.
    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError>;

    /// Like `generate_streaming`, stopping request `i` early, with [`FinishReason::Cancelled`],
    /// once `cancelled(i)` is true; the other requests of the batch go on. Backends that can stop
    /// mid-generation (the local engine) poll it before every decode step; the default, for those
    /// that cannot (a remote server, test doubles), never stops early.
    fn generate_cancellable(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
        cancelled: CancelCheck<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        let _ = cancelled;
        self.generate_streaming(requests, sink)
    }

    /// Runs requests taken from `feed` until none is waiting and none is running: what
    /// `safetune serve`'s scheduler calls. The local engine batches continuously (a finished
    /// row's slot takes the next waiting request at once); the default runs batches of
    /// [`Generator::max_batch`] ([`generate_fed_in_batches`]). Returns an error only when the
    /// generator itself failed; the requests it was running then get no result from it.
    fn generate_fed(&self, feed: &mut dyn RequestFeed) -> Result<(), BackendError> {
        generate_fed_in_batches(self, feed)
    }

    /// The most requests this backend wants in one call (the local engine's batch size).
    fn max_batch(&self) -> usize {
        1
    }

    /// How many tokens `prompt` is, for backends that can tell cheaply (a local model);
    /// `None` when this one cannot (a remote server checks its own limits).
    fn prompt_tokens(&self, _prompt: &Prompt) -> Option<Result<usize, BackendError>> {
        None
    }

    /// The model's context length in tokens, when known.
    fn context_length(&self) -> Option<usize> {
        None
    }
}
