//! The training loop on the tiny model: determinism, exact resume, outputs, config handling.

mod common;

use std::path::Path;

use safetune_train::checkpoint;
use safetune_train::{tune, RunOptions, Status, Target, TuneConfig, TuneSummary};

fn config(dir: &Path, out: &str) -> TuneConfig {
    let model = common::tiny_dir(dir);
    let data = dir.join("data.jsonl");
    if !data.exists() {
        common::write_jsonl(&data, &common::conversations(12));
    }
    TuneConfig {
        model: model.display().to_string(),
        data,
        output: dir.join(out),
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec![Target::Q, Target::V, Target::Up],
        epochs: 2,
        lr: 1e-2,
        warmup_steps: 1,
        batch_size: 2,
        grad_accum: 2,
        max_len: 64,
        eval_fraction: 0.1,
        eval_every: 2,
        ..TuneConfig::default()
    }
}

fn run(cfg: &TuneConfig, opts: &RunOptions) -> TuneSummary {
    tune(cfg, opts, &mut |_| {}).unwrap()
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn same_seed_same_losses_and_the_loss_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "a");
    cfg.packing = true;
    cfg.epochs = 4;
    let a = run(&cfg, &RunOptions::default());
    cfg.output = dir.path().join("b");
    let b = run(&cfg, &RunOptions::default());
    println!("losses: {:?}", a.losses);
    assert_eq!(a.status, Status::Completed);
    assert_eq!(a.steps, a.total_steps);
    assert_eq!(a.losses, b.losses, "same seed, different losses");
    assert_eq!(
        adapter_bytes(&cfg.output),
        adapter_bytes(&dir.path().join("a"))
    );
    let first = a.losses[0].1;
    let last = a.losses.last().unwrap().1;
    assert!(
        last < first * 0.9,
        "loss did not go down: {first} -> {last}"
    );
    // Activation recomputation trains the same model, to the bit.
    cfg.output = dir.path().join("r");
    cfg.recompute = true;
    let r = run(&cfg, &RunOptions::default());
    assert_eq!(a.losses, r.losses, "recomputation changed the losses");
    assert_eq!(
        adapter_bytes(&cfg.output),
        adapter_bytes(&dir.path().join("a"))
    );
    cfg.recompute = false;
    // Another seed gives another run.
    cfg.output = dir.path().join("c");
    cfg.seed = 1;
    let c = run(&cfg, &RunOptions::default());
    assert_ne!(a.losses, c.losses);
}

#[test]
fn a_run_stopped_after_a_checkpoint_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "whole");
    let whole = run(&cfg, &RunOptions::default());
    assert_eq!(
        whole.total_steps, 6,
        "5 micro-batches of 2 per epoch, accumulated by 2"
    );
    // Stop mid-epoch 2 (step 4 took its first two batches), with dropout on, so data order,
    // optimizer state and the dropout generator must all come back.
    let mut cfg2 = cfg.clone();
    cfg2.output = dir.path().join("split");
    let first = run(
        &cfg2,
        &RunOptions {
            stop_after: Some(4),
            ..Default::default()
        },
    );
    assert_eq!(first.status, Status::Paused);
    assert_eq!(first.steps, 4);
    let ck = checkpoint::latest(&cfg2.output).unwrap();
    assert!(ck.ends_with("step-000004"), "{}", ck.display());
    assert!(!cfg2.output.join("adapter_model.safetensors").exists());
    // Nothing from the first process survives but the files: a fresh call resumes.
    let second = run(
        &cfg2,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    );
    assert_eq!(second.status, Status::Completed);
    assert_eq!(second.losses, whole.losses[4..].to_vec());
    assert_eq!(train_losses(&cfg2.output), train_losses(&cfg.output));
    assert_eq!(adapter_bytes(&cfg2.output), adapter_bytes(&cfg.output));
    println!(
        "resumed losses {:?} == {:?}",
        second.losses,
        &whole.losses[4..]
    );
}

#[test]
fn outputs_are_a_peft_adapter_metrics_and_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "out");
    cfg.epochs = 1;
    cfg.save_every = 2;
    let s = run(&cfg, &RunOptions::default());
    let out = &cfg.output;
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"], 8);
    let st = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &st["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    let b = &st["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 64]);
    assert_eq!(b.dims(), &[128, 4]);
    assert_eq!(st.len(), 2 * 3 * 2, "A and B for q, v, up in 2 layers");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["status"], "completed");
    assert_eq!(m["steps"], s.steps);
    assert_eq!(m["config"]["rank"], 4);
    assert!(m["data_hash"].as_str().unwrap().starts_with("fnv1a64:"));
    assert_eq!(m["kernel_isa"], safetune_train::ops::isa_name());
    assert_eq!(train_losses(out).len(), s.steps);
    // Checkpoints every 2 steps, the newest 2 kept.
    let cks: Vec<usize> = checkpoint::list(out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(cks, vec![2]);
    // A second run into the same directory must not silently overwrite it.
    let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "r");
    cfg.epochs = 1;
    run(
        &cfg,
        &RunOptions {
            stop_after: Some(1),
            ..Default::default()
        },
    );
    // Memory settings may change on resume: the run goes on, to the same losses (dropout is on,
    // so the recomputed blocks replay its masks).
    let mut plain = cfg.clone();
    plain.output = dir.path().join("plain");
    let uninterrupted = run(&plain, &RunOptions::default());
    cfg.recompute = true;
    let s = tune(
        &cfg,
        &RunOptions {
            resume: true,
            stop_after: Some(2),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.steps, 2, "{s:?}");
    assert_eq!(s.losses[..], uninterrupted.losses[1..2]);
    cfg.lr = 1e-3;
    let err = tune(
        &cfg,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lr"), "{err}");
}

#[test]
fn toml_config_rejects_unknown_keys_and_reads_known_ones() {
    let cfg = TuneConfig::from_toml_str(
        "model = \"m.gguf\"\ndata = \"d.jsonl\"\noutput = \"o\"\nrank = 8\ntargets = [\"q\", \"v\"]\nschedule = \"linear\"\n",
        "x.toml",
    )
    .unwrap();
    assert_eq!(cfg.rank, 8);
    assert_eq!(cfg.targets, vec![Target::Q, Target::V]);
    assert_eq!(cfg.alpha, 32.0, "unset keys keep their defaults");
    let err = TuneConfig::from_toml_str("rank = 8\nrnak = 4\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.toml") && err.contains("rnak"), "{err}");
    let err = TuneConfig::from_toml_str("rank = \"big\"\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank"), "{err}");
    // The resolved config round-trips through its TOML rendering.
    assert_eq!(
        TuneConfig::from_toml_str(&cfg.to_toml(), "again").unwrap(),
        cfg
    );
}

#[test]
fn schedule_warms_up_then_decays_to_zero() {
    let cfg = TuneConfig {
        lr: 1.0,
        warmup_steps: 4,
        ..TuneConfig::default()
    };
    let lrs: Vec<f64> = (0..14).map(|s| cfg.lr_at(s, 14)).collect();
    assert!(lrs[..4].windows(2).all(|w| w[0] < w[1]));
    assert!(lrs[4..].windows(2).all(|w| w[0] > w[1]));
    assert!((lrs[4] - 1.0).abs() < 1e-12);
    let lin = TuneConfig {
        schedule: safetune_train::Schedule::Linear,
        ..cfg.clone()
    };
    assert!((lin.lr_at(9, 14) - 0.5).abs() < 1e-12);
}
