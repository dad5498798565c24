//! `safetune study` as a process: `kill -9` in the middle of a generate step, then `--resume`
//! redoes no finished step and loses no finished row; a second runner meanwhile fails at once
//! on the study lock while `safetune report` reads. The model is a slow OpenAI-compatible
//! fake on loopback, so the kill lands while rows are being committed; the store is read with a
//! second, read-only connection while the study writes (WAL).

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use safetune_study::runner::STORE_FILE;
use safetune_study::store::Store;

/// Answers every chat request after `delay` with a refusal; counts requests. While the
/// returned flag is set, answers are held back (the study waits, still running).
fn slow_server(delay: Duration) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(AtomicBool::new(false));
    let (c, h) = (count.clone(), hold.clone());
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let (c, h) = (c.clone(), h.clone());
            std::thread::spawn(move || loop {
                let mut r = BufReader::new(s.try_clone().unwrap());
                if safetune_openai::testing::read_request_body(&mut r).is_none() {
                    return;
                }
                c.fetch_add(1, Ordering::SeqCst);
                while h.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(delay);
                let text = r#"{"id":"x","object":"chat.completion","created":0,"model":"fake","choices":[{"index":0,"message":{"role":"assistant","content":"I cannot help with that."},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":6,"total_tokens":9}}"#;
                if write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
                .is_err()
                {
                    return;
                }
            });
        }
    });
    (url, count, hold)
}

const PROMPTS: usize = 30;

fn write_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let prompts = dir.join("harm.jsonl");
    let text: String = (0..PROMPTS)
        .map(|i| format!("{{\"id\":\"h{i:02}\",\"prompt\":\"harmful request {i}\"}}\n"))
        .collect();
    std::fs::write(&prompts, text).unwrap();
    let cfg = dir.join("study.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[study]
name = "killed"
[[models]]
name = "fake"
spec = "openai:{url}#fake"
concurrency = 1
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["keep", "markdown"]
[[benchmarks]]
name = "harm"
source = "{}"
harmful = true
split = "all"
[generation]
chunk_size = 1
"#,
            prompts.display()
        ),
    )
    .unwrap();
    cfg
}

fn study(cfg: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safetune"));
    c.arg("study").arg(cfg).arg("--output").arg(out).args(extra);
    c
}

#[test]
fn kill_9_then_resume_redoes_no_finished_step_and_loses_no_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, requests, hold) = slow_server(Duration::from_millis(120));
    let cfg = write_config(tmp.path(), &url);
    let out = tmp.path().join("run");
    let mut child = study(&cfg, &out, &["--no-report"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Watch the store from a second, read-only connection while the study writes.
    let db = out.join(STORE_FILE);
    let start = Instant::now();
    let mut seen = 0;
    while seen < 8 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the study never stored 8 rows"
        );
        if db.exists() {
            if let Ok(s) = Store::open_read_only(&db) {
                seen = s.count_rows("generations", None).unwrap_or(0);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second runner on the same directory fails at once, naming the directory and the pid
    // of the first; the report is a reader and runs while the first holds the lock. The server
    // holds its answers meanwhile, so the first is still generating however slow the machine.
    hold.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut second = study(&cfg, &out, &["--resume"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while second.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            for c in [&mut second, &mut child] {
                c.kill().unwrap();
                c.wait().unwrap();
            }
            panic!("a second runner on the same directory did not stop at once");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&out.display().to_string()) && err.contains(&format!("pid {}", child.id())),
        "{err}"
    );
    let report = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .arg("report")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(child.try_wait().unwrap().is_none(), "the first run goes on");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    hold.store(false, Ordering::SeqCst);

    let s = Store::open_read_only(&db).unwrap();
    let rows_before = s.generations(&gen_key(&s)).unwrap();
    assert!(
        rows_before.len() >= 8 && rows_before.len() < PROMPTS,
        "{}",
        rows_before.len()
    );
    let steps_before = s.steps().unwrap();
    let done_before: Vec<String> = steps_before
        .iter()
        .filter(|r| r.status == "done")
        .map(|r| r.key.clone())
        .collect();
    // model + 2 transforms + 2 audits finished before generation began.
    assert_eq!(done_before.len(), 5, "{steps_before:?}");
    assert_eq!(
        steps_before
            .iter()
            .find(|r| r.kind == "generate")
            .unwrap()
            .status,
        "running"
    );
    drop(s);
    let requests_before = requests.load(Ordering::SeqCst);

    // Without --resume, an existing store is not silently reused.
    let refused = study(&cfg, &out, &[]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--resume") && err.contains("hint:"), "{err}");

    let resumed = study(&cfg, &out, &["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("5 reused from the store"), "{stderr}");
    // The generate step the kill left `running` is redone, and said so.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("redo") && l.contains("left running by a run that stopped")),
        "{stderr}"
    );

    let s = Store::open_read_only(&db).unwrap();
    let rows_after = s.generations(&gen_key(&s)).unwrap();
    assert_eq!(rows_after.len(), PROMPTS);
    for r in &rows_before {
        assert!(rows_after.contains(r), "row {} lost or changed", r.row_id);
    }
    // Only the missing rows were requested again.
    assert_eq!(
        requests.load(Ordering::SeqCst) - requests_before,
        PROMPTS - rows_before.len()
    );
    for r in s.steps().unwrap() {
        assert_eq!(r.status, "done", "{}", r.label);
        let expected = if r.kind == "generate" { 2 } else { 1 };
        assert_eq!(
            r.executions, expected,
            "{} ran {} times",
            r.label, r.executions
        );
        if done_before.contains(&r.key) {
            assert_eq!(r.executions, 1);
        }
    }
    // The report was written at the end and counts every row.
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| fake base | 100.0% |"), "{summary}");
}

fn gen_key(s: &Store) -> String {
    s.steps()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == "generate")
        .unwrap()
        .key
}

/// `--dry-run` prints the plan, then the power of each main effect and the compute estimate;
/// the tiny quickstart has one seed, so no effect has an interval.
#[test]
fn dry_run_prints_power_and_compute() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .current_dir(&root)
        .args(["study", "examples/quickstart-tiny.toml", "--dry-run"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Study `quickstart-tiny`"), "{text}");
    assert!(text.contains("Power: detectable effect"), "{text}");
    assert!(text.contains(": no interval: one run per cell"), "{text}");
    assert!(text.contains("trained tokens: ~"), "{text}");
    assert!(text.contains("generated tokens: at most "), "{text}");
    assert!(text.contains("local wall time on this machine"), "{text}");
}
