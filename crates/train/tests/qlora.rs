//! LoRA on a quantized base (`tune --quantized`): the quantized frozen linear against the f32
//! linear over its dequantized weights, a short run on the tiny model against the f32 run, and
//! full fine-tuning refused.

mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, Var};
use safetune_model::quant::{Layout, QFormat, QMatrix, BLOCK};
use safetune_model::testing::TinyModel;
use safetune_train::qlinear::{input_grad, qlinear, qlora_linear};
use safetune_train::{tune, Mode, RunOptions, Target, TrainModel, TuneConfig};

fn randn(shape: (usize, usize), seed: u64) -> Vec<f32> {
    // A small LCG: reproducible without the candle generator's state.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..shape.0 * shape.1)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn matrix(w: &[f32], rows: usize, cols: usize, dt: GgmlDType, layout: Layout) -> QMatrix {
    let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dt).unwrap();
    QMatrix::from_gguf_bytes_in(
        QFormat::from_ggml(dt).unwrap(),
        rows,
        cols,
        &q.data().unwrap(),
        layout,
    )
    .unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Odd shapes: 37 and 300 output rows (a partial packed group; two gemm panels, the second
/// partial), 96 and 160 input columns, 5 and 19 activation rows; each format and both layouts.
const CASES: [(usize, usize, usize); 2] = [(37, 96, 5), (300, 160, 19)];
const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

#[test]
fn forward_matches_the_dequantized_f32_linear_within_the_activation_rounding() {
    for (rows, cols, n) in CASES {
        let w = randn((rows, cols), 1);
        let x = randn((n, cols), 2);
        for dt in FORMATS {
            for layout in [Layout::Rows, Layout::Packed] {
                let q = Arc::new(matrix(&w, rows, cols, dt, layout));
                let deq = q.dequantize();
                let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
                let y = vals(&qlinear(&xt, &q, None).unwrap());
                // The kernel rounds each 32-value activation block to 8 bits: at most half a
                // level (max |x| / 254) per value, so the error of an output is bounded by the
                // sum over blocks of that half level times the block's sum of |w|.
                for i in 0..n {
                    for r in 0..rows {
                        let (mut exact, mut bound) = (0f64, 1e-4f64);
                        for b in 0..cols / BLOCK {
                            let xb = &x[i * cols + b * BLOCK..i * cols + (b + 1) * BLOCK];
                            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                            let mut wsum = 0f64;
                            for (j, xv) in xb.iter().enumerate() {
                                let wv = deq[r * cols + b * BLOCK + j] as f64;
                                exact += *xv as f64 * wv;
                                wsum += wv.abs();
                            }
                            bound += amax / 254.0 * wsum * 1.01;
                        }
                        let got = y[i * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{dt:?} {layout:?} {rows}x{cols} out[{i},{r}] = {got}, f32 {exact}, bound {bound}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn input_gradient_from_the_blocks_equals_the_dequantized_product() {
    for (rows, cols, n) in CASES {
        let w = randn((rows, cols), 3);
        let dy = randn((n, rows), 4);
        for dt in FORMATS {
            for layout in [Layout::Rows, Layout::Packed] {
                let q = matrix(&w, rows, cols, dt, layout);
                let deq = q.dequantize();
                let dx = input_grad(&q, &dy);
                for i in 0..n {
                    for c in 0..cols {
                        let exact: f64 = (0..rows)
                            .map(|r| dy[i * rows + r] as f64 * deq[r * cols + c] as f64)
                            .sum();
                        let got = dx[i * cols + c] as f64;
                        assert!(
                            (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                            "{dt:?} {layout:?} {rows}x{cols} dx[{i},{c}] = {got}, f32 {exact}"
                        );
                    }
                }
            }
        }
    }
}

/// The adapter op's gradients for x, A and B through candle's backward pass against the same
/// layer from candle primitives over the dequantized weight (with a bias and a dropout mask).
#[test]
fn lora_op_gradients_match_the_f32_layer_over_the_dequantized_weight() {
    let dev = Device::Cpu;
    let (rows, cols, n, r) = (70, 96, 9, 4);
    let w = randn((rows, cols), 5);
    for dt in FORMATS {
        let q = Arc::new(matrix(&w, rows, cols, dt, Layout::for_this_cpu()));
        let deq = Tensor::from_vec(q.dequantize(), (rows, cols), &dev).unwrap();
        let x = Var::from_vec(randn((n, cols), 6), (n, cols), &dev).unwrap();
        let a = Var::from_vec(randn((r, cols), 7), (r, cols), &dev).unwrap();
        let b = Var::from_vec(randn((rows, r), 8), (rows, r), &dev).unwrap();
        let bias = Tensor::from_vec(randn((1, rows), 9), rows, &dev).unwrap();
        let mask: Vec<f32> = randn((n, cols), 10)
            .iter()
            .map(|v| if *v > -0.5 { 1.0 / 0.75 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (n, cols), &dev).unwrap();
        // A fixed upstream gradient: loss = sum(y * g).
        let g = Tensor::from_vec(randn((n, rows), 11), (n, rows), &dev).unwrap();
        let ours = qlora_linear(
            x.as_tensor(),
            &q,
            Some(&bias),
            a.as_tensor(),
            b.as_tensor(),
            1.5,
            Some(&mask),
        )
        .unwrap();
        let reference = {
            let base = x
                .as_tensor()
                .matmul(&deq.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let xd = (x.as_tensor() * &mask).unwrap();
            let delta = xd
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap();
            (base + (delta * 1.5).unwrap()).unwrap()
        };
        // Forward: within the activation rounding (see the test above; a loose bound here).
        let (yo, yr) = (vals(&ours), vals(&reference));
        let worst = yo
            .iter()
            .zip(&yr)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.05, "{dt:?}: forward differs by {worst}");
        let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
            let (o, rf) = (
                vals(go.get(v.as_tensor()).unwrap()),
                vals(gr.get(v.as_tensor()).unwrap()),
            );
            for (k, (p, q)) in o.iter().zip(&rf).enumerate() {
                assert!(
                    (p - q).abs() < 1e-4 * (1.0 + q.abs()),
                    "{dt:?} grad {name}[{k}]: {p} vs {q}"
                );
            }
        }
    }
}

fn run_config(dir: &std::path::Path, model: &std::path::Path, out: &str) -> TuneConfig {
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
        targets: vec![
            Target::Q,
            Target::K,
            Target::V,
            Target::O,
            Target::Up,
            Target::Down,
        ],
        epochs: 1,
        max_steps: 6,
        lr: 1e-2,
        batch_size: 2,
        max_len: 64,
        eval_fraction: 0.0,
        packing: true,
        ..TuneConfig::default()
    }
}

fn losses(s: &safetune_train::TuneSummary) -> Vec<f64> {
    s.losses.iter().map(|(_, l)| *l).collect()
}

/// A few LoRA steps on the tiny model with its projections in Q8_0 and Q4_0 GGUF blocks (and a
/// safetensors base quantized at load) track the f32 run on the same weights, and the loss
/// goes down; the adapter is the usual PEFT one.
#[test]
fn quantized_lora_steps_track_the_f32_run() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::default();
    let hf = tiny.write(&dir.path().join("tiny")).unwrap();
    let f32_gguf = tiny.write_gguf(&dir.path().join("tiny-f32.gguf")).unwrap();
    let run = |model: &std::path::Path, out: &str, quantized: bool| {
        let mut cfg = run_config(dir.path(), model, out);
        cfg.quantized = quantized;
        tune(&cfg, &RunOptions::default(), &mut |_| {}).unwrap()
    };
    let base = losses(&run(&f32_gguf, "f32", false));
    assert!(
        base.last().unwrap() < &(base[0] * 0.9),
        "the f32 run does not learn: {base:?}"
    );
    let cases = [
        ("q8_0", GgmlDType::Q8_0, 0.02),
        ("q4_0", GgmlDType::Q4_0, 0.10),
    ];
    for (name, dt, tol) in cases {
        let path = tiny
            .write_gguf_as(&dir.path().join(format!("tiny-{name}.gguf")), dt)
            .unwrap();
        let s = run(&path, name, true);
        let q = losses(&s);
        assert_eq!(q.len(), base.len());
        for (i, (a, b)) in q.iter().zip(&base).enumerate() {
            assert!(
                (a - b).abs() <= tol * b,
                "{name} step {i}: loss {a} vs f32 {b} ({q:?} vs {base:?})"
            );
        }
        assert_ne!(
            q, base,
            "{name}: the quantized run gave the f32 losses exactly"
        );
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(name).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 4);
        assert!(cfg["base_model_name_or_path"].as_str().is_some());
        assert!(dir
            .path()
            .join(name)
            .join("adapter_model.safetensors")
            .is_file());
    }
    // A safetensors base quantized to Q8_0 at load.
    let st = losses(&run(&hf, "st-q8", true));
    for (i, (a, b)) in st.iter().zip(&base).enumerate() {
        assert!(
            (a - b).abs() <= 0.02 * b,
            "safetensors q8_0 step {i}: {a} vs {b}"
        );
    }
}

/// The trainable model keeps the projections in blocks (no f32 weight) and only the adapters
/// train.
#[test]
fn the_quantized_model_holds_blocks_and_trains_only_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::default()
        .write_gguf_as(&dir.path().join("q4.gguf"), GgmlDType::Q4_0)
        .unwrap();
    let engine = safetune_model::LocalEngine::load(
        &safetune_model::ModelSpec::parse(&path.display().to_string()).unwrap(),
        &safetune_model::LoadOptions {
            quantized: true,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = TuneConfig {
        rank: 2,
        ..TuneConfig::default()
    };
    let m = TrainModel::from_llama_quantized(&engine.model, &cfg.mode(), 0).unwrap();
    for b in &m.blocks {
        for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
            let q = l.blocks.as_ref().expect("blocks");
            assert_eq!(q.format, QFormat::Q4_0, "{}", l.name);
            assert_eq!(l.weight.elem_count(), 0, "{} keeps an f32 weight", l.name);
            assert!(l.lora.is_some());
        }
    }
    assert!(m.params.iter().all(|p| p.name.contains(".lora_")));
}

#[test]
fn full_fine_tuning_on_a_quantized_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::default()
        .write_gguf_as(&dir.path().join("q8.gguf"), GgmlDType::Q8_0)
        .unwrap();
    let mut cfg = run_config(dir.path(), &path, "full");
    cfg.quantized = true;
    cfg.full = true;
    let err = tune(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized"), "{err}");
    assert!(err.contains("LoRA"), "{err}");
    assert!(!dir
        .path()
        .join("full")
        .join("adapter_model.safetensors")
        .exists());
    // The library refuses too.
    let engine = safetune_model::LocalEngine::load(
        &safetune_model::ModelSpec::parse(&path.display().to_string()).unwrap(),
        &safetune_model::LoadOptions {
            quantized: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = TrainModel::from_llama_quantized(&engine.model, &Mode::Full, 0).unwrap_err();
    assert!(e.to_string().contains("LoRA adapters only"), "{e}");
}
