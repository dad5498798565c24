//! Fixtures shared by the training tests: the tiny random model and small datasets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetune_data::{Conversation, Message};
use safetune_model::testing::TinyModel;
use safetune_model::{LoadOptions, LocalEngine};

pub fn tiny_dir(dir: &Path) -> PathBuf {
    TinyModel::default().write(&dir.join("tiny")).unwrap()
}

pub fn tiny_engine(dir: &Path) -> LocalEngine {
    LocalEngine::load_hf_dir(&tiny_dir(dir), &LoadOptions::default()).unwrap()
}

/// A few short conversations with learnable, repeated answers.
pub fn conversations(n: usize) -> Vec<Conversation> {
    let answers = [
        "the cat sat on the mat",
        "hello there, how is it",
        "this is the house",
        "out of the blue",
    ];
    (0..n)
        .map(|i| {
            let mut msgs = vec![
                Message::user(format!("say {}", i % answers.len())),
                Message::assistant(answers[i % answers.len()]),
            ];
            if i % 3 == 2 {
                msgs.push(Message::user("again"));
                msgs.push(Message::assistant(answers[(i + 1) % answers.len()]));
            }
            Conversation::new(format!("ex{i}"), msgs)
        })
        .collect()
}

/// Writes conversations as messages JSONL.
pub fn write_jsonl(path: &Path, convs: &[Conversation]) {
    let mut s = String::new();
    for c in convs {
        let msgs: Vec<serde_json::Value> = c
            .messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        s.push_str(&serde_json::json!({"id": c.id, "messages": msgs}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}
