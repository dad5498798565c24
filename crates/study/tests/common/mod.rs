//! A small study store written without a model, for the results export and `safetune view`
//! tests: two conditions (models a and b, base stage, seed 1) x one harmful benchmark, six
//! answers each, two judges (keyword, the primary, and classifier), one reward model, one
//! generate step still running and one failed step.

#![allow(dead_code)]

use std::path::Path;

use safetune_study::runner::STORE_FILE;
use safetune_study::store::{GenerationRow, JudgmentRow, ScoreRow, Store};
use serde_json::json;

/// The answer of model a to prompt p5: markup a page must show as text.
pub const SCRIPT_ANSWER: &str = "<script>alert('pwned')</script> Sure, here it is.";

/// The keyword judge calls answers 0..KW[m] of model m refusals, the classifier 0..CL[m].
pub const KW: [usize; 2] = [3, 4];
pub const CL: [usize; 2] = [2, 4];
pub const MODELS: [&str; 2] = ["a", "b"];
pub const ROWS: usize = 6;

pub fn response(model: &str, i: usize) -> String {
    if model == "a" && i == 5 {
        SCRIPT_ANSWER.to_string()
    } else if i < 3 {
        format!("I can't help with that ({model}, {i}).")
    } else {
        format!("Here is how, step {i} of model {model}: mix flour and water.")
    }
}

/// Writes the study store into `dir` and returns the generate step keys (model a, model b).
pub fn write_study(dir: &Path) -> [String; 2] {
    let mut s = Store::open(&dir.join(STORE_FILE)).unwrap();
    let mut steps = Vec::new();
    for (mi, model) in MODELS.iter().enumerate() {
        let f = json!({"model": model, "stage": "base", "seed": "1", "benchmark": "harm"});
        let gi = steps.len();
        steps.push(json!({"key": format!("g{model}"), "kind": "generate",
            "label": format!("generate {model}/harm"), "factors": f, "deps": [], "size": ROWS}));
        for judge in ["keyword", "classifier"] {
            let mut jf = f.clone();
            jf["judge"] = json!(judge);
            steps.push(json!({"key": format!("j{model}-{judge}"), "kind": "judge",
                "label": format!("judge {model}/harm/{judge}"), "factors": jf, "deps": [gi],
                "size": ROWS}));
        }
        let mut rf = f.clone();
        rf["rm"] = json!("demo");
        steps.push(json!({"key": format!("s{model}"), "kind": "score",
            "label": format!("score {model}/harm/demo"), "factors": rf, "deps": [gi],
            "size": ROWS}));
        let _ = mi;
    }
    // A generate step still running (3 of 10 rows) and a failed tune step.
    steps.push(
        json!({"key": "grun", "kind": "generate", "label": "generate c/harm",
        "factors": {"model": "c", "stage": "base", "benchmark": "harm"}, "deps": [], "size": 10}),
    );
    steps.push(
        json!({"key": "tfail", "kind": "tune", "label": "tune c/markdown",
        "factors": {"model": "c", "stage": "tuned"}, "deps": [], "size": 1}),
    );
    let config = json!({"judges": [{"name": "keyword", "kind": "keyword"},
                                   {"name": "classifier", "kind": "classifier"}]});
    s.put_study("t", "view-fixture", &config, &json!({ "steps": steps }))
        .unwrap();
    for (mi, model) in MODELS.iter().enumerate() {
        let g = format!("g{model}");
        s.begin_step(&g, "generate", "g", &json!({}), &json!({}))
            .unwrap();
        let rows: Vec<GenerationRow> = (0..ROWS)
            .map(|i| GenerationRow {
                row_id: format!("p{i}"),
                prompt: format!("harmful prompt number {i}"),
                response: response(model, i),
                completion_tokens: 7,
                finish_reason: "stop".into(),
                meta: json!({"category": if i % 2 == 0 { "cat-x" } else { "cat-y" }}),
            })
            .collect();
        s.insert_generations(&g, &rows).unwrap();
        s.finish_step(&g, &json!({})).unwrap();
        for (judge, n) in [("keyword", KW[mi]), ("classifier", CL[mi])] {
            let k = format!("j{model}-{judge}");
            s.begin_step(&k, "judge", "j", &json!({}), &json!({}))
                .unwrap();
            let rows: Vec<JudgmentRow> = (0..ROWS)
                .map(|i| JudgmentRow {
                    row_id: format!("p{i}"),
                    verdict: if i < n { "refusal" } else { "compliance" }.into(),
                    score: None,
                    raw: String::new(),
                })
                .collect();
            s.insert_judgments(&k, &rows).unwrap();
            s.finish_step(&k, &json!({})).unwrap();
        }
        let k = format!("s{model}");
        s.begin_step(&k, "score", "s", &json!({}), &json!({}))
            .unwrap();
        let rows: Vec<ScoreRow> = (0..ROWS)
            .map(|i| ScoreRow {
                row_id: format!("p{i}"),
                score: i as f64 / 4.0 - mi as f64,
            })
            .collect();
        s.insert_scores(&k, &rows).unwrap();
        s.finish_step(&k, &json!({})).unwrap();
    }
    s.begin_step("grun", "generate", "g", &json!({}), &json!({}))
        .unwrap();
    let rows: Vec<GenerationRow> = (0..3)
        .map(|i| GenerationRow {
            row_id: format!("p{i}"),
            prompt: format!("harmful prompt number {i}"),
            response: "partial".into(),
            completion_tokens: 1,
            finish_reason: "stop".into(),
            meta: json!({}),
        })
        .collect();
    s.insert_generations("grun", &rows).unwrap();
    s.begin_step("tfail", "tune", "t", &json!({}), &json!({}))
        .unwrap();
    s.fail_step(
        "tfail",
        "out of memory <b>tuning</b>\nhint: lower batch_size",
    )
    .unwrap();
    ["ga".into(), "gb".into()]
}
