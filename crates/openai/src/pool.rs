//! `EndpointPool`: one [`Generator`] over several OpenAI-compatible servers of the same model
//! (vLLM replicas, llama.cpp servers, `safetune serve`), each with its own concurrency.
//!
//! Load balancing is by pull: every endpoint runs `concurrency` workers that take the next
//! request of the batch from one shared queue, so a faster server takes more requests and no
//! server ever has more than its concurrency in flight. A request whose endpoint fails (after
//! that client's own retries) goes back to the queue for the other endpoints, and the failing
//! endpoint stops taking work for the rest of the batch; the batch fails only when every
//! endpoint has failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use safetune_model::backend::{BackendError, GenOutput, GenRequest, Generator, TokenSink};

use crate::client::{ClientConfig, OpenAiClient, OpenAiSpec};

/// One server of a pool.
#[derive(Debug)]
pub struct PoolEndpoint {
    pub client: OpenAiClient,
    pub concurrency: usize,
    /// Requests this endpoint answered (over the pool's life).
    pub served: AtomicUsize,
}

#[derive(Debug)]
pub struct EndpointPool {
    endpoints: Vec<PoolEndpoint>,
    model: String,
}

struct Queue {
    pending: VecDeque<usize>,
    /// Requests taken and not yet finished or returned.
    in_flight: usize,
    alive: usize,
}

impl EndpointPool {
    /// A pool of `(base_url, concurrency)` servers all serving `model`. Base URLs follow the
    /// `openai:` spec rules (no path means `/v1`).
    pub fn new(
        model: &str,
        endpoints: &[(String, usize)],
        config: &ClientConfig,
    ) -> Result<EndpointPool, safetune_model::ModelError> {
        if endpoints.is_empty() {
            return Err(safetune_model::ModelError::Spec {
                spec: model.to_string(),
                message: "an endpoint pool needs at least one endpoint".into(),
            });
        }
        let mut eps = Vec::new();
        for (url, concurrency) in endpoints {
            let spec = OpenAiSpec::parse(&format!("openai:{url}#{model}"))?;
            let mut cfg = config.clone();
            cfg.concurrency = (*concurrency).max(1);
            eps.push(PoolEndpoint {
                client: OpenAiClient::try_new(spec, cfg)?,
                concurrency: (*concurrency).max(1),
                served: AtomicUsize::new(0),
            });
        }
        Ok(EndpointPool {
            endpoints: eps,
            model: model.to_string(),
        })
    }

    pub fn endpoints(&self) -> &[PoolEndpoint] {
        &self.endpoints
    }

    /// Requests answered by each endpoint, in order.
    pub fn served(&self) -> Vec<usize> {
        self.endpoints
            .iter()
            .map(|e| e.served.load(Ordering::SeqCst))
            .collect()
    }
}

impl Generator for EndpointPool {
    fn model_id(&self) -> &str {
        &self.model
    }

    /// The sum of the endpoints' concurrency.
    fn max_batch(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| e.concurrency)
            .sum::<usize>()
            .max(1)
    }

    fn generate_streaming(
        &self,
        requests: &[GenRequest],
        sink: TokenSink<'_>,
    ) -> Result<Vec<GenOutput>, BackendError> {
        let n = requests.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let results: Vec<Mutex<Option<GenOutput>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let queue = Mutex::new(Queue {
            pending: (0..n).collect(),
            in_flight: 0,
            alive: self.endpoints.len(),
        });
        let wake = Condvar::new();
        let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let sink = Mutex::new(sink);
        std::thread::scope(|scope| {
            for ep in &self.endpoints {
                let dead = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                for _ in 0..ep.concurrency.min(n) {
                    let dead = dead.clone();
                    let (queue, wake, results, errors, sink) =
                        (&queue, &wake, &results, &errors, &sink);
                    scope.spawn(move || loop {
                        // Take a request, or wait while others are in flight (one may come back).
                        let i = {
                            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                            loop {
                                if dead.load(Ordering::SeqCst) {
                                    return;
                                }
                                if let Some(i) = q.pending.pop_front() {
                                    q.in_flight += 1;
                                    break i;
                                }
                                if q.in_flight == 0 || q.alive == 0 {
                                    return;
                                }
                                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
                            }
                        };
                        let r = ep.client.generate_one(&requests[i]);
                        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                        q.in_flight -= 1;
                        match r {
                            Ok(out) => {
                                ep.served.fetch_add(1, Ordering::SeqCst);
                                if let Ok(mut s) = sink.lock() {
                                    (*s)(i, &out.text);
                                }
                                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                            }
                            Err(BackendError::Invalid(m)) => {
                                // The request itself is bad: no other server will take it.
                                errors
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(format!("invalid request: {m}"));
                                q.pending.clear();
                                q.alive = 0;
                                wake.notify_all();
                                return;
                            }
                            Err(e) => {
                                errors
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(format!("{}: {e}", ep.client.spec().base_url));
                                q.pending.push_back(i);
                                if !dead.swap(true, Ordering::SeqCst) {
                                    q.alive -= 1;
                                }
                                if q.alive == 0 {
                                    q.pending.clear();
                                }
                                wake.notify_all();
                                return;
                            }
                        }
                        wake.notify_all();
                    });
                }
            }
        });
        let mut outs = Vec::with_capacity(n);
        for slot in results {
            match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(o) => outs.push(o),
                None => {
                    let errs = errors.into_inner().unwrap_or_else(|e| e.into_inner());
                    return Err(BackendError::Unavailable(format!(
                        "every endpoint of the pool failed: {}",
                        errs.join("; ")
                    )));
                }
            }
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetune_model::backend::{Prompt, Sampling};
    use std::io::{BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    /// A minimal OpenAI chat server on loopback: answers after `delay`, records the most
    /// requests it had in flight at once. `fail` answers 500 to everything.
    struct Fake {
        url: String,
        max_in_flight: Arc<AtomicUsize>,
        served: Arc<AtomicUsize>,
    }

    fn fake(delay: Duration, fail: bool) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (inf, maxf, srv) = (in_flight.clone(), max_in_flight.clone(), served.clone());
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut s) = stream else { continue };
                let (inf, maxf, srv) = (inf.clone(), maxf.clone(), srv.clone());
                std::thread::spawn(move || loop {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    if crate::testing::read_request_body(&mut r).is_none() {
                        return;
                    }
                    let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                    maxf.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    inf.fetch_sub(1, Ordering::SeqCst);
                    let (status, text) = if fail {
                        (
                            "500 Internal Server Error",
                            r#"{"error":{"message":"down"}}"#.to_string(),
                        )
                    } else {
                        srv.fetch_add(1, Ordering::SeqCst);
                        ("200 OK", r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#.to_string())
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                });
            }
        });
        Fake {
            url,
            max_in_flight,
            served,
        }
    }

    fn reqs(n: usize) -> Vec<GenRequest> {
        (0..n)
            .map(|i| GenRequest {
                prompt: Prompt::Chat(vec![safetune_data::Message::user(format!("q{i}"))]),
                sampling: Sampling::default(),
            })
            .collect()
    }

    fn quick() -> ClientConfig {
        ClientConfig {
            max_retries: 0,
            initial_backoff: Duration::from_millis(1),
            ..Default::default()
        }
    }

    #[test]
    fn balances_over_endpoints_within_each_concurrency() {
        let fast = fake(Duration::from_millis(5), false);
        let slow = fake(Duration::from_millis(60), false);
        let pool = EndpointPool::new(
            "m",
            &[(fast.url.clone(), 3), (slow.url.clone(), 2)],
            &quick(),
        )
        .unwrap();
        assert_eq!(pool.max_batch(), 5);
        let outs = pool.generate(&reqs(40)).unwrap();
        assert_eq!(outs.len(), 40);
        assert!(outs.iter().all(|o| o.text == "ok"));
        let served = pool.served();
        assert_eq!(served.iter().sum::<usize>(), 40);
        assert_eq!(fast.served.load(Ordering::SeqCst), served[0]);
        assert_eq!(slow.served.load(Ordering::SeqCst), served[1]);
        // Both took work, the faster one more; neither exceeded its concurrency.
        assert!(served[1] >= 1 && served[0] > served[1], "{served:?}");
        assert!(fast.max_in_flight.load(Ordering::SeqCst) <= 3);
        assert!(slow.max_in_flight.load(Ordering::SeqCst) <= 2);
        assert!(fast.max_in_flight.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn a_failing_endpoint_hands_its_requests_to_the_others() {
        let good = fake(Duration::from_millis(2), false);
        let bad = fake(Duration::from_millis(2), true);
        let pool = EndpointPool::new(
            "m",
            &[(bad.url.clone(), 2), (good.url.clone(), 1)],
            &quick(),
        )
        .unwrap();
        let outs = pool.generate(&reqs(12)).unwrap();
        assert_eq!(outs.len(), 12);
        assert_eq!(pool.served(), vec![0, 12]);
        // Only down endpoints: the error names the servers.
        let pool = EndpointPool::new("m", &[(bad.url.clone(), 2)], &quick()).unwrap();
        let e = pool.generate(&reqs(3)).unwrap_err().to_string();
        assert!(e.contains("every endpoint") && e.contains(&bad.url), "{e}");
    }
}
