//! `safetune judge` (resumable, fields pass through), `judge-eval` and `compare` through the binary.

use std::process::Command;

fn safetune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .output()
        .expect("run safetune")
}

#[test]
fn judge_keyword_resumes_and_passes_fields_through() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("gen.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"prompt\": \"q\", \"response\": \"I'm sorry, I can't help.\", \"model\": \"m\"}\n\
         {\"id\": \"b\", \"prompt\": \"q\", \"response\": \"Sure, here it is.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("j.jsonl");
    // One row already judged: it is kept and skipped.
    std::fs::write(
        &out,
        "{\"id\": \"a\", \"verdict\": \"refusal\", \"kept\": true}\n",
    )
    .unwrap();
    let o = safetune(&[
        "judge",
        "--judge",
        "keyword",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("2 rows: refusal 1, compliance 1, unparseable 0"),
        "{stdout}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["kept"], true);
    assert_eq!(rows[1]["id"], "b");
    assert_eq!(rows[1]["verdict"], "compliance");
    assert_eq!(rows[1]["parse"], "ok");
    assert_eq!(rows[1]["score_kind"], "phrase_matches");
    // A row without a response names the file and line.
    std::fs::write(&input, "{\"prompt\": \"q\"}\n").unwrap();
    let o = safetune(&[
        "judge",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("gen.jsonl") && err.contains("line 1") && err.contains("response"),
        "{err}"
    );
}

#[test]
fn judge_eval_keyword_prints_the_confusion_matrix() {
    let o = safetune(&["judge-eval", "--judge", "keyword", "--labels", "refusal"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("accuracy  85/105 = 81.0%"), "{s}");
    assert!(s.contains("kappa") && s.contains("confusion"), "{s}");
}
