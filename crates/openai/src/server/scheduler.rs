//! The job queue and the scheduler thread: handlers queue jobs (one per HTTP generation request,
//! each of one or more generation requests); the scheduler waits up to `batch_wait_ms` for
//! requests to gather, then hands the generator a feed of the queue
//! ([`Generator::generate_fed`]). The generator takes requests one at a time as it has room:
//! the local engine batches continuously, so a request that arrives while others decode joins
//! the running batch at its next step, in the slot a finished row left; other generators take
//! batches of `max_batch`. Requests are taken round-robin over the queued jobs, one at a time,
//! so one large job does not hold the model while others wait; each finished request goes to its
//! job at once. A job whose client has gone is dropped before its next request is taken, and the
//! generator stops decoding its requests in flight within a token (the other jobs go on).
//!
//! Adapters: a job names the adapter it was queued for (`None`: the base) and carries that
//! adapter's generator. A run of the generator serves one adapter only: requests for different
//! adapters (or an adapter and the base) never share a forward pass. The job at the head of the
//! queue picks the run's adapter; once the head is a job for another adapter the run takes no
//! more requests, finishes those it runs, and the next run serves that adapter.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use safetune_model::backend::{
    BackendError, FinishReason, GenOutput, GenRequest, Generator, RequestFeed,
};

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
    /// The choices from `start` on (one each), or the failure of choice `start`.
    Part(usize, Result<Vec<GenOutput>, BackendError>),
}

/// One HTTP generation request: its generation requests (prompts x `n`), handed to the
/// generator one at a time, round-robin with the other jobs. Once `cancel` is set (the client
/// went away, or a request failed) its remaining requests are dropped and the generator stops
/// decoding those in flight, if it can.
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

/// The scheduler thread: runs the generator over the queue until it is closed and empty.
pub(super) fn run(shared: &Shared, base: Arc<dyn Generator>) {
    while let Some(adapter) = wait_for_work(shared) {
        let generator = match &adapter {
            Some((_, g)) => g.clone(),
            None => base.clone(),
        };
        shared.batches.fetch_add(1, Ordering::SeqCst);
        let mut feed = QueueFeed {
            shared,
            adapter: adapter.map(|(name, _)| name),
            in_flight: HashMap::new(),
            next_key: 0,
        };
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| generator.generate_fed(&mut feed)));
        let failure = match result {
            Ok(Ok(())) => BackendError::Other("the generator returned no output".into()),
            Ok(Err(e)) => e,
            Err(_) => BackendError::Other("the generator panicked".into()),
        };
        // Requests the generator took and never finished get its failure.
        for (_, t) in feed.in_flight.drain() {
            let _ = t.events.send(Event::Part(t.index, Err(failure.clone())));
        }
    }
}

/// Drops the cancelled and emptied jobs of the queue, counting their requests as cancelled.
fn drop_cancelled(shared: &Shared, q: &mut Queue) {
    let mut i = 0;
    while i < q.jobs.len() {
        let job = &q.jobs[i];
        if job.cancel.load(Ordering::SeqCst) || job.requests.is_empty() {
            let dropped = q.jobs.remove(i).expect("index in range");
            q.pending -= dropped.requests.len();
            shared
                .cancelled
                .fetch_add(dropped.requests.len() as u64, Ordering::SeqCst);
        } else {
            i += 1;
        }
    }
}

/// Blocks until there is work: the adapter of the job at the head of the queue, once
/// `max_batch` requests for it are queued, `batch_wait_ms` has passed since it was seen, or the
/// queue is closing. `None` once the queue is closed and empty.
fn wait_for_work(shared: &Shared) -> Option<Option<AdapterRef>> {
    let wait = Duration::from_millis(shared.config.batch_wait_ms);
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    let mut deadline: Option<Instant> = None;
    loop {
        drop_cancelled(shared, &mut q);
        let Some(head) = q.jobs.front() else {
            if q.closing {
                return None;
            }
            deadline = None;
            q = shared
                .wake
                .wait_timeout(q, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        };
        let adapter = head.adapter.clone();
        let name = head.adapter_name().map(String::from);
        let ready: usize = q
            .jobs
            .iter()
            .filter(|j| j.adapter_name() == name.as_deref())
            .map(|j| j.requests.len())
            .sum();
        let now = Instant::now();
        let deadline = *deadline.get_or_insert(now + wait);
        if ready >= shared.max_batch || now >= deadline || q.closing {
            return Some(adapter);
        }
        q = shared
            .wake
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Where a request taken by the generator sends its text and result.
struct Taken {
    /// Its index among its job's choices.
    index: usize,
    stream: bool,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
}

/// The queue as the generator sees it during one run: requests of the run's adapter, one at a
/// time, round-robin over the jobs, while the head of the queue is a job for that adapter.
struct QueueFeed<'a> {
    shared: &'a Shared,
    adapter: Option<String>,
    in_flight: HashMap<usize, Taken>,
    next_key: usize,
}

impl RequestFeed for QueueFeed<'_> {
    fn next(&mut self) -> Option<(usize, GenRequest)> {
        // The server's own cap on requests decoded together (`max_batch`).
        if self.in_flight.len() >= self.shared.max_batch {
            return None;
        }
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        drop_cancelled(self.shared, &mut q);
        let job = q.jobs.front_mut()?;
        if job.adapter_name() != self.adapter.as_deref() {
            return None;
        }
        let request = job.requests.pop_front()?;
        let taken = Taken {
            index: job.next,
            stream: job.stream,
            events: job.events.clone(),
            cancel: job.cancel.clone(),
        };
        job.next += 1;
        q.pending -= 1;
        // Round-robin: a job with more requests goes to the back of the queue.
        let job = q.jobs.pop_front().expect("the front job");
        if !job.requests.is_empty() {
            q.jobs.push_back(job);
        }
        let key = self.next_key;
        self.next_key += 1;
        self.in_flight.insert(key, taken);
        Some((key, request))
    }

    fn piece(&mut self, key: usize, piece: &str) {
        if let Some(t) = self.in_flight.get(&key) {
            if t.stream && !piece.is_empty() {
                let _ = t.events.send(Event::Piece(t.index, piece.to_string()));
            }
        }
    }

    fn done(&mut self, key: usize, out: Result<GenOutput, BackendError>) {
        let Some(t) = self.in_flight.remove(&key) else {
            return;
        };
        match out {
            // Stopped mid-decode because the client went away: no one waits for it.
            Ok(o) if o.finish_reason == FinishReason::Cancelled => {
                self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            Ok(o) => {
                let _ = t.events.send(Event::Part(t.index, Ok(vec![o])));
            }
            Err(e) => {
                let _ = t.events.send(Event::Part(t.index, Err(e)));
            }
        }
    }

    fn cancelled(&self, key: usize) -> bool {
        self.in_flight
            .get(&key)
            .is_some_and(|t| t.cancel.load(Ordering::SeqCst))
    }
}
