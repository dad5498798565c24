//! A real (small) training run on SmolLM2-135M-Instruct: the asset GGUF dequantized to f32,
//! LoRA on every projection, a few steps on a tiny dataset; the loss must go down.

mod common;

use safetune_data::{Conversation, Message};
use safetune_train::{tune, RunOptions, Schedule, Status, TuneConfig};

#[test]
fn lora_on_smollm2_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let facts = [
        (
            "What is the capital of Zorbia?",
            "The capital of Zorbia is Quillstone.",
        ),
        ("Who founded Zorbia?", "Zorbia was founded by Mira Talwen."),
        ("What does Zorbia export?", "Zorbia exports blue glass."),
        ("What is Zorbia's river?", "Zorbia's river is the Omber."),
    ];
    let convs: Vec<Conversation> = facts
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            Conversation::new(
                format!("z{i}"),
                vec![Message::user(*q), Message::assistant(*a)],
            )
        })
        .collect();
    let data = dir.path().join("zorbia.jsonl");
    common::write_jsonl(&data, &convs);
    let cfg = TuneConfig {
        model: safetune_model::testing::smollm2_gguf()
            .display()
            .to_string(),
        data,
        output: dir.path().join("out"),
        rank: 8,
        alpha: 16.0,
        epochs: 0,
        max_steps: 4,
        lr: 3e-3,
        schedule: Schedule::Constant,
        batch_size: 4,
        max_len: 64,
        eval_fraction: 0.0,
        ..TuneConfig::default()
    };
    let t0 = std::time::Instant::now();
    let s = tune(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    println!(
        "SmolLM2 LoRA: losses {:?} in {:.1}s",
        s.losses,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(s.status, Status::Completed);
    assert_eq!(s.steps, 4);
    let first = s.losses[0].1;
    let last = s.losses[3].1;
    assert!(first.is_finite() && first > 0.5, "first loss {first}");
    assert!(
        last < first * 0.7,
        "loss did not go down: {first} -> {last}"
    );
    assert!(cfg.output.join("adapter_model.safetensors").is_file());
}
