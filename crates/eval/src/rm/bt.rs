//! A small reward model trained here: a Bradley-Terry head on frozen encoder features.
//!
//! Features are the mean-pooled final hidden states of a local decoder (SmolLM2 from the assets
//! by default) over the whole conversation, standardised per dimension. The head is a linear
//! score `w . z(x)`, fitted so that `P(chosen > rejected) = sigmoid(w . (z(c) - z(r)))`, by full-
//! batch gradient descent on the mean logistic loss plus `l2 / 2 * |w|^2`. A seeded shuffle picks
//! the held-out pairs; the fit itself is deterministic.

use std::path::Path;

use safetune_data::preference::PreferencePair;
use safetune_model::reward::mean_pooled_features;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use serde::{Deserialize, Serialize};

use super::backend::{RewardModel, RmInput};
use super::error::{Result, RmError};
use super::stats::{pair_accuracy, SplitMix};

pub const HEAD_FORMAT_VERSION: u32 = 1;

/// Settings of [`fit_bt`] and [`train_bt`].
#[derive(Debug, Clone, Serialize)]
pub struct BtOptions {
    pub l2: f64,
    pub steps: usize,
    pub seed: u64,
    /// Share of pairs held out for evaluation (0 uses every pair for training).
    pub holdout: f64,
}

impl Default for BtOptions {
    fn default() -> Self {
        BtOptions {
            l2: 0.01,
            steps: 500,
            seed: 0,
            holdout: 0.2,
        }
    }
}

/// How well the head fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    pub n_train: usize,
    pub n_holdout: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// `None` without held-out pairs.
    pub holdout_accuracy: Option<f64>,
    pub holdout_correct: usize,
}

/// A trained head and how to recompute its features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BtHead {
    pub format_version: u32,
    /// Model spec of the encoder (a GGUF file or a Hugging Face directory).
    pub encoder: String,
    pub quantized: bool,
    pub pooling: String,
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    pub weights: Vec<f64>,
    pub l2: f64,
    pub seed: u64,
    pub report: FitReport,
}

impl BtHead {
    pub fn score_features(&self, f: &[f32]) -> f64 {
        f.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .zip(&self.weights)
            .map(|(((x, m), s), w)| w * (*x as f64 - m) / s)
            .sum()
    }
}

fn log1p_exp(x: f64) -> f64 {
    // log(1 + e^x), stable.
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Mean logistic loss of `w` on difference vectors plus the L2 term, and its gradient.
pub fn bt_loss_grad(w: &[f64], diffs: &[Vec<f64>], l2: f64) -> (f64, Vec<f64>) {
    let n = diffs.len().max(1) as f64;
    let mut loss = 0.0;
    let mut grad: Vec<f64> = w.iter().map(|wi| l2 * wi).collect();
    for d in diffs {
        let m: f64 = w.iter().zip(d).map(|(a, b)| a * b).sum();
        loss += log1p_exp(-m) / n;
        let g = -sigmoid(-m) / n; // d/dm of log(1 + e^-m)
        for (gi, di) in grad.iter_mut().zip(d) {
            *gi += g * di;
        }
    }
    loss += 0.5 * l2 * w.iter().map(|x| x * x).sum::<f64>();
    (loss, grad)
}

/// Fits a head on (chosen, rejected) feature pairs. Returns mean, scale, weights and the report.
///
/// The loop is plain full-batch gradient descent on [`bt_loss_grad`]; it does not share the
/// classifier judge's Adam loop ([`crate::classifier::fit_logistic`]) on purpose: see that
/// function's notes. Its weights are pinned in `tests/shared_helpers_golden.rs`.
#[allow(clippy::type_complexity)] // the four parts are named in the doc; a struct would change the API
pub fn fit_bt(
    chosen: &[Vec<f32>],
    rejected: &[Vec<f32>],
    opts: &BtOptions,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, FitReport)> {
    let n = chosen.len();
    if n == 0 || rejected.len() != n {
        return Err(RmError::Other(format!(
            "a Bradley-Terry head needs pairs: {} chosen and {} rejected feature vectors",
            chosen.len(),
            rejected.len()
        )));
    }
    let dim = chosen[0].len();
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix::new(opts.seed).shuffle(&mut order);
    let n_hold = ((n as f64) * opts.holdout.clamp(0.0, 0.9)).round() as usize;
    let n_hold = if n - n_hold == 0 { 0 } else { n_hold };
    let (hold, train) = order.split_at(n_hold);
    // Standardise over the training answers (both sides).
    let mut mean = vec![0.0; dim];
    let mut sq = vec![0.0; dim];
    let count = (2 * train.len()) as f64;
    for &i in train {
        for f in [&chosen[i], &rejected[i]] {
            for (k, x) in f.iter().enumerate() {
                mean[k] += *x as f64 / count;
            }
        }
    }
    for &i in train {
        for f in [&chosen[i], &rejected[i]] {
            for (k, x) in f.iter().enumerate() {
                let d = *x as f64 - mean[k];
                sq[k] += d * d / count;
            }
        }
    }
    let scale: Vec<f64> = sq.iter().map(|v| v.sqrt().max(1e-6)).collect();
    let z = |f: &[f32]| -> Vec<f64> {
        f.iter()
            .enumerate()
            .map(|(k, x)| (*x as f64 - mean[k]) / scale[k])
            .collect()
    };
    let diff = |i: usize| -> Vec<f64> {
        let (c, r) = (z(&chosen[i]), z(&rejected[i]));
        c.iter().zip(&r).map(|(a, b)| a - b).collect()
    };
    let diffs: Vec<Vec<f64>> = train.iter().map(|&i| diff(i)).collect();
    // Step size from a bound on the curvature: 0.25 * mean |d|^2 + l2.
    let curv = 0.25
        * diffs
            .iter()
            .map(|d| d.iter().map(|x| x * x).sum::<f64>())
            .sum::<f64>()
        / diffs.len().max(1) as f64
        + opts.l2;
    let lr = 1.0 / curv.max(1e-9);
    let mut w = vec![0.0; dim];
    let mut loss = 0.0;
    for _ in 0..opts.steps {
        let (l, g) = bt_loss_grad(&w, &diffs, opts.l2);
        loss = l;
        for (wi, gi) in w.iter_mut().zip(&g) {
            *wi -= lr * gi;
        }
    }
    if opts.steps > 0 {
        loss = bt_loss_grad(&w, &diffs, opts.l2).0;
    }
    let margin = |d: &[f64]| w.iter().zip(d).map(|(a, b)| a * b).sum::<f64>();
    let train_pairs: Vec<(f64, f64)> = diffs.iter().map(|d| (margin(d), 0.0)).collect();
    let hold_pairs: Vec<(f64, f64)> = hold.iter().map(|&i| (margin(&diff(i)), 0.0)).collect();
    let tr = pair_accuracy(&train_pairs, 0.0);
    let ho = pair_accuracy(&hold_pairs, 0.0);
    let report = FitReport {
        n_train: train.len(),
        n_holdout: hold.len(),
        train_loss: loss,
        train_accuracy: tr.accuracy_ties_half,
        holdout_accuracy: (!hold.is_empty()).then_some(ho.accuracy_ties_half),
        holdout_correct: ho.correct as usize,
    };
    Ok((mean, scale, w, report))
}

fn load_encoder(spec: &str, quantized: bool) -> Result<LocalEngine> {
    let parsed = ModelSpec::parse(spec)?;
    Ok(LocalEngine::load(
        &parsed,
        &LoadOptions {
            quantized,
            ..LoadOptions::default()
        },
    )?)
}

/// Encodes each pair's two conversations and fits a head. `progress(done, total)` is called as
/// answers are encoded.
pub fn train_bt(
    encoder_spec: &str,
    quantized: bool,
    pairs: &[PreferencePair],
    opts: &BtOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BtHead> {
    let engine = load_encoder(encoder_spec, quantized)?;
    let mut chosen = Vec::with_capacity(pairs.len());
    let mut rejected = Vec::with_capacity(pairs.len());
    for (k, p) in pairs.iter().enumerate() {
        let f = mean_pooled_features(&engine, &[p.conversation(true), p.conversation(false)])?;
        let mut it = f.into_iter();
        chosen.push(it.next().unwrap_or_default());
        rejected.push(it.next().unwrap_or_default());
        progress(2 * (k + 1), 2 * pairs.len());
    }
    let (mean, scale, weights, report) = fit_bt(&chosen, &rejected, opts)?;
    Ok(BtHead {
        format_version: HEAD_FORMAT_VERSION,
        encoder: encoder_spec.to_string(),
        quantized,
        pooling: "mean".into(),
        mean,
        scale,
        weights,
        l2: opts.l2,
        seed: opts.seed,
        report,
    })
}

/// The demo reward model, `bt:demo` (every demo pair) or `bt:demo:N` (N pairs picked by a
/// seeded shuffle): a head on SmolLM2 features trained on this project's preference pairs
/// (`demo:preferences`). It is trained on first use and cached under `$SAFETUNE_HOME/rm/`, keyed
/// by the pairs, the encoder file and the settings, so a study reuses it.
pub fn demo_head(spec: &str, progress: &mut dyn FnMut(usize, usize)) -> Result<std::path::PathBuf> {
    let bad = |message: String| RmError::Spec {
        spec: spec.to_string(),
        message,
    };
    let limit = match spec.strip_prefix("bt:demo") {
        Some("") => None,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n >= 2 => Some(n),
            _ => return Err(bad("write bt:demo or bt:demo:N with N >= 2 pairs".into())),
        },
        None => return Err(bad("not a bt:demo spec".into())),
    };
    let text = safetune_data::demo::demo_text("preferences")
        .ok_or_else(|| RmError::Other("the demo preference pairs are not built in".into()))?;
    let encoder = safetune_data::assets::asset(safetune_data::assets::SMOLLM2_GGUF)
        .map_err(|e| RmError::Other(e.to_string()))?;
    let encoder_len = std::fs::metadata(&encoder)
        .map_err(|e| RmError::io(&encoder, e))?
        .len();
    let opts = BtOptions::default();
    let mut key = safetune_data::util::Fnv1a64::default();
    key.write(text.as_bytes());
    key.write(safetune_data::assets::SMOLLM2_GGUF.as_bytes());
    key.write(&encoder_len.to_le_bytes());
    key.write(format!("{limit:?} {opts:?} {HEAD_FORMAT_VERSION}").as_bytes());
    let dir = safetune_data::assets::safetune_home().join("rm");
    let size = limit.map_or("all".to_string(), |n| n.to_string());
    let path = dir.join(format!("bt-demo-{size}-{:016x}.json", key.finish()));
    if path.exists() {
        return Ok(path);
    }
    let pairs_path = safetune_data::demo::resolve_dataset("demo:preferences")
        .map_err(|e| RmError::Other(e.to_string()))?;
    let (mut pairs, _) = safetune_data::preference::read_preferences(&pairs_path, None)?;
    if let Some(n) = limit {
        SplitMix::new(opts.seed ^ 0xD3E0).shuffle(&mut pairs);
        pairs.truncate(n);
    }
    let head = train_bt(
        &encoder.display().to_string(),
        true,
        &pairs,
        &opts,
        progress,
    )?;
    std::fs::create_dir_all(&dir).map_err(|e| RmError::io(&dir, e))?;
    let json = serde_json::to_string(&head).map_err(|e| RmError::Other(e.to_string()))?;
    safetune_data::util::write_atomic(&path, (json + "\n").as_bytes())
        .map_err(|e| RmError::io(&path, e))?;
    Ok(path)
}

/// A trained head with its encoder, as a [`RewardModel`].
pub struct BtRewardModel {
    pub head: BtHead,
    pub engine: LocalEngine,
    name: String,
}

impl BtRewardModel {
    pub fn open(path: &Path) -> Result<BtRewardModel> {
        let text = std::fs::read_to_string(path).map_err(|e| RmError::io(path, e))?;
        let head: BtHead = serde_json::from_str(&text).map_err(|e| RmError::Input {
            path: path.to_path_buf(),
            line: e.line(),
            field: None,
            message: format!("not a Bradley-Terry head file: {e}"),
        })?;
        if head.format_version != HEAD_FORMAT_VERSION {
            return Err(RmError::Other(format!(
                "{}: head format version {} (this safetune reads {HEAD_FORMAT_VERSION})",
                path.display(),
                head.format_version
            )));
        }
        let engine = load_encoder(&head.encoder, head.quantized)?;
        if engine.model.cfg.hidden_size != head.weights.len() {
            return Err(RmError::Other(format!(
                "{}: the head has {} weights but the encoder {} has hidden size {}",
                path.display(),
                head.weights.len(),
                head.encoder,
                engine.model.cfg.hidden_size
            )));
        }
        let name = format!(
            "bt:{}",
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        Ok(BtRewardModel { head, engine, name })
    }

    pub fn from_parts(head: BtHead, engine: LocalEngine) -> BtRewardModel {
        BtRewardModel {
            head,
            engine,
            name: "bt".into(),
        }
    }
}

impl RewardModel for BtRewardModel {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, inputs: &[RmInput]) -> Result<Vec<f64>> {
        let convos: Vec<_> = inputs.iter().map(RmInput::conversation).collect();
        let feats = mean_pooled_features(&self.engine, &convos)?;
        Ok(feats.iter().map(|f| self.head.score_features(f)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let diffs = vec![
            vec![1.0, -2.0, 0.5],
            vec![-0.3, 0.7, 1.1],
            vec![0.2, 0.2, -1.0],
        ];
        let w = vec![0.3, -0.1, 0.4];
        let (_, g) = bt_loss_grad(&w, &diffs, 0.1);
        for k in 0..3 {
            let mut wp = w.clone();
            let mut wm = w.clone();
            wp[k] += 1e-6;
            wm[k] -= 1e-6;
            let num = (bt_loss_grad(&wp, &diffs, 0.1).0 - bt_loss_grad(&wm, &diffs, 0.1).0) / 2e-6;
            assert!((num - g[k]).abs() < 1e-6, "k={k}: {num} vs {}", g[k]);
        }
        // Hand case: w = 0 gives loss ln 2 whatever the data.
        let (l, _) = bt_loss_grad(&[0.0, 0.0, 0.0], &diffs, 1.0);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12);
    }

    /// Synthetic pairs where dimension 0 decides the preference and dimension 1 is noise.
    fn synthetic(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut rng = SplitMix::new(seed);
        let mut u = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (mut c, mut r) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let a = u() as f32;
            let b = u() as f32;
            let (hi, lo) = if a > b { (a, b) } else { (b, a) };
            c.push(vec![hi + 0.05, u() as f32]);
            r.push(vec![lo, u() as f32]);
        }
        (c, r)
    }

    #[test]
    fn fit_learns_the_deciding_feature_and_is_seeded() {
        let (c, r) = synthetic(120, 1);
        let opts = BtOptions::default();
        let (_, _, w, rep) = fit_bt(&c, &r, &opts).unwrap();
        assert_eq!((rep.n_train, rep.n_holdout), (96, 24));
        assert!(w[0] > 0.0 && w[0].abs() > 3.0 * w[1].abs(), "w = {w:?}");
        assert!(rep.train_accuracy > 0.95, "{rep:?}");
        assert!(rep.holdout_accuracy.unwrap() > 0.9, "{rep:?}");
        let (_, _, w2, rep2) = fit_bt(&c, &r, &opts).unwrap();
        assert_eq!((w.clone(), rep.clone()), (w2, rep2));
        let (_, _, w3, _) = fit_bt(
            &c,
            &r,
            &BtOptions {
                seed: 5,
                ..opts.clone()
            },
        )
        .unwrap();
        assert_ne!(w, w3, "another seed holds out other pairs");
        // A stronger L2 penalty gives a smaller head.
        let (_, _, ws, _) = fit_bt(&c, &r, &BtOptions { l2: 1.0, ..opts }).unwrap();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm(&ws) < norm(&w));
    }
}
