//! Reward heads on tiny random models the test writes: a sequence-classification RM in Hugging
//! Face layout (score at the last non-pad token, batched with padding equal to one at a time,
//! Llama and Qwen2 layouts, loading errors), and the response log-probability behind implicit
//! rewards.

use candle_core::{Device, Tensor};
use safetune_data::Message;
use safetune_model::reward::*;
use safetune_model::testing::TinyModel;
use safetune_model::*;

/// The tiny random model written to a temporary folder (kept alive by the returned guard) and
/// loaded on the dense path.
fn tiny_engine() -> (tempfile::TempDir, LocalEngine) {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
    let e = LocalEngine::load(&spec, &LoadOptions::default()).unwrap();
    (dir, e)
}

/// One unpadded sequence through the decoder: its final hidden states, (1, T, C).
fn unpadded_hidden(model: &Llama, ids: Vec<u32>) -> Tensor {
    let t = ids.len();
    let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.hidden_states(&input, &pos, None, None).unwrap()
}

fn convo(q: &str, a: &str) -> Vec<Message> {
    vec![Message::user(q), Message::assistant(a)]
}

#[test]
fn seq_cls_scores_the_last_token_and_batches_like_single_rows() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_seq_cls(
        dir.path(),
        &TinyModel::default(),
        "LlamaForSequenceClassification",
        1,
    )
    .unwrap();
    assert!(is_seq_cls_dir(dir.path()));
    let mut rm = SeqClsRewardModel::load(dir.path()).unwrap();
    assert_eq!(rm.num_labels, 1);
    assert_eq!(rm.architecture, "LlamaForSequenceClassification");
    let convos = vec![
        convo("Hi", "Hello there, how is it going?"),
        convo(
            "How do I boil an egg?",
            "Put it in boiling water for nine minutes.",
        ),
        convo("x", "y"),
    ];
    // Reference: one unpadded sequence through the decoder, head on the last position.
    let mut reference = Vec::new();
    for c in &convos {
        let ids = rm.conversation_ids(c).unwrap();
        // The whole rendered conversation, closing the answer turn as the template writes it
        // (ChatML: `<|im_end|>` then a newline, which transformers scores too).
        let text = rm.template.render(c, false, "", "<|im_end|>").unwrap();
        assert!(text.ends_with("<|im_end|>\n"), "{text:?}");
        assert_eq!(ids, rm.tok.encode(&text, false).unwrap());
        let t = ids.len();
        let h = unpadded_hidden(&rm.model, ids); // (1, T, C)
        let last = h.get(0).unwrap().get(t - 1).unwrap(); // (C)
        let s = (last * rm.score.get(0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        reference.push(s);
    }
    rm.batch_size = 8;
    let batched = rm.score_all(&convos).unwrap();
    rm.batch_size = 1;
    let single = rm.score_all(&convos).unwrap();
    for i in 0..convos.len() {
        let (b, s, r) = (batched[i][0], single[i][0], reference[i]);
        println!("row {i}: batched {b:.6} single {s:.6} reference {r:.6}");
        assert!((b - r).abs() < 1e-4 && (s - r).abs() < 1e-4);
    }
    // Different answers score differently (the head reads the answer).
    assert!((batched[0][0] - batched[1][0]).abs() > 1e-4);
}

#[test]
fn qwen2_layout_with_two_labels_loads() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel {
        attention_bias: true,
        seed: 3,
        ..TinyModel::default()
    };
    write_tiny_seq_cls(dir.path(), &tiny, "Qwen2ForSequenceClassification", 2).unwrap();
    let rm = SeqClsRewardModel::load(dir.path()).unwrap();
    assert_eq!(rm.num_labels, 2);
    let out = rm.score_all(&[convo("a", "b")]).unwrap();
    assert_eq!(out[0].len(), 2);
    assert!(out[0].iter().all(|x| x.is_finite()));
}

#[test]
fn loading_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    assert!(!is_seq_cls_dir(dir.path()));
    let e = SeqClsRewardModel::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("names no *ForSequenceClassification"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    write_tiny_seq_cls(
        dir.path(),
        &TinyModel::default(),
        "LlamaForSequenceClassification",
        1,
    )
    .unwrap();
    // A head of the wrong width.
    let st = dir.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    t.insert(
        "score.weight".into(),
        Tensor::zeros((1, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = SeqClsRewardModel::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("score.weight") && e.contains("[1, 7]"), "{e}");
}

#[test]
fn response_logprob_matches_a_manual_sum_and_policy_equals_reference_gives_zero() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let spec = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap();
    let policy = LocalEngine::load(&spec, &LoadOptions::default()).unwrap();
    let reference = LocalEngine::load(&spec, &LoadOptions::default()).unwrap();
    let ctx = vec![Message::user("Tell me about the moon")];
    let (lp, n) = response_logprob(&policy, &ctx, "It is round.").unwrap();
    let (lr, _) = response_logprob(&reference, &ctx, "It is round.").unwrap();
    assert!(lp < 0.0 && n >= 2);
    assert_eq!(lp - lr, 0.0, "the same model is its own reference");
    // Manual: the response's tokens one by one with the KV-free full forward.
    let prompt = policy.prompt_ids(&Prompt::Chat(ctx.clone())).unwrap();
    let mut resp = policy.tok.encode("It is round.", false).unwrap();
    resp.push(policy.tok.eos.as_ref().unwrap().1);
    let mut manual = 0.0f64;
    let mut ids = prompt.clone();
    for &tok in &resp {
        let t = ids.len();
        let logits = policy
            .model
            .forward(
                &Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap(),
                None,
            )
            .unwrap();
        let row: Vec<f32> = logits
            .get(0)
            .unwrap()
            .get(t - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        manual += row[tok as usize] as f64 - lse;
        ids.push(tok);
    }
    println!("logprob {lp:.5} manual {manual:.5} over {n} tokens");
    assert!((lp - manual).abs() < 1e-3 * n as f64);
    // A different model (another seed) gives a nonzero log-ratio.
    let dir2 = tempfile::tempdir().unwrap();
    TinyModel {
        seed: 9,
        ..TinyModel::default()
    }
    .write(dir2.path())
    .unwrap();
    let other = LocalEngine::load(
        &ModelSpec::parse(dir2.path().to_str().unwrap()).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let (lo, _) = response_logprob(&other, &ctx, "It is round.").unwrap();
    assert!((lo - lp).abs() > 1e-3);
}

#[test]
fn mean_pooled_features_have_the_hidden_size() {
    let (_dir, e) = tiny_engine();
    let f = mean_pooled_features(&e, &[convo("a", "b"), convo("a", "c d e")]).unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].len(), 64);
    assert!(f[0] != f[1]);
}

#[test]
fn batched_features_match_one_at_a_time_and_keep_the_input_order() {
    let (_dir, e) = tiny_engine();
    // Lengths in no order and more conversations than one batch, so rows are padded, sorted
    // into groups and put back.
    let convos: Vec<_> = (0..safetune_model::reward::FEATURE_BATCH + 5)
        .map(|i| convo("q", &"word ".repeat(1 + (i * 7) % 11)))
        .collect();
    let together = mean_pooled_features(&e, &convos).unwrap();
    for (i, c) in convos.iter().enumerate() {
        let alone = mean_pooled_features(&e, std::slice::from_ref(c)).unwrap();
        let diff = together[i]
            .iter()
            .zip(&alone[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "conversation {i}: batched differs by {diff}");
    }
}

/// The probe's features: the response's span is found from the prompt's rendering, the mean
/// and last position of each requested depth are read, a batch gives what one item alone gives,
/// and depths outside the model are refused.
#[test]
fn response_features_read_the_response_span_at_each_depth() {
    let (_dir, e) = tiny_engine();
    let depth = e.model.layers.len();
    let c = e.model.cfg.hidden_size;
    let ctx = vec![Message::user("How do I boil an egg?")];
    let items: Vec<(Vec<Message>, String)> = (0..FEATURE_BATCH + 3)
        .map(|i| (ctx.clone(), "word ".repeat(1 + (i * 5) % 9)))
        .collect();
    let together = response_features(&e, &items, &[1, depth], 64).unwrap();
    assert_eq!(together.len(), items.len());
    assert_eq!(together[0].len(), 2 * 2 * c);
    // Reference for item 2 at full depth: one unpadded sequence, mean over the response's
    // positions (its tokens and the end-of-turn token) and the last position.
    let (ctx2, resp2) = &items[2];
    let mut ids = e.prompt_ids(&Prompt::Chat(ctx2.clone())).unwrap();
    let start = ids.len();
    ids.extend(e.tok.encode(resp2, false).unwrap());
    ids.push(e.tok.eos.as_ref().unwrap().1);
    let t = ids.len();
    let h = unpadded_hidden(&e.model, ids);
    let rows: Vec<Vec<f32>> = h.squeeze(0).unwrap().to_vec2().unwrap();
    let mean: Vec<f32> = (0..c)
        .map(|k| rows[start..].iter().map(|r| r[k]).sum::<f32>() / (t - start) as f32)
        .collect();
    let got_mean = &together[2][2 * c..3 * c];
    let got_last = &together[2][3 * c..];
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    assert!(close(got_mean, &mean), "mean over the response differs");
    assert!(close(got_last, &rows[t - 1]), "last position differs");
    // Depth 1 is not depth `depth`.
    assert!(!close(&together[2][..c], got_mean));
    for (i, item) in items.iter().enumerate() {
        let alone = response_features(&e, std::slice::from_ref(item), &[1, depth], 64).unwrap();
        assert!(close(&alone[0], &together[i]), "item {i}: batched differs");
    }
    // A response cut to 2 tokens reads 2 tokens and the end-of-turn token.
    let cut = response_features(&e, &items[8..9], &[depth], 2).unwrap();
    assert!(!close(&cut[0][..c], &together[8][2 * c..3 * c]));
    for bad in [0, depth + 1] {
        let err = response_features(&e, &items[..1], &[bad], 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("decoder blocks"), "{err}");
    }
}
