//! The real SmolLM2-135M-Instruct (Q4_1 GGUF from the asset cache): tokenizer, chat template,
//! greedy answer, quantized against dequantized. These fail (never skip) if the asset is missing.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{Device, Tensor};
use safetune_data::Message;
use safetune_model::gguf::GgufFile;
use safetune_model::testing::smollm2_gguf;
use safetune_model::*;

fn engine(quantized: bool) -> &'static LocalEngine {
    static F32: OnceLock<LocalEngine> = OnceLock::new();
    static Q: OnceLock<LocalEngine> = OnceLock::new();
    let cell = if quantized { &Q } else { &F32 };
    cell.get_or_init(|| {
        let t = Instant::now();
        let e = LocalEngine::load(
            &ModelSpec::parse(smollm2_gguf().to_str().unwrap()).unwrap(),
            &LoadOptions {
                quantized,
                batch_size: 8,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        println!(
            "loaded SmolLM2 (quantized: {quantized}) in {:.2}s",
            t.elapsed().as_secs_f64()
        );
        e
    })
}

#[test]
fn gguf_config_and_tokenizer() {
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let cfg = g.config().unwrap();
    println!("{cfg:?}");
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (576, 30, 9, 3)
    );
    assert!(cfg.tie_word_embeddings);
    let tok = Tok::from_gguf(&g).unwrap();
    let text = "Héllo wörld! Ça va? naïve café 😀🚀 — fn main() { println!(\"{}\", 42 + 1_000); }\n\tindent\r\n日本語 <|im_start|>";
    let ids = tok.encode(text, false).unwrap();
    println!(
        "{} ids for {} chars: {:?}",
        ids.len(),
        text.chars().count(),
        &ids[..12]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip");
    assert_eq!(
        *ids.last().unwrap(),
        tok.token_to_id("<|im_start|>").unwrap(),
        "special token is one id"
    );
    // SmolLM splits every digit.
    let digits = tok.encode("2024", false).unwrap();
    assert_eq!(digits.len(), 4);
    assert!(tok
        .stop_ids
        .contains(&tok.token_to_id("<|im_end|>").unwrap()));
}

#[test]
fn gguf_chat_template_renders_chatml() {
    let e = engine(true);
    let msgs = vec![
        Message::system("You are a concise assistant."),
        Message::user("What is 2+2?"),
    ];
    let text = e.render_chat(&msgs).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_answer_names_paris() {
    let e = engine(false);
    let req = GenRequest {
        prompt: Prompt::Chat(vec![Message::user("What is the capital of France?")]),
        sampling: Sampling {
            max_new_tokens: 24,
            ..Sampling::default()
        },
    };
    let t = Instant::now();
    let out = e.generate(&[req]).unwrap().remove(0);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "f32 greedy ({} tokens, {:.1} tokens/s): {:?}",
        out.completion_tokens,
        out.completion_tokens as f64 / secs,
        out.text
    );
    assert!(out.text.contains("Paris"), "{out:?}");
}

/// The quantized path multiplies with activations rounded to 8 bits (as llama.cpp does), which
/// moves logits by up to about 1. So agreement is required where the f32 model is decided: its
/// top-2 margin exceeds the largest logit difference between the paths. Near-ties (SmolLM2 opens
/// "What is the capital of France?" with "The" at 25.33 against "L" at 25.24) are printed, not asserted.
#[test]
fn quantized_and_dequantized_agree_on_next_token() {
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "How do I sort a list in Python?",
        "Give me three tips for better sleep.",
        "What is 12 times 12?",
        "Name a primary colour.",
        "Is the sun a star? Answer yes or no.",
    ];
    let (q, f) = (engine(true), engine(false));
    let (mut decided, mut agree) = (0, 0);
    for p in prompts {
        let ids = q.prompt_ids(&Prompt::Chat(vec![Message::user(p)])).unwrap();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let last = |e: &LocalEngine| -> Vec<f32> {
            let h = e.model.forward(&t, None).unwrap(); // (1, T, V)
            h.get(0)
                .unwrap()
                .get(ids.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (lq, lf) = (last(q), last(f));
        let (aq, af) = (generate::argmax(&lq), generate::argmax(&lf));
        let diff = lq
            .iter()
            .zip(&lf)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let mut sorted = lf.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        println!(
            "{p:?}: argmax quantized {:?}, f32 {:?}; f32 top-2 margin {margin:.3}, max |logit diff| {diff:.3}",
            q.tok.decode(&[aq], false).unwrap(),
            f.tok.decode(&[af], false).unwrap()
        );
        if margin > diff {
            decided += 1;
            assert_eq!(
                aq, af,
                "{p:?}: the paths disagree although f32 is decided (margin {margin} > diff {diff})"
            );
        }
        agree += (aq == af) as usize;
    }
    println!(
        "argmax agrees on {agree}/{} prompts; {decided} decided prompts all agree",
        prompts.len()
    );
    assert!(
        decided >= prompts.len() / 2,
        "too few decided prompts ({decided}) for the check to mean anything"
    );
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let src = std::fs::read(smollm2_gguf()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("header-only.gguf", 2_000_000),
        ("half.gguf", src.len() / 2),
        ("tiny.gguf", 100),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &src[..len]).unwrap();
        let err = LocalEngine::load_gguf(&p, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        println!("{name}: {err}");
        assert!(err.contains(name), "{err}");
        assert!(
            err.contains("truncated") || err.contains("not a readable GGUF"),
            "{err}"
        );
    }
}

/// Continuous batching on the real model's quantized blocks: ten chat prompts of very different
/// lengths and answer lengths through a batch of eight (so two prompts take the slots of rows
/// that finish), each answer the one its prompt gets alone.
#[test]
fn continuous_batch_answers_match_one_at_a_time() {
    let e = engine(true);
    let prompts = [
        "Hi",
        "What is the capital of France?",
        "Explain, in a few careful sentences, why the sky looks blue during the day and red at sunset, and what Rayleigh scattering has to do with it.",
        "2+2?",
        "Write a haiku about the sea.",
        "How do I sort a list in Python?",
        "Name a colour.",
        "Give me three tips for better sleep, each on its own line, with a short reason for every tip.",
        "Why?",
        "Translate 'good morning' into French.",
    ];
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            prompt: Prompt::Chat(vec![Message::user(*p)]),
            sampling: Sampling {
                max_new_tokens: [3, 24, 6, 16, 2, 20, 9, 12, 5, 18][i],
                ..Sampling::default()
            },
        })
        .collect();
    assert!(reqs.len() > e.batch_size);
    let together = e.generate(&reqs).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = e.generate(std::slice::from_ref(r)).unwrap();
        assert_eq!(together[i], alone[0], "prompt {i}");
    }
}
