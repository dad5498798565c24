//! A fault-injection HTTP server on loopback, for the retry tests of every HTTP client here and
//! in safetune-eval: std's `TcpListener` on `127.0.0.1:0` answering each request, one per
//! connection, with the next canned [`Fault`] of a script, then with a fixed success body.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One canned misbehaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An error status (429, 500, 503, ...) with an optional raw `Retry-After` value.
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// A 200 whose `Content-Length` promises more than is sent before the connection closes.
    TruncatedBody,
    /// The connection closed with no answer at all.
    Drop,
}

impl Fault {
    /// `code` with `Retry-After: value`.
    pub fn status(code: u16, retry_after: &str) -> Fault {
        Fault::Status {
            code,
            retry_after: Some(retry_after.to_string()),
        }
    }
}

/// The server; it stops answering when dropped.
pub struct FaultServer {
    addr: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    /// Answers requests with `script` in order, then every further one with 200 and `ok_body`;
    /// with `repeat`, the script's last fault forever instead of the body.
    pub fn start(script: Vec<Fault>, ok_body: &str, repeat: bool) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = format!("http://{}", listener.local_addr().expect("local address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let last = script.last().cloned();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let ok_body = ok_body.to_string();
        let (req2, stop2) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let next = script.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let fault = match (next, repeat) {
                    (Some(f), _) => Some(f),
                    (None, true) => last.clone(),
                    (None, false) => None,
                };
                req2.fetch_add(1, Ordering::SeqCst);
                let ok_body = ok_body.clone();
                std::thread::spawn(move || answer(stream, fault, &ok_body));
            }
        });
        FaultServer {
            addr,
            requests,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> &str {
        &self.addr
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads one request (head and `Content-Length` body), then answers it as `fault` says.
/// Reads one HTTP/1.1 request (request line, headers, a `Content-Length` body) and returns its
/// body: `None` when the peer closed first or the body was cut short. For test servers.
pub fn read_request_body(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(body)
}

fn answer(stream: TcpStream, fault: Option<Fault>, ok_body: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(read_half);
    if read_request_body(&mut r).is_none() {
        return;
    }
    let mut s = stream;
    let reply = match fault {
        None => response("200 OK", None, ok_body, ok_body.len()),
        Some(Fault::Status { code, retry_after }) => {
            let text =
                r#"{"error":{"message":"injected fault","type":"x","param":null,"code":null}}"#;
            response(
                &format!("{code} Fault"),
                retry_after.as_deref(),
                text,
                text.len(),
            )
        }
        Some(Fault::TruncatedBody) => {
            let cut = &ok_body[..ok_body.len() / 2];
            response("200 OK", None, cut, ok_body.len())
        }
        Some(Fault::Drop) => return,
    };
    let _ = s.write_all(reply.as_bytes());
    let _ = s.flush();
}

fn response(status: &str, retry_after: Option<&str>, body: &str, length: usize) -> String {
    let ra = retry_after.map_or(String::new(), |v| format!("Retry-After: {v}\r\n"));
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{ra}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}"
    )
}
