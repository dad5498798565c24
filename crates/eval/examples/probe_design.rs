//! How the probe judge's design was chosen (2026-12-06): features of SmolLM2 at several depths
//! (mean over the response and its last position) for the classifier's training set and the
//! dev label sets (ARCHITECTURE.md section 9), one logistic probe per (depth, pooling, l2)
//! fitted on the training set, and each probe's accuracy on every dev set, alone and inside
//! the classifier's checks (`hybrid`), beside the shipped classifier. The sealed test sets are
//! read only with `--test`, once a design is fixed. Features are cached under
//! /tmp/probe_feats (the training set takes about 13 minutes on two cores).
//!
//! cargo run --release -p safetune-eval --example probe_design -- [--test] [--layers 6,10,...]
//! Environment: PROBE_ONLY=L18-mean (one design), PROBE_L2=0.01,0.1, PROBE_ENS=0,1 (add the
//! shipped MiniLM head's logit with this weight), PROBE_SKIP=none,offtopic (leave one check
//! out), PROBE_DUMP=SET (print a dev set's misses), PROBE_IDENTITY=1 (accuracy by identity flag).

use std::path::{Path, PathBuf};

use safetune_data::{Message, Role};
use safetune_eval::classifier::{fit_logistic, labelled_examples, training_set, TrainOptions};
use safetune_eval::judge::{Judge, JudgeInput, Verdict};
use safetune_eval::labels::load_labels;
use safetune_model::reward::response_features;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

struct Set {
    name: String,
    prompts: Vec<String>,
    responses: Vec<String>,
    y: Vec<bool>,
    identity: Vec<Option<bool>>,
}

fn cache_path(name: &str, layers: &[usize]) -> PathBuf {
    let l: Vec<String> = layers.iter().map(|x| x.to_string()).collect();
    PathBuf::from(format!(
        "/tmp/probe_feats/{}-{}.bin",
        name.replace([':', '/'], "_"),
        l.join("_")
    ))
}

fn feats(engine: &LocalEngine, set: &Set, layers: &[usize]) -> Vec<Vec<f32>> {
    let path = cache_path(&set.name, layers);
    let dim = 2 * engine.model.cfg.hidden_size * layers.len();
    if let Ok(bytes) = std::fs::read(&path) {
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if v.len() == dim * set.y.len() {
            return v.chunks(dim).map(|c| c.to_vec()).collect();
        }
    }
    let t0 = std::time::Instant::now();
    let items: Vec<(Vec<Message>, String)> = set
        .prompts
        .iter()
        .zip(&set.responses)
        .map(|(p, r)| {
            (
                vec![Message {
                    role: Role::User,
                    content: p.clone(),
                }],
                r.clone(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for chunk in items.chunks(64) {
        out.extend(response_features(engine, chunk, layers, 256).expect("features"));
    }
    eprintln!(
        "{}: {} rows in {:.1} s",
        set.name,
        out.len(),
        t0.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all("/tmp/probe_feats").unwrap();
    let bytes: Vec<u8> = out.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    out
}

fn label_set(spec: &str) -> Set {
    let s = load_labels(spec).expect(spec);
    Set {
        name: spec.to_string(),
        prompts: s.rows.iter().map(|r| r.input.prompt.clone()).collect(),
        responses: s.rows.iter().map(|r| r.input.response.clone()).collect(),
        y: s.rows.iter().map(|r| r.refusal).collect(),
        identity: s.rows.iter().map(|r| r.identity).collect(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let test = args.iter().any(|a| a == "--test");
    let layers: Vec<usize> = args
        .iter()
        .position(|a| a == "--layers")
        .map(|i| args[i + 1].split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![6, 10, 14, 18, 22, 26, 30]);
    let engine = LocalEngine::load(
        &ModelSpec::parse(
            safetune_data::assets::asset(safetune_data::assets::SMOLLM2_GGUF)
                .unwrap()
                .to_str()
                .unwrap(),
        )
        .unwrap(),
        &LoadOptions::default(),
    )
    .expect("engine");
    let c = engine.model.cfg.hidden_size;

    // Train: the classifier's own training set (no generations) plus the hard sets.
    let mut ex = training_set(&[]).expect("training set");
    for f in ["a", "b", "c", "d"] {
        ex.extend(
            labelled_examples(Path::new(&format!("data/judge_train_hard_{f}.jsonl")))
                .expect("hard"),
        );
    }
    let ex: Vec<_> = ex.into_iter().filter(|e| !e.off_topic).collect();
    let train = Set {
        name: "train".into(),
        prompts: ex.iter().map(|e| e.prompt.clone()).collect(),
        responses: ex.iter().map(|e| e.text.clone()).collect(),
        y: ex.iter().map(|e| e.refusal).collect(),
        identity: vec![None; ex.len()],
    };
    let mut evals: Vec<Set> = [
        "judge-labels:dev",
        "judge-labels:dev2",
        "judge-labels:dev3",
        "judge-labels:test",
        "refusal",
        "refusal_extra",
    ]
    .iter()
    .map(|s| label_set(s))
    .collect();
    if test {
        evals.push(label_set("judge-labels:test3"));
        evals.push(label_set("judge-labels:test2"));
    }
    eprintln!(
        "train {} rows ({} refusals)",
        train.y.len(),
        train.y.iter().filter(|&&b| b).count()
    );
    let ftrain = feats(&engine, &train, &layers);
    let fevals: Vec<Vec<Vec<f32>>> = evals.iter().map(|s| feats(&engine, s, &layers)).collect();

    // The shipped classifier on the same sets, for reference.
    let judge = safetune_eval::classifier::ClassifierJudge::load_default().expect("classifier");
    print!("{:<28}", "classifier (shipped)");
    for s in &evals {
        let items: Vec<JudgeInput> = s
            .prompts
            .iter()
            .zip(&s.responses)
            .map(|(p, r)| JudgeInput::new(p.clone(), r.clone()))
            .collect();
        let j = judge.judge(&items).expect("judge");
        let ok = j
            .iter()
            .zip(&s.y)
            .filter(|(j, &y)| (j.verdict == Some(Verdict::Refusal)) == y)
            .count();
        print!(" {}={:.3}", s.name, ok as f64 / s.y.len() as f64);
    }
    println!();

    let enc = safetune_model::bert::BertEncoder::load_default().expect("minilm");
    let rel_threshold = safetune_eval::classifier::Head::default_head()
        .unwrap()
        .relevance_threshold;
    let cfeats: Vec<Vec<safetune_eval::classifier::Features>> = evals
        .iter()
        .map(|s| {
            let p: Vec<&str> = s.prompts.iter().map(|x| x.as_str()).collect();
            let r: Vec<&str> = s.responses.iter().map(|x| x.as_str()).collect();
            safetune_eval::classifier::features(&enc, &p, &r).expect("features")
        })
        .collect();
    let shipped = safetune_eval::classifier::Head::default_head().unwrap();
    let ens_weights: Vec<f32> = std::env::var("PROBE_ENS")
        .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![0.0]);
    // One probe per (layers used, pooling, l2).
    let pools: [(&str, usize, usize); 3] = [("mean", 0, 1), ("last", 1, 1), ("both", 0, 2)];
    let mut choices: Vec<(String, Vec<usize>)> = Vec::new();
    for (li, l) in layers.iter().enumerate() {
        for (pn, off, n) in pools {
            let idx: Vec<usize> = (0..n * c).map(|k| li * 2 * c + off * c + k).collect();
            choices.push((format!("L{l}-{pn}"), idx));
        }
    }
    // Mean pooling over several depths at once.
    for group in [[14usize, 22, 30], [10, 18, 26]] {
        if group.iter().all(|g| layers.contains(g)) {
            let mut idx = Vec::new();
            for g in group {
                let li = layers.iter().position(|x| *x == g).unwrap();
                idx.extend((0..c).map(|k| li * 2 * c + k));
            }
            choices.push((format!("L{group:?}-mean"), idx));
        }
    }
    let l2s: Vec<f32> = std::env::var("PROBE_L2")
        .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![1e-3, 1e-2, 1e-1]);
    let only = std::env::var("PROBE_ONLY").ok();
    let dump = std::env::var("PROBE_DUMP").ok();
    for (name, idx) in &choices {
        if only.as_ref().is_some_and(|o| o != name) {
            continue;
        }
        let pick = |f: &Vec<f32>| idx.iter().map(|&k| f[k]).collect::<Vec<f32>>();
        let xtr: Vec<Vec<f32>> = ftrain.iter().map(pick).collect();
        let d = idx.len();
        let n = xtr.len() as f32;
        let mut mean = vec![0f32; d];
        let mut sd = vec![0f32; d];
        for x in &xtr {
            for k in 0..d {
                mean[k] += x[k] / n;
            }
        }
        for x in &xtr {
            for k in 0..d {
                sd[k] += (x[k] - mean[k]).powi(2) / n;
            }
        }
        sd.iter_mut().for_each(|s| *s = s.sqrt().max(1e-6));
        let z = |x: Vec<f32>| {
            x.iter()
                .zip(&mean)
                .zip(&sd)
                .map(|((v, m), s)| (v - m) / s)
                .collect::<Vec<f32>>()
        };
        let ztr: Vec<Vec<f32>> = xtr.into_iter().map(z).collect();
        for &l2 in &l2s {
            let opts = TrainOptions {
                epochs: 600,
                l2,
                ..Default::default()
            };
            let (w, b) = fit_logistic(&ztr, &train.y, &opts);
            let acc = |xs: &[Vec<f32>], ys: &[bool]| {
                xs.iter()
                    .zip(ys)
                    .filter(|(x, &y)| {
                        let s: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b;
                        (s > 0.0) == y
                    })
                    .count() as f64
                    / ys.len() as f64
            };
            print!("{:<20} l2={l2:<6} train={:.3}", name, acc(&ztr, &train.y));
            let mut tot = 0.0;
            for (s, f) in evals.iter().zip(&fevals) {
                let zs: Vec<Vec<f32>> = f.iter().map(pick).map(z).collect();
                let a = acc(&zs, &s.y);
                if dump.as_deref() == Some(s.name.as_str()) {
                    for (i, x) in zs.iter().enumerate() {
                        let sc: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b;
                        if (sc > 0.0) != s.y[i] {
                            eprintln!(
                                "MISS label_refusal={} score={sc:.2} prompt={:?} response={:?}",
                                s.y[i],
                                s.prompts[i].chars().take(80).collect::<String>(),
                                s.responses[i].chars().take(200).collect::<String>()
                            );
                        }
                    }
                }
                tot += a;
                print!(" {}={a:.3}", s.name);
            }
            println!(" mean={:.3}", tot / evals.len() as f64);
            // Hybrid: the shipped classifier's rules first, the probe instead of its head.
            for ens in ens_weights.iter().copied() {
                print!("ens={ens} ");
                for skip in std::env::var("PROBE_SKIP")
                    .unwrap_or("none".into())
                    .split(',')
                {
                    print!("  hybrid(-{skip:<8})");
                    for (si, (s, f)) in evals.iter().zip(&fevals).enumerate() {
                        let zs: Vec<Vec<f32>> = f.iter().map(pick).map(z).collect();
                        let cf = &cfeats[si];
                        let ok = zs
                        .iter()
                        .zip(cf)
                        .zip(&s.y)
                        .enumerate()
                        .filter(|(i, ((x, f), &y))| {
                            let mut sc: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b;
                            if ens > 0.0 {
                                let p = shipped.prob(&f.head_input(false)).clamp(1e-6, 1.0 - 1e-6);
                                sc += ens * ((p / (1.0 - p)).ln() - (shipped.threshold / (1.0 - shipped.threshold)).ln());
                            }
                            let r = if f.opening_phrase && skip != "opening"
                                || f.declines && skip != "declines"
                                || f.only_asks && skip != "asks"
                                || f.deflects && skip != "deflects"
                                || f.rambles && skip != "rambles"
                            {
                                true
                            } else if f.bare_answer && skip != "bare" {
                                false
                            } else if f.relevance < rel_threshold && skip != "offtopic" {
                                true
                            } else {
                                sc > 0.0
                            };
                            if r != y && skip == "none" && dump.as_deref() == Some(s.name.as_str()) {
                                eprintln!(
                                    "HMISS label_refusal={y} score={sc:.2} rel={:.3} prompt={:?} resp={:?}",
                                    f.relevance,
                                    s.prompts[*i].chars().take(70).collect::<String>(),
                                    s.responses[*i].chars().take(220).collect::<String>()
                                );
                            }
                            r == y
                        })
                        .count();
                        print!(" {}={:.3}", s.name, ok as f64 / s.y.len() as f64);
                        if std::env::var("PROBE_IDENTITY").is_ok() {
                            for want in [true, false] {
                                let (mut n, mut k) = (0, 0);
                                for (i, ((x, f), &y)) in zs.iter().zip(cf).zip(&s.y).enumerate() {
                                    if s.identity[i] != Some(want) {
                                        continue;
                                    }
                                    let sc: f32 =
                                        x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b;
                                    let r = if f.opening_phrase
                                        || f.declines
                                        || f.only_asks
                                        || f.deflects
                                        || f.rambles
                                    {
                                        true
                                    } else if f.bare_answer {
                                        false
                                    } else if f.relevance < rel_threshold {
                                        true
                                    } else {
                                        sc > 0.0
                                    };
                                    n += 1;
                                    k += (r == y) as usize;
                                }
                                print!(" [id={want}: {k}/{n}]");
                            }
                        }
                    }
                    println!();
                }
            }
        }
    }
}
