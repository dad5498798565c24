//! A tiny random-weight Llama written by the test itself: shapes, KV cache against the full
//! forward pass, batched left-padded generation against one-at-a-time, sampling determinism,
//! loading errors.

use candle_core::{Device, Tensor};
use safetune_data::Message;
use safetune_model::generate::{self, generate_batch, generate_batch_cancellable, SeqRequest};
use safetune_model::testing::TinyModel;
use safetune_model::weights::SafetensorsFiles;
use safetune_model::*;

fn tiny(dir: &std::path::Path, m: TinyModel) -> LocalEngine {
    m.write(dir).unwrap();
    LocalEngine::load(
        &ModelSpec::parse(dir.to_str().unwrap()).unwrap(),
        &LoadOptions {
            quantized: false,
            batch_size: 8,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny(dir.path(), TinyModel::default());
    let v = e.model.cfg.vocab_size;
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
    let logits = e.model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), &[2, 5, v]);
    let h = e
        .model
        .hidden_states(
            &ids,
            &Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 1, 2, 3, 4]], &Device::Cpu).unwrap(),
            None,
            None,
        )
        .unwrap();
    assert_eq!(h.dims(), &[2, 5, 64]);
}

/// Grouped-query attention; and tied embeddings with q/k/v bias and as many key/value heads as
/// query heads.
fn variants() -> [(&'static str, TinyModel); 2] {
    [
        ("gqa", TinyModel::default()),
        (
            "tied+qkv-bias",
            TinyModel {
                tie_word_embeddings: true,
                attention_bias: true,
                num_key_value_heads: 4,
                seed: 2,
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in variants() {
        let e = tiny(&dir.path().join(name), m);
        let tokens: Vec<u32> = e
            .tok
            .encode("the cat is on the mat, hello world 123", false)
            .unwrap();
        let t = tokens.len();
        let ids = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let full = e.model.forward(&ids, None).unwrap(); // (1, T, V)
        let mut cache = KvCache::new(&e.model.cfg, 1, 4).unwrap(); // small capacity: exercises growth
        let prefix = 5;
        let mut pieces = vec![e
            .model
            .forward(&ids.narrow(1, 0, prefix).unwrap(), Some(&mut cache))
            .unwrap()];
        for i in prefix..t {
            pieces.push(
                e.model
                    .forward(&ids.narrow(1, i, 1).unwrap(), Some(&mut cache))
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let diff = max_abs_diff(&full, &cached);
        println!(
            "[{name}] KV-cache decode vs full forward over {t} tokens: max abs diff {diff:.3e}"
        );
        assert!(diff < 1e-4, "max abs diff {diff}");
    }
}

#[test]
fn batched_left_padded_generation_matches_unbatched() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny(dir.path(), TinyModel::default());
    let prompts = [
        "hi",
        "the quick brown fox jumps over the lazy dog",
        "is this ok?",
        "0123456789 abc",
    ];
    let reqs: Vec<SeqRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SeqRequest {
            prompt_ids: e.tok.encode(p, false).unwrap(),
            sampling: Sampling {
                max_new_tokens: 10 + i,
                ..Sampling::default()
            },
        })
        .collect();
    let mut streamed = vec![String::new(); reqs.len()];
    let batched =
        generate_batch(&e.model, &e.tok, &reqs, &mut |i, s| streamed[i].push_str(s)).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone =
            generate_batch(&e.model, &e.tok, std::slice::from_ref(r), &mut |_, _| {}).unwrap();
        println!(
            "row {i}: {} tokens, {:?}, {:?}",
            batched[i].ids.len(),
            batched[i].finish_reason,
            batched[i].text
        );
        assert_eq!(
            batched[i].ids, alone[0].ids,
            "row {i}: batched and unbatched greedy differ"
        );
        assert_eq!(
            streamed[i], batched[i].text,
            "row {i}: streamed pieces add up to the text"
        );
    }
    // The same through the Generator trait, with chat prompts and sampling.
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .map(|p| GenRequest {
            prompt: Prompt::Chat(vec![Message::system("Be brief."), Message::user(*p)]),
            sampling: Sampling {
                max_new_tokens: 8,
                temperature: 0.8,
                top_p: 0.9,
                top_k: 40,
                seed: 42,
                ..Sampling::default()
            },
        })
        .collect();
    let a = e.generate(&reqs).unwrap();
    let b = e.generate(&reqs).unwrap();
    assert_eq!(a, b, "sampling is deterministic for a seed");
    let single = e.generate(&reqs[1..2]).unwrap();
    assert_eq!(
        single[0], a[1],
        "a row samples the same alone as in a batch"
    );
    let other_seed: Vec<GenRequest> = reqs
        .iter()
        .map(|r| GenRequest {
            sampling: Sampling {
                seed: 43,
                ..r.sampling.clone()
            },
            ..r.clone()
        })
        .collect();
    assert_ne!(
        e.generate(&other_seed).unwrap(),
        a,
        "another seed samples differently"
    );
}

#[test]
fn a_cancelled_row_stops_mid_generation_and_the_others_go_on() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mut e = tiny(dir.path(), TinyModel::default());
    // No stop tokens: left alone, every row runs to its length.
    e.tok.stop_ids.clear();
    let reqs: Vec<SeqRequest> = ["hello there", "the thought is"]
        .iter()
        .map(|p| SeqRequest {
            prompt_ids: e.tok.encode(p, false).unwrap(),
            sampling: Sampling {
                max_new_tokens: 200,
                ..Sampling::default()
            },
        })
        .collect();
    let full = generate_batch(&e.model, &e.tok, &reqs, &mut |_, _| {}).unwrap();
    assert!(full.iter().all(|o| o.ids.len() == 200), "{full:?}");

    // Row 0's flag is set from inside the decode loop once row 0 has streamed 5 pieces.
    let flag = AtomicBool::new(false);
    let pieces = AtomicUsize::new(0);
    let polls = AtomicUsize::new(0);
    let out = generate_batch_cancellable(
        &e.model,
        &e.tok,
        &reqs,
        &mut |i, _| {
            if i == 0 && pieces.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                flag.store(true, Ordering::SeqCst);
            }
        },
        &|i| {
            if i == 0 {
                polls.fetch_add(1, Ordering::SeqCst);
            }
            i == 0 && flag.load(Ordering::SeqCst)
        },
    )
    .unwrap();
    let stopped = &out[0];
    println!(
        "row 0: {} of 200 tokens, {:?}; row 1: {} tokens, {:?}",
        stopped.ids.len(),
        stopped.finish_reason,
        out[1].ids.len(),
        out[1].finish_reason
    );
    assert_eq!(stopped.finish_reason, FinishReason::Cancelled);
    assert!(
        !stopped.ids.is_empty() && stopped.ids.len() < 20,
        "row 0 generated {} of 200 tokens after its flag was set",
        stopped.ids.len()
    );
    // Polled before every token: the loop stopped at the first poll after the flag was set.
    let polls = polls.load(Ordering::SeqCst);
    assert_eq!(polls, stopped.ids.len() + 2, "polls {polls}");
    assert_eq!(
        stopped.ids,
        full[0].ids[..stopped.ids.len()],
        "what row 0 generated before it stopped is what it generates uncancelled"
    );
    // The other row is untouched by its neighbour leaving the batch.
    assert_eq!(out[1], full[1]);

    // Rows cancelled before they start generate nothing (and skip the prefill).
    let none =
        generate_batch_cancellable(&e.model, &e.tok, &reqs, &mut |_, _| {}, &|_| true).unwrap();
    assert!(none
        .iter()
        .all(|o| o.ids.is_empty() && o.finish_reason == FinishReason::Cancelled));

    // Through the Generator trait: the index asked about is the request's own, not its
    // position in the engine's (length-sorted) batches.
    let gen: Vec<GenRequest> = ["a much longer prompt than the other", "hi"]
        .iter()
        .map(|p| GenRequest {
            prompt: Prompt::Text(p.to_string()),
            sampling: Sampling {
                max_new_tokens: 50,
                ..Sampling::default()
            },
        })
        .collect();
    let outs = e
        .generate_cancellable(&gen, &mut |_, _| {}, &|i| i == 0)
        .unwrap();
    assert_eq!(outs[0].finish_reason, FinishReason::Cancelled);
    assert_eq!(outs[0].completion_tokens, 0);
    assert_eq!(outs[1].finish_reason, FinishReason::Length);
    assert_eq!(outs[1].completion_tokens, 50);
}

#[test]
fn stop_strings_cut_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny(dir.path(), TinyModel::default());
    let req = GenRequest {
        prompt: Prompt::Text("hello".into()),
        sampling: Sampling {
            max_new_tokens: 20,
            ..Sampling::default()
        },
    };
    let free = e.generate(std::slice::from_ref(&req)).unwrap().remove(0);
    assert!(free.text.chars().count() > 3, "{free:?}");
    // Stop on the third character of the free-running output.
    let stop: String = free.text.chars().skip(2).take(1).collect();
    let cut_at = free.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let stopped = e
        .generate_streaming(
            &[GenRequest {
                sampling: Sampling {
                    stop: vec![stop.clone()],
                    ..req.sampling.clone()
                },
                ..req
            }],
            &mut |_, s| streamed.push_str(s),
        )
        .unwrap()
        .remove(0);
    assert_eq!(stopped.text, free.text[..cut_at]);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(streamed, stopped.text);
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let one = tiny(&dir.path().join("one"), TinyModel::default());
    let two = tiny(
        &dir.path().join("two"),
        TinyModel {
            sharded: true,
            ..Default::default()
        },
    );
    assert!(dir
        .path()
        .join("two/model.safetensors.index.json")
        .is_file());
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5]], &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &one.model.forward(&ids, None).unwrap(),
        &two.model.forward(&ids, None).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn wrong_shapes_and_missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let files =
        SafetensorsFiles::open(&SafetensorsFiles::find_in_dir(dir.path()).unwrap()).unwrap();
    let w = Weights::from_safetensors(files);
    let cfg = Config::from_hf_file(&dir.path().join("config.json")).unwrap();
    let bad = Config {
        intermediate_size: 100,
        ..cfg.clone()
    };
    let e = Llama::load(&w, &bad).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[128, 64]")
            && e.contains("[100, 64]"),
        "{e}"
    );
    let more = Config {
        num_hidden_layers: 3,
        ..cfg
    };
    let e = Llama::load(&w, &more).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains("model.layers.2.") && e.contains("not found") && e.contains("model.safetensors"),
        "{e}"
    );
    let e = LocalEngine::load_gguf(&dir.path().join("config.json"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("GGUF"), "{e}");
}

#[test]
fn generation_job_resumes_with_the_local_engine() {
    use safetune_model::job::{read_prompts, run_generation, JobOptions};
    let dir = tempfile::tempdir().unwrap();
    let e = tiny(&dir.path().join("m"), TinyModel::default());
    let prompts_path = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts_path,
        "{\"id\": \"a\", \"prompt\": \"hello\"}\n{\"id\": \"b\", \"prompt\": \"the cat\", \"system\": \"Be brief.\"}\n{\"id\": \"c\", \"messages\": [{\"role\": \"user\", \"content\": \"is it?\"}]}\n",
    )
    .unwrap();
    let prompts = read_prompts(&prompts_path).unwrap();
    let out = dir.path().join("gen.jsonl");
    let opts = JobOptions {
        sampling: Sampling {
            max_new_tokens: 6,
            temperature: 0.7,
            seed: 3,
            ..Sampling::default()
        },
        batch_size: 2,
        raw: false,
    };
    let full = run_generation(&e, &prompts, &out, &opts, &mut |_| {}).unwrap();
    assert_eq!(full.done, 3);
    let all = std::fs::read_to_string(&out).unwrap();
    // Keep the first row only, as if killed after it; the rerun must write the same rows.
    let first = all.lines().next().unwrap().to_string() + "\n";
    std::fs::write(&out, &first).unwrap();
    let resumed = run_generation(&e, &prompts, &out, &opts, &mut |_| {}).unwrap();
    assert_eq!((resumed.skipped, resumed.done), (1, 2));
    // Rows are written in the order they finish: compare them as sets.
    let sorted = |text: &str| {
        let mut v: Vec<String> = text.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(
        sorted(&std::fs::read_to_string(&out).unwrap()),
        sorted(&all),
        "a resumed run writes what an uninterrupted one did"
    );
    let row: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    assert_eq!(row["id"], "a");
    assert!(row["completion_tokens"].as_u64().unwrap() >= 1);
}

#[test]
fn decode_benchmark_runs_exactly_the_asked_tokens_through_the_generation_loop() {
    use safetune_model::bench::{decode_throughput, synthetic_prompts};
    let dir = tempfile::tempdir().unwrap();
    let mut e = tiny(dir.path(), TinyModel::default());
    let prompts = synthetic_prompts(&e.tok, 3, 20).unwrap();
    assert_eq!(prompts.len(), 3);
    assert!(prompts.iter().all(|p| p.len() == 20));
    assert_ne!(prompts[0], prompts[1]);
    // Every token stops a row in normal generation; the benchmark must still run 7 tokens.
    e.tok.stop_ids = (0..e.model.cfg.vocab_size as u32).collect();
    let run = decode_throughput(&e.model, &e.tok, &prompts, 7).unwrap();
    assert_eq!((run.batch, run.prompt_tokens, run.new_tokens), (3, 20, 7));
    assert!(run.output_ids.iter().all(|ids| ids.len() == 7));
    assert!(run.prefill_s > 0.0 && run.decode_s > 0.0);
    assert!((run.decode_tokens_per_s - 21.0 / run.decode_s).abs() < 1e-6 * run.decode_tokens_per_s);
    // The same greedy tokens as the ordinary generation loop without stop tokens.
    let mut free = e.tok.clone();
    free.stop_ids.clear();
    let reqs: Vec<SeqRequest> = prompts
        .iter()
        .map(|p| SeqRequest {
            prompt_ids: p.clone(),
            sampling: Sampling {
                max_new_tokens: 7,
                ..Sampling::default()
            },
        })
        .collect();
    let (out, timing) =
        safetune_model::generate::generate_batch_timed(&e.model, &free, &reqs, &mut |_, _| {})
            .unwrap();
    let ids: Vec<Vec<u32>> = out.into_iter().map(|o| o.ids).collect();
    assert_eq!(ids, run.output_ids);
    assert_eq!((timing.decode_steps, timing.new_tokens), (6, 21));
    // Unequal prompt lengths are refused, with the row named.
    let err = decode_throughput(&e.model, &e.tok, &[vec![1, 2, 3], vec![1, 2]], 2).unwrap_err();
    assert!(err.to_string().contains("prompt 1 has 2 tokens"), "{err}");
}

#[test]
fn decode_step_matches_the_tensor_path_with_padding_and_cache_growth() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in variants() {
        let e = tiny(&dir.path().join(name), m);
        let cfg = &e.model.cfg;
        // Two rows, the second left-padded by 2: prefill (2, 6), then three one-token steps.
        let (b, l, pad) = (2usize, 6usize, 2usize);
        let ids: Vec<u32> = vec![5, 9, 14, 3, 7, 11, 0, 0, 20, 4, 8, 2];
        let pos: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 0, 0, 0, 1, 2, 3];
        let mut mask = vec![0f32; b * l * l];
        for r in 0..b {
            for i in 0..l {
                for j in 0..l {
                    if j > i || (r == 1 && j < pad) {
                        mask[(r * l + i) * l + j] = llama::MASK_VALUE;
                    }
                }
            }
        }
        let t = |v: Vec<u32>, s: (usize, usize)| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
        let mask_t = Tensor::from_vec(mask, (b, 1, l, l), &Device::Cpu).unwrap();
        // Capacity 7: the second step grows the cache on both paths.
        let mut c_tensor = KvCache::new(cfg, b, 7).unwrap();
        let mut c_raw = KvCache::new(cfg, b, 7).unwrap();
        for c in [&mut c_tensor, &mut c_raw] {
            e.model
                .hidden_states(
                    &t(ids.clone(), (b, l)),
                    &t(pos.clone(), (b, l)),
                    Some(&mask_t),
                    Some(c),
                )
                .unwrap();
        }
        for step in 0..3u32 {
            let s = l + 1 + step as usize;
            let step_ids = vec![17 + step, 30 + step];
            let step_pos = vec![6 + step, 4 + step];
            let mut step_mask = vec![0f32; b * s];
            step_mask[s] = llama::MASK_VALUE;
            step_mask[s + 1] = llama::MASK_VALUE;
            let want = e
                .model
                .hidden_states(
                    &t(step_ids.clone(), (b, 1)),
                    &t(step_pos.clone(), (b, 1)),
                    Some(&Tensor::from_vec(step_mask.clone(), (b, 1, 1, s), &Device::Cpu).unwrap()),
                    Some(&mut c_tensor),
                )
                .unwrap();
            let got = e
                .model
                .decode_step(&step_ids, &step_pos, &step_mask, &mut c_raw)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(&got, &want);
            println!("[{name}] decode_step vs hidden_states, step {step}: max abs diff {diff:.3e}");
            assert!(diff < 1e-4, "[{name}] step {step}: {diff}");
            assert_eq!(c_raw.len(), s);
        }
        // Wrong sizes are refused instead of reading out of bounds.
        assert!(e
            .model
            .decode_step(&[1], &[9], &[0.0; 10], &mut c_raw)
            .is_err());
        assert!(e
            .model
            .decode_step(&[1, 2], &[9, 9], &[0.0; 3], &mut c_raw)
            .is_err());
    }
}

/// A fixed list of requests for `generate_continuous` that records when each one starts and
/// ends, to check that a waiting prompt takes a freed slot while other rows still run.
struct RecordingFeed {
    waiting: std::collections::VecDeque<(usize, generate::SeqRequest)>,
    out: Vec<Option<generate::SeqOutput>>,
    streamed: Vec<String>,
    running: usize,
    most_running: usize,
    /// Prompts that started while at least one earlier prompt was still running, after some
    /// prompt had finished: joins into a running batch.
    joined_running: usize,
    finished: usize,
}

impl generate::SeqFeed for RecordingFeed {
    fn next(&mut self) -> Option<(usize, SeqRequest)> {
        let item = self.waiting.pop_front()?;
        if self.finished > 0 && self.running > 0 {
            self.joined_running += 1;
        }
        self.running += 1;
        self.most_running = self.most_running.max(self.running);
        Some(item)
    }
    fn piece(&mut self, key: usize, piece: &str) {
        self.streamed[key].push_str(piece);
    }
    fn done(&mut self, key: usize, out: generate::SeqOutput) {
        assert!(self.out[key].is_none(), "request {key} finished twice");
        self.out[key] = Some(out);
        self.running -= 1;
        self.finished += 1;
    }
}

#[test]
fn continuous_batching_refills_freed_slots_and_matches_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in variants() {
        let mut e = tiny(&dir.path().join(name), m);
        // No stop tokens: every row runs to its own length, so the lengths below decide when
        // slots free up (a mix of short and long answers behind long and short prompts).
        e.tok.stop_ids.clear();
        let prompts = [
            "hi",
            "the quick brown fox jumps over the lazy dog and keeps on running far away",
            "ok",
            "0123456789 abc",
            "a much longer prompt than the others, with many words in it, to make padding matter",
            "x",
            "is this ok?",
            "seven",
            "what about a medium one",
            "z z z z z z z z z z z z z z z z",
            "last",
        ];
        let lens = [1usize, 23, 4, 17, 2, 30, 9, 12, 1, 6, 20];
        let reqs: Vec<SeqRequest> = prompts
            .iter()
            .zip(lens)
            .enumerate()
            .map(|(i, (p, n))| SeqRequest {
                prompt_ids: e.tok.encode(p, false).unwrap(),
                sampling: Sampling {
                    max_new_tokens: n,
                    // Rows 2 and 7 sample; the rest are greedy.
                    temperature: if i % 5 == 2 { 0.9 } else { 0.0 },
                    seed: i as u64,
                    ..Sampling::default()
                },
            })
            .collect();
        let mut feed = RecordingFeed {
            waiting: reqs.iter().cloned().enumerate().collect(),
            out: vec![None; reqs.len()],
            streamed: vec![String::new(); reqs.len()],
            running: 0,
            most_running: 0,
            joined_running: 0,
            finished: 0,
        };
        let timing = generate::generate_continuous(&e.model, &e.tok, 3, &mut feed).unwrap();
        assert_eq!(
            feed.most_running, 3,
            "[{name}] at most the batch size at once"
        );
        assert!(
            feed.joined_running >= 5,
            "[{name}] waiting prompts join while other rows run: {}",
            feed.joined_running
        );
        let total: usize = lens.iter().sum();
        assert_eq!(timing.new_tokens, total, "[{name}]");
        // Fewer decode steps than static batches of 3 would take (each as long as its longest row).
        let static_steps: usize = lens.chunks(3).map(|c| c.iter().max().unwrap() - 1).sum();
        assert!(
            timing.decode_steps < static_steps,
            "[{name}] {} decode steps, static batches take {static_steps}",
            timing.decode_steps
        );
        for (i, r) in reqs.iter().enumerate() {
            let got = feed.out[i].as_ref().unwrap();
            let alone =
                generate_batch(&e.model, &e.tok, std::slice::from_ref(r), &mut |_, _| {}).unwrap();
            assert_eq!(got.ids.len(), lens[i], "[{name}] row {i}");
            assert_eq!(
                got, &alone[0],
                "[{name}] row {i}: continuous batch and one at a time differ"
            );
            assert_eq!(
                feed.streamed[i], got.text,
                "[{name}] row {i}: streamed text"
            );
        }
    }
}

/// Through the `Generator` trait: more prompts than the batch, chat prompts of very different
/// lengths, stop tokens kept; each answer as when its prompt is generated alone.
#[test]
fn engine_answers_do_not_depend_on_the_batch_they_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = tiny(dir.path(), TinyModel::default());
    e.batch_size = 2;
    let reqs: Vec<GenRequest> = (0..7)
        .map(|i| GenRequest {
            prompt: Prompt::Chat(vec![Message::user("word ".repeat(1 + 9 * (i % 3)))]),
            sampling: Sampling {
                max_new_tokens: 3 + 5 * (i % 4),
                ..Sampling::default()
            },
        })
        .collect();
    let together = e.generate(&reqs).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = e.generate(std::slice::from_ref(r)).unwrap();
        assert_eq!(together[i], alone[0], "request {i}");
    }
}
