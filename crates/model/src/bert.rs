//! A BERT sentence encoder (MiniLM-L6 from the assets by default) built from candle-core
//! primitives: embeddings, post-norm encoder layers with exact GELU, and mean pooling over real
//! tokens. Inference only. Tensor names are the checkpoint's own (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...), with an optional `bert.` prefix.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The fields of a BERT `config.json` this encoder uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

struct Lin {
    w_t: Tensor, // (in, out)
    b: Tensor,   // (out)
}

impl Lin {
    /// (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.w_t)?.broadcast_add(&self.b)
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    /// Layer norm over the last dim: (..., C) -> (..., C)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.w)?.broadcast_add(&self.b)
    }
}

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    attn_out: Lin,
    attn_norm: Norm,
    up: Lin,
    down: Lin,
    out_norm: Norm,
}

/// A loaded encoder with its tokenizer.
pub struct BertEncoder {
    pub cfg: BertConfig,
    word: Tensor,
    pos: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    tokenizer: tokenizers::Tokenizer,
    /// Tokens kept per text (longer texts are cut), `[CLS]` and `[SEP]` included.
    pub max_len: usize,
    pub source: PathBuf,
}

impl std::fmt::Debug for BertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEncoder")
            .field("source", &self.source)
            .field("cfg", &self.cfg)
            .finish()
    }
}

struct Tensors {
    map: HashMap<String, Tensor>,
    path: PathBuf,
    prefix: &'static str,
}

impl Tensors {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .map
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: full.clone(),
                hint: String::new(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                tensor: full,
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
    fn lin(&self, name: &str, out: usize, inp: usize) -> Result<Lin> {
        Ok(Lin {
            w_t: self
                .get(&format!("{name}.weight"), &[out, inp])?
                .t()?
                .contiguous()?,
            b: self.get(&format!("{name}.bias"), &[out])?,
        })
    }
    fn norm(&self, name: &str, c: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            w: self.get(&format!("{name}.weight"), &[c])?,
            b: self.get(&format!("{name}.bias"), &[c])?,
            eps,
        })
    }
}

impl BertEncoder {
    /// The MiniLM encoder from the asset cache (`minilm/`).
    pub fn load_default() -> Result<BertEncoder> {
        let dir = safetune_data::assets::asset("minilm/model.safetensors")
            .map_err(|e| ModelError::Other(e.to_string()))?;
        let dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::load(&dir)
    }

    /// A directory with `config.json`, `model.safetensors` and `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<BertEncoder> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::Config {
                field: "hidden_act".into(),
                message: format!("only `gelu` is supported, got `{}`", cfg.hidden_act),
            });
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(ModelError::Config {
                field: "num_attention_heads".into(),
                message: "must divide hidden_size".into(),
            });
        }
        let st = dir.join("model.safetensors");
        let map = candle_core::safetensors::load(&st, &Device::Cpu)
            .map_err(|e| ModelError::format(&st, format!("cannot read safetensors: {e}")))?;
        let prefix = if map.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let t = Tensors {
            map,
            path: st.clone(),
            prefix,
        };
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: t.lin(&format!("{p}.attention.self.query"), c, c)?,
                k: t.lin(&format!("{p}.attention.self.key"), c, c)?,
                v: t.lin(&format!("{p}.attention.self.value"), c, c)?,
                attn_out: t.lin(&format!("{p}.attention.output.dense"), c, c)?,
                attn_norm: t.norm(&format!("{p}.attention.output.LayerNorm"), c, eps)?,
                up: t.lin(&format!("{p}.intermediate.dense"), f, c)?,
                down: t.lin(&format!("{p}.output.dense"), c, f)?,
                out_norm: t.norm(&format!("{p}.output.LayerNorm"), c, eps)?,
            });
        }
        let tj = dir.join("tokenizer.json");
        let mut tokenizer =
            crate::tokenizer::read_tokenizer(&tj, || tokenizers::Tokenizer::from_file(&tj))?;
        tokenizer.with_padding(None);
        let max_len = 256.min(cfg.max_position_embeddings);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::format(&tj, e.to_string()))?;
        Ok(BertEncoder {
            word: t.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, c])?,
            pos: t.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, c],
            )?,
            token_type: t.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, c],
            )?,
            emb_norm: t.norm("embeddings.LayerNorm", c, eps)?,
            layers,
            tokenizer,
            max_len,
            source: dir.to_path_buf(),
            cfg,
        })
    }

    /// Token ids of one text (`[CLS] ... [SEP]`, cut to `max_len`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Last hidden states of a right-padded batch: ids (B, T), mask (B, T) of 1/0 -> (B, T, C).
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.hidden_size;
        let h = self.cfg.num_attention_heads;
        let d = c / h;
        let words = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?; // (B, T, C)
        let pos = self.pos.narrow(0, 0, t)?.unsqueeze(0)?; // (1, T, C)
        let tt = self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?; // (1, 1, C)
        let mut x = self
            .emb_norm
            .forward(&words.broadcast_add(&pos)?.broadcast_add(&tt)?)?; // (B, T, C)
                                                                        // Additive mask over keys: 0 for tokens, a large negative for padding. (B, 1, 1, T)
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers {
            let heads = |y: Tensor| -> candle_core::Result<Tensor> {
                y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous() // (B, H, T, D)
            };
            let q = heads(layer.q.forward(&x)?)?;
            let k = heads(layer.k.forward(&x)?)?;
            let v = heads(layer.v.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?; // (B, H, T, T)
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
            x = layer
                .attn_norm
                .forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            let inner = layer.up.forward(&x)?.gelu_erf()?; // (B, T, F)
            x = layer
                .out_norm
                .forward(&(layer.down.forward(&inner)? + &x)?)?;
        }
        Ok(x)
    }

    /// Mean-pooled sentence embeddings, one `hidden_size` vector per text. Texts are batched
    /// `batch` at a time in length order, so padding stays small.
    pub fn embed(&self, texts: &[&str], batch: usize) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch.max(1)) {
            let t = chunk
                .iter()
                .map(|&i| ids[i].len())
                .max()
                .unwrap_or(1)
                .max(1);
            let mut flat = Vec::with_capacity(chunk.len() * t);
            let mut m = Vec::with_capacity(chunk.len() * t);
            for &i in chunk {
                let s = &ids[i];
                flat.extend_from_slice(s);
                flat.extend(std::iter::repeat_n(0u32, t - s.len()));
                m.extend(std::iter::repeat_n(1u32, s.len()));
                m.extend(std::iter::repeat_n(0u32, t - s.len()));
            }
            let b = chunk.len();
            let ids_t = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
            let mask_t = Tensor::from_vec(m, (b, t), &Device::Cpu)?;
            let hs = self.hidden_states(&ids_t, &mask_t)?; // (B, T, C)
            let mf = mask_t.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
            let summed = hs.broadcast_mul(&mf)?.sum(1)?; // (B, C)
            let counts = mf.sum(1)?.clamp(1e-9, f64::MAX)?; // (B, 1)
            let pooled = summed.broadcast_div(&counts)?.to_vec2::<f32>()?;
            for (k, &i) in chunk.iter().enumerate() {
                out[i] = pooled[k].clone();
            }
        }
        Ok(out)
    }
}

/// Scales a vector to unit length (unchanged if it is all zeros).
pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> BertEncoder {
        BertEncoder::load_default().expect("minilm in the asset cache (scripts/fetch-assets)")
    }

    #[test]
    fn minilm_embeddings_rank_paraphrases_first_and_ignore_padding() {
        let enc = encoder();
        let texts = [
            "I'm sorry, but I can't help with that request.",
            "Unfortunately I am unable to assist with this.",
            "Sure! Here is a recipe for banana bread: mix flour, sugar and ripe bananas.",
            "The mitochondria is the powerhouse of the cell.",
        ];
        // Batched (padded) and one at a time give the same vectors.
        let batched = enc.embed(&texts, 4).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let alone = enc.embed(&[t], 1).unwrap();
            let diff = alone[0]
                .iter()
                .zip(&batched[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "text {i}: max difference {diff}");
        }
        assert_eq!(batched[0].len(), 384);
        let s01 = cosine(&batched[0], &batched[1]);
        let s02 = cosine(&batched[0], &batched[2]);
        let s03 = cosine(&batched[0], &batched[3]);
        assert!(s01 > s02 + 0.2 && s01 > s03 + 0.2, "{s01} {s02} {s03}");
        assert!(s01 > 0.5, "two refusals should be close: {s01}");
    }

    #[test]
    fn tokenizer_is_uncased_wordpiece_with_cls_and_sep() {
        let enc = encoder();
        let ids = enc.encode("Hello WORLD").unwrap();
        assert_eq!(ids.first(), Some(&101));
        assert_eq!(ids.last(), Some(&102));
        assert_eq!(ids, enc.encode("hello world").unwrap());
        let long = "word ".repeat(1000);
        assert_eq!(enc.encode(&long).unwrap().len(), enc.max_len);
    }

    #[test]
    fn missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let src = encoder().source.clone();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("embeddings.other".to_string(), t)]),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let e = BertEncoder::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("encoder.layer.0"),
            "{e}"
        );
    }
}
