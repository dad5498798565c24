//! Golden figures of the shared statistics helpers, pinned before they were merged into one
//! home (issue 17): the bootstrap intervals of the judge metrics and of the reward-model
//! analysis, and the two logistic fits. Each figure is printed with `{:?}` (the shortest text
//! that reads back as the same f64), so any change in the last bit fails.

use safetune_eval::classifier::{fit_logistic, TrainOptions};
use safetune_eval::metrics;
use safetune_eval::rm::analyze::{consistency, AnalyzeOptions, VariantSafety};
use safetune_eval::rm::bt::{fit_bt, BtOptions};
use safetune_eval::rm::score::{ItemScore, ScoreFile};
use safetune_eval::rm::stats::{self, BootstrapOptions};

/// Thirty values in 0..11 and a second sample shifted and longer.
fn sample_a() -> Vec<f64> {
    (0..30).map(|i| ((i * 37) % 11) as f64).collect()
}

fn sample_b() -> Vec<f64> {
    (0..41)
        .map(|i| ((i * 53) % 13) as f64 * 0.75 + 1.0)
        .collect()
}

fn fig(e_value: f64, lo: f64, hi: f64, count: Option<usize>) -> String {
    format!("{e_value:?} [{lo:?}, {hi:?}] {count:?}")
}

#[test]
fn judge_metric_bootstraps_are_pinned() {
    let (a, b) = (sample_a(), sample_b());
    let m = metrics::bootstrap_mean(&a, 2000, 0);
    let u = metrics::bootstrap_diff_unpaired(&a, &b, 2000, 3);
    let pairs: Vec<(f64, f64)> = a.iter().zip(&b).map(|(x, y)| (*x, *y)).collect();
    let p = metrics::bootstrap_diff_paired(&pairs, 500, 11);
    let got = [m, u, p]
        .iter()
        .map(|e| fig(e.value, e.lo, e.hi, e.n))
        .collect::<Vec<_>>();
    assert_eq!(
        got,
        [
            "4.833333333333333 [3.7333333333333334, 5.9] Some(30)",
            "0.46544715447154505 [-1.0141666666666664, 1.8260873983739836] Some(30)",
            "0.21666666666666667 [-1.3127083333333334, 2.0227083333333313] Some(30)",
        ]
    );
}

#[test]
fn reward_model_bootstraps_are_pinned() {
    let (a, b) = (sample_a(), sample_b());
    let opts = BootstrapOptions {
        resamples: 1000,
        seed: 5,
        level: 0.9,
        ..Default::default()
    };
    let m = stats::bootstrap_mean(&a, &opts).unwrap();
    let t = stats::kendall_tau_ci(&a, &b[..30], &opts).unwrap();
    let r = stats::spearman_rho_ci(&a, &b[..30], &BootstrapOptions::default()).unwrap();
    let got = [m, t, r]
        .iter()
        .map(|e| fig(e.value, e.lo, e.hi, e.resamples))
        .collect::<Vec<_>>();
    assert_eq!(
        got,
        [
            "4.833333333333333 [3.898333333333333, 5.833333333333333] Some(1000)",
            "-0.021898393592766893 [-0.25506069923678887, 0.20982976161976177] Some(1000)",
            "-0.0756999354817419 [-0.42318179143935575, 0.30594844523042186] Some(2000)",
        ]
    );
}

/// The RM-vs-safety consistency resamples items within each variant (the RM's means) and safe
/// answers within each variant's prompts (the safety rates) with one generator.
#[test]
fn variant_bootstrap_is_pinned() {
    let names = ["v0", "v1", "v2", "v3", "v4"];
    let items = (0..60)
        .map(|i| ItemScore {
            id: format!("i{i}"),
            score: ((i * 29) % 17) as f64 / 4.0 + (i % 5) as f64 * 0.6,
            label: None,
            variant: Some(names[i % 5].to_string()),
            subset: None,
        })
        .collect();
    let f = ScoreFile {
        rm: "rm".into(),
        items,
        ..Default::default()
    };
    let results: Vec<VariantSafety> = names
        .iter()
        .enumerate()
        .map(|(k, v)| VariantSafety {
            variant: v.to_string(),
            safety_rate: 0.5 + 0.08 * k as f64,
            safe: (k != 2).then_some(10 + 4 * k as u64),
            total: (k != 2).then_some(20),
        })
        .collect();
    let opts = AnalyzeOptions {
        bootstrap: BootstrapOptions {
            resamples: 400,
            seed: 9,
            level: 0.95,
            ..Default::default()
        },
        tie_eps: 1e-9,
    };
    let c = consistency(&f, &results, &opts).unwrap();
    let mut got: Vec<String> = c
        .variants
        .iter()
        .map(|v| {
            let e = &v.mean_score;
            fig(e.value, e.lo, e.hi, e.resamples)
        })
        .collect();
    for e in [c.kendall_tau.unwrap(), c.spearman_rho.unwrap()] {
        got.push(fig(e.value, e.lo, e.hi, e.resamples));
    }
    assert_eq!(
        got,
        [
            "1.75 [1.186979166666667, 2.2921874999999994] Some(400)",
            "2.870833333333334 [2.2036458333333337, 3.496354166666667] Some(400)",
            "2.9291666666666667 [2.3041666666666663, 3.7421875] Some(400)",
            "4.05 [3.486979166666666, 4.592187499999999] Some(400)",
            "4.4624999999999995 [3.754166666666666, 5.108854166666665] Some(400)",
            "1.0 [0.44393894976288106, 0.9486832980505138] Some(400)",
            "1.0 [0.5642880936468347, 0.9746794344808964] Some(400)",
        ]
    );
}

/// A fixed, not quite separable problem of six features.
fn fit_problem() -> (Vec<Vec<f32>>, Vec<bool>) {
    let x: Vec<Vec<f32>> = (0..40)
        .map(|i| {
            (0..6)
                .map(|k| (((i * (k + 3) * 7 + k * 11) % 19) as f32 - 9.0) / 9.0)
                .collect()
        })
        .collect();
    let y = x
        .iter()
        .enumerate()
        .map(|(i, v)| v[0] - 0.5 * v[2] + 0.3 * v[4] > 0.0 || i % 9 == 0)
        .collect();
    (x, y)
}

#[test]
fn classifier_logistic_fit_is_pinned() {
    let (x, y) = fit_problem();
    let opts = TrainOptions {
        epochs: 300,
        ..Default::default()
    };
    let (w, b) = fit_logistic(&x, &y, &opts);
    let expect: [f32; 6] = [
        5.37648, 1.4527227, -3.1168225, -1.0408442, 0.29117963, 0.792582,
    ];
    for (got, want) in w.iter().zip(expect) {
        assert!((got - want).abs() < 1e-6, "weights {w:?}");
    }
    assert_eq!(w.len(), 6);
    assert!((b - 0.3070495).abs() < 1e-6, "bias {b}");
}

#[test]
fn bradley_terry_fit_is_pinned() {
    let (x, _) = fit_problem();
    let chosen: Vec<Vec<f32>> = x[..20].to_vec();
    let rejected: Vec<Vec<f32>> = x[20..]
        .iter()
        .zip(&chosen)
        .map(|(r, c)| r.iter().zip(c).map(|(a, b)| 0.5 * a - 0.4 * b).collect())
        .collect();
    let opts = BtOptions {
        steps: 200,
        seed: 4,
        ..Default::default()
    };
    let (_, _, w, report) = fit_bt(&chosen, &rejected, &opts).unwrap();
    let expect = [
        0.27604906156808406,
        0.1189360853020148,
        0.14007121327645622,
        -0.29263678233027673,
        -0.3806909298693711,
        0.16498788240584178,
    ];
    assert_eq!(w.len(), 6);
    for (got, want) in w.iter().zip(expect) {
        assert!((got - want).abs() < 1e-6, "weights {w:?}");
    }
    assert!(
        (report.train_loss - 0.638797147105784).abs() < 1e-6,
        "loss {}",
        report.train_loss
    );
}
