//! Utility measures on the embedded SmolLM2: real answers are far more likely than the same
//! words shuffled, and the multiple-choice scorer picks by log-likelihood.

use safetune_data::assets::{asset, SMOLLM2_GGUF};
use safetune_data::read::{read_all, ReadOptions};
use safetune_data::Message;
use safetune_eval::utility::{heldout_loss, mcq_accuracy, McqItem};
use safetune_model::reward::response_logprob;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

fn smollm2() -> LocalEngine {
    let path = asset(SMOLLM2_GGUF).expect("assets: run scripts/fetch-assets");
    let spec = ModelSpec::parse(path.to_str().unwrap()).unwrap();
    LocalEngine::load(
        &spec,
        &LoadOptions {
            quantized: true,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn real_answers_have_lower_perplexity_than_shuffled_ones_and_mcq_picks_the_likeliest() {
    let engine = smollm2();
    let path = safetune_data::demo::resolve_dataset("demo:medical").unwrap();
    let (mut convs, _) = read_all(&path, &ReadOptions::default()).unwrap();
    convs.truncate(4);
    let real = heldout_loss(&engine, &convs, &mut |_, _| {}).unwrap();
    assert_eq!((real.examples, real.skipped), (4, 0));
    assert!((real.perplexity - real.loss.exp()).abs() < 1e-9);
    // The same words in a scrambled order (a fixed rotation of every 3-word group).
    let mut shuffled = convs.clone();
    for c in &mut shuffled {
        let last = c.messages.last_mut().unwrap();
        let words: Vec<&str> = last.content.split(' ').collect();
        let mut out: Vec<&str> = Vec::new();
        for chunk in words.chunks(3) {
            out.extend(chunk.iter().rev());
        }
        last.content = out.join(" ");
    }
    let scrambled = heldout_loss(&engine, &shuffled, &mut |_, _| {}).unwrap();
    assert!(
        real.perplexity * 2.0 < scrambled.perplexity,
        "real {:.2} vs scrambled {:.2}",
        real.perplexity,
        scrambled.perplexity
    );

    // The pick is the choice with the highest log-likelihood, whichever position it holds.
    let item = McqItem {
        id: "q".into(),
        domain: "stem".into(),
        question: "What is the capital of France?".into(),
        choices: vec!["Madrid".into(), "Paris".into(), "Zq xv blorp".into()],
        answer: 1,
    };
    let report = mcq_accuracy(&engine, std::slice::from_ref(&item), &mut |_, _| {}).unwrap();
    let ctx = [Message::user(safetune_eval::utility::mcq_prompt(&item))];
    let lps: Vec<f64> = ["A. Madrid", "B. Paris", "C. Zq xv blorp"]
        .iter()
        .map(|r| response_logprob(&engine, &ctx, r).unwrap().0)
        .collect();
    let best = (0..3).max_by(|&a, &b| lps[a].total_cmp(&lps[b])).unwrap();
    assert_eq!(report.picks, vec![("q".to_string(), best)]);
    assert_eq!(best, 1, "SmolLM2 knows the capital of France: {lps:?}");
    assert_eq!(report.accuracy.count, 1);
    assert!((report.chance - 1.0 / 3.0).abs() < 1e-12);
}
