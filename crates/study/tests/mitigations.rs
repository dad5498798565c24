//! `[mitigations]` and `[utility]`: the plan of the arms, and a whole study with every arm on a
//! tiny random model (the real trainer, projection, utility measures and report).

use std::collections::BTreeMap;
use std::path::Path;

use safetune_model::testing::TinyModel;
use safetune_study::config::StudyConfig;
use safetune_study::plan::plan;
use safetune_study::runner::{run_plan, step_keys, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::{StepKind, StepOutput, StepSpec};
use safetune_study::store::Store;

/// A study config on `model` with every arm; `extra` is appended.
fn config(model: &Path, harm: &Path, extra: &str) -> String {
    format!(
        r#"
[study]
name = "arms"
seeds = [0, 1]
[[models]]
name = "tiny"
spec = "{model}"
[data]
base = "demo:medical"
limit = 4
[factors]
structure = ["plain"]
roleplay = ["add"]
[[benchmarks]]
name = "harm"
source = "{harm}"
harmful = true
split = "test"
[[benchmarks]]
name = "benign"
source = "overrefusal"
harmful = false
split = "test"
limit = 3
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
settings = {{ epochs = 1, max_len = 320, batch_size = 4, rank = 2, alpha = 4.0, eval_fraction = 0.0 }}
[mitigations]
data = true
replay = 0.2
project = {{ projector = "scaled", share = 0.5 }}
anchor = {{ beta = 0.5, on = "refusals", batch_size = 2 }}
[utility]
heldout = "{heldout}"
heldout_limit = 3
mcq_limit = 4
{extra}
"#,
        model = model.display(),
        harm = harm.display(),
        heldout = harm.with_file_name("heldout.jsonl").display(),
    )
}

fn harmful_prompts(dir: &Path) -> std::path::PathBuf {
    let harm = dir.join("harm.jsonl");
    let text: String = (0..8)
        .map(|i| format!("{{\"id\":\"h{i}\",\"prompt\":\"do a bad thing {i}\"}}\n"))
        .collect();
    std::fs::write(&harm, text).unwrap();
    // Short held-out conversations (the tiny model's context is 512 characters-ish tokens).
    let heldout: String = (0..5)
        .map(|i| {
            format!(
                "{{\"id\":\"u{i}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is {i} plus {i}?\"}},{{\"role\":\"assistant\",\"content\":\"It is {}.\"}}]}}\n",
                2 * i
            )
        })
        .collect();
    std::fs::write(harm.with_file_name("heldout.jsonl"), heldout).unwrap();
    harm
}

#[test]
fn arms_are_planned_beside_their_variant_with_its_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let harm = harmful_prompts(tmp.path());
    let cfg = StudyConfig::parse(&config(&model, &harm, ""), Path::new("arms.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let arms = |kind: StepKind| -> Vec<(String, String)> {
        p.steps
            .iter()
            .filter(|s| s.kind() == kind)
            .map(|s| {
                (
                    s.factors.get("mitigation").cloned().unwrap_or_default(),
                    s.factors.get("seed").cloned().unwrap_or_default(),
                )
            })
            .collect()
    };
    // Per seed: the variant (none), then the anchor arm; the data and replay arms' own datasets.
    let tunes = arms(StepKind::Tune);
    for seed in ["0", "1"] {
        let of_seed: Vec<&str> = tunes
            .iter()
            .filter(|(_, s)| s == seed)
            .map(|(a, _)| a.as_str())
            .collect();
        assert_eq!(
            of_seed,
            vec!["none", "anchor", "data", "replay"],
            "{tunes:?}"
        );
    }
    assert_eq!(arms(StepKind::Project).len(), 2);
    // Every arm keeps the variant's labels.
    for s in p.steps.iter().filter(|s| s.kind() == StepKind::Tune) {
        assert_eq!(s.factors["variant"], "plain+roleplay", "{}", s.label);
        assert_eq!(s.factors["structure"], "plain");
        assert_eq!(s.factors["roleplay"], "add");
    }
    // The data arm is the variant's data made again with the preset's levels.
    let data = p
        .steps
        .iter()
        .find(|s| s.kind() == StepKind::Transform && s.factors["mitigation"] == "data")
        .unwrap();
    let StepSpec::Transform {
        structure,
        identity,
        roleplay,
        persona_domain,
        ..
    } = &data.spec
    else {
        panic!()
    };
    assert_eq!(
        (structure.as_str(), identity.as_str(), roleplay.as_str()),
        ("markdown", "add", "remove")
    );
    assert_eq!(persona_domain, &None, "a removed persona needs no domain");
    // The anchor arm: the trainer's anchor settings, and the alignment set as its last input.
    let anchor = p
        .steps
        .iter()
        .find(|s| s.kind() == StepKind::Tune && s.factors["mitigation"] == "anchor")
        .unwrap();
    let StepSpec::Tune {
        settings,
        anchor_refusals,
        ..
    } = &anchor.spec
    else {
        panic!()
    };
    assert!(anchor_refusals);
    assert_eq!(settings["anchor"], "base");
    assert_eq!(settings["anchor_beta"], 0.5);
    assert_eq!(settings["anchor_batch_size"], 2);
    let last = *anchor.deps.last().unwrap();
    assert_eq!(p.steps[last].kind(), StepKind::AlignData);
    // The project arm reads the variant's tune step and the align step.
    let project = p
        .steps
        .iter()
        .find(|s| s.kind() == StepKind::Project)
        .unwrap();
    assert_eq!(p.steps[project.deps[0]].kind(), StepKind::Tune);
    assert_eq!(p.steps[project.deps[0]].factors["mitigation"], "none");
    assert_eq!(p.steps[project.deps[1]].kind(), StepKind::Align);
    // One utility step per condition: base, aligned, and 5 arms x 2 seeds.
    assert_eq!(arms(StepKind::Utility).len(), 12);
    let StepSpec::Utility {
        heldout_skip,
        heldout_limit,
        mcq_limit,
        ..
    } = &p
        .steps
        .iter()
        .find(|s| s.kind() == StepKind::Utility)
        .unwrap()
        .spec
    else {
        panic!()
    };
    assert_eq!((*heldout_skip, *heldout_limit, *mcq_limit), (0, 3, 4));
}

#[test]
fn bad_mitigation_settings_name_their_field() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let harm = harmful_prompts(tmp.path());
    let parse = |text: String| {
        StudyConfig::parse(&text, Path::new("arms.toml"))
            .unwrap_err()
            .to_string()
    };
    let base = config(&model, &harm, "");
    let e = parse(base.replace("[mitigations]", "[mitigations]\napply_to = [\"markdown\"]"));
    assert!(
        e.contains("mitigations.apply_to[0]") && e.contains("variants: plain+roleplay"),
        "{e}"
    );
    let e = parse(base.replace("replay = 0.2", "replay = 1.5"));
    assert!(e.contains("mitigations.replay"), "{e}");
    let e = parse(base.replace("projector = \"scaled\"", "projector = \"svd\""));
    assert!(e.contains("mitigations.project.projector"), "{e}");
    let e = parse(base.replace("share = 0.5", "share = 0.5, threshold = 0.2"));
    assert!(e.contains("not both"), "{e}");
    let e = parse(base.replace("beta = 0.5", "beta = 0.0"));
    assert!(e.contains("mitigations.anchor.beta"), "{e}");
    let e = parse(
        base.replace("limit = 4\n[factors]", "[factors]")
            .replace("heldout = \"", "heldout = \"auto\"\n# \""),
    );
    assert!(e.contains("utility.heldout"), "{e}");
}

#[test]
fn every_arm_runs_on_a_tiny_model_and_the_report_compares_it_with_none() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinyModel::default()
        .write(&tmp.path().join("tiny"))
        .unwrap();
    let harm = harmful_prompts(tmp.path());
    let cfg = StudyConfig::parse(&config(&model, &harm, ""), Path::new("arms.toml")).unwrap();
    let p = plan(&cfg).unwrap();
    let dir = tmp.path().join("study");
    let reg = builtin_registry();
    let s = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let keys = step_keys(&p);
    let store = Store::open_read_only(&dir.join(STORE_FILE)).unwrap();
    let output = |i: usize| -> StepOutput {
        serde_json::from_value(store.step(&keys[i]).unwrap().unwrap().output.unwrap()).unwrap()
    };
    // The projected adapter: a new directory beside the tuned one, with its per-layer figures;
    // at share 0.5 some layers changed and the others are as tuned.
    for (i, st) in p.steps.iter().enumerate() {
        if st.kind() != StepKind::Project {
            continue;
        }
        let StepOutput::Model(projected) = output(i) else {
            panic!()
        };
        let StepOutput::Model(tuned) = output(st.deps[0]) else {
            panic!()
        };
        let (pa, ta) = (
            projected.adapter.clone().unwrap(),
            tuned.adapter.clone().unwrap(),
        );
        assert_ne!(pa, ta);
        assert_eq!(
            projected.spec, tuned.spec,
            "the same base as the tuned adapter"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(pa.join("projection.json")).unwrap())
                .unwrap();
        let layers = summary["layers"].as_array().unwrap();
        let projected_n = layers.iter().filter(|l| l["projected"] == true).count();
        assert!(projected_n > 0 && projected_n < layers.len(), "{summary}");
        let a = safetune_model::adapter::Adapter::load(&pa).unwrap();
        let b = safetune_model::adapter::Adapter::load(&ta).unwrap();
        assert_eq!(a.config.r, b.config.r, "projection keeps the rank");
    }
    // The anchor arm trained on the alignment set's refusals only.
    let anchor = p
        .steps
        .iter()
        .position(|s| s.kind() == StepKind::Tune && s.factors["mitigation"] == "anchor")
        .unwrap();
    let anchor_dir = store.step(&keys[anchor]).unwrap().unwrap().output.unwrap();
    let adapter = std::path::PathBuf::from(anchor_dir["adapter"].as_str().unwrap());
    let refusals =
        std::fs::read_to_string(adapter.parent().unwrap().join("anchor_refusals.jsonl")).unwrap();
    assert!(refusals.lines().count() >= 1);
    assert!(
        refusals.lines().all(|l| l.contains("\"source\":\"align\"")),
        "{refusals}"
    );
    // Utility for every condition, with per-item results.
    let mut utility = 0;
    for (i, st) in p.steps.iter().enumerate() {
        if st.kind() != StepKind::Utility {
            continue;
        }
        let StepOutput::Utility(u) = output(i) else {
            panic!()
        };
        assert_eq!((u.heldout_examples, u.mcq_total), (3, 4), "{}", st.label);
        assert_eq!(u.mcq_items.len(), 4);
        assert!(u.loss.is_finite() && u.loss > 0.0);
        utility += 1;
    }
    assert_eq!(utility, 12);
    drop(store);

    let r = safetune_study::report::collect(&dir).unwrap();
    assert_eq!(r.utility.len(), 12);
    let m = r.mitigations.expect("a mitigations section");
    let arms: BTreeMap<&str, &safetune_study::report::ArmRow> =
        m.arms.iter().map(|a| (a.arm.as_str(), a)).collect();
    assert_eq!(
        arms.keys().copied().collect::<Vec<_>>(),
        vec!["anchor", "data", "none", "project", "replay"]
    );
    for (name, a) in &arms {
        assert_eq!(a.runs, 2, "{name}");
        assert!(
            a.safety.is_some() && a.over_refusal.is_some() && a.mcq.is_some(),
            "{name}"
        );
        let ds = a
            .d_safety
            .unwrap_or_else(|| panic!("{name}: no safety change"));
        let da = a
            .d_mcq
            .unwrap_or_else(|| panic!("{name}: no accuracy change"));
        if *name == "none" {
            assert_eq!((ds.estimate, da.estimate), (0.0, 0.0));
        } else {
            // Two seeds per arm: an interval for the loss change (the tiny model's verdicts do
            // not vary, so the rate changes are 0 with "no interval: no variation").
            assert!(a.d_loss.unwrap().ci95.is_some(), "{name}");
            assert_eq!(ds.n_runs, 2, "{name}");
        }
    }
    assert!(m.arms.iter().any(|a| a.pareto), "some arm is on the front");
    let (_, files) = safetune_study::report::write_report(&dir).unwrap();
    let md = std::fs::read_to_string(files.markdown).unwrap();
    assert!(
        md.contains("## Mitigations") && md.contains("## Utility"),
        "{md}"
    );
    let html = std::fs::read_to_string(files.html).unwrap();
    assert!(html.contains("Safety change against accuracy change"));

    let again = run_plan(&p, &serde_json::json!({}), &dir, &reg, &mut |_| {}).unwrap();
    assert_eq!((again.executed, again.reused), (0, p.steps.len()));
}
