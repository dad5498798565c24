//! Test fixtures other crates can use too: a tiny random-weight Llama written as a Hugging Face
//! directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), and the
//! path of the real SmolLM2 asset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::generate::Rng;
use crate::template::CHATML_TEMPLATE;
use crate::tokenizer::{byte_level_alphabet, byte_level_bpe_json};

/// Sizes of the tiny model.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub seed: u64,
    /// Split the weights over two shards with `model.safetensors.index.json`.
    pub sharded: bool,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: false,
            attention_bias: false,
            seed: 1,
            sharded: false,
        }
    }
}

/// The tiny vocabulary: the 256 byte tokens, a few merges, then the ChatML specials.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TINY_MERGES: [&str; 6] = ["h e", "l l", "i s", "\u{120} t", "\u{120}t h", "o u"];

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    // Box-Muller.
    (0..n)
        .map(|_| {
            let u1 = rng.next_f64().max(1e-12);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

impl TinyModel {
    /// Writes the model directory; returns its path (`dir` itself).
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let err = |e: candle_core::Error| std::io::Error::other(e.to_string());
        std::fs::create_dir_all(dir)?;
        // Tokenizer.
        let mut tokens = byte_level_alphabet();
        for m in TINY_MERGES {
            tokens.push(m.replace(' ', ""));
        }
        let mut added = Vec::new();
        for s in TINY_SPECIALS {
            added.push((tokens.len() as u32, s.to_string(), true));
            tokens.push(s.to_string());
        }
        let merges: Vec<String> = TINY_MERGES.iter().map(|s| s.to_string()).collect();
        let tj = byte_level_bpe_json(&tokens, &merges, &added, "smollm", None);
        std::fs::write(
            dir.join("tokenizer.json"),
            serde_json::to_string_pretty(&tj)?,
        )?;
        let tc = json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "chat_template": CHATML_TEMPLATE});
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc)?,
        )?;
        let vocab = tokens.len();
        let im_end = vocab as u32 - 1;
        let (c, i, h, k) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        let d = c / h;
        let config = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": c, "intermediate_size": i, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": h, "num_key_value_heads": k, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "bos_token_id": null, "eos_token_id": im_end, "torch_dtype": "float32",
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        // Weights: std 1/sqrt(fan_in) so logits are far from uniform (clear argmax).
        let mut rng = Rng::new(self.seed);
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let put = |tensors: &mut HashMap<String, Tensor>,
                   name: String,
                   shape: Vec<usize>,
                   std: f32,
                   rng: &mut Rng|
         -> std::io::Result<()> {
            let n: usize = shape.iter().product();
            let t = Tensor::from_vec(randn(rng, n, std), shape, &Device::Cpu).map_err(err)?;
            tensors.insert(name, t);
            Ok(())
        };
        let ones = |n: usize, rng: &mut Rng| -> Vec<f32> {
            randn(rng, n, 0.1).into_iter().map(|x| 1.0 + x).collect()
        };
        put(
            &mut tensors,
            "model.embed_tokens.weight".into(),
            vec![vocab, c],
            1.0,
            &mut rng,
        )?;
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ws = (c as f32).powf(-0.5);
            put(
                &mut tensors,
                format!("{p}.self_attn.q_proj.weight"),
                vec![h * d, c],
                ws,
                &mut rng,
            )?;
            put(
                &mut tensors,
                format!("{p}.self_attn.k_proj.weight"),
                vec![k * d, c],
                ws,
                &mut rng,
            )?;
            put(
                &mut tensors,
                format!("{p}.self_attn.v_proj.weight"),
                vec![k * d, c],
                ws,
                &mut rng,
            )?;
            put(
                &mut tensors,
                format!("{p}.self_attn.o_proj.weight"),
                vec![c, h * d],
                ws,
                &mut rng,
            )?;
            if self.attention_bias {
                put(
                    &mut tensors,
                    format!("{p}.self_attn.q_proj.bias"),
                    vec![h * d],
                    0.1,
                    &mut rng,
                )?;
                put(
                    &mut tensors,
                    format!("{p}.self_attn.k_proj.bias"),
                    vec![k * d],
                    0.1,
                    &mut rng,
                )?;
                put(
                    &mut tensors,
                    format!("{p}.self_attn.v_proj.bias"),
                    vec![k * d],
                    0.1,
                    &mut rng,
                )?;
            }
            put(
                &mut tensors,
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, c],
                ws,
                &mut rng,
            )?;
            put(
                &mut tensors,
                format!("{p}.mlp.up_proj.weight"),
                vec![i, c],
                ws,
                &mut rng,
            )?;
            put(
                &mut tensors,
                format!("{p}.mlp.down_proj.weight"),
                vec![c, i],
                (i as f32).powf(-0.5),
                &mut rng,
            )?;
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                let v = ones(c, &mut rng);
                tensors.insert(
                    format!("{p}.{norm}.weight"),
                    Tensor::from_vec(v, c, &Device::Cpu).map_err(err)?,
                );
            }
        }
        let v = ones(c, &mut rng);
        tensors.insert(
            "model.norm.weight".into(),
            Tensor::from_vec(v, c, &Device::Cpu).map_err(err)?,
        );
        if !self.tie_word_embeddings {
            put(
                &mut tensors,
                "lm_head.weight".into(),
                vec![vocab, c],
                (c as f32).powf(-0.5) * 4.0,
                &mut rng,
            )?;
        }
        if self.sharded {
            let mut names: Vec<String> = tensors.keys().cloned().collect();
            names.sort();
            let (a, b) = names.split_at(names.len() / 2);
            let mut weight_map = serde_json::Map::new();
            for (shard, part) in [
                ("model-00001-of-00002.safetensors", a),
                ("model-00002-of-00002.safetensors", b),
            ] {
                let sub: HashMap<String, Tensor> = part
                    .iter()
                    .map(|n| (n.clone(), tensors[n].clone()))
                    .collect();
                candle_core::safetensors::save(&sub, dir.join(shard)).map_err(err)?;
                for n in part {
                    weight_map.insert(n.clone(), json!(shard));
                }
            }
            let index = json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::to_string_pretty(&index)?,
            )?;
        } else {
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).map_err(err)?;
        }
        Ok(dir.to_path_buf())
    }
}

impl TinyModel {
    /// Writes the same model as one GGUF file (f32 tensors under llama.cpp's names, q and k rows
    /// permuted as llama.cpp's converter does, the tokenizer and template in the metadata), as
    /// a small real file for the GGUF loader's tests. Returns `path`.
    pub fn write_gguf(&self, path: &Path) -> std::io::Result<PathBuf> {
        self.write_gguf_as(path, candle_core::quantized::GgmlDType::F32)
    }

    /// As [`TinyModel::write_gguf`], with the seven projections of every layer (q, k, v, o,
    /// gate, up, down) quantized to `projections` (e.g. Q8_0, Q4_0: hidden and MLP sizes must
    /// be multiples of 32 for the block formats); embeddings, norms and the head stay f32.
    pub fn write_gguf_as(
        &self,
        path: &Path,
        projections: candle_core::quantized::GgmlDType,
    ) -> std::io::Result<PathBuf> {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let err = |e: candle_core::Error| std::io::Error::other(e.to_string());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let staging = path.with_file_name(format!(".{}.hf", name.unwrap_or_default()));
        let hf = TinyModel {
            sharded: false,
            ..self.clone()
        };
        hf.write(&staging)?;
        let tensors =
            candle_core::safetensors::load(staging.join("model.safetensors"), &Device::Cpu)
                .map_err(err);
        std::fs::remove_dir_all(&staging)?;
        let tensors = tensors?;
        let mut tokens = byte_level_alphabet();
        for m in TINY_MERGES {
            tokens.push(m.replace(' ', ""));
        }
        let n_plain = tokens.len();
        tokens.extend(TINY_SPECIALS.iter().map(|s| s.to_string()));
        let (c, h, k) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        let d = c / h;
        let u32v = |x: usize| gguf_file::Value::U32(x as u32);
        let strings = |v: &[String]| {
            gguf_file::Value::Array(v.iter().cloned().map(gguf_file::Value::String).collect())
        };
        let merges: Vec<String> = TINY_MERGES.iter().map(|s| s.to_string()).collect();
        let types = gguf_file::Value::Array(
            (0..tokens.len())
                .map(|i| gguf_file::Value::I32(if i < n_plain { 1 } else { 3 }))
                .collect(),
        );
        let metadata: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            ("llama.embedding_length", u32v(c)),
            ("llama.feed_forward_length", u32v(self.intermediate_size)),
            ("llama.block_count", u32v(self.num_hidden_layers)),
            ("llama.attention.head_count", u32v(h)),
            ("llama.attention.head_count_kv", u32v(k)),
            ("llama.context_length", u32v(512)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(1e-5),
            ),
            ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
            (
                "tokenizer.ggml.model",
                gguf_file::Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre",
                gguf_file::Value::String("smollm".into()),
            ),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.merges", strings(&merges)),
            ("tokenizer.ggml.token_type", types),
            ("tokenizer.ggml.eos_token_id", u32v(tokens.len() - 1)),
            (
                "tokenizer.chat_template",
                gguf_file::Value::String(CHATML_TEMPLATE.into()),
            ),
        ];
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut qtensors = Vec::new();
        for name in names {
            let gguf_name = crate::gguf::hf_to_gguf_name(name)
                .ok_or_else(|| std::io::Error::other(format!("no GGUF name for {name}")))?;
            let mut t = tensors[name].clone();
            // llama.cpp's converter: GGUF row h*d + 2i + j holds Hugging Face row h*d + j*d/2 + i.
            let heads = if name.contains("self_attn.q_proj.") {
                Some(h)
            } else if name.contains("self_attn.k_proj.") {
                Some(k)
            } else {
                None
            };
            if let Some(n) = heads {
                let dims = t.dims().to_vec();
                let rest: usize = dims[1..].iter().product();
                t = t
                    .reshape((n, 2, d / 2, rest))
                    .and_then(|t| t.transpose(1, 2))
                    .and_then(|t| t.contiguous())
                    .and_then(|t| t.reshape(dims))
                    .map_err(err)?;
            }
            let dtype = if name.starts_with("model.layers.") && name.ends_with("_proj.weight") {
                projections
            } else {
                GgmlDType::F32
            };
            qtensors.push((gguf_name, QTensor::quantize(&t, dtype).map_err(err)?));
        }
        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(err)?;
        use std::io::Write;
        f.flush()?;
        Ok(path.to_path_buf())
    }
}

/// Where tests find SmolLM2-135M-Instruct (Q4_1 GGUF). Panics with instructions if it is missing:
/// tests that need the real model fail rather than skip.
pub fn smollm2_gguf() -> PathBuf {
    let p = crate::safetune_home().join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        panic!(
            "the SmolLM2 asset is missing: {}\nhint: run scripts/fetch-assets (or set SAFETUNE_HOME to a cache that has it)",
            p.display()
        );
    }
    p
}

/// `n` values uniform in [-1, 1), seeded: the operands of the kernels' tests.
pub fn uniform_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}
