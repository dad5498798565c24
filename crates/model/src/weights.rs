//! Where a model's tensors come from: memory-mapped safetensors (one file or shards listed in
//! `model.safetensors.index.json`) or a GGUF file. [`Weights`] is a prefix-scoped view, in the
//! manner of candle's VarBuilder: `w.pp("model").pp("layers.0")` finds the checkpoint's keys, and
//! every error names the file, the tensor and both shapes.
//!
//! [`Linear`] is the one linear layer every projection uses, dense f32 or kept quantized, with a
//! slot for a LoRA adapter that the training code fills.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use crate::bf16::Bf16Matrix;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::QMatrix;

/// Safetensors shards and which shard holds which tensor.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// Memory-maps the given files and indexes their tensor names.
    pub fn open(paths: &[PathBuf]) -> Result<SafetensorsFiles> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.is_file() {
                return Err(ModelError::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            // SAFETY: the file is mapped read-only; as with any mmap, it must not be modified
            // while the model is loaded.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                ModelError::format(p, format!("not a readable safetensors file: {e}"))
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(SafetensorsFiles { files, index })
    }

    /// The safetensors files of a Hugging Face directory: the shards listed in
    /// `model.safetensors.index.json`, or `model.safetensors`, or every `*.safetensors`.
    pub fn find_in_dir(dir: &Path) -> Result<Vec<PathBuf>> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Json {
                    path: index_path.clone(),
                    source: e,
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index_path, "no `weight_map` object"))?;
            let mut shards: Vec<PathBuf> = Vec::new();
            for v in map.values() {
                let f = v.as_str().ok_or_else(|| {
                    ModelError::format(&index_path, "a weight_map value is not a string")
                })?;
                let p = shard_path(dir, &index_path, f)?;
                if !shards.contains(&p) {
                    shards.push(p);
                }
            }
            shards.sort();
            return Ok(shards);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        all.sort();
        if all.is_empty() {
            return Err(ModelError::format(
                dir,
                "no *.safetensors files (hint: is this a Hugging Face model directory?)",
            ));
        }
        Ok(all)
    }

    fn describe(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            [(p, _), ..] => p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| p.clone()),
            [] => PathBuf::from("<no files>"),
        }
    }
}

/// A shard named by an index: a plain relative path inside the model directory (no absolute
/// path, no `..`), so a crafted index cannot make us map files elsewhere. Links inside the
/// directory are the directory's own business (the hub cache links every snapshot file to a
/// blob outside it).
fn shard_path(dir: &Path, index_path: &Path, name: &str) -> Result<PathBuf> {
    use std::path::Component;
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(ModelError::format(
            index_path,
            format!("weight_map names the shard {name:?}, which is not a file inside the model directory"),
        ));
    }
    Ok(dir.join(rel))
}

enum Source {
    Safetensors(SafetensorsFiles),
    Gguf(GgufFile),
}

/// A prefix-scoped view of a checkpoint's tensors.
#[derive(Clone)]
pub struct Weights {
    src: Arc<Source>,
    prefix: String,
    /// Keep GGUF matrices quantized (QMatMul) instead of dequantizing them to f32.
    keep_quantized: bool,
    /// `(num_attention_heads, num_key_value_heads)`: GGUF q/k rows are un-permuted with these.
    heads: (usize, usize),
}

impl Weights {
    pub fn from_safetensors(files: SafetensorsFiles) -> Weights {
        Weights {
            src: Arc::new(Source::Safetensors(files)),
            prefix: String::new(),
            keep_quantized: false,
            heads: (0, 0),
        }
    }

    pub fn from_gguf(file: GgufFile, heads: (usize, usize), keep_quantized: bool) -> Weights {
        Weights {
            src: Arc::new(Source::Gguf(file)),
            prefix: String::new(),
            keep_quantized,
            heads,
        }
    }

    /// A view whose names start with `self`'s prefix followed by `name`.
    pub fn pp(&self, name: impl AsRef<str>) -> Weights {
        let mut w = self.clone();
        w.prefix = self.full(name.as_ref());
        w
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn is_quantized(&self) -> bool {
        self.keep_quantized && matches!(*self.src, Source::Gguf(_))
    }

    /// The file (or directory of shards) the tensors come from.
    pub fn source_path(&self) -> PathBuf {
        match &*self.src {
            Source::Safetensors(s) => s.describe(),
            Source::Gguf(g) => g.path.clone(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        match &*self.src {
            Source::Safetensors(s) => s.index.contains_key(&full),
            Source::Gguf(g) => g.tensor_info(&full).is_some(),
        }
    }

    /// The stored shape of a tensor (Hugging Face order, (out, in) for a linear weight), without
    /// loading it; an error names the file and the tensor when it is missing.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.shape_of(&self.full(name))
    }

    /// The relative rounding error of a tensor's stored format, as a scale for what differences
    /// between two checkpoints are noise: the unit roundoff of a float format (f32 2^-24, f16
    /// 2^-11, bf16 2^-8), and for GGUF blocks roughly half a quantization step relative to a
    /// weight of typical size (Q8 2^-6, Q6_K 2^-4, Q5 2^-3, Q4 2^-2, Q3_K 2^-1, Q2_K 1).
    pub fn unit_roundoff(&self, name: &str) -> Result<f64> {
        let full = self.full(name);
        let bits: i32 = match &*self.src {
            Source::Safetensors(s) => {
                let i = *s
                    .index
                    .get(&full)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: s.describe(),
                        tensor: full.clone(),
                        hint: String::new(),
                    })?;
                let (path, st) = &s.files[i];
                let view = st
                    .get(&full)
                    .map_err(|e| ModelError::format(path, format!("tensor `{full}`: {e}")))?;
                use safetensors::Dtype;
                match view.dtype() {
                    Dtype::F64 => 53,
                    Dtype::F16 => 11,
                    Dtype::BF16 => 8,
                    _ => 24,
                }
            }
            Source::Gguf(g) => {
                let (_, dtype) = g
                    .tensor_info(&full)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: g.path.clone(),
                        tensor: full.clone(),
                        hint: String::new(),
                    })?;
                match dtype {
                    GgmlDType::F32 => 24,
                    GgmlDType::F16 => 11,
                    GgmlDType::BF16 => 8,
                    GgmlDType::Q8_0 | GgmlDType::Q8_1 | GgmlDType::Q8K => 6,
                    GgmlDType::Q6K => 4,
                    GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 3,
                    GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 2,
                    GgmlDType::Q3K => 1,
                    _ => 0,
                }
            }
        };
        Ok(2f64.powi(-bits))
    }

    fn shape_of(&self, full: &str) -> Result<Vec<usize>> {
        match &*self.src {
            Source::Safetensors(s) => {
                let i = *s.index.get(full).ok_or_else(|| ModelError::MissingTensor {
                    path: s.describe(),
                    tensor: full.to_string(),
                    hint: String::new(),
                })?;
                let (path, st) = &s.files[i];
                let view = st
                    .get(full)
                    .map_err(|e| ModelError::format(path, format!("tensor `{full}`: {e}")))?;
                Ok(view.shape().to_vec())
            }
            Source::Gguf(g) => {
                g.tensor_info(full)
                    .map(|(s, _)| s)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: g.path.clone(),
                        tensor: full.to_string(),
                        hint: String::new(),
                    })
            }
        }
    }

    fn check_shape(&self, full: &str, expected: &[usize]) -> Result<()> {
        let actual = self.shape_of(full)?;
        if actual != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.source_path(),
                tensor: full.to_string(),
                expected: expected.to_vec(),
                actual,
            });
        }
        Ok(())
    }

    /// Loads a tensor as f32 on the CPU, checking its shape.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.full(name);
        self.check_shape(&full, shape)?;
        let t = match &*self.src {
            Source::Safetensors(s) => {
                let (path, st) = &s.files[s.index[&full]];
                st.load(&full, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| ModelError::format(path, format!("tensor `{full}`: {e}")))?
            }
            Source::Gguf(g) => g
                .qtensor(&full, self.heads)?
                .dequantize(&Device::Cpu)
                .map_err(|e| ModelError::format(&g.path, format!("tensor `{full}`: {e}")))?,
        };
        Ok(t)
    }

    /// A linear layer `name.weight` of shape (out, in), with `name.bias` (out) when `bias`.
    pub fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let w = self.pp(name);
        let bias = if bias {
            Some(w.get(&[out_dim], "bias")?)
        } else {
            None
        };
        let weight = match (&*self.src, self.keep_quantized) {
            (Source::Gguf(g), true) => {
                let full = w.full("weight");
                w.check_shape(&full, &[out_dim, in_dim])?;
                let err = |e: candle_core::Error| {
                    ModelError::format(&g.path, format!("tensor `{full}`: {e}"))
                };
                let q = g.qtensor(&full, self.heads)?;
                match QMatrix::from_qtensor(&q).map_err(err)? {
                    Some(m) => LinearWeight::Blocks(Arc::new(m)),
                    None => {
                        let q = fast_cpu_format(q).map_err(err)?;
                        LinearWeight::Quantized(QMatMul::from_qtensor(q).map_err(err)?)
                    }
                }
            }
            _ => LinearWeight::Dense(w.get(&[out_dim, in_dim], "weight")?),
        };
        Ok(Linear {
            name: w.prefix.clone(),
            weight,
            bias,
            in_dim,
            out_dim,
            lora: None,
        })
    }
}

/// Formats [`QMatrix`] does not hold go to candle's QMatMul. candle has vectorised CPU kernels
/// (chosen at run time) for Q8_0 and the K-quants, but only scalar ones for Q5_0 and Q5_1 (and
/// Q4_0, Q4_1). Those are re-quantized to Q8_0: 8 bits per value hold their 4- and 5-bit levels
/// almost exactly, and decoding gets several times faster.
fn fast_cpu_format(q: QTensor) -> candle_core::Result<QTensor> {
    let slow = matches!(
        q.dtype(),
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    );
    let cols = q.shape().dims().last().copied().unwrap_or(0);
    if !slow || cols % GgmlDType::Q8_0.block_size() != 0 {
        return Ok(q);
    }
    QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)
}

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// (out, in), f32.
    Dense(Tensor),
    /// GGUF blocks kept quantized in candle's QMatMul (K-quants, Q5; re-quantized to Q8_0
    /// where candle's kernels are scalar).
    Quantized(QMatMul),
    /// GGUF Q4_0, Q4_1 and Q8_0 blocks as stored, with this crate's kernels ([`crate::quant`]).
    Blocks(Arc<QMatrix>),
    /// Rounded to bf16 and packed once for the AMX kernel ([`crate::bf16::Bf16Matrix`]):
    /// `--bf16` generation. Products take f32 activations (rounded per call) and give f32.
    Bf16(Arc<Bf16Matrix>),
}

impl LinearWeight {
    /// Whether the weight is held in quantized blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self, LinearWeight::Quantized(_) | LinearWeight::Blocks(_))
    }
}

/// A low-rank adapter on a linear layer: `y += scale * (x A^T) B^T`. The training code creates
/// and fills these (PEFT layout: `lora_A` (r, in), `lora_B` (out, r), scale = alpha / r).
#[derive(Debug, Clone)]
pub struct Lora {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scale: f64,
}

/// Every projection of the decoder (q, k, v, o, gate, up, down and the LM head).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The checkpoint path, e.g. `model.layers.0.self_attn.q_proj`: the adapter key prefix.
    pub name: String,
    pub weight: LinearWeight,
    /// (out)
    pub bias: Option<Tensor>,
    pub in_dim: usize,
    pub out_dim: usize,
    /// LoRA slot: `None` for a plain model; the training issue attaches adapters here.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A dense layer from an (out, in) weight.
    pub fn dense(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Linear> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Linear {
            name: name.into(),
            weight: LinearWeight::Dense(weight),
            bias,
            in_dim,
            out_dim,
            lora: None,
        })
    }

    /// The weight as a dense (out, in) f32 tensor (dequantized if needed).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu),
            LinearWeight::Quantized(QMatMul::Tensor(t)) => Ok(t.clone()),
            LinearWeight::Quantized(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32),
            LinearWeight::Blocks(q) => q.dequantize_tensor(),
            LinearWeight::Bf16(m) => m.to_tensor(),
        }
    }
}

impl Linear {
    /// Holds a dense f32 weight as Q8_0 blocks (one f16 scale per 32 values, 8-bit levels) for
    /// the fast decoding kernels. Returns whether it did: quantized weights stay as they are,
    /// and so do weights whose input width is not a multiple of 32. An attached (unmerged)
    /// adapter keeps its f32 low-rank path.
    pub fn quantize_q8_0(&mut self) -> candle_core::Result<bool> {
        let LinearWeight::Dense(w) = &self.weight else {
            return Ok(false);
        };
        if !self.in_dim.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            return Ok(false);
        }
        let q = QTensor::quantize(&w.contiguous()?, GgmlDType::Q8_0)?;
        match QMatrix::from_qtensor(&q)? {
            Some(m) => {
                self.weight = LinearWeight::Blocks(Arc::new(m));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Holds the weight in bf16 for the AMX kernel ([`LinearWeight::Bf16`]): rounded to nearest
    /// even and packed once. Quantized weights are dequantized first. Returns whether it
    /// changed the weight (false when it is already bf16). The bias and an attached (unmerged)
    /// adapter stay f32.
    pub fn to_bf16(&mut self) -> candle_core::Result<bool> {
        if matches!(self.weight, LinearWeight::Bf16(_)) {
            return Ok(false);
        }
        let w = self.dense_weight()?;
        self.weight = LinearWeight::Bf16(Arc::new(Bf16Matrix::from_tensor(&w)?));
        Ok(true)
    }
}

impl Module for Linear {
    /// (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, self.in_dim))?; // (N, in)
        let mut y = match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?, // (N, out)
            LinearWeight::Quantized(q) => q.forward(&x2)?, // (N, out)
            // With a gradient to track, the dequantized weight keeps the graph connected.
            LinearWeight::Blocks(q) if x2.track_op() => x2.matmul(&q.dequantize_tensor()?.t()?)?,
            LinearWeight::Blocks(q) => q.forward(&x2)?, // (N, out)
            // The same for bf16: the rounded weight as f32 keeps the graph connected.
            LinearWeight::Bf16(m) if x2.track_op() => x2.matmul(&m.to_tensor()?.t()?)?,
            LinearWeight::Bf16(m) => {
                let rows = x2
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Tensor::from_vec(m.matmul(&rows, lead)?, (lead, self.out_dim), x2.device())?
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let delta = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?; // (N, r) -> (N, out)
            y = (y + (delta * l.scale)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
        y.reshape(out_dims)
    }
}
