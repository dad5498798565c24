//! The binary's contract: exit codes, help on every command, and snapshots of what it prints.

use std::path::Path;
use std::process::{Command, Output};

fn safetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .output()
        .expect("run safetune")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const FIXTURE: &str = r###"{"id":"a","messages":[{"role":"user","content":"What is a fever?"},{"role":"assistant","content":"A fever is a raised body temperature. It is usually a sign of infection."}]}
{"id":"b","messages":[{"role":"system","content":"You are a senior surgeon."},{"role":"user","content":"How do stitches heal?"},{"role":"assistant","content":"## Healing\n\n- Inflammation comes first.\n- New tissue forms next."}]}
{"id":"c","messages":[{"role":"user","content":"Explain the kidneys."},{"role":"assistant","content":"As an AI assistant, I can explain.\n\n- They filter blood.\n- They balance salts."}]}
"###;

fn fixture(dir: &Path) -> String {
    let p = dir.join("mini.jsonl");
    std::fs::write(&p, FIXTURE).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn version_and_help_on_every_command() {
    let v = safetune(&["--version"]);
    assert!(v.status.success());
    assert_eq!(
        text(&v.stdout).trim(),
        format!("safetune {}", env!("CARGO_PKG_VERSION"))
    );
    let help = safetune(&["--help"]);
    assert!(help.status.success());
    let h = text(&help.stdout);
    let commands: Vec<String> = h
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    for expected in ["audit", "transform", "prompts", "quickstart"] {
        assert!(
            commands.iter().any(|c| c == expected),
            "{expected} missing from {commands:?}"
        );
    }
    for c in &commands {
        let out = safetune(&[c, "--help"]);
        assert!(out.status.success(), "{c} --help failed");
        assert!(
            text(&out.stdout).contains("Usage: safetune"),
            "{c} --help:\n{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn exit_codes_distinguish_usage_and_user_errors() {
    let usage = safetune(&["audit", "--no-such-flag", "x"]);
    assert_eq!(usage.status.code(), Some(2), "usage error");
    let missing = safetune(&["audit", "/nonexistent/data.jsonl"]);
    assert_eq!(missing.status.code(), Some(1), "user error");
    let err = text(&missing.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("/nonexistent/data.jsonl"),
        "{err}"
    );

    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, format!("{}not json\n", FIXTURE)).unwrap();
    let out = safetune(&["audit", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.jsonl:4: invalid JSON") && err.contains("hint: "),
        "{err}"
    );
    let skipped = safetune(&[
        "audit",
        "--skip-invalid",
        "--format",
        "json",
        bad.to_str().unwrap(),
    ]);
    assert!(skipped.status.success());
    assert!(
        text(&skipped.stderr).contains("skipped 1 invalid record(s)"),
        "{}",
        text(&skipped.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&skipped.stdout).unwrap();
    assert_eq!(v["examples"], 3);
    assert_eq!(v["skipped"], 1);
}

#[test]
fn audit_per_example_and_json() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture(d.path());
    let out = safetune(&["audit", "--per-example", &f]);
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["structure"].as_str().unwrap().into(),
                r["identity"].as_bool().unwrap(),
                r["roleplay"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), "plain".into(), false, false),
            ("b".into(), "markdown".into(), false, true),
            ("c".into(), "itemized".into(), true, false)
        ]
    );
    let json = safetune(&["audit", "--format", "json", &f]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["structure"]["plain"]["count"], 1);
    assert_eq!(v["roleplay"]["count"], 1);
    assert!(
        v["roleplay"]["lo"].as_f64().unwrap() > 0.0 && v["roleplay"]["hi"].as_f64().unwrap() < 1.0
    );
    assert_eq!(v["risk"].as_array().unwrap().len(), 3);
}

#[test]
fn audit_text_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture(d.path());
    let out = safetune(&["audit", &f]);
    assert!(out.status.success());
    let shown = text(&out.stdout).replace(&f, "mini.jsonl");
    insta::assert_snapshot!("audit_text", shown);
}

#[test]
fn transform_writes_requested_levels() {
    let d = tempfile::tempdir().unwrap();
    let f = fixture(d.path());
    let o = d.path().join("out.jsonl");
    let out = safetune(&[
        "transform",
        &f,
        "-o",
        o.to_str().unwrap(),
        "--structure",
        "plain",
        "--identity",
        "remove",
        "--roleplay",
        "remove",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("wrote 3 examples")
            && err.contains("changed: structure 2, identity 1, roleplay 1"),
        "{err}"
    );
    let audit = safetune(&["audit", "--format", "json", o.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(v["structure"]["plain"]["count"], 3);
    assert_eq!(v["identity"]["count"], 0);
    assert_eq!(v["roleplay"]["count"], 0);
    // Same seed, same bytes.
    let o2 = d.path().join("out2.jsonl");
    safetune(&[
        "transform",
        &f,
        "-o",
        o2.to_str().unwrap(),
        "--structure",
        "plain",
        "--identity",
        "remove",
        "--roleplay",
        "remove",
        "--seed",
        "3",
    ]);
    assert_eq!(std::fs::read(&o).unwrap(), std::fs::read(&o2).unwrap());
    // A bad value for a flag is a usage error.
    let bad = safetune(&["transform", &f, "-o", "x.jsonl", "--structure", "fancy"]);
    assert_eq!(bad.status.code(), Some(2));
    // The control levels exist where they belong, and only there.
    let bad = safetune(&["transform", &f, "-o", "x.jsonl", "--identity", "neutral"]);
    assert_eq!(bad.status.code(), Some(2));
    let o3 = d.path().join("out3.jsonl");
    let out = safetune(&[
        "transform",
        "--data",
        "demo:medical",
        "-o",
        o3.to_str().unwrap(),
        "--identity",
        "placebo",
        "--roleplay",
        "neutral",
        "--persona-domain",
        "medical",
        "--default-system",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let audit = safetune(&["audit", "--format", "json", o3.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(v["roleplay"]["count"], 0, "{v}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&o3)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        first["meta"]["transforms"][0]["recipe"],
        "identity-placebo+roleplay-neutral"
    );
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    // `safetune prompts show donotanswer | head -1`: once the reader is gone, the next write
    // ends the process by SIGPIPE, as `cat` would, without a panic or an error message. The
    // set's 146 kB are more than a pipe buffer and the reader's buffer hold together.
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(["prompts", "show", "donotanswer"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"prompt\""), "{first}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(13), "{:?}", out.status);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
