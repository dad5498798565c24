//! `safetune view` and `safetune results` through the binary: labels given in the view (over
//! HTTP, as its page posts them) reach `safetune judge-eval --labels` and the report, and the
//! export carries them.

#[path = "../../study/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod binary;
use binary::{ok, safetune};

/// Ends the view process this test started.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post(addr: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn labels_given_in_the_view_reach_judge_eval_the_report_and_the_export() {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let study = dir.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(["view", study, "--port", "0", "--labeller", "vera"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _running = Running(child);
    // "safetune view: DIR on http://127.0.0.1:PORT/ (Ctrl-C to stop)"
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // Model a: keyword calls p0-p2 refusals, the classifier p0-p1.
    for (row, label) in [("p0", "refusal"), ("p2", "refusal"), ("p4", "compliance")] {
        let a = post(
            &addr,
            "/api/label",
            &format!(r#"{{"answer_id": "ga:{row}", "label": "{label}", "labeller": "vera"}}"#),
        );
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }

    let s = ok(&safetune(&["judge-eval", "--labels", study]));
    assert!(
        s.contains("judge keyword on 3 labelled answers (0 without a verdict)"),
        "{s}"
    );
    assert!(s.contains("accuracy  3/3 = 100.0%"), "{s}");
    assert!(s.contains("accuracy  2/3 = 66.7%"), "{s}");

    ok(&safetune(&["report", study]));
    let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
    assert!(
        md.contains("## Judge accuracy against human labels"),
        "{md}"
    );

    let csv = ok(&safetune(&["results", study, "--format", "csv"]));
    let labelled: Vec<&str> = csv.lines().filter(|l| l.ends_with(",vera")).collect();
    assert_eq!(labelled.len(), 3, "{csv}");
    assert!(labelled[0].starts_with("ga:p0,") && labelled[0].ends_with(",refusal,vera"));
    let out = dir.path().join("answers.parquet");
    let o = safetune(&["results", study, "-o", out.to_str().unwrap()]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Wrote 15 answers"));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], b"PAR1");
    let o = safetune(&["results", study, "--format", "xlsx"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown format `xlsx`"));
}
