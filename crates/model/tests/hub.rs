//! `hf:ORG/NAME@REV` against a local HTTP server that speaks the hub's file protocol
//! (`/{repo}/resolve/{rev}/{file}` with range requests, `etag` and `x-repo-commit` headers),
//! serving a tiny model the test writes. HF_ENDPOINT and HF_HOME point the client at it; this
//! file is its own test process, so setting them does not affect other tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use safetune_model::testing::TinyModel;
use safetune_model::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` under `/{repo}/resolve/{rev}/`; records every path requested.
fn serve(
    repo: &str,
    rev: &str,
    files: HashMap<String, Vec<u8>>,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let prefix = format!("/{repo}/resolve/{rev}/");
    let log2 = log.clone();
    let served = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            served.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("range") {
                        // bytes=N- or bytes=0-0
                        let v = v.trim().trim_start_matches("bytes=");
                        let (a, b) = v.split_once('-').unwrap_or((v, ""));
                        range_start =
                            Some((a.parse::<usize>().unwrap_or(0), b.parse::<usize>().ok()));
                    }
                }
            }
            log2.lock().unwrap().push(path.clone());
            let file = path.strip_prefix(&prefix).and_then(|f| files.get(f));
            let response = match file {
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
                Some(data) => {
                    let (start, end) = match range_start {
                        Some((a, Some(b))) => (a, (b + 1).min(data.len())),
                        Some((a, None)) => (a, data.len()),
                        None => (0, data.len()),
                    };
                    let body = &data[start.min(data.len())..end];
                    let etag = format!("{:016x}{:08x}", fnv(data), data.len());
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n\
                         etag: \"{etag}\"\r\nx-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                        body.len(),
                        end.saturating_sub(1),
                        data.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
            };
            let _ = stream.write_all(&response);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(10)));
            let _ = reader.read_to_end(&mut rest);
        }
    });
    (format!("http://{addr}"), log)
}

use safetune_data::util::fnv1a64 as fnv;

#[test]
fn hub_spec_downloads_through_hf_endpoint_into_hf_home() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    TinyModel {
        sharded: true,
        ..Default::default()
    }
    .write(&model_dir)
    .unwrap();
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(&model_dir).unwrap() {
        let p = entry.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read(&p).unwrap(),
        );
    }
    let (endpoint, log) = serve("tiny-org/tiny-llama", "v1", files);
    let hf_home = dir.path().join("hf-home");
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", &hf_home);

    let spec = ModelSpec::parse("hf:tiny-org/tiny-llama@v1").unwrap();
    let engine = LocalEngine::load(&spec, &LoadOptions::default()).unwrap();
    assert_eq!(engine.model_id, "tiny-org/tiny-llama");
    let requested = log.lock().unwrap().clone();
    println!("requests: {requested:?}");
    assert!(
        requested
            .iter()
            .any(|p| p.ends_with("model-00002-of-00002.safetensors")),
        "shards fetched"
    );
    assert!(
        hf_home.join("hub").exists(),
        "the cache lives under HF_HOME"
    );

    // Same answers as loading the directory directly.
    let local = LocalEngine::load(&ModelSpec::HfDir(model_dir), &LoadOptions::default()).unwrap();
    let req = GenRequest {
        prompt: Prompt::Text("hello".into()),
        sampling: Sampling {
            max_new_tokens: 5,
            ..Sampling::default()
        },
    };
    assert_eq!(
        engine.generate(std::slice::from_ref(&req)).unwrap(),
        local.generate(&[req]).unwrap()
    );

    // A missing repository is a clear error naming the spec and the endpoint.
    let err = LocalEngine::load(
        &ModelSpec::parse("hf:tiny-org/missing").unwrap(),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    println!("{err}");
    assert!(
        err.contains("hf:tiny-org/missing")
            && err.contains("config.json")
            && err.contains(&endpoint),
        "{err}"
    );
}
