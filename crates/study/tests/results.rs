//! `safetune results`: every answer of a study as one row, in CSV, JSON Lines and Parquet; the
//! Parquet file read back with the crate's own minimal reader.

mod common;

use safetune_study::labels::open_study;
use safetune_study::parquet::{self, ColumnData, Thr};
use safetune_study::results::{answers, export, table, Format};
use safetune_study::store::{HumanLabel, Store};
use serde_json::Value as Json;

fn labelled_study() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::write_study(dir.path());
    let mut s = Store::open(&dir.path().join("study.db")).unwrap();
    let label = |row: &str, label: &str, who: &str| HumanLabel {
        step_key: "ga".into(),
        row_id: row.into(),
        condition: "a".into(),
        benchmark: "harm".into(),
        label: label.into(),
        labeller: who.into(),
        labelled_at: 1.0,
    };
    s.upsert_human_labels(&[
        label("p0", "refusal", "ann"),
        label("p1", "refusal", "ann"),
        label("p1", "compliance", "bob"),
    ])
    .unwrap();
    dir
}

#[test]
fn every_answer_is_one_row_with_verdicts_scores_and_labels() {
    let dir = labelled_study();
    let a = answers(&open_study(dir.path()).unwrap()).unwrap();
    // 6 + 6 finished answers and the 3 a running step has written so far.
    assert_eq!(a.rows.len(), 15);
    assert_eq!(a.judges, ["keyword", "classifier"]);
    assert_eq!(a.rms, ["demo"]);
    let row = |id: &str| a.rows.iter().find(|r| r.answer_id == id).unwrap();
    let r = row("ga:p2");
    assert_eq!(
        r.verdicts,
        [Some("refusal".to_string()), Some("compliance".to_string())]
    );
    assert!(r.judges_disagree());
    assert!(!row("gb:p2").judges_disagree());
    assert_eq!(row("gb:p3").scores, [Some(0.75 - 1.0)]);
    assert_eq!(row("ga:p0").human_label.as_deref(), Some("refusal"));
    assert_eq!(row("ga:p1").human_label.as_deref(), Some("mixed"));
    assert_eq!(row("ga:p1").labellers, ["ann", "bob"]);
    assert_eq!(row("ga:p3").human_label, None);
    assert_eq!(row("ga:p1").seed(), Some(1));
    assert_eq!(row("ga:p1").category, "cat-y");
    // Not judged yet: no verdict, not a disagreement.
    assert_eq!(row("grun:p0").verdicts, [None, None]);
}

#[test]
fn csv_and_jsonl_carry_the_same_rows() {
    let dir = labelled_study();
    let csv_path = dir.path().join("answers.csv");
    let s = export(dir.path(), Format::Csv, Some(&csv_path), &mut Vec::new()).unwrap();
    assert_eq!(s.rows, 15);
    let text = std::fs::read_to_string(&csv_path).unwrap();
    let header = text.lines().next().unwrap();
    assert_eq!(
        header,
        "answer_id,condition,model,stage,seed,benchmark,category,prompt_id,prompt,answer,\
         finish_reason,completion_tokens,judge_keyword,judge_classifier,judges_disagree,rm_demo,\
         human_label,human_labellers"
    );
    // A comma or quote in a field is quoted; the answer with markup is kept as it is.
    assert!(
        text.contains("\"I can't help with that (a, 0).\""),
        "{text}"
    );
    assert!(text.contains(common::SCRIPT_ANSWER));
    assert_eq!(text.matches("\r\n").count(), 16);

    let mut out = Vec::new();
    let s = export(dir.path(), Format::Jsonl, None, &mut out).unwrap();
    assert_eq!(s.rows, 15);
    let jsonl = String::from_utf8(out).unwrap();
    let rows: Vec<Json> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 15);
    // Keys in the CSV's column order.
    let first = jsonl.lines().next().unwrap();
    let keys: Vec<&str> = header.split(',').collect();
    let mut at = 0;
    for k in &keys {
        let i = first[at..]
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} missing or out of order"));
        at += i + 1;
    }
    let p1 = rows.iter().find(|r| r["answer_id"] == "ga:p1").unwrap();
    assert_eq!(p1["human_label"], "mixed");
    assert_eq!(p1["human_labellers"], "ann,bob");
    assert_eq!(p1["seed"], 1);
    assert_eq!(p1["rm_demo"], 0.25);
    assert_eq!(p1["judge_classifier"], "refusal");
    let run = rows.iter().find(|r| r["answer_id"] == "grun:p1").unwrap();
    assert_eq!(run["judge_keyword"], Json::Null);
    assert_eq!(run["seed"], Json::Null);
}

#[test]
fn the_parquet_export_reads_back_with_its_structure() {
    let dir = labelled_study();
    let path = dir.path().join("answers.parquet");
    let s = export(dir.path(), Format::Parquet, Some(&path), &mut Vec::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(s.bytes, bytes.len());
    assert_eq!(&bytes[..4], b"PAR1");
    assert_eq!(&bytes[bytes.len() - 4..], b"PAR1");
    let back = parquet::read(&bytes).unwrap();
    assert_eq!(back.rows, 15);
    // Footer: version 1, one row group of 15 rows, a schema root plus one leaf per column.
    assert_eq!(back.meta.get(1).and_then(Thr::int), Some(1));
    let groups = back.meta.get(4).and_then(Thr::list).unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].get(3).and_then(Thr::int), Some(15));
    let schema = back.meta.get(2).and_then(Thr::list).unwrap();
    let expected = table(&answers(&open_study(dir.path()).unwrap()).unwrap());
    assert_eq!(schema.len(), expected.columns.len() + 1);
    assert_eq!(back.columns, expected.columns);
    let col = |name: &str| back.columns.iter().find(|c| c.name == name).unwrap();
    let ColumnData::Str(answers_col) = &col("answer").data else {
        panic!("answer is not a string column")
    };
    assert_eq!(answers_col[5].as_deref(), Some(common::SCRIPT_ANSWER));
    let ColumnData::Str(labels) = &col("human_label").data else {
        panic!("human_label is not a string column")
    };
    let labels: Vec<Option<&str>> = labels.iter().map(|l| l.as_deref()).collect();
    assert_eq!(&labels[..3], [Some("refusal"), Some("mixed"), None]);
    assert_eq!(labels.iter().filter(|l| l.is_some()).count(), 2);
    let ColumnData::Float(rm) = &col("rm_demo").data else {
        panic!("rm_demo is not a double column")
    };
    assert_eq!(rm[12], None);
    assert_eq!(rm[7], Some(0.25 - 1.0));
    assert!(!col("human_label").required && col("answer").required);
}
