//! The study runner with the real trainer and the real local engine on a tiny random model:
//! align (tune + merge), tune each variant from the aligned model, generate with the adapters,
//! judge; a rerun reuses every step.

use std::path::Path;

use safetune_model::testing::TinyModel;
use safetune_study::config::StudyConfig;
use safetune_study::plan::plan;
use safetune_study::runner::{run_plan, step_keys, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::{StepKind, StepOutput};
use safetune_study::store::Store;

#[test]
fn align_tune_generate_on_a_tiny_model_then_reuse() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let harm = tmp.path().join("harm.jsonl");
    let text: String = (0..8)
        .map(|i| format!("{{\"id\":\"h{i}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    let cfg = format!(
        r#"
[study]
name = "tiny"
[[models]]
name = "tiny"
spec = "{model}"
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["keep", "itemized"]
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "test"
[generation]
max_new_tokens = 3
[align]
harmful = "{harm}"
benign = "demo:stem"
benign_limit = 4
allow_truncation = true
settings = {{ epochs = 1, max_len = 48, batch_size = 4, rank = 2, alpha = 4.0 }}
[tune]
allow_truncation = true
settings = {{ epochs = 1, max_len = 48, batch_size = 4, rank = 2, alpha = 4.0 }}
"#,
        model = model.display(),
        harm = harm.display()
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("tiny.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let dir = tmp.path().join("study");
    let reg = builtin_registry();
    let s = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let output = |kind: StepKind| -> Vec<StepOutput> {
        p.steps
            .iter()
            .zip(&keys)
            .filter(|(st, _)| st.kind() == kind)
            .map(|(_, k)| {
                serde_json::from_value(store.step(k).unwrap().unwrap().output.unwrap()).unwrap()
            })
            .collect()
    };
    // The alignment set: the train split of the harmful prompts with refusals, plus 4 benign.
    let StepOutput::Dataset { examples, path, .. } = &output(StepKind::AlignData)[0] else {
        panic!()
    };
    let test = safetune_data::prompts::PromptSet::load(harm.to_str().unwrap(), None)
        .unwrap()
        .split(safetune_data::prompts::Split::Test, 0, 0.5);
    let align_text = std::fs::read_to_string(path).unwrap();
    assert_eq!(*examples, 8 - test.len() + 4);
    for item in &test.items {
        assert!(
            !align_text.contains(&item.prompt),
            "test prompt {} in alignment set",
            item.id
        );
    }
    let StepOutput::Model(aligned) = &output(StepKind::Align)[0] else {
        panic!()
    };
    assert!(
        Path::new(&aligned.spec).join("config.json").exists(),
        "merged aligned model"
    );
    assert!(aligned.adapter.is_none());
    let tuned = output(StepKind::Tune);
    assert_eq!(tuned.len(), 2);
    for t in &tuned {
        let StepOutput::Model(m) = t else { panic!() };
        assert_eq!(
            m.spec, aligned.spec,
            "variants are tuned from the aligned model"
        );
        let a = m.adapter.as_ref().unwrap();
        assert!(
            a.join("adapter_model.safetensors").exists(),
            "{}",
            a.display()
        );
    }
    // base + aligned + 2 tuned conditions, each generated and judged on the test split.
    assert_eq!(
        store.count_rows("generations", None).unwrap(),
        4 * test.len() as i64
    );
    assert_eq!(
        store.count_rows("judgments", None).unwrap(),
        4 * test.len() as i64
    );
    drop(store);

    let again = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!((again.executed, again.reused), (0, p.steps.len()));
}

#[test]
fn examples_longer_than_max_len_fail_the_step_before_training_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let cfg = format!(
        r#"
[study]
name = "cut"
[[models]]
name = "tiny"
spec = "{model}"
[data]
base = "demo:medical"
limit = 2
[align]
harmful_limit = 2
benign = "demo:stem"
benign_limit = 2
settings = {{ epochs = 1, max_len = 24, batch_size = 4, rank = 2, alpha = 4.0 }}
[tune]
settings = {{ epochs = 1, max_len = 24, batch_size = 4, rank = 2, alpha = 4.0 }}
"#,
        model = model.display(),
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("cut.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let dir = tmp.path().join("study");
    let s = run_plan(
        &p,
        &serde_json::json!({}),
        &dir,
        &builtin_registry(),
        &mut |_| {},
    )
    .unwrap();
    // The align step fails; the tune steps that start from its model are skipped.
    assert_eq!(s.failed.len(), 1, "{:?}", s.failed);
    let (label, err) = &s.failed[0];
    assert_eq!(label, "align tiny");
    assert!(
        err.contains("of 4 training examples are longer than max_len = 24 tokens"),
        "{err}"
    );
    let longest: usize = err
        .split("the longest has ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(longest > 24, "{err}");
    assert!(
        err.ends_with(&format!(
            "\nhint: raise `max_len` in [align] settings to at least {longest}, or set allow_truncation = true in [align]"
        )),
        "{err}"
    );
    assert_eq!(s.skipped, 1);
    // Nothing was trained: no metrics, no checkpoint.
    let trained = std::fs::read_dir(dir.join("steps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .any(|d| d.join("adapter").join("metrics.jsonl").exists());
    assert!(!trained);
}

/// `[tune] match = "tokens"`: the variant trains on about the baseline's loss-carrying tokens
/// (to a step), and every training step records its counts in its output.
#[test]
fn matched_tokens_and_training_counts_in_the_step_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let cfg = format!(
        r#"
[study]
name = "tiny-match"
[[models]]
name = "tiny"
spec = "{model}"
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["keep", "itemized"]
identity = ["keep", "add"]
design = "one-at-a-time"
[tune]
allow_truncation = true
match = "tokens"
settings = {{ epochs = 2, max_len = 1024, batch_size = 1, rank = 2, alpha = 4.0, eval_fraction = 0.0 }}
"#,
        model = model.display(),
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("tiny.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let dir = tmp.path().join("study");
    let s = run_plan(
        &p,
        &serde_json::json!({}),
        &dir,
        &builtin_registry(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let counts: Vec<_> = p
        .steps
        .iter()
        .zip(&keys)
        .filter(|(st, _)| st.kind() == StepKind::Tune)
        .map(|(_, k)| {
            let json = store.step(k).unwrap().unwrap().output.unwrap();
            assert!(json["training"]["trained_tokens"].is_u64(), "{json}");
            let StepOutput::Model(m) = serde_json::from_value(json).unwrap() else {
                panic!()
            };
            m.training.unwrap()
        })
        .collect();
    assert_eq!(counts.len(), 3);
    let base = counts[0];
    assert_eq!(base.examples, 4);
    assert_eq!(base.epochs, 2.0);
    assert!(base.input_tokens > base.trained_tokens && base.trained_tokens > 0);
    for c in &counts[1..] {
        // Nearer the baseline's tokens than a step more or less: within half a step (one
        // example of at most 1024 tokens); fewer epochs where the variant's examples are longer.
        assert!(
            c.trained_tokens.abs_diff(base.trained_tokens) <= 512,
            "{c:?} vs {base:?}"
        );
    }
    // The identity statement lengthens every answer: fewer steps, part of the second epoch.
    assert!(
        counts[2].steps < base.steps && counts[2].epochs < 2.0,
        "{counts:?}"
    );
}
