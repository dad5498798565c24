//! Every study config in `examples/` loads (trainer settings included) and plans; a new example
//! is covered by being there.

use std::path::{Path, PathBuf};

use safetune_study::config::StudyConfig;
use safetune_study::plan::plan;
use safetune_study::step::StepSpec;
use safetune_study::train_stage::tune_config;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_loads_and_plans() {
    let files = examples();
    assert!(files.len() >= 3, "{files:?}");
    for file in &files {
        let name = file.display();
        let cfg = StudyConfig::load(file).unwrap_or_else(|e| panic!("{e}"));
        let p = plan(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!p.steps.is_empty(), "{name}: empty plan");
        // Every external train step's exact command line renders (no mapping error).
        let commands = safetune_study::external_train::render_commands(&p, Path::new("runs/x"));
        assert!(!commands.contains("error:"), "{name}: {commands}");
        // The trainer builds its config from every align/tune step as the stage does.
        for s in &p.steps {
            let (StepSpec::Align { settings, .. } | StepSpec::Tune { settings, .. }) = &s.spec
            else {
                continue;
            };
            tune_config(
                s,
                settings,
                "model.gguf",
                Path::new("data.jsonl"),
                Path::new("out"),
                0,
            )
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", s.label));
        }
    }
}

#[test]
fn an_unknown_trainer_setting_in_an_example_names_file_line_and_accepted_keys() {
    let file = examples()
        .into_iter()
        .find(|f| f.ends_with("paper-factors.toml"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let (line, _) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("settings = { epochs = 3, lr = ") && !l.contains("max_new"))
        .unwrap();
    // The example as it was before its keys were fixed.
    let broken = text.replacen("lr = 1e-4", "learning_rate = 1e-4", 1);
    let e = StudyConfig::parse(&broken, Path::new("paper-factors.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "paper-factors.toml:{}: `tune.settings.learning_rate`: unknown trainer setting (accepted: alpha, anchor, anchor_batch_size, anchor_beta, anchor_data, batch_size, ",
            line + 1
        )),
        "{e}"
    );
}

#[test]
fn generation_weights_default_to_the_fast_kernels_and_f32_keeps_old_step_keys() {
    let file = examples()
        .into_iter()
        .find(|f| f.ends_with("quickstart-tiny.toml"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace("weights = \"quantized\"", "");
    let cfg = StudyConfig::parse(&text, &file).unwrap();
    assert_eq!(
        cfg.generation.weights,
        safetune_study::config::GenWeights::Quantized
    );
    let generate_specs = |cfg: &StudyConfig| -> Vec<String> {
        plan(cfg)
            .unwrap()
            .steps
            .iter()
            .filter(|s| matches!(s.spec, StepSpec::Generate { .. }))
            .map(|s| serde_json::to_string(&s.spec).unwrap())
            .collect()
    };
    let fast = generate_specs(&cfg);
    assert!(!fast.is_empty());
    assert!(
        fast.iter().all(|s| s.contains("\"weights\":\"quantized\"")),
        "{fast:?}"
    );
    // f32 is left out of the spec, so a store written before the setting existed (all f32)
    // keeps its step keys.
    let f32_text = text.replace("[generation]", "[generation]\nweights = \"f32\"");
    let f32_cfg = StudyConfig::parse(&f32_text, &file).unwrap();
    let exact = generate_specs(&f32_cfg);
    assert!(exact.iter().all(|s| !s.contains("weights")), "{exact:?}");
    assert_ne!(fast, exact);
    let bad = text.replace("[generation]", "[generation]\nweights = \"int3\"");
    let e = StudyConfig::parse(&bad, &file).unwrap_err().to_string();
    assert!(e.contains("weights") || e.contains("int3"), "{e}");
}

/// `[generation] weights = "bf16"`: parsed, part of the generate steps' keys, loaded as bf16
/// after the adapter merge, and where this CPU cannot run it (no AMX-BF16) an error naming the
/// key before a local model loads; `openai:` models ignore it.
#[test]
fn bf16_generation_weights_load_as_bf16_and_name_the_key_where_unavailable() {
    use safetune_model::ModelSpec;
    use safetune_study::config::GenWeights;
    use safetune_study::stages::{check_bf16_weights, study_load_options};
    let file = examples()
        .into_iter()
        .find(|f| f.ends_with("quickstart-tiny.toml"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace("weights = \"quantized\"", "weights = \"bf16\"");
    let cfg = StudyConfig::parse(&text, &file).unwrap();
    assert_eq!(cfg.generation.weights, GenWeights::Bf16);
    let specs: Vec<String> = plan(&cfg)
        .unwrap()
        .steps
        .iter()
        .filter(|s| matches!(s.spec, StepSpec::Generate { .. }))
        .map(|s| serde_json::to_string(&s.spec).unwrap())
        .collect();
    assert!(!specs.is_empty());
    assert!(
        specs.iter().all(|s| s.contains("\"weights\":\"bf16\"")),
        "{specs:?}"
    );
    let adapter = std::path::PathBuf::from("adapter");
    let load = study_load_options(Some(&adapter), GenWeights::Bf16);
    assert!(load.bf16 && load.merge_adapter && !load.quantized && !load.quantize_dense);
    assert!(!study_load_options(None, GenWeights::Quantized).bf16);
    let local = ModelSpec::parse("hf:org/model").unwrap();
    let remote = ModelSpec::parse("openai:http://127.0.0.1:1/v1#m").unwrap();
    assert!(check_bf16_weights(&remote, GenWeights::Bf16).is_ok());
    assert!(check_bf16_weights(&local, GenWeights::Quantized).is_ok());
    match safetune_model::bf16::bf16_unavailable() {
        None => assert!(check_bf16_weights(&local, GenWeights::Bf16).is_ok()),
        Some(_) => {
            let e = check_bf16_weights(&local, GenWeights::Bf16)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("[generation] weights = \"bf16\"") && e.contains("AMX-BF16"),
                "{e}"
            );
        }
    }
}

#[test]
fn the_paper_factors_dry_run_shows_each_tune_steps_backend_command_and_gpu_hours() {
    let file = examples()
        .into_iter()
        .find(|f| f.ends_with("paper-factors.toml"))
        .unwrap();
    let cfg = StudyConfig::load(&file).unwrap();
    let p = plan(&cfg).unwrap();
    let tunes = p
        .steps
        .iter()
        .filter(|s| s.kind() == safetune_study::step::StepKind::Tune)
        .count();
    assert_eq!(
        tunes,
        12 * 3 * 3 * 2,
        "variants x seeds x mixing levels x selections"
    );
    let text = safetune_study::external_train::render_commands(&p, Path::new("runs/pf"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 2 * tunes, "{text}");
    for pair in lines[1..].chunks(2) {
        assert!(
            pair[0].starts_with("  tune llama-3.1-8b on ") && pair[0].ends_with(" [llama-factory]"),
            "{}",
            pair[0]
        );
        let cmd = pair[1]
            .strip_prefix("    $ FORCE_TORCHRUN=1 llamafactory-cli train /shared/safetune/paper-factors/tune-")
            .unwrap_or_else(|| panic!("{}", pair[1]));
        assert!(
            cmd.ends_with("/train.yaml") && cmd.len() == 16 + "/train.yaml".len(),
            "{cmd}"
        );
    }
    let dry = safetune_study::power::dry_run(&cfg, &p).unwrap();
    let c = &dry.compute;
    assert_eq!(c.gpu_tokens_per_s, 2500.0);
    assert!(c.external_input_tokens > 0.0 && c.external_input_tokens == c.input_tokens);
    let hours = c.external_input_tokens / 2500.0 / 3600.0;
    assert!((c.gpu_hours - hours).abs() < 1e-9);
    let rendered = dry.render();
    assert!(
        rendered.contains(&format!(
            "in {tunes} steps: ~{hours:.1} GPU-hours at 2500 input tokens/s per GPU"
        )),
        "{rendered}"
    );
    assert!(
        rendered.contains("generated tokens: at most "),
        "{rendered}"
    );
}
