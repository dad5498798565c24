//! `safetune view` over plain HTTP on loopback: every page, the filters, the paired view, a
//! label that lands in SQLite and its undo, the Host and key checks, and model text escaped.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use safetune_openai::server::guard::ApiKey;
use safetune_study::store::Store;
use safetune_study::view::{start, ViewConfig, ViewHandle};
use serde_json::Value as Json;

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("Host: 127.0.0.1\r\n");
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (h, b) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = h
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        headers: h.to_string(),
        body: b.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, &[], "")
}

fn post_json(addr: SocketAddr, path: &str, body: &Json) -> Answer {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &body.to_string(),
    )
}

fn server(dir: &std::path::Path, key: Option<&str>) -> ViewHandle {
    let mut cfg = ViewConfig::new(dir);
    cfg.port = 0;
    cfg.labeller = "tester".into();
    cfg.api_key = key.map(|k| ApiKey::new(k).unwrap());
    start(cfg).unwrap()
}

/// The ids of the answers an `/api/answers` query returns.
fn ids(addr: SocketAddr, query: &str) -> Vec<String> {
    let a = get(addr, &format!("/api/answers?{query}"));
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["answer_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_page_answers_and_the_filters_select_the_right_answers() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = server(dir.path(), None);
    let addr = h.addr();

    let o = get(addr, "/");
    assert_eq!(o.status, 200, "{}", o.body);
    assert!(o
        .headers
        .contains("Content-Security-Policy: default-src 'none'; script-src 'sha256-"));
    // Steps by status, the running step's progress, the failed step's error, escaped.
    assert!(o.body.contains("done: <b>8</b>"), "{}", o.body);
    assert!(o.body.contains("running: <b>1</b>"));
    assert!(o.body.contains("failed: <b>1</b>"));
    assert!(o.body.contains("3 / 10"));
    assert!(o
        .body
        .contains("out of memory &lt;b&gt;tuning&lt;/b&gt;\nhint: lower batch_size"));
    assert!(o.body.contains("http-equiv=\"refresh\""));
    let ov = get(addr, "/api/overview").json();
    let run = ov["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == "generate c/harm")
        .unwrap();
    assert_eq!(run["status"], "running");
    assert_eq!(run["done"], 3);
    assert!(run["left"].as_f64().unwrap() >= 0.0);

    let r = get(addr, "/results");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("<nav>") && r.body.contains("view-fixture"));
    for page in ["/answers", "/label", "/paired?benchmark=harm&prompt=p2"] {
        let a = get(addr, page);
        assert_eq!(a.status, 200, "{page}: {}", a.body);
        assert!(
            !a.body.contains("<script>alert"),
            "{page} shows model markup as markup"
        );
    }

    // 15 answers; each filter narrows them to exactly the expected ones.
    assert_eq!(ids(addr, "").len(), 15);
    assert_eq!(ids(addr, "condition=no-such-condition").len(), 0);
    let conds = get(addr, "/api/answers").json()["answers"][0]["condition"]
        .as_str()
        .unwrap()
        .to_string();
    let cond_q = format!("condition={}", conds.replace(' ', "+").replace('/', "%2F"));
    assert_eq!(ids(addr, &cond_q).len(), 6, "{cond_q}");
    assert_eq!(ids(addr, "category=cat-y").len(), 6);
    assert_eq!(
        ids(addr, "verdict=refusal"),
        ["ga:p0", "ga:p1", "ga:p2", "gb:p0", "gb:p1", "gb:p2", "gb:p3"]
    );
    assert_eq!(ids(addr, "judge=classifier&verdict=refusal").len(), 6);
    assert_eq!(ids(addr, "verdict=none").len(), 3);
    assert_eq!(ids(addr, "disagree=1"), ["ga:p2"]);
    assert_eq!(ids(addr, "q=PWNED"), ["ga:p5"]);
    assert_eq!(ids(addr, "label=labelled").len(), 0);
    // Pages: 50 a page, and a page past the end (however far) is empty, not an error.
    assert_eq!(ids(addr, "page=2").len(), 0);
    assert_eq!(ids(addr, "page=18446744073709551615").len(), 0);
    assert_eq!(get(addr, "/answers?page=18446744073709551615").status, 200);
    // RM scores: model a scores i/4, model b i/4 - 1; the running step's answers have none.
    assert_eq!(ids(addr, "rm_min=0.75"), ["ga:p3", "ga:p4", "ga:p5"]);
    assert_eq!(
        ids(addr, "rm=demo&rm_min=-0.5&rm_max=0"),
        ["ga:p0", "gb:p2", "gb:p3", "gb:p4"]
    );
    assert_eq!(ids(addr, "rm=other&rm_min=0").len(), 0);
    let page = get(addr, "/answers?disagree=1");
    assert!(
        page.body.contains("<b>1</b> of 15 answers match"),
        "{}",
        page.body
    );
    assert_eq!(page.body.matches("class=\"answer-row\"").count(), 1);
    let page = get(addr, "/answers?q=pwned");
    assert!(page
        .body
        .contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"));

    // The paired view: prompt p2 from every condition that answered it, with both verdicts.
    let p = get(addr, "/paired?benchmark=harm&prompt=p2");
    assert_eq!(p.body.matches("class=\"card pair-card\"").count(), 3);
    assert!(p.body.contains("harmful prompt number 2"));
    assert!(p
        .body
        .contains("keyword: <span class=\"refusal\">refusal</span>"));
    assert!(p
        .body
        .contains("classifier: <span class=\"compliance\">compliance</span>"));
    let p = get(addr, "/paired?benchmark=harm&prompt=p5");
    assert!(p.body.contains("&lt;script&gt;alert"));
    assert!(!p.body.contains("<script>alert"));
    assert_eq!(get(addr, "/paired?benchmark=harm&prompt=nope").status, 404);
    assert_eq!(get(addr, "/paired").status, 400);
    assert_eq!(get(addr, "/nope").status, 404);
    h.shutdown();
}

#[test]
fn a_label_lands_in_sqlite_and_undo_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = server(dir.path(), None);
    let addr = h.addr();
    // The default queue is the `safetune label` sample: no verdicts in it.
    let q = get(addr, "/api/queue").json();
    let queue = q["answers"].as_array().unwrap();
    assert_eq!(queue.len(), 15);
    assert!(queue.iter().all(|a| a.get("verdicts").is_none()));

    let a = post_json(
        addr,
        "/api/label",
        &serde_json::json!({"answer_id": "ga:p2", "label": "refusal", "labeller": "ann"}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let j = a.json();
    assert_eq!(j["verdicts"][0]["judge"], "keyword");
    assert_eq!(j["verdicts"][0]["verdict"], "refusal");
    assert_eq!(j["verdicts"][1]["verdict"], "compliance");
    // Accuracy so far: keyword 1/1, classifier 0/1.
    let acc = j["accuracy"].as_array().unwrap();
    let kw = acc
        .iter()
        .find(|r| r["judge"] == "keyword" && r["condition"] == "all conditions")
        .unwrap();
    assert_eq!(
        (kw["count"].as_u64(), kw["total"].as_u64()),
        (Some(1), Some(1))
    );
    let cl = acc
        .iter()
        .find(|r| r["judge"] == "classifier" && r["condition"] == "all conditions")
        .unwrap();
    assert_eq!(
        (cl["count"].as_u64(), cl["total"].as_u64()),
        (Some(0), Some(1))
    );

    let store = Store::open_read_only(&dir.path().join("study.db")).unwrap();
    let labels = store.human_labels().unwrap();
    assert_eq!(labels.len(), 1);
    assert_eq!(
        (
            labels[0].step_key.as_str(),
            labels[0].row_id.as_str(),
            labels[0].label.as_str(),
            labels[0].labeller.as_str()
        ),
        ("ga", "p2", "refusal", "ann")
    );
    assert!(labels[0].labelled_at > 1.7e9);
    assert_eq!(ids(addr, "label=refusal"), ["ga:p2"]);
    // The queue leaves out what is labelled.
    assert_eq!(
        get(addr, "/api/queue").json()["answers"]
            .as_array()
            .unwrap()
            .len(),
        14
    );

    let u = post_json(
        addr,
        "/api/unlabel",
        &serde_json::json!({"answer_id": "ga:p2", "labeller": "ann"}),
    );
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(u.json()["removed"], true);
    assert!(store.human_labels().unwrap().is_empty());

    // Bad posts are refused with the field named, and write nothing.
    for (body, field) in [
        (
            serde_json::json!({"answer_id": "ga:p2", "label": "maybe", "labeller": "ann"}),
            "label",
        ),
        (
            serde_json::json!({"answer_id": "ga:p99", "label": "refusal", "labeller": "ann"}),
            "answer_id",
        ),
        (
            serde_json::json!({"answer_id": "nokey", "label": "refusal", "labeller": "ann"}),
            "answer_id",
        ),
        (
            serde_json::json!({"answer_id": "ga:p1", "label": "refusal", "labeller": ""}),
            "labeller",
        ),
    ] {
        let a = post_json(addr, "/api/label", &body);
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(
            a.json()["error"]
                .as_str()
                .unwrap()
                .contains(&format!("field `{field}`")),
            "{}",
            a.body
        );
    }
    assert!(store.human_labels().unwrap().is_empty());
    h.shutdown();
}

#[test]
fn the_host_check_key_and_content_type_guard_every_request() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = server(dir.path(), None);
    let addr = h.addr();
    let a = request(addr, "GET", "/", &[("Host", "evil.example:8765")], "");
    assert_eq!(a.status, 403);
    assert!(a.body.contains("evil.example"));
    assert_eq!(
        request(addr, "GET", "/", &[("Host", "localhost:1")], "").status,
        200
    );
    // A cross-site form post (text/plain) is refused before anything is read or written.
    let a = request(
        addr,
        "POST",
        "/api/label",
        &[("Content-Type", "text/plain")],
        r#"{"answer_id": "ga:p2", "label": "refusal", "labeller": "x"}"#,
    );
    assert_eq!(a.status, 415);
    assert_eq!(get(addr, "/api/label").status, 405);
    h.shutdown();

    let h = server(dir.path(), Some("s3cret"));
    let addr = h.addr();
    for path in ["/", "/answers", "/api/answers"] {
        assert_eq!(get(addr, path).status, 401, "{path}");
    }
    assert_eq!(
        request(addr, "GET", "/", &[("Authorization", "Bearer wrong")], "").status,
        401
    );
    assert_eq!(
        request(addr, "GET", "/", &[("Authorization", "Bearer s3cret")], "").status,
        200
    );
    assert_eq!(get(addr, "/?key=wrong").status, 401);
    let a = get(addr, "/answers?q=x&key=s3cret");
    assert_eq!(a.status, 303);
    assert!(
        a.headers.contains("Location: /answers?q=x"),
        "{}",
        a.headers
    );
    assert!(a
        .headers
        .contains("Set-Cookie: safetune_view_key=s3cret; HttpOnly; SameSite=Strict"));
    assert_eq!(
        request(
            addr,
            "GET",
            "/answers",
            &[("Cookie", "a=b; safetune_view_key=s3cret")],
            ""
        )
        .status,
        200
    );
    assert_eq!(
        request(
            addr,
            "GET",
            "/answers",
            &[("Cookie", "safetune_view_key=nope")],
            ""
        )
        .status,
        401
    );
    h.shutdown();

    // A key with characters a cookie cannot hold as they are goes in encoded.
    let h = server(dir.path(), Some("k;e=y,1"));
    let addr = h.addr();
    let a = get(addr, "/?key=k%3Be%3Dy%2C1");
    assert_eq!(a.status, 303, "{}", a.body);
    assert!(
        a.headers
            .contains("Set-Cookie: safetune_view_key=k%3Be%3Dy%2C1;"),
        "{}",
        a.headers
    );
    let cookie = [("Cookie", "safetune_view_key=k%3Be%3Dy%2C1")];
    assert_eq!(request(addr, "GET", "/", &cookie, "").status, 200);
    h.shutdown();

    // Listening beyond loopback without a key is refused; a missing store is named.
    let mut cfg = ViewConfig::new(dir.path());
    cfg.host = "0.0.0.0".into();
    cfg.port = 0;
    let e = start(cfg).err().expect("0.0.0.0 without a key");
    assert!(e.to_string().contains("needs an API key"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = start(ViewConfig::new(empty.path()))
        .err()
        .expect("no store");
    assert!(e.to_string().contains("study.db"), "{e}");
}

#[test]
fn pages_read_while_a_writer_holds_a_transaction_and_see_its_rows_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = server(dir.path(), None);
    let addr = h.addr();
    // The runner's side: a write transaction left open, as while a generate chunk is written.
    let w = rusqlite::Connection::open(dir.path().join("study.db")).unwrap();
    w.execute_batch(
        "BEGIN IMMEDIATE; INSERT INTO generations VALUES \
         ('grun', 'p3', 'harmful prompt number 3', 'partial', 1, 'stop', '{}');",
    )
    .unwrap();
    for page in ["/", "/answers", "/results", "/api/overview"] {
        assert_eq!(get(addr, page).status, 200, "{page}");
    }
    assert_eq!(ids(addr, "").len(), 15);
    w.execute_batch("COMMIT;").unwrap();
    assert_eq!(ids(addr, "").len(), 16);
    assert!(get(addr, "/").body.contains("4 / 10"));
    h.shutdown();
}
