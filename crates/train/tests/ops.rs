//! Fused CPU training ops against the unfused reference (values and gradients), and their
//! gradients against central finite differences of the reference computed in f64.

use candle_core::{DType, Device, Result, Tensor, Var};
use safetune_train::ops::{self, fused, reference, AdamW, AdamWParams, Kernels};

/// Deterministic pseudo-random values in [-scale, scale).
fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// An input of the op under test: its values, shape and whether it receives a gradient.
struct Input {
    data: Vec<f64>,
    shape: Vec<usize>,
    grad: bool,
}

fn input(shape: &[usize], seed: u64, scale: f64, grad: bool) -> Input {
    let n = shape.iter().product();
    Input {
        data: rand_vec(n, seed, scale),
        shape: shape.to_vec(),
        grad,
    }
}

fn tensor(data: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Output and input gradients of L = sum(op(inputs) * r) at f32 precision.
fn run(op: OpFn, inputs: &[Input], r: &[f64]) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|i| {
            let t = tensor(&i.data, &i.shape, DType::F32);
            if i.grad {
                Var::from_tensor(&t).unwrap().as_tensor().clone()
            } else {
                t
            }
        })
        .collect();
    let out = op(&vars).unwrap();
    let rt = tensor(r, out.dims(), DType::F32);
    let loss = (&out * rt).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .zip(inputs)
        .map(|(v, i)| {
            i.grad
                .then(|| grads.get(v).expect("gradient missing").clone())
        })
        .collect();
    (out, g)
}

/// L at f64 precision through the reference op.
fn loss_f64(op: OpFn, inputs: &[Input], r: &[f64]) -> f64 {
    let ts: Vec<Tensor> = inputs
        .iter()
        .map(|i| tensor(&i.data, &i.shape, DType::F64))
        .collect();
    let out = op(&ts).unwrap();
    let rt = tensor(r, out.dims(), DType::F64);
    (out * rt)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks the fused op against the reference (forward and gradients, at f32) and the fused
/// gradients against finite differences of the f64 reference at a sample of coordinates.
fn check(
    name: &str,
    fused_op: OpFn,
    ref_op: OpFn,
    mut inputs: Vec<Input>,
    fwd_tol: f64,
    grad_tol: f64,
) {
    let out_shape = ref_op(
        &inputs
            .iter()
            .map(|i| tensor(&i.data, &i.shape, DType::F64))
            .collect::<Vec<_>>(),
    )
    .unwrap()
    .dims()
    .to_vec();
    let r = rand_vec(out_shape.iter().product::<usize>().max(1), 999, 1.0);
    let (fo, fg) = run(fused_op, &inputs, &r);
    let (ro, rg) = run(ref_op, &inputs, &r);
    assert_eq!(fo.dims(), ro.dims(), "{name}: output shapes");
    let d = max_abs_diff(&fo, &ro);
    println!(
        "{name}: forward max |fused - reference| = {d:.3e} (max |out| {:.3})",
        max_abs(&ro)
    );
    assert!(d <= fwd_tol, "{name}: forward differs by {d}");
    for (k, (f, r)) in fg.iter().zip(&rg).enumerate() {
        if let (Some(f), Some(r)) = (f, r) {
            let d = max_abs_diff(f, r);
            println!(
                "{name}: input {k} grad max |fused - reference| = {d:.3e} (max |grad| {:.3})",
                max_abs(r)
            );
            assert!(
                d <= grad_tol,
                "{name}: gradient of input {k} differs by {d}"
            );
        }
    }
    // Finite differences (central, f64 reference) at up to 12 coordinates per input.
    let h = 1e-5;
    let mut worst = 0f64;
    for k in 0..inputs.len() {
        let Some(g) = &fg[k] else { continue };
        let g: Vec<f64> = g
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = g.len();
        let picks: Vec<usize> = (0..12).map(|j| (j * 7919 + 13 * k) % n).collect();
        for &idx in &picks {
            let orig = inputs[k].data[idx];
            inputs[k].data[idx] = orig + h;
            let up = loss_f64(ref_op, &inputs, &r);
            inputs[k].data[idx] = orig - h;
            let down = loss_f64(ref_op, &inputs, &r);
            inputs[k].data[idx] = orig;
            let fd = (up - down) / (2.0 * h);
            let err = (fd - g[idx]).abs() / fd.abs().max(1.0);
            worst = worst.max(err);
            assert!(
                err < 2e-3,
                "{name}: input {k} coordinate {idx}: finite difference {fd} vs fused gradient {}",
                g[idx]
            );
        }
    }
    println!("{name}: worst relative |finite difference - fused gradient| = {worst:.3e}");
}

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    let eps = 1e-5;
    check(
        "rms_norm",
        &|t| fused::rms_norm(&t[0], &t[1], eps),
        &|t| reference::rms_norm(&t[0], &t[1], eps),
        vec![input(&[2, 5, 24], 1, 1.0, true), input(&[24], 2, 1.0, true)],
        1e-5,
        1e-4,
    );
}

#[test]
fn silu_mul_matches_reference_and_finite_differences() {
    check(
        "silu_mul",
        &|t| fused::silu_mul(&t[0], &t[1]),
        &|t| reference::silu_mul(&t[0], &t[1]),
        vec![
            input(&[3, 7, 40], 3, 4.0, true),
            input(&[3, 7, 40], 4, 2.0, true),
        ],
        1e-5,
        1e-5,
    );
}

/// cos/sin at the given positions (B, T) for head size d: (B, T, d/2) each, as `llama::Rope`.
fn rope_tables(positions: &[Vec<u32>], d: usize) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for row in positions {
        for &p in row {
            for i in 0..half {
                let inv = 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64);
                cos.push((p as f64 * inv).cos());
                sin.push((p as f64 * inv).sin());
            }
        }
    }
    (cos, sin)
}

#[test]
fn rope_matches_reference_and_finite_differences() {
    let (b, h, t, d) = (2, 3, 5, 8);
    // The second row is packed: positions restart at 0 mid-row.
    let positions = vec![vec![0, 1, 2, 3, 4], vec![0, 1, 0, 1, 2]];
    let (cos, sin) = rope_tables(&positions, d);
    let cos_in = Input {
        data: cos.clone(),
        shape: vec![b, t, d / 2],
        grad: false,
    };
    let sin_in = Input {
        data: sin.clone(),
        shape: vec![b, t, d / 2],
        grad: false,
    };
    // x arrives as the transpose of a (B, T, H, D) projection, as in the decoder.
    check(
        "rope",
        &|t| fused::rope(&t[0].transpose(1, 2)?, &t[1], &t[2]),
        &|t| reference::rope(&t[0].transpose(1, 2)?, &t[1], &t[2]),
        vec![input(&[b, t, h, d], 5, 1.0, true), cos_in, sin_in],
        1e-6,
        1e-6,
    );
    // Unbatched (T, D/2) tables.
    let (cos, sin) = rope_tables(&positions[..1], d);
    check(
        "rope (T, D/2) tables",
        &|t| fused::rope(&t[0], &t[1], &t[2]),
        &|t| reference::rope(&t[0], &t[1], &t[2]),
        vec![
            input(&[b, h, t, d], 6, 1.0, true),
            Input {
                data: cos,
                shape: vec![t, d / 2],
                grad: false,
            },
            Input {
                data: sin,
                shape: vec![t, d / 2],
                grad: false,
            },
        ],
        1e-6,
        1e-6,
    );
}

/// Block-diagonal additive mask (B, 1, T, T) for rows packed from segments of the given lengths.
fn packing_mask(segments: &[Vec<usize>], t: usize) -> Tensor {
    let mut m = Vec::new();
    for segs in segments {
        let mut seg_of = Vec::new();
        for (s, &len) in segs.iter().enumerate() {
            seg_of.extend(std::iter::repeat_n(s, len));
        }
        assert_eq!(seg_of.len(), t);
        for i in 0..t {
            for j in 0..t {
                m.push(if seg_of[i] == seg_of[j] {
                    0f32
                } else {
                    safetune_model::llama::MASK_VALUE
                });
            }
        }
    }
    Tensor::from_vec(m, (segments.len(), 1, t, t), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_reference_and_finite_differences() {
    // GQA (H = 4, K = 2), T longer than one 64-row block, no mask.
    let (b, h, kh, t, d) = (1, 4, 2, 70, 8);
    let scale = 1.0 / (d as f64).sqrt();
    check(
        "attention (causal, GQA, 2 blocks)",
        &|x| fused::causal_attention(&x[0], &x[1], &x[2], scale, None),
        &|x| reference::causal_attention(&x[0], &x[1], &x[2], scale, None),
        vec![
            input(&[b, h, t, d], 7, 1.5, true),
            input(&[b, kh, t, d], 8, 1.5, true),
            input(&[b, kh, t, d], 9, 1.0, true),
        ],
        1e-5,
        1e-4,
    );
    // Packed rows: a block-diagonal mask keeps segments from attending to each other;
    // k and v arrive transposed from (B, T, K, D) as in the decoder.
    let (b, h, kh, t, d) = (2, 6, 3, 9, 4);
    let mask = packing_mask(&[vec![4, 5], vec![2, 3, 4]], t);
    let m2 = mask.clone();
    let m3 = mask.to_dtype(DType::F64).unwrap();
    let reference_mask = move |x: &[Tensor]| {
        let m = if x[0].dtype() == DType::F64 { &m3 } else { &m2 };
        reference::causal_attention(
            &x[0],
            &x[1].transpose(1, 2)?,
            &x[2].transpose(1, 2)?,
            scale,
            Some(m),
        )
    };
    check(
        "attention (packing mask, strided k/v)",
        &|x| {
            fused::causal_attention(
                &x[0],
                &x[1].transpose(1, 2)?,
                &x[2].transpose(1, 2)?,
                scale,
                Some(&mask),
            )
        },
        &reference_mask,
        vec![
            input(&[b, h, t, d], 10, 1.5, true),
            input(&[b, t, kh, d], 11, 1.5, true),
            input(&[b, t, kh, d], 12, 1.0, true),
        ],
        1e-5,
        1e-4,
    );
}

#[test]
fn packed_attention_equals_separate_sequences() {
    // Two sequences packed in one row attend only within themselves: the second segment's output
    // equals attention over that segment alone.
    let (h, kh, d) = (2, 1, 4);
    let (t1, t2) = (3, 5);
    let t = t1 + t2;
    let q = tensor(&rand_vec(h * t * d, 20, 1.0), &[1, h, t, d], DType::F32);
    let k = tensor(&rand_vec(kh * t * d, 21, 1.0), &[1, kh, t, d], DType::F32);
    let v = tensor(&rand_vec(kh * t * d, 22, 1.0), &[1, kh, t, d], DType::F32);
    let mask = packing_mask(&[vec![t1, t2]], t);
    let packed = fused::causal_attention(&q, &k, &v, 0.5, Some(&mask)).unwrap();
    let alone = fused::causal_attention(
        &q.narrow(2, t1, t2).unwrap(),
        &k.narrow(2, t1, t2).unwrap(),
        &v.narrow(2, t1, t2).unwrap(),
        0.5,
        None,
    )
    .unwrap();
    let d = max_abs_diff(&packed.narrow(2, t1, t2).unwrap(), &alone);
    println!("packed vs alone: {d:.3e}");
    assert!(d < 1e-6);
}

#[test]
fn cross_entropy_matches_reference_and_finite_differences() {
    let (n, v) = (6, 50);
    let targets = Tensor::new(&[3i64, -100, 49, 0, -100, 17], &Device::Cpu).unwrap();
    let t2 = targets.clone();
    check(
        "cross_entropy_sum",
        &|x| Ok(fused::cross_entropy_sum(&x[0], &targets, -100)?.0),
        &|x| Ok(reference::cross_entropy_sum(&x[0], &t2, -100)?.0),
        vec![input(&[n, v], 13, 3.0, true)],
        1e-4,
        1e-5,
    );
    let logits = tensor(&rand_vec(n * v, 14, 3.0), &[n, v], DType::F32);
    let (_, count) = fused::cross_entropy_sum(&logits, &t2, -100).unwrap();
    assert_eq!(count, 4);
    // u32 targets with an ignore index inside the u32 range behave the same.
    let tu = Tensor::new(&[3u32, 7, 49, 0, 7, 17], &Device::Cpu).unwrap();
    let a = fused::cross_entropy_sum(&logits, &tu, 7).unwrap();
    let b = reference::cross_entropy_sum(&logits, &t2, -100).unwrap();
    assert_eq!(a.1, 4);
    assert!(max_abs_diff(&a.0, &b.0) < 1e-4);
    // Every row ignored: zero loss, zero count, zero mean.
    let none = Tensor::new(&[-100i64; 6], &Device::Cpu).unwrap();
    let (s, c) = fused::cross_entropy_sum(&logits, &none, -100).unwrap();
    assert_eq!((s.to_scalar::<f32>().unwrap(), c), (0.0, 0));
    // A target outside the vocabulary is an error naming the row.
    let bad = Tensor::new(&[3i64, 50, 0, 0, 0, 0], &Device::Cpu).unwrap();
    let err = fused::cross_entropy_sum(&logits, &bad, -100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1"), "{err}");
}

#[test]
fn lm_head_cross_entropy_matches_reference_and_finite_differences() {
    let (n, c, v) = (7, 12, 40);
    let targets = Tensor::new(&[3i64, -100, 39, 0, 5, -100, 17], &Device::Cpu).unwrap();
    let t2 = targets.clone();
    // Chunks of 2 rows (not dividing the 5 kept rows) against the unchunked reference.
    check(
        "lm_head_cross_entropy_sum",
        &|x| Ok(fused::lm_head_cross_entropy_sum(&x[0], &x[1], &targets, -100, 2)?.0),
        &|x| Ok(reference::lm_head_cross_entropy_sum(&x[0], &x[1], &t2, -100, usize::MAX)?.0),
        vec![input(&[n, c], 15, 1.0, true), input(&[v, c], 16, 1.0, true)],
        1e-4,
        1e-5,
    );
    // With a frozen weight only the hidden gradient is produced, and it is the same.
    let h = Var::from_tensor(&tensor(&rand_vec(n * c, 17, 1.0), &[n, c], DType::F32)).unwrap();
    let w = tensor(&rand_vec(v * c, 18, 1.0), &[v, c], DType::F32);
    let targets = Tensor::new(&[3i64, -100, 39, 0, 5, -100, 17], &Device::Cpu).unwrap();
    let (sf, cf) = fused::lm_head_cross_entropy_sum(h.as_tensor(), &w, &targets, -100, 3).unwrap();
    let (sr, cr) =
        reference::lm_head_cross_entropy_sum(h.as_tensor(), &w, &targets, -100, 3).unwrap();
    assert_eq!((cf, cr), (5, 5));
    let gf = (sf * 0.5).unwrap().backward().unwrap();
    let gr = (sr * 0.5).unwrap().backward().unwrap();
    let d = max_abs_diff(
        gf.get(h.as_tensor()).unwrap(),
        gr.get(h.as_tensor()).unwrap(),
    );
    println!("lm_head CE frozen weight, scaled loss: hidden grad diff {d:.3e}");
    assert!(d < 1e-5);
    assert!(gf.get(&w).is_none());
    // The root function flattens (B, T, C) hidden states and (B, T) targets.
    let h3 = h.as_tensor().reshape((1, n, c)).unwrap();
    let (s3, _) =
        ops::lm_head_cross_entropy_sum(&h3, &w, &targets.reshape((1, n)).unwrap(), -100, 4)
            .unwrap();
    let (s2, _) =
        reference::lm_head_cross_entropy_sum(h.as_tensor(), &w, &targets, -100, 4).unwrap();
    assert!(max_abs_diff(&s3, &s2) < 1e-4);
}

/// KL(softmax(r Wr^T) || softmax(h W^T)) summed over rows, by plain loops in f64.
fn kl_by_hand(h: &[f64], r: &[f64], w: &[f64], wr: &[f64], n: usize, c: usize, cr: usize) -> f64 {
    let v = w.len() / c;
    let log_softmax = |x: &[f64], w: &[f64], c: usize| -> Vec<f64> {
        let z: Vec<f64> = (0..v)
            .map(|j| (0..c).map(|k| x[k] * w[j * c + k]).sum())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
        z.iter().map(|a| a - lse).collect()
    };
    (0..n)
        .map(|i| {
            let lp = log_softmax(&h[i * c..(i + 1) * c], w, c);
            let lq = log_softmax(&r[i * cr..(i + 1) * cr], wr, cr);
            (0..v).map(|j| lq[j].exp() * (lq[j] - lp[j])).sum::<f64>()
        })
        .sum()
}

#[test]
fn lm_head_kl_matches_reference_and_finite_differences() {
    let (n, c, v) = (7, 12, 40);
    // Shared frozen head (the LoRA case): only the tuned hidden states get a gradient (a
    // trainable shared head would move the reference too, which finite differences would
    // see). Chunks of 3 rows (not dividing 7) against the unchunked reference.
    check(
        "lm_head_kl_sum (shared head)",
        &|x| fused::lm_head_kl_sum(&x[0], &x[1], &x[2], None, 3),
        &|x| reference::lm_head_kl_sum(&x[0], &x[1], &x[2], None, usize::MAX),
        vec![
            input(&[n, c], 21, 1.0, true),
            input(&[n, c], 22, 1.0, false),
            input(&[v, c], 23, 1.0, false),
        ],
        1e-4,
        1e-5,
    );
    // A separate reference model with its own (frozen) head and hidden width; the tuned head
    // is trainable (full tuning) and gets its gradient.
    let cr = 9;
    check(
        "lm_head_kl_sum (own reference head)",
        &|x| fused::lm_head_kl_sum(&x[0], &x[1], &x[2], Some(&x[3]), 2),
        &|x| reference::lm_head_kl_sum(&x[0], &x[1], &x[2], Some(&x[3]), 4),
        vec![
            input(&[n, c], 27, 1.0, true),
            input(&[n, cr], 28, 1.0, false),
            input(&[v, c], 29, 1.0, true),
            input(&[v, cr], 30, 1.0, false),
        ],
        1e-4,
        1e-5,
    );
    // The reference's own gradients against finite differences too (the reference op as both).
    check(
        "reference lm_head_kl_sum",
        &|x| reference::lm_head_kl_sum(&x[0], &x[1], &x[2], Some(&x[3]), 2),
        &|x| reference::lm_head_kl_sum(&x[0], &x[1], &x[2], Some(&x[3]), 5),
        vec![
            input(&[n, c], 24, 1.0, true),
            input(&[n, cr], 25, 1.0, false),
            input(&[v, c], 26, 1.0, true),
            input(&[v, cr], 35, 1.0, false),
        ],
        1e-4,
        1e-5,
    );
    // The value is the KL by its definition, computed by hand.
    let (h, r, w, wr) = (
        rand_vec(n * c, 31, 1.0),
        rand_vec(n * cr, 32, 1.0),
        rand_vec(v * c, 33, 1.0),
        rand_vec(v * cr, 34, 1.0),
    );
    let want = kl_by_hand(&h, &r, &w, &wr, n, c, cr);
    let t = |d: &[f64], s: &[usize]| tensor(d, s, DType::F32);
    let (ht, rt, wt, wrt) = (
        t(&h, &[n, c]),
        t(&r, &[n, cr]),
        t(&w, &[v, c]),
        t(&wr, &[v, cr]),
    );
    for got in [
        fused::lm_head_kl_sum(&ht, &rt, &wt, Some(&wrt), 3).unwrap(),
        reference::lm_head_kl_sum(&ht, &rt, &wt, Some(&wrt), 3).unwrap(),
        ops::lm_head_kl_sum(&ht.reshape((1, n, c)).unwrap(), &rt, &wt, Some(&wrt), 4).unwrap(),
    ] {
        let got = got.to_scalar::<f32>().unwrap() as f64;
        println!("lm_head KL: {got:.6} (by hand {want:.6})");
        assert!(
            want > 0.1 && (got - want).abs() < 1e-4 * want.max(1.0),
            "{got} vs {want}"
        );
    }
    // The reference equal to the tuned model: KL exactly 0 and a zero gradient.
    let hv = Var::from_tensor(&ht).unwrap();
    let kl = fused::lm_head_kl_sum(hv.as_tensor(), &ht, &wt, None, 3).unwrap();
    assert_eq!(kl.to_scalar::<f32>().unwrap(), 0.0);
    let g = kl.backward().unwrap();
    assert!(max_abs(g.get(hv.as_tensor()).unwrap()) < 1e-6);
    // A frozen head gets no gradient; mismatched rows are an error, not a panic.
    assert!(g.get(&wt).is_none());
    let err = fused::lm_head_kl_sum(&ht, &rt.narrow(0, 0, 3).unwrap(), &wt, Some(&wrt), 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reference rows"), "{err}");
}

#[test]
fn adamw_fused_matches_reference_and_candle() {
    use candle_nn::Optimizer;
    let params = AdamWParams {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let init = tensor(&rand_vec(300, 30, 1.0), &[10, 30], DType::F32);
    let make = || Var::from_tensor(&init).unwrap();
    let (vf, vr, vc) = (make(), make(), make());
    let mut of = AdamW::new(vec![vf.clone()], params).unwrap();
    let mut or = AdamW::new(vec![vr.clone()], params).unwrap();
    let mut oc = candle_nn::AdamW::new(
        vec![vc.clone()],
        candle_nn::ParamsAdamW {
            lr: params.lr,
            beta1: params.beta1,
            beta2: params.beta2,
            eps: params.eps,
            weight_decay: params.weight_decay,
        },
    )
    .unwrap();
    let target = tensor(&rand_vec(300, 31, 1.0), &[10, 30], DType::F32);
    for step in 0..5 {
        let loss = |v: &Var| {
            (v.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let gf = loss(&vf).backward().unwrap();
        let gr = loss(&vr).backward().unwrap();
        let gc = loss(&vc).backward().unwrap();
        ops::set_kernels(Kernels::Fused);
        of.step(&gf).unwrap();
        // The reference path, by calling the reference update through the switch.
        ops::set_kernels(Kernels::Reference);
        or.step(&gr).unwrap();
        ops::set_kernels(Kernels::Fused);
        oc.step(&gc).unwrap();
        let d1 = max_abs_diff(vf.as_tensor(), vr.as_tensor());
        let d2 = max_abs_diff(vf.as_tensor(), vc.as_tensor());
        println!("adamw step {step}: fused vs reference {d1:.3e}, fused vs candle_nn {d2:.3e}");
        assert!(d1 < 1e-6 && d2 < 1e-6);
    }
    assert!(
        max_abs_diff(vf.as_tensor(), &init) > 0.04,
        "parameters moved"
    );
    // State round trip: a fresh optimizer loaded with the state continues identically.
    let (step, state) = of.state().unwrap();
    assert_eq!(step, 5);
    let vg = Var::from_tensor(vf.as_tensor()).unwrap();
    let mut og = AdamW::new(vec![vg.clone()], params).unwrap();
    og.load_state(step, &state).unwrap();
    let gf = (vf.as_tensor() - &target)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gg = (vg.as_tensor() - &target)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    of.step_scaled(&gf, 0.5).unwrap();
    og.step_scaled(&gg, 0.5).unwrap();
    assert_eq!(max_abs_diff(vf.as_tensor(), vg.as_tensor()), 0.0);
    // Mismatched state is an error, not a panic.
    assert!(og.load_state(1, &[]).is_err());
}

#[test]
fn grad_global_norm_is_the_l2_norm() {
    let a = Var::from_tensor(&tensor(&[1.0, 2.0], &[2], DType::F32)).unwrap();
    let b = Var::from_tensor(&tensor(&[0.5], &[1], DType::F32)).unwrap();
    // d/da sum(a * [3, 4]) = [3, 4]; d/db (b * 12) = 12: norm 13.
    let loss = ((a.as_tensor() * tensor(&[3.0, 4.0], &[2], DType::F32))
        .unwrap()
        .sum_all()
        .unwrap()
        + (b.as_tensor() * 12.0).unwrap().sum_all().unwrap())
    .unwrap();
    let g = loss.backward().unwrap();
    let n = ops::grad_global_norm(&[a, b], &g).unwrap();
    assert!((n - 13.0).abs() < 1e-5, "{n}");
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    // Full fine-tuning: gradients for x and w.
    check(
        "linear",
        &|t| fused::linear(&t[0], &t[1]),
        &|t| reference::linear(&t[0], &t[1]),
        vec![
            input(&[19, 24], 1, 1.0, true),
            input(&[40, 24], 2, 0.5, true),
        ],
        1e-5,
        1e-5,
    );
    // A frozen weight: a gradient for x only.
    check(
        "linear (frozen w)",
        &|t| fused::linear(&t[0], &t[1]),
        &|t| reference::linear(&t[0], &t[1]),
        vec![
            input(&[19, 24], 3, 1.0, true),
            input(&[40, 24], 4, 0.5, false),
        ],
        1e-5,
        1e-5,
    );
}

/// The training ops whose products go through the ISA dispatch, run on every ISA this CPU has
/// (forced with `ops::set_isa`), against each other and against candle's reference. An ISA the
/// CPU lacks is named as not tested; the others must still agree.
#[test]
fn every_available_isa_gives_the_same_training_ops() {
    use safetune_train::ops::Isa;
    let (n, inp, out, r) = (70, 96, 130, 8);
    let x = input(&[n, inp], 11, 1.0, true);
    let w = input(&[out, inp], 12, 0.2, true);
    let wf = input(&[out, inp], 12, 0.2, false);
    let a = input(&[r, inp], 13, 0.3, true);
    let b = input(&[out, r], 14, 0.3, true);
    let q = input(&[2, 4, 33, 16], 15, 1.0, true);
    let k = input(&[2, 2, 33, 16], 16, 1.0, true);
    let v = input(&[2, 2, 33, 16], 17, 1.0, true);
    let mask = Tensor::zeros((2, 1, 33, 33), DType::F32, &Device::Cpu).unwrap();
    let attention = |t: &[Tensor]| fused::causal_attention(&t[0], &t[1], &t[2], 0.25, Some(&mask));
    let cases: Vec<(&str, Vec<&Input>, OpFn)> = vec![
        ("linear", vec![&x, &w], &|t| fused::linear(&t[0], &t[1])),
        ("linear (frozen w)", vec![&x, &wf], &|t| {
            fused::linear(&t[0], &t[1])
        }),
        ("lora_linear", vec![&x, &wf, &a, &b], &|t| {
            fused::lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0, None)
        }),
        ("attention", vec![&q, &k, &v], &attention),
    ];
    let clone = |i: &Input| Input {
        data: i.data.clone(),
        shape: i.shape.clone(),
        grad: i.grad,
    };
    let mut tested = Vec::new();
    let mut first: Vec<(Tensor, Vec<Option<Tensor>>)> = Vec::new();
    for isa in Isa::ALL {
        if !isa.available() {
            println!("could not test {}: this CPU lacks it", isa.name());
            continue;
        }
        ops::set_isa(Some(isa));
        assert_eq!(ops::isa(), isa);
        for (c, (name, ins, op)) in cases.iter().enumerate() {
            let ins: Vec<Input> = ins.iter().map(|i| clone(i)).collect();
            let r = rand_vec(4 * n * out, 99, 1.0);
            let out_len = op(&ins
                .iter()
                .map(|i| tensor(&i.data, &i.shape, DType::F32))
                .collect::<Vec<_>>())
            .unwrap()
            .elem_count();
            let (o, g) = run(*op, &ins, &r[..out_len]);
            if first.len() <= c {
                first.push((o, g));
                continue;
            }
            let (fo, fg) = &first[c];
            let d = max_abs_diff(&o, fo);
            println!(
                "{name}: {} vs {}: forward max diff {d:.3e}",
                isa.name(),
                tested[0]
            );
            assert!(
                d <= 1e-4 * max_abs(fo).max(1.0),
                "{name} on {}: forward differs by {d}",
                isa.name()
            );
            for (j, (gi, fgi)) in g.iter().zip(fg).enumerate() {
                let (Some(gi), Some(fgi)) = (gi, fgi) else {
                    assert_eq!(gi.is_some(), fgi.is_some());
                    continue;
                };
                let d = max_abs_diff(gi, fgi);
                assert!(
                    d <= 1e-4 * max_abs(fgi).max(1.0),
                    "{name} on {}: gradient of input {j} differs by {d}",
                    isa.name()
                );
            }
        }
        tested.push(isa.name());
    }
    ops::set_isa(None);
    println!("tested: {}", tested.join(", "));
    #[cfg(target_arch = "x86_64")]
    assert!(tested.len() >= 2, "only {tested:?} could run");
}
