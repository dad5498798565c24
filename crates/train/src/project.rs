//! Post-hoc projection of a tuned LoRA adapter onto the alignment subspace, after Safe LoRA
//! (Hsu et al., NeurIPS 2024).
//!
//! For every layer `i` the tuned adapter changes, the alignment matrix is
//! `V_i = W_aligned_i - W_base_i` (out x in) and the tuned update is `dW_i = s B_i A_i`. A
//! projector `C_i` onto the column space of `V_i` gives the projected update
//! `C_i dW_i = s (C_i B_i) A_i`: only `B` changes and the rank stays `r`. The layer is projected
//! only where the cosine (Frobenius inner product) between `C_i dW_i` and `dW_i` is low
//! ([`Selection`]).
//!
//! Two projectors ([`Projector`]): `Exact`, the orthogonal projector `Q Q^T` with `Q` an
//! orthonormal basis of `col(V)` (numerical rank: pivots above [`RANK_TOLERANCE`] times the
//! largest), and `Scaled`, the paper's fast approximation `V V^T / ||V||_F`.
//!
//! Two routes to `V`:
//! - **dense**: `aligned` is a model (Hugging Face safetensors directory or GGUF file) and `base`
//!   the model it was aligned from; each adapted layer's two weights are read (GGUF
//!   dequantized) and subtracted, one layer at a time. The aligned weights carry the rounding
//!   of their stored format (an aligned model saved in bf16 differs from its base in every
//!   entry), so a pivot of `V` also has to exceed the noise that rounding makes
//!   ([`NOISE_FACTOR`], `Weights::unit_roundoff`): a layer whose difference is only rounding
//!   has rank 0 and is treated as `V = 0`. A pivoted QR of every `V` (for its rank, with both projectors) costs
//!   about `out * in * rank` operations per layer.
//! - **factors**: `aligned` is a PEFT adapter directory, the aligned model being the base plus
//!   that adapter, so `V = s_a B_a A_a` and everything is computed from the factors without any
//!   out x out (or out x in) matrix.
//!
//! A layer with `V = 0` (the aligned adapter does not cover it, or the aligned model's weight
//! equals the base's) has nothing to project onto: it is left unchanged and reported with
//! `in_aligned: false`, rank 0 and a `NaN` similarity (`null` in JSON).
//!
//! The output is a PEFT adapter directory (the tuned adapter's `adapter_config.json` copied
//! unchanged, `adapter_model.safetensors` with the new `B` of projected layers) and
//! `projection.json`, the [`ProjectSummary`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetune_model::adapter::{
    lora_key, write_files_atomically, write_safetensors, Adapter, LoraPair, CONFIG_FILE,
    WEIGHTS_FILE,
};
use safetune_model::gguf::GgufFile;
use safetune_model::weights::{SafetensorsFiles, Weights};
use safetune_model::ModelError;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The file the summary is written to, beside the adapter files.
pub const SUMMARY_FILE: &str = "projection.json";

/// Relative tolerance of the numerical rank of `V`: a pivot of the rank-revealing QR counts
/// when it is above this fraction of the largest one.
pub const RANK_TOLERANCE: f64 = 1e-6;

/// Which projector onto `col(V)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projector {
    /// The orthogonal projector `Q Q^T`, `Q` an orthonormal basis of `col(V)`.
    Exact,
    /// `V V^T / ||V||_F`, the paper's fast approximation (the default).
    #[default]
    Scaled,
}

impl Projector {
    pub fn as_str(self) -> &'static str {
        match self {
            Projector::Exact => "exact",
            Projector::Scaled => "scaled",
        }
    }
}

/// Which layers keep their projection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Project every layer whose similarity is below this value.
    Threshold(f64),
    /// Project this fraction (0 to 1) of the layers, those with the lowest similarity; the
    /// count is the fraction of the layers with a similarity, rounded to the nearest integer.
    Share(f64),
}

impl Default for Selection {
    /// `Threshold(0.5)`.
    fn default() -> Self {
        Selection::Threshold(0.5)
    }
}

/// What [`project`] reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectOptions {
    /// The tuned adapter directory.
    pub adapter: PathBuf,
    /// The base model (safetensors directory or GGUF file): required when `aligned` is a model,
    /// optional (shapes are checked against it) when `aligned` is an adapter.
    pub base: Option<String>,
    /// The aligned model (safetensors directory or GGUF file), or an aligned adapter directory.
    pub aligned: String,
    /// The output adapter directory.
    pub output: PathBuf,
    pub projector: Projector,
    pub selection: Selection,
}

/// One adapted layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerProjection {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Cosine between `C dW` and `dW`; `NaN` (`null` in JSON) where it is undefined: `V = 0`
    /// or `dW = 0`.
    #[serde(deserialize_with = "nan_from_null")]
    pub similarity: f64,
    /// Whether the output adapter holds the projected `B` for this layer.
    pub projected: bool,
    /// The numerical rank of `V` ([`RANK_TOLERANCE`]; on the dense route also above the
    /// rounding noise).
    #[serde(rename = "rank_of_V")]
    pub v_rank: usize,
    /// Whether the alignment changed the layer: false where `V = 0` (a layer the aligned
    /// adapter does not cover, or an aligned weight equal to the base weight); such a layer is
    /// left unchanged.
    pub in_aligned: bool,
}

/// Reads back the `null` that serde_json writes for `NaN`.
fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What [`project`] did; written as `projection.json` in the output directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectSummary {
    pub layers: Vec<LayerProjection>,
    /// Layers projected.
    pub projected: usize,
    /// Layers of the tuned adapter.
    pub total: usize,
    /// Wall time of the whole call.
    pub seconds: f64,
    /// The options used.
    pub options: ProjectOptions,
    /// `dense` (V from two models) or `factors` (V from an aligned adapter).
    pub route: String,
}

/// Projects the tuned adapter `opts.adapter` onto the alignment subspace and writes the new
/// adapter and `projection.json` to `opts.output`.
pub fn project(opts: &ProjectOptions) -> Result<ProjectSummary> {
    let start = Instant::now();
    check_options(opts)?;
    let tuned = Adapter::load(&opts.adapter)?;
    let tuned_file = opts.adapter.join(WEIGHTS_FILE);
    let aligned_path = Path::new(&opts.aligned);
    let factors = aligned_path.is_dir() && aligned_path.join(CONFIG_FILE).is_file();
    let base = match &opts.base {
        Some(b) => Some(open_model(b)?),
        None => None,
    };

    let mut results: Vec<(LayerProjection, Option<Mat>)> = Vec::new();
    let route;
    if factors {
        route = "factors";
        let aligned = Adapter::load(aligned_path)?;
        let aligned_file = aligned_path.join(WEIGHTS_FILE);
        for (module, pair) in &tuned.tensors {
            let (a, b) = (to_mat(&pair.a)?, to_mat(&pair.b)?);
            if let Some(base) = &base {
                check_against_model(base, module, &a, &b, &tuned_file)?;
            }
            let Some(ap) = aligned.tensors.get(module) else {
                results.push(unaligned(module, &a, &b));
                continue;
            };
            let (aa, ba) = (to_mat(&ap.a)?, to_mat(&ap.b)?);
            check_factor_shapes(module, &a, &b, &aa, &ba, &aligned_file)?;
            if let Some(base) = &base {
                check_against_model(base, module, &aa, &ba, &aligned_file)?;
            }
            let s_a = aligned.config.scale(module, ap.rank());
            let (cb, rank) = match opts.projector {
                Projector::Exact => factor_exact(&aa, &ba, &b),
                Projector::Scaled => factor_scaled(&aa, &ba, &b, s_a),
            };
            results.push(layer_result(module, &a, &b, cb, rank, true));
        }
    } else {
        route = "dense";
        let aligned = open_model(&opts.aligned)?;
        let base = base.ok_or_else(|| {
            TrainError::config(
                "mitigate project",
                format!(
                    "`base`: --base is required when --aligned ({}) is a model rather than an adapter directory (V is the aligned weights minus the base weights)",
                    opts.aligned
                ),
            )
        })?;
        for (module, pair) in &tuned.tensors {
            let (a, b) = (to_mat(&pair.a)?, to_mat(&pair.b)?);
            let wb = base.dense(module, b.rows, a.cols, &tuned_file)?;
            let wa = aligned.dense(module, b.rows, a.cols, &tuned_file)?;
            let v = Mat {
                rows: wa.rows,
                cols: wa.cols,
                data: wa.data.iter().zip(&wb.data).map(|(x, y)| x - y).collect(),
            };
            let floor = noise_floor(&wa, aligned.unit_roundoff(module)?);
            drop((wa, wb));
            let (cb, rank) = match opts.projector {
                Projector::Exact => dense_exact(&v, &b, floor),
                Projector::Scaled => dense_scaled(&v, &b, floor),
            };
            results.push(layer_result(module, &a, &b, cb, rank, true));
        }
    }

    select(&mut results, opts.selection);

    let mut tensors: BTreeMap<String, LoraPair> = BTreeMap::new();
    let mut layers = Vec::with_capacity(results.len());
    for (layer, cb) in results {
        let orig = &tuned.tensors[&layer.module];
        let b = match (&cb, layer.projected) {
            (Some(cb), true) => Tensor::from_vec(cb.to_f32(), (cb.rows, cb.cols), &Device::Cpu)
                .map_err(|e| TrainError::Tensor {
                    context: format!("projected B of `{}`", layer.module),
                    source: e,
                })?,
            _ => orig.b.clone(),
        };
        tensors.insert(
            layer.module.clone(),
            LoraPair {
                a: orig.a.clone(),
                b,
            },
        );
        layers.push(layer);
    }
    let projected = layers.iter().filter(|l| l.projected).count();
    let total = layers.len();
    let summary = ProjectSummary {
        layers,
        projected,
        total,
        seconds: start.elapsed().as_secs_f64(),
        options: opts.clone(),
        route: route.to_string(),
    };
    write_output(opts, &tensors, &summary)?;
    Ok(summary)
}

fn check_options(opts: &ProjectOptions) -> Result<()> {
    let bad = |field: &str, msg: String| {
        TrainError::config("mitigate project", format!("`{field}`: {msg}"))
    };
    match opts.selection {
        Selection::Threshold(t) if !t.is_finite() => {
            return Err(bad("threshold", format!("{t} is not a finite number")))
        }
        Selection::Share(f) if !(0.0..=1.0).contains(&f) => {
            return Err(bad(
                "share",
                format!("{f} is not a fraction between 0 and 1"),
            ))
        }
        _ => {}
    }
    let same = match (opts.adapter.canonicalize(), opts.output.canonicalize()) {
        (Ok(a), Ok(o)) => a == o,
        _ => false,
    };
    if same {
        return Err(bad(
            "output",
            format!(
                "{} is the tuned adapter's own directory; write the projected adapter elsewhere",
                opts.output.display()
            ),
        ));
    }
    Ok(())
}

fn write_output(
    opts: &ProjectOptions,
    tensors: &BTreeMap<String, LoraPair>,
    summary: &ProjectSummary,
) -> Result<()> {
    let config_src = opts.adapter.join(CONFIG_FILE);
    let config = std::fs::read(&config_src).map_err(|e| TrainError::io(&config_src, e))?;
    let json = serde_json::to_string_pretty(summary)
        .map_err(|e| ModelError::Other(format!("serialising {SUMMARY_FILE}: {e}")))?;
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len() * 2);
    for (module, p) in tensors {
        for (which, t) in [('A', &p.a), ('B', &p.b)] {
            let t = t
                .to_dtype(DType::F32)
                .and_then(|t| t.contiguous())
                .map_err(|e| TrainError::Tensor {
                    context: format!("tensor `{}`", lora_key(module, which)),
                    source: e,
                })?;
            named.push((lora_key(module, which), t));
        }
    }
    write_files_atomically(&opts.output, |tmp| {
        write_safetensors(
            &tmp.join(WEIGHTS_FILE),
            named.iter().map(|(k, t)| (k.as_str(), t)),
        )?;
        let c = tmp.join(CONFIG_FILE);
        std::fs::write(&c, &config).map_err(|e| ModelError::io(&c, e))?;
        let s = tmp.join(SUMMARY_FILE);
        std::fs::write(&s, json.as_bytes()).map_err(|e| ModelError::io(&s, e))?;
        Ok(vec![
            WEIGHTS_FILE.to_string(),
            CONFIG_FILE.to_string(),
            SUMMARY_FILE.to_string(),
        ])
    })?;
    Ok(())
}

/// Marks the layers to project: below the threshold, or the given share with the lowest
/// similarity (ties broken by module path). Layers without a similarity are never projected.
fn select(results: &mut [(LayerProjection, Option<Mat>)], selection: Selection) {
    match selection {
        Selection::Threshold(t) => {
            for (l, _) in results.iter_mut() {
                l.projected = l.similarity.is_finite() && l.similarity < t;
            }
        }
        Selection::Share(f) => {
            let mut idx: Vec<usize> = (0..results.len())
                .filter(|&i| results[i].0.similarity.is_finite())
                .collect();
            idx.sort_by(|&i, &j| {
                let (a, b) = (&results[i].0, &results[j].0);
                a.similarity
                    .total_cmp(&b.similarity)
                    .then_with(|| a.module.cmp(&b.module))
            });
            let n = (f * idx.len() as f64).round() as usize;
            for (l, _) in results.iter_mut() {
                l.projected = false;
            }
            for &i in idx.iter().take(n) {
                results[i].0.projected = true;
            }
        }
    }
}

fn unaligned(module: &str, _a: &Mat, _b: &Mat) -> (LayerProjection, Option<Mat>) {
    (
        LayerProjection {
            module: module.to_string(),
            similarity: f64::NAN,
            projected: false,
            v_rank: 0,
            in_aligned: false,
        },
        None,
    )
}

/// The similarity of a layer from `C B`, `B` and `A` (r x r products only).
fn layer_result(
    module: &str,
    a: &Mat,
    b: &Mat,
    cb: Mat,
    v_rank: usize,
    in_aligned: bool,
) -> (LayerProjection, Option<Mat>) {
    let similarity = if v_rank == 0 {
        f64::NAN
    } else {
        similarity(a, b, &cb)
    };
    (
        LayerProjection {
            module: module.to_string(),
            similarity,
            projected: false,
            v_rank,
            in_aligned: in_aligned && v_rank > 0,
        },
        if v_rank == 0 { None } else { Some(cb) },
    )
}

/// cos(C dW, dW) with `dW = s B A` and `C dW = s (C B) A`; the scale cancels.
/// `<X A, Y A>_F = trace(X^T Y (A A^T))`.
pub fn similarity(a: &Mat, b: &Mat, cb: &Mat) -> f64 {
    let ga = a.matmul_t(a); // r x r
    let inner = trace_prod(&cb.t_matmul(b), &ga);
    let n_cdw = trace_prod(&cb.t_matmul(cb), &ga);
    let n_dw = trace_prod(&b.t_matmul(b), &ga);
    if n_dw <= 0.0 {
        return f64::NAN;
    }
    if n_cdw <= 0.0 {
        return 0.0;
    }
    inner / (n_cdw.sqrt() * n_dw.sqrt())
}

/// trace(X Y) for square X, Y of the same size.
fn trace_prod(x: &Mat, y: &Mat) -> f64 {
    let n = x.rows;
    let mut s = 0.0;
    for i in 0..n {
        for k in 0..n {
            s += x.at(i, k) * y.at(k, i);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The four projections of B.

/// Scaled projector from a dense `V`: `C B = V (V^T B) / ||V||_F`; the rank of `V` as well.
fn dense_scaled(v: &Mat, b: &Mat, floor: f64) -> (Mat, usize) {
    let rank = rank_revealing_qr(&v.columns(), RANK_TOLERANCE, floor, false).rank;
    let norm = v.frobenius();
    if norm == 0.0 || rank == 0 {
        return (Mat::zeros(b.rows, b.cols), 0);
    }
    let vtb = v.t_matmul(b); // in x r
    let mut cb = v.matmul(&vtb); // out x r
    cb.scale(1.0 / norm);
    (cb, rank)
}

/// How many times the expected rounding noise a pivot of a dense `V` must exceed to count.
pub const NOISE_FACTOR: f64 = 4.0;

/// The pivot below which a dense `V = W_a - W_b` is rounding noise. The aligned weights were
/// stored as `round(W_b + delta)` in the aligned model's format, so `V` differs from the true
/// `delta` by that rounding: entries of standard deviation about `u rms(W_a) / sqrt(3)` for
/// round-to-nearest with unit roundoff `u`, and a column of it has norm about `sqrt(out)`
/// times that; the floor is [`NOISE_FACTOR`] times the column norm. The base's own format
/// does not count: the base is the reference the alignment started from (a base quantized
/// after the alignment was trained elsewhere puts its quantization error into `V`, which no
/// tolerance can separate).
fn noise_floor(aligned: &Mat, u: f64) -> f64 {
    let rms = aligned.frobenius() / ((aligned.rows * aligned.cols).max(1) as f64).sqrt();
    NOISE_FACTOR * (aligned.rows as f64).sqrt() * u * rms / 3f64.sqrt()
}

/// Exact projector from a dense `V`: `C B = Q (Q^T B)`, `Q` from a rank-revealing QR of `V`.
fn dense_exact(v: &Mat, b: &Mat, floor: f64) -> (Mat, usize) {
    let qr = rank_revealing_qr(&v.columns(), RANK_TOLERANCE, floor, true);
    (project_onto(&qr.q, b), qr.rank)
}

/// Scaled projector from the aligned factors:
/// `C B = s_a^2 B_a (A_a A_a^T) (B_a^T B) / ||V||_F`,
/// `||V||_F^2 = s_a^2 trace((B_a^T B_a)(A_a A_a^T))`.
fn factor_scaled(aa: &Mat, ba: &Mat, b: &Mat, s_a: f64) -> (Mat, usize) {
    let rank = factor_basis(aa, ba).rank;
    let ga = aa.matmul_t(aa); // r_a x r_a
    let gb = ba.t_matmul(ba); // r_a x r_a
    let norm2 = s_a * s_a * trace_prod(&gb, &ga);
    if norm2 <= 0.0 {
        return (Mat::zeros(b.rows, b.cols), 0);
    }
    let bab = ba.t_matmul(b); // r_a x r
    let mut inner = ga.matmul(&bab); // r_a x r
    inner.scale(s_a * s_a / norm2.sqrt());
    (ba.matmul(&inner), rank)
}

/// Exact projector from the aligned factors: an orthonormal basis of `col(B_a A_a)` and
/// `C B = Q (Q^T B)`.
fn factor_exact(aa: &Mat, ba: &Mat, b: &Mat) -> (Mat, usize) {
    let qr = factor_basis(aa, ba);
    (project_onto(&qr.q, b), qr.rank)
}

/// An orthonormal basis of `col(B_a A_a)` without forming it: with a QR of `A_a^T`,
/// `A_a^T P = Q_A R`, so `B_a A_a = (B_a P R^T) Q_A^T`, and since `Q_A` has orthonormal columns
/// `B_a A_a` has the column space and the singular values of `M = B_a P R^T` (out x k): `B_a`
/// restricted to the row space `A_a` actually uses. The basis is a rank-revealing QR of `M`.
fn factor_basis(aa: &Mat, ba: &Mat) -> Qr {
    // A_a^T's columns are A_a's rows.
    let rows: Vec<Vec<f64>> = (0..aa.rows).map(|i| aa.row(i).to_vec()).collect();
    let qa = rank_revealing_qr(&rows, 0.0, 0.0, false);
    // M[:, j] = sum_i B_a[:, perm[i]] R[j][i]   (R^T's (i, j) = R[j][i]).
    let mut m_cols = vec![vec![0.0; ba.rows]; qa.r.len()];
    for (j, rj) in qa.r.iter().enumerate() {
        for (i, &rji) in rj.iter().enumerate() {
            if rji == 0.0 {
                continue;
            }
            let col = qa.perm[i];
            for (o, m) in m_cols[j].iter_mut().enumerate() {
                *m += ba.at(o, col) * rji;
            }
        }
    }
    rank_revealing_qr(&m_cols, RANK_TOLERANCE, 0.0, true)
}

/// `Q (Q^T B)` for `Q` given as orthonormal columns.
fn project_onto(q: &[Vec<f64>], b: &Mat) -> Mat {
    let mut out = Mat::zeros(b.rows, b.cols);
    for qc in q {
        for c in 0..b.cols {
            let mut d = 0.0;
            for (i, &qi) in qc.iter().enumerate() {
                d += qi * b.at(i, c);
            }
            for (i, &qi) in qc.iter().enumerate() {
                out.data[i * b.cols + c] += qi * d;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A rank-revealing QR (Householder with column pivoting), in f64.

/// `M P = Q R` truncated at the numerical rank.
struct Qr {
    /// Orthonormal columns, `rank` of them.
    q: Vec<Vec<f64>>,
    /// Rows of `R` (rank x n), in the permuted column order.
    r: Vec<Vec<f64>>,
    /// `perm[j]`: the original column at position `j`.
    perm: Vec<usize>,
    rank: usize,
}

/// Householder QR with column pivoting of the matrix whose columns are `cols` (each of length
/// m); `Q` is formed only when `want_q`. Stops when the largest remaining column norm is at
/// most `tol` times the first pivot, at most `floor` (noise), or zero.
fn rank_revealing_qr(cols: &[Vec<f64>], tol: f64, floor: f64, want_q: bool) -> Qr {
    let n = cols.len();
    let m = cols.first().map_or(0, |c| c.len());
    let mut w: Vec<Vec<f64>> = cols.to_vec();
    let mut perm: Vec<usize> = (0..n).collect();
    let mut norms: Vec<f64> = w.iter().map(|c| c.iter().map(|x| x * x).sum()).collect();
    let mut vs: Vec<Vec<f64>> = Vec::new(); // Householder vectors, v_k over rows k..m
    let mut first = 0.0f64;
    let mut k = 0;
    while k < n.min(m) {
        // Pivot on the largest remaining norm (norms are recomputed when downdating loses
        // accuracy).
        let (p, &best) = norms[k..]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, v)| (i + k, v))
            .expect("k < n");
        let best = best.max(0.0).sqrt();
        if k == 0 {
            first = best;
        }
        if best == 0.0 || best <= tol * first || best <= floor {
            break;
        }
        w.swap(k, p);
        perm.swap(k, p);
        norms.swap(k, p);
        // Householder vector for w[k][k..].
        let x = &w[k][k..];
        let alpha = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let sign = if x[0] >= 0.0 { 1.0 } else { -1.0 };
        let mut v = x.to_vec();
        v[0] += sign * alpha;
        let vnorm2: f64 = v.iter().map(|t| t * t).sum();
        if vnorm2 > 0.0 {
            let (head, tail) = w.split_at_mut(k + 1);
            let apply = |col: &mut Vec<f64>| {
                let d: f64 = v.iter().zip(&col[k..]).map(|(a, b)| a * b).sum();
                let f = 2.0 * d / vnorm2;
                for (c, a) in col[k..].iter_mut().zip(&v) {
                    *c -= f * a;
                }
            };
            apply(&mut head[k]);
            tail.par_iter_mut().for_each(apply);
        }
        // Downdate the remaining norms; recompute where cancellation makes them unreliable.
        for j in k + 1..n {
            let rkj = w[j][k];
            let nj = norms[j] - rkj * rkj;
            norms[j] = if nj <= 1e-6 * norms[j].max(f64::MIN_POSITIVE) {
                w[j][k + 1..].iter().map(|x| x * x).sum()
            } else {
                nj
            };
        }
        vs.push(v);
        k += 1;
    }
    let rank = k;
    // R: row i holds w[j][i] for j >= i.
    let r: Vec<Vec<f64>> = (0..rank)
        .map(|i| (0..n).map(|j| if j >= i { w[j][i] } else { 0.0 }).collect())
        .collect();
    // Q's columns: H_0 ... H_{rank-1} e_i.
    let q: Vec<Vec<f64>> = (0..if want_q { rank } else { 0 })
        .into_par_iter()
        .map(|i| {
            let mut e = vec![0.0; m];
            e[i] = 1.0;
            for (kk, v) in vs.iter().enumerate().rev() {
                let vnorm2: f64 = v.iter().map(|t| t * t).sum();
                if vnorm2 == 0.0 {
                    continue;
                }
                let d: f64 = v.iter().zip(&e[kk..]).map(|(a, b)| a * b).sum();
                let f = 2.0 * d / vnorm2;
                for (c, a) in e[kk..].iter_mut().zip(v) {
                    *c -= f * a;
                }
            }
            e
        })
        .collect();
    Qr { q, r, perm, rank }
}

// ---------------------------------------------------------------------------------------------
// Models and shapes.

/// A model's weights, opened lazily (one layer at a time is read).
struct ModelWeights {
    w: Weights,
    path: PathBuf,
}

fn open_model(spec: &str) -> Result<ModelWeights> {
    let path = PathBuf::from(spec);
    let w = if path.is_dir() {
        Weights::from_safetensors(SafetensorsFiles::open(&SafetensorsFiles::find_in_dir(
            &path,
        )?)?)
    } else if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let g = GgufFile::open(&path)?;
            let cfg = g.config()?;
            Weights::from_gguf(g, (cfg.num_attention_heads, cfg.num_key_value_heads), false)
        } else {
            return Err(ModelError::format(
                &path,
                "not a model: expected a .gguf file, a Hugging Face safetensors directory or a PEFT adapter directory",
            )
            .into());
        }
    } else {
        return Err(ModelError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model not found"),
        )
        .into());
    };
    Ok(ModelWeights { w, path })
}

impl ModelWeights {
    /// The checkpoint name of a module's weight (a tied LM head reads the embeddings).
    fn weight_name(&self, module: &str) -> String {
        let name = format!("{module}.weight");
        if module == "lm_head" && !self.w.contains(&name) {
            "model.embed_tokens.weight".to_string()
        } else {
            name
        }
    }

    /// The unit roundoff of the stored format of `module`'s weight.
    fn unit_roundoff(&self, module: &str) -> Result<f64> {
        Ok(self.w.unit_roundoff(&self.weight_name(module))?)
    }

    /// The (out, in) f64 weight of `module`; an error names both the model's tensor and the
    /// adapter tensor when the shapes disagree.
    fn dense(&self, module: &str, out: usize, inp: usize, adapter_file: &Path) -> Result<Mat> {
        let name = self.weight_name(module);
        let shape = self.w.shape(&name)?;
        if shape != [out, inp] {
            return Err(shape_error(
                &self.path,
                &name,
                &shape,
                module,
                out,
                inp,
                adapter_file,
            ));
        }
        to_mat(&self.w.get(&shape, &name)?)
    }
}

fn shape_error(
    model: &Path,
    name: &str,
    shape: &[usize],
    module: &str,
    out: usize,
    inp: usize,
    adapter_file: &Path,
) -> TrainError {
    ModelError::format(
        adapter_file,
        format!(
            "tensors `{}` and `{}` adapt a ({out}, {inp}) layer, but `{name}` in {} has shape {shape:?}",
            lora_key(module, 'A'),
            lora_key(module, 'B'),
            model.display()
        ),
    )
    .into()
}

fn check_against_model(
    model: &ModelWeights,
    module: &str,
    a: &Mat,
    b: &Mat,
    adapter_file: &Path,
) -> Result<()> {
    let name = model.weight_name(module);
    let shape = model.w.shape(&name)?;
    if shape != [b.rows, a.cols] {
        return Err(shape_error(
            &model.path,
            &name,
            &shape,
            module,
            b.rows,
            a.cols,
            adapter_file,
        ));
    }
    Ok(())
}

fn check_factor_shapes(
    module: &str,
    a: &Mat,
    b: &Mat,
    aa: &Mat,
    ba: &Mat,
    aligned_file: &Path,
) -> Result<()> {
    if aa.cols != a.cols {
        return Err(ModelError::format(
            aligned_file,
            format!(
                "tensor `{}` has shape [{}, {}], but the tuned adapter's `{}` has {} inputs: the adapters are for different models",
                lora_key(module, 'A'),
                aa.rows,
                aa.cols,
                lora_key(module, 'A'),
                a.cols
            ),
        )
        .into());
    }
    if ba.rows != b.rows {
        return Err(ModelError::format(
            aligned_file,
            format!(
                "tensor `{}` has shape [{}, {}], but the tuned adapter's `{}` has {} outputs: the adapters are for different models",
                lora_key(module, 'B'),
                ba.rows,
                ba.cols,
                lora_key(module, 'B'),
                b.rows
            ),
        )
        .into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A small row-major f64 matrix.

/// A row-major f64 matrix (public for tests and study code that check projections densely).
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

/// A 2-D tensor as an f64 matrix.
pub fn to_mat(t: &Tensor) -> Result<Mat> {
    let (rows, cols) = t.dims2()?;
    let data = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())?;
    Ok(Mat { rows, cols, data })
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    fn columns(&self) -> Vec<Vec<f64>> {
        (0..self.cols)
            .map(|j| (0..self.rows).map(|i| self.at(i, j)).collect())
            .collect()
    }

    fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }

    fn scale(&mut self, f: f64) {
        self.data.iter_mut().for_each(|x| *x *= f);
    }

    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// `self * other`.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let n = other.cols;
        let mut data = vec![0.0; self.rows * n];
        data.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(i, out)| {
                for (k, &x) in self.row(i).iter().enumerate() {
                    if x == 0.0 {
                        continue;
                    }
                    for (o, &y) in out.iter_mut().zip(other.row(k)) {
                        *o += x * y;
                    }
                }
            });
        Mat {
            rows: self.rows,
            cols: n,
            data,
        }
    }

    /// `self^T * other`.
    pub fn t_matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.rows, other.rows, "t_matmul shapes");
        let (n, p) = (self.cols, other.cols);
        let mut data = vec![0.0; n * p];
        for k in 0..self.rows {
            let (a, b) = (self.row(k), other.row(k));
            for (i, &x) in a.iter().enumerate() {
                if x == 0.0 {
                    continue;
                }
                for (o, &y) in data[i * p..(i + 1) * p].iter_mut().zip(b) {
                    *o += x * y;
                }
            }
        }
        Mat {
            rows: n,
            cols: p,
            data,
        }
    }

    /// `self * other^T`.
    pub fn matmul_t(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.cols, "matmul_t shapes");
        let mut data = vec![0.0; self.rows * other.rows];
        for i in 0..self.rows {
            for j in 0..other.rows {
                data[i * other.rows + j] = self
                    .row(i)
                    .iter()
                    .zip(other.row(j))
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        Mat {
            rows: self.rows,
            cols: other.rows,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Mat { rows, cols, data }
    }

    #[test]
    fn qr_finds_the_rank_and_an_orthonormal_basis() {
        // A 12 x 9 matrix of rank 3.
        let v = mat(12, 3, 1).matmul(&mat(3, 9, 2));
        let qr = rank_revealing_qr(&v.columns(), RANK_TOLERANCE, 0.0, true);
        assert_eq!(qr.rank, 3);
        for (i, qi) in qr.q.iter().enumerate() {
            for (j, qj) in qr.q.iter().enumerate() {
                let d: f64 = qi.iter().zip(qj).map(|(a, b)| a * b).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-12, "q{i}.q{j} = {d}");
            }
        }
        // Every column of V lies in span(Q).
        let p = project_onto(&qr.q, &v);
        for (x, y) in p.data.iter().zip(&v.data) {
            assert!((x - y).abs() < 1e-10);
        }
        // The factorisation: M P = Q R.
        for (j, &orig) in qr.perm.iter().enumerate() {
            for i in 0..12 {
                let rec: f64 = (0..qr.rank).map(|k| qr.q[k][i] * qr.r[k][j]).sum();
                assert!((rec - v.at(i, orig)).abs() < 1e-10);
            }
        }
        assert_eq!(
            rank_revealing_qr(&Mat::zeros(5, 4).columns(), 1e-6, 0.0, true).rank,
            0
        );
    }

    #[test]
    fn factor_basis_handles_a_rank_deficient_a() {
        // A_a of rank 2 with 4 rows: col(B_a A_a) has dimension 2, not 4.
        let aa = mat(4, 2, 3).matmul(&mat(2, 10, 4));
        let ba = mat(7, 4, 5);
        assert_eq!(factor_basis(&aa, &ba).rank, 2);
        let dense = ba.matmul(&aa);
        assert_eq!(
            rank_revealing_qr(&dense.columns(), RANK_TOLERANCE, 0.0, false).rank,
            2
        );
    }

    #[test]
    fn share_rounds_and_skips_undefined_layers() {
        let mk = |m: &str, s: f64| {
            (
                LayerProjection {
                    module: m.into(),
                    similarity: s,
                    projected: false,
                    v_rank: 1,
                    in_aligned: true,
                },
                None,
            )
        };
        let mut r = vec![
            mk("a", 0.9),
            mk("b", 0.1),
            mk("c", f64::NAN),
            mk("d", 0.5),
            mk("e", 0.3),
        ];
        select(&mut r, Selection::Share(0.5));
        let picked: Vec<&str> = r
            .iter()
            .filter(|x| x.0.projected)
            .map(|x| x.0.module.as_str())
            .collect();
        assert_eq!(picked, ["b", "e"]);
        select(&mut r, Selection::Threshold(0.6));
        let picked: Vec<&str> = r
            .iter()
            .filter(|x| x.0.projected)
            .map(|x| x.0.module.as_str())
            .collect();
        assert_eq!(picked, ["b", "d", "e"]);
    }
}
