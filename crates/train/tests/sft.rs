//! The SFT data pipeline: assistant-only labels, truncation, batching and packing.

mod common;

use safetune_data::{Conversation, Message};
use safetune_train::sft::{make_batch, plan_epoch, show_masks, Encoded, Encoder, Layout, IGNORE};

fn two_turns() -> Conversation {
    Conversation::new(
        "c1",
        vec![
            Message::system("Be brief."),
            Message::user("Hi there"),
            Message::assistant("Hello!"),
            Message::user("Name a color"),
            Message::assistant("Blue."),
        ],
    )
}

#[test]
fn two_turn_conversation_trains_on_both_answers_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let enc = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: 512,
    };
    let e = enc.encode(&two_turns()).unwrap();
    let shown = show_masks(&engine.tok, &e).unwrap();
    println!("{shown}");
    assert_eq!(
        shown,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\n[[Blue.<|im_end|>]]\n"
    );
    // The trained tokens decode to exactly the answers and their end-of-turn tokens.
    let trained: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        engine.tok.decode(&trained, false).unwrap(),
        "Hello!<|im_end|>Blue.<|im_end|>"
    );
    assert_eq!(e.truncated, 0);
    // The token ids are those of the rendered text: nothing added, nothing lost.
    let text = engine
        .template
        .render(&two_turns().messages, false, "", "<|im_end|>")
        .unwrap();
    assert_eq!(e.ids, engine.tok.encode(&text, false).unwrap());
}

#[test]
fn truncation_keeps_the_start_and_drops_examples_left_without_answers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let full = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: 10_000,
    }
    .encode(&two_turns())
    .unwrap();
    let first_trained = full.trained.iter().position(|&t| t).unwrap();
    let short = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: first_trained + 3,
    };
    let e = short.encode(&two_turns()).unwrap();
    assert_eq!(e.ids, full.ids[..first_trained + 3]);
    assert_eq!(e.trained, full.trained[..first_trained + 3]);
    assert_eq!(e.truncated, full.len() - first_trained - 3);
    // Cut before the first answer: nothing to train, so the example is dropped and counted.
    let none = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: first_trained,
    };
    let (kept, stats) = none.encode_all(&[two_turns()]).unwrap();
    assert!(kept.is_empty());
    assert_eq!((stats.dropped_empty, stats.truncated), (1, 1));
    // The longest example is counted before the cut: the max_len that would fit it.
    assert_eq!(stats.longest, full.len());
}

#[test]
fn a_conversation_without_an_answer_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = common::tiny_engine(dir.path());
    let enc = Encoder {
        tok: &engine.tok,
        template: &engine.template,
        max_len: 64,
    };
    let err = enc
        .encode(&Conversation::new("lonely", vec![Message::user("hi")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lonely") && err.contains("no assistant"),
        "{err}"
    );
}

fn fake(lengths: &[usize]) -> Vec<Encoded> {
    lengths
        .iter()
        .enumerate()
        .map(|(k, &n)| Encoded {
            id: format!("e{k}"),
            ids: (0..n as u32).map(|i| 10 + i + 100 * k as u32).collect(),
            trained: (0..n).map(|i| i >= n / 2).collect(),
            truncated: 0,
        })
        .collect()
}

#[test]
fn grouped_plan_covers_every_example_once_with_similar_lengths_together() {
    let lengths: Vec<usize> = (0..50).map(|i| 3 + (i * 7) % 40).collect();
    let plan = plan_epoch(&lengths, 4, Layout::Grouped, 1, 0);
    let mut seen: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    assert!(plan
        .iter()
        .all(|b| b.len() <= 4 && b.iter().all(|r| r.len() == 1)));
    // Length-grouped: padding is far below that of random batches.
    let padding = |plan: &Vec<Vec<Vec<usize>>>| -> usize {
        plan.iter()
            .map(|b| {
                let ls: Vec<usize> = b.iter().map(|r| lengths[r[0]]).collect();
                let max = *ls.iter().max().unwrap();
                ls.iter().map(|l| max - l).sum::<usize>()
            })
            .sum()
    };
    let random: Vec<Vec<Vec<usize>>> = (0..50)
        .collect::<Vec<_>>()
        .chunks(4)
        .map(|c| c.iter().map(|&i| vec![i]).collect())
        .collect();
    assert!(
        padding(&plan) * 3 < padding(&random),
        "{} vs {}",
        padding(&plan),
        padding(&random)
    );
    // A pure function of (seed, epoch); epochs differ.
    assert_eq!(plan, plan_epoch(&lengths, 4, Layout::Grouped, 1, 0));
    assert_ne!(plan, plan_epoch(&lengths, 4, Layout::Grouped, 1, 1));
}

#[test]
fn packed_batches_fill_rows_and_restart_positions() {
    let ex = fake(&[5, 3, 4, 2, 6]);
    let lengths: Vec<usize> = ex.iter().map(|e| e.len()).collect();
    let plan = plan_epoch(&lengths, 2, Layout::Packed { max_len: 8 }, 3, 0);
    let mut seen: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    for b in &plan {
        for row in b {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 8);
        }
    }
    // One row of two examples: labels never cross from one example into the next.
    let batch = make_batch(&ex, &[vec![1, 3]], 0).unwrap();
    assert_eq!((batch.b, batch.t), (1, 5));
    let pos: Vec<u32> = batch.positions.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(pos, vec![0, 1, 2, 0, 1]);
    // Example 1 (ids 110,111,112; trained from index 1), example 3 (ids 310,311; from 1).
    assert_eq!(batch.labels, vec![111, 112, IGNORE, 311, IGNORE]);
    assert_eq!(batch.n_tokens, 3);
    let mask: Vec<Vec<f32>> = batch
        .mask
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, row) in mask.iter().enumerate() {
        for (j, &m) in row.iter().enumerate() {
            let visible = j <= i && ((i < 3) == (j < 3));
            assert_eq!(m == 0.0, visible, "mask[{i}][{j}] = {m}");
        }
    }
}

#[test]
fn padded_rows_carry_no_labels() {
    let ex = fake(&[5, 2]);
    let b = make_batch(&ex, &[vec![0], vec![1]], 999).unwrap();
    assert_eq!((b.b, b.t), (2, 5));
    let ids: Vec<u32> = b.ids.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&ids[5..], &[110, 111, 999, 999, 999]);
    assert_eq!(&b.labels[5..], &[111, IGNORE, IGNORE, IGNORE, IGNORE]);
    assert_eq!(b.n_input, 7);
}
