//! Fused vs reference training ops at SmolLM2-135M shapes (batch 8 x 256 tokens): forward plus
//! backward time of each op, median of a few runs. Not a test.
//!
//!     taskset -c 0,1 cargo run --release -p safetune-train --example ops_bench [-- REPS]
//!
//! Shapes: C 576, H 9, K 3, D 64, I 1536, V 49152, N = 8 * 256 rows.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use safetune_train::ops::{fused, reference, AdamW, AdamWParams, Kernels};

const B: usize = 8;
const T: usize = 256;
const C: usize = 576;
const H: usize = 9;
const K: usize = 3;
const D: usize = 64;
const I: usize = 1536;
const V: usize = 49152;

type AttnFn = dyn Fn(&Tensor, &Tensor, &Tensor, f64, Option<&Tensor>) -> Result<Tensor>;
type CeFn = dyn Fn(&Tensor, &Tensor, i64) -> Result<(Tensor, usize)>;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed)).unwrap()
}

/// Median seconds of `reps` runs of f (after one warm-up run).
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> f64 {
    f().unwrap();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f().unwrap();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

fn report(name: &str, fused_s: f64, ref_s: f64) {
    println!(
        "{name:<34} fused {:>9.2} ms   reference {:>9.2} ms   speedup {:>5.2}x",
        fused_s * 1e3,
        ref_s * 1e3,
        ref_s / fused_s
    );
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!(
        "ops_bench: B={B} T={T} C={C} H={H} K={K} D={D} I={I} V={V}; forward+backward, median of {reps}, rayon threads {}",
        rayon::current_num_threads()
    );

    // RMSNorm over (B, T, C), frozen weight (LoRA).
    let x = var(&[B, T, C], 1);
    let w = randn(&[C], 2);
    let run = |f: &dyn Fn(&Tensor, &Tensor, f64) -> Result<Tensor>| {
        time(reps, || {
            let y = f(x.as_tensor(), &w, 1e-5)?;
            y.sum_all()?.backward()?;
            Ok(())
        })
    };
    report(
        "rms_norm (B,T,C)",
        run(&fused::rms_norm),
        run(&reference::rms_norm),
    );

    // RoPE on q as the transpose of a (B, T, H, D) projection.
    let q = var(&[B, T, H, D], 3);
    let cos = randn(&[B, T, D / 2], 4);
    let sin = randn(&[B, T, D / 2], 5);
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
        time(reps, || {
            let y = f(&q.as_tensor().transpose(1, 2)?, &cos, &sin)?;
            y.sum_all()?.backward()?;
            Ok(())
        })
    };
    report("rope q (B,H,T,D)", run(&fused::rope), run(&reference::rope));

    // Causal GQA attention with a (B, 1, T, T) packing mask (all visible: plain causal).
    let q = var(&[B, H, T, D], 6);
    let k = var(&[B, T, K, D], 7);
    let v = var(&[B, T, K, D], 8);
    let mask = Tensor::zeros((B, 1, T, T), DType::F32, &Device::Cpu)?;
    let run = |f: &AttnFn| {
        time(reps, || {
            let kt = k.as_tensor().transpose(1, 2)?;
            let vt = v.as_tensor().transpose(1, 2)?;
            let y = f(q.as_tensor(), &kt, &vt, 0.125, Some(&mask))?;
            y.sum_all()?.backward()?;
            Ok(())
        })
    };
    report(
        "causal_attention (B,H,T,D) GQA",
        run(&fused::causal_attention),
        run(&reference::causal_attention),
    );

    // SiLU-gate product over (B, T, I).
    let g = var(&[B, T, I], 9);
    let u = var(&[B, T, I], 10);
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
        time(reps, || {
            let y = f(g.as_tensor(), u.as_tensor())?;
            y.sum_all()?.backward()?;
            Ok(())
        })
    };
    report(
        "silu_mul (B,T,I)",
        run(&fused::silu_mul),
        run(&reference::silu_mul),
    );

    // Cross-entropy over given logits: 512 rows (a quarter batch keeps the reference's memory
    // in check), a third of the targets ignored.
    let n = 512;
    let logits = var(&[n, V], 11);
    let tg: Vec<i64> = (0..n)
        .map(|i| {
            if i % 3 == 0 {
                -100
            } else {
                ((i * 7919) % V) as i64
            }
        })
        .collect();
    let targets = Tensor::from_vec(tg, n, &Device::Cpu)?;
    let run = |f: &CeFn| {
        time(reps, || {
            let (s, _) = f(logits.as_tensor(), &targets, -100)?;
            s.backward()?;
            Ok(())
        })
    };
    report(
        "cross_entropy (512,V)",
        run(&fused::cross_entropy_sum),
        run(&reference::cross_entropy_sum),
    );

    // lm_head + cross-entropy over the full batch (N = 2048), frozen tied weight (LoRA), with
    // all targets counted and with a third ignored (prompt tokens).
    let n = B * T;
    let hid = var(&[n, C], 12);
    let wte = randn(&[V, C], 13);
    for ignored in [false, true] {
        let tg: Vec<i64> = (0..n)
            .map(|i| {
                if ignored && i % 3 == 0 {
                    -100
                } else {
                    ((i * 7919) % V) as i64
                }
            })
            .collect();
        let targets = Tensor::from_vec(tg, n, &Device::Cpu)?;
        let fs = time(reps, || {
            let (s, _) =
                fused::lm_head_cross_entropy_sum(hid.as_tensor(), &wte, &targets, -100, 512)?;
            s.backward()?;
            Ok(())
        });
        let rs = time(reps, || {
            let (s, _) =
                reference::lm_head_cross_entropy_sum(hid.as_tensor(), &wte, &targets, -100, n)?;
            s.backward()?;
            Ok(())
        });
        let name = if ignored {
            "lm_head+CE (2048,V) 1/3 ignored"
        } else {
            "lm_head+CE (2048,V) all counted"
        };
        report(name, fs, rs);
    }

    // AdamW over LoRA r=16 on all 7 linear layers of 30 blocks (210 x 2 matrices).
    let shapes: Vec<(usize, usize)> = [
        (C, C),
        (C, K * D),
        (C, K * D),
        (C, C),
        (C, I),
        (C, I),
        (I, C),
    ]
    .iter()
    .flat_map(|&(i, o)| [(16, i), (o, 16)])
    .collect();
    let vars: Vec<Var> = (0..30)
        .flat_map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(move |(j, &(a, b))| var(&[a, b], 100 + l * 20 + j as u64))
        })
        .collect();
    let numel: usize = vars.iter().map(|v| v.elem_count()).sum();
    let loss = vars
        .iter()
        .map(|v| v.as_tensor().sqr().unwrap().sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let grads = loss.backward()?;
    let step = |k: Kernels| {
        safetune_train::ops::set_kernels(k);
        let mut opt = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        let s = time(reps, || opt.step(&grads));
        safetune_train::ops::set_kernels(Kernels::Fused);
        s
    };
    let fs = step(Kernels::Fused);
    let rs = step(Kernels::Reference);
    report(
        &format!("adamw LoRA ({:.1}M params)", numel as f64 / 1e6),
        fs,
        rs,
    );
    Ok(())
}
