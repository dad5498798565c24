//! How close greedy answers on Q8_0 weights quantized at load are to the f32 path's, and how
//! much faster they come (issue 15, item 4). Not run by CI.
//!
//!     cargo run --release -p safetune --example quantize_agreement -- MODEL [ADAPTER_DIR]
//!
//! MODEL is a Hugging Face directory (e.g. a study's merged aligned model,
//! `STUDY/steps/align-*/merged`) or a GGUF file (dequantized to f32 first, then quantized to
//! Q8_0: a different path from `--quantized`, which keeps the GGUF's own blocks). With
//! ADAPTER_DIR the adapter is merged before quantizing, as a study does for a tuned model.
//! Prompts: the first 32 AdvBench prompts (when fetched) and the first 32 over-refusal probes,
//! 32 new tokens each, greedy, batch 32. Prints one JSON object: the mean common prefix of the
//! first 32 answer tokens (answers re-tokenized), the share of identical answers, and rows/s of
//! each path.

use std::path::PathBuf;
use std::time::Instant;

use safetune_data::prompts::PromptSet;
use safetune_model::backend::{GenRequest, Generator, Prompt, Sampling};
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};

/// Answer token ids, answer texts and rows per second of one path.
type Run = (Vec<Vec<u32>>, Vec<String>, f64);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: quantize_agreement MODEL [ADAPTER_DIR]"))?;
    let adapter = args.get(1).map(PathBuf::from);
    let spec = ModelSpec::parse(model)?;
    let mut prompts = Vec::new();
    if let Ok(set) = PromptSet::load("advbench", None) {
        prompts.extend(set.items.into_iter().take(32).map(|i| i.prompt));
    }
    let probes = PromptSet::load("overrefusal", None)?;
    prompts.extend(
        probes
            .items
            .into_iter()
            .take(64 - prompts.len())
            .map(|i| i.prompt),
    );
    let requests: Vec<GenRequest> = prompts
        .iter()
        .map(|p| GenRequest {
            prompt: Prompt::Chat(vec![safetune_data::Message::user(p.clone())]),
            sampling: Sampling {
                max_new_tokens: 32,
                temperature: 0.0,
                ..Default::default()
            },
        })
        .collect();
    let run = |quantize: bool| -> anyhow::Result<Run> {
        let opts = LoadOptions {
            batch_size: 32,
            adapter: adapter.clone(),
            merge_adapter: adapter.is_some(),
            quantize_dense: quantize,
            ..Default::default()
        };
        let engine = LocalEngine::load(&spec, &opts)?;
        let t = Instant::now();
        let outs = engine.generate(&requests)?;
        let secs = t.elapsed().as_secs_f64();
        let texts: Vec<String> = outs.into_iter().map(|o| o.text).collect();
        let ids = texts
            .iter()
            .map(|t| engine.tok.encode(t, false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((ids, texts, requests.len() as f64 / secs))
    };
    let (ids_f, text_f, rate_f) = run(false)?;
    let (ids_q, text_q, rate_q) = run(true)?;
    let mut prefix_sum = 0usize;
    let mut identical = 0usize;
    for i in 0..requests.len() {
        let (a, b) = (&ids_f[i], &ids_q[i]);
        let n = a.len().min(32).max(b.len().min(32));
        let common = a
            .iter()
            .zip(b.iter())
            .take(32)
            .take_while(|(x, y)| x == y)
            .count();
        // Both answers ended early and agree throughout: the whole (shorter) window is shared.
        prefix_sum += if a == b { 32 } else { common.min(n) };
        identical += usize::from(text_f[i] == text_q[i]);
    }
    let n = requests.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "model": model,
            "adapter": adapter,
            "prompts": requests.len(),
            "mean_common_prefix_of_32": prefix_sum as f64 / n,
            "identical_share": identical as f64 / n,
            "rows_per_s_f32": rate_f,
            "rows_per_s_q8_0": rate_q,
            "speedup": rate_q / rate_f,
        })
    );
    Ok(())
}
