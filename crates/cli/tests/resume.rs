//! Every command that resumes from its JSONL output (`generate`, `judge`, `eval`, `rm score`)
//! keeps every finished row when the output holds a garbage line or a last line cut by a kill:
//! the bad lines go to `OUT.corrupt`, stderr names the file and each line, the finished rows
//! stay byte for byte, and only the rows that were lost are done again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetune_model::reward::write_tiny_seq_cls;
use safetune_model::testing::TinyModel;

fn run(home: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .env("SAFETUNE_HOME", home)
        .output()
        .expect("run safetune");
    assert!(
        out.status.success(),
        "safetune {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn corrupt(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap().to_os_string();
    name.push(".corrupt");
    out.with_file_name(name)
}

/// Replaces `out` (n >= 4 finished rows) by: row 1, a garbage line, rows 3 to n-1, and the first
/// half of row n without its newline (a kill mid-write). Returns the clean rows and the cut.
fn damage(out: &Path) -> (Vec<String>, String) {
    let text = std::fs::read_to_string(out).unwrap();
    let rows: Vec<String> = text.lines().map(str::to_string).collect();
    let n = rows.len();
    assert!(n >= 4, "{}: {n} rows", out.display());
    let cut = rows[n - 1][..rows[n - 1].len() / 2].to_string();
    let mut damaged = format!("{}\n{{garbage\n", rows[0]);
    for r in &rows[2..n - 1] {
        damaged.push_str(r);
        damaged.push('\n');
    }
    damaged.push_str(&cut);
    std::fs::write(out, damaged).unwrap();
    (rows, cut)
}

/// After a resume: the kept rows come first, unchanged; the two lost rows were written again
/// (equal to the clean run's, the runs being deterministic); the bad lines are in OUT.corrupt
/// and stderr named the file and both line numbers.
fn check_resumed(out: &Path, rows: &[String], cut: &str, stderr: &str) {
    let n = rows.len();
    let text = std::fs::read_to_string(out).unwrap();
    let mut kept = format!("{}\n", rows[0]);
    for r in &rows[2..n - 1] {
        kept.push_str(r);
        kept.push('\n');
    }
    assert!(
        text.starts_with(&kept),
        "{}: the finished rows changed:\n{text}",
        out.display()
    );
    let redone: BTreeSet<&str> = text[kept.len()..].lines().collect();
    let lost: BTreeSet<&str> = [rows[1].as_str(), rows[n - 1].as_str()].into();
    assert_eq!(redone, lost, "{}", out.display());
    assert_eq!(
        std::fs::read_to_string(corrupt(out)).unwrap(),
        format!("{{garbage\n{cut}\n")
    );
    let name = out.display().to_string();
    for line in [2, n] {
        let want = format!("{name}: line {line} ");
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&want) && l.contains(".corrupt")),
            "no message naming {want:?}:\n{stderr}"
        );
    }
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let text: String = (0..5)
        .map(|i| format!("{{\"id\": \"p{i}\", \"prompt\": \"Tell me about topic {i}.\"}}\n"))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn generate_and_eval_keep_finished_rows_and_redo_lost_ones() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let model = TinyModel::default()
        .write(&dir.path().join("tiny"))
        .unwrap();
    let model = model.to_str().unwrap();
    let data = prompts(dir.path());
    let out = dir.path().join("gen.jsonl");
    let args = [
        "generate",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "3",
    ];
    run(&home, &args);
    let (rows, cut) = damage(&out);
    let o = run(&home, &args);
    check_resumed(&out, &rows, &cut, &String::from_utf8_lossy(&o.stderr));

    // eval resumes two files: its generations and its judgments.
    let edir = dir.path().join("eval");
    let args = [
        "eval",
        "--model",
        model,
        "--bench",
        data.to_str().unwrap(),
        "--judge",
        "keyword",
        "-o",
        edir.to_str().unwrap(),
        "--max-new-tokens",
        "3",
    ];
    run(&home, &args);
    let gen = edir.join("generations.jsonl");
    let judged = edir.join("judgments.jsonl");
    let (grows, gcut) = damage(&gen);
    let (jrows, jcut) = damage(&judged);
    let o = run(&home, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    check_resumed(&gen, &grows, &gcut, &err);
    check_resumed(&judged, &jrows, &jcut, &err);
}

#[test]
fn judge_and_rm_score_keep_finished_rows_and_redo_lost_ones() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let input = dir.path().join("answers.jsonl");
    let text: String = (0..6)
        .map(|i| {
            let response = if i % 2 == 0 {
                "I'm sorry, I can't help with that."
            } else {
                "Sure, here it is."
            };
            format!("{{\"id\": \"a{i}\", \"prompt\": \"q{i}\", \"response\": \"{response}\"}}\n")
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("judged.jsonl");
    let args = [
        "judge",
        "--judge",
        "keyword",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    run(&home, &args);
    let (rows, cut) = damage(&out);
    let o = run(&home, &args);
    check_resumed(&out, &rows, &cut, &String::from_utf8_lossy(&o.stderr));

    let rm = dir.path().join("rm");
    write_tiny_seq_cls(
        &rm,
        &TinyModel::default(),
        "LlamaForSequenceClassification",
        1,
    )
    .unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    let text: String = (0..5)
        .map(|i| {
            format!(
                "{{\"id\": \"p{i}\", \"prompt\": \"Question {i}?\", \"chosen\": \"A careful answer {i}.\", \"rejected\": \"No.\"}}\n"
            )
        })
        .collect();
    std::fs::write(&pairs, text).unwrap();
    let out = dir.path().join("scores.jsonl");
    let args = [
        "rm",
        "score",
        "--rm",
        rm.to_str().unwrap(),
        "--data",
        pairs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    run(&home, &args);
    let (rows, cut) = damage(&out);
    let o = run(&home, &args);
    check_resumed(&out, &rows, &cut, &String::from_utf8_lossy(&o.stderr));
}
