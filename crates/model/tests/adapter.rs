//! LoRA adapters in the PEFT layout: files as PEFT writes them, inference with the adapter
//! unmerged and merged against weights merged by hand, quantized weights, and clear errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use safetune_model::adapter::*;
use safetune_model::testing::TinyModel;
use safetune_model::*;

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn load(dir: &Path, adapter: Option<&Path>, merge: bool) -> LocalEngine {
    LocalEngine::load(
        &ModelSpec::HfDir(dir.to_path_buf()),
        &LoadOptions {
            adapter: adapter.map(Path::to_path_buf),
            merge_adapter: merge,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn ids() -> Tensor {
    Tensor::new(
        &[
            [5u32, 72, 101, 108, 108, 111, 32, 119],
            [263, 97, 98, 99, 260, 10, 11, 12],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

fn logits(e: &LocalEngine) -> Tensor {
    e.model.forward(&ids(), None).unwrap()
}

/// A tiny base model and a random (nonzero B) adapter saved next to it.
fn base_and_adapter(root: &Path, cfg: AdapterConfig, seed: u64) -> (PathBuf, PathBuf) {
    let base = TinyModel::default().write(&root.join("base")).unwrap();
    let e = load(&base, None, false);
    let a = Adapter::init(
        &e.model,
        cfg,
        LoraInit::Gaussian {
            seed,
            std_a: 0.2,
            std_b: 0.2,
        },
    )
    .unwrap();
    let adir = root.join("adapter");
    a.save(&adir).unwrap();
    (base, adir)
}

/// Writes a copy of `base` whose weights are `W + scale * B A`, reading the adapter file with
/// plain safetensors calls (not through the adapter loader).
fn merge_by_hand(base: &Path, adapter: &Path, scale: f64, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), out.join(f)).unwrap();
    }
    let mut w =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let a = candle_core::safetensors::load(adapter.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut n = 0;
    for (key, t) in w.iter_mut() {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        let ka = format!("base_model.model.{module}.lora_A.weight");
        let kb = format!("base_model.model.{module}.lora_B.weight");
        if let (Some(la), Some(lb)) = (a.get(&ka), a.get(&kb)) {
            *t = (&*t + (lb.matmul(la).unwrap() * scale).unwrap()).unwrap();
            n += 1;
        }
    }
    assert_eq!(n, a.len() / 2, "every adapter pair merged");
    candle_core::safetensors::save(&w, out.join("model.safetensors")).unwrap();
}

#[test]
fn saved_adapter_has_the_peft_layout() {
    let root = tempfile::tempdir().unwrap();
    let (_, adir) = base_and_adapter(
        root.path(),
        AdapterConfig::lora(4, 8.0, &["q_proj", "down_proj"]),
        1,
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "down_proj"])
    );
    let st = std::fs::read(adir.join(WEIGHTS_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let t = candle_core::safetensors::load(adir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 8, "{keys:?}");
    assert_eq!(
        keys[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    // (r, in) and (out, r): down_proj is (64, 128), q_proj (64, 64).
    assert_eq!(
        t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].dims(),
        &[4, 128]
    );
    assert_eq!(
        t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].dims(),
        &[64, 4]
    );
    // Round trip.
    let back = Adapter::load(&adir).unwrap();
    assert_eq!(back.tensors.len(), 4);
    assert_eq!(back.config.r, 4);
    // Saving again into the same directory keeps other files there.
    std::fs::write(adir.join("train_log.jsonl"), "{}\n").unwrap();
    back.save(&adir).unwrap();
    assert!(adir.join("train_log.jsonl").is_file());
    assert_eq!(Adapter::load(&adir).unwrap().tensors.len(), 4);
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left behind");
}

#[test]
fn zero_b_adapter_gives_the_base_logits_exactly() {
    let root = tempfile::tempdir().unwrap();
    let base = TinyModel::default()
        .write(&root.path().join("base"))
        .unwrap();
    let e = load(&base, None, false);
    let a = Adapter::init(
        &e.model,
        AdapterConfig::lora(8, 16.0, &ALL),
        LoraInit::Peft { seed: 3 },
    )
    .unwrap();
    assert!(a.tensors.values().all(|p| p
        .a
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0));
    let adir = root.path().join("zero");
    a.save(&adir).unwrap();
    let want = logits(&e);
    for merge in [false, true] {
        let got = logits(&load(&base, Some(&adir), merge));
        let d = max_abs_diff(&want, &got);
        println!("zero adapter, merge={merge}: max abs diff {d}");
        assert_eq!(d, 0.0);
    }
    // Generation through the engine is unchanged too.
    let gen = |e: &LocalEngine| {
        e.generate(&[GenRequest {
            prompt: Prompt::Text("hello the".into()),
            sampling: Sampling {
                max_new_tokens: 12,
                ..Sampling::default()
            },
        }])
        .unwrap()[0]
            .text
            .clone()
    };
    assert_eq!(gen(&e), gen(&load(&base, Some(&adir), false)));
}

#[test]
fn random_adapter_matches_hand_merged_weights() {
    let root = tempfile::tempdir().unwrap();
    let (base, adir) = base_and_adapter(root.path(), AdapterConfig::lora(4, 8.0, &ALL), 7);
    let hand = root.path().join("hand");
    merge_by_hand(&base, &adir, 8.0 / 4.0, &hand);
    let want = logits(&load(&hand, None, false));
    let base_logits = logits(&load(&base, None, false));
    let effect = max_abs_diff(&want, &base_logits);
    println!("adapter effect on logits: max abs {effect}");
    assert!(effect > 0.05, "the adapter changes the logits ({effect})");
    let unmerged = load(&base, Some(&adir), false);
    assert!(unmerged.model.layers[0].self_attn.q_proj.lora.is_some());
    let d_unmerged = max_abs_diff(&want, &logits(&unmerged));
    let merged = load(&base, Some(&adir), true);
    assert!(merged.model.layers[0].self_attn.q_proj.lora.is_none());
    let d_merged = max_abs_diff(&want, &logits(&merged));
    println!("unmerged vs hand-merged: max abs diff {d_unmerged}; merged at load: {d_merged}");
    assert!(d_unmerged < 1e-4, "{d_unmerged}");
    assert!(d_merged < 1e-4, "{d_merged}");
    assert!(
        unmerged.model_id.ends_with("+adapter"),
        "{}",
        unmerged.model_id
    );
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_r() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, &["v_proj", "up_proj"]);
    cfg.use_rslora = true;
    let (base, adir) = base_and_adapter(root.path(), cfg, 11);
    let hand = root.path().join("hand");
    merge_by_hand(&base, &adir, 8.0 / 2.0, &hand);
    let d = max_abs_diff(
        &logits(&load(&hand, None, false)),
        &logits(&load(&base, Some(&adir), false)),
    );
    println!("rsLoRA unmerged vs hand-merged (scale alpha/sqrt(r)): max abs diff {d}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn quantized_weights_keep_their_blocks_and_add_the_f32_path() {
    // One linear layer with a Q8_0 weight: the adapter runs beside the quantized matmul.
    let (out_dim, in_dim, r) = (48, 64, 4);
    let w = Tensor::randn(0f32, 0.2, (out_dim, in_dim), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let wq = q.dequantize(&Device::Cpu).unwrap();
    let mut l = Linear {
        name: "x".into(),
        weight: LinearWeight::Quantized(QMatMul::from_qtensor(q).unwrap()),
        bias: None,
        in_dim,
        out_dim,
        lora: None,
    };
    let a = Tensor::randn(0f32, 0.3, (r, in_dim), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 0.3, (out_dim, r), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 5, in_dim), &Device::Cpu).unwrap();
    let base = l.forward(&x).unwrap();
    l.lora = Some(weights::Lora {
        a: a.clone(),
        b: b.clone(),
        scale: 1.5,
    });
    let got = l.forward(&x).unwrap();
    let merged = (wq + (b.matmul(&a).unwrap() * 1.5).unwrap()).unwrap();
    let want = x.broadcast_matmul(&merged.t().unwrap()).unwrap();
    let delta = (x.broadcast_matmul(&a.t().unwrap()).unwrap())
        .broadcast_matmul(&b.t().unwrap())
        .unwrap();
    let want_delta = (delta * 1.5).unwrap();
    // The quantized matmul also quantizes activations, so compare the adapter's share exactly
    // and the whole against the dequantized merge loosely.
    let d_delta = max_abs_diff(&(&got - &base).unwrap(), &want_delta);
    let d_all = max_abs_diff(&got, &want);
    println!("quantized + LoRA: delta max abs diff {d_delta}, vs dequantized merge {d_all}");
    assert!(d_delta < 1e-4, "{d_delta}");
    assert!(d_all < 0.1, "{d_all}");
    assert!(matches!(l.weight, LinearWeight::Quantized(_)));
}

#[test]
fn real_smollm2_quantized_with_adapter_stays_quantized() {
    let gguf = testing::smollm2_gguf();
    let opts = LoadOptions {
        quantized: true,
        ..LoadOptions::default()
    };
    let e = LocalEngine::load_gguf(&gguf, &opts).unwrap();
    let zero = Adapter::init(
        &e.model,
        AdapterConfig::lora(8, 16.0, &["q_proj", "v_proj"]),
        LoraInit::Peft { seed: 1 },
    )
    .unwrap();
    let mut m = e.model.clone();
    let s = zero.apply(&mut m, true).unwrap();
    assert_eq!(s.merged, 0, "quantized weights are never merged");
    assert_eq!(s.unmerged, 2 * e.model.cfg.num_hidden_layers);
    assert!(m.layers[0].self_attn.q_proj.weight.is_quantized());
    let ids = Tensor::new(&[[1u32, 504, 3458, 314, 4649, 30]], &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &e.model.forward(&ids, None).unwrap(),
        &m.forward(&ids, None).unwrap(),
    );
    println!("SmolLM2 quantized, zero adapter: max abs diff {d}");
    assert_eq!(d, 0.0);
}

fn expect_err(base: &Path, adir: &Path) -> String {
    let e = LocalEngine::load(
        &ModelSpec::HfDir(base.to_path_buf()),
        &LoadOptions {
            adapter: Some(adir.to_path_buf()),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    println!("{e}");
    e
}

fn edit_tensors(adir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = adir.join(WEIGHTS_FILE);
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn edit_config(adir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = adir.join(CONFIG_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn bad_adapters_are_rejected_with_the_file_key_and_shape() {
    let root = tempfile::tempdir().unwrap();
    let (base, good) = base_and_adapter(
        root.path(),
        AdapterConfig::lora(4, 8.0, &["q_proj", "up_proj"]),
        5,
    );
    let copy = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let qb = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

    let d = copy("missing_b");
    edit_tensors(&d, |t| {
        t.remove(qb);
    });
    let e = expect_err(&base, &d);
    assert!(e.contains(qb) && e.contains(WEIGHTS_FILE), "{e}");

    let d = copy("wrong_shape");
    edit_tensors(&d, |t| {
        t.insert(
            qa.into(),
            Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = expect_err(&base, &d);
    assert!(
        e.contains(qa) && e.contains("[4, 64]") && e.contains("[4, 32]"),
        "{e}"
    );

    let d = copy("wrong_rank");
    edit_config(&d, |c| c["r"] = 8.into());
    let e = expect_err(&base, &d);
    assert!(e.contains("rank 4") && e.contains("r = 8"), "{e}");

    let d = copy("unknown_target");
    edit_config(&d, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "up_proj", "qkv_proj"])
    });
    let e = expect_err(&base, &d);
    assert!(e.contains("qkv_proj") && e.contains(CONFIG_FILE), "{e}");

    let d = copy("targeted_but_missing");
    edit_config(&d, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "up_proj", "v_proj"])
    });
    let e = expect_err(&base, &d);
    assert!(
        e.contains("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"),
        "{e}"
    );

    let d = copy("foreign_module");
    edit_tensors(&d, |t| {
        let a = t[qa].clone();
        let b = t[qb].clone();
        t.insert(
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".into(),
            a,
        );
        t.insert(
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight".into(),
            b,
        );
    });
    let e = expect_err(&base, &d);
    assert!(e.contains("model.layers.7.self_attn.q_proj"), "{e}");

    let d = copy("not_lora");
    edit_config(&d, |c| c["peft_type"] = "PREFIX_TUNING".into());
    let e = expect_err(&base, &d);
    assert!(
        e.contains("peft_type") && e.contains("PREFIX_TUNING"),
        "{e}"
    );

    let d = copy("dora");
    edit_config(&d, |c| c["use_dora"] = true.into());
    let e = expect_err(&base, &d);
    assert!(e.contains("use_dora"), "{e}");

    let d = copy("bad_json");
    std::fs::write(d.join(CONFIG_FILE), "{\"peft_type\": \"LORA\",\n \"r\": }").unwrap();
    let e = expect_err(&base, &d);
    assert!(e.contains(CONFIG_FILE) && e.contains("line 2"), "{e}");

    let d = copy("stray_key");
    edit_tensors(&d, |t| {
        t.insert(
            "base_model.model.model.norm.weight".into(),
            Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = expect_err(&base, &d);
    assert!(e.contains("base_model.model.model.norm.weight"), "{e}");

    let e = expect_err(&base, &root.path().join("no_such_adapter"));
    assert!(e.contains("no_such_adapter"), "{e}");
}

#[test]
fn exported_hf_dir_loads_back_with_the_adapted_logits() {
    let root = tempfile::tempdir().unwrap();
    let (base, adir) = base_and_adapter(root.path(), AdapterConfig::lora(4, 8.0, &ALL), 21);
    let adapted = load(&base, Some(&adir), false);
    let want = logits(&adapted);
    let out = root.path().join("merged");
    let s = export::write_hf_dir(
        &adapted.model,
        &adapted.tok,
        Some(&base),
        &out,
        candle_core::DType::F32,
    )
    .unwrap();
    assert!(!s.tied);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let back = load(&out, None, false);
    let d = max_abs_diff(&want, &logits(&back));
    println!("exported (merged) vs base+adapter unmerged: max abs diff {d}");
    assert!(d < 1e-4, "{d}");
    // The output directory is never overwritten.
    let e = export::write_hf_dir(
        &adapted.model,
        &adapted.tok,
        Some(&base),
        &out,
        candle_core::DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not empty"), "{e}");
    // bf16 storage loads back close to it.
    let out16 = root.path().join("merged-bf16");
    export::write_hf_dir(
        &adapted.model,
        &adapted.tok,
        Some(&base),
        &out16,
        candle_core::DType::BF16,
    )
    .unwrap();
    let d16 = max_abs_diff(&want, &logits(&load(&out16, None, false)));
    println!("bf16 export: max abs diff {d16}");
    assert!(d16 < 0.5, "{d16}");
}

#[test]
fn tied_tiny_model_stays_tied_unless_the_head_is_adapted() {
    let root = tempfile::tempdir().unwrap();
    let base = TinyModel {
        tie_word_embeddings: true,
        ..TinyModel::default()
    }
    .write(&root.path().join("base"))
    .unwrap();
    let e = load(&base, None, false);
    for (name, targets, tied) in [
        ("attn", vec!["q_proj"], true),
        ("head", vec!["q_proj", "lm_head"], false),
    ] {
        let a = Adapter::init(
            &e.model,
            AdapterConfig::lora(2, 4.0, &targets),
            LoraInit::Gaussian {
                seed: 2,
                std_a: 0.2,
                std_b: 0.2,
            },
        )
        .unwrap();
        let adir = root.path().join(format!("adapter-{name}"));
        a.save(&adir).unwrap();
        let adapted = load(&base, Some(&adir), false);
        let out = root.path().join(format!("out-{name}"));
        let s = export::write_hf_dir(
            &adapted.model,
            &adapted.tok,
            Some(&base),
            &out,
            candle_core::DType::F32,
        )
        .unwrap();
        assert_eq!(s.tied, tied, "{name}");
        let d = max_abs_diff(&logits(&adapted), &logits(&load(&out, None, false)));
        println!("tied base, adapter on {targets:?}: export max abs diff {d}");
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn real_smollm2_gguf_exports_a_loadable_hf_dir() {
    // From a GGUF base: config.json, tokenizer.json and tokenizer_config.json (with the chat
    // template) are written from the GGUF metadata.
    let gguf = testing::smollm2_gguf();
    let e = LocalEngine::load_gguf(&gguf, &LoadOptions::default()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("smol");
    let s = export::write_hf_dir(&e.model, &e.tok, None, &out, candle_core::DType::F32).unwrap();
    assert!(s.tied);
    let back = load(&out, None, false);
    let text = "<|im_start|>user\nWhat is the capital of France? 😀 café<|im_end|>\n";
    let ids_a = e.tok.encode(text, false).unwrap();
    assert_eq!(
        ids_a,
        back.tok.encode(text, false).unwrap(),
        "tokenizer round trip"
    );
    assert_eq!(e.tok.stop_ids, back.tok.stop_ids);
    let msgs = vec![safetune_data::Message::user("Hi")];
    assert_eq!(
        e.render_chat(&msgs).unwrap(),
        back.render_chat(&msgs).unwrap()
    );
    let t = Tensor::new(&ids_a[..12], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let d = max_abs_diff(
        &e.model.forward(&t, None).unwrap(),
        &back.model.forward(&t, None).unwrap(),
    );
    println!("SmolLM2 GGUF (f32) vs exported HF dir: max abs diff {d}");
    assert_eq!(d, 0.0);
}

/// An adapter that Python PEFT wrote for the tiny model, with PEFT's logits, generated by
/// `bench/peft_compare.py --base tiny --write-fixture crates/model/tests/fixtures/peft_tiny`
/// (regenerate it if `TinyModel`'s weights change).
#[test]
fn peft_written_adapter_loads_and_matches_peft_logits() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_tiny");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("expected_logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = serde_json::from_value(expected["ids"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let base = TinyModel::default()
        .write(&root.path().join("base"))
        .unwrap();
    let adapter = Adapter::load(&fixture).unwrap();
    assert_eq!(adapter.tensors.len(), 14, "seven projections in two layers");
    for merge in [false, true] {
        let e = load(&base, Some(&fixture), merge);
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = e.model.forward(&t, None).unwrap().squeeze(0).unwrap();
        let want = Tensor::new(want.clone(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &want);
        println!(
            "PEFT {} adapter, merge={merge}: max abs diff against PEFT's logits {d}",
            expected["peft"]
        );
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn quantize_dense_holds_the_merged_weights_as_q8_0_blocks() {
    // A tuned model as a study generates with it: the adapter merged, then every dense matrix
    // quantized to Q8_0. Each weight must be the Q8_0 rounding of the merged f32 weight (within
    // half a quantization step of its block), and the logits close to the f32 merge's.
    let root = tempfile::tempdir().unwrap();
    let (base, adir) = base_and_adapter(root.path(), AdapterConfig::lora(4, 8.0, &ALL), 7);
    let f32_merged = load(&base, Some(&adir), true);
    let q = LocalEngine::load(
        &ModelSpec::HfDir(base.clone()),
        &LoadOptions {
            adapter: Some(adir.clone()),
            merge_adapter: true,
            quantize_dense: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let (lf, lq) = (linears(&f32_merged.model), linears(&q.model));
    assert_eq!(lf.len(), lq.len());
    for (a, b) in lf.iter().zip(&lq) {
        assert!(
            matches!(b.weight, LinearWeight::Blocks(_)),
            "{} not in blocks",
            b.name
        );
        assert!(
            b.lora.is_none(),
            "{}: the adapter is merged, not beside",
            b.name
        );
        let wf = a
            .dense_weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let wq = b
            .dense_weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (bf, bq) in wf.chunks(32).zip(wq.chunks(32)) {
            let amax = bf.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half a step of 127 levels, plus the f16 rounding of the block's scale.
            let tol = amax / 127.0 * 0.5 + amax * 1e-3 + 1e-7;
            for (x, y) in bf.iter().zip(bq) {
                assert!((x - y).abs() <= tol, "{}: {x} vs {y} (tol {tol})", b.name);
            }
        }
    }
    let d = max_abs_diff(&logits(&f32_merged), &logits(&q));
    let scale = logits(&f32_merged)
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    println!("Q8_0 at load vs f32 merge: logits max abs diff {d} (largest logit {scale})");
    assert!(d > 0.0, "the weights were quantized");
    assert!(d < 0.05 * scale, "logits moved by {d}");
}

#[test]
fn with_adapter_shares_the_base_and_equals_loading_with_the_adapter() {
    let root = tempfile::tempdir().unwrap();
    let (base, adir) = base_and_adapter(root.path(), AdapterConfig::lora(4, 8.0, &ALL), 31);
    let plain = load(&base, None, false);
    let before = logits(&plain);
    let adapted = plain.with_adapter(&adir, "a").unwrap();
    assert_eq!(adapted.model_id, "a");
    // The same logits as loading the model with the adapter unmerged...
    let loaded = load(&base, Some(&adir), false);
    assert_eq!(max_abs_diff(&logits(&adapted), &logits(&loaded)), 0.0);
    // ...different from the base's, and the base itself is left as it was.
    assert!(max_abs_diff(&logits(&adapted), &before) > 1e-3);
    assert_eq!(max_abs_diff(&logits(&plain), &before), 0.0);
    // A base that carries an adapter already takes no second one.
    let e = loaded.with_adapter(&adir, "b").unwrap_err().to_string();
    assert!(e.contains("already carries an adapter"), "{e}");
    // A full checkpoint passed as an adapter is named as such.
    let e = plain.with_adapter(&base, "c").unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("full checkpoint"),
        "{e}"
    );
    // An adapter for another shape of model names the file and the tensor.
    let other = TinyModel {
        hidden_size: 32,
        intermediate_size: 64,
        ..TinyModel::default()
    }
    .write(&root.path().join("other"))
    .unwrap();
    let small = load(&other, None, false);
    let e = small.with_adapter(&adir, "d").unwrap_err().to_string();
    assert!(e.contains(WEIGHTS_FILE) && e.contains("lora_A"), "{e}");
}
