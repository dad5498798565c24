//! The HTTP/1.1 layer the server owns: std's `TcpListener`, one thread per connection, request
//! heads parsed with `httparse`, bodies by `Content-Length`, keep-alive, and a deadline on every
//! read and write.
//!
//! Why not tiny_http (used before): it has no socket timeouts, spawns a thread per connection
//! without a bound, and its accept thread ends for good on the first accept error. Owning the
//! socket gives each of those to us: a whole request head and body must arrive within
//! `read_timeout`, a keep-alive connection is closed after `idle_timeout` without a request,
//! every write gives up after `write_timeout`, and the accept loop (in `mod.rs`) is ours.
//!
//! Public so that other local servers of the workspace (`safetune view`, in safetune-study)
//! read requests with the same limits and deadlines instead of a second HTTP stack: accept a
//! `TcpStream`, wrap it in [`Conn::new`], loop on [`Conn::next_request`], check the head with
//! [`super::guard`], [`Request::read_body`], [`Request::respond`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// How often a wait for the next request checks whether the server is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One accepted connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// When the next request head started arriving (the deadline of its head and body).
    started: Instant,
    read_timeout: Duration,
}

/// Why no request could be read from a connection.
pub enum HeadError {
    /// The peer closed, stayed idle too long, or the server is stopping: close quietly.
    Closed,
    /// The head did not arrive within `read_timeout`: answer 408 and close.
    Timeout,
    /// Over [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`]: answer 431 and close.
    TooLarge,
    /// Not HTTP/1.x: answer 400 and close.
    Malformed(String),
}

/// A parsed request head, with the connection to read its body from and answer on.
pub struct Request<'a> {
    method: String,
    url: String,
    http11: bool,
    headers: Vec<(String, String)>,
    content_length: Option<usize>,
    chunked: bool,
    body_read: bool,
    /// Set when the connection must close after the answer (the client asked, HTTP/1.0, or the
    /// body was not read).
    close: bool,
    responded: bool,
    conn: &'a mut Conn,
}

impl Conn {
    /// Wraps an accepted stream, with its write timeout set.
    pub fn new(
        stream: TcpStream,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(write_timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn {
            reader,
            writer: stream,
            started: Instant::now(),
            read_timeout,
        })
    }

    /// Reads the next request head. The first byte must come within `idle` (checking `stop`
    /// every 100 ms); then the whole head (and later the body) within `read_timeout`. For the
    /// first request of a connection the clock starts at accept.
    pub fn next_request(
        &mut self,
        idle: Duration,
        first: bool,
        stop: &AtomicBool,
    ) -> Result<Request<'_>, HeadError> {
        let idle_deadline = Instant::now() + idle;
        if first {
            self.started = Instant::now();
        }
        // Wait for the first byte.
        loop {
            if !self.reader.buffer().is_empty() {
                break;
            }
            if stop.load(Ordering::SeqCst) {
                return Err(HeadError::Closed);
            }
            let now = Instant::now();
            let deadline = if first {
                self.started + self.read_timeout
            } else {
                idle_deadline
            };
            if now >= deadline {
                return Err(if first {
                    HeadError::Timeout
                } else {
                    HeadError::Closed
                });
            }
            let wait = (deadline - now).min(STOP_POLL);
            if self.reader.get_ref().set_read_timeout(Some(wait)).is_err() {
                return Err(HeadError::Closed);
            }
            match self.reader.fill_buf() {
                Ok([]) => return Err(HeadError::Closed),
                Ok(_) => break,
                Err(e) if is_timeout(&e) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(HeadError::Closed),
            }
        }
        if !first {
            self.started = Instant::now();
        }
        let head = self.read_head()?;
        self.parse(&head)
    }

    /// Reads up to and including the blank line that ends a head.
    fn read_head(&mut self) -> Result<Vec<u8>, HeadError> {
        let mut head: Vec<u8> = Vec::new();
        loop {
            self.arm_read_deadline().map_err(|_| HeadError::Timeout)?;
            let avail = match self.reader.fill_buf() {
                Ok([]) => return Err(HeadError::Closed),
                Ok(b) => b,
                Err(e) if is_timeout(&e) => return Err(HeadError::Timeout),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(HeadError::Closed),
            };
            let old = head.len();
            head.extend_from_slice(avail);
            let from = old.saturating_sub(3);
            if let Some(p) = find(&head[from..], b"\r\n\r\n") {
                let end = from + p + 4;
                self.reader.consume(end - old);
                head.truncate(end);
                return Ok(head);
            }
            let n = avail.len();
            self.reader.consume(n);
            if head.len() > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
        }
    }

    fn parse(&mut self, head: &[u8]) -> Result<Request<'_>, HeadError> {
        if head.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HeadError::Malformed("incomplete request head".into()))
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(format!("malformed request: {e}"))),
        }
        let method = req.method.unwrap_or("").to_string();
        let url = req.path.unwrap_or("").to_string();
        let http11 = req.version == Some(1);
        let mut headers = Vec::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            let Ok(value) = std::str::from_utf8(h.value) else {
                return Err(HeadError::Malformed(format!(
                    "header {} is not UTF-8",
                    h.name
                )));
            };
            headers.push((h.name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut content_length = None;
        let mut chunked = false;
        for (name, value) in &headers {
            match name.as_str() {
                "content-length" => {
                    let n: usize = value.parse().map_err(|_| {
                        HeadError::Malformed(format!("Content-Length `{value}` is not a number"))
                    })?;
                    if content_length.is_some_and(|m| m != n) {
                        return Err(HeadError::Malformed(
                            "conflicting Content-Length headers".into(),
                        ));
                    }
                    content_length = Some(n);
                }
                "transfer-encoding" => chunked = true,
                _ => {}
            }
        }
        if chunked && content_length.is_some() {
            return Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding are set".into(),
            ));
        }
        let wants_close = headers.iter().any(|(n, v)| {
            n == "connection" && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        });
        Ok(Request {
            method,
            url,
            http11,
            close: !http11 || wants_close,
            headers,
            content_length,
            chunked,
            body_read: false,
            responded: false,
            conn: self,
        })
    }

    /// Sets the socket's read timeout to what is left of the current request's deadline.
    fn arm_read_deadline(&mut self) -> io::Result<()> {
        let left = (self.started + self.read_timeout).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "read deadline"));
        }
        self.reader.get_ref().set_read_timeout(Some(left))
    }

    /// Writes a canned error and closes, for requests refused before a [`Request`] exists.
    pub fn refuse(mut self, status: u16, body: &[u8], extra: &[(&str, &str)]) {
        let _ = write_response(&mut self.writer, false, status, extra, body, true);
        self.linger(Duration::from_millis(500));
    }

    /// Closes our side, then reads and drops what the client still sends (at most `wait`, at
    /// most 16 MiB), so that closing does not reset the connection before the client has read
    /// our answer (a reset makes the peer discard it).
    pub fn linger(&mut self, wait: Duration) {
        let _ = self.writer.flush();
        let _ = self.writer.shutdown(Shutdown::Write);
        let deadline = Instant::now() + wait;
        let mut sink = [0u8; 16 * 1024];
        let mut total = 0usize;
        while total < 16 << 20 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.reader.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    /// True when the peer has closed its side (or the socket failed): a client that went away.
    /// Data the client already sent (a pipelined request) does not count as gone.
    pub fn peer_gone(&mut self) -> bool {
        if !self.reader.buffer().is_empty() {
            return false;
        }
        socket_closed(&self.writer)
    }
}

/// True when the peer of `s` has closed its side (or the socket failed). Data waiting to be
/// read does not count as closed.
pub fn socket_closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    let restored = s.set_nonblocking(false).is_ok();
    match r {
        Ok(0) => true,
        Ok(_) => !restored,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            !restored
        }
        Err(_) => true,
    }
}

/// Why a body could not be read.
pub enum BodyError {
    /// Over the limit (by `Content-Length`, or by what arrived).
    TooLarge(usize),
    /// A chunked body (not supported: send `Content-Length`).
    Chunked,
    /// The client stopped sending before `read_timeout`, or closed.
    Timeout,
    Io,
}

impl<'a> Request<'a> {
    pub fn method(&self) -> &str {
        &self.method
    }
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn is_http11(&self) -> bool {
        self.http11
    }
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn body_length(&self) -> Option<usize> {
        self.content_length
    }
    /// Whether the connection will be kept open after this request's answer.
    pub fn keeps_alive(&self) -> bool {
        !self.close && (self.body_read || self.content_length.unwrap_or(0) == 0 && !self.chunked)
    }
    /// True when the request announced a body that was not read.
    pub fn body_unread(&self) -> bool {
        !self.body_read && (self.chunked || self.content_length.unwrap_or(0) > 0)
    }

    /// Closes the connection after the answer, lingering while the client sends what we did not
    /// read (see [`Conn::linger`]).
    pub fn finish_close(self) {
        if self.body_unread() {
            self.conn.linger(Duration::from_secs(2));
        }
    }

    /// Makes the answer close the connection.
    pub fn close_after(&mut self) {
        self.close = true;
    }

    /// Reads the whole body (at most `limit` bytes) before `read_timeout` runs out.
    pub fn read_body(&mut self, limit: usize) -> Result<Vec<u8>, BodyError> {
        if self.chunked {
            self.close = true;
            return Err(BodyError::Chunked);
        }
        let len = self.content_length.unwrap_or(0);
        if len > limit {
            self.close = true;
            return Err(BodyError::TooLarge(len));
        }
        // curl and others wait for a go-ahead before sending a large body.
        let expects = self
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects && self.http11 && len > 0 {
            let w = &mut self.conn.writer;
            if w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|_| w.flush())
                .is_err()
            {
                self.close = true;
                return Err(BodyError::Io);
            }
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            if self.conn.arm_read_deadline().is_err() {
                self.close = true;
                return Err(BodyError::Timeout);
            }
            match self.conn.reader.read(&mut body[got..]) {
                Ok(0) => {
                    self.close = true;
                    return Err(BodyError::Io);
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    self.close = true;
                    return Err(BodyError::Timeout);
                }
                Err(_) => {
                    self.close = true;
                    return Err(BodyError::Io);
                }
            }
        }
        self.body_read = true;
        Ok(body)
    }

    /// Answers with a whole body. A failed write closes the connection.
    pub fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        if self.responded {
            return;
        }
        self.responded = true;
        let close = !self.keeps_alive()
            || headers
                .iter()
                .any(|(k, v)| *k == "Connection" && *v == "close");
        if close {
            self.close = true;
        }
        let r = write_response(
            &mut self.conn.writer,
            self.http11,
            status,
            headers,
            body,
            close,
        );
        if r.is_err() {
            self.close = true;
        }
    }

    /// Starts a streamed `text/event-stream` answer (chunked on HTTP/1.1, until close on
    /// HTTP/1.0); `None` when the client is gone.
    pub fn start_stream(&mut self) -> Option<&mut TcpStream> {
        self.responded = true;
        let head = if self.http11 {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            self.close = true;
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        };
        let w = &mut self.conn.writer;
        if w.write_all(head.as_bytes())
            .and_then(|_| w.flush())
            .is_err()
        {
            self.close = true;
            return None;
        }
        Some(w)
    }

    /// Marks a streamed answer as broken: the connection closes after it.
    pub fn stream_broken(&mut self) {
        self.close = true;
    }

    /// True when the client has gone away (see [`Conn::peer_gone`]).
    pub fn peer_gone(&mut self) -> bool {
        self.conn.peer_gone()
    }
}

fn write_response(
    w: &mut TcpStream,
    http11: bool,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.{} {status} {}\r\nContent-Length: {}\r\n",
        u8::from(http11),
        reason(status),
        body.len()
    );
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
