//! The job queue and the scheduler thread: handlers queue jobs (one per HTTP generation request,
//! each of one or more generation requests), the scheduler packs them into batches of at most
//! `max_batch` generation requests, waiting up to `batch_wait_ms` for a batch to fill, runs each
//! batch through the generator and sends every job its events.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use safetune_model::backend::{BackendError, GenOutput, GenRequest, Generator};

use super::Shared;

#[derive(Default)]
pub(super) struct Queue {
    jobs: VecDeque<Job>,
    /// Set at shutdown: no new jobs; the scheduler exits once the queue is empty.
    closing: bool,
}

/// What a job's handler hears from the scheduler.
pub(super) enum Event {
    /// Choice `i` decoded more text (streamed jobs only).
    Piece(usize, String),
    /// Every choice finished (one output per generation request), or the batch failed.
    Done(Result<Vec<GenOutput>, BackendError>),
}

pub(super) struct Job {
    pub(super) requests: Vec<GenRequest>,
    pub(super) stream: bool,
    pub(super) events: mpsc::Sender<Event>,
}

pub(super) enum EnqueueError {
    /// `max_queue` jobs are waiting already.
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
        if q.jobs.len() >= self.config.max_queue {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(EnqueueError::Full);
        }
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
pub(super) fn run(shared: &Shared, generator: &dyn Generator) {
    while let Some(batch) = take_batch(shared) {
        run_batch(shared, generator, batch);
    }
}

/// Blocks for the next batch: the first job, then more while they fit, waiting up to
/// `batch_wait_ms` to fill. `None` once the queue is closed and empty.
fn take_batch(shared: &Shared) -> Option<Vec<Job>> {
    let wait = Duration::from_millis(shared.config.batch_wait_ms);
    let mut batch: Vec<Job> = Vec::new();
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    while q.jobs.is_empty() {
        if q.closing {
            return None;
        }
        q = shared
            .wake
            .wait_timeout(q, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let deadline = Instant::now() + wait;
    let mut size = 0usize;
    loop {
        while let Some(front) = q.jobs.front() {
            let n = front.requests.len();
            if !batch.is_empty() && size + n > shared.max_batch {
                break;
            }
            size += n;
            batch.push(q.jobs.pop_front().expect("front exists"));
        }
        let now = Instant::now();
        if size >= shared.max_batch || !q.jobs.is_empty() || now >= deadline || q.closing {
            return Some(batch);
        }
        q = shared
            .wake
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn run_batch(shared: &Shared, generator: &dyn Generator, batch: Vec<Job>) {
    shared.batches.fetch_add(1, Ordering::SeqCst);
    match generate(generator, &batch) {
        Ok(outs) => {
            let mut outs = outs.into_iter();
            for job in &batch {
                let mine: Vec<GenOutput> = outs.by_ref().take(job.requests.len()).collect();
                let _ = job.events.send(Event::Done(Ok(mine)));
            }
        }
        // One request's own fault (too long, bad settings) must not fail the others it was
        // batched with: run each job alone so only the faulty one gets the 400.
        Err(BackendError::Invalid(_)) if batch.len() > 1 => {
            for job in batch {
                run_batch(shared, generator, vec![job]);
            }
        }
        Err(e) => {
            for job in &batch {
                let _ = job.events.send(Event::Done(Err(copy_error(&e))));
            }
        }
    }
}

/// One generator call for every request of `batch`, streaming pieces to the jobs that asked for
/// them; a panic or a wrong number of outputs becomes an error.
fn generate(generator: &dyn Generator, batch: &[Job]) -> Result<Vec<GenOutput>, BackendError> {
    // Flatten, remembering which job and choice each request belongs to.
    let mut requests = Vec::new();
    let mut owner: Vec<(usize, usize)> = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        for (i, r) in job.requests.iter().enumerate() {
            requests.push(r.clone());
            owner.push((j, i));
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
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        generator.generate_streaming(&requests, &mut sink)
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
