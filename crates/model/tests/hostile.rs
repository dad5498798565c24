//! Crafted model files: each case used to panic or load silently and is now an error naming
//! the file and the field or tensor.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use safetune_model::gguf::GgufFile;
use safetune_model::testing::TinyModel;
use safetune_model::weights::SafetensorsFiles;
use safetune_model::{LoadOptions, LocalEngine};

/// The error names the file and the field (or tensor) at fault.
#[track_caller]
fn assert_names(err: &str, file: &str, what: &str) {
    assert!(err.contains(file) && err.contains(what), "{err}");
}

/// A GGUF file written byte by byte: version 3, `meta` as (key, type id, value bytes) and
/// tensors as (name, dims, ggml type, offset), then `data` zero bytes of tensor data.
fn raw_gguf(
    meta: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data: usize,
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    for (k, ty, v) in meta {
        string(&mut b, k);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(v);
    }
    for (name, dims, ty, offset) in tensors {
        string(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.resize(b.len() + data, 0);
    b
}

fn arch() -> (&'static str, u32, Vec<u8>) {
    let mut v = 5u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"llama");
    ("general.architecture", 8, v)
}

/// Rewrites the tiny GGUF with `edit` applied to its metadata and tensors.
fn edited_gguf(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) -> PathBuf {
    let src = TinyModel::default()
        .write_gguf(&dir.join("src.gguf"))
        .unwrap();
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut meta, &mut tensors);
    let out = dir.join(name);
    let mut w = std::fs::File::create(&out).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &m, &t).unwrap();
    out
}

fn set(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

#[test]
fn the_tiny_gguf_loads_like_the_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let m = TinyModel::default();
    let g = m.write_gguf(&dir.path().join("tiny.gguf")).unwrap();
    let hf = m.write(&dir.path().join("hf")).unwrap();
    let a = LocalEngine::load_gguf(&g, &LoadOptions::default()).unwrap();
    let b = LocalEngine::load_hf_dir(&hf, &LoadOptions::default()).unwrap();
    assert_eq!(a.model.cfg.hidden_size, b.model.cfg.hidden_size);
    assert_eq!(a.model.cfg.vocab_size, b.model.cfg.vocab_size);
    assert_eq!(
        a.model.cfg.num_key_value_heads,
        b.model.cfg.num_key_value_heads
    );
}

#[test]
fn gguf_alignment_zero_is_an_error_not_a_division_by_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("align0.gguf");
    std::fs::write(
        &p,
        raw_gguf(
            &[
                arch(),
                ("general.alignment", 4, 0u32.to_le_bytes().to_vec()),
            ],
            &[],
            0,
        ),
    )
    .unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert_names(&err, "align0.gguf", "general.alignment");
}

#[test]
fn gguf_tensor_sizes_that_overflow_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.gguf");
    let dims: &[u64] = &[1 << 40, 1 << 40];
    std::fs::write(
        &p,
        raw_gguf(&[arch()], &[("token_embd.weight", dims, 0, 0)], 64),
    )
    .unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert_names(&err, "huge.gguf", "token_embd.weight");
    // A Q4_0 tensor whose element count times its block bytes overflows.
    let dims: &[u64] = &[32, u64::MAX / 16];
    std::fs::write(
        &p,
        raw_gguf(&[arch()], &[("token_embd.weight", dims, 2, 0)], 64),
    )
    .unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert_names(&err, "huge.gguf", "token_embd.weight");
}

#[test]
fn gguf_tensor_without_dimensions_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("scalar.gguf");
    // Every size the config needs, but no vocabulary size anywhere except the embedding,
    // which has no dimensions (this used to index its first dimension and panic).
    let u32v = |k: &'static str, v: u32| (k, 4u32, v.to_le_bytes().to_vec());
    let meta = [
        arch(),
        u32v("llama.embedding_length", 64),
        u32v("llama.attention.head_count", 4),
        u32v("llama.feed_forward_length", 128),
        u32v("llama.block_count", 1),
    ];
    std::fs::write(&p, raw_gguf(&meta, &[("token_embd.weight", &[], 0, 0)], 64)).unwrap();
    let err = match GgufFile::open(&p) {
        Ok(g) => g.config().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert_names(&err, "scalar.gguf", "token_embd.weight");
}

#[test]
fn gguf_head_count_kv_zero_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_gguf(dir.path(), "kv0.gguf", |meta, _| {
        set(meta, "llama.attention.head_count_kv", Value::U32(0))
    });
    let err = GgufFile::open(&p)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert_names(&err, "kv0.gguf", "head_count_kv");
    let err = LocalEngine::load_gguf(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert_names(&err, "kv0.gguf", "head_count_kv");
}

#[test]
fn gguf_heads_that_do_not_divide_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_gguf(dir.path(), "kv3.gguf", |meta, _| {
        set(meta, "llama.attention.head_count_kv", Value::U32(3))
    });
    let err = GgufFile::open(&p)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert_names(&err, "kv3.gguf", "head_count_kv");
}

#[test]
fn safetensors_index_cannot_point_outside_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    TinyModel {
        sharded: true,
        ..TinyModel::default()
    }
    .write(&model)
    .unwrap();
    let index_path = model.join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    // The shard moved next to the directory, the index pointing at it.
    std::fs::rename(
        model.join("model-00001-of-00002.safetensors"),
        dir.path().join("outside.safetensors"),
    )
    .unwrap();
    let outside = dir.path().join("outside.safetensors");
    for target in [
        "../outside.safetensors".to_string(),
        outside.display().to_string(),
    ] {
        std::fs::write(
            &index_path,
            original.replace("model-00001-of-00002.safetensors", &target),
        )
        .unwrap();
        let err = SafetensorsFiles::find_in_dir(&model)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains("not a file inside the model directory"),
            "{target}: {err}"
        );
        assert!(LocalEngine::load_hf_dir(&model, &LoadOptions::default()).is_err());
    }
    // Plain names inside the directory still load.
    std::fs::rename(&outside, model.join("model-00001-of-00002.safetensors")).unwrap();
    std::fs::write(&index_path, &original).unwrap();
    LocalEngine::load_hf_dir(&model, &LoadOptions::default()).unwrap();
}

#[test]
fn unusable_config_values_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::default().write(&dir.path().join("m")).unwrap();
    let cfg_path = model.join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("max_position_embeddings", serde_json::json!(0)),
        ("vocab_size", serde_json::json!(0)),
    ] {
        let mut c = cfg.clone();
        c[field] = value;
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let err = LocalEngine::load_hf_dir(&model, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(field),
            "{field}: {err}"
        );
    }
}
