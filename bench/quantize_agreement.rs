//! How close greedy answers on Q8_0 weights quantized at load, and on bf16 weights (the AMX
//! kernel, where the CPU has AMX-BF16), are to the f32 path's, and how much faster they come
//! (issue 15, items 2 and 4). Not run by CI.
//!
//!     cargo run --release -p safetune --example quantize_agreement -- MODEL [ADAPTER_DIR]
//!
//! MODEL is a Hugging Face directory (e.g. a study's merged aligned model,
//! `STUDY/steps/align-*/merged`) or a GGUF file (dequantized to f32 first, then quantized to
//! Q8_0 or rounded to bf16: a different path from `--quantized`, which keeps the GGUF's own
//! blocks). With ADAPTER_DIR the adapter is merged first, as a study does for a tuned model.
//! Prompts: the first 32 AdvBench prompts (when fetched) and the first 32 over-refusal probes,
//! 32 new tokens each, greedy, batch 32. Prints one JSON object: the CPU model and ISA, and for
//! Q8_0 and bf16 each the mean common prefix with the f32 answers of the first 32 answer tokens
//! (answers re-tokenized), the share of identical answers, rows/s and the speed-up over f32.
//! On a CPU without AMX-BF16 the bf16 part says why it could not run.

use std::path::PathBuf;
use std::time::Instant;

use safetune_data::prompts::PromptSet;
use safetune_model::backend::{GenRequest, Generator, Prompt, Sampling};
use safetune_model::bench::cpu_model;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use serde_json::json;

/// Answer token ids, answer texts and rows per second of one path.
type Run = (Vec<Vec<u32>>, Vec<String>, f64);

#[derive(Clone, Copy, PartialEq)]
enum Weights {
    F32,
    Q8_0,
    Bf16,
}

/// The mean common prefix of the first 32 tokens and the share of identical answers.
fn agreement(exact: &Run, other: &Run) -> (f64, f64) {
    let n = exact.0.len();
    let mut prefix_sum = 0usize;
    let mut identical = 0usize;
    for i in 0..n {
        let (a, b) = (&exact.0[i], &other.0[i]);
        let window = a.len().min(32).max(b.len().min(32));
        let common = a
            .iter()
            .zip(b.iter())
            .take(32)
            .take_while(|(x, y)| x == y)
            .count();
        // Both answers ended early and agree throughout: the whole (shorter) window is shared.
        prefix_sum += if a == b { 32 } else { common.min(window) };
        identical += usize::from(exact.1[i] == other.1[i]);
    }
    (prefix_sum as f64 / n as f64, identical as f64 / n as f64)
}

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
    let run = |weights: Weights| -> anyhow::Result<Run> {
        let opts = LoadOptions {
            batch_size: 32,
            adapter: adapter.clone(),
            merge_adapter: adapter.is_some(),
            quantize_dense: weights == Weights::Q8_0,
            bf16: weights == Weights::Bf16,
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
    let exact = run(Weights::F32)?;
    let q8 = run(Weights::Q8_0)?;
    let (prefix_q, identical_q) = agreement(&exact, &q8);
    let bf16 = match safetune_model::bf16::bf16_unavailable() {
        Some(why) => json!({ "unavailable": why }),
        None => {
            let b = run(Weights::Bf16)?;
            let (prefix, identical) = agreement(&exact, &b);
            json!({
                "mean_common_prefix_of_32": prefix,
                "identical_share": identical,
                "rows_per_s": b.2,
                "speedup": b.2 / exact.2,
            })
        }
    };
    let isa = safetune_model::isa::Isa::detect();
    println!(
        "{}",
        json!({
            "model": model,
            "adapter": adapter,
            "cpu": cpu_model(),
            "isa": isa.name(),
            "amx_bf16": safetune_model::bf16::amx_available(),
            "threads": std::thread::available_parallelism().map_or(1, usize::from),
            "prompts": requests.len(),
            "rows_per_s_f32": exact.2,
            "q8_0": {
                "mean_common_prefix_of_32": prefix_q,
                "identical_share": identical_q,
                "rows_per_s": q8.2,
                "speedup": q8.2 / exact.2,
            },
            "bf16": bf16,
        })
    );
    Ok(())
}
