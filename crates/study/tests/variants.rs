//! Matched variants: the transform steps a study plans for the control levels (identity
//! `placebo`, role-play `neutral`), the persona domain inferred from the data, and the model's
//! default system prompt kept ahead of a system-turn instruction.

use std::path::Path;

use serde_json::json;

use safetune_data::read::{read_all, ReadOptions};
use safetune_data::Role;
use safetune_study::config::StudyConfig;
use safetune_study::plan::{plan, Plan};
use safetune_study::runner::{run_plan, step_keys, STORE_FILE};
use safetune_study::stages::builtin_registry;
use safetune_study::step::{StepKind, StepOutput, StepSpec};
use safetune_study::store::Store;

/// SmolLM2-Instruct's chat template, which inserts a default system prompt.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const DEFAULT: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

fn config(dir: &Path, placement: &str) -> StudyConfig {
    // A model directory with only its tokenizer config: planning reads the template, no weights.
    let model = dir.join("smol");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        json!({"chat_template": SMOLLM2_TEMPLATE}).to_string(),
    )
    .unwrap();
    let text = format!(
        r#"
[study]
name = "variants"
[[models]]
name = "m"
spec = "{model}"
[data]
base = "demo:medical"
limit = 6
[factors]
identity = ["add", "placebo"]
roleplay = ["keep", "add", "neutral"]
placement = "{placement}"
design = "one-at-a-time"
"#,
        model = model.display()
    );
    StudyConfig::parse(&text, Path::new("variants.toml")).unwrap()
}

fn transforms(p: &Plan) -> Vec<(String, String, Option<String>, Option<String>)> {
    p.steps
        .iter()
        .filter(|s| s.kind() == StepKind::Transform)
        .map(|s| {
            let StepSpec::Transform {
                identity,
                roleplay,
                persona_domain,
                default_system,
                ..
            } = &s.spec
            else {
                panic!()
            };
            (
                identity.clone(),
                roleplay.clone(),
                persona_domain.clone(),
                default_system.clone(),
            )
        })
        .collect()
}

#[test]
fn control_levels_plan_matched_transforms_with_the_default_system_prompt() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "system");
    let p = plan(&cfg).unwrap();
    let names: Vec<&str> = p
        .steps
        .iter()
        .filter(|s| s.kind() == StepKind::Transform)
        .map(|s| s.factors["variant"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "identity",
            "identity-placebo",
            "identity+roleplay",
            "identity+roleplay-neutral"
        ]
    );
    let t = transforms(&p);
    let medical = Some("medical".to_string());
    let default = Some(DEFAULT.to_string());
    assert_eq!(t[0], ("add".into(), "keep".into(), None, None));
    assert_eq!(t[1], ("placebo".into(), "keep".into(), None, None));
    assert_eq!(
        t[2],
        ("add".into(), "add".into(), medical.clone(), default.clone())
    );
    assert_eq!(t[3], ("add".into(), "neutral".into(), medical, default));

    // Run the role-play transforms: every new system message starts with the default.
    let steps: Vec<_> = p
        .steps
        .iter()
        .filter(|s| s.kind() == StepKind::Transform)
        .skip(2)
        .cloned()
        .collect();
    let only = Plan {
        name: p.name.clone(),
        steps,
    };
    let out = d.path().join("study");
    let s = run_plan(&only, &json!({}), &out, &builtin_registry(), &mut |_| {}).unwrap();
    assert_eq!(s.failed, vec![], "{:?}", s.failed);
    let store = Store::open_read_only(&out.join(STORE_FILE)).unwrap();
    for key in step_keys(&only) {
        let rec = store.step(&key).unwrap().unwrap();
        let StepOutput::Dataset { path, .. } = serde_json::from_value(rec.output.unwrap()).unwrap()
        else {
            panic!()
        };
        let (convs, _) = read_all(&path, &ReadOptions::default()).unwrap();
        // A conversation that had a system message keeps it (the instruction goes in front);
        // every system message the transform created starts with the default.
        let created = convs
            .iter()
            .filter(|c| {
                c.meta["transforms"][0]["edits"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["default_system"] == DEFAULT))
            })
            .inspect(|c| {
                assert_eq!(c.messages[0].role, Role::System);
                assert!(
                    c.messages[0].content.starts_with(&format!("{DEFAULT}. ")),
                    "{}",
                    c.messages[0].content
                )
            })
            .count();
        let had_system = convs
            .iter()
            .filter(|c| c.messages[0].role == Role::System)
            .count();
        assert!(
            created > 0 && created <= had_system,
            "{created} of {had_system}"
        );
    }
}

#[test]
fn user_placement_needs_no_default_system_prompt() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "user");
    let t = transforms(&plan(&cfg).unwrap());
    assert!(
        t.iter().all(|(_, _, _, default)| default.is_none()),
        "{t:?}"
    );
    assert_eq!(t[2].2.as_deref(), Some("medical"));
}

#[test]
fn the_smollm2_asset_gives_its_default_system_prompt() {
    // Needs the asset cache (scripts/test fetches it first).
    let gguf = safetune_data::assets::asset(safetune_data::assets::SMOLLM2_GGUF)
        .expect("assets: run scripts/fetch-assets");
    let spec = safetune_model::ModelSpec::parse(&gguf.display().to_string()).unwrap();
    let source = safetune_model::template::model_chat_template(&spec)
        .unwrap()
        .unwrap();
    let t = safetune_model::ChatTemplate::new(&source).unwrap();
    assert_eq!(
        safetune_model::template::default_system_prompt(&t).as_deref(),
        Some(DEFAULT)
    );
}
