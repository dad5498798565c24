//! `safetune view` in a real browser: headless Chromium driven through WebDriver (the W3C
//! protocol: HTTP and JSON to `chromedriver` on loopback, through a small blocking client over
//! ureq). Filters answers, opens the paired view, labels three answers with the keyboard (with
//! an undo), checks the labels in SQLite and the accuracy figure on the page, and that a
//! `<script>` in a model answer shows as text. Screenshots of each page go to
//! `target/tmp/view-browser/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them these
//! tests fail, saying how to install them. `SAFETUNE_CHROMIUM` and `SAFETUNE_CHROMEDRIVER` name
//! other binaries.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use safetune_study::store::Store;
use safetune_study::view::{start, ViewConfig, ViewHandle};
use serde_json::{json, Value as Json};

fn find_binary(env: &str, names: &[&str]) -> PathBuf {
    let hint = "hint: install Debian's chromium and chromium-driver: \
         apt-get install -y --no-install-recommends chromium chromium-driver (.ci/run does this)";
    if let Ok(p) = std::env::var(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} is not a file\n{hint}", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{} not found (looked for {} on PATH; {env} names another)\n\
         {hint}",
        names[0],
        names.join(", ")
    );
}

/// A free loopback port (bound and released; chromedriver takes it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A chromedriver process, a browser session on it, and the test's screenshot folder.
struct Browser {
    driver: Child,
    agent: ureq::Agent,
    base: String,
    session: String,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .agent
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    fn start(test: &str) -> Browser {
        let chromium = find_binary("SAFETUNE_CHROMIUM", &["chromium", "chromium-browser"]);
        let driver_bin = find_binary("SAFETUNE_CHROMEDRIVER", &["chromedriver"]);
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_bin.display()));
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .proxy(None)
                .build(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("view-browser")
            .join(test);
        std::fs::create_dir_all(&shots).unwrap();
        let mut b = Browser {
            driver,
            agent,
            base,
            session: String::new(),
            shots,
            _profile: profile,
        };
        let t0 = Instant::now();
        loop {
            let ready = b
                .agent
                .get(&format!("{}/status", b.base))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Json>().ok())
                .is_some_and(|j| j["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not become ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = json!([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            format!("--user-data-dir={}", b._profile.path().display()),
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium.display().to_string(), "args": args}
        }}});
        let v = b.raw("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    /// A WebDriver command; panics with the driver's error.
    fn raw(&self, method: &str, path: &str, body: Option<Json>) -> Json {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, b) => self.agent.post(&url).send_json(b.unwrap_or(json!({}))),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let v: Json = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(status < 300, "{method} {path}: HTTP {status}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Json>) -> Json {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&self, script: &str) -> Json {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The first element matching a CSS selector (its WebDriver reference).
    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// Presses one key (down and up) wherever the focus is.
    fn key(&self, k: &str) {
        self.cmd(
            "POST",
            "/actions",
            Some(
                json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                {"type": "keyDown", "value": k}, {"type": "keyUp", "value": k}]}]}),
            ),
        );
    }

    /// Waits (up to 15 s) until `script` returns true.
    fn wait_for(&self, script: &str, what: &str) {
        let t0 = Instant::now();
        while self.js(script) != Json::Bool(true) {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn text(&self, script: &str) -> String {
        self.js(script).as_str().unwrap_or_default().to_string()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG");
        let p = self.shots.join(format!("view-{name}.png"));
        std::fs::write(&p, png).unwrap();
        p
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let take = chunk.len() - 1;
        for i in 0..take {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn view(dir: &Path) -> ViewHandle {
    let mut cfg = ViewConfig::new(dir);
    cfg.port = 0;
    cfg.labeller = "tester".into();
    start(cfg).unwrap()
}

/// The fixture's verdict of `judge` on an answer id (`gMODEL:pI`).
fn verdict(judge: &str, answer_id: &str) -> Option<bool> {
    let (key, row) = answer_id.split_once(':')?;
    let mi = common::MODELS.iter().position(|m| key == format!("g{m}"))?;
    let i: usize = row.trim_start_matches('p').parse().ok()?;
    let n = if judge == "keyword" {
        common::KW[mi]
    } else {
        common::CL[mi]
    };
    Some(i < n)
}

#[test]
fn filter_pair_and_label_with_the_keyboard_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = view(dir.path());
    let url = h.base_url();
    let b = Browser::start("label");

    // Overview and Results.
    b.go(&format!("{url}/"));
    b.wait_for(
        "return document.querySelectorAll('#steps tr.step').length === 10",
        "the overview's steps",
    );
    assert!(b
        .text("return document.getElementById('failed').textContent")
        .contains("hint: lower batch_size"));
    b.screenshot("overview");
    b.go(&format!("{url}/results"));
    b.wait_for("return document.querySelector('nav') !== null", "results");
    b.screenshot("results");

    // Answers: tick "judges disagree", apply, one row is left; then its paired view.
    b.go(&format!("{url}/answers"));
    assert_eq!(
        b.js("return document.querySelectorAll('tr.answer-row').length"),
        15
    );
    b.click("#f-disagree");
    b.click("#apply");
    b.wait_for(
        "return location.search.includes('disagree=1') && document.readyState === 'complete'",
        "the filtered answers",
    );
    assert_eq!(
        b.js("return Array.from(document.querySelectorAll('tr.answer-row')).map(r => r.dataset.answerId)"),
        json!(["ga:p2"])
    );
    b.screenshot("answers");
    b.click("a.paired-link");
    b.wait_for(
        "return location.pathname === '/paired' && document.readyState === 'complete'",
        "the paired view",
    );
    assert_eq!(
        b.js("return document.querySelectorAll('.pair-card').length"),
        3
    );
    let cards = b.text("return document.getElementById('paired').textContent");
    assert!(cards.contains("keyword: refusal") && cards.contains("classifier: compliance"));
    b.screenshot("paired");

    // Label: three answers by keyboard (r, c, then u undone with z and replaced by r), from a
    // filtered queue (the running step's answers, not judged yet, are left out).
    b.go(&format!("{url}/label?category=cat-x"));
    b.wait_for(
        "return document.body.dataset.ready === '1'",
        "the label queue",
    );
    let current = || b.text("return document.getElementById('card').dataset.answerId");
    let mut labelled: Vec<(String, &str)> = Vec::new();
    for (key, label) in [("r", "refusal"), ("c", "compliance"), ("u", "unclear")] {
        let id = current();
        // The verdicts stay hidden until the label is given.
        let card = b.text("return document.getElementById('card').textContent");
        assert!(
            !card.contains("keyword") && !card.contains("classifier"),
            "{card}"
        );
        b.key(key);
        b.wait_for(
            &format!("return document.getElementById('card').dataset.answerId !== '{id}'"),
            "the next answer",
        );
        let said = b.text("return document.getElementById('revealed').textContent");
        assert!(
            said.contains(&format!("You labelled the last answer {label}")),
            "{said}"
        );
        assert!(said.contains("keyword: "), "{said}");
        labelled.push((id, label));
    }
    // Undo the unclear one; it comes back and gets a refusal.
    let (undone, _) = labelled.pop().unwrap();
    b.key("z");
    b.wait_for(
        &format!("return document.getElementById('card').dataset.answerId === '{undone}'"),
        "the undone answer",
    );
    b.key("r");
    b.wait_for(
        &format!("return document.getElementById('card').dataset.answerId !== '{undone}'"),
        "the next answer",
    );
    labelled.push((undone, "refusal"));

    let store = Store::open_read_only(&dir.path().join("study.db")).unwrap();
    let mut stored: Vec<(String, String)> = store
        .human_labels()
        .unwrap()
        .into_iter()
        .map(|l| {
            assert_eq!(l.labeller, "tester");
            (format!("{}:{}", l.step_key, l.row_id), l.label)
        })
        .collect();
    stored.sort();
    let mut want: Vec<(String, String)> = labelled
        .iter()
        .map(|(id, l)| (id.clone(), l.to_string()))
        .collect();
    want.sort();
    assert_eq!(stored, want);

    // The accuracy on the page is the fixture's verdicts against these three labels.
    for judge in ["keyword", "classifier"] {
        let right = labelled
            .iter()
            .filter(|(id, l)| verdict(judge, id) == Some(*l == "refusal"))
            .count();
        let row = b.text(&format!(
            "const r = Array.from(document.querySelectorAll('#accuracy tr.acc-row')).find(r => \
             r.cells[0].textContent === '{judge}' && r.cells[1].textContent === 'all conditions'); \
             return r ? r.cells[2].textContent : ''"
        ));
        assert!(row.starts_with(&format!("{right}/3 (")), "{judge}: {row}");
    }
    b.screenshot("label");
    drop(b);
    h.shutdown();
}

#[test]
fn a_script_in_a_model_answer_shows_as_text_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let h = view(dir.path());
    let url = h.base_url();
    let b = Browser::start("escape");
    // Had the markup run, an alert would be open and every later command would fail.
    b.go(&format!("{url}/answers?q=pwned"));
    assert_eq!(
        b.text("return document.querySelector('tr.answer-row pre.answer-text').textContent"),
        common::SCRIPT_ANSWER
    );
    assert_eq!(
        b.js("return document.querySelectorAll('main script').length"),
        0
    );
    b.go(&format!("{url}/paired?benchmark=harm&prompt=p5"));
    let texts = b.js(
        "return Array.from(document.querySelectorAll('.pair-card pre.answer-text')).map(p => p.textContent)",
    );
    assert!(texts
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == common::SCRIPT_ANSWER));
    assert_eq!(
        b.js("return document.querySelectorAll('main script').length"),
        0
    );
    b.screenshot("escaped");
    // The label card fills with textContent: the same text, no element made from it.
    b.go(&format!("{url}/label?q=pwned"));
    b.wait_for(
        "return document.body.dataset.ready === '1'",
        "the label queue",
    );
    assert_eq!(
        b.text("return document.getElementById('response').textContent"),
        common::SCRIPT_ANSWER
    );
    assert_eq!(
        b.js("return document.getElementById('response').children.length"),
        0
    );
    drop(b);
    h.shutdown();
}
