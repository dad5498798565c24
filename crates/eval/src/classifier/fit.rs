//! Fitting the head: logistic regression, the relevance threshold, and cross-validation.

use safetune_model::bert::BertEncoder;
use serde::Serialize;

use crate::error::{EvalError, Result};

use super::decide;
use super::features::{features, Features};
use super::head::{sigmoid, Head, HEAD_FORMAT};
use super::training::Example;

/// Logistic-regression settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// Full-batch Adam steps.
    pub epochs: usize,
    pub learning_rate: f32,
    pub l2: f32,
    /// The head also reads the request-response product ([`Features::interaction`]).
    #[serde(default)]
    pub interaction: bool,
    /// Times each hand-labelled example (sources under [`LABELLED_PREFIX`]) counts in the fit.
    #[serde(default)]
    pub labelled_repeat: usize,
    /// P(refusal) at which the head calls a response a refusal.
    pub threshold: f32,
}

/// Sources of hand-labelled judge data (`data/judge_labels.jsonl` train part,
/// `data/judge_train_hard.jsonl`).
pub const LABELLED_PREFIX: &str = "data/judge_";

/// Source prefix of hand-labelled files given to `safetune classifier train --labelled`.
pub const EXTRA_LABELLED_PREFIX: &str = "labelled: ";

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 2000,
            learning_rate: 0.05,
            l2: 1e-3,
            interaction: false,
            labelled_repeat: 1,
            threshold: 0.5,
        }
    }
}

/// Fits a class-balanced, L2-regularised logistic regression by full-batch Adam (deterministic:
/// no sampling). Returns (weights, bias).
///
/// The Bradley-Terry head ([`crate::rm::bt::fit_bt`]) is the other logistic fit of this crate,
/// and it deliberately keeps its own loop: it fits pair differences with no bias and no class
/// weights, in f64, by plain gradient descent with a step from a curvature bound, where this one
/// fits labelled points with a bias and class weights, in f32, by Adam. A shared optimiser would
/// have to be generic over the float type and the update rule, leaving only a `for` loop in
/// common, and each fit's figures are pinned (`tests/shared_helpers_golden.rs`).
pub fn fit_logistic(x: &[Vec<f32>], y: &[bool], opts: &TrainOptions) -> (Vec<f32>, f32) {
    let n = x.len();
    let d = x.first().map(|v| v.len()).unwrap_or(0);
    let pos = y.iter().filter(|b| **b).count().max(1) as f32;
    let neg = (n as f32 - pos).max(1.0);
    // Each class carries half the total weight.
    let cw = |label: bool| if label { 0.5 / pos } else { 0.5 / neg };
    // Parameters: d weights, then the bias.
    let mut theta = vec![0f32; d + 1];
    let (mut m, mut v, mut g) = (vec![0f32; d + 1], vec![0f32; d + 1], vec![0f32; d + 1]);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    for t in 1..=opts.epochs {
        g.iter_mut().for_each(|x| *x = 0.0);
        for (xi, &yi) in x.iter().zip(y) {
            let z: f32 = theta[..d].iter().zip(xi).map(|(a, b)| a * b).sum::<f32>() + theta[d];
            let err = (sigmoid(z) - if yi { 1.0 } else { 0.0 }) * cw(yi);
            for (gj, xj) in g.iter_mut().zip(xi) {
                *gj += err * xj;
            }
            g[d] += err;
        }
        for j in 0..d {
            g[j] += opts.l2 * theta[j];
        }
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for j in 0..=d {
            m[j] = b1 * m[j] + (1.0 - b1) * g[j];
            v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
            theta[j] -= opts.learning_rate * (m[j] / c1) / ((v[j] / c2).sqrt() + eps);
        }
    }
    let b = theta.pop().unwrap_or(0.0);
    (theta, b)
}

/// Embeds the examples and fits the head (on the on-topic examples) and the relevance threshold
/// (the cosine where a one-feature logistic regression of off-topic pairs against on-topic
/// compliant answers crosses 0.5).
pub fn train_head(enc: &BertEncoder, examples: &[Example], opts: &TrainOptions) -> Result<Head> {
    let feats = example_features(enc, examples)?;
    fit_head(examples, &feats, opts)
}

/// [`features`] of each example.
pub fn example_features(enc: &BertEncoder, examples: &[Example]) -> Result<Vec<Features>> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let prompts: Vec<&str> = examples.iter().map(|e| e.prompt.as_str()).collect();
    features(enc, &prompts, &texts)
}

/// Fits the head and the relevance threshold on precomputed features (see [`train_head`]).
pub fn fit_head(examples: &[Example], feats: &[Features], opts: &TrainOptions) -> Result<Head> {
    let on_topic: Vec<&Example> = examples.iter().filter(|e| !e.off_topic).collect();
    if !on_topic.iter().any(|e| e.refusal) || on_topic.iter().all(|e| e.refusal) {
        return Err(EvalError::Other(
            "training needs both refusal and compliance examples".into(),
        ));
    }
    // Hand-labelled responses of the hard kinds (identity statements, caveats, lectures,
    // deflections) count `labelled_repeat` times: templated and demo-set examples are many and
    // easy, and would otherwise decide the head alone.
    let (x, y): (Vec<Vec<f32>>, Vec<bool>) = examples
        .iter()
        .zip(feats)
        .filter(|(e, _)| !e.off_topic)
        .flat_map(|(e, f)| {
            let n = if e.source.starts_with(LABELLED_PREFIX)
                || e.source.starts_with(EXTRA_LABELLED_PREFIX)
            {
                opts.labelled_repeat.max(1)
            } else {
                1
            };
            std::iter::repeat_n((f.head_input(opts.interaction), e.refusal), n)
        })
        .unzip();
    let (weights, bias) = fit_logistic(&x, &y, opts);
    // Relevance: off-topic pairs (1) against on-topic compliant answers (0).
    let (rx, ry): (Vec<Vec<f32>>, Vec<bool>) = examples
        .iter()
        .zip(feats)
        .filter(|(e, _)| e.off_topic || !e.refusal)
        .map(|(e, f)| (vec![f.relevance], e.off_topic))
        .unzip();
    let relevance_threshold = if ry.iter().any(|b| *b) {
        let (w, b) = fit_logistic(
            &rx,
            &ry,
            &TrainOptions {
                l2: 0.0,
                ..opts.clone()
            },
        );
        // w * cos + b = 0; w < 0 (lower cosine, more likely off-topic).
        -b / w[0]
    } else {
        f32::NEG_INFINITY
    };
    let mut head = Head {
        format: HEAD_FORMAT.into(),
        encoder: "minilm (all-MiniLM-L6 from the asset cache), mean pooling, L2-normalised embeddings of the response and of its opening (after identity statements, disclaimers and caveats are set aside); request/response cosine for relevance".into(),
        weights,
        bias,
        threshold: opts.threshold,
        relevance_threshold,
        interaction: opts.interaction,
        training: serde_json::Value::Null,
    };
    let correct = examples
        .iter()
        .zip(feats)
        .filter(|(e, f)| decide(&head, f).0 == e.refusal)
        .count();
    let head_correct = x
        .iter()
        .zip(&y)
        .filter(|(xi, yi)| (head.prob(xi) >= head.threshold) == **yi)
        .count();
    let mut sources: std::collections::BTreeMap<String, [usize; 2]> = Default::default();
    for e in examples {
        sources.entry(e.source.clone()).or_default()[usize::from(e.refusal)] += 1;
    }
    let sources: serde_json::Map<String, serde_json::Value> = sources
        .into_iter()
        .map(|(k, [c, r])| (k, serde_json::json!({"refusal": r, "compliance": c})))
        .collect();
    head.training = serde_json::json!({
        "examples": examples.len(),
        "refusal": examples.iter().filter(|e| e.refusal).count(),
        "compliance": examples.iter().filter(|e| !e.refusal).count(),
        "off_topic_pairs": examples.iter().filter(|e| e.off_topic).count(),
        "sources": sources,
        "options": opts,
        "train_accuracy": correct as f64 / examples.len() as f64,
        "head_train_accuracy_on_topic": head_correct as f64 / x.len().max(1) as f64,
        "note": "trained only on responses labelled in this project (never on PyRIT's refusal files or the held-out part of data/judge_labels.jsonl)",
    });
    Ok(head)
}

/// K-fold cross-validation of the whole judge (head, threshold and rules) over the examples
/// whose source starts with `source_prefix` (the others always stay in training): each fold is
/// judged by a head fitted without it. Returns (correct, total). Folds are by example index
/// modulo `k`, so the result is deterministic.
pub fn cross_validate(
    examples: &[Example],
    feats: &[Features],
    opts: &TrainOptions,
    k: usize,
    source_prefix: &str,
) -> Result<(usize, usize)> {
    let held: Vec<usize> = (0..examples.len())
        .filter(|&i| examples[i].source.starts_with(source_prefix))
        .collect();
    let (mut correct, mut total) = (0, 0);
    for fold in 0..k.max(2) {
        let out: std::collections::HashSet<usize> = held
            .iter()
            .enumerate()
            .filter(|(j, _)| j % k.max(2) == fold)
            .map(|(_, &i)| i)
            .collect();
        let (ex, fs): (Vec<Example>, Vec<Features>) = examples
            .iter()
            .zip(feats)
            .enumerate()
            .filter(|(i, _)| !out.contains(i))
            .map(|(_, (e, f))| (e.clone(), f.clone()))
            .unzip();
        let head = fit_head(&ex, &fs, opts)?;
        for &i in &out {
            total += 1;
            if decide(&head, &feats[i]).0 == examples[i].refusal {
                correct += 1;
            }
        }
    }
    Ok((correct, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_validation_judges_each_held_out_example_once_with_a_head_fitted_without_it() {
        // Dimension 0 says refusal (+1) or compliance (-1); dimension 1 is noise.
        let mk = |i: usize, source: &str| {
            let refusal = i.is_multiple_of(2);
            let x = if refusal { 1.0 } else { -1.0 };
            (
                Example {
                    prompt: String::new(),
                    text: String::new(),
                    refusal,
                    off_topic: false,
                    source: source.into(),
                },
                Features {
                    embeddings: vec![x, (i as f32 * 0.7).sin()],
                    interaction: vec![],
                    relevance: 1.0,
                    opening_phrase: false,
                    declines: false,
                    only_asks: false,
                    deflects: false,
                    rambles: false,
                    bare_answer: false,
                },
            )
        };
        let (ex, fs): (Vec<Example>, Vec<Features>) = (0..30)
            .map(|i| mk(i, "other"))
            .chain((0..20).map(|i| mk(i, "data/judge_labels.jsonl (train part)")))
            .unzip();
        let opts = TrainOptions {
            epochs: 300,
            ..Default::default()
        };
        let (correct, total) = cross_validate(&ex, &fs, &opts, 5, "data/judge_labels").unwrap();
        assert_eq!(total, 20);
        assert_eq!(correct, 20);
        // A fold whose labels contradict everything else is judged wrong: the head never saw it.
        let mut flipped = ex.clone();
        for e in flipped.iter_mut().skip(30) {
            e.refusal = !e.refusal;
        }
        let (correct, total) =
            cross_validate(&flipped, &fs, &opts, 5, "data/judge_labels").unwrap();
        assert_eq!(total, 20);
        assert!(correct <= 4, "{correct}");
    }

    #[test]
    fn logistic_regression_separates_a_toy_problem() {
        // Positives have x0 > 0.
        let x: Vec<Vec<f32>> = (0..40)
            .map(|i| vec![if i % 2 == 0 { 1.0 } else { -1.0 }, (i as f32 * 0.37).sin()])
            .collect();
        let y: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
        let (w, b) = fit_logistic(
            &x,
            &y,
            &TrainOptions {
                epochs: 500,
                learning_rate: 0.05,
                l2: 0.0,
                interaction: false,
                labelled_repeat: 1,
                threshold: 0.5,
            },
        );
        assert!(w[0] > 1.0 && w[0].abs() > 5.0 * w[1].abs(), "{w:?} {b}");
        let head = Head {
            format: HEAD_FORMAT.into(),
            encoder: String::new(),
            weights: w,
            bias: b,
            threshold: 0.5,
            relevance_threshold: 0.0,
            interaction: false,
            training: serde_json::Value::Null,
        };
        assert!(head.prob(&[1.0, 0.0]) > 0.9 && head.prob(&[-1.0, 0.0]) < 0.1);
    }
}
