//! Seeded byte mutations of a tiny model's real files: the GGUF file, model.safetensors, the
//! shard index, config.json, tokenizer.json, tokenizer_config.json and a chat template. Every
//! load ends in `Ok` or an error, never a panic; errors name the file. The allocator refuses
//! any single allocation over 256 MiB (the files are a few hundred kilobytes), which aborts the
//! test: sizes read from headers are checked against the file before anything is allocated.
//! CI runs a bounded count per file; `SAFETUNE_MUTATIONS=N` (or `bench/mutation`) runs more.

use std::path::Path;

use safetune_data::mutate::{iterations, run, CappedAlloc};
use safetune_data::Message;
use safetune_model::testing::TinyModel;
use safetune_model::{ChatTemplate, LoadOptions, LocalEngine};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// A small model: two layers of width 32, so each load takes milliseconds.
fn small() -> TinyModel {
    TinyModel {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..TinyModel::default()
    }
}

/// Loads the model at `target` and renders a chat with its template.
fn load(target: &Path, quantized: bool) -> Result<(), String> {
    let opts = LoadOptions {
        quantized,
        ..LoadOptions::default()
    };
    let e = if target.is_dir() {
        LocalEngine::load_hf_dir(target, &opts)
    } else {
        LocalEngine::load_gguf(target, &opts)
    }
    .map_err(|e| e.to_string())?;
    e.template
        .render(&[Message::user("hi")], true, "", "")
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Mutates `file` (inside `target`, or `target` itself) and loads `target` after each mutant;
/// an error must name `file` (or, for `any_of`, one of those names).
fn mutate_file(target: &Path, file: &Path, seed: u64, default_iters: usize, any_of: &[&str]) {
    let src = std::fs::read(file).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    load(target, false).unwrap();
    let mut k = 0;
    let out = run(
        &name,
        &src,
        seed,
        iterations(default_iters),
        |bytes| {
            std::fs::write(file, bytes).unwrap();
            k += 1;
            load(target, k % 2 == 0)
        },
        |err, what| {
            assert!(
                err.contains(&name) || any_of.iter().any(|n| err.contains(n)),
                "{name} ({what}): error names no file: {err}"
            )
        },
    );
    std::fs::write(file, &src).unwrap();
    assert!(out.err > 0, "{name}: no mutant was refused: {out:?}");
}

#[test]
fn mutated_gguf_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let p = small().write_gguf(&dir.path().join("tiny.gguf")).unwrap();
    // Templates and tokenizers are checked on their own; their errors say what they are.
    mutate_file(&p, &p, 11, 1600, &["chat template", "tokenizer"]);
}

#[test]
fn mutated_safetensors_and_index_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let one = small().write(&dir.path().join("one")).unwrap();
    mutate_file(&one, &one.join("model.safetensors"), 12, 1200, &[]);
    let sharded = TinyModel {
        sharded: true,
        ..small()
    }
    .write(&dir.path().join("sharded"))
    .unwrap();
    // A mutated index may name a missing or different shard, or leave a tensor without one:
    // the error names that file, or the directory.
    let dir_name = sharded.display().to_string();
    mutate_file(
        &sharded,
        &sharded.join("model.safetensors.index.json"),
        13,
        600,
        &[&dir_name],
    );
}

#[test]
fn mutated_config_and_tokenizer_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let m = small().write(&dir.path().join("m")).unwrap();
    // A config that changes a size is caught by the weights' shapes, which name the weights.
    mutate_file(&m, &m.join("config.json"), 14, 800, &["model.safetensors"]);
    mutate_file(&m, &m.join("tokenizer.json"), 15, 600, &[]);
    mutate_file(
        &m,
        &m.join("tokenizer_config.json"),
        16,
        600,
        &["chat template"],
    );
}

#[test]
fn mutated_chat_templates_never_panic() {
    let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let msgs = [
        Message::system("s"),
        Message::user("hi"),
        Message::assistant("yo"),
    ];
    let out = run(
        "template",
        src.as_bytes(),
        17,
        iterations(2400),
        |bytes| {
            let text = String::from_utf8_lossy(bytes);
            let t = ChatTemplate::new(&text).map_err(|e| e.to_string())?;
            t.render(&msgs, true, "<s>", "</s>")
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
        |err, what| assert!(err.contains("chat template"), "({what}): {err}"),
    );
    assert!(out.err > 0 && out.ok > 0, "{out:?}");
}
