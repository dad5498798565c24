//! The job queue and the scheduler thread: handlers queue jobs (one per HTTP generation request,
//! each of one or more generation requests), the scheduler packs them into batches of at most
//! `max_batch` generation requests (splitting a larger job into parts, served round-robin with
//! the other jobs), waiting up to `batch_wait_ms` for a batch to fill, runs each batch through
//! the generator and sends every job its events. A job whose client has gone is dropped before
//! its next part, and the generator stops decoding its part in flight within a token (the other
//! jobs of that batch go on).
//!
//! Adapters: a job names the adapter it was queued for (`None`: the base) and carries that
//! adapter's generator. A batch holds jobs of one adapter only: requests for different adapters
//! (or an adapter and the base) never share a forward pass. The first job in the queue picks
//! the batch's adapter; jobs for other adapters stay queued, in order, for the next batches.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use safetune_model::backend::{BackendError, FinishReason, GenOutput, GenRequest, Generator};

use super::Shared;

#[derive(Default)]
pub(super) struct Queue {
    jobs: VecDeque<Job>,
    /// Generation requests not yet handed to the generator, over all queued jobs.
    pending: usize,
    /// Set at shutdown: no new jobs; the scheduler exits once the queue is empty.
    closing: bool,
}

/// An adapter a job asked for: its served name and the generator that applies it.
pub(super) type AdapterRef = (String, Arc<dyn Generator>);

/// What a job's handler hears from the scheduler.
pub(super) enum Event {
    /// Choice `i` (of the whole job) decoded more text (streamed jobs only).
    Piece(usize, String),
    /// The choices from `start` on, one output per generation request of that part, or the
    /// part's failure.
    Part(usize, Result<Vec<GenOutput>, BackendError>),
}

/// One HTTP generation request: its generation requests (prompts x `n`), handed to the
/// generator in parts of at most `max_batch`, round-robin with the other jobs, so one large
/// job does not hold the model while others wait. Once `cancel` is set (the client went away,
/// or a part failed) its remaining parts are dropped and the generator stops decoding the part
/// in flight, if it can.
pub(super) struct Job {
    pub(super) requests: VecDeque<GenRequest>,
    /// Index (in the job) of the first request still in `requests`.
    pub(super) next: usize,
    pub(super) stream: bool,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) cancel: Arc<AtomicBool>,
    /// The adapter it asked for (`None`: the base) and the generator that applies it.
    pub(super) adapter: Option<AdapterRef>,
}

impl Job {
    fn adapter_name(&self) -> Option<&str> {
        self.adapter.as_ref().map(|(n, _)| n.as_str())
    }
}

/// A part of a job in a batch.
struct Part {
    requests: Vec<GenRequest>,
    start: usize,
    stream: bool,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    adapter: Option<AdapterRef>,
}

pub(super) enum EnqueueError {
    /// `max_queue` jobs, or `max_queued_requests` generation requests, are waiting already.
    Full,
    /// The server is shutting down.
    Closing,
}

impl Shared {
    /// Queues `job` unless the queue is full or closing (a full queue counts a rejection).
    pub(super) fn enqueue(&self, job: Job) -> Result<(), EnqueueError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closing {
            return Err(EnqueueError::Closing);
        }
        let n = job.requests.len();
        // A job alone is always let into an empty queue: its size was checked against the
        // per-request limits already.
        let over_requests = q.pending > 0 && q.pending + n > self.config.max_queued_requests;
        if q.jobs.len() >= self.config.max_queue || over_requests {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(EnqueueError::Full);
        }
        q.pending += n;
        q.jobs.push_back(job);
        drop(q);
        self.wake.notify_all();
        Ok(())
    }

    /// Jobs waiting now.
    pub(super) fn queued(&self) -> usize {
        self.queue.lock().map(|q| q.jobs.len()).unwrap_or(0)
    }

    /// Refuses new jobs; the scheduler finishes the queued ones, then exits.
    pub(super) fn close_queue(&self) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.closing = true;
        }
        self.wake.notify_all();
    }
}

/// The scheduler thread: runs batches until the queue is closed and empty.
pub(super) fn run(shared: &Shared, base: Arc<dyn Generator>) {
    while let Some(batch) = take_batch(shared) {
        // Every part of a batch asked for the same adapter.
        let generator = match batch.first().and_then(|p| p.adapter.as_ref()) {
            Some((_, g)) => g.clone(),
            None => base.clone(),
        };
        run_batch(shared, generator.as_ref(), batch);
    }
}

/// Blocks for the next batch: parts of the queued jobs for one adapter (the first job's) while
/// they fit, waiting up to `batch_wait_ms` to fill. A job that fits whole goes whole; the first
/// job of a batch gives at most `max_batch` requests, and if it has more it goes to the back of
/// the queue. Jobs for other adapters are passed over and keep their place. Cancelled jobs are
/// dropped. `None` once the queue is closed and empty.
fn take_batch(shared: &Shared) -> Option<Vec<Part>> {
    let wait = Duration::from_millis(shared.config.batch_wait_ms);
    let max = shared.max_batch;
    let mut batch: Vec<Part> = Vec::new();
    // The adapter of this batch, once its first part is taken.
    let mut adapter: Option<Option<String>> = None;
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    let mut deadline: Option<Instant> = None;
    let mut size = 0usize;
    loop {
        let mut i = 0;
        while i < q.jobs.len() {
            let job = &q.jobs[i];
            if job.cancel.load(Ordering::SeqCst) || job.requests.is_empty() {
                let dropped = q.jobs.remove(i).expect("index in range");
                q.pending -= dropped.requests.len();
                shared
                    .cancelled
                    .fetch_add(dropped.requests.len() as u64, Ordering::SeqCst);
                continue;
            }
            if adapter
                .as_ref()
                .is_some_and(|a| a.as_deref() != job.adapter_name())
            {
                i += 1;
                continue;
            }
            let left = job.requests.len();
            if !batch.is_empty() && size + left > max {
                break;
            }
            let take = left.min(max - size);
            let job = &mut q.jobs[i];
            let requests: Vec<GenRequest> = job.requests.drain(..take).collect();
            batch.push(Part {
                requests,
                start: job.next,
                stream: job.stream,
                events: job.events.clone(),
                cancel: job.cancel.clone(),
                adapter: job.adapter.clone(),
            });
            adapter = Some(job.adapter_name().map(String::from));
            job.next += take;
            size += take;
            q.pending -= take;
            let job = q.jobs.remove(i).expect("index in range");
            if !job.requests.is_empty() {
                q.jobs.push_back(job);
                break;
            }
            if size >= max {
                break;
            }
        }
        if batch.is_empty() {
            if q.closing && q.jobs.is_empty() {
                return None;
            }
            q = shared
                .wake
                .wait_timeout(q, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let now = Instant::now();
        let deadline = *deadline.get_or_insert(now + wait);
        if size >= max || !q.jobs.is_empty() || now >= deadline || q.closing {
            return Some(batch);
        }
        q = shared
            .wake
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn run_batch(shared: &Shared, generator: &dyn Generator, batch: Vec<Part>) {
    shared.batches.fetch_add(1, Ordering::SeqCst);
    match generate(generator, &batch) {
        Ok(outs) => {
            let mut outs = outs.into_iter();
            for part in &batch {
                let mine: Vec<GenOutput> = outs.by_ref().take(part.requests.len()).collect();
                // Stopped mid-decode because the client went away: no one waits for these.
                let stopped = mine
                    .iter()
                    .filter(|o| o.finish_reason == FinishReason::Cancelled)
                    .count();
                if stopped > 0 {
                    shared.cancelled.fetch_add(stopped as u64, Ordering::SeqCst);
                    continue;
                }
                let _ = part.events.send(Event::Part(part.start, Ok(mine)));
            }
        }
        // One request's own fault (too long, bad settings) must not fail the others it was
        // batched with: run each part alone so only the faulty one gets the 400.
        Err(BackendError::Invalid(_)) if batch.len() > 1 => {
            for part in batch {
                run_batch(shared, generator, vec![part]);
            }
        }
        Err(e) => {
            for part in &batch {
                let _ = part
                    .events
                    .send(Event::Part(part.start, Err(copy_error(&e))));
            }
        }
    }
}

/// One generator call for every request of `batch`, streaming pieces to the jobs that asked for
/// them; a panic or a wrong number of outputs becomes an error.
fn generate(generator: &dyn Generator, batch: &[Part]) -> Result<Vec<GenOutput>, BackendError> {
    // Flatten, remembering which part and choice (in its job) each request belongs to.
    let mut requests = Vec::new();
    let mut owner: Vec<(usize, usize)> = Vec::new();
    for (j, part) in batch.iter().enumerate() {
        for (i, r) in part.requests.iter().enumerate() {
            requests.push(r.clone());
            owner.push((j, part.start + i));
        }
    }
    let mut sink = |idx: usize, piece: &str| {
        if let Some(&(j, i)) = owner.get(idx) {
            let job = &batch[j];
            if job.stream && !piece.is_empty() {
                let _ = job.events.send(Event::Piece(i, piece.to_string()));
            }
        }
    };
    // Polled by the generator between decode steps: a job whose client went away stops there.
    let cancelled = |idx: usize| {
        owner
            .get(idx)
            .is_some_and(|&(j, _)| batch[j].cancel.load(Ordering::SeqCst))
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        generator.generate_cancellable(&requests, &mut sink, &cancelled)
    }));
    match result {
        Ok(Ok(outs)) if outs.len() == requests.len() => Ok(outs),
        Ok(Ok(outs)) => Err(BackendError::Other(format!(
            "the generator returned {} outputs for {} requests",
            outs.len(),
            requests.len()
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BackendError::Other("the generator panicked".into())),
    }
}

/// `BackendError` is not `Clone`; every job of a failed batch gets its own copy.
fn copy_error(e: &BackendError) -> BackendError {
    match e {
        BackendError::Invalid(m) => BackendError::Invalid(m.clone()),
        BackendError::Unavailable(m) => BackendError::Unavailable(m.clone()),
        BackendError::Other(m) => BackendError::Other(m.clone()),
    }
}
