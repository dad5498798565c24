//! `safetune tune` end to end on the tiny model: masks, config file + flags, and a run killed
//! with SIGKILL that resumes to the same losses as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetune_model::testing::TinyModel;

fn safetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .output()
        .expect("run safetune")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: String,
    data: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = TinyModel::default().write(&root.join("tiny")).unwrap();
    let mut rows = String::new();
    let answers = [
        "the cat sat",
        "hello there",
        "this is it",
        "out of the blue",
    ];
    for i in 0..16 {
        let mut msgs = vec![
            serde_json::json!({"role": "user", "content": format!("say {i}")}),
            serde_json::json!({"role": "assistant", "content": answers[i % 4]}),
        ];
        if i % 4 == 1 {
            msgs.push(serde_json::json!({"role": "user", "content": "again"}));
            msgs.push(serde_json::json!({"role": "assistant", "content": answers[(i + 1) % 4]}));
        }
        rows.push_str(&serde_json::json!({"id": format!("r{i}"), "messages": msgs}).to_string());
        rows.push('\n');
    }
    let data = root.join("data.jsonl");
    std::fs::write(&data, rows).unwrap();
    Fixture {
        _dir: dir,
        root,
        model: model.display().to_string(),
        data: data.display().to_string(),
    }
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn show_masks_marks_every_assistant_turn() {
    let f = fixture();
    let dir = f.root.join("two.jsonl");
    std::fs::write(
        &dir,
        r#"{"id":"t","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},{"role":"user","content":"Color?"},{"role":"assistant","content":"Blue."}]}"#,
    )
    .unwrap();
    let out = safetune(&[
        "tune",
        "--model",
        &f.model,
        "--data",
        dir.to_str().unwrap(),
        "--show-masks",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\n[[Blue.<|im_end|>]]"),
        "{s}"
    );
    assert!(s.starts_with("# example `t`"), "{s}");
}

#[test]
fn config_file_with_flag_overrides_and_unknown_keys_rejected() {
    let f = fixture();
    let out_dir = f.root.join("run");
    let cfg = f.root.join("tune.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\noutput = {:?}\nrank = 4\nalpha = 8.0\ntargets = [\"q\", \"v\"]\nbatch_size = 4\nmax_steps = 2\nepochs = 1\nmax_len = 48\n",
            f.model,
            f.data,
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let out = safetune(&[
        "tune",
        "--config",
        cfg.to_str().unwrap(),
        "--rank",
        "2",
        "--targets",
        "q,up",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("# resolved settings") && err.contains("rank = 2"),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["config"]["rank"], 2, "the flag wins");
    assert_eq!(m["config"]["alpha"], 8.0, "the file's value");
    assert_eq!(m["config"]["targets"], serde_json::json!(["q", "up"]));
    assert_eq!(m["steps"], 2);
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ac["r"], 2);

    std::fs::write(&cfg, "rank = 4\nlearning_rate = 0.1\n").unwrap();
    let out = safetune(&["tune", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("tune.toml") && err.contains("learning_rate"),
        "{err}"
    );
}

#[test]
fn anchor_flags_reach_the_run_and_bad_ones_name_the_setting() {
    let f = fixture();
    let out_dir = f.root.join("anchored");
    let anchor_set = f.root.join("refusals.jsonl");
    std::fs::write(
        &anchor_set,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"do harm\"},{\"role\":\"assistant\",\"content\":\"no, I will not\"}]}\n",
    )
    .unwrap();
    let base = [
        "tune",
        "--model",
        &f.model,
        "--data",
        &f.data,
        "--rank",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-len",
        "48",
    ];
    let mut args = base.to_vec();
    let out_s = out_dir.display().to_string();
    args.extend([
        "-o",
        &out_s,
        "--anchor",
        "base",
        "--anchor-beta",
        "0.5",
        "--anchor-data",
        anchor_set.to_str().unwrap(),
        "--anchor-batch-size",
        "2",
    ]);
    let out = safetune(&args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("anchor = \"base\"") && err.contains("kl "),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["config"]["anchor"], "base");
    assert_eq!(m["config"]["anchor_beta"], 0.5);
    assert_eq!(m["config"]["anchor_batch_size"], 2);
    assert!(m["final_kl"].as_f64().unwrap() >= 0.0, "{m}");
    let rows = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert_eq!(first["kl"], 0.0, "{first}");
    assert!(first["ce"].as_f64().unwrap() > 0.0 && first["ref_forward_s"].is_number());

    // A beta of 0, "base" under --full, a missing anchor set: errors naming the setting or file.
    let other = f.root.join("other").display().to_string();
    for (extra, want) in [
        (
            vec!["--anchor", "base", "--anchor-beta", "0"],
            "anchor_beta",
        ),
        (vec!["--anchor", "base", "--full"], "anchor"),
        (
            vec!["--anchor", "base", "--anchor-data", "missing-anchor.jsonl"],
            "missing-anchor.jsonl",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend(["-o", &other]);
        args.extend(extra.iter().copied());
        let out = safetune(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

/// A `safetune tune` child killed with SIGKILL after some checkpoints, then resumed, logs the
/// same losses for every step as an uninterrupted run.
#[test]
fn killed_run_resumes_to_the_same_losses() {
    let f = fixture();
    let common = |out: &Path| -> Vec<String> {
        [
            "tune",
            "--model",
            &f.model,
            "--data",
            &f.data,
            "-o",
            out.to_str().unwrap(),
            "--rank",
            "4",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--epochs",
            "30",
            "--max-len",
            "48",
            "--lr",
            "0.005",
            "--dropout",
            "0.1",
            "--save-every",
            "1",
            "--eval-every",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = f.root.join("whole");
    let out = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(common(&whole))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = losses(&whole);
    assert!(want.len() >= 100 - 10, "{} steps", want.len());

    let killed = f.root.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(common(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a few checkpoints exist, mid-run.
    let t0 = Instant::now();
    loop {
        let n = safetune_train::checkpoint::list(&killed)
            .last()
            .map(|(s, _)| *s)
            .unwrap_or(0);
        if n >= 5 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stopped_at = safetune_train::checkpoint::list(&killed).last().unwrap().0;
    assert!(stopped_at < want.len(), "killed after the last step");
    assert!(!killed.join("adapter_model.safetensors").exists());

    let mut args = common(&killed);
    args.push("--resume".into());
    let out = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("resuming after step {stopped_at}")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        losses(&killed),
        want,
        "resumed run diverged from the uninterrupted one"
    );
    assert_eq!(
        std::fs::read(killed.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
    );
    println!(
        "killed after checkpoint {stopped_at}, resumed; {} steps match",
        want.len()
    );
}

/// `SAFETUNE_ISA` forces the training kernels' instruction set: `tune` says which one ran (on
/// stderr and in the manifest), a forced narrower one gives the same losses as the default to
/// f32 rounding, and an unknown value stops the run with an error naming the variable.
#[test]
fn safetune_isa_forces_the_kernels_and_bad_values_are_refused() {
    use safetune_train::ops::Isa;
    let f = fixture();
    let run = |out: &Path, isa: &str| -> Output {
        Command::new(env!("CARGO_BIN_EXE_safetune"))
            .env("SAFETUNE_ISA", isa)
            .args([
                "tune",
                "--model",
                &f.model,
                "--data",
                &f.data,
                "-o",
                out.to_str().unwrap(),
                "--rank",
                "4",
                "--batch-size",
                "4",
                "--max-steps",
                "3",
                "--max-len",
                "48",
                "--lr",
                "0.01",
            ])
            .output()
            .unwrap()
    };
    let manifest_isa = |out: &Path| -> String {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        m["kernel_isa"].as_str().unwrap().to_string()
    };
    let auto = f.root.join("auto");
    let o = run(&auto, "auto");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let best = Isa::detect().name();
    assert!(
        text(&o.stderr).contains(&format!("training kernels: {best}")),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(manifest_isa(&auto), best);

    // The narrowest SIMD set this CPU has below the best (scalar where there is none).
    let narrow = if Isa::detect() == Isa::Avx512f && Isa::Avx2Fma.available() {
        Isa::Avx2Fma
    } else {
        Isa::Scalar
    };
    let forced = f.root.join("forced");
    let setting = if narrow == Isa::Avx2Fma {
        "avx2"
    } else {
        "scalar"
    };
    let o = run(&forced, setting);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains(&format!("training kernels: {}", narrow.name())),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(manifest_isa(&forced), narrow.name());
    let (a, b) = (losses(&auto), losses(&forced));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1.0),
            "step {s}: {x} vs {y}"
        );
    }

    let o = run(&f.root.join("bad"), "sse9");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("SAFETUNE_ISA") && err.contains("sse9"),
        "{err}"
    );
    assert!(!f.root.join("bad").join("metrics.jsonl").exists());
}

/// `tune --bf16` where it cannot run (no AMX-BF16, or the kernels forced below AVX-512 with
/// `SAFETUNE_ISA=avx2`) stops before loading anything, naming what is missing; where it can,
/// it trains and says so.
#[test]
fn bf16_is_refused_without_its_instructions_before_loading() {
    use safetune_train::ops::Isa;
    let f = fixture();
    let run = |out: &Path, isa: &str| -> Output {
        Command::new(env!("CARGO_BIN_EXE_safetune"))
            .env("SAFETUNE_ISA", isa)
            .args([
                "tune",
                "--model",
                &f.model,
                "--data",
                &f.data,
                "-o",
                out.to_str().unwrap(),
                "--rank",
                "4",
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--max-len",
                "48",
                "--bf16",
            ])
            .output()
            .unwrap()
    };
    let amx = safetune_train::ops::bf16::amx_available();
    if Isa::Avx2Fma.available() {
        let out = f.root.join("avx2");
        let o = run(&out, "avx2");
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("--bf16"), "{err}");
        assert!(
            if amx {
                err.contains("AVX-512") && err.contains("avx2")
            } else {
                err.contains("AMX-BF16")
            },
            "{err}"
        );
        assert!(!err.contains("loading"), "{err}");
        assert!(!out.exists());
    }
    let out = f.root.join("auto");
    let o = run(&out, "auto");
    let err = text(&o.stderr);
    if amx {
        assert!(o.status.success(), "{err}");
        assert!(err.contains("bf16 products on AMX"), "{err}");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["bf16"], true);
    } else {
        eprintln!("could not run --bf16: this CPU or OS lacks AMX-BF16 (tested the refusal)");
        assert!(!o.status.success() && err.contains("AMX-BF16"), "{err}");
        assert!(!out.exists());
    }
}

/// `tune --quantized` trains an adapter on a quantized base; with `--full` it is refused.
#[test]
fn quantized_trains_an_adapter_and_refuses_full_fine_tuning() {
    let f = fixture();
    let out = f.root.join("q");
    let args = |out: &Path, extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "tune",
            "--model",
            &f.model,
            "--data",
            &f.data,
            "-o",
            out.to_str().unwrap(),
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--max-len",
            "48",
            "--quantized",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = args(&out, &[]);
    let o = safetune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.join("adapter_model.safetensors").is_file());
    assert_eq!(losses(&out).len(), 2);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!(m.to_string().contains("\"quantized\":true"), "{m}");

    let full = f.root.join("full");
    let a = args(&full, &["--full"]);
    let o = safetune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("`quantized`"), "{err}");
    assert!(err.contains("LoRA adapters only"), "{err}");
    assert!(!full.exists(), "a refused run wrote {}", full.display());
}
