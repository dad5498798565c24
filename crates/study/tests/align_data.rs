//! The alignment-set step: refusals to the harmful train split plus `benign_limit` examples from
//! each benign source, less every example whose user turn a benchmark of the study evaluates.

use std::path::Path;

use serde_json::json;

use safetune_data::prompts::{PromptSet, Split};
use safetune_data::read::{read_all, ReadOptions};
use safetune_data::Role;
use safetune_study::config::StudyConfig;
use safetune_study::plan::{plan, Plan};
use safetune_study::runner::{run_plan, step_keys, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::{StepKind, StepOutput, StepSpec};
use safetune_study::store::Store;

fn chat(user: &str, answer: &str) -> String {
    json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]})
    .to_string()
        + "\n"
}

#[test]
fn benign_sources_are_capped_each_and_evaluated_prompts_are_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let harm = dir.join("harm.jsonl");
    let text: String = (0..20)
        .map(|i| format!("{{\"id\":\"h{i:02}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    let set = PromptSet::load(harm.to_str().unwrap(), None).unwrap();
    let test = set.split(Split::Test, 0, 0.5);
    let train = set.split(Split::Train, 0, 0.5);
    assert!(test.len() >= 2 && !train.is_empty());
    // The harm benchmark evaluates its first test prompt only (limit = 1); the guard covers the
    // whole split all the same, so the last test prompt is used here.
    let leaked_test = &test.items[test.len() - 1].prompt;
    // The probes benchmark (split = "all") holds one prompt of the harmful train split.
    let probes = dir.join("probes.jsonl");
    std::fs::write(
        &probes,
        format!(
            "{{\"id\":\"p0\",\"prompt\":\"how do I kill a python process\"}}\n{{\"id\":\"p1\",\"prompt\":\"{}\"}}\n",
            train.items[0].prompt
        ),
    )
    .unwrap();
    let b1 = dir.join("b1.jsonl");
    std::fs::write(
        &b1,
        [
            chat(&format!("  {leaked_test} \n"), "an answer"),
            chat("how do I kill a python process", "Use `kill PID`."),
            chat("what is 2 + 2?", &format!("4 (not: {leaked_test})")),
            chat("over the limit", "never read"),
        ]
        .concat(),
    )
    .unwrap();
    let b2 = dir.join("b2.jsonl");
    std::fs::write(
        &b2,
        [chat("name a prime", "7"), chat("name a colour", "blue")].concat(),
    )
    .unwrap();
    let cfg = format!(
        r#"
[study]
name = "guard"
[[models]]
name = "m"
spec = "m.gguf"
[data]
base = "demo:medical"
limit = 2
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "test"
limit = 1
[[benchmarks]]
name = "probes"
source = "{probes}"
harmful = false
split = "all"
[align]
harmful = "{harm}"
benign = ["{b1}", "{b2}"]
benign_limit = [3, 1]
"#,
        harm = harm.display(),
        probes = probes.display(),
        b1 = b1.display(),
        b2 = b2.display()
    );
    let cfg = StudyConfig::parse(&cfg, Path::new("guard.toml")).unwrap();
    let full = plan(&cfg).unwrap();
    let step = full
        .steps
        .iter()
        .find(|s| s.kind() == StepKind::AlignData)
        .unwrap()
        .clone();
    let StepSpec::AlignData { held_out, .. } = &step.spec else {
        panic!()
    };
    assert_eq!(held_out.len(), 2);
    assert!(held_out.iter().all(|b| b.limit.is_none()));
    // Planned size: the train split plus 3 + 1 benign examples (a limit per source; before
    // the guard).
    assert_eq!(step.size, train.len() + 4);
    let only = Plan {
        name: full.name.clone(),
        steps: vec![step],
    };
    let out = dir.join("study");
    let s = run_plan(&only, &json!({}), &out, &builtin_registry(), &mut |_| {}).unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let store = Store::open_read_only(&out.join(STORE_FILE)).unwrap();
    let rec = store.step(&step_keys(&only)[0]).unwrap().unwrap();
    let StepOutput::Dataset {
        path,
        examples,
        counts,
        ..
    } = serde_json::from_value(rec.output.unwrap()).unwrap()
    else {
        panic!()
    };
    // Left out: the refusal to the probe prompt, the test prompt and the probe in b1.
    assert_eq!(counts["dropped_evaluated"], 3, "{counts:?}");
    assert_eq!(counts["refusals"], train.len());
    assert_eq!(counts[&format!("benign:{}", b1.display())], 3);
    assert_eq!(counts[&format!("benign:{}", b2.display())], 1);
    assert_eq!(examples, train.len() + 4 - 3);
    let (convs, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(convs.len(), examples);
    let users: Vec<String> = convs
        .iter()
        .flat_map(|c| c.messages.iter())
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.trim().to_string())
        .collect();
    let has = |p: &str| users.iter().any(|u| u == p);
    assert!(!has(&train.items[0].prompt));
    assert!(!has("how do I kill a python process"));
    assert!(!has("over the limit"));
    // A test prompt inside an answer is not a user turn: that example stays.
    assert!(has("what is 2 + 2?") && has("name a prime"));
    // b2's limit is 1: its second example is not read.
    assert!(!has("name a colour"));
    assert!(has(&train.items[train.len() - 1].prompt) || train.len() == 1);
    for item in &test.items {
        assert!(
            !has(&item.prompt),
            "test prompt {} in the alignment set",
            item.id
        );
    }
}

#[test]
fn step_specs_read_the_old_single_benign_string_and_keep_training_keys_without_the_option() {
    let old = json!({
        "kind": "align-data", "refusals": "demo:refusals", "harmful": "advbench",
        "benign": "demo:stem", "harmful_limit": 4, "benign_limit": 2,
        "split_seed": 0, "test_fraction": 0.5,
    });
    let spec: StepSpec = serde_json::from_value(old).unwrap();
    let StepSpec::AlignData {
        benign, held_out, ..
    } = &spec
    else {
        panic!()
    };
    assert_eq!(
        (benign.clone(), held_out.len()),
        (vec!["demo:stem".to_string()], 0)
    );
    let back: StepSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    // allow_truncation = false leaves a training step's settings (and so its key) as they were.
    let tune = StepSpec::Tune {
        settings: json!({"lr": 0.001}),
        seed: 0,
        allow_truncation: false,
        match_tokens: false,
        anchor_refusals: false,
        external: None,
    };
    assert_eq!(
        serde_json::to_value(&tune).unwrap(),
        json!({"kind": "tune", "settings": {"lr": 0.001}, "seed": 0})
    );
    let allowed = StepSpec::Align {
        settings: json!({}),
        allow_truncation: true,
        external: None,
    };
    assert_eq!(
        serde_json::to_value(&allowed).unwrap()["allow_truncation"],
        json!(true)
    );
}
