//! The trainable decoder against the inference decoder, and gradient flow.

mod common;

use candle_core::{DType, Device, Tensor, D};
use safetune_model::weights::Lora;
use safetune_train::loss::head_loss_sum;
use safetune_train::model::{segment_mask, SideGrads, Step};
use safetune_train::rng::TrainRng;
use safetune_train::sft::IGNORE;
use safetune_train::{LoraSettings, Mode, Target, TrainModel};

fn lora_all(rank: usize) -> Mode {
    Mode::Lora(LoraSettings {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    })
}

fn ids(b: usize, t: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i as u32 * 37 + 11) % vocab).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn positions(b: usize, t: usize) -> Tensor {
    Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((b, 1))
        .unwrap()
}

fn train_logits(m: &TrainModel, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let mask = segment_mask(&vec![vec![1u32; t]; b]).unwrap();
    let h = m
        .hidden_states(ids, &positions(b, t), &mask, &mut Step::eval())
        .unwrap();
    m.logits(&h).unwrap()
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

/// Gives every LoRA B random values (a trained adapter).
fn randomize_b(m: &TrainModel) {
    for p in &m.params {
        if p.name.ends_with("lora_B.weight") {
            let t = Tensor::randn(0f32, 0.05, p.var.shape(), &Device::Cpu).unwrap();
            p.var.set(&t).unwrap();
        }
    }
}

#[test]
fn fresh_lora_logits_equal_inference() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let m = TrainModel::from_llama(&engine.model, &lora_all(4), 7).unwrap();
    let ids = ids(2, 9, engine.model.cfg.vocab_size as u32);
    let want = engine.model.forward(&ids, None).unwrap();
    let got = train_logits(&m, &ids);
    let d = max_abs_diff(&want, &got);
    println!("fresh LoRA vs inference: max abs diff {d:e}");
    assert_eq!(got.dims(), want.dims());
    assert!(d < 1e-4, "max abs diff {d}");
}

#[test]
fn trained_lora_logits_equal_inference_with_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let m = TrainModel::from_llama(&engine.model, &lora_all(4), 7).unwrap();
    randomize_b(&m);
    // Attach the same matrices to the inference model's LoRA slots.
    let mut inf = engine.model.clone();
    let adapters = m.lora_tensors();
    assert_eq!(adapters.len(), 7 * inf.layers.len());
    for blk in inf.layers.iter_mut() {
        let a = &mut blk.self_attn;
        let mm = &mut blk.mlp;
        for l in [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut mm.gate_proj,
            &mut mm.up_proj,
            &mut mm.down_proj,
        ] {
            let (_, la, lb, scale) = adapters.iter().find(|x| x.0 == l.name).unwrap();
            l.lora = Some(Lora {
                a: la.clone(),
                b: lb.clone(),
                scale: *scale,
            });
        }
    }
    let ids = ids(2, 9, engine.model.cfg.vocab_size as u32);
    let want = inf.forward(&ids, None).unwrap();
    let base = engine.model.forward(&ids, None).unwrap();
    let got = train_logits(&m, &ids);
    let d = max_abs_diff(&want, &got);
    println!("trained LoRA vs inference with the adapter: max abs diff {d:e}");
    assert!(d < 1e-4, "max abs diff {d}");
    // And the adapter does change the output (the comparison is not vacuous).
    assert!(max_abs_diff(&base, &got) > 1e-3);
}

#[test]
fn full_mode_logits_equal_inference_tied_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = safetune_model::testing::TinyModel {
        tie_word_embeddings: true,
        attention_bias: true,
        ..Default::default()
    };
    let path = tiny.write(&dir.path().join("tied")).unwrap();
    let engine = safetune_model::LocalEngine::load_hf_dir(&path, &Default::default()).unwrap();
    let m = TrainModel::from_llama(&engine.model, &Mode::Full, 0).unwrap();
    // Tied: one embedding Var serves as the head; biases are trained too.
    assert!(m.params.iter().all(|p| p.name != "lm_head.weight"));
    assert!(m.params.iter().any(|p| p.name.ends_with("q_proj.bias")));
    let ids = ids(1, 6, engine.model.cfg.vocab_size as u32);
    let d = max_abs_diff(
        &engine.model.forward(&ids, None).unwrap(),
        &train_logits(&m, &ids),
    );
    println!("full mode (tied, qkv bias) vs inference: max abs diff {d:e}");
    assert!(d < 1e-4, "max abs diff {d}");
}

fn loss_and_grads(m: &TrainModel, ids: &Tensor) -> candle_core::backprop::GradStore {
    loss_and_grads_with(m, ids, &mut Step::eval()).1
}

/// The loss and the gradients of every param; a recomputing step's side gradients merged in.
fn loss_and_grads_with(
    m: &TrainModel,
    ids: &Tensor,
    step: &mut Step,
) -> (f32, candle_core::backprop::GradStore) {
    let (b, t) = ids.dims2().unwrap();
    let flat: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    // Next-token labels, the first position of each row unlabelled (like a prompt).
    let mut labels = vec![IGNORE; b * t];
    for r in 0..b {
        for i in 1..t - 1 {
            labels[r * t + i] = flat[r * t + i + 1];
        }
    }
    let mask = segment_mask(&vec![vec![1u32; t]; b]).unwrap();
    let h = m.hidden_states(ids, &positions(b, t), &mask, step).unwrap();
    let (loss, n) = head_loss_sum(&h, &m.lm_head, &labels, 5).unwrap();
    assert_eq!(n, b * (t - 2));
    let mut g = loss.backward().unwrap();
    if let Some(side) = &step.recompute {
        // The blocks are opaque to candle's graph: their params' gradients come from the side
        // store only.
        let inside = m
            .params
            .iter()
            .find(|p| p.name.contains(".layers."))
            .unwrap();
        assert!(g.get(inside.var.as_tensor()).is_none(), "{}", inside.name);
        let vars: Vec<_> = m.params.iter().map(|p| p.var.clone()).collect();
        side.merge_into(&vars, &mut g).unwrap();
    }
    (loss.to_scalar::<f32>().unwrap(), g)
}

/// Activation recomputation changes memory, not results: the same loss and the same gradient
/// for every param, with dropout masks replayed in the backward pass, for LoRA and full tuning.
#[test]
fn recomputed_blocks_give_the_same_loss_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let lora = Mode::Lora(LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.3,
        targets: Target::ALL.to_vec(),
    });
    for mode in [lora, Mode::Full] {
        let m = TrainModel::from_llama(&engine.model, &mode, 5).unwrap();
        randomize_b(&m);
        let ids = ids(2, 8, engine.model.cfg.vocab_size as u32);
        let (mut r1, mut r2) = (TrainRng::new(9), TrainRng::new(9));
        let (l1, g1) = loss_and_grads_with(
            &m,
            &ids,
            &mut Step {
                rng: Some(&mut r1),
                recompute: None,
            },
        );
        let (l2, g2) = loss_and_grads_with(
            &m,
            &ids,
            &mut Step {
                rng: Some(&mut r2),
                recompute: Some(SideGrads::default()),
            },
        );
        assert_eq!(r1, r2, "both passes draw the same dropout masks");
        assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs {l2}");
        let mut worst = 0f32;
        for p in &m.params {
            let a = g1.get(p.var.as_tensor()).expect("plain gradient");
            let b = g2
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("no recomputed gradient for {}", p.name));
            let rel = max_abs_diff(a, b) / norm(a).max(1e-6);
            assert!(rel < 1e-4, "{}: relative difference {rel}", p.name);
            worst = worst.max(rel);
        }
        println!("{mode:?}: loss {l1}, worst relative gradient difference {worst:e}");
    }
}

fn norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

#[test]
fn gradients_reach_every_lora_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let m = TrainModel::from_llama(&engine.model, &lora_all(4), 3).unwrap();
    let ids = ids(2, 8, engine.model.cfg.vocab_size as u32);
    // Fresh adapter: B = 0, so only B has a gradient (dL/dA is proportional to B).
    let g = loss_and_grads(&m, &ids);
    for p in &m.params {
        let n = norm(
            g.get(p.var.as_tensor())
                .expect("a gradient for every param"),
        );
        if p.name.ends_with("lora_B.weight") {
            assert!(n > 0.0, "{} has a zero gradient", p.name);
        }
    }
    // Once B is nonzero, every A and B gets a nonzero gradient.
    randomize_b(&m);
    let g = loss_and_grads(&m, &ids);
    let mut min = f32::MAX;
    for p in &m.params {
        let n = norm(g.get(p.var.as_tensor()).unwrap());
        assert!(n > 0.0 && n.is_finite(), "{}: gradient norm {n}", p.name);
        min = min.min(n);
    }
    println!(
        "{} LoRA tensors, smallest gradient norm {min:e}",
        m.params.len()
    );
    assert_eq!(m.params.len(), 2 * 7 * engine.model.cfg.num_hidden_layers);
}

#[test]
fn full_mode_gradients_reach_every_weight() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let m = TrainModel::from_llama(&engine.model, &Mode::Full, 0).unwrap();
    let g = loss_and_grads(&m, &ids(2, 8, engine.model.cfg.vocab_size as u32));
    // embeddings, 2 norms + 7 projections per layer, final norm, untied head
    assert_eq!(m.params.len(), 1 + 9 * 2 + 1 + 1);
    for p in &m.params {
        let n = norm(g.get(p.var.as_tensor()).unwrap());
        assert!(n > 0.0 && n.is_finite(), "{}: gradient norm {n}", p.name);
    }
}

/// The chunked head loss equals log-softmax cross-entropy over the full logits, in value and in
/// the gradient it sends back.
#[test]
fn chunked_head_loss_matches_full_logits() {
    let dev = Device::Cpu;
    let (n, c, v) = (11, 8, 29);
    let h = candle_core::Var::randn(0f32, 1.0, (n, c), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (v, c), &dev).unwrap();
    let labels: Vec<u32> = (0..n)
        .map(|i| {
            if i % 3 == 0 {
                IGNORE
            } else {
                (i * 7 % v) as u32
            }
        })
        .collect();
    let (loss, count) = head_loss_sum(h.as_tensor(), &w, &labels, 3).unwrap();
    let g = loss.backward().unwrap();
    let gh = g.get(h.as_tensor()).unwrap();
    // Reference: full logits, log-softmax, pick.
    let h2 = candle_core::Var::from_tensor(h.as_tensor()).unwrap();
    let logits = h2.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let mut parts = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l != IGNORE {
            parts.push(lsm.get(i).unwrap().get(l as usize).unwrap().neg().unwrap());
        }
    }
    let want = Tensor::stack(&parts, 0).unwrap().sum_all().unwrap();
    let g2 = want.backward().unwrap();
    let gh2 = g2.get(h2.as_tensor()).unwrap();
    assert_eq!(count, parts.len());
    let dl = (loss.to_scalar::<f32>().unwrap() - want.to_scalar::<f32>().unwrap()).abs();
    let dg = max_abs_diff(gh, gh2);
    println!("chunked head loss: |loss diff| {dl:e}, max grad diff {dg:e}");
    assert!(dl < 1e-3 && dg < 1e-4);
    // Ignored rows get no gradient.
    let row0 = gh.get(0).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(
        row0.to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

/// Packing: two examples in one row with block-diagonal attention give the same hidden states
/// as each in its own row.
#[test]
fn packed_rows_do_not_attend_across_examples() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let m = TrainModel::from_llama(&engine.model, &lora_all(2), 0).unwrap();
    let dev = Device::Cpu;
    let a: Vec<u32> = vec![5, 9, 33, 104, 2];
    let b: Vec<u32> = vec![77, 12, 250];
    let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
    let pos: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let seg: Vec<u32> = vec![1; a.len()]
        .into_iter()
        .chain(vec![2; b.len()])
        .collect();
    let t = packed.len();
    let hp = m
        .hidden_states(
            &Tensor::from_vec(packed, (1, t), &dev).unwrap(),
            &Tensor::from_vec(pos, (1, t), &dev).unwrap(),
            &segment_mask(&[seg]).unwrap(),
            &mut Step::eval(),
        )
        .unwrap();
    let single = |x: &[u32]| {
        let n = x.len();
        m.hidden_states(
            &Tensor::from_vec(x.to_vec(), (1, n), &dev).unwrap(),
            &positions(1, n),
            &segment_mask(&[vec![1; n]]).unwrap(),
            &mut Step::eval(),
        )
        .unwrap()
    };
    let ha = single(&a);
    let hb = single(&b);
    let d1 = max_abs_diff(&hp.narrow(1, 0, a.len()).unwrap(), &ha);
    let d2 = max_abs_diff(&hp.narrow(1, a.len(), b.len()).unwrap(), &hb);
    println!("packed vs separate: max abs diff {d1:e}, {d2:e}");
    assert!(d1 < 1e-5 && d2 < 1e-5);
}

/// The fused LoRA projection (one op over x, A, B) against the same layer from candle
/// primitives, in output and in every gradient, with a dropout mask and a bias; and its
/// gradients against central differences (exact up to rounding: the output is linear in x, in
/// A and in B).
#[test]
fn fused_lora_projection_matches_primitives_and_finite_differences() {
    use candle_core::Var;
    use safetune_train::model::{LoraVars, TrainLinear};
    let dev = Device::Cpu;
    let (n, inp, out, r) = (6, 10, 7, 3);
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.5, (r, inp), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, (out, r), &dev).unwrap()).unwrap();
    let lin = TrainLinear {
        name: "test.q_proj".into(),
        weight: Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap(),
        blocks: None,
        bias: Some(Tensor::randn(0f32, 0.5, out, &dev).unwrap()),
        lora: Some(LoraVars {
            a: a.clone(),
            b: b.clone(),
            scale: 1.5,
            dropout: 0.25,
        }),
    };
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev).unwrap()).unwrap();
    let weights = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
    // loss = sum(y * weights), with the dropout mask drawn from a fixed seed.
    let run = |fused: bool, x: &Tensor| -> (Tensor, f32) {
        let mut rng = TrainRng::new(4);
        let mut step = Step {
            rng: Some(&mut rng),
            recompute: None,
        };
        let y = if fused {
            lin.forward(x, &mut step).unwrap()
        } else {
            lin.forward_reference(x, &mut step).unwrap()
        };
        let loss = (&y * &weights).unwrap().sum_all().unwrap();
        (y, loss.to_scalar::<f32>().unwrap())
    };
    let grads = |fused: bool| {
        let mut rng = TrainRng::new(4);
        let mut step = Step {
            rng: Some(&mut rng),
            recompute: None,
        };
        let y = if fused {
            lin.forward(x.as_tensor(), &mut step).unwrap()
        } else {
            lin.forward_reference(x.as_tensor(), &mut step).unwrap()
        };
        (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (yf, _) = run(true, x.as_tensor());
    let (yr, _) = run(false, x.as_tensor());
    let dy = max_abs_diff(&yf, &yr);
    assert!(dy < 1e-5, "output differs by {dy}");
    let (gf, gr) = (grads(true), grads(false));
    for (name, t) in [("x", &x), ("A", &a), ("B", &b)] {
        let d = max_abs_diff(
            gf.get(t.as_tensor()).unwrap(),
            gr.get(t.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "gradient of {name} differs by {d}");
    }
    // Central differences on a few entries of each input.
    let eps = 1e-2f32;
    for (name, t) in [("x", &x), ("A", &a), ("B", &b)] {
        let analytic: Vec<f32> = gf
            .get(t.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = t.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for k in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[k] += delta;
                t.set(&Tensor::from_vec(v, t.shape(), &dev).unwrap())
                    .unwrap();
                let l = run(true, x.as_tensor()).1;
                t.set(&Tensor::from_vec(base.clone(), t.shape(), &dev).unwrap())
                    .unwrap();
                l
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[k]).abs() / analytic[k].abs().max(1.0);
            assert!(
                err < 2e-3,
                "d loss / d {name}[{k}]: numeric {numeric}, analytic {}",
                analytic[k]
            );
        }
    }
}
