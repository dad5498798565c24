//! `safetune_train::project` (Safe LoRA style projection) on a tiny random model: an aligned
//! adapter, the aligned model it makes (merged and saved), and tuned adapters. The reference
//! here computes `C`, `C dW` and the similarity densely from the models' weights, without the
//! library's code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetune_model::adapter::{linears, lora_key, Adapter, AdapterConfig, LoraInit};
use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_train::peft::{merge, SaveDType};
use safetune_train::project::{
    project, LayerProjection, ProjectOptions, ProjectSummary, Projector, Selection,
};

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// The layers the aligned adapter covers; k, o and gate are left to V = 0.
const ALIGNED: [&str; 4] = ["q_proj", "v_proj", "up_proj", "down_proj"];

/// A dense f64 matrix, row-major (the test's own, independent of the library's).
#[derive(Clone, Debug)]
struct M {
    r: usize,
    c: usize,
    d: Vec<f64>,
}

impl M {
    fn from_tensor(t: &Tensor) -> M {
        let v = t.to_vec2::<f32>().unwrap();
        M {
            r: v.len(),
            c: v[0].len(),
            d: v.into_iter().flatten().map(f64::from).collect(),
        }
    }
    fn get(&self, i: usize, j: usize) -> f64 {
        self.d[i * self.c + j]
    }
    fn mul(&self, o: &M) -> M {
        assert_eq!(self.c, o.r);
        let mut d = vec![0.0; self.r * o.c];
        for i in 0..self.r {
            for k in 0..self.c {
                for j in 0..o.c {
                    d[i * o.c + j] += self.get(i, k) * o.get(k, j);
                }
            }
        }
        M {
            r: self.r,
            c: o.c,
            d,
        }
    }
    fn t(&self) -> M {
        let mut d = vec![0.0; self.r * self.c];
        for i in 0..self.r {
            for j in 0..self.c {
                d[j * self.r + i] = self.get(i, j);
            }
        }
        M {
            r: self.c,
            c: self.r,
            d,
        }
    }
    fn sub(&self, o: &M) -> M {
        M {
            r: self.r,
            c: self.c,
            d: self.d.iter().zip(&o.d).map(|(a, b)| a - b).collect(),
        }
    }
    fn scaled(&self, s: f64) -> M {
        M {
            r: self.r,
            c: self.c,
            d: self.d.iter().map(|x| x * s).collect(),
        }
    }
    fn dot(&self, o: &M) -> f64 {
        self.d.iter().zip(&o.d).map(|(a, b)| a * b).sum()
    }
    fn norm(&self) -> f64 {
        self.dot(self).sqrt()
    }
}

fn rel(a: &M, b: &M) -> f64 {
    a.sub(b).norm() / b.norm().max(1e-30)
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    aligned_adapter: PathBuf,
    aligned_model: PathBuf,
    /// Random B and A on every linear layer.
    tuned: PathBuf,
    /// `q_proj` updates inside col(V) (B = B_a R), the others random.
    mixed: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = TinyModel::default().write(&root.join("base")).unwrap();
    let e = LocalEngine::load(&ModelSpec::HfDir(base.clone()), &LoadOptions::default()).unwrap();
    let aligned = Adapter::init(
        &e.model,
        AdapterConfig::lora(2, 4.0, &ALIGNED),
        LoraInit::Gaussian {
            seed: 11,
            std_a: 0.3,
            std_b: 0.3,
        },
    )
    .unwrap();
    let aligned_adapter = root.join("aligned-adapter");
    aligned.save(&aligned_adapter).unwrap();
    let aligned_model = root.join("aligned-model");
    merge(
        &ModelSpec::HfDir(base.clone()),
        Some(&aligned_adapter),
        &aligned_model,
        SaveDType::F32,
    )
    .unwrap();
    let tuned = Adapter::init(
        &e.model,
        AdapterConfig::lora(4, 8.0, &ALL),
        LoraInit::Gaussian {
            seed: 12,
            std_a: 0.2,
            std_b: 0.2,
        },
    )
    .unwrap();
    let tuned_dir = root.join("tuned");
    tuned.save(&tuned_dir).unwrap();
    // q_proj: B = B_a R with R (2 x 4) random, so s B A lies in col(B_a) = col(V).
    let mut mixed = tuned.clone();
    let r = Tensor::from_vec(
        (0..8)
            .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3)
            .collect::<Vec<f32>>(),
        (2, 4),
        &Device::Cpu,
    )
    .unwrap();
    for (module, pair) in mixed.tensors.iter_mut() {
        if module.ends_with("q_proj") {
            pair.b = aligned.tensors[module].b.matmul(&r).unwrap();
        }
    }
    let mixed_dir = root.join("mixed");
    mixed.save(&mixed_dir).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        base,
        aligned_adapter,
        aligned_model,
        tuned: tuned_dir,
        mixed: mixed_dir,
    }
}

fn opts(
    adapter: &Path,
    aligned: &Path,
    base: Option<&Path>,
    out: &Path,
    projector: Projector,
    selection: Selection,
) -> ProjectOptions {
    ProjectOptions {
        adapter: adapter.to_path_buf(),
        base: base.map(s),
        aligned: s(aligned),
        output: out.to_path_buf(),
        projector,
        selection,
    }
}

/// Every module's dense update `s B A` of an adapter directory.
fn updates(dir: &Path) -> BTreeMap<String, M> {
    let a = Adapter::load(dir).unwrap();
    a.tensors
        .iter()
        .map(|(m, p)| {
            let sc = a.config.scale(m, p.rank());
            (
                m.clone(),
                M::from_tensor(&p.b).mul(&M::from_tensor(&p.a)).scaled(sc),
            )
        })
        .collect()
}

fn by_module(s: &ProjectSummary) -> BTreeMap<String, LayerProjection> {
    s.layers
        .iter()
        .map(|l| (l.module.clone(), l.clone()))
        .collect()
}

/// Dense weights of every linear layer of a model directory.
fn weights(dir: &Path) -> BTreeMap<String, M> {
    let e = LocalEngine::load(
        &ModelSpec::HfDir(dir.to_path_buf()),
        &LoadOptions::default(),
    )
    .unwrap();
    linears(&e.model)
        .into_iter()
        .map(|l| (l.name.clone(), M::from_tensor(&l.dense_weight().unwrap())))
        .collect()
}

/// The reference projector `C` (out x out) of `V`: the orthogonal projector onto col(V) from
/// Gram-Schmidt with re-orthogonalisation, or `V V^T / ||V||_F`. `None` when V = 0.
fn reference_c(v: &M, exact: bool) -> Option<(M, usize)> {
    if v.norm() == 0.0 {
        return None;
    }
    let cols: Vec<Vec<f64>> = (0..v.c)
        .map(|j| (0..v.r).map(|i| v.get(i, j)).collect())
        .collect();
    let biggest = cols
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for c in &cols {
        let mut x = c.clone();
        for _ in 0..2 {
            for q in &basis {
                let d: f64 = q.iter().zip(&x).map(|(a, b)| a * b).sum();
                for (xi, qi) in x.iter_mut().zip(q) {
                    *xi -= d * qi;
                }
            }
        }
        let n = x.iter().map(|t| t * t).sum::<f64>().sqrt();
        if n > 1e-6 * biggest {
            basis.push(x.into_iter().map(|t| t / n).collect());
        }
    }
    let rank = basis.len();
    let c = if exact {
        let mut d = vec![0.0; v.r * v.r];
        for q in &basis {
            for i in 0..v.r {
                for j in 0..v.r {
                    d[i * v.r + j] += q[i] * q[j];
                }
            }
        }
        M { r: v.r, c: v.r, d }
    } else {
        v.mul(&v.t()).scaled(1.0 / v.norm())
    };
    Some((c, rank))
}

#[test]
fn factor_and_dense_routes_agree_and_match_a_dense_reference() {
    let f = fixture();
    let base_w = weights(&f.base);
    let aligned_w = weights(&f.aligned_model);
    let before = updates(&f.tuned);
    for projector in [Projector::Exact, Projector::Scaled] {
        let exact = projector == Projector::Exact;
        // Threshold 2 projects every layer with a similarity (cosines are at most 1).
        let out_f = f.root.join(format!("factors-{}", projector.as_str()));
        let sf = project(&opts(
            &f.tuned,
            &f.aligned_adapter,
            None,
            &out_f,
            projector,
            Selection::Threshold(2.0),
        ))
        .unwrap();
        let out_d = f.root.join(format!("dense-{}", projector.as_str()));
        let sd = project(&opts(
            &f.tuned,
            &f.aligned_model,
            Some(&f.base),
            &out_d,
            projector,
            Selection::Threshold(2.0),
        ))
        .unwrap();
        assert_eq!(sf.route, "factors");
        assert_eq!(sd.route, "dense");
        assert_eq!(sf.total, 14);
        assert_eq!(sf.projected, 8, "2 blocks x 4 aligned modules");
        assert_eq!(sd.projected, 8);
        let (lf, ld) = (by_module(&sf), by_module(&sd));
        let (uf, ud) = (updates(&out_f), updates(&out_d));
        for (module, dw) in &before {
            let (a, b) = (&lf[module], &ld[module]);
            let v = aligned_w[module].sub(&base_w[module]);
            match reference_c(&v, exact) {
                None => {
                    assert!(!ALIGNED.iter().any(|m| module.ends_with(m)), "{module}");
                    for l in [a, b] {
                        assert!(!l.projected && !l.in_aligned && l.v_rank == 0, "{l:?}");
                        assert!(l.similarity.is_nan(), "{l:?}");
                    }
                    // Unchanged, bit for bit.
                    assert_eq!(uf[module].d, dw.d, "{module}");
                    assert_eq!(ud[module].d, dw.d, "{module}");
                }
                Some((c, rank)) => {
                    assert!(ALIGNED.iter().any(|m| module.ends_with(m)), "{module}");
                    assert_eq!(rank, 2, "{module}: the aligned adapter has rank 2");
                    assert_eq!((a.v_rank, b.v_rank), (2, 2), "{module}");
                    assert!(a.projected && b.projected && a.in_aligned && b.in_aligned);
                    let cdw = c.mul(dw);
                    let sim = cdw.dot(dw) / (cdw.norm() * dw.norm());
                    assert!(sim > -1.0 && sim < 0.99, "{module}: {sim}");
                    // (b) both routes equal the dense reference ...
                    assert!((a.similarity - sim).abs() < 1e-5, "{module} {a:?} vs {sim}");
                    assert!((b.similarity - sim).abs() < 1e-5, "{module} {b:?} vs {sim}");
                    assert!(
                        rel(&uf[module], &cdw) < 1e-4,
                        "{module}: factors vs reference"
                    );
                    assert!(
                        rel(&ud[module], &cdw) < 1e-4,
                        "{module}: dense vs reference"
                    );
                    // (a) ... and each other.
                    assert!(rel(&uf[module], &ud[module]) < 1e-4, "{module}");
                    assert!(
                        rel(&uf[module], dw) > 1e-2,
                        "{module}: the projection changed it"
                    );
                }
            }
        }
    }
}

#[test]
fn exact_projection_is_idempotent_and_an_update_inside_col_v_has_similarity_one() {
    let f = fixture();
    let once = f.root.join("once");
    project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        None,
        &once,
        Projector::Exact,
        Selection::Threshold(2.0),
    ))
    .unwrap();
    let twice = f.root.join("twice");
    let s2 = project(&opts(
        &once,
        &f.aligned_adapter,
        None,
        &twice,
        Projector::Exact,
        Selection::Threshold(2.0),
    ))
    .unwrap();
    assert_eq!(s2.projected, 8);
    for l in &s2.layers {
        if l.in_aligned {
            assert!((l.similarity - 1.0).abs() < 1e-9, "{l:?}");
        }
    }
    let (u1, u2) = (updates(&once), updates(&twice));
    for (m, x) in &u1 {
        assert!(rel(&u2[m], x) < 1e-6, "{m}: {}", rel(&u2[m], x));
    }

    // The mixed adapter's q_proj updates lie in col(V): similarity 1 on both routes.
    for (aligned, base) in [
        (&f.aligned_adapter, None),
        (&f.aligned_model, Some(f.base.as_path())),
    ] {
        let out = f.root.join("mixed-out");
        let sm = project(&opts(
            &f.mixed,
            aligned,
            base,
            &out,
            Projector::Exact,
            Selection::Threshold(0.5),
        ))
        .unwrap();
        let q: Vec<&LayerProjection> = sm
            .layers
            .iter()
            .filter(|l| l.module.ends_with("q_proj"))
            .collect();
        assert_eq!(q.len(), 2);
        for l in q {
            assert!((l.similarity - 1.0).abs() < 1e-6, "{l:?}");
            assert!(!l.projected);
        }
    }
}

#[test]
fn threshold_and_share_pick_the_right_layers() {
    let f = fixture();
    let before = updates(&f.mixed);
    // Exact projector: q_proj (inside col(V)) has similarity 1, v/up/down random ones well
    // below 0.5, k/o/gate none (V = 0).
    let out = f.root.join("threshold");
    let st = project(&opts(
        &f.mixed,
        &f.aligned_adapter,
        None,
        &out,
        Projector::Exact,
        Selection::Threshold(0.5),
    ))
    .unwrap();
    let picked: Vec<String> = st
        .layers
        .iter()
        .filter(|l| l.projected)
        .map(|l| l.module.rsplit('.').next().unwrap().to_string())
        .collect();
    assert_eq!(
        picked,
        [
            "down_proj",
            "up_proj",
            "v_proj",
            "down_proj",
            "up_proj",
            "v_proj"
        ]
    );
    assert_eq!(st.projected, 6);
    let after = updates(&out);
    for l in &st.layers {
        let changed = rel(&after[&l.module], &before[&l.module]) > 0.0;
        assert_eq!(changed, l.projected, "{l:?}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("projection.json")).unwrap())
            .unwrap();
    assert_eq!(json["projected"], 6);
    assert_eq!(json["options"]["projector"], "exact");
    assert_eq!(json["options"]["selection"]["threshold"], 0.5);
    let first = &json["layers"][0];
    assert!(
        first["rank_of_V"].is_u64() && first["module"].is_string(),
        "{first}"
    );
    // It reads back as a ProjectSummary, the undefined similarities (null) as NaN.
    let back: ProjectSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("projection.json")).unwrap())
            .unwrap();
    assert_eq!(back.projected, 6);
    for (a, b) in back.layers.iter().zip(&st.layers) {
        assert_eq!(
            (&a.module, a.projected, a.v_rank),
            (&b.module, b.projected, b.v_rank)
        );
        // serde_json's default float parsing may differ in the last bit.
        assert!(
            (a.similarity - b.similarity).abs() < 1e-12
                || (a.similarity.is_nan() && b.similarity.is_nan()),
            "{a:?} {b:?}"
        );
    }
    assert_eq!(
        back.layers.iter().filter(|l| l.similarity.is_nan()).count(),
        6
    );

    // Share: a quarter of the 8 layers with a similarity = 2, the two lowest.
    let sims: Vec<(f64, String)> = {
        let mut v: Vec<(f64, String)> = st
            .layers
            .iter()
            .filter(|l| l.similarity.is_finite())
            .map(|l| (l.similarity, l.module.clone()))
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        v
    };
    assert_eq!(sims.len(), 8);
    let out = f.root.join("share");
    let ss = project(&opts(
        &f.mixed,
        &f.aligned_adapter,
        None,
        &out,
        Projector::Exact,
        Selection::Share(0.25),
    ))
    .unwrap();
    let mut got: Vec<String> = ss
        .layers
        .iter()
        .filter(|l| l.projected)
        .map(|l| l.module.clone())
        .collect();
    got.sort();
    let mut want: Vec<String> = sims[..2].iter().map(|x| x.1.clone()).collect();
    want.sort();
    assert_eq!(got, want);
    // Share 1 projects every layer with a similarity, share 0 none.
    for (share, n) in [(1.0, 8), (0.0, 0)] {
        let out = f.root.join(format!("share-{share}"));
        let s = project(&opts(
            &f.mixed,
            &f.aligned_adapter,
            None,
            &out,
            Projector::Scaled,
            Selection::Share(share),
        ))
        .unwrap();
        assert_eq!(s.projected, n);
    }
}

#[test]
fn output_is_a_loadable_adapter_with_the_original_rank_and_config() {
    let f = fixture();
    let out = f.root.join("out");
    project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        Some(&f.base),
        &out,
        Projector::Scaled,
        Selection::Threshold(0.5),
    ))
    .unwrap();
    let orig = Adapter::load(&f.tuned).unwrap();
    let new = Adapter::load(&out).unwrap();
    assert_eq!(new.config, orig.config);
    assert_eq!(
        std::fs::read(out.join("adapter_config.json")).unwrap(),
        std::fs::read(f.tuned.join("adapter_config.json")).unwrap()
    );
    assert_eq!(
        new.tensors.keys().collect::<Vec<_>>(),
        orig.tensors.keys().collect::<Vec<_>>()
    );
    for (m, p) in &new.tensors {
        assert_eq!(p.rank(), 4, "{m}");
        assert_eq!(p.a.dims(), orig.tensors[m].a.dims());
        assert_eq!(p.b.dims(), orig.tensors[m].b.dims());
        assert_eq!(
            p.a.to_vec2::<f32>().unwrap(),
            orig.tensors[m].a.to_vec2::<f32>().unwrap(),
            "{m}: A is kept"
        );
    }
    let mut e =
        LocalEngine::load(&ModelSpec::HfDir(f.base.clone()), &LoadOptions::default()).unwrap();
    new.apply(&mut e.model, true).unwrap();
}

#[test]
fn bad_input_gives_errors_naming_the_tensor_or_option() {
    let f = fixture();
    // An adapter for a narrower model.
    let small = TinyModel {
        hidden_size: 32,
        intermediate_size: 64,
        ..TinyModel::default()
    }
    .write(&f.root.join("small"))
    .unwrap();
    let e = LocalEngine::load(&ModelSpec::HfDir(small), &LoadOptions::default()).unwrap();
    let bad = Adapter::init(
        &e.model,
        AdapterConfig::lora(4, 8.0, &ALL),
        LoraInit::Gaussian {
            seed: 3,
            std_a: 0.1,
            std_b: 0.1,
        },
    )
    .unwrap();
    let bad_dir = f.root.join("bad");
    bad.save(&bad_dir).unwrap();
    let first = bad.tensors.keys().next().unwrap().clone();
    let out = f.root.join("never");
    for (aligned, base) in [
        (&f.aligned_adapter, None),
        (&f.aligned_adapter, Some(f.base.as_path())),
        (&f.aligned_model, Some(f.base.as_path())),
    ] {
        let err = project(&opts(
            &bad_dir,
            aligned,
            base,
            &out,
            Projector::Exact,
            Selection::Threshold(0.5),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(&lora_key(&first, 'A')), "{err}");
        assert!(!out.exists());
    }
    let err = project(&opts(
        &f.tuned,
        &f.aligned_model,
        None,
        &out,
        Projector::Scaled,
        Selection::Threshold(0.5),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("--base is required"), "{err}");
    let err = project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        None,
        &out,
        Projector::Scaled,
        Selection::Share(1.5),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("`share`"), "{err}");
    let err = project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        None,
        &f.tuned,
        Projector::Scaled,
        Selection::Threshold(0.5),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("`output`"), "{err}");
    let err = project(&opts(
        &f.tuned,
        &f.root.join("missing"),
        Some(&f.base),
        &out,
        Projector::Scaled,
        Selection::Threshold(0.5),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_gguf_base_gives_the_same_projection_as_its_safetensors_twin() {
    let f = fixture();
    let gguf = TinyModel::default()
        .write_gguf(&f.root.join("base.gguf"))
        .unwrap();
    let (out_g, out_f) = (f.root.join("gguf"), f.root.join("factors"));
    let sg = project(&opts(
        &f.tuned,
        &f.aligned_model,
        Some(&gguf),
        &out_g,
        Projector::Exact,
        Selection::Threshold(0.5),
    ))
    .unwrap();
    let sf = project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        Some(&gguf),
        &out_f,
        Projector::Exact,
        Selection::Threshold(0.5),
    ))
    .unwrap();
    assert_eq!(sg.projected, 8);
    let (lg, lf) = (by_module(&sg), by_module(&sf));
    let (ug, uf) = (updates(&out_g), updates(&out_f));
    for (m, l) in &lg {
        assert_eq!(
            (l.projected, l.v_rank),
            (lf[m].projected, lf[m].v_rank),
            "{m}"
        );
        assert!(rel(&ug[m], &uf[m]) < 1e-4, "{m}");
    }
}

#[test]
fn an_aligned_model_saved_in_bf16_keeps_the_rank_of_its_adapter() {
    let f = fixture();
    let bf16 = f.root.join("aligned-bf16");
    merge(
        &ModelSpec::HfDir(f.base.clone()),
        Some(&f.aligned_adapter),
        &bf16,
        SaveDType::Bf16,
    )
    .unwrap();
    let (out_b, out_f) = (f.root.join("from-bf16"), f.root.join("factors"));
    let sb = project(&opts(
        &f.tuned,
        &bf16,
        Some(&f.base),
        &out_b,
        Projector::Exact,
        Selection::Threshold(2.0),
    ))
    .unwrap();
    project(&opts(
        &f.tuned,
        &f.aligned_adapter,
        None,
        &out_f,
        Projector::Exact,
        Selection::Threshold(2.0),
    ))
    .unwrap();
    // Every weight differs from the base by bf16 rounding; only the adapted layers count.
    let (ub, uf) = (updates(&out_b), updates(&out_f));
    for l in &sb.layers {
        let aligned = ALIGNED.iter().any(|m| l.module.ends_with(m));
        assert_eq!(l.v_rank, if aligned { 2 } else { 0 }, "{l:?}");
        assert_eq!(l.projected, aligned, "{l:?}");
        // bf16 keeps 8 bits: the projection agrees to about 1%.
        assert!(rel(&ub[&l.module], &uf[&l.module]) < 2e-2, "{l:?}");
    }
}
