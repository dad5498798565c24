//! `bf16 = true` (`tune --bf16`): training with bf16 products tracks the f32 run on the tiny
//! model, for LoRA and full fine-tuning, and is refused where the CPU cannot run it. One test
//! (the bf16 switch is process-wide, so the runs go one after another).

mod common;

use std::path::Path;

use safetune_train::ops::{self, bf16, Isa};
use safetune_train::{tune, RunOptions, Target, TuneConfig};

fn config(dir: &Path, out: &str, full: bool) -> TuneConfig {
    let model = common::tiny_dir(dir);
    let data = dir.join("data.jsonl");
    if !data.exists() {
        common::write_jsonl(&data, &common::conversations(16));
    }
    TuneConfig {
        model: model.display().to_string(),
        data,
        output: dir.join(out),
        full,
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![
            Target::Q,
            Target::K,
            Target::V,
            Target::O,
            Target::Up,
            Target::Down,
        ],
        max_steps: 6,
        epochs: 100,
        lr: if full { 2e-3 } else { 1e-2 },
        batch_size: 4,
        max_len: 64,
        eval_fraction: 0.0,
        ..TuneConfig::default()
    }
}

fn losses(cfg: &TuneConfig) -> Vec<f64> {
    tune(cfg, &RunOptions::default(), &mut |_| {})
        .unwrap()
        .losses
        .into_iter()
        .map(|x| x.1)
        .collect()
}

fn manifest_bf16(out: &Path) -> bool {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    m["bf16"].as_bool().unwrap()
}

#[test]
fn bf16_training_tracks_f32_and_is_refused_without_the_instruction() {
    let dir = tempfile::tempdir().unwrap();
    if bf16::amx_available() {
        eprintln!("bf16 kernel under test: AMX-BF16");
    } else {
        eprintln!("could not test the AMX-BF16 kernel: this CPU or OS lacks it; testing the portable emulation");
        bf16::set_emulated(true);
    }
    for full in [false, true] {
        let tag = if full { "full" } else { "lora" };
        let f = config(dir.path(), &format!("{tag}-f32"), full);
        let f32_losses = losses(&f);
        assert!(!manifest_bf16(&f.output));
        let mut b = config(dir.path(), &format!("{tag}-bf16"), full);
        b.bf16 = true;
        let bf16_losses = losses(&b);
        assert!(manifest_bf16(&b.output));
        println!("{tag}: f32 {f32_losses:?}\n{tag}: bf16 {bf16_losses:?}");
        assert_eq!(f32_losses.len(), bf16_losses.len());
        for (s, (x, y)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
            // bf16 rounding moves the loss a little, never far.
            assert!(
                (x - y).abs() <= 0.02 * x,
                "{tag} step {}: f32 {x} bf16 {y}",
                s + 1
            );
        }
        // The products really ran in bf16: the losses are not the f32 ones.
        assert_ne!(f32_losses, bf16_losses, "{tag}: bf16 changed nothing");
        // The study's path (`prepare` then `run`, without `tune`) honours `bf16` too, even when
        // the switch was left off by an f32 run before it.
        ops::set_bf16(false).unwrap();
        let mut via_run = b.clone();
        via_run.output = dir.path().join(format!("{tag}-prepared"));
        std::fs::create_dir_all(&via_run.output).unwrap();
        let prepared = safetune_train::recipe::prepare(&via_run).unwrap();
        let run_losses: Vec<f64> = safetune_train::recipe::run(
            &via_run,
            &RunOptions::default(),
            prepared,
            std::time::Instant::now(),
            &mut |_| {},
        )
        .unwrap()
        .losses
        .into_iter()
        .map(|x| x.1)
        .collect();
        assert_eq!(run_losses, bf16_losses, "{tag}: prepare + run ignored bf16");
        // LoRA packs each frozen weight once per run (the cache of `ops::fused`); packing per
        // product instead (a budget of 0) gives bit-identical losses. Full fine-tuning caches
        // nothing: every weight is tracked.
        let hits = ops::fused::frozen_pack_stats().2;
        let mut cached = b.clone();
        cached.output = dir.path().join(format!("{tag}-cached"));
        let cached_losses = losses(&cached);
        let after = ops::fused::frozen_pack_stats();
        assert_eq!(
            (after.0, after.1),
            (0, 0),
            "{tag}: the run left its cache behind"
        );
        std::env::set_var(ops::fused::FROZEN_PACK_BUDGET_ENV, "0");
        let mut uncached = b.clone();
        uncached.output = dir.path().join(format!("{tag}-uncached"));
        let uncached_losses = losses(&uncached);
        std::env::remove_var(ops::fused::FROZEN_PACK_BUDGET_ENV);
        let after_uncached = ops::fused::frozen_pack_stats().2;
        assert_eq!(cached_losses, bf16_losses, "{tag}");
        assert_eq!(
            uncached_losses, bf16_losses,
            "{tag}: the cache changed the losses"
        );
        assert_eq!(after_uncached, after.2, "{tag}: a budget of 0 still cached");
        if full {
            assert_eq!(
                after.2, hits,
                "{tag}: full fine-tuning took a weight from the cache"
            );
        } else {
            assert!(
                after.2 > hits,
                "{tag}: LoRA never took a frozen weight from the cache"
            );
        }
        // And training still learns.
        assert!(
            bf16_losses.last().unwrap() < &(bf16_losses[0] * 0.9),
            "{tag}: {bf16_losses:?}"
        );
        if bf16::amx_available() {
            // The portable emulation computes what AMX computes (to f32 summation order): the
            // first loss agrees far closer than bf16 and f32 do, and the runs stay together.
            bf16::set_emulated(true);
            b.output = dir.path().join(format!("{tag}-emulated"));
            let emulated = losses(&b);
            bf16::set_emulated(false);
            println!("{tag}: emulated {emulated:?}");
            let first = (emulated[0] - bf16_losses[0]).abs();
            assert!(
                first <= 5e-5 * emulated[0],
                "{tag}: emulated {emulated:?} amx {bf16_losses:?}"
            );
            assert!(
                first * 4.0 < (f32_losses[0] - bf16_losses[0]).abs(),
                "{tag}"
            );
            for (x, y) in emulated.iter().zip(&bf16_losses) {
                assert!(
                    (x - y).abs() <= 2e-3 * x,
                    "{tag}: emulated {emulated:?} amx {bf16_losses:?}"
                );
            }
        }
    }

    // Without AMX (or with the training kernels forced below AVX-512) it is an error that names
    // what is missing, before anything is written.
    bf16::set_emulated(false);
    let mut b = config(dir.path(), "refused", false);
    b.bf16 = true;
    if Isa::Avx2Fma.available() {
        ops::set_isa(Some(Isa::Avx2Fma));
        let e = tune(&b, &RunOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        ops::set_isa(None);
        assert!(
            e.contains("bf16") && (e.contains("AMX-BF16") || e.contains("AVX-512")),
            "{e}"
        );
        assert!(!b.output.exists(), "{e}");
    }
    if !bf16::amx_available() {
        let e = tune(&b, &RunOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("AMX-BF16") && e.contains("tdpbf16ps"), "{e}");
    } else {
        let e = ops::set_bf16(true).and_then(|_| {
            ops::set_isa(Some(Isa::Scalar));
            let r = ops::set_bf16(true);
            ops::set_isa(None);
            r
        });
        let e = e.unwrap_err();
        assert!(e.contains("AVX-512") && e.contains("scalar"), "{e}");
    }
    ops::set_bf16(false).unwrap();
}
