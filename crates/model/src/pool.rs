//! A small thread pool for the many short parallel regions of a decode step (about five per
//! layer, each tens to hundreds of microseconds at batch 1). Its workers spin for a while after
//! each region before they sleep, so the next region finds them awake: rayon parks idle workers
//! at once and waking them costs more than such a region's work (batch-1 decoding of SmolLM2 ran
//! at 111-116 tokens/s through rayon and 172-179 through a spinning pool, on two cores).
//!
//! Unlike a barrier pool, work is handed out a chunk at a time from a shared counter, and the
//! calling thread takes chunks too: a worker that the OS has descheduled (the machine shared with
//! other processes) holds up at most the one chunk it took, never the whole region. Workers stop
//! spinning after `SPIN` without work, so an idle process does not hold the cores.
//!
//! Calls from inside a region, or while another thread's region runs, run on the calling thread
//! alone.
//!
//! Decoding reaches the pool through `par_chunks`, where the `SAFETUNE_POOL` switch can send it
//! to rayon's pool or candle's barrier pool instead.

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps spinning before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// One parallel region: `f` over `0..n_items` in chunks of `chunk`.
struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync),
    n_items: usize,
    chunk: usize,
    /// Next chunk to hand out.
    next: AtomicUsize,
    /// Chunks finished (run, panicked or skipped after a panic).
    done: AtomicUsize,
    /// Set by the first chunk that panics; later chunks are skipped.
    failed: AtomicBool,
    /// The first panic's payload, re-raised on the calling thread once every chunk is done.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    fn chunks(&self) -> usize {
        self.n_items.div_ceil(self.chunk)
    }

    /// Takes and runs chunks until none is left. A panic in `f` is caught and kept for the
    /// caller, so a worker survives it and the chunk still counts as done (the caller waits for
    /// every chunk, then re-raises the panic).
    fn work(&self) {
        let total = self.chunks();
        loop {
            let c = self.next.fetch_add(1, SeqCst);
            if c >= total {
                return;
            }
            if !self.failed.load(SeqCst) {
                let range = c * self.chunk..((c + 1) * self.chunk).min(self.n_items);
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (self.f)(range))) {
                    self.failed.store(true, SeqCst);
                    let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(payload);
                }
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

struct Shared {
    /// The current job (type-erased `*const Job`), null between regions.
    job: AtomicPtr<()>,
    /// Bumped for every new job.
    generation: AtomicU64,
    /// Workers that may be reading `job`.
    active: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: &'static Shared,
    workers: usize,
    /// Held by the thread whose region runs.
    submit: Mutex<()>,
}

thread_local! {
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// The process's pool, with rayon's thread count (`RAYON_NUM_THREADS`) less the caller.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1) - 1))
    }

    fn new(workers: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("safetune-pool-{i}"))
                .spawn(move || worker(shared))
                .expect("spawning a pool thread");
        }
        Pool {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// Runs `f` over `0..n_items` split into ranges, the calling thread working too and
    /// returning when every range is done. If `f` panics, on any thread, the region still waits
    /// for every worker to leave it, skips the ranges not yet started, and then re-raises the
    /// first panic on the calling thread with its original payload; the pool stays usable.
    pub fn run(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if n_items == 0 {
            return;
        }
        let nested = IN_REGION.with(|c| c.get());
        let guard = if nested || self.workers == 0 {
            None
        } else {
            self.submit.try_lock().ok()
        };
        if guard.is_none() {
            f(0..n_items);
            return;
        }
        let threads = self.workers + 1;
        let job = Job {
            f,
            n_items,
            chunk: n_items.div_ceil(threads * 4).max(1),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            panic: Mutex::new(None),
        };
        let s = self.shared;
        s.job.store(&job as *const Job as *mut (), SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        IN_REGION.with(|c| c.set(true));
        job.work();
        IN_REGION.with(|c| c.set(false));
        let total = job.chunks();
        let mut spins = 0u32;
        while job.done.load(SeqCst) < total {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // No worker may touch `job` once this function returns.
        s.job.store(std::ptr::null_mut(), SeqCst);
        while s.active.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        drop(guard);
        let payload = job.panic.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(payload) = payload {
            resume_unwind(payload);
        }
    }
}

/// Runs `f` over `0..n_items` split into ranges on [`Pool::global`], the calling thread working
/// too and blocking until they are done: how decoding runs its parallel regions.
///
/// `SAFETUNE_POOL` (read once per process) picks another pool: `rayon` the rayon pool (its
/// workers sleep between regions: batch-1 decoding of SmolLM2 ran at 111-116 instead of 172-179
/// tokens/s on two cores), `barrier` candle's spinning pool (whose spin-waits for a descheduled
/// worker cost whole time slices when other processes share the cores: batch-1 decoding once fell
/// from about 25 to 4 tokens/s at a load average of 6). Any other value, or none, uses [`Pool`].
pub(crate) fn par_chunks<F: Fn(Range<usize>) + Sync>(n_items: usize, f: F) {
    match which() {
        Which::Spin => Pool::global().run(n_items, &f),
        Which::Rayon => {
            use rayon::prelude::*;
            let threads = rayon::current_num_threads().max(1);
            let chunk = n_items.div_ceil(threads * 4).max(1);
            (0..n_items.div_ceil(chunk))
                .into_par_iter()
                .for_each(|c| f(c * chunk..((c + 1) * chunk).min(n_items)));
        }
        Which::Barrier => candle_core::utils::barrier_pool().execute_chunked(n_items, f),
    }
}

/// The pool [`par_chunks`] uses.
#[derive(Clone, Copy, PartialEq)]
enum Which {
    Spin,
    Rayon,
    Barrier,
}

/// `SAFETUNE_POOL`, read once.
fn which() -> Which {
    static WHICH: OnceLock<Which> = OnceLock::new();
    *WHICH.get_or_init(|| match std::env::var("SAFETUNE_POOL").as_deref() {
        Ok("rayon") => Which::Rayon,
        Ok("barrier") => Which::Barrier,
        _ => Which::Spin,
    })
}

fn worker(s: &'static Shared) {
    IN_REGION.with(|c| c.set(true));
    // The generation when the pool was made, not when this thread first ran: a worker that
    // starts late (a loaded machine) still joins the regions already under way.
    let mut seen = 0;
    loop {
        // Spin for a while, then sleep until the next job.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(SeqCst) == seen {
            spins = spins.wrapping_add(1);
            std::hint::spin_loop();
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.generation.load(SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
        }
        seen = s.generation.load(SeqCst);
        s.active.fetch_add(1, SeqCst);
        let p = s.job.load(SeqCst) as *const Job;
        if !p.is_null() {
            // SAFETY: `run` keeps the job alive until it has cleared `job` and seen `active`
            // at zero; this worker raised `active` before it read the pointer.
            unsafe { (*p).work() };
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_with_nested_and_concurrent_callers() {
        let pool = Pool::new(2);
        for n in [1usize, 2, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|r: Range<usize>| {
                for i in r {
                    hits[i].fetch_add(1, SeqCst);
                    // A nested region runs inline.
                    pool.run(3, &|r2: Range<usize>| assert!(r2.end <= 3));
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n={n}");
        }
        // Several threads at once: one gets the pool, the others run alone; all finish.
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        pool.run(50, &|r: Range<usize>| {
                            total.fetch_add(r.len(), SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 200 * 50);
        // Workers asleep after a pause still wake for the next region.
        std::thread::sleep(Duration::from_millis(5));
        let count = AtomicUsize::new(0);
        pool.run(100, &|r: Range<usize>| {
            count.fetch_add(r.len(), SeqCst);
        });
        assert_eq!(count.load(SeqCst), 100);
    }

    /// Runs `body` on its own thread and waits at most 20 s for it: a region that never ends
    /// (a worker lost to a panic) fails the test instead of hanging it.
    fn within_20s<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(body());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the region did not return within 20 s")
    }

    /// Blocks the first chunk each thread runs until `n` distinct threads have started one (at
    /// most 10 s), so a region is known to run on the caller and every worker.
    struct Meet {
        threads: Mutex<Vec<std::thread::ThreadId>>,
        n: usize,
    }

    impl Meet {
        fn new(n: usize) -> Meet {
            Meet {
                threads: Mutex::new(Vec::new()),
                n,
            }
        }
        fn arrive(&self) {
            let me = std::thread::current().id();
            {
                let mut t = self.threads.lock().unwrap();
                if t.contains(&me) {
                    return;
                }
                t.push(me);
            }
            let start = Instant::now();
            while self.threads.lock().unwrap().len() < self.n
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fn met(&self) -> usize {
            self.threads.lock().unwrap().len()
        }
    }

    fn is_worker() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("safetune-pool-"))
    }

    /// A region where one thread (a worker, or the caller) panics while the others are still
    /// in their chunks: the panic comes back to the caller with its payload, only after no
    /// chunk is running any more.
    fn panicking_region(pool: &'static Pool, in_worker: bool) -> (String, usize, usize) {
        let meet = Meet::new(3);
        let inside = AtomicUsize::new(0);
        let panicked = AtomicBool::new(false);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(60, &|_r: Range<usize>| {
                meet.arrive();
                inside.fetch_add(1, SeqCst);
                if is_worker() == in_worker && !panicked.swap(true, SeqCst) {
                    inside.fetch_sub(1, SeqCst);
                    std::panic::panic_any(format!("boom in a worker: {in_worker}"));
                }
                // The others are still busy when the panic happens.
                std::thread::sleep(Duration::from_millis(30));
                inside.fetch_sub(1, SeqCst);
            })
        }));
        // Read at once: nothing may still run inside the region once it has unwound.
        let still_inside = inside.load(SeqCst);
        let payload = r.expect_err("the panic reached the caller");
        let msg = payload
            .downcast::<String>()
            .map(|b| *b)
            .unwrap_or_else(|_| "not the original String payload".into());
        (msg, still_inside, meet.met())
    }

    #[test]
    fn a_panic_in_a_worker_or_the_caller_reaches_the_caller_after_the_region_ends() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(2)));
        for in_worker in [true, false] {
            let (msg, still_inside, met) = within_20s(move || panicking_region(pool, in_worker));
            assert_eq!(msg, format!("boom in a worker: {in_worker}"));
            assert_eq!(met, 3, "the caller and both workers took part");
            assert_eq!(
                still_inside, 0,
                "the region unwound while chunks were running"
            );
        }
    }

    #[test]
    fn the_pool_keeps_all_its_workers_after_a_panic() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(2)));
        within_20s(move || {
            for round in 0..3 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    pool.run(40, &|r: Range<usize>| {
                        if is_worker() || r.start == 0 {
                            panic!("round {round}");
                        }
                    })
                }));
                assert!(r.is_err(), "round {round}");
            }
            // Every item of the next region runs once, on the caller and both workers.
            let meet = Meet::new(3);
            let hits: Vec<AtomicUsize> = (0..300).map(|_| AtomicUsize::new(0)).collect();
            pool.run(300, &|r: Range<usize>| {
                meet.arrive();
                for i in r {
                    hits[i].fetch_add(1, SeqCst);
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
            assert_eq!(meet.met(), 3, "a worker was lost");
        });
    }
}
