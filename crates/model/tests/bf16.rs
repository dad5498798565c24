//! bf16 generation (`--bf16`, `LinearWeight::Bf16`): a bf16 layer against the f32 product of
//! the bf16-rounded operands, and the tiny test model in bf16 against f32. On a CPU with
//! AMX-BF16 the layers run the AMX kernel and the emulated one is checked beside it; elsewhere
//! every test runs on the emulated kernel (`bf16::set_emulated`), which has the same rounding
//! and sums. The kernel choice is process-wide, so every test here makes the same choice.

use candle_core::{Device, Module, Tensor, Var};
use safetune_model::bf16::{self, round_to_bf16, Bf16Kernel, Bf16Matrix};
use safetune_model::generate::{generate_batch, SeqRequest};
use safetune_model::testing::TinyModel;
use safetune_model::weights::{Linear, LinearWeight, Lora};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec, Sampling};

/// The kernel the layers run on here: AMX where the CPU has it, else the emulation.
fn choose_kernel() -> Bf16Kernel {
    if bf16::amx_available() {
        Bf16Kernel::Amx
    } else {
        eprintln!("this CPU or OS lacks AMX-BF16: testing the emulated kernel only");
        bf16::set_emulated(true);
        Bf16Kernel::Emulated
    }
}

/// `n` values uniform in [-1, 1).
use safetune_model::testing::uniform_values as values;

fn rows_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A bf16 layer (with a bias, and once with an unmerged adapter) gives the f32 product of the
/// bf16-rounded input and weight, plus the f32 bias and adapter, on odd shapes and 1 to 33
/// rows, through the tensor forward, the decoding path (`forward_rows`) and, where a gradient
/// is tracked, the dense fallback. The tolerance is f32 summation error, far below bf16
/// rounding: the unrounded f32 product fails it.
#[test]
fn a_bf16_layer_computes_the_rounded_product() {
    let kernel = choose_kernel();
    for &(inp, out) in &[(70, 45), (100, 37), (33, 130)] {
        let w = values(out * inp, inp as u64);
        let bias = values(out, 7);
        let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(bias.clone(), out, &Device::Cpu).unwrap();
        let mut layer = Linear::dense("layer", wt, Some(bt)).unwrap();
        let rank = 3;
        let (la, lb) = (values(rank * inp, 11), values(out * rank, 12));
        let with_lora = inp == 100;
        if with_lora {
            layer.lora = Some(Lora {
                a: Tensor::from_vec(la.clone(), (rank, inp), &Device::Cpu).unwrap(),
                b: Tensor::from_vec(lb.clone(), (out, rank), &Device::Cpu).unwrap(),
                scale: 0.5,
            });
        }
        assert!(layer.to_bf16().unwrap());
        assert!(matches!(layer.weight, LinearWeight::Bf16(_)));
        assert!(!layer.to_bf16().unwrap(), "already bf16");
        // dense_weight() gives the rounded values.
        let dense = rows_of(&layer.dense_weight().unwrap());
        assert!(dense.iter().zip(&w).all(|(d, x)| *d == round_to_bf16(*x)));
        let LinearWeight::Bf16(m) = &layer.weight else {
            unreachable!()
        };
        for rows in [1usize, 3, 17, 33] {
            let x = values(rows * inp, 100 + rows as u64);
            let xt = Tensor::from_vec(x.clone(), (rows, inp), &Device::Cpu).unwrap();
            let tol = 2e-6 * (inp as f64).sqrt() + 1e-6;
            let mut f32_differs = false;
            let check = |got: &[f32], what: &str, f32_differs: &mut bool| {
                for i in 0..rows {
                    for j in 0..out {
                        let dot = |round: bool| -> f64 {
                            (0..inp)
                                .map(|p| {
                                    let (a, b) = (x[i * inp + p], w[j * inp + p]);
                                    if round {
                                        round_to_bf16(a) as f64 * round_to_bf16(b) as f64
                                    } else {
                                        a as f64 * b as f64
                                    }
                                })
                                .sum()
                        };
                        let mut extra = bias[j] as f64;
                        if with_lora {
                            extra += 0.5
                                * (0..rank)
                                    .map(|r| {
                                        let xa: f64 = (0..inp)
                                            .map(|p| x[i * inp + p] as f64 * la[r * inp + p] as f64)
                                            .sum();
                                        xa * lb[j * rank + r] as f64
                                    })
                                    .sum::<f64>();
                        }
                        let want = dot(true) + extra;
                        let g = got[i * out + j] as f64;
                        assert!(
                            (g - want).abs() <= tol,
                            "{what} {kernel:?} ({rows}, {inp}) -> {out}: [{i},{j}] {g} vs {want}"
                        );
                        if (dot(false) + extra - want).abs() > 10.0 * tol {
                            *f32_differs = true;
                        }
                    }
                }
            };
            let y = rows_of(&layer.forward(&xt).unwrap());
            check(&y, "forward", &mut f32_differs);
            let y = layer.forward_rows(&x, rows).unwrap();
            check(&y, "forward_rows", &mut f32_differs);
            // A tracked input takes the dense path over the rounded weight; the input itself
            // is not rounded there, so only the f32 tolerance of that path is asked for.
            let v = Var::from_tensor(&xt).unwrap();
            let yv = layer.forward(v.as_tensor()).unwrap();
            let grads = yv.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient");
            let mut dense_layer = layer.clone();
            dense_layer.weight = LinearWeight::Dense(layer.dense_weight().unwrap());
            let want = rows_of(&dense_layer.forward(&xt).unwrap());
            for (t, d) in rows_of(&yv).iter().zip(&want) {
                assert!((t - d).abs() <= 1e-5, "tracked {t} vs dense {d}");
            }
            // The emulated kernel agrees with the layer's (AMX where present) to f32 sums.
            let emu = m.matmul_with(Bf16Kernel::Emulated, &x, rows);
            let got = m.matmul(&x, rows).unwrap();
            for (e, g) in emu.iter().zip(&got) {
                assert!(
                    (e - g).abs() as f64 <= tol,
                    "emulated {e} vs {kernel:?} {g}"
                );
            }
            if inp >= 64 {
                assert!(f32_differs, "({rows}, {inp}): indistinguishable from f32");
            }
        }
    }
    // A packed matrix holds 2 bytes per value (padded to 32 x 32 blocks).
    let m = Bf16Matrix::from_rows(&values(45 * 70, 1), 45, 70);
    assert_eq!(m.bytes(), 64 * 96 * 2);
}

fn load(dir: &std::path::Path, bf16: bool) -> LocalEngine {
    LocalEngine::load(
        &ModelSpec::parse(dir.to_str().unwrap()).unwrap(),
        &LoadOptions {
            quantized: false,
            batch_size: 4,
            bf16,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// The tiny model in bf16 against f32 (both layouts: separate head and grouped-query
/// attention; tied embeddings with q/k/v bias): every projection and the head hold bf16,
/// the logits stay close, and greedy generation runs, batched rows equal to each row alone.
///
/// The bound: a bf16 operand carries a relative error of at most 2^-9, so one product's
/// relative error is at most about 2^-8 of the sum of its terms' magnitudes; a logit goes
/// through five such products in sequence (two blocks of attention and MLP, then the head),
/// with RMSNorm rescaling in between, so a max difference of 5 x 2^-8 (about 2%) of the
/// largest logit bounds it with room. The difference must also exceed f32 noise (1e-4 of it):
/// bf16 really ran.
#[test]
fn the_tiny_model_in_bf16_tracks_f32_and_generates() {
    choose_kernel();
    for (name, spec) in [
        ("default", TinyModel::default()),
        (
            "tied+bias",
            TinyModel {
                tie_word_embeddings: true,
                attention_bias: true,
                num_key_value_heads: 4,
                seed: 3,
                ..TinyModel::default()
            },
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        spec.write(dir.path()).unwrap();
        let f = load(dir.path(), false);
        let b = load(dir.path(), true);
        let linears = safetune_model::adapter::linears(&b.model);
        assert!(linears
            .iter()
            .all(|l| matches!(l.weight, LinearWeight::Bf16(_))));
        let ids = Tensor::new(&[[1u32, 5, 9, 33, 70, 2, 8, 100]], &Device::Cpu).unwrap();
        let lf = rows_of(&f.model.forward(&ids, None).unwrap());
        let lb = rows_of(&b.model.forward(&ids, None).unwrap());
        let scale = lf.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = lf
            .iter()
            .zip(&lb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("{name}: max |logit| {scale}, max |bf16 - f32| {diff}");
        assert!(diff <= 5.0 / 256.0 * scale, "{name}: {diff} vs {scale}");
        assert!(diff > 1e-4 * scale, "{name}: bf16 changed nothing ({diff})");

        let reqs: Vec<SeqRequest> = ["hello there", "is this ok?", "0123 abc"]
            .iter()
            .map(|p| SeqRequest {
                prompt_ids: b.tok.encode(p, false).unwrap(),
                sampling: Sampling {
                    max_new_tokens: 8,
                    ..Sampling::default()
                },
            })
            .collect();
        let batched = generate_batch(&b.model, &b.tok, &reqs, &mut |_, _| {}).unwrap();
        let exact = generate_batch(&f.model, &f.tok, &reqs, &mut |_, _| {}).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            assert!(!batched[i].ids.is_empty(), "{name} row {i}: no tokens");
            let alone =
                generate_batch(&b.model, &b.tok, std::slice::from_ref(r), &mut |_, _| {}).unwrap();
            assert_eq!(
                batched[i].ids, alone[0].ids,
                "{name} row {i}: batched and alone differ"
            );
            println!(
                "{name} row {i}: bf16 {:?} f32 {:?}",
                batched[i].ids, exact[i].ids
            );
        }
    }
}
