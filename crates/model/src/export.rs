//! Writes a loaded model as a Hugging Face directory: `config.json`, `model.safetensors` with the
//! checkpoint's key names, and the tokenizer (`tokenizer.json`, `tokenizer_config.json` with the
//! chat template). Layers carrying an unmerged LoRA adapter are written merged, so the directory
//! holds exactly what the model computes. Used by `safetune merge`.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value as Json};

use crate::adapter::{linears, write_files_atomically, write_safetensors};
use crate::config::{Arch, Config, RopeScaling};
use crate::error::{CandleContext, ModelError, Result};
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::weights::Linear;

/// Files copied from a Hugging Face base directory when present (tokenizer and generation
/// settings; the weights and config.json are written anew).
pub const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
];

/// What [`write_hf_dir`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub tensors: usize,
    pub parameters: usize,
    /// The LM head shares the embedding matrix (no `lm_head.weight` written).
    pub tied: bool,
    pub files: Vec<String>,
}

/// The weight a linear layer applies, with an unmerged adapter folded in: (out, in).
pub fn effective_weight(l: &Linear) -> Result<Tensor> {
    let w = l
        .dense_weight()
        .ctx(|| format!("dequantizing `{}`", l.name))?;
    match &l.lora {
        None => Ok(w),
        Some(lo) => {
            let delta = (lo.b.matmul(&lo.a)? * lo.scale)?;
            (w + delta).ctx(|| format!("merging the adapter of `{}`", l.name))
        }
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// `config.json` for a model whose configuration came from GGUF metadata.
pub fn hf_config_json(cfg: &Config, tied: bool, dtype: DType) -> Result<Json> {
    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Mistral => ("MistralForCausalLM", "mistral"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let rope_scaling = match &cfg.rope_scaling {
        None => Json::Null,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                     "high_freq_factor": high_freq_factor,
                     "original_max_position_embeddings": original_max_position_embeddings}),
        Some(RopeScaling::Factors(_)) => {
            return Err(ModelError::Config {
                field: "rope_scaling".into(),
                message: "the GGUF stores per-frequency RoPE factors (rope_freqs.weight), which config.json cannot express; merge from the Hugging Face base model instead".into(),
            })
        }
    };
    let eos = match cfg.eos_token_ids.as_slice() {
        [] => Json::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let mut c = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": dtype_name(dtype),
    });
    let o = c.as_object_mut().expect("object");
    match cfg.arch {
        Arch::Llama => {
            o.insert("attention_bias".into(), json!(cfg.attention_bias));
            o.insert("mlp_bias".into(), json!(cfg.mlp_bias));
            o.insert("pretraining_tp".into(), json!(1));
        }
        Arch::Mistral => {
            o.insert("sliding_window".into(), json!(cfg.sliding_window));
        }
        Arch::Qwen2 => {
            o.insert(
                "use_sliding_window".into(),
                json!(cfg.sliding_window.is_some()),
            );
            o.insert("sliding_window".into(), json!(cfg.sliding_window));
        }
    }
    Ok(c)
}

/// `tokenizer_config.json` for a tokenizer that came from GGUF metadata.
pub fn tokenizer_config_json(tok: &Tok, max_len: usize) -> Result<Json> {
    let adds_bos = match &tok.bos {
        Some((_, id)) => tok.encode("a", true)?.first() == Some(id),
        None => false,
    };
    let text = |t: &Option<(String, u32)>| t.as_ref().map(|(s, _)| s.clone());
    Ok(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(&tok.bos),
        "eos_token": text(&tok.eos),
        "pad_token": text(&tok.eos),
        "unk_token": null,
        "add_bos_token": adds_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
        "chat_template": tok.chat_template,
    }))
}

/// Writes `model` (and `tok`) as a Hugging Face directory at `out`, which must not exist or be
/// empty. `base_dir` is the Hugging Face directory the model came from, whose config.json and
/// tokenizer files are carried over; `None` (a GGUF base) writes them from the loaded config and
/// tokenizer. `dtype` is the stored precision (F32, BF16 or F16).
pub fn write_hf_dir(
    model: &Llama,
    tok: &Tok,
    base_dir: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<ExportSummary> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(ModelError::Other(format!(
            "cannot store weights as {dtype:?} (use f32, bf16 or f16)"
        )));
    }
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| ModelError::io(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(ModelError::format(
                out,
                "already exists and is not empty (hint: choose a new output directory; nothing was overwritten)",
            ));
        }
        std::fs::remove_dir(out).map_err(|e| ModelError::io(out, e))?;
    }
    let cfg = &model.cfg;
    let conv = |t: Tensor, name: &str| -> Result<Tensor> {
        t.to_dtype(dtype)
            .and_then(|t| t.contiguous())
            .ctx(|| format!("converting `{name}`"))
    };
    let mut named: Vec<(String, Tensor)> = Vec::new();
    named.push((
        "model.embed_tokens.weight".into(),
        conv(model.embed_tokens.clone(), "model.embed_tokens.weight")?,
    ));
    for (i, b) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        named.push((
            format!("{p}.input_layernorm.weight"),
            conv(b.input_layernorm.weight.clone(), "input_layernorm")?,
        ));
        named.push((
            format!("{p}.post_attention_layernorm.weight"),
            conv(
                b.post_attention_layernorm.weight.clone(),
                "post_attention_layernorm",
            )?,
        ));
    }
    let lm_head = &model.lm_head;
    for l in linears(model) {
        if std::ptr::eq(l, lm_head) {
            continue;
        }
        named.push((
            format!("{}.weight", l.name),
            conv(effective_weight(l)?, &l.name)?,
        ));
        if let Some(bias) = &l.bias {
            named.push((format!("{}.bias", l.name), conv(bias.clone(), &l.name)?));
        }
    }
    named.push((
        "model.norm.weight".into(),
        conv(model.norm.weight.clone(), "model.norm.weight")?,
    ));
    let head = effective_weight(lm_head)?;
    let tied = cfg.tie_word_embeddings
        && head.dims() == model.embed_tokens.dims()
        && (&head - &model.embed_tokens)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            == 0.0;
    if !tied {
        named.push(("lm_head.weight".into(), conv(head, "lm_head.weight")?));
    }
    let parameters = named.iter().map(|(_, t)| t.elem_count()).sum();
    let tensors = named.len();

    let config = match base_dir {
        Some(dir) => {
            let p = dir.join("config.json");
            let text = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
            let mut c: Json = serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: p.clone(),
                source: e,
            })?;
            let o = c
                .as_object_mut()
                .ok_or_else(|| ModelError::format(&p, "not a JSON object"))?;
            o.insert("tie_word_embeddings".into(), json!(tied));
            if o.contains_key("dtype") {
                o.insert("dtype".into(), json!(dtype_name(dtype)));
            } else {
                o.insert("torch_dtype".into(), json!(dtype_name(dtype)));
            }
            c
        }
        None => hf_config_json(cfg, tied, dtype)?,
    };
    let tok_files: Vec<(String, Vec<u8>)> = match base_dir {
        Some(dir) => {
            let mut v = Vec::new();
            for f in COPIED_FILES {
                let p = dir.join(f);
                if p.is_file() {
                    v.push((
                        f.to_string(),
                        std::fs::read(&p).map_err(|e| ModelError::io(&p, e))?,
                    ));
                }
            }
            v
        }
        None => {
            let tj = tok
                .inner
                .to_string(true)
                .map_err(|e| ModelError::Tokenizer(format!("serialising tokenizer.json: {e}")))?;
            let tc = tokenizer_config_json(tok, cfg.max_position_embeddings)?;
            let gc = json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"].clone()});
            let pretty = |v: &Json| serde_json::to_vec_pretty(v).unwrap_or_default();
            vec![
                ("tokenizer.json".into(), tj.into_bytes()),
                ("tokenizer_config.json".into(), pretty(&tc)),
                ("generation_config.json".into(), pretty(&gc)),
            ]
        }
    };
    let config_bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| ModelError::Other(format!("serialising config.json: {e}")))?;
    let mut files = Vec::new();
    write_files_atomically(out, |tmp| {
        write_safetensors(
            &tmp.join("model.safetensors"),
            named.iter().map(|(k, t)| (k.as_str(), t)),
        )?;
        files.push("model.safetensors".to_string());
        let p = tmp.join("config.json");
        std::fs::write(&p, &config_bytes).map_err(|e| ModelError::io(&p, e))?;
        files.push("config.json".into());
        for (name, bytes) in &tok_files {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| ModelError::io(&p, e))?;
            files.push(name.clone());
        }
        Ok(files.clone())
    })?;
    Ok(ExportSummary {
        tensors,
        parameters,
        tied,
        files,
    })
}
