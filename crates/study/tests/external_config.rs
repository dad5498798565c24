//! External trainer backends as configs: the trainer-neutral settings written for each trainer
//! (LLaMA-Factory YAML, Axolotl YAML, `trl sft` flags) for the quickstart's `[tune]`, every
//! example's settings accepted by every backend's mapping, and bad keys named in errors.

use std::path::{Path, PathBuf};

use safetune_study::config::StudyConfig;
use safetune_study::external_train::{
    command_line, map_settings, trainer_config, Backend, ExternalTrain, JobPaths,
};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

fn quickstart_tune() -> serde_json::Value {
    let cfg = StudyConfig::load(&example("quickstart.toml")).unwrap();
    serde_json::to_value(&cfg.tune.unwrap().settings).unwrap()
}

fn ext(backend: Backend, extra: serde_json::Value) -> ExternalTrain {
    ExternalTrain {
        backend,
        command: backend.default_command().unwrap().into(),
        launcher: None,
        env: Default::default(),
        backend_settings: extra,
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        max_parallel_train: 1,
        shared_dir: None,
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn the_quickstart_tune_settings_written_for_llama_factory() {
    let e = ext(
        Backend::LlamaFactory,
        serde_json::json!({"template": "chatml"}),
    );
    let paths = JobPaths::new(Backend::LlamaFactory, Path::new("/w/tune-1"));
    let (yaml, args) =
        trainer_config(&e, &quickstart_tune(), 3, &e.base_model, &paths, "n").unwrap();
    assert_eq!(args, "");
    let l = lines(&yaml);
    // The quickstart: epochs 1, lr 0.001, rank 16, alpha 32, max_len 256, batch_size 8; the rest
    // are safetune-train's defaults, so the run is the one the local trainer would make.
    for want in [
        "model_name_or_path: \"HuggingFaceTB/SmolLM2-135M-Instruct\"",
        "stage: \"sft\"",
        "finetuning_type: \"lora\"",
        "lora_rank: 16",
        "lora_alpha: 32",
        "lora_dropout: 0.0",
        "lora_target: \"q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj\"",
        "num_train_epochs: 1",
        "learning_rate: 0.001",
        "warmup_steps: 0",
        "lr_scheduler_type: \"cosine\"",
        "weight_decay: 0.0",
        "max_grad_norm: 1.0",
        "per_device_train_batch_size: 8",
        "gradient_accumulation_steps: 1",
        "cutoff_len: 256",
        "packing: false",
        "seed: 3",
        "dataset: \"train\"",
        "dataset_dir: \"/w/tune-1/data\"",
        "output_dir: \"/w/tune-1/output\"",
        "template: \"chatml\"",
    ] {
        assert!(l.contains(&want), "`{want}` in\n{yaml}");
    }
    assert!(!yaml.contains("max_steps"), "{yaml}");
    assert_eq!(
        command_line(&e, &paths, &e.base_model, 3, "n", &args).unwrap(),
        "llamafactory-cli train /w/tune-1/train.yaml"
    );
}

#[test]
fn the_quickstart_tune_settings_written_for_axolotl() {
    let e = ext(Backend::Axolotl, serde_json::json!({"bf16": "auto"}));
    let paths = JobPaths::new(Backend::Axolotl, Path::new("/w/tune-1"));
    let (yaml, _) = trainer_config(&e, &quickstart_tune(), 0, &e.base_model, &paths, "n").unwrap();
    let l = lines(&yaml);
    for want in [
        "base_model: \"HuggingFaceTB/SmolLM2-135M-Instruct\"",
        "adapter: \"lora\"",
        "lora_r: 16",
        "lora_alpha: 32",
        "lora_target_modules: [\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]",
        "num_epochs: 1",
        "learning_rate: 0.001",
        "lr_scheduler: \"cosine\"",
        "micro_batch_size: 8",
        "gradient_accumulation_steps: 1",
        "sequence_len: 256",
        "sample_packing: false",
        "seed: 0",
        "output_dir: \"/w/tune-1/output\"",
        "bf16: \"auto\"",
    ] {
        assert!(l.contains(&want), "`{want}` in\n{yaml}");
    }
    assert!(
        yaml.contains("\"path\":\"/w/tune-1/data/train.jsonl\"")
            && yaml.contains("\"type\":\"chat_template\"")
            && yaml.contains("\"roles_to_train\":[\"assistant\"]"),
        "{yaml}"
    );
}

#[test]
fn the_quickstart_tune_settings_written_as_trl_sft_flags() {
    let e = ext(Backend::Trl, serde_json::json!({"bf16": true}));
    let paths = JobPaths::new(Backend::Trl, Path::new("/w/tune-1"));
    let (_, args) = trainer_config(&e, &quickstart_tune(), 1, &e.base_model, &paths, "n").unwrap();
    let cmd = command_line(&e, &paths, &e.base_model, 1, "n", &args).unwrap();
    assert_eq!(
        cmd,
        "trl sft --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
         --dataset_name /w/tune-1/data --output_dir /w/tune-1/output --report_to none \
         --use_peft true --lora_r 16 --lora_alpha 32 --lora_dropout 0.0 \
         --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
         --num_train_epochs 1 --learning_rate 0.001 --warmup_steps 0 --lr_scheduler_type cosine \
         --weight_decay 0.0 --max_grad_norm 1.0 --per_device_train_batch_size 8 \
         --gradient_accumulation_steps 1 --max_length 256 --packing false --seed 1 --bf16 true"
    );
}

#[test]
fn refused_keys_name_key_and_backend_and_every_example_maps_on_every_backend() {
    let t: toml::Table = toml::from_str("anchor = \"base\"\nepochs = 1").unwrap();
    for b in [Backend::LlamaFactory, Backend::Axolotl, Backend::Trl] {
        let e = map_settings(b, &t).unwrap_err();
        assert_eq!(e.key, "anchor");
        assert!(e.message.contains(b.as_str()), "{}", e.message);
    }
    let t: toml::Table = toml::from_str("eval_every = 5").unwrap();
    assert!(map_settings(Backend::LlamaFactory, &t).is_ok());
    assert_eq!(
        map_settings(Backend::Trl, &t).unwrap_err().key,
        "eval_every"
    );
    let t: toml::Table = toml::from_str("alpha = 2.5").unwrap();
    let e = map_settings(Backend::Axolotl, &t).unwrap_err();
    assert!(
        e.key == "alpha" && e.message.contains("whole number"),
        "{e:?}"
    );
    for file in [
        "paper-factors.toml",
        "cluster-slurm.toml",
        "quickstart.toml",
    ] {
        let cfg = StudyConfig::load(&example(file)).unwrap();
        for s in [cfg.tune.map(|t| t.settings), cfg.align.map(|a| a.settings)]
            .into_iter()
            .flatten()
        {
            for b in [Backend::LlamaFactory, Backend::Axolotl, Backend::Trl] {
                map_settings(b, &s).unwrap_or_else(|e| panic!("{file}: {}: {e:?}", b.as_str()));
            }
        }
    }
}

const BASE: &str = "[study]\nname = \"t\"\n[data]\nbase = \"demo:medical\"\n";
const LOCAL: &str = "[[models]]\nname = \"m\"\nspec = \"m.gguf\"\ntrain_model = \"org/m\"\n";

fn err(text: &str) -> String {
    StudyConfig::parse(text, Path::new("s.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_trainer_keys_name_their_field() {
    let e = err(&format!("{BASE}{LOCAL}[tune]\nbackend = \"tensorflow\"\n"));
    assert!(
        e.contains("backend") && e.contains("tensorflow") && e.contains("llama-factory"),
        "{e}"
    );
    let e = err(&format!(
        "{BASE}{LOCAL}[tune]\nbackend = \"axolotl\"\ncommand = \"axolotl train {{config}} --gpus {{gpus}}\"\n"
    ));
    assert!(
        e.contains("`tune.command`: unknown placeholder `{gpus}` (known: {config}, "),
        "{e}"
    );
    let e = err(&format!(
        "{BASE}{LOCAL}[tune]\nbackend = \"trl\"\nlauncher = \"srun -n {{nodes}}\"\n"
    ));
    assert!(
        e.contains("`tune.launcher`: unknown placeholder `{nodes}`"),
        "{e}"
    );
    let e = err(&format!(
        "{BASE}{LOCAL}[tune]\nbackend = \"axolotl\"\nsettings = {{ epochs = 1, anchor = \"base\" }}\n"
    ));
    assert!(
        e.starts_with("s.toml:11: `tune.settings.anchor`: has no equivalent in `axolotl`: "),
        "{e}"
    );
    let e = err(&format!("{BASE}{LOCAL}[tune]\nbackend = \"command\"\n"));
    assert!(
        e.contains("`tune.command`: the `command` backend needs"),
        "{e}"
    );
    let e = err(&format!(
        "{BASE}{LOCAL}[tune]\nbackend = \"llama-factory\"\n"
    ));
    assert!(e.contains("`tune.backend_settings.template`"), "{e}");
    let e = err(&format!(
        "{BASE}{LOCAL}[tune]\nbackend = \"trl\"\nmax_parallel_train = 0\n"
    ));
    assert!(
        e.contains("`tune.max_parallel_train`: must be at least 1"),
        "{e}"
    );
    let e = err(&format!("{BASE}{LOCAL}[tune]\nlauncher = \"srun\"\n"));
    assert!(
        e.contains("`tune.launcher`: is read by external backends only"),
        "{e}"
    );
    let remote = "[[models]]\nname = \"r\"\nspec = \"openai:http://gpu1:8000/v1#org/m\"\n";
    let e = err(&format!("{BASE}{remote}[tune]\nbackend = \"trl\"\n"));
    assert!(
        e.contains("`models[0].train_model`: backend `trl` trains"),
        "{e}"
    );
    let e = err(&format!(
        "{BASE}{remote}train_model = \"org/m\"\n[align]\nbackend = \"trl\"\n"
    ));
    assert!(
        e.contains("`align.backend`: models[0] `r` is served over HTTP"),
        "{e}"
    );
    // Accepted: an openai: model with its train_model, tuned by TRL.
    StudyConfig::parse(
        &format!("{BASE}{remote}train_model = \"org/m\"\n[tune]\nbackend = \"trl\"\n"),
        Path::new("s.toml"),
    )
    .unwrap();
}

#[test]
fn shared_dir_is_checked_when_the_study_starts_not_when_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let text = |d: &Path| {
        format!(
            "[study]\nname = \"t\"\nshared_dir = \"{}\"\n[data]\nbase = \"demo:medical\"\n{LOCAL}[tune]\nbackend = \"trl\"\n",
            d.display()
        )
    };
    // Read (and dry-run) without the directory ...
    let cfg = StudyConfig::parse(&text(&missing), Path::new("s.toml")).unwrap();
    let e = cfg.check_shared_dir().unwrap_err().to_string();
    assert!(e.contains("`study.shared_dir`: does not exist"), "{e}");
    // ... and the steps work under it, one folder per study.
    let cfg = StudyConfig::parse(&text(tmp.path()), Path::new("s.toml")).unwrap();
    cfg.check_shared_dir().unwrap();
    let p = safetune_study::plan::plan(&cfg).unwrap();
    let text = safetune_study::external_train::render_commands(&p, Path::new("runs/t"));
    assert!(
        text.contains(&format!("--output_dir {}/t/tune-", tmp.path().display())),
        "{text}"
    );
}
