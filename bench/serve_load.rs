//! Load test of `safetune serve`: well-behaved clients next to slow, oversized and vanishing
//! ones, against the server on 127.0.0.1 over a tiny random-weight Llama (what the tests build).
//!
//! `cargo run -p safetune-openai --example serve_load -- [SECONDS] [CLIENTS] [SLOW] [PER_IP]`
//! (defaults 40 s, 16 well-behaved clients, 64 slow ones, 256 connections per address: all
//! clients here share 127.0.0.1, so the default cap of 64 would count them together). A prober
//! asks `/health` every 200 ms. Well-behaved clients send chat
//! requests (16 new tokens) over keep-alive connections and retry on 429/503 after the
//! `Retry-After` they are given (cut to 50 ms); each request's latency runs from its first try to
//! its answer. Slow clients open a connection, send a head and a body byte every 500 ms, and are
//! cut off by the server's read deadline (2 s here); oversized clients send a million-prompt
//! list with n = 16, a 9 MiB body, a prompt over the token limit, and a 32-prompt job they walk
//! away from after 100 ms. Prints what was served and refused, p50/p99 latency, and exits 1
//! unless every well-behaved request completed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_openai::{start, ServeConfig};

#[derive(Default)]
struct Counts {
    served: AtomicU64,
    r429: AtomicU64,
    r503: AtomicU64,
    failed: AtomicU64,
    slow_cut: AtomicU64,
    slow_conns: AtomicU64,
    oversized: Mutex<Vec<(String, u16)>>,
    health_ok: AtomicU64,
    health_other: AtomicU64,
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("arguments are numbers: SECONDS CLIENTS SLOW")
        })
        .collect();
    let secs = args.first().copied().unwrap_or(40);
    let clients = args.get(1).copied().unwrap_or(16) as usize;
    let slow = args.get(2).copied().unwrap_or(64) as usize;
    // Every client here comes from 127.0.0.1, so the per-address cap is off by default (it
    // would cap the well-behaved clients with the slow ones); pass it to see it work.
    let per_ip = args.get(3).copied().unwrap_or(256) as usize;

    let dir = tempfile::tempdir().expect("temp dir");
    TinyModel::default().write(dir.path()).expect("tiny model");
    let spec = ModelSpec::parse(dir.path().to_str().expect("utf-8 path")).expect("spec");
    let load = LoadOptions {
        quantized: false,
        batch_size: 8,
        ..LoadOptions::default()
    };
    let engine = Arc::new(LocalEngine::load(&spec, &load).expect("load the tiny model"));
    let cfg = ServeConfig {
        port: 0,
        read_timeout: Duration::from_secs(2),
        max_connections_per_ip: per_ip,
        ..ServeConfig::default()
    };
    let (max_conn, per_ip) = (cfg.max_connections, cfg.max_connections_per_ip);
    let h = start(engine, cfg).expect("server starts");
    let addr = h.addr();
    println!(
        "serve_load: {secs} s, {clients} well-behaved clients, {slow} slow clients, 4 oversized; \
         server on {addr}: max batch 8, queue 64, {max_conn} connections ({per_ip} per address), \
         read deadline 2 s"
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut threads = Vec::new();
    for c in 0..clients {
        let (counts, stop, lat) = (counts.clone(), stop.clone(), latencies.clone());
        threads.push(std::thread::spawn(move || {
            well_behaved(c, addr, &counts, &stop, &lat)
        }));
    }
    for _ in 0..slow {
        let (counts, stop) = (counts.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            slow_client(addr, &counts, &stop)
        }));
    }
    {
        let (counts, stop) = (counts.clone(), stop.clone());
        threads.push(std::thread::spawn(move || oversized(addr, &counts, &stop)));
    }
    {
        let (counts, stop) = (counts.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            while !stop.load(Ordering::SeqCst) {
                let mut conn = None;
                match exchange(&mut conn, addr, get) {
                    Some((200, _)) => counts.health_ok.fetch_add(1, Ordering::SeqCst),
                    _ => counts.health_other.fetch_add(1, Ordering::SeqCst),
                };
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let stats = h.stats();
    h.shutdown().expect("shutdown");

    let mut lat = latencies.lock().expect("latencies").clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    let served = counts.served.load(Ordering::SeqCst);
    let failed = counts.failed.load(Ordering::SeqCst);
    println!(
        "well-behaved requests served: {served} ({:.1}/s)",
        served as f64 / wall
    );
    println!(
        "answers 429: {}, answers 503: {} (retried after Retry-After)",
        counts.r429.load(Ordering::SeqCst),
        counts.r503.load(Ordering::SeqCst)
    );
    println!(
        "latency first try to answer: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5) * 1e3,
        pct(0.99) * 1e3,
        lat.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    println!(
        "slow connections opened: {}, cut off by the server: {}",
        counts.slow_conns.load(Ordering::SeqCst),
        counts.slow_cut.load(Ordering::SeqCst)
    );
    println!(
        "/health probes: {} answered 200, {} did not",
        counts.health_ok.load(Ordering::SeqCst),
        counts.health_other.load(Ordering::SeqCst)
    );
    let mut over = counts.oversized.lock().expect("oversized").clone();
    over.sort();
    over.dedup();
    for (what, status) in &over {
        println!("oversized: {what} -> {status}");
    }
    println!(
        "server: {} generator calls, {} generation requests dropped after their client left",
        stats.batches, stats.cancelled
    );
    if failed == 0 && served > 0 {
        println!("every well-behaved request completed (0 failed)");
    } else {
        println!("FAILED: {failed} well-behaved requests did not complete");
        std::process::exit(1);
    }
}

/// One request on a keep-alive connection: status and body, or `None` when the connection
/// failed (the caller reconnects).
fn exchange(conn: &mut Option<TcpStream>, addr: SocketAddr, req: &[u8]) -> Option<(u16, String)> {
    if conn.is_none() {
        let s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        *conn = Some(s);
    }
    let s = conn.as_mut()?;
    if s.write_all(req).is_err() {
        *conn = None;
        return None;
    }
    match read_response(s) {
        Some((status, body, close)) => {
            if close {
                *conn = None;
            }
            Some((status, body))
        }
        None => {
            *conn = None;
            None
        }
    }
}

/// Reads one response with a `Content-Length` body; true when the server closes after it.
fn read_response(s: &mut TcpStream) -> Option<(u16, String, bool)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    let close = head.to_ascii_lowercase().contains("connection: close");
    Some((status, String::from_utf8_lossy(&body).to_string(), close))
}

fn request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn well_behaved(
    c: usize,
    addr: SocketAddr,
    counts: &Counts,
    stop: &AtomicBool,
    lat: &Mutex<Vec<f64>>,
) {
    let mut conn: Option<TcpStream> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": format!("client {c} question {i}: say something")}],
            "max_tokens": 16, "temperature": 0.7, "seed": i,
        })
        .to_string();
        let req = request("/v1/chat/completions", &body);
        let t0 = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            match exchange(&mut conn, addr, &req) {
                Some((200, _)) => {
                    counts.served.fetch_add(1, Ordering::SeqCst);
                    lat.lock()
                        .expect("latencies")
                        .push(t0.elapsed().as_secs_f64());
                    break;
                }
                Some((429, _)) => {
                    counts.r429.fetch_add(1, Ordering::SeqCst);
                }
                Some((503, _)) => {
                    counts.r503.fetch_add(1, Ordering::SeqCst);
                    conn = None;
                }
                Some((status, text)) => {
                    eprintln!("well-behaved client {c}: unexpected {status}: {text}");
                    counts.failed.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                None => {}
            }
            if tries > 200 {
                eprintln!("well-behaved client {c}: gave up after {tries} tries");
                counts.failed.fetch_add(1, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn slow_client(addr: SocketAddr, counts: &Counts, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        counts.slow_conns.fetch_add(1, Ordering::SeqCst);
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
        if s.write_all(head).is_err() {
            continue;
        }
        let mut buf = [0u8; 512];
        // A body byte every 500 ms, until the server answers or closes.
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match s.read(&mut buf) {
                Ok(_) => {
                    counts.slow_cut.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    counts.slow_cut.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(450));
            if s.write_all(b" ").is_err() {
                counts.slow_cut.fetch_add(1, Ordering::SeqCst);
                break;
            }
        }
    }
}

fn oversized(addr: SocketAddr, counts: &Counts, stop: &AtomicBool) {
    let million: Vec<&str> = vec!["x"; 1_000_000];
    let huge_list = serde_json::json!({"prompt": million, "n": 16, "max_tokens": 16}).to_string();
    let huge_body = format!(
        r#"{{"prompt": "{}", "max_tokens": 1}}"#,
        "y".repeat(9 << 20)
    );
    let long_prompt = serde_json::json!({"prompt": "z".repeat(5000), "max_tokens": 1}).to_string();
    let prompts: Vec<String> = (0..32).map(|i| format!("walk away {i}")).collect();
    let walk_away = serde_json::json!({"prompt": prompts, "max_tokens": 16}).to_string();
    let list_label = format!(
        "1,000,000 prompts x n=16 ({:.1} MB body)",
        huge_list.len() as f64 / 1e6
    );
    let cases = [
        (list_label.as_str(), huge_list),
        ("9 MiB body", huge_body),
        ("5,000-token prompt", long_prompt),
    ];
    while !stop.load(Ordering::SeqCst) {
        for (what, body) in &cases {
            let mut conn = None;
            let status = exchange(&mut conn, addr, &request("/v1/completions", body))
                .map(|r| r.0)
                .unwrap_or(0);
            counts
                .oversized
                .lock()
                .expect("oversized")
                .push((what.to_string(), status));
        }
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(&request("/v1/completions", &walk_away));
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
