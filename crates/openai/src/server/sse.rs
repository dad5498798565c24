//! Streamed answers: a `text/event-stream` response written event by event as the scheduler
//! sends decoded pieces, for chat and plain completions alike.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use super::handlers::{usage, Collector, Endpoint, Meta, PEER_CHECK};
use super::http::Request;
use super::routes::HttpError;
use super::scheduler::Event;
use crate::protocol::{sse_event, SSE_DONE};

/// Streams a job's answer at endpoint `E`: each choice's opening event (if `E` has one), one
/// event per decoded piece, one finishing event per choice, a usage event when asked for, and an
/// error event instead if generation fails or the scheduler goes away; then `[DONE]`. A client
/// that goes away (a failed write, or a closed socket seen between events) cancels the job.
pub(super) fn stream<E: Endpoint>(
    request: &mut Request<'_>,
    rx: &mpsc::Receiver<Event>,
    cancel: &AtomicBool,
    meta: &Meta,
    count: usize,
    n: u32,
    include_usage: bool,
) {
    let http11 = request.is_http11();
    let Some(w) = request.start_stream() else {
        cancel.store(true, Ordering::SeqCst);
        return;
    };
    let mut out = SseWriter {
        out: w,
        chunked: http11,
        broken: false,
    };
    for i in 0..count {
        if let Some(first) = E::opening(i as u32) {
            out.event(&E::chunk(meta, vec![first], None));
        }
    }
    let mut got = Collector::new(count);
    let mut checked = Instant::now();
    loop {
        if checked.elapsed() >= PEER_CHECK {
            checked = Instant::now();
            if out.peer_gone() {
                out.broken = true;
            }
        }
        if out.broken {
            break;
        }
        match rx.recv_timeout(PEER_CHECK) {
            Ok(Event::Piece(i, text)) => {
                out.event(&E::chunk(meta, vec![E::piece(i as u32, text)], None));
            }
            Ok(Event::Part(start, Ok(part))) => {
                for (k, o) in part.iter().enumerate() {
                    out.event(&E::chunk(
                        meta,
                        vec![E::finished((start + k) as u32, o)],
                        None,
                    ));
                }
                if let Some(outs) = got.add(start, part) {
                    if include_usage {
                        out.event(&E::chunk(meta, Vec::new(), Some(usage(&outs, n))));
                    }
                    break;
                }
            }
            Ok(Event::Part(_, Err(e))) => {
                cancel.store(true, Ordering::SeqCst);
                out.event(&HttpError::from_backend(e).body);
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                out.event(&HttpError::scheduler_gone().body);
                break;
            }
        }
    }
    let broken = out.finish();
    if broken {
        cancel.store(true, Ordering::SeqCst);
        request.stream_broken();
    }
}

/// Writes a `text/event-stream` response event by event, flushing each one, in HTTP/1.1 chunked
/// encoding (or until close on HTTP/1.0).
struct SseWriter<'a> {
    out: &'a mut TcpStream,
    chunked: bool,
    broken: bool,
}

impl SseWriter<'_> {
    fn raw(&mut self, data: &str) {
        if self.broken {
            return;
        }
        let r = if self.chunked {
            let framed = format!("{:x}\r\n{data}\r\n", data.len());
            self.out.write_all(framed.as_bytes())
        } else {
            self.out.write_all(data.as_bytes())
        };
        // A client that went away is not an error of ours: stop writing; the caller cancels.
        if r.and_then(|_| self.out.flush()).is_err() {
            self.broken = true;
        }
    }

    fn event<T: serde::Serialize>(&mut self, value: &T) {
        self.raw(&sse_event(value));
    }

    /// True when the peer has closed its side.
    fn peer_gone(&mut self) -> bool {
        super::http::socket_closed(self.out)
    }

    /// Ends the stream; true when it broke on the way.
    fn finish(mut self) -> bool {
        self.raw(SSE_DONE);
        if self.chunked
            && !self.broken
            && self
                .out
                .write_all(b"0\r\n\r\n")
                .and_then(|_| self.out.flush())
                .is_err()
        {
            self.broken = true;
        }
        self.broken
    }
}
