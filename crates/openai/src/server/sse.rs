//! Streamed answers: a `text/event-stream` response written event by event as the scheduler
//! sends decoded pieces, for chat and plain completions alike.

use std::io::Write;
use std::sync::mpsc;

use super::handlers::{usage, Endpoint, Meta};
use super::routes::HttpError;
use super::scheduler::Event;
use crate::protocol::{sse_event, SSE_DONE};

/// Streams a job's answer at endpoint `E`: each choice's opening event (if `E` has one), one
/// event per decoded piece, one finishing event per choice, a usage event when asked for, and an
/// error event instead if generation fails or the scheduler goes away; then `[DONE]`.
pub(super) fn stream<E: Endpoint>(
    request: tiny_http::Request,
    rx: &mpsc::Receiver<Event>,
    meta: &Meta,
    count: usize,
    n: u32,
    include_usage: bool,
) {
    let Some(mut out) = SseWriter::start(request) else {
        return;
    };
    for i in 0..count {
        if let Some(first) = E::opening(i as u32) {
            out.event(&E::chunk(meta, vec![first], None));
        }
    }
    loop {
        match rx.recv() {
            Ok(Event::Piece(i, text)) => {
                out.event(&E::chunk(meta, vec![E::piece(i as u32, text)], None));
            }
            Ok(Event::Done(Ok(outs))) => {
                for (i, o) in outs.iter().enumerate() {
                    out.event(&E::chunk(meta, vec![E::finished(i as u32, o)], None));
                }
                if include_usage {
                    out.event(&E::chunk(meta, Vec::new(), Some(usage(&outs, n))));
                }
                break;
            }
            Ok(Event::Done(Err(e))) => {
                out.event(&HttpError::from_backend(e).body);
                break;
            }
            Err(_) => {
                out.event(&HttpError::scheduler_gone().body);
                break;
            }
        }
    }
    out.finish();
}

/// Writes a `text/event-stream` response event by event, flushing each one, in HTTP/1.1 chunked
/// encoding (tiny_http's own chunked writer buffers, which would hold events back).
struct SseWriter {
    out: Box<dyn Write + Send>,
    chunked: bool,
    broken: bool,
}

impl SseWriter {
    fn start(request: tiny_http::Request) -> Option<SseWriter> {
        let http11 = *request.http_version() >= tiny_http::HTTPVersion(1, 1);
        let mut out = request.into_writer();
        let head = if http11 {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        };
        if out
            .write_all(head.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return None;
        }
        Some(SseWriter {
            out,
            chunked: http11,
            broken: false,
        })
    }

    fn raw(&mut self, data: &str) {
        if self.broken {
            return;
        }
        let r = if self.chunked {
            write!(self.out, "{:x}\r\n{data}\r\n", data.len())
        } else {
            self.out.write_all(data.as_bytes())
        };
        // A client that went away is not an error of ours: stop writing, let generation finish.
        if r.and_then(|_| self.out.flush()).is_err() {
            self.broken = true;
        }
    }

    fn event<T: serde::Serialize>(&mut self, value: &T) {
        self.raw(&sse_event(value));
    }

    fn finish(mut self) {
        self.raw(SSE_DONE);
        if self.chunked && !self.broken {
            let _ = self
                .out
                .write_all(b"0\r\n\r\n")
                .and_then(|_| self.out.flush());
        }
    }
}
