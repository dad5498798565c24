//! Anchored tuning on the tiny model: a KL term to a reference (the tuning base with its
//! adapter off, a separate model, or on a separate anchor set), its settings, logs and resume.

mod common;

use std::path::Path;

use safetune_data::{Conversation, Message};
use safetune_model::testing::TinyModel;
use safetune_train::{
    checkpoint, tune, RunOptions, SettingsError, Status, Target, TuneConfig, TuneSummary,
};

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
        epochs: 3,
        lr: 2e-2,
        batch_size: 2,
        grad_accum: 2,
        max_len: 64,
        eval_fraction: 0.1,
        anchor: "base".into(),
        anchor_beta: 0.1,
        ..TuneConfig::default()
    }
}

/// Refusals to write as an anchor set.
fn refusals(n: usize) -> Vec<Conversation> {
    let answers = [
        "no, I will not help with that",
        "I cannot do this",
        "sorry, not this one",
    ];
    (0..n)
        .map(|i| {
            Conversation::new(
                format!("anchor{i}"),
                vec![
                    Message::user(format!("do harm {i}")),
                    Message::assistant(answers[i % answers.len()]),
                ],
            )
        })
        .collect()
}

fn run(cfg: &TuneConfig, opts: &RunOptions) -> TuneSummary {
    tune(cfg, opts, &mut |_| {}).unwrap()
}

fn train_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// A figure read back from metrics.jsonl (JSON keeps it to the last digit or so).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

fn mean(xs: &[(usize, f64)]) -> f64 {
    xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64
}

#[test]
fn base_anchor_kl_starts_at_zero_grows_and_a_larger_beta_keeps_it_smaller() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "small");
    cfg.anchor_beta = 0.01;
    let small = run(&cfg, &RunOptions::default());
    assert_eq!(small.status, Status::Completed);
    println!("beta 0.01: kl {:?}", small.kl_losses);
    assert_eq!(small.kl_losses.len(), small.steps);
    // Step 1 is measured before any update: the adapter's B is 0, so the tuned model is the
    // base to the bit.
    assert_eq!(small.kl_losses[0].1, 0.0);
    let last = small.kl_losses.last().unwrap().1;
    assert!(last > 1e-4, "the KL did not grow: {last}");
    // The logged loss is the objective: ce + beta * kl, each logged on its own.
    let rows = train_rows(&cfg.output);
    assert_eq!(rows.len(), small.steps);
    for (r, ((_, l), ((_, ce), (_, kl)))) in rows.iter().zip(
        small
            .losses
            .iter()
            .zip(small.ce_losses.iter().zip(&small.kl_losses)),
    ) {
        assert!((l - (ce + 0.01 * kl)).abs() < 1e-9, "{l} {ce} {kl}");
        assert!(close(r["ce"].as_f64().unwrap(), *ce), "{r}");
        assert!(close(r["kl"].as_f64().unwrap(), *kl), "{r}");
        assert_eq!(
            r["anchor_tokens"].as_u64().unwrap(),
            r["tokens"].as_u64().unwrap()
        );
        assert!(r["ref_forward_s"].as_f64().unwrap() > 0.0);
    }
    assert!(small.ref_forward_s > 0.0);
    // The same seed with a far larger beta: the same first step, then a KL kept smaller.
    cfg.output = dir.path().join("large");
    cfg.anchor_beta = 5.0;
    let large = run(&cfg, &RunOptions::default());
    println!("beta 5: kl {:?}", large.kl_losses);
    assert_eq!(large.kl_losses[0].1, 0.0);
    let (ls, ll) = (
        small.kl_losses.last().unwrap().1,
        large.kl_losses.last().unwrap().1,
    );
    assert!(ll < ls * 0.5, "final KL: beta 5 {ll}, beta 0.01 {ls}");
    assert!(mean(&large.kl_losses) < mean(&small.kl_losses));
    // The anchor costs cross-entropy: the anchored run fits the data less closely.
    assert!(large.ce_losses.last().unwrap().1 > small.ce_losses.last().unwrap().1);
    // Without an anchor nothing of it is logged.
    cfg.output = dir.path().join("off");
    cfg.anchor = String::new();
    let off = run(&cfg, &RunOptions::default());
    assert!(off.kl_losses.is_empty());
    assert_eq!(off.losses, off.ce_losses);
    assert_eq!(off.ref_forward_s, 0.0);
    let row = &train_rows(&cfg.output)[0];
    assert!(
        row.get("kl").is_none() && row.get("ref_forward_s").is_none(),
        "{row}"
    );
}

#[test]
fn a_separate_reference_model_anchors_full_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "full");
    cfg.full = true;
    cfg.lr = 1e-3;
    cfg.epochs = 1;
    // The base itself as a separate frozen model: at step 1 it is the tuned model (to f32
    // rounding; it runs through other kernels than the adapter path).
    cfg.anchor = common::tiny_dir(dir.path()).display().to_string();
    let same = run(&cfg, &RunOptions::default());
    println!("same weights: kl {:?}", same.kl_losses);
    assert!(same.kl_losses[0].1.abs() < 1e-5, "{:?}", same.kl_losses);
    assert!(same.kl_losses.last().unwrap().1 > same.kl_losses[0].1);
    // Another random model of the same vocabulary: far from the base from the start.
    let other = TinyModel {
        seed: 7,
        ..TinyModel::default()
    }
    .write(&dir.path().join("other"))
    .unwrap();
    cfg.anchor = other.display().to_string();
    cfg.output = dir.path().join("other-run");
    let s = run(&cfg, &RunOptions::default());
    println!("other weights: kl {:?}", s.kl_losses);
    assert!(s.kl_losses[0].1 > 0.01, "{:?}", s.kl_losses);
    // The same separate reference under LoRA agrees with "base" at step 1.
    let mut lora = config(dir.path(), "lora-path");
    lora.anchor = common::tiny_dir(dir.path()).display().to_string();
    lora.max_steps = 1;
    let s = run(&lora, &RunOptions::default());
    assert!(s.kl_losses[0].1.abs() < 1e-5, "{:?}", s.kl_losses);
    // A reference that cannot be loaded is an error naming it.
    cfg.anchor = dir.path().join("nowhere").display().to_string();
    cfg.output = dir.path().join("bad");
    let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn an_anchor_set_carries_the_kl_and_the_training_batches_the_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("refusals.jsonl");
    common::write_jsonl(&anchor, &refusals(5));
    let mut cfg = config(dir.path(), "set");
    cfg.anchor_data = Some(anchor.clone());
    cfg.anchor_batch_size = 3;
    cfg.anchor_beta = 1.0;
    let s = run(&cfg, &RunOptions::default());
    println!("ce {:?}\nkl {:?}", s.ce_losses, s.kl_losses);
    assert_eq!(s.kl_losses.len(), s.steps);
    assert_eq!(s.kl_losses[0].1, 0.0);
    assert!(s.kl_losses.last().unwrap().1 > 0.0);
    let rows = train_rows(&cfg.output);
    let mut anchor_tokens = std::collections::BTreeSet::new();
    for (r, (_, ce)) in rows.iter().zip(&s.ce_losses) {
        let (tokens, at) = (
            r["tokens"].as_u64().unwrap(),
            r["anchor_tokens"].as_u64().unwrap(),
        );
        // The anchor micro-batch's answer tokens, not the training batches'.
        assert!(at > 0 && at != tokens, "{r}");
        anchor_tokens.insert(at);
        assert!(close(r["ce"].as_f64().unwrap(), *ce), "{r}");
        let (l, kl) = (r["loss"].as_f64().unwrap(), r["kl"].as_f64().unwrap());
        assert!((l - (ce + kl)).abs() < 1e-9);
    }
    // Three of five refusals per step, cycling: the batches differ between steps.
    assert!(anchor_tokens.len() > 1, "{anchor_tokens:?}");
    // The training batches carry the cross-entropy alone: with the same seed, the first
    // step's cross-entropy is that of a run without an anchor.
    let mut off = cfg.clone();
    off.anchor = String::new();
    off.anchor_data = None;
    off.output = dir.path().join("off");
    let o = run(&off, &RunOptions::default());
    assert_eq!(o.ce_losses[0], s.ce_losses[0]);
    assert_ne!(o.ce_losses.last(), s.ce_losses.last());

    // A missing anchor set is an error naming the file.
    cfg.anchor_data = Some(dir.path().join("no-such-anchor.jsonl"));
    cfg.output = dir.path().join("missing");
    let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-anchor.jsonl"), "{err}");
    // So is one without an answer to anchor.
    let empty = dir.path().join("prompts-only.jsonl");
    std::fs::write(
        &empty,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    cfg.anchor_data = Some(empty);
    cfg.output = dir.path().join("empty");
    let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("prompts-only.jsonl") && err.contains("anchor_data"),
        "{err}"
    );
}

#[test]
fn anchor_settings_are_checked_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), "v");
    let key_of = |cfg: &TuneConfig| cfg.problem().map(|(k, _)| k);
    assert_eq!(key_of(&base), None);
    for beta in [0.0, -1.0, f64::NAN] {
        let cfg = TuneConfig {
            anchor_beta: beta,
            ..base.clone()
        };
        assert_eq!(key_of(&cfg), Some("anchor_beta"), "beta {beta}");
        let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("anchor_beta"), "{err}");
    }
    // Beta is not checked while the anchor is off.
    let off = TuneConfig {
        anchor: String::new(),
        anchor_beta: 0.0,
        ..base.clone()
    };
    assert_eq!(key_of(&off), None);
    // "base" needs an adapter to switch off.
    let full = TuneConfig {
        full: true,
        ..base.clone()
    };
    assert_eq!(key_of(&full), Some("anchor"));
    let err = full.validate().unwrap_err().to_string();
    assert!(err.contains("anchor") && err.contains("full"), "{err}");
    // An anchor set without an anchor, or an empty anchor batch.
    let data_only = TuneConfig {
        anchor: String::new(),
        anchor_data: Some("a.jsonl".into()),
        ..base.clone()
    };
    assert_eq!(key_of(&data_only), Some("anchor_data"));
    let zero = TuneConfig {
        anchor_data: Some("a.jsonl".into()),
        anchor_batch_size: 0,
        ..base.clone()
    };
    assert_eq!(key_of(&zero), Some("anchor_batch_size"));
    // The same checks reach a study's `[tune] settings`.
    let table = |s: &str| -> toml::Table { toml::from_str(s).unwrap() };
    let cfg = TuneConfig::from_settings(&table("anchor = \"base\"\nanchor_beta = 0.5\nrank = 4"))
        .unwrap();
    assert_eq!((cfg.anchor.as_str(), cfg.anchor_beta), ("base", 0.5));
    let e = TuneConfig::from_settings(&table("anchor = \"base\"\nanchor_beta = 0")).unwrap_err();
    assert_eq!(e.key(), "anchor_beta");
    let e = TuneConfig::from_settings(&table("anchor = \"base\"\nfull = true")).unwrap_err();
    assert!(
        matches!(&e, SettingsError::Invalid { key, .. } if key == "anchor"),
        "{e}"
    );
    let e = TuneConfig::from_settings(&table("anchor_beta = \"high\"")).unwrap_err();
    assert_eq!(e.key(), "anchor_beta");
    // A config file with an anchor set round-trips through its rendering.
    let with_set = TuneConfig {
        anchor_data: Some("refusals.jsonl".into()),
        ..base.clone()
    };
    assert_eq!(
        TuneConfig::from_toml_str(&with_set.to_toml(), "again").unwrap(),
        with_set
    );
}

#[test]
fn anchored_runs_resume_exactly_and_refuse_other_anchor_settings() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("refusals.jsonl");
    common::write_jsonl(&anchor, &refusals(5));
    for (name, anchor_data) in [("batch", None), ("set", Some(anchor.clone()))] {
        let mut cfg = config(dir.path(), &format!("{name}-whole"));
        cfg.epochs = 2;
        cfg.anchor_data = anchor_data;
        let whole = run(&cfg, &RunOptions::default());
        assert_eq!(whole.total_steps, 6);
        let mut split = cfg.clone();
        split.output = dir.path().join(format!("{name}-split"));
        let first = run(
            &split,
            &RunOptions {
                stop_after: Some(4),
                ..Default::default()
            },
        );
        assert_eq!(first.status, Status::Paused);
        assert!(checkpoint::latest(&split.output).is_some());
        // Another beta is another trajectory: refused.
        let mut other = split.clone();
        other.anchor_beta = 0.2;
        let err = tune(
            &other,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("anchor_beta"), "{err}");
        let second = run(
            &split,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
        );
        assert_eq!(second.status, Status::Completed);
        assert_eq!(second.losses, whole.losses[4..].to_vec(), "{name}");
        assert_eq!(second.kl_losses, whole.kl_losses[4..].to_vec(), "{name}");
        assert_eq!(
            std::fs::read(split.output.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(cfg.output.join("adapter_model.safetensors")).unwrap(),
            "{name}"
        );
        println!("{name}: resumed kl {:?}", second.kl_losses);
    }
}
