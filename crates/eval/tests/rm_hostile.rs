//! Reward models that answer badly: a short list of scores is an error naming the model (it
//! used to index past the end and panic), a NaN score is a recorded, explained missing row
//! rather than a `null` that fails every later analysis; and the API key of an HTTP reward model
//! goes only where `safetune_openai::access` allows.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use safetune_data::read::ReadOptions;
use safetune_eval::rm::remote::{EndpointKind, RemoteOptions, RemoteRm};
use safetune_eval::rm::score::*;
use safetune_eval::rm::*;
use serde_json::json;

/// Scores by response length; drops the last score when `short`, answers NaN for responses
/// containing "nan".
struct OddRm {
    short: bool,
    calls: AtomicUsize,
}

impl RewardModel for OddRm {
    fn name(&self) -> &str {
        "odd-rm"
    }
    fn max_batch(&self) -> usize {
        4
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        self.calls.fetch_add(inputs.len(), Ordering::SeqCst);
        let mut v: Vec<f64> = inputs
            .iter()
            .map(|i| {
                if i.response.contains("nan") {
                    f64::NAN
                } else {
                    i.response.len() as f64
                }
            })
            .collect();
        if self.short {
            v.pop();
        }
        Ok(v)
    }
}

fn write_jsonl(dir: &Path, name: &str, rows: &[serde_json::Value]) -> std::path::PathBuf {
    let p = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_short_answer_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = write_jsonl(
        dir.path(),
        "pairs.jsonl",
        &(0..3)
            .map(|i| json!({"id": format!("p{i}"), "prompt": "Q?", "chosen": "A long answer.", "rejected": "No."}))
            .collect::<Vec<_>>(),
    );
    let items = write_jsonl(
        dir.path(),
        "items.jsonl",
        &(0..3)
            .map(|i| json!({"id": format!("i{i}"), "prompt": "Q?", "response": "An answer."}))
            .collect::<Vec<_>>(),
    );
    let rm = OddRm {
        short: true,
        calls: AtomicUsize::new(0),
    };
    for data in [pairs, items] {
        let task = load_task(&data, &ReadOptions::default(), None, None).unwrap();
        let out = dir.path().join("out.jsonl");
        let _ = std::fs::remove_file(&out);
        let err = run_scoring(&rm, &task, &out, &ScoreOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("odd-rm") && err.contains("scores for"),
            "{err}"
        );
    }
}

#[test]
fn a_nan_score_is_written_as_missing_with_a_reason_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let items = write_jsonl(
        dir.path(),
        "items.jsonl",
        &[
            json!({"id": "a", "prompt": "Q?", "response": "A fine answer."}),
            json!({"id": "b", "prompt": "Q?", "response": "nan answer"}),
            json!({"id": "c", "prompt": "Q?", "response": "Another."}),
        ],
    );
    let rm = OddRm {
        short: false,
        calls: AtomicUsize::new(0),
    };
    let task = load_task(&items, &ReadOptions::default(), None, None).unwrap();
    let out = dir.path().join("scores.jsonl");
    run_scoring(&rm, &task, &out, &ScoreOptions::default(), &mut |_| {}).unwrap();
    let f = read_scores(&out).unwrap();
    assert_eq!(f.items.len(), 2);
    assert_eq!(f.missing.len(), 1);
    let (id, reason) = &f.missing[0];
    assert_eq!(id, "b");
    assert!(
        reason.contains("odd-rm") && reason.contains("NaN") && reason.contains('b'),
        "{reason}"
    );
    // A rerun has nothing left to score.
    let p = run_scoring(&rm, &task, &out, &ScoreOptions::default(), &mut |_| {}).unwrap();
    assert_eq!((p.skipped, p.done), (3, 0));
    assert_eq!(rm.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn the_api_key_of_an_http_reward_model_goes_only_where_it_may() {
    std::env::set_var("SAFETUNE_TEST_RM_NAMED_KEY", "sk-rm-named-1234");
    let named = RemoteOptions {
        api_key_env: "SAFETUNE_TEST_RM_NAMED_KEY".into(),
        ..RemoteOptions::default()
    };
    // Plain http to another host with a key named for it: refused, naming host and setting.
    let Err(err) = RemoteRm::new(
        EndpointKind::Score,
        "http://10.9.8.7:8000#rm",
        None,
        named.clone(),
    ) else {
        panic!("the key would go over plain http")
    };
    assert!(
        err.contains("10.9.8.7")
            && err.contains("SAFETUNE_TEST_RM_NAMED_KEY")
            && err.contains("allow_insecure"),
        "{err}"
    );
    assert!(!err.contains("sk-rm-named-1234"), "{err}");
    // https, loopback, or allowed: sent.
    for url in [
        "https://rm.example.com#rm",
        "http://127.0.0.1:9#rm",
        "http://localhost:9#rm",
    ] {
        let rm = RemoteRm::new(EndpointKind::Score, url, None, named.clone()).unwrap();
        assert!(rm.has_api_key(), "{url}");
    }
    let insecure = RemoteOptions {
        allow_insecure: true,
        ..named.clone()
    };
    let rm = RemoteRm::new(
        EndpointKind::Score,
        "http://10.9.8.7:8000#rm",
        None,
        insecure,
    )
    .unwrap();
    assert!(rm.has_api_key());
    // A host that only starts like a loopback address is not one.
    assert!(RemoteRm::new(
        EndpointKind::Score,
        "http://127.0.0.1.example.com#rm",
        None,
        named
    )
    .is_err());
}

/// A loopback server that answers every request with `reply` (HTTP 200, JSON).
fn one_reply_server(reply: &'static str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    url
}

#[test]
fn a_classify_answer_that_leaves_an_input_out_is_an_error() {
    let quiet = RemoteOptions {
        api_key_env: "SAFETUNE_TEST_RM_UNSET".into(),
        max_retries: 0,
        ..RemoteOptions::default()
    };
    let input = |r: &str| RmInput {
        context: vec![safetune_data::Message::user("Q?")],
        response: r.into(),
    };
    // Two results, both for input 0: input 1 has none (it used to read as a score of 0).
    let url = one_reply_server(
        r#"{"data": [{"index": 0, "probs": [0.2, 0.8]}, {"index": 0, "probs": [0.3, 0.7]}]}"#,
    );
    let rm = RemoteRm::new(
        EndpointKind::Classify,
        &format!("{url}#clf"),
        None,
        quiet.clone(),
    )
    .unwrap();
    let err = rm.score(&[input("a"), input("b")]).unwrap_err().to_string();
    assert!(err.contains("no result for input 1"), "{err}");
    // A short answer and an empty probability list are errors too.
    let url = one_reply_server(r#"{"data": [{"index": 0, "probs": []}]}"#);
    let rm = RemoteRm::new(
        EndpointKind::Classify,
        &format!("{url}#clf"),
        None,
        quiet.clone(),
    )
    .unwrap();
    assert!(rm.score(&[input("a"), input("b")]).is_err());
    assert!(rm.score(&[input("a")]).is_err());
}
