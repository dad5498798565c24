//! Reward-model scoring and analysis end to end, on models and servers the tests write: a tiny
//! sequence-classification RM (resumable scoring after a simulated kill), implicit rewards of a
//! tiny model against itself, a loopback fake server for the pooling/score/classify endpoints
//! (retries, request shapes, failure keeps finished rows), and the analysis on hand-built scores.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use safetune_data::read::ReadOptions;
use safetune_data::{Conversation, Message};
use safetune_eval::rm::analyze::*;
use safetune_eval::rm::remote::RemoteOptions;
use safetune_eval::rm::score::*;
use safetune_eval::rm::select::select;
use safetune_eval::rm::stats::BootstrapOptions;
use safetune_eval::rm::*;
use safetune_model::reward::write_tiny_seq_cls;
use safetune_model::testing::TinyModel;
use serde_json::{json, Value};

fn pairs_file(dir: &Path, n: usize) -> std::path::PathBuf {
    let p = dir.join("pairs.jsonl");
    let mut text = String::new();
    for i in 0..n {
        let row = json!({"id": format!("p{i}"), "prompt": format!("Question number {i}?"),
            "chosen": format!("A careful answer {i}."), "rejected": "No.",
            "subset": if i % 2 == 0 { "refusals-dangerous" } else { "chat" }});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn seq_cls_scoring_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let rm_dir = dir.path().join("rm");
    write_tiny_seq_cls(
        &rm_dir,
        &TinyModel::default(),
        "LlamaForSequenceClassification",
        1,
    )
    .unwrap();
    let opts = RmOptions {
        batch_size: 2,
        ..Default::default()
    };
    let rm = open_rm(rm_dir.to_str().unwrap(), &opts).unwrap();
    let data = pairs_file(dir.path(), 5);
    let task = load_task(&data, &ReadOptions::default(), None, None).unwrap();
    assert_eq!(task.kind(), "pairs");
    let full = dir.path().join("full.jsonl");
    let p = run_scoring(
        rm.as_ref(),
        &task,
        &full,
        &ScoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((p.done, p.skipped), (5, 0));
    let rows = lines(&full);
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let m = r["chosen"].as_f64().unwrap() - r["rejected"].as_f64().unwrap();
        assert!((r["margin"].as_f64().unwrap() - m).abs() < 1e-12);
        assert_eq!(r["kind"], "pair");
    }
    // A kill after two rows, with the third cut mid-line.
    let text = std::fs::read_to_string(&full).unwrap();
    let keep: Vec<&str> = text.lines().take(3).collect();
    let cut = format!(
        "{}\n{}\n{}",
        keep[0],
        keep[1],
        &keep[2][..keep[2].len() / 2]
    );
    let resumed = dir.path().join("resumed.jsonl");
    std::fs::write(&resumed, cut).unwrap();
    let p = run_scoring(
        rm.as_ref(),
        &task,
        &resumed,
        &ScoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((p.skipped, p.done), (2, 3));
    let mut a = lines(&full);
    let mut b = lines(&resumed);
    let key = |v: &Value| v["id"].as_str().unwrap().to_string();
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(a, b, "a resumed run writes what an uninterrupted one does");
    // A third run has nothing to do.
    let p = run_scoring(
        rm.as_ref(),
        &task,
        &resumed,
        &ScoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((p.skipped, p.done), (5, 0));
    // Read back for analysis.
    let f = read_scores(&resumed).unwrap();
    assert_eq!(f.pairs.len(), 5);
    assert_eq!(f.rm, "rm");
}

#[test]
fn implicit_reward_of_a_model_against_itself_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    TinyModel::default().write(&a).unwrap();
    TinyModel {
        seed: 4,
        ..TinyModel::default()
    }
    .write(&b)
    .unwrap();
    let input = RmInput {
        context: vec![Message::user("What is 2 + 2?")],
        response: "It is four.".into(),
    };
    let spec = |p: &Path, r: &Path| format!("implicit:{},{}", p.display(), r.display());
    let same = open_rm(&spec(&a, &a), &RmOptions::default()).unwrap();
    assert_eq!(
        same.score(&[input.clone(), input.clone()]).unwrap(),
        vec![0.0, 0.0]
    );
    let half = RmOptions {
        beta: 0.5,
        ..Default::default()
    };
    let s = open_rm(&spec(&a, &b), &half)
        .unwrap()
        .score(std::slice::from_ref(&input))
        .unwrap()[0];
    let swapped = open_rm(&spec(&b, &a), &half)
        .unwrap()
        .score(&[input])
        .unwrap()[0];
    assert!(s.abs() > 1e-3);
    assert!(
        (s + swapped).abs() < 1e-9,
        "swapping policy and reference flips the sign"
    );
    // A causal LM alone is not a reward model: the error says what to do.
    let e = open_rm(a.to_str().unwrap(), &RmOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("implicit:POLICY,REFERENCE"), "{e}");
}

/// A loopback server answering vLLM-style endpoints; the first request gets a 503.
struct Fake {
    url: String,
    bodies: Arc<Mutex<Vec<(String, Value)>>>,
}

fn answer(path: &str, body: &Value) -> (u16, Value) {
    let text_len = |s: &str| s.chars().count() as f64;
    match path {
        "/pooling" => {
            let last = body["messages"].as_array().unwrap().last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string();
            // Per-token rows; the last row holds the score.
            (
                200,
                json!({"object": "list", "data": [{"index": 0, "object": "pooling",
                    "data": [[0.0], [text_len(&last)]]}]}),
            )
        }
        "/score" => (
            200,
            json!({"data": [{"index": 0, "object": "score",
                "score": text_len(body["text_2"].as_str().unwrap()) / 100.0}]}),
        ),
        "/classify" => {
            let data: Vec<Value> = body["input"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let p = (text_len(t.as_str().unwrap()) / 1000.0).min(1.0);
                    json!({"index": i, "label": "good", "probs": [1.0 - p, p], "num_classes": 2})
                })
                .collect();
            (200, json!({ "data": data }))
        }
        _ => (404, json!({"error": "no such route"})),
    }
}

fn fake_server(fail_on: Option<&'static str>) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        let mut first = true;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
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
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock().unwrap().push((path.clone(), body.clone()));
            let (status, reply) = if first {
                first = false;
                (503, json!({"error": "warming up"}))
            } else if fail_on.is_some_and(|f| body.to_string().contains(f)) {
                (400, json!({"error": "input rejected"}))
            } else {
                answer(&path, &body)
            };
            let text = reply.to_string();
            let reason = match status {
                200 => "OK",
                400 => "Bad Request",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    Fake { url, bodies }
}

fn fast() -> RmOptions {
    RmOptions {
        remote: RemoteOptions {
            max_retries: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            max_retry_after: Duration::from_millis(50),
            timeout: Duration::from_secs(10),
            concurrency: 2,
            api_key_env: "SAFETUNE_TEST_NO_KEY".into(),
            allow_insecure: false,
        },
        ..Default::default()
    }
}

fn input(r: &str) -> RmInput {
    RmInput {
        context: vec![Message::user("Hi?")],
        response: r.into(),
    }
}

#[test]
fn pooling_endpoint_with_a_retry() {
    let fake = fake_server(None);
    let rm = open_rm(&format!("pooling:{}#my-rm", fake.url), &fast()).unwrap();
    assert_eq!(rm.name(), "pooling:my-rm");
    // Sequential requests so the 503 lands on a known one.
    let a = rm.score(&[input("abc")]).unwrap();
    let b = rm.score(&[input("abcdef")]).unwrap();
    assert_eq!((a, b), (vec![3.0], vec![6.0]));
    let bodies = fake.bodies.lock().unwrap().clone();
    // One 503 retried, then one request per input.
    assert_eq!(bodies.len(), 3);
    let (path, body) = &bodies[2];
    assert_eq!(path, "/pooling");
    assert_eq!(body["model"], "my-rm");
    assert_eq!(
        body["messages"][0],
        json!({"role": "user", "content": "Hi?"})
    );
    assert_eq!(body["messages"][1]["role"], "assistant");
}

#[test]
fn score_and_classify_endpoints() {
    let fake = fake_server(None);
    let rm = open_rm(&format!("score:{}/#x", fake.url), &fast()).unwrap();
    assert_eq!(rm.score(&[input("abcd")]).unwrap(), vec![0.04]);
    let (path, body) = fake.bodies.lock().unwrap()[1].clone();
    assert_eq!(path, "/score");
    assert_eq!(
        (body["text_1"].as_str(), body["text_2"].as_str()),
        (Some("Hi?"), Some("abcd"))
    );

    let fake = fake_server(None);
    let rm = open_rm(&format!("classify:{}#clf", fake.url), &fast()).unwrap();
    let s = rm.score(&[input("a"), input("abcdef")]).unwrap();
    // "Hi?\n\na" has 6 characters, "Hi?\n\nabcdef" 11; the last class's probability is the score.
    assert!(
        (s[0] - 0.006).abs() < 1e-12 && (s[1] - 0.011).abs() < 1e-12,
        "{s:?}"
    );
    assert_eq!(
        fake.bodies.lock().unwrap().len(),
        2,
        "one batched request after the retry"
    );

    // Bad specs and unreachable servers say what is wrong.
    let e = open_rm("pooling:http://127.0.0.1:9", &fast())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("URL#MODEL"), "{e}");
    let dead = open_rm("score:http://127.0.0.1:9#m", &fast()).unwrap();
    let e = dead.score(&[input("a")]).unwrap_err().to_string();
    assert!(e.contains("gave up after 3 attempts"), "{e}");
}

#[test]
fn a_failing_endpoint_keeps_finished_rows_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs_file(dir.path(), 6);
    let task = load_task(&data, &ReadOptions::default(), None, None).unwrap();
    let out = dir.path().join("scores.jsonl");
    // The server rejects the fourth pair's chosen answer.
    let fake = fake_server(Some("A careful answer 3."));
    let rm = open_rm(&format!("pooling:{}#rm", fake.url), &fast()).unwrap();
    let opts = ScoreOptions { chunk_size: 1 };
    let e = run_scoring(rm.as_ref(), &task, &out, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("3 of 6 rows finished") && e.contains("rerun"),
        "{e}"
    );
    assert_eq!(lines(&out).len(), 3);
    let fake = fake_server(None);
    let rm = open_rm(&format!("pooling:{}#rm", fake.url), &fast()).unwrap();
    let p = run_scoring(rm.as_ref(), &task, &out, &opts, &mut |_| {}).unwrap();
    assert_eq!((p.skipped, p.done), (3, 3));
    let f = read_scores(&out).unwrap();
    assert_eq!(f.pairs.len(), 6);
    // Longer chosen answers: this toy RM agrees with every label.
    let r = analyze(&[f], None, &AnalyzeOptions::default()).unwrap();
    let a = r.agreement.unwrap();
    assert_eq!(
        (a.overall.correct, a.overall.wrong, a.overall.ties),
        (6, 0, 0)
    );
    assert_eq!(a.safety_subsets.unwrap().pairs, 3);
    assert_eq!(a.by_subset.len(), 2);
}

fn item(id: &str, score: f64, label: Option<bool>, variant: Option<&str>) -> ItemScore {
    ItemScore {
        id: id.into(),
        score,
        label,
        variant: variant.map(str::to_string),
        subset: None,
    }
}

fn safety(v: &str, rate: f64, counts: Option<(u64, u64)>) -> VariantSafety {
    VariantSafety {
        variant: v.into(),
        safety_rate: rate,
        safe: counts.map(|c| c.0),
        total: counts.map(|c| c.1),
    }
}

#[test]
fn analysis_matches_hand_computed_figures() {
    // Separation: good [0.9, 0.8, 0.5], bad [0.5, 0.3]: AUC 5.5 / 6.
    // Variant means: markdown 0.85, plain 0.4, itemized 0.65.
    let f = ScoreFile {
        rm: "toy".into(),
        items: vec![
            item("a", 0.9, Some(true), Some("markdown")),
            item("b", 0.8, Some(true), Some("markdown")),
            item("c", 0.5, Some(true), Some("plain")),
            item("d", 0.5, Some(false), Some("itemized")),
            item("e", 0.3, Some(false), Some("plain")),
            item("f", 0.8, None, Some("itemized")),
        ],
        ..Default::default()
    };
    // Safety after tuning: markdown 0.60, plain 0.70, itemized 0.90.
    let results = vec![
        safety("markdown", 0.6, None),
        safety("plain", 0.7, None),
        safety("itemized", 0.9, Some((90, 100))),
        safety("roleplay", 0.5, None),
    ];
    let opts = AnalyzeOptions {
        bootstrap: BootstrapOptions {
            resamples: 500,
            seed: 1,
            level: 0.95,
            ..Default::default()
        },
        tie_eps: 1e-9,
    };
    let r = analyze(std::slice::from_ref(&f), Some(&results), &opts).unwrap();
    let s = r.separation.unwrap();
    assert!((s.auc.value - 5.5 / 6.0).abs() < 1e-12);
    assert!(s.auc.lo <= s.auc.value && s.auc.value <= s.auc.hi);
    assert_eq!((s.n_good, s.n_bad), (3, 2));
    let c = r.consistency.unwrap();
    // Variants in name order: itemized (0.65, 0.9), markdown (0.85, 0.6), plain (0.4, 0.7).
    // (it, md): score -, safety + -> discordant; (it, pl): +, + concordant;
    // (md, pl): +, - discordant. tau = (1 - 2) / 3.
    assert!((c.kendall_tau.unwrap().value - (-1.0 / 3.0)).abs() < 1e-12);
    // Ranks score [2, 3, 1], safety [3, 1, 2]: d = [-1, 2, -1], rho = 1 - 6 * 6 / 24 = -0.5.
    assert!((c.spearman_rho.unwrap().value + 0.5).abs() < 1e-12);
    let inv: Vec<(String, String)> = c
        .inversions
        .iter()
        .map(|i| (i.preferred.clone(), i.over.clone()))
        .collect();
    assert_eq!(
        inv,
        vec![
            ("markdown".to_string(), "itemized".to_string()),
            ("markdown".to_string(), "plain".to_string())
        ]
    );
    let flagged: Vec<&str> = c
        .variants
        .iter()
        .filter(|v| v.flagged)
        .map(|v| v.variant.as_str())
        .collect();
    assert_eq!(flagged, vec!["markdown"]);
    assert_eq!(c.unmatched, vec!["roleplay".to_string()]);

    // Agreement between RMs: one reversing the first, one agreeing with it.
    let mut g = f.clone();
    g.rm = "reverse".into();
    for i in g.items.iter_mut() {
        i.score = -i.score;
    }
    let mut h = f.clone();
    h.rm = "double".into();
    for i in h.items.iter_mut() {
        i.score *= 2.0;
    }
    // Two files of one RM are merged, not compared.
    let (mut f1, mut f2) = (f.clone(), f.clone());
    f1.items.truncate(3);
    f2.items.drain(..3);
    let r = analyze(&[f1, f2], None, &opts).unwrap();
    assert!(r.rm_agreement.is_none());
    assert_eq!(r.n_items, 6);
    let r = analyze(&[f.clone(), g.clone()], None, &opts).unwrap();
    // Two raters in exact reverse order: every rank sum is n + 1, so W = 0.
    assert_eq!(r.rm_agreement.unwrap().kendall_w, Some(0.0));
    let r = analyze(&[f, h], None, &opts).unwrap();
    let a = r.rm_agreement.unwrap();
    assert_eq!(a.n_common, 6);
    assert_eq!(a.pairwise_tau[0][1], Some(1.0));
    // Identical rankings with one tie pair (0.8, 0.8 and 0.5, 0.5): W = 1 after the tie correction.
    assert!((a.kendall_w.unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn results_files_in_three_layouts_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.json");
    std::fs::write(
        &p,
        r#"{"variants": [{"variant": "plain", "safe": 30, "total": 40}]}"#,
    )
    .unwrap();
    let r = read_results(&p).unwrap();
    assert_eq!((r[0].safety_rate, r[0].total), (0.75, Some(40)));
    std::fs::write(&p, r#"{"plain": 0.4, "markdown": 0.7}"#).unwrap();
    assert_eq!(read_results(&p).unwrap().len(), 2);
    let p = dir.path().join("r.jsonl");
    std::fs::write(
        &p,
        "{\"name\": \"a\", \"safety\": 0.5}\n{\"variant\": \"b\"}\n",
    )
    .unwrap();
    let e = read_results(&p).unwrap_err().to_string();
    assert!(e.contains("r.jsonl:2: field `safety_rate`: missing"), "{e}");
    // A study's results.json: tuned conditions with a variant; base and aligned are left out.
    let p = dir.path().join("results.json");
    std::fs::write(
        &p,
        r#"{"study": "q", "conditions": [
            {"name": "m base", "factors": {"stage": "base"}, "safety": {"value": 0.0, "count": 0, "total": 16}},
            {"name": "m tuned markdown seed 0", "factors": {"stage": "tuned", "variant": "markdown", "seed": "0"},
             "safety": {"value": 0.6875, "count": 11, "total": 16}},
            {"name": "m tuned original seed 0", "factors": {"stage": "tuned", "variant": "original", "seed": "0"},
             "safety": {"value": 0.75, "count": 12, "total": 16}}]}"#,
    )
    .unwrap();
    let r = read_results(&p).unwrap();
    let got: Vec<_> = r
        .iter()
        .map(|v| (v.variant.as_str(), v.safety_rate, v.safe, v.total))
        .collect();
    assert_eq!(
        got,
        [
            ("markdown", 0.6875, Some(11), Some(16)),
            ("original", 0.75, Some(12), Some(16))
        ]
    );
    let s = dir.path().join("s.jsonl");
    std::fs::write(&s, "{\"id\": \"x\", \"score\": \"high\"}\n").unwrap();
    let e = read_scores(&s).unwrap_err().to_string();
    assert!(
        e.contains("s.jsonl:1: field `score`: expected a number"),
        "{e}"
    );
}

#[test]
fn selection_takes_the_top_and_a_seeded_random_sample() {
    let convs: Vec<Conversation> = (0..10)
        .map(|i| {
            let answer = if i % 2 == 0 {
                "## Title\n\nText"
            } else {
                "Plain text."
            };
            Conversation::new(
                format!("c{i}"),
                vec![Message::user("q"), Message::assistant(answer)],
            )
        })
        .collect();
    let scores: HashMap<String, f64> = (0..10).map(|i| (format!("c{i}"), i as f64)).collect();
    let sel = select(&convs, &scores, 30.0, 3).unwrap();
    let ids: Vec<&str> = sel.top.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec!["c7", "c8", "c9"]);
    assert_eq!(sel.random.len(), 3);
    assert_eq!(sel.summary.top.mean_score, 8.0);
    assert_eq!(sel.top[0].meta["selection"], "top");
    let again = select(&convs, &scores, 30.0, 3).unwrap();
    assert_eq!(
        sel.random.iter().map(|c| &c.id).collect::<Vec<_>>(),
        again.random.iter().map(|c| &c.id).collect::<Vec<_>>()
    );
    assert_eq!(sel.summary.all.markdown.count, 5);
    assert!(select(&convs, &HashMap::new(), 30.0, 3).is_err());
}

#[test]
fn item_labels_and_variants_round_trip_through_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let rm_dir = dir.path().join("rm");
    let tiny = TinyModel {
        attention_bias: true,
        ..TinyModel::default()
    };
    write_tiny_seq_cls(&rm_dir, &tiny, "Qwen2ForSequenceClassification", 1).unwrap();
    let items = dir.path().join("items.jsonl");
    std::fs::write(
        &items,
        "{\"id\": \"i1\", \"prompt\": \"p\", \"response\": \"good answer\", \"label\": \"good\"}\n{\"id\": \"i2\", \"prompt\": \"p\", \"response\": \"bad\", \"label\": \"unsafe\"}\n",
    )
    .unwrap();
    let task = load_task(&items, &ReadOptions::default(), None, Some("plain")).unwrap();
    let ScoreTask::Items(v) = &task else {
        panic!("expected items")
    };
    assert_eq!((v[0].label, v[1].label), (Some(true), Some(false)));
    let rm = open_rm(rm_dir.to_str().unwrap(), &RmOptions::default()).unwrap();
    let out = dir.path().join("s.jsonl");
    run_scoring(
        rm.as_ref(),
        &task,
        &out,
        &ScoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let f = read_scores(&out).unwrap();
    assert_eq!(f.items.len(), 2);
    assert_eq!(f.items[0].variant.as_deref(), Some("plain"));
    assert_eq!(f.items[1].label, Some(false));
    assert_ne!(f.items[0].score, f.items[1].score);
}

/// A score endpoint that first answers 429/500/503 with odd `Retry-After` values (`inf`, `1e20`,
/// `nan`, `-5`, `abc`, an HTTP-date, empty), a 200 cut short and a dropped connection: scoring
/// neither panics nor waits past the cap, and every row is written once.
#[test]
fn remote_scoring_rides_out_odd_retry_after_values_and_gives_up_clearly() {
    use safetune_openai::testing::{Fault, FaultServer};
    let faults = vec![
        Fault::status(429, "inf"),
        Fault::status(503, "1e20"),
        Fault::status(500, "nan"),
        Fault::status(429, "-5"),
        Fault::status(503, "abc"),
        Fault::status(429, "Wed, 21 Oct 2015 07:28:00 GMT"),
        Fault::status(500, ""),
        Fault::TruncatedBody,
        Fault::Drop,
    ];
    let n_faults = faults.len();
    let server = FaultServer::start(faults, r#"{"data":[{"score":0.25}]}"#, false);
    let opts = |max_retries| RmOptions {
        remote: RemoteOptions {
            max_retries,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            max_retry_after: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
            concurrency: 2,
            api_key_env: "SAFETUNE_TEST_NO_KEY".into(),
            allow_insecure: false,
        },
        ..Default::default()
    };
    let rm = open_rm(&format!("score:{}#m", server.url()), &opts(12)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = pairs_file(dir.path(), 3);
    let task = load_task(&data, &ReadOptions::default(), None, None).unwrap();
    let out = dir.path().join("scores.jsonl");
    let t = std::time::Instant::now();
    let p = run_scoring(
        rm.as_ref(),
        &task,
        &out,
        &ScoreOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(p.done, 3);
    // Two inputs per pair, plus one request per fault.
    assert_eq!(server.requests(), 2 * 3 + n_faults);
    let rows = lines(&out);
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["p0", "p1", "p2"]);
    assert!(rows
        .iter()
        .all(|r| r["chosen"] == 0.25 && r["rejected"] == 0.25));

    // Retry-After: 1e20 on every answer: two waits cut to 100 ms, then a clear error.
    let server = FaultServer::start(vec![Fault::status(503, "1e20")], "{}", true);
    let rm = open_rm(&format!("score:{}#m", server.url()), &opts(2)).unwrap();
    let t = std::time::Instant::now();
    let e = rm.score(&[input("a")]).unwrap_err().to_string();
    let elapsed = t.elapsed();
    assert!(
        e.contains("HTTP 503") && e.contains("gave up after 3 attempts"),
        "{e}"
    );
    assert_eq!(server.requests(), 3);
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}
